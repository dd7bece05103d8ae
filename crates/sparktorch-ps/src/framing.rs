//! Frames in and out, without I/O: the one place that decides which bytes a frame is written
//! as and where a payload's bytes are read into. The blocking client (`client.rs`) and the
//! async server (`wire.rs`) only move these byte slices with their own sockets.
//!
//! - [`Outgoing`]: a frame as a sequence of byte slices. A small frame is one slice (one TCP
//!   segment); a large `f32` payload that is already contiguous goes out straight from its
//!   memory (no copy), and so does a snapshot's bfloat16 copy (written by the step that made
//!   the snapshot); anything else (hogwild cells, other bfloat16) is converted chunk by chunk,
//!   so no model-size conversion buffer is made and each conversion step is short (a tokio
//!   worker is never blocked for long). The client hands a large bfloat16 push to
//!   [`write_bf16_pipelined`] instead, which converts it a few chunks ahead on a helper thread.
//! - [`Incoming`]: the buffers a payload is read into: straight into the destination `f32`
//!   slice, or through a chunk buffer that is widened from bfloat16.
//! - [`Head`]: the header and meta buffer of a frame being read.

use sparktorch_proto::payload::{self, Dtype};
use sparktorch_proto::{
    decode_header, decode_meta, encode_head_as, FrameHeader, Message, ProtoError, HEADER_LEN,
    MAX_META_BYTES,
};

use crate::store::ParamsView;

/// Values converted per chunk (1 MiB of `f32`, 512 KiB as bfloat16): small enough to stay in
/// a core's L2 cache and to keep each conversion short (0.1–0.3 ms), large enough that a
/// chunk is one efficient write and few wake-ups (docs/benchmarks.md, "bfloat16 on the hot
/// path": 64Ki values made a 25M bfloat16 pull 20.5 ms, 256Ki 16.1 ms, 1Mi 15.9 ms).
pub(crate) const CHUNK_VALUES: usize = 256 * 1024;

/// Frames whose whole encoding is at most this many bytes go out as one slice.
const INLINE_BYTES: usize = 64 * 1024;

/// The values of an outgoing payload.
#[derive(Clone, Copy)]
pub(crate) enum Values<'a> {
    /// A contiguous slice (gradients, a shared snapshot).
    Slice(&'a [f32]),
    /// Whatever the store hands out (a snapshot, or the hogwild cells read while sending).
    View(&'a ParamsView<'a>),
}

impl<'a> Values<'a> {
    fn len(&self) -> usize {
        match self {
            Self::Slice(s) => s.len(),
            Self::View(v) => v.len(),
        }
    }

    /// The values as one slice, when they are one.
    fn as_slice(self) -> Option<&'a [f32]> {
        match self {
            Self::Slice(s) => Some(s),
            Self::View(ParamsView::Shared(s)) => Some(&s.data),
            Self::View(ParamsView::Cells { .. }) => None,
        }
    }

    /// The values as bfloat16 wire words already, when the snapshot carries them (one word
    /// per value: anything else is ignored and the values are converted).
    fn as_bf16_words(self) -> Option<&'a [u16]> {
        match self {
            Self::View(ParamsView::Shared(s)) => s
                .bf16
                .as_deref()
                .map(Vec::as_slice)
                .filter(|w| w.len() == s.data.len()),
            _ => None,
        }
    }

    /// Encode values `[start, start + dst.len() / dtype.size())` as `dtype` into `dst`: from
    /// the slice, or loading each hogwild cell once, straight into the wire bytes.
    fn encode_range(&self, start: usize, dtype: Dtype, dst: &mut [u8]) {
        let end = start + dst.len() / dtype.size();
        if let Some(s) = self.as_slice() {
            match dtype {
                Dtype::F32 => dst.copy_from_slice(&payload::as_wire_bytes(&s[start..end])),
                Dtype::Bf16 => payload::encode_bf16(&s[start..end], dst),
            }
            return;
        }
        if let Self::View(ParamsView::Cells { cells, .. }) = self {
            // Small frames only (large ones go through `encode_words` for bfloat16).
            let cells = &cells[start..end];
            match dtype {
                Dtype::F32 => {
                    for (o, c) in dst.chunks_exact_mut(4).zip(cells) {
                        o.copy_from_slice(&c.load().to_le_bytes());
                    }
                }
                Dtype::Bf16 => {
                    for (o, c) in dst.chunks_exact_mut(2).zip(cells) {
                        o.copy_from_slice(&payload::f32_to_bf16(c.load()).to_le_bytes());
                    }
                }
            }
        }
    }
}

