//! The fixed 16-byte header: frame kinds, flags, lengths, and their validation.

use std::fmt;

use super::PushMeta;
use crate::payload::Dtype;
use crate::{
    ProtoError, HEADER_LEN, MAGIC, MAX_ERROR_MESSAGE_BYTES, MAX_META_BYTES, MAX_PAYLOAD_BYTES,
    NONCE_LEN, PROOF_LEN, PROTOCOL_VERSION,
};

/// The kind byte of a frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// Server -> client, first frame of a connection.
    Hello = 1,
    /// Client -> server, the proof of the secret.
    Auth = 2,
    /// Server -> client, the client is authenticated (with the server's proof).
    AuthOk = 3,
    /// Client -> server, join as a worker.
    Register = 4,
    /// Server -> client, answer to `Register`.
    Registered = 5,
    /// Client -> server, ask for the parameters.
    Pull = 6,
    /// Server -> client, the parameters (payload).
    Params = 7,
    /// Client -> server, gradients (payload).
    Push = 8,
    /// Server -> client, answer to `Push`.
    PushAck = 9,
    /// Client -> server, gradients (payload), answered by `PushAck` then `Params`.
    PushPull = 10,
    /// Client -> server, ask for counters.
    StatsRequest = 11,
    /// Server -> client, counters.
    Stats = 12,
    /// Client -> server, ask for the early-stopping state.
    EarlyStopRequest = 13,
    /// Server -> client, the early-stopping state.
    EarlyStop = 14,
    /// Either way: the worker is done / the server acknowledges and closes.
    Bye = 15,
    /// Server -> client: a request failed (the connection may stay open, see docs).
    Error = 16,
}

impl FrameKind {
    /// The kind with this byte, if any.
    pub fn from_u8(b: u8) -> Option<Self> {
        use FrameKind::*;
        Some(match b {
            1 => Hello,
            2 => Auth,
            3 => AuthOk,
            4 => Register,
            5 => Registered,
            6 => Pull,
            7 => Params,
            8 => Push,
            9 => PushAck,
            10 => PushPull,
            11 => StatsRequest,
            12 => Stats,
            13 => EarlyStopRequest,
            14 => EarlyStop,
            15 => Bye,
            16 => Error,
            _ => return None,
        })
    }

    /// Whether frames of this kind carry an `f32` payload.
    pub fn has_payload(self) -> bool {
        matches!(self, Self::Params | Self::Push | Self::PushPull)
    }

    /// Whether a frame of this kind may carry the BF16 flag: the kinds with a payload, and
    /// `Pull`, whose answer is a payload.
    pub fn may_be_bf16(self) -> bool {
        self.has_payload() || self == Self::Pull
    }

    /// The exact meta size of this kind, `None` when variable (`Error`).
    pub fn meta_len(self) -> Option<usize> {
        use FrameKind::*;
        Some(match self {
            Hello => 2 + NONCE_LEN,
            Auth => NONCE_LEN + PROOF_LEN,
            AuthOk => PROOF_LEN,
            Register => 8,
            Registered => 8 + 8 + 8 + 1 + 8,
            Pull => 8,
            Params => 8 + 1,
            Push | PushPull => PushMeta::LEN,
            PushAck => 8 + 1 + 1 + 1,
            StatsRequest | EarlyStopRequest | Bye => 0,
            Stats => 8 + 8 + 4 + 1 + 8,
            EarlyStop => 1 + 8 + 4,
            Error => return None,
        })
    }
}

impl fmt::Display for FrameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The header flag bit saying that the payload (and a request's answer) is bfloat16.
pub const FLAG_BF16: u8 = 1;

/// A validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// What the frame is.
    pub kind: FrameKind,
    /// Element type of the payload (and, on a request, of the answer's payload).
    pub dtype: Dtype,
    /// Bytes of meta that follow the header.
    pub meta_len: usize,
    /// Bytes of payload that follow the meta.
    pub payload_len: usize,
}

impl FrameHeader {
    /// Number of values in the payload.
    pub fn payload_values(&self) -> usize {
        self.payload_len / self.dtype.size()
    }

    /// Bytes of the whole frame.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.meta_len + self.payload_len
    }
}

/// Validate a header. `max_payload` is the receiver's bound on payload bytes (at most
/// [`MAX_PAYLOAD_BYTES`]; a server passes the size of its model). Every length is checked here,
/// before the caller allocates anything.
pub fn decode_header(
    bytes: &[u8; HEADER_LEN],
    max_payload: usize,
) -> Result<FrameHeader, ProtoError> {
    let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
    if magic != MAGIC {
        return Err(ProtoError::BadMagic { found: magic });
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != PROTOCOL_VERSION {
        return Err(ProtoError::UnsupportedVersion {
            found: version,
            supported: PROTOCOL_VERSION,
        });
    }
    let kind = FrameKind::from_u8(bytes[6]).ok_or(ProtoError::UnknownKind { kind: bytes[6] })?;
    let dtype = match bytes[7] {
        0 => Dtype::F32,
        FLAG_BF16 if kind.may_be_bf16() => Dtype::Bf16,
        flags => return Err(ProtoError::ReservedFlags { flags }),
    };
    let meta_len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    let payload_len = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]) as usize;
    if meta_len > MAX_META_BYTES {
        return Err(ProtoError::MetaTooLarge {
            len: meta_len,
            max: MAX_META_BYTES,
        });
    }
    match kind.meta_len() {
        Some(expected) if expected != meta_len => {
            return Err(ProtoError::MetaLength {
                kind,
                expected,
                found: meta_len,
            })
        }
        None if !(4..=4 + MAX_ERROR_MESSAGE_BYTES).contains(&meta_len) => {
            return Err(ProtoError::InvalidField {
                kind,
                field: "meta_len",
                reason: "error meta must be 4 bytes plus a message of at most 4096 bytes",
            })
        }
        _ => {}
    }
    if !kind.has_payload() && payload_len != 0 {
        return Err(ProtoError::UnexpectedPayload {
            kind,
            len: payload_len,
        });
    }
    let max = max_payload.min(MAX_PAYLOAD_BYTES);
    if payload_len > max {
        return Err(ProtoError::PayloadTooLarge {
            len: payload_len,
            max,
        });
    }
    if !payload_len.is_multiple_of(dtype.size()) {
        return Err(ProtoError::PayloadMisaligned { len: payload_len });
    }
    Ok(FrameHeader {
        kind,
        dtype,
        meta_len,
        payload_len,
    })
}
