//! Tensor payloads: `f32` slices viewed as wire bytes (little-endian) without copying, and the
//! optional bfloat16 encoding ([`Dtype::Bf16`]).
//!
//! On little-endian hosts (every platform the product runs on) the wire format *is* the memory
//! format: [`as_wire_bytes`] borrows the slice and [`as_wire_bytes_mut`] lets a reader fill a
//! destination `f32` buffer directly from the socket. On big-endian hosts the bytes are swapped
//! in place after reading ([`from_wire_in_place`]) and converted into a copy before writing.

use std::borrow::Cow;

/// The bytes of `values` in wire order (borrowed on little-endian hosts).
pub fn as_wire_bytes(values: &[f32]) -> Cow<'_, [u8]> {
    #[cfg(target_endian = "little")]
    {
        // SAFETY: f32 has no padding and no invalid bit patterns as bytes; u8 has alignment 1;
        // the byte length is exactly `size_of_val(values)`, and the borrow keeps `values` alive
        // and unmodified for the lifetime of the returned slice.
        Cow::Borrowed(unsafe {
            std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
        })
    }
    #[cfg(not(target_endian = "little"))]
    {
        Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

/// A writable byte view of `values`, to read a payload into. Call [`from_wire_in_place`] once
/// the bytes are in.
pub fn as_wire_bytes_mut(values: &mut [f32]) -> &mut [u8] {
    let len = std::mem::size_of_val(values);
    // SAFETY: every bit pattern is a valid f32, so any bytes written through the view leave
    // valid f32 values; u8 has alignment 1; the length is exactly the slice's byte size; the
    // exclusive borrow is carried over to the returned slice.
    unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), len) }
}

/// Turn values whose bytes were read in wire order into host order (a no-op on little-endian).
#[inline]
pub fn from_wire_in_place(values: &mut [f32]) {
    #[cfg(not(target_endian = "little"))]
    for v in values.iter_mut() {
        *v = f32::from_bits(u32::from_le(v.to_bits()));
    }
    #[cfg(target_endian = "little")]
    let _ = values;
}

/// Decode a wire-order byte slice (length a multiple of 4) into a new vector.
pub fn decode_f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The element type of a tensor payload on the wire. The server keeps `f32` master weights
/// whatever travels; `bf16` halves the bytes of pushes and pulls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Dtype {
    /// IEEE `f32`, little-endian: the memory format, sent and received without conversion.
    #[default]
    F32,
    /// bfloat16 (the top 16 bits of an `f32`), little-endian; `f32` values are rounded to the
    /// nearest even bfloat16, as `torch.Tensor.to(torch.bfloat16)` does.
    Bf16,
}

impl Dtype {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 => 2,
        }
    }

    /// The name users give it (`"float32"`, `"bfloat16"`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::Bf16 => "bfloat16",
        }
    }

    /// Parse a user's name: `float32`/`f32`, `bfloat16`/`bf16` (case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "float32" | "f32" | "fp32" => Some(Self::F32),
            "bfloat16" | "bf16" => Some(Self::Bf16),
            _ => None,
        }
    }
}

/// Round `x` to the nearest bfloat16 (ties to even), as torch's `c10::BFloat16` does: every
/// NaN becomes the canonical quiet NaN `0x7FC0`.
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    if x.is_nan() {
        0x7fc0
    } else {
        rounded
    }
}

/// Widen a bfloat16 to the `f32` it denotes (exact).
#[inline(always)]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// Encode `values` as bfloat16 words in wire order (little-endian) into `out` (same length);
/// [`words_as_bytes`] then gives the wire bytes. A loop the compiler vectorises: with AVX2
/// where the CPU has it (chosen at run time; the same integer operations, so the same words),
/// which halves its time on data in cache.
pub fn encode_bf16_words(values: &[f32], out: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        unsafe { encode_bf16_words_avx2(values, out) };
        return;
    }
    encode_bf16_words_portable(values, out);
}