impl Values<'_> {
    /// Encode values `[start, start + dst.len())` as bfloat16 words in wire order.
    fn encode_words(&self, start: usize, dst: &mut [u16]) {
        let end = start + dst.len();
        match self.as_slice() {
            Some(s) => payload::encode_bf16_words(&s[start..end], dst),
            None => {
                if let Self::View(ParamsView::Cells { cells, .. }) = self {
                    for (o, c) in dst.iter_mut().zip(&cells[start..end]) {
                        *o = payload::f32_to_bf16(c.load()).to_le();
                    }
                }
            }
        }
    }
}

/// Scratch buffers of a frame writer or reader, reused across frames.
#[derive(Default)]
pub(crate) struct Scratch {
    /// Head and meta (and a small payload), then each converted `f32` chunk.
    bytes: Vec<u8>,
    /// Each bfloat16 chunk.
    words: Vec<u16>,
}

/// One frame on its way out; call [`Outgoing::next_bytes`] until it returns `None`.
pub(crate) struct Outgoing<'a> {
    /// The header and meta (and a small payload), then each converted `f32` chunk.
    buf: Vec<u8>,
    /// Each bfloat16 chunk (a `u16` buffer: the conversion loop vectorises).
    words: Vec<u16>,
    /// The payload.
    values: Values<'a>,
    /// Its type on the wire.
    dtype: Dtype,
    /// The head has not been handed out yet.
    head_pending: bool,
    /// Index of the next value to hand out.
    next: usize,
    /// Bytes of the whole frame.
    total: u64,
}

impl<'a> Outgoing<'a> {
    /// Encode the head of `msg` carrying `values` as `dtype`, in `scratch` (returned by
    /// [`Outgoing::into_scratch`] for reuse).
    pub(crate) fn new(
        msg: &Message,
        values: Values<'a>,
        dtype: Dtype,
        scratch: Scratch,
    ) -> Result<Self, ProtoError> {
        let Scratch {
            bytes: mut buf,
            words,
        } = scratch;
        let n = values.len();
        let payload_len = n * dtype.size();
        buf.clear();
        encode_head_as(msg, dtype, payload_len, &mut buf)?;
        let total = (buf.len() + payload_len) as u64;
        let mut out = Self {
            buf,
            words,
            values,
            dtype,
            head_pending: true,
            next: 0,
            total,
        };
        if out.total as usize <= INLINE_BYTES {
            // Small frames go out in one segment.
            out.append_chunk(n);
        }
        Ok(out)
    }

    /// Bytes of the whole frame.
    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    /// Append the next `m` values, converted, to `buf`.
    fn append_chunk(&mut self, m: usize) {
        let at = self.buf.len();
        self.buf.resize(at + m * self.dtype.size(), 0);
        self.values
            .encode_range(self.next, self.dtype, &mut self.buf[at..]);
        self.next += m;
    }

    /// The next bytes to write, `None` once the frame is complete.
    pub(crate) fn next_bytes(&mut self) -> Option<&[u8]> {
        if self.head_pending {
            self.head_pending = false;
            return Some(&self.buf);
        }
        let n = self.values.len();
        if self.next >= n {
            return None;
        }
        if self.dtype == Dtype::F32 {
            if let Some(s) = self.values.as_slice() {
                if let std::borrow::Cow::Borrowed(b) = payload::as_wire_bytes(&s[self.next..]) {
                    // The memory format is the wire format: no copy.
                    self.next = n;
                    return Some(b);
                }
            }
        }
        if self.dtype == Dtype::Bf16 {
            if let Some(words) = self.values.as_bf16_words() {
                // The step wrote this version's bfloat16 copy: sent as it is.
                let rest = &words[self.next..];
                self.next = n;
                return Some(payload::words_as_bytes(rest));
            }
        }
        let m = CHUNK_VALUES.min(n - self.next);
        if self.dtype == Dtype::Bf16 {
            self.words.resize(m, 0);
            self.values.encode_words(self.next, &mut self.words);
            self.next += m;
            return Some(payload::words_as_bytes(&self.words));
        }
        self.buf.clear();
        self.append_chunk(m);
        Some(&self.buf)
    }

