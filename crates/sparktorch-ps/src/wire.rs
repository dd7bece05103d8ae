//! Async frame I/O for the server: header and meta first, then the payload read straight into
//! its destination buffer. Which bytes go where is decided in [`crate::framing`], shared with
//! the blocking client.

use std::io;

use sparktorch_proto::{Dtype, FrameHeader, Message, ProtoError, HEADER_LEN};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::framing::{Head, Incoming, Outgoing, Scratch, Values};

/// Why reading a frame failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    /// The socket failed.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The bytes break the protocol (including a frame cut short by the peer).
    #[error("{0}")]
    Proto(#[from] ProtoError),
}

fn eof_to_truncated(e: io::Error, needed: usize) -> ReadError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        ReadError::Proto(ProtoError::Truncated {
            needed,
            available: 0,
        })
    } else {
        ReadError::Io(e)
    }
}

/// Read a header and its meta. `Ok(None)` when the peer closed cleanly between frames.
pub(crate) async fn read_head<R: AsyncRead + Unpin>(
    r: &mut R,
    max_payload: usize,
) -> Result<Option<(FrameHeader, Message)>, ReadError> {
    read_head_after(r, None, max_payload).await
}

/// Wait for the first byte of the next frame. `Ok(None)` when the peer closed cleanly.
pub(crate) async fn read_first_byte<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<u8>> {
    let mut b = [0u8; 1];
    match r.read(&mut b).await? {
        0 => Ok(None),
        _ => Ok(Some(b[0])),
    }
}

/// [`read_head`] for a frame whose first byte was already read (by [`read_first_byte`]).
pub(crate) async fn read_head_after<R: AsyncRead + Unpin>(
    r: &mut R,
    first: Option<u8>,
    max_payload: usize,
) -> Result<Option<(FrameHeader, Message)>, ReadError> {
    let mut head = Head::new();
    let bytes = head.header_bytes();
    let mut got = 0;
    if let Some(b) = first {
        bytes[0] = b;
        got = 1;
    }
    while got < HEADER_LEN {
        let n = r.read(&mut bytes[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(ProtoError::Truncated {
                needed: HEADER_LEN,
                available: got,
            }
            .into());
        }
        got += n;
    }
    let header = head.header(max_payload)?;
    r.read_exact(head.meta_bytes())
        .await
        .map_err(|e| eof_to_truncated(e, header.frame_len()))?;
    Ok(Some(head.message()?))
}

/// How a bfloat16 payload is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bf16Payload {
    /// Widened to `f32` as it is read.
    Widen,
    /// Kept as wire words in the first half of the buffer's memory
    /// ([`sparktorch_proto::payload::f32s_as_words`]), for a step that widens as it steps.
    Keep,
}

/// Read the payload announced by `header` into `buf` (resized to it; the length was bounded by
/// [`read_head`]); `chunk` is scratch for a bfloat16 payload that is widened.
pub(crate) async fn read_payload<R: AsyncRead + Unpin>(
    r: &mut R,
    header: &FrameHeader,
    buf: &mut Vec<f32>,
    chunk: &mut Vec<u16>,
    bf16: Bf16Payload,
) -> Result<(), ReadError> {
    let n = header.payload_values();
    if buf.capacity() < n {
        // A fresh zeroed allocation (calloc: the pages are mapped lazily, no memset of the
        // model's size on this thread).
        *buf = vec![0.0; n];
    } else {
        buf.resize(n, 0.0);
    }
    if header.dtype == Dtype::Bf16 && bf16 == Bf16Payload::Keep {
        let words = &mut sparktorch_proto::payload::f32s_as_words_mut(buf)[..n];
        r.read_exact(sparktorch_proto::payload::words_as_bytes_mut(words))
            .await
            .map_err(|e| eof_to_truncated(e, header.frame_len()))?;
        return Ok(());
    }
    let mut rx = Incoming::new(header, buf, chunk);
    while let Some(b) = rx.buffer() {
        r.read_exact(b)
            .await
            .map_err(|e| eof_to_truncated(e, header.frame_len()))?;
        rx.filled();
    }
    Ok(())
}

/// The scratch buffers of a frame writer, reused across frames.
pub(crate) type WriteBuffers = Scratch;

/// Write one frame carrying `values` as `dtype`; returns the bytes written.
pub(crate) async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &Message,
    values: Values<'_>,
    dtype: Dtype,
    scratch: &mut WriteBuffers,
) -> io::Result<u64> {
    let mut out = Outgoing::new(msg, values, dtype, std::mem::take(scratch))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let total = out.total();
    let mut result = Ok(());
    while let Some(b) = out.next_bytes() {
        if let Err(e) = w.write_all(b).await {
            result = Err(e);
            break;
        }
    }
    *scratch = out.into_scratch();
    result?;
    w.flush().await?;
    Ok(total)
}