/// [`encode_bf16_words`] for any CPU.
#[inline(always)]
fn encode_bf16_words_portable(values: &[f32], out: &mut [u16]) {
    for (o, v) in out.iter_mut().zip(values) {
        *o = f32_to_bf16(*v).to_le();
    }
}

/// [`encode_bf16_words`] compiled for AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn encode_bf16_words_avx2(values: &[f32], out: &mut [u16]) {
    encode_bf16_words_portable(values, out);
}

/// Widen bfloat16 words in wire order into `out` (same length); with AVX2 where the CPU has
/// it, as [`encode_bf16_words`].
pub fn decode_bf16_words(words: &[u16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        unsafe { decode_bf16_words_avx2(words, out) };
        return;
    }
    decode_bf16_words_portable(words, out);
}

/// [`decode_bf16_words`] for any CPU.
#[inline(always)]
fn decode_bf16_words_portable(words: &[u16], out: &mut [f32]) {
    for (o, w) in out.iter_mut().zip(words) {
        *o = bf16_to_f32(u16::from_le(*w));
    }
}

/// [`decode_bf16_words`] compiled for AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn decode_bf16_words_avx2(words: &[u16], out: &mut [f32]) {
    decode_bf16_words_portable(words, out);
}

/// The bytes of `words` (wire order when they were written by [`encode_bf16_words`]).
pub fn words_as_bytes(words: &[u16]) -> &[u8] {
    // SAFETY: u16 has no padding; u8 has alignment 1; the byte length is exactly the slice's
    // size, and the borrow keeps `words` alive and unmodified for the returned slice's lifetime.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), std::mem::size_of_val(words)) }
}

/// A writable byte view of `words`, to read bfloat16 wire bytes into.
pub fn words_as_bytes_mut(words: &mut [u16]) -> &mut [u8] {
    let len = std::mem::size_of_val(words);
    // SAFETY: every bit pattern is a valid u16; u8 has alignment 1; the length is exactly the
    // slice's byte size; the exclusive borrow is carried over to the returned slice.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), len) }
}

/// The first `2 * values.len()` `u16` words of `values`' memory, to hold a bfloat16 payload
/// of `values.len()` words in a buffer that was allocated for as many `f32`s (the words fill
/// its first half; nothing is widened).
pub fn f32s_as_words(values: &[f32]) -> &[u16] {
    // SAFETY: f32 and u16 have no padding and every bit pattern is a valid u16; f32's alignment
    // (4) satisfies u16's (2); the length covers exactly the slice's bytes; the shared borrow
    // carries over to the returned slice.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u16>(), 2 * values.len()) }
}

/// A writable [`f32s_as_words`].
pub fn f32s_as_words_mut(values: &mut [f32]) -> &mut [u16] {
    let len = 2 * values.len();
    // SAFETY: as in `f32s_as_words`; any u16 written is a valid part of an f32 bit pattern; the
    // exclusive borrow carries over to the returned slice.
    unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u16>(), len) }
}

/// Encode `values` as little-endian bfloat16 into `out` (`2 * values.len()` bytes).
pub fn encode_bf16(values: &[f32], out: &mut [u8]) {
    for (o, v) in out.chunks_exact_mut(2).zip(values) {
        o.copy_from_slice(&f32_to_bf16(*v).to_le_bytes());
    }
}

