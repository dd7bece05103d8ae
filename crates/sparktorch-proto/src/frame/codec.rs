//! Meta encoding and decoding, and whole-frame decoding for buffered readers.

use super::{decode_header, ErrorCode, FrameHeader, FrameKind, Message, Mode, PushMeta, FLAG_BF16};
use crate::payload::{self, Dtype};
use crate::{
    ProtoError, HEADER_LEN, MAGIC, MAX_ERROR_MESSAGE_BYTES, MAX_PAYLOAD_BYTES, PROTOCOL_VERSION,
};

/// Little-endian field reader over a meta slice whose length was already checked.
struct Fields<'a> {
    kind: FrameKind,
    bytes: &'a [u8],
}

impl<'a> Fields<'a> {
    fn take<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], ProtoError> {
        let kind = self.kind;
        let (head, rest) = self
            .bytes
            .split_first_chunk::<N>()
            .ok_or(ProtoError::InvalidField {
                kind,
                field,
                reason: "meta too short",
            })?;
        self.bytes = rest;
        Ok(*head)
    }
    fn u8(&mut self, f: &'static str) -> Result<u8, ProtoError> {
        Ok(self.take::<1>(f)?[0])
    }
    fn u16(&mut self, f: &'static str) -> Result<u16, ProtoError> {
        Ok(u16::from_le_bytes(self.take(f)?))
    }
    fn u32(&mut self, f: &'static str) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(self.take(f)?))
    }
    fn u64(&mut self, f: &'static str) -> Result<u64, ProtoError> {
        Ok(u64::from_le_bytes(self.take(f)?))
    }
    fn i64(&mut self, f: &'static str) -> Result<i64, ProtoError> {
        Ok(i64::from_le_bytes(self.take(f)?))
    }
    fn f64(&mut self, f: &'static str) -> Result<f64, ProtoError> {
        Ok(f64::from_le_bytes(self.take(f)?))
    }
    fn bool(&mut self, field: &'static str) -> Result<bool, ProtoError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(ProtoError::InvalidField {
                kind: self.kind,
                field,
                reason: "a bool must be 0 or 1",
            }),
        }
    }
    fn push_meta(&mut self) -> Result<PushMeta, ProtoError> {
        Ok(PushMeta {
            worker: self.u32("worker")?,
            attempt: self.u32("attempt")?,
            step: self.u64("step")?,
            batch_size: self.u64("batch_size")?,
            loss: self.f64("loss")?,
            val_loss: self.f64("val_loss")?,
            base_version: self.u64("base_version")?,
        })
    }
}

/// Decode the meta of a frame whose header was validated by [`decode_header`].
pub fn decode_meta(header: &FrameHeader, meta: &[u8]) -> Result<Message, ProtoError> {
    let kind = header.kind;
    if meta.len() != header.meta_len {
        return Err(ProtoError::Truncated {
            needed: header.meta_len,
            available: meta.len(),
        });
    }
    let mut r = Fields { kind, bytes: meta };
    let msg = match kind {
        FrameKind::Hello => Message::Hello {
            version: r.u16("version")?,
            server_nonce: r.take("server_nonce")?,
        },
        FrameKind::Auth => Message::Auth {
            client_nonce: r.take("client_nonce")?,
            proof: r.take("proof")?,
        },
        FrameKind::AuthOk => Message::AuthOk {
            server_proof: r.take("server_proof")?,
        },
        FrameKind::Register => Message::Register {
            worker: r.u32("worker")?,
            attempt: r.u32("attempt")?,
        },
        FrameKind::Registered => Message::Registered {
            num_params: r.u64("num_params")?,
            resume_step: r.u64("resume_step")?,
            version: r.u64("version")?,
            mode: Mode::from_u8(r.u8("mode")?).ok_or(ProtoError::InvalidField {
                kind,
                field: "mode",
                reason: "unknown mode",
            })?,
            round_timeout_ms: r.u64("round_timeout_ms")?,
        },
        FrameKind::Pull => Message::Pull {
            newer_than: r.i64("newer_than")?,
        },
        FrameKind::Params => Message::Params {
            version: r.u64("version")?,
            should_stop: r.bool("should_stop")?,
        },
        FrameKind::Push => Message::Push(r.push_meta()?),
        FrameKind::PushPull => Message::PushPull(r.push_meta()?),
        FrameKind::PushAck => Message::PushAck {
            version: r.u64("version")?,
            should_stop: r.bool("should_stop")?,
            duplicate: r.bool("duplicate")?,
            stale: r.bool("stale")?,
        },
        FrameKind::StatsRequest => Message::StatsRequest,
        FrameKind::Stats => Message::Stats {
            version: r.u64("version")?,
            updates: r.u64("updates")?,
            workers_live: r.u32("workers_live")?,
            should_stop: r.bool("should_stop")?,
            best_loss: r.f64("best_loss")?,
        },
        FrameKind::EarlyStopRequest => Message::EarlyStopRequest,
        FrameKind::EarlyStop => Message::EarlyStop {
            should_stop: r.bool("should_stop")?,
            best_loss: r.f64("best_loss")?,
            bad_evaluations: r.u32("bad_evaluations")?,
        },
        FrameKind::Bye => Message::Bye,
        FrameKind::Error => {
            let code = ErrorCode::from_u16(r.u16("code")?);
            let len = r.u16("message_len")? as usize;
            if len != r.bytes.len() {
                return Err(ProtoError::InvalidField {
                    kind,
                    field: "message_len",
                    reason: "does not match the meta length",
                });
            }
            let message = std::str::from_utf8(r.bytes)
                .map_err(|_| ProtoError::InvalidField {
                    kind,
                    field: "message",
                    reason: "not UTF-8",
                })?
                .to_owned();
            r.bytes = &[];
            Message::Error { code, message }
        }
    };
    if !r.bytes.is_empty() {
        return Err(ProtoError::InvalidField {
            kind,
            field: "meta",
            reason: "trailing bytes",
        });
    }
    Ok(msg)
}