    /// After the head: the rest of a large bfloat16 payload of contiguous values, taken
    /// whole, for [`write_bf16_pipelined`]. This `Outgoing` then counts the frame as complete:
    /// the caller must write all of it, or drop the connection (a frame cut short cannot be
    /// resumed). `None` for anything else (send it with [`Outgoing::next_bytes`]).
    pub(crate) fn take_bf16_rest(&mut self) -> Option<&'a [f32]> {
        let n = self.values.len();
        if self.head_pending || self.dtype != Dtype::Bf16 || n - self.next < PIPELINE_MIN_VALUES {
            return None;
        }
        let rest = &self.values.as_slice()?[self.next..];
        self.next = n;
        Some(rest)
    }

    /// The scratch buffers, for the next frame.
    pub(crate) fn into_scratch(self) -> Scratch {
        Scratch {
            bytes: self.buf,
            words: self.words,
        }
    }
}

/// Payloads from this many values up are encoded on a helper thread ahead of the writes
/// (below it the thread costs more than the overlap saves).
pub(crate) const PIPELINE_MIN_VALUES: usize = 4 * CHUNK_VALUES;

/// Chunks encoded ahead of the writer at most.
const PIPELINE_DEPTH: usize = 3;

/// Write `values` as bfloat16 wire words through `write`, [`CHUNK_VALUES`] at a time, while a
/// scoped helper thread encodes the next chunks: the conversion (a pass over the `f32`
/// values) overlaps the socket's copies instead of alternating with them. Stops at the first
/// error of `write` (the helper then stops too).
pub(crate) fn write_bf16_pipelined(
    values: &[f32],
    mut write: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    use std::sync::mpsc;
    let (full_tx, full_rx) = mpsc::sync_channel::<Vec<u16>>(PIPELINE_DEPTH);
    let (free_tx, free_rx) = mpsc::channel::<Vec<u16>>();
    for _ in 0..PIPELINE_DEPTH {
        // Cannot fail: the receiver is alive.
        let _ = free_tx.send(Vec::with_capacity(CHUNK_VALUES));
    }
    let chunks = values.len().div_ceil(CHUNK_VALUES);
    std::thread::scope(move |sc| {
        let helper = std::thread::Builder::new()
            .name("sparktorch-bf16-encode".into())
            .spawn_scoped(sc, move || {
                for chunk in values.chunks(CHUNK_VALUES) {
                    // Either channel closes when the writer stopped (an error): stop too.
                    let Ok(mut buf) = free_rx.recv() else { return };
                    buf.resize(chunk.len(), 0);
                    payload::encode_bf16_words(chunk, &mut buf);
                    if full_tx.send(buf).is_err() {
                        return;
                    }
                }
            });
        if helper.is_err() {
            // No thread to be had (a process at its limit): encode on this one.
            let mut buf = vec![0u16; CHUNK_VALUES.min(values.len())];
            for chunk in values.chunks(CHUNK_VALUES) {
                let words = &mut buf[..chunk.len()];
                payload::encode_bf16_words(chunk, words);
                write(payload::words_as_bytes(words))?;
            }
            return Ok(());
        }
        for _ in 0..chunks {
            let Ok(buf) = full_rx.recv() else {
                // Cannot happen: the helper sends every chunk unless a channel closed.
                return Err(std::io::Error::other("bfloat16 encoder thread stopped"));
            };
            write(payload::words_as_bytes(&buf))?;
            let _ = free_tx.send(buf);
        }
        Ok(())
        // Returning drops `full_rx` and `free_tx`, so the helper ends before the scope joins.
    })
}