/// Decode little-endian bfloat16 `bytes` into `out` (`bytes.len() / 2` values).
pub fn decode_bf16(bytes: &[u8], out: &mut [f32]) {
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = bf16_to_f32(u16::from_le_bytes([b[0], b[1]]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even_like_torch() {
        // Exactly representable values are kept.
        for v in [
            0.0f32,
            -0.0,
            1.0,
            -2.5,
            65280.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ] {
            assert_eq!(bf16_to_f32(f32_to_bf16(v)).to_bits(), v.to_bits(), "{v}");
        }
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even one (1.0);
        // 1 + 3 * 2^-8 lies halfway between 1 + 2^-7 and 1 + 2^-6: ties go to 1 + 2^-6.
        assert_eq!(bf16_to_f32(f32_to_bf16(1.0 + 1.0 / 256.0)), 1.0);
        assert_eq!(
            bf16_to_f32(f32_to_bf16(1.0 + 3.0 / 256.0)),
            1.0 + 1.0 / 64.0
        );
        // Just above the halfway point rounds up.
        assert_eq!(
            bf16_to_f32(f32_to_bf16(f32::from_bits(0x3f80_8001))),
            1.0 + 1.0 / 128.0
        );
        // The largest finite f32 rounds to infinity (as torch does); NaNs stay NaN.
        assert_eq!(bf16_to_f32(f32_to_bf16(f32::MAX)), f32::INFINITY);
        assert_eq!(f32_to_bf16(f32::NAN), 0x7fc0);
        assert_eq!(f32_to_bf16(f32::from_bits(0xffff_ffff)), 0x7fc0);
        // Relative error at most half an ulp (2^-8) for normal values.
        for i in 1..1000 {
            let v = (i as f32) * 0.7351 - 300.0;
            let r = bf16_to_f32(f32_to_bf16(v));
            assert!(((r - v) / v).abs() <= 1.0 / 256.0, "{v} -> {r}");
        }
        let v = [1.5f32, -3.0, 0.1];
        let mut bytes = [0u8; 6];
        encode_bf16(&v, &mut bytes);
        let mut back = [0f32; 3];
        decode_bf16(&bytes, &mut back);
        let mut words = [0u16; 3];
        encode_bf16_words(&v, &mut words);
        assert_eq!(words_as_bytes(&words), &bytes);
        let mut again = [0f32; 3];
        decode_bf16_words(&words, &mut again);
        assert_eq!(again, back);
        assert_eq!(&back[..2], &v[..2]);
        assert!((back[2] - 0.1).abs() < 1e-3);
    }

    #[test]
    fn every_build_of_the_word_conversions_gives_the_same_words() {
        // Ties, NaNs of every payload and sign, infinities, subnormals, both zeros, and a
        // sweep of ordinary values; lengths that leave vector remainders.
        let mut v: Vec<f32> = [
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0xffff_ffff),
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0x0000_0001),
            f32::from_bits(0x8000_8000),
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            f32::MAX,
        ]
        .to_vec();
        v.extend((0..10_007).map(|i| f32::from_bits((i as u32).wrapping_mul(2_654_435_761))));
        let mut portable = vec![0u16; v.len()];
        encode_bf16_words_portable(&v, &mut portable);
        let mut dispatched = vec![0u16; v.len()];
        encode_bf16_words(&v, &mut dispatched);
        assert_eq!(portable, dispatched);
        let mut wide_portable = vec![0f32; v.len()];
        decode_bf16_words_portable(&portable, &mut wide_portable);
        let mut wide = vec![0f32; v.len()];
        decode_bf16_words(&portable, &mut wide);
        let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&wide_portable), bits(&wide));
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            let mut avx2 = vec![0u16; v.len()];
            // SAFETY: AVX2 is available (checked just above).
            unsafe { encode_bf16_words_avx2(&v, &mut avx2) };
            assert_eq!(portable, avx2);
            let mut wide_avx2 = vec![0f32; v.len()];
            // SAFETY: as above.
            unsafe { decode_bf16_words_avx2(&portable, &mut wide_avx2) };
            assert_eq!(bits(&wide_portable), bits(&wide_avx2));
        }
    }

    #[test]
    fn bytes_roundtrip() {
        let v = [1.0f32, -0.5, f32::NAN, f32::INFINITY, 3.25e-30];
        let bytes = as_wire_bytes(&v).into_owned();
        assert_eq!(bytes.len(), 20);
        assert_eq!(&bytes[..4], &1.0f32.to_le_bytes());
        let mut back = [0f32; 5];
        as_wire_bytes_mut(&mut back).copy_from_slice(&bytes);
        from_wire_in_place(&mut back);
        for (a, b) in v.iter().zip(&back) {
            assert_eq!(a.to_bits(), b.to_bits());
        }
        let d = decode_f32s(&bytes);
        assert_eq!(d.len(), 5);
        assert_eq!(d[1], -0.5);
    }
}