/// Append the header and meta of `msg` to `out`, announcing `payload_len` bytes of `f32`
/// payload that the caller writes right after (see [`crate::payload::as_wire_bytes`]).
pub fn encode_head(msg: &Message, payload_len: usize, out: &mut Vec<u8>) -> Result<(), ProtoError> {
    encode_head_as(msg, Dtype::F32, payload_len, out)
}

/// [`encode_head`] for a payload of `dtype` (on a request: also the dtype of the answer).
pub fn encode_head_as(
    msg: &Message,
    dtype: Dtype,
    payload_len: usize,
    out: &mut Vec<u8>,
) -> Result<(), ProtoError> {
    let kind = msg.kind();
    if !kind.has_payload() && payload_len != 0 {
        return Err(ProtoError::Unencodable {
            kind,
            reason: "this kind carries no payload",
        });
    }
    if dtype != Dtype::F32 && !kind.may_be_bf16() {
        return Err(ProtoError::Unencodable {
            kind,
            reason: "only Pull, Push, PushPull and Params frames may be bfloat16",
        });
    }
    if payload_len > MAX_PAYLOAD_BYTES || !payload_len.is_multiple_of(dtype.size()) {
        return Err(ProtoError::Unencodable {
            kind,
            reason: "payload over MAX_PAYLOAD_BYTES or not whole values",
        });
    }
    let mut meta: Vec<u8> = Vec::with_capacity(64);
    let push = |m: &mut Vec<u8>, p: &PushMeta| {
        m.extend_from_slice(&p.worker.to_le_bytes());
        m.extend_from_slice(&p.attempt.to_le_bytes());
        m.extend_from_slice(&p.step.to_le_bytes());
        m.extend_from_slice(&p.batch_size.to_le_bytes());
        m.extend_from_slice(&p.loss.to_le_bytes());
        m.extend_from_slice(&p.val_loss.to_le_bytes());
        m.extend_from_slice(&p.base_version.to_le_bytes());
    };
    match msg {
        Message::Hello {
            version,
            server_nonce,
        } => {
            meta.extend_from_slice(&version.to_le_bytes());
            meta.extend_from_slice(server_nonce);
        }
        Message::Auth {
            client_nonce,
            proof,
        } => {
            meta.extend_from_slice(client_nonce);
            meta.extend_from_slice(proof);
        }
        Message::AuthOk { server_proof } => meta.extend_from_slice(server_proof),
        Message::Register { worker, attempt } => {
            meta.extend_from_slice(&worker.to_le_bytes());
            meta.extend_from_slice(&attempt.to_le_bytes());
        }
        Message::Registered {
            num_params,
            resume_step,
            version,
            mode,
            round_timeout_ms,
        } => {
            meta.extend_from_slice(&num_params.to_le_bytes());
            meta.extend_from_slice(&resume_step.to_le_bytes());
            meta.extend_from_slice(&version.to_le_bytes());
            meta.push(*mode as u8);
            meta.extend_from_slice(&round_timeout_ms.to_le_bytes());
        }
        Message::Pull { newer_than } => meta.extend_from_slice(&newer_than.to_le_bytes()),
        Message::Params {
            version,
            should_stop,
        } => {
            meta.extend_from_slice(&version.to_le_bytes());
            meta.push(u8::from(*should_stop));
        }
        Message::Push(p) | Message::PushPull(p) => push(&mut meta, p),
        Message::PushAck {
            version,
            should_stop,
            duplicate,
            stale,
        } => {
            meta.extend_from_slice(&version.to_le_bytes());
            meta.push(u8::from(*should_stop));
            meta.push(u8::from(*duplicate));
            meta.push(u8::from(*stale));
        }
        Message::StatsRequest | Message::EarlyStopRequest | Message::Bye => {}
        Message::Stats {
            version,
            updates,
            workers_live,
            should_stop,
            best_loss,
        } => {
            meta.extend_from_slice(&version.to_le_bytes());
            meta.extend_from_slice(&updates.to_le_bytes());
            meta.extend_from_slice(&workers_live.to_le_bytes());
            meta.push(u8::from(*should_stop));
            meta.extend_from_slice(&best_loss.to_le_bytes());
        }
        Message::EarlyStop {
            should_stop,
            best_loss,
            bad_evaluations,
        } => {
            meta.push(u8::from(*should_stop));
            meta.extend_from_slice(&best_loss.to_le_bytes());
            meta.extend_from_slice(&bad_evaluations.to_le_bytes());
        }
        Message::Error { code, message } => {
            if message.len() > MAX_ERROR_MESSAGE_BYTES {
                return Err(ProtoError::Unencodable {
                    kind,
                    reason: "error message over MAX_ERROR_MESSAGE_BYTES (use Message::error)",
                });
            }
            meta.extend_from_slice(&code.to_u16().to_le_bytes());
            meta.extend_from_slice(&(message.len() as u16).to_le_bytes());
            meta.extend_from_slice(message.as_bytes());
        }
    }
    debug_assert!(kind.meta_len().is_none_or(|n| n == meta.len()));
    out.reserve(HEADER_LEN + meta.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    out.push(kind as u8);
    out.push(match dtype {
        Dtype::F32 => 0,
        Dtype::Bf16 => FLAG_BF16,
    });
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(&(payload_len as u32).to_le_bytes());
    out.extend_from_slice(&meta);
    Ok(())
}

/// A whole frame as decoded from a byte buffer (the payload copied out).
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// The message.
    pub message: Message,
    /// The f32 payload (empty for kinds without one).
    pub payload: Vec<f32>,
}