/// The buffers a payload is read into; call [`Incoming::buffer`], fill it whole, then
/// [`Incoming::filled`], until `buffer` returns `None`.
pub(crate) struct Incoming<'a> {
    /// Where the values go.
    out: &'a mut [f32],
    /// The payload's type on the wire.
    dtype: Dtype,
    /// Chunk buffer for bfloat16 words.
    chunk: &'a mut Vec<u16>,
    /// Values done.
    done: usize,
    /// Values in the buffer handed out last.
    pending: usize,
}

impl<'a> Incoming<'a> {
    /// Read a payload of `header`'s dtype into `out` (whose length the caller checked against
    /// the header); `chunk` is scratch for converted payloads.
    pub(crate) fn new(header: &FrameHeader, out: &'a mut [f32], chunk: &'a mut Vec<u16>) -> Self {
        Self {
            out,
            dtype: header.dtype,
            chunk,
            done: 0,
            pending: 0,
        }
    }

    /// The next buffer to fill completely, `None` once the payload is in.
    pub(crate) fn buffer(&mut self) -> Option<&mut [u8]> {
        let n = self.out.len();
        if self.done >= n {
            return None;
        }
        match self.dtype {
            Dtype::F32 => {
                self.pending = n - self.done;
                Some(payload::as_wire_bytes_mut(&mut self.out[self.done..]))
            }
            Dtype::Bf16 => {
                self.pending = CHUNK_VALUES.min(n - self.done);
                self.chunk.resize(self.pending, 0);
                Some(payload::words_as_bytes_mut(self.chunk))
            }
        }
    }

    /// The buffer handed out last is full.
    pub(crate) fn filled(&mut self) {
        let range = self.done..self.done + self.pending;
        match self.dtype {
            Dtype::F32 => payload::from_wire_in_place(&mut self.out[range]),
            Dtype::Bf16 => payload::decode_bf16_words(self.chunk, &mut self.out[range]),
        }
        self.done += self.pending;
        self.pending = 0;
    }
}

/// The header and meta of a frame being read: fill [`Head::header_bytes`], call
/// [`Head::header`], fill [`Head::meta_bytes`], call [`Head::message`].
pub(crate) struct Head {
    /// Header bytes.
    head: [u8; HEADER_LEN],
    /// Meta bytes (up to the bound).
    meta: [u8; MAX_META_BYTES],
    /// The validated header, once decoded.
    header: Option<FrameHeader>,
}

impl Head {
    /// An empty head.
    pub(crate) fn new() -> Self {
        Self {
            head: [0; HEADER_LEN],
            meta: [0; MAX_META_BYTES],
            header: None,
        }
    }

    /// The header's bytes, to fill.
    pub(crate) fn header_bytes(&mut self) -> &mut [u8; HEADER_LEN] {
        &mut self.head
    }

    /// Validate the header (payload bounded by `max_payload` bytes).
    pub(crate) fn header(&mut self, max_payload: usize) -> Result<FrameHeader, ProtoError> {
        let h = decode_header(&self.head, max_payload)?;
        self.header = Some(h);
        Ok(h)
    }

    /// The meta's bytes, to fill (empty before [`Head::header`]).
    pub(crate) fn meta_bytes(&mut self) -> &mut [u8] {
        let len = self.header.map_or(0, |h| h.meta_len);
        &mut self.meta[..len]
    }

