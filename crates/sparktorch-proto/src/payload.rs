//! Tensor payloads: `f32` slices viewed as wire bytes (little-endian) without copying.
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

#[cfg(test)]
mod tests {
    use super::*;

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