impl Frame {
    /// Encode to bytes (header, meta, payload).
    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        let bytes = payload::as_wire_bytes(&self.payload);
        let mut out = Vec::with_capacity(HEADER_LEN + 64 + bytes.len());
        encode_head(&self.message, bytes.len(), &mut out)?;
        out.extend_from_slice(&bytes);
        Ok(out)
    }
}

/// The result of feeding bytes to a [`Decoder`].
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// Not a whole frame yet: at least `needed` bytes in total are required.
    NeedMore {
        /// Total bytes (from the start of the buffer) needed for the next step.
        needed: usize,
    },
    /// A complete, validated frame, which used the first `consumed` bytes.
    Frame {
        /// The frame.
        frame: Frame,
        /// Bytes used.
        consumed: usize,
    },
}

/// An incremental decoder over a byte buffer: bytes in, frames (or "need more") out.
///
/// Stream readers that want the payload written straight into their own buffer use
/// [`decode_header`] and [`decode_meta`] directly; this type serves buffered readers, tests and
/// fuzzing.
#[derive(Debug, Clone, Copy)]
pub struct Decoder {
    /// Bound on payload bytes (at most [`MAX_PAYLOAD_BYTES`]).
    pub max_payload: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Self {
            max_payload: MAX_PAYLOAD_BYTES,
        }
    }
}

impl Decoder {
    /// A decoder accepting payloads of at most `max_payload` bytes.
    pub fn new(max_payload: usize) -> Self {
        Self {
            max_payload: max_payload.min(MAX_PAYLOAD_BYTES),
        }
    }

    /// Decode the frame at the start of `buf`, if complete. Rejects a bad header as soon as
    /// its bytes are there (a wrong magic as soon as the first differing byte is), before any
    /// allocation.
    pub fn decode(&self, buf: &[u8]) -> Result<Decoded, ProtoError> {
        let prefix = buf.len().min(MAGIC.len());
        if buf[..prefix] != MAGIC[..prefix] {
            let mut found = [0u8; 4];
            found[..prefix].copy_from_slice(&buf[..prefix]);
            return Err(ProtoError::BadMagic { found });
        }
        let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
            return Ok(Decoded::NeedMore { needed: HEADER_LEN });
        };
        let header = decode_header(head, self.max_payload)?;
        let total = header.frame_len();
        if buf.len() < total {
            return Ok(Decoded::NeedMore { needed: total });
        }
        let meta_end = HEADER_LEN + header.meta_len;
        let message = decode_meta(&header, &buf[HEADER_LEN..meta_end])?;
        let bytes = &buf[meta_end..total];
        // A bfloat16 payload is widened: a `Frame` always holds `f32` values.
        let payload = match header.dtype {
            Dtype::F32 => payload::decode_f32s(bytes),
            Dtype::Bf16 => {
                let mut v = vec![0.0; header.payload_values()];
                payload::decode_bf16(bytes, &mut v);
                v
            }
        };
        Ok(Decoded::Frame {
            frame: Frame { message, payload },
            consumed: total,
        })
    }

    /// Decode a buffer that must hold exactly one whole frame: a short buffer is
    /// [`ProtoError::Truncated`], extra bytes are an [`ProtoError::InvalidField`].
    pub fn decode_exact(&self, buf: &[u8]) -> Result<Frame, ProtoError> {
        match self.decode(buf)? {
            Decoded::NeedMore { needed } => Err(ProtoError::Truncated {
                needed,
                available: buf.len(),
            }),
            Decoded::Frame { frame, consumed } if consumed == buf.len() => Ok(frame),
            Decoded::Frame { frame, .. } => Err(ProtoError::InvalidField {
                kind: frame.message.kind(),
                field: "frame",
                reason: "trailing bytes after the frame",
            }),
        }
    }
}