    /// Decode the message from the filled meta.
    pub(crate) fn message(&self) -> Result<(FrameHeader, Message), ProtoError> {
        let Some(h) = self.header else {
            return Err(ProtoError::Truncated {
                needed: HEADER_LEN,
                available: 0,
            });
        };
        Ok((h, decode_meta(&h, &self.meta[..h.meta_len])?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sparktorch_optim::AtomicF32;
    use sparktorch_proto::{Decoder, PushMeta};

    fn frame_bytes(msg: &Message, values: Values<'_>, dtype: Dtype) -> (Vec<u8>, usize) {
        let mut out = Outgoing::new(msg, values, dtype, Scratch::default()).expect("encodes");
        let total = out.total() as usize;
        let (mut bytes, mut pieces) = (Vec::new(), 0);
        while let Some(b) = out.next_bytes() {
            bytes.extend_from_slice(b);
            pieces += 1;
        }
        assert_eq!(bytes.len(), total);
        (bytes, pieces)
    }

    fn read_back(bytes: &[u8], n: usize) -> (Message, Vec<f32>) {
        let mut head = Head::new();
        head.header_bytes().copy_from_slice(&bytes[..HEADER_LEN]);
        let header = head.header(usize::MAX).expect("header");
        let meta_end = HEADER_LEN + header.meta_len;
        head.meta_bytes()
            .copy_from_slice(&bytes[HEADER_LEN..meta_end]);
        let (header, msg) = head.message().expect("meta");
        let mut out = vec![f32::NAN; n];
        let mut chunk: Vec<u16> = Vec::new();
        let mut rx = Incoming::new(&header, &mut out, &mut chunk);
        let mut at = meta_end;
        while let Some(buf) = rx.buffer() {
            let len = buf.len();
            buf.copy_from_slice(&bytes[at..at + len]);
            at += len;
            rx.filled();
        }
        assert_eq!(at, bytes.len());
        (msg, out)
    }

    #[test]
    fn every_source_and_dtype_writes_the_same_frame_a_decoder_reads() {
        let n = 3 * CHUNK_VALUES + 17;
        let values: Vec<f32> = (0..n).map(|i| (i as f32).sin() * 3.0).collect();
        let cells = AtomicF32::vec_from(&values);
        let view = ParamsView::Cells {
            version: 7,
            cells: &cells,
        };
        let msg = Message::Params {
            version: 7,
            should_stop: false,
        };
        let (direct, pieces) = frame_bytes(&msg, Values::Slice(&values), Dtype::F32);
        // The head, then the payload straight from memory.
        assert_eq!(pieces, 2);
        let (chunked, pieces) = frame_bytes(&msg, Values::View(&view), Dtype::F32);
        assert_eq!(pieces, 1 + 4);
        assert_eq!(direct, chunked);
        assert_eq!(read_back(&direct, n), (msg.clone(), values.clone()));

        let (half, _) = frame_bytes(&msg, Values::Slice(&values), Dtype::Bf16);
        let (half_cells, _) = frame_bytes(&msg, Values::View(&view), Dtype::Bf16);
        assert_eq!(half, half_cells);
        assert_eq!(half.len(), direct.len() - 2 * n);
        let (_, widened) = read_back(&half, n);
        let rounded: Vec<f32> = values
            .iter()
            .map(|v| payload::bf16_to_f32(payload::f32_to_bf16(*v)))
            .collect();
        assert_eq!(widened, rounded);
        // The proto crate's own decoder agrees.
        let frame = Decoder::default().decode_exact(&half).expect("decodes");
        assert_eq!(frame.payload, rounded);
    }

    /// A frame written the way the client writes it: the head, then a large bfloat16 payload
    /// through [`write_bf16_pipelined`].
    fn pipelined_frame_bytes(msg: &Message, values: &[f32]) -> Vec<u8> {
        let mut out = Outgoing::new(msg, Values::Slice(values), Dtype::Bf16, Scratch::default())
            .expect("encodes");
        let mut bytes = Vec::new();
        let mut pipelined = false;
        while let Some(b) = out.next_bytes() {
            bytes.extend_from_slice(b);
            if let Some(rest) = out.take_bf16_rest() {
                write_bf16_pipelined(rest, |b| {
                    bytes.extend_from_slice(b);
                    Ok(())
                })
                .expect("writes");
                pipelined = true;
            }
        }
        assert!(
            pipelined,
            "a payload of {} values is pipelined",
            values.len()
        );
        assert_eq!(bytes.len() as u64, out.total());
        bytes
    }

    #[test]
    fn pipelined_bf16_payloads_are_the_same_bytes() {
        let n = PIPELINE_MIN_VALUES + CHUNK_VALUES / 2 + 3;
        let values: Vec<f32> = (0..n).map(|i| (i as f32).cos() * 7.0).collect();
        let msg = Message::Push(PushMeta {
            worker: 1,
            attempt: 0,
            step: 9,
            batch_size: 8,
            loss: 0.5,
            val_loss: f64::NAN,
            base_version: 4,
        });
        let (plain, _) = frame_bytes(&msg, Values::Slice(&values), Dtype::Bf16);
        assert_eq!(pipelined_frame_bytes(&msg, &values), plain);
        // Below the threshold, nothing is taken: the chunks go out through `next_bytes`.
        let small = &values[..PIPELINE_MIN_VALUES - 1];
        let mut out = Outgoing::new(&msg, Values::Slice(small), Dtype::Bf16, Scratch::default())
            .expect("encodes");
        assert!(out.next_bytes().is_some());
        assert!(out.take_bf16_rest().is_none());
        // Nor for f32 payloads, which go out straight from memory.
        let mut out = Outgoing::new(&msg, Values::Slice(&values), Dtype::F32, Scratch::default())
            .expect("encodes");
        assert!(out.next_bytes().is_some());
        assert!(out.take_bf16_rest().is_none());
    }

    #[test]
    fn a_snapshots_bf16_copy_is_sent_as_it_is() {
        use crate::store::Snapshot;
        use std::sync::Arc;
        let n = 2 * CHUNK_VALUES + 11;
        let values: Vec<f32> = (0..n).map(|i| (i % 256) as f32 - 128.0).collect();
        // A copy that is *not* what converting the values would give: what goes out must be
        // these words (one write), not a conversion.
        let words: Vec<u16> = (0..n).map(|i| (i % 65_521) as u16).collect();
        let snap = Arc::new(Snapshot {
            version: 3,
            data: Arc::new(values.clone()),
            bf16: Some(Arc::new(words.clone())),
        });
        let view = ParamsView::Shared(snap.clone());
        let msg = Message::Params {
            version: 3,
            should_stop: false,
        };
        let (bytes, pieces) = frame_bytes(&msg, Values::View(&view), Dtype::Bf16);
        assert_eq!(pieces, 2, "the head, then the copy in one piece");
        assert_eq!(
            &bytes[bytes.len() - 2 * n..],
            payload::words_as_bytes(&words)
        );
        // Without a copy the values are converted, chunk by chunk.
        let plain = ParamsView::Shared(Arc::new(Snapshot {
            bf16: None,
            ..(*snap).clone()
        }));
        let (converted, pieces) = frame_bytes(&msg, Values::View(&plain), Dtype::Bf16);
        assert_eq!(pieces, 1 + 3);
        let (_, widened) = read_back(&converted, n);
        assert_eq!(widened, values, "these values are exact in bfloat16");
        // And float32 pulls ignore the copy.
        let (f32_bytes, _) = frame_bytes(&msg, Values::View(&view), Dtype::F32);
        assert_eq!(read_back(&f32_bytes, n).1, values);
    }

    #[test]
    fn a_failed_pipelined_write_stops_its_helper_and_returns() {
        let n = 6 * CHUNK_VALUES;
        let values = vec![1.5f32; n];
        let mut writes = 0;
        let r = write_bf16_pipelined(&values, |_| {
            writes += 1;
            if writes == 2 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::BrokenPipe,
                    "peer gone",
                ));
            }
            Ok(())
        });
        // The error comes back (and the scoped helper, blocked on a full channel, was released:
        // this returned at all).
        assert_eq!(r.expect_err("fails").kind(), std::io::ErrorKind::BrokenPipe);
        assert_eq!(writes, 2);
    }

    #[test]
    fn small_frames_are_one_slice() {
        let msg = Message::Push(PushMeta {
            worker: 0,
            attempt: 0,
            step: 1,
            batch_size: 4,
            loss: 0.25,
            val_loss: f64::NAN,
            base_version: 0,
        });
        let grads = [0.5f32; 100];
        let (bytes, pieces) = frame_bytes(&msg, Values::Slice(&grads), Dtype::F32);
        assert_eq!(pieces, 1);
        let (back, values) = read_back(&bytes, 100);
        assert_eq!(values, grads);
        assert!(matches!(back, Message::Push(p) if p.step == 1));
        let (_, pieces) = frame_bytes(&Message::Bye, Values::Slice(&[]), Dtype::F32);
        assert_eq!(pieces, 1);
    }
}
