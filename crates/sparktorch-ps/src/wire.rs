//! Async frame I/O for the server: header and meta first, then the payload read straight into
//! its destination buffer.

use std::io;

use sparktorch_proto::{
    decode_header, decode_meta, encode_head, payload, FrameHeader, Message, ProtoError, HEADER_LEN,
    MAX_META_BYTES,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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
    let mut head = [0u8; HEADER_LEN];
    let mut got = 0;
    if let Some(b) = first {
        head[0] = b;
        got = 1;
    }
    while got < HEADER_LEN {
        let n = r.read(&mut head[got..]).await?;
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
    let header = decode_header(&head, max_payload)?;
    let mut meta = [0u8; MAX_META_BYTES];
    let meta = &mut meta[..header.meta_len];
    r.read_exact(meta)
        .await
        .map_err(|e| eof_to_truncated(e, header.frame_len()))?;
    let message = decode_meta(&header, meta)?;
    Ok(Some((header, message)))
}

/// Read the payload announced by `header` into `buf` (resized to it; the length was bounded by
/// [`read_head`]).
pub(crate) async fn read_payload<R: AsyncRead + Unpin>(
    r: &mut R,
    header: &FrameHeader,
    buf: &mut Vec<f32>,
) -> Result<(), ReadError> {
    buf.resize(header.payload_values(), 0.0);
    r.read_exact(payload::as_wire_bytes_mut(buf))
        .await
        .map_err(|e| eof_to_truncated(e, header.frame_len()))?;
    payload::from_wire_in_place(buf);
    Ok(())
}

/// Write one frame; returns the bytes written.
pub(crate) async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &Message,
    values: &[f32],
    scratch: &mut Vec<u8>,
) -> io::Result<u64> {
    let bytes = payload::as_wire_bytes(values);
    scratch.clear();
    encode_head(msg, bytes.len(), scratch)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    if bytes.len() <= 64 * 1024 {
        // Small frames go out in one segment.
        scratch.extend_from_slice(&bytes);
        w.write_all(scratch).await?;
    } else {
        w.write_all(scratch).await?;
        w.write_all(&bytes).await?;
    }
    w.flush().await?;
    Ok((scratch.len()
        + if bytes.len() <= 64 * 1024 {
            0
        } else {
            bytes.len()
        }) as u64)
}
