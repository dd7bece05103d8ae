//! Frames: the fixed header, the messages, encoding, and the incremental decoder.
//!
//! ```text
//! offset size field
//!      0    4 magic        b"SPT1"
//!      4    2 version      u16 LE, PROTOCOL_VERSION
//!      6    1 kind         u8, FrameKind
//!      7    1 flags        u8: bit 0 = BF16 (Pull, Push, PushPull, Params only), others 0
//!      8    4 meta_len     u32 LE, <= MAX_META_BYTES, exactly the kind's meta size
//!     12    4 payload_len  u32 LE, <= MAX_PAYLOAD_BYTES, multiple of the element size (4, or 2
//!                          with BF16), 0 for kinds without
//!     16    . meta         fixed fields of the message, LE
//!      .    . payload      raw f32 LE (bfloat16 LE with BF16)
//! ```
//!
//! The BF16 flag on a request (`Pull`, `Push`, `PushPull`) says that its payload is bfloat16
//! and that the `Params` answering it must be bfloat16 too; the server keeps `f32` values.
//!
//! ```text
//! ```

use std::fmt;

use crate::payload::{self, Dtype};
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

/// The training style of a server (carried in `Registered`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Mode {
    /// Lock-free: pushes apply concurrently over relaxed atomics.
    Hogwild = 0,
    /// One whole update at a time; pulls see consistent snapshots.
    Async = 1,
    /// Bulk-synchronous rounds over every live worker.
    Synchronous = 2,
}

impl Mode {
    /// The name used by the Python API (`"hogwild"`, `"async"`, `"synchronous"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hogwild => "hogwild",
            Self::Async => "async",
            Self::Synchronous => "synchronous",
        }
    }

    /// Parse a Python API name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "hogwild" => Some(Self::Hogwild),
            "async" => Some(Self::Async),
            "synchronous" => Some(Self::Synchronous),
            _ => None,
        }
    }

    fn from_u8(b: u8) -> Option<Self> {
        match b {
            0 => Some(Self::Hogwild),
            1 => Some(Self::Async),
            2 => Some(Self::Synchronous),
            _ => None,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a request failed, in a [`Message::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// A frame broke the protocol (bad magic, bounds, fields); the connection is closed.
    Protocol,
    /// The proof of the secret was wrong or missing; the connection is closed.
    AuthFailed,
    /// The peer speaks another protocol version; the connection is closed.
    VersionMismatch,
    /// A request that needs `Register` came first, or named another worker.
    NotRegistered,
    /// The worker id is out of range, or a newer attempt of this worker has registered.
    StaleAttempt,
    /// A payload length differs from the model's number of parameters.
    WrongLength,
    /// A bounded wait on the server ran out (e.g. a pull `newer_than` a version never reached).
    Timeout,
    /// A worker of a synchronous round was lost and the policy is to fail.
    WorkerLost,
    /// The server is shutting down.
    ShuttingDown,
    /// A request that is well-formed but invalid here (e.g. an unknown worker).
    BadRequest,
    /// A code this version does not know (kept as is).
    Other(u16),
}

impl ErrorCode {
    /// The wire value.
    pub fn to_u16(self) -> u16 {
        match self {
            Self::Protocol => 1,
            Self::AuthFailed => 2,
            Self::VersionMismatch => 3,
            Self::NotRegistered => 4,
            Self::StaleAttempt => 5,
            Self::WrongLength => 6,
            Self::Timeout => 7,
            Self::WorkerLost => 8,
            Self::ShuttingDown => 9,
            Self::BadRequest => 10,
            Self::Other(c) => c,
        }
    }

    /// From the wire value.
    pub fn from_u16(c: u16) -> Self {
        match c {
            1 => Self::Protocol,
            2 => Self::AuthFailed,
            3 => Self::VersionMismatch,
            4 => Self::NotRegistered,
            5 => Self::StaleAttempt,
            6 => Self::WrongLength,
            7 => Self::Timeout,
            8 => Self::WorkerLost,
            9 => Self::ShuttingDown,
            10 => Self::BadRequest,
            c => Self::Other(c),
        }
    }
}

/// The fixed fields of a `Push` / `PushPull` (the gradients are the payload).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PushMeta {
    /// The worker (Spark partition index) pushing.
    pub worker: u32,
    /// The worker's Spark attempt number; must equal the registered one.
    pub attempt: u32,
    /// The worker's step counter; a replayed step is acknowledged as a duplicate.
    pub step: u64,
    /// Examples behind these gradients (weights the synchronous average).
    pub batch_size: u64,
    /// Training loss of this step.
    pub loss: f64,
    /// Validation loss, NaN when none.
    pub val_loss: f64,
    /// The parameter version the gradients were computed on (the version last pulled).
    pub base_version: u64,
}

impl PushMeta {
    /// Meta size in bytes.
    pub const LEN: usize = 4 + 4 + 8 + 8 + 8 + 8 + 8;
}

/// A protocol message: the meta of one frame. Tensor payloads travel beside it (see the crate
/// docs); [`FrameKind::has_payload`] says which messages have one.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Server -> client, first frame: the server's protocol version and a fresh random nonce.
    Hello {
        /// The server's protocol version.
        version: u16,
        /// Fresh random bytes the client must prove the secret over.
        server_nonce: [u8; NONCE_LEN],
    },
    /// Client -> server: the client's nonce and `HMAC(secret, label || server_nonce || client_nonce)`.
    Auth {
        /// Fresh random bytes of the client.
        client_nonce: [u8; NONCE_LEN],
        /// The client's proof (see [`crate::auth`]).
        proof: [u8; PROOF_LEN],
    },
    /// Server -> client: authenticated; the server's own proof of the secret.
    AuthOk {
        /// The server's proof (see [`crate::auth`]).
        server_proof: [u8; PROOF_LEN],
    },
    /// Client -> server: join as `worker` (partition index), Spark attempt `attempt`.
    Register {
        /// The worker id (0 <= worker < num_workers).
        worker: u32,
        /// Spark's attempt number; older attempts are refused once a newer one registered.
        attempt: u32,
    },
    /// Server -> client: registered; the model size and where to resume.
    Registered {
        /// Number of f32 parameters.
        num_params: u64,
        /// Steps of this worker already applied: continue from here.
        resume_step: u64,
        /// Current parameter version.
        version: u64,
        /// The server's training style.
        mode: Mode,
        /// How long a synchronous round (or a `Pull` with `newer_than`) may wait, in ms.
        round_timeout_ms: u64,
    },
    /// Client -> server: send the parameters, once the version exceeds `newer_than` (-1: now).
    Pull {
        /// -1 for "now", else wait for a version > this.
        newer_than: i64,
    },
    /// Server -> client: the parameters at `version` (payload: num_params f32).
    Params {
        /// The version of the payload.
        version: u64,
        /// The global early-stop flag.
        should_stop: bool,
    },
    /// Client -> server: gradients of one step (payload: num_params f32).
    Push(PushMeta),
    /// Server -> client: the push was accepted (or recognised as a duplicate, or refused as
    /// too stale).
    PushAck {
        /// The server version after the push was accepted.
        version: u64,
        /// The global early-stop flag.
        should_stop: bool,
        /// True when this (worker, attempt, step) had been applied already: nothing changed.
        duplicate: bool,
        /// True when the push was computed on a version more than the server's bounded
        /// staleness behind (`max_staleness`): nothing changed, the step is not done; the
        /// worker pulls (a `PushPull` gets the current version) and computes it again.
        stale: bool,
    },
    /// Client -> server: a `Push` followed by a `Pull` (newer than the push's base version in
    /// synchronous mode), answered by `PushAck` then `Params`.
    PushPull(PushMeta),
    /// Client -> server: ask for [`Message::Stats`].
    StatsRequest,
    /// Server -> client: headline counters.
    Stats {
        /// Optimizer steps applied.
        version: u64,
        /// Pushes applied.
        updates: u64,
        /// Workers neither done nor lost.
        workers_live: u32,
        /// Global early-stop flag.
        should_stop: bool,
        /// Best evaluated loss so far (NaN before the first evaluation).
        best_loss: f64,
    },
    /// Client -> server: ask for [`Message::EarlyStop`].
    EarlyStopRequest,
    /// Server -> client: the early-stopping state.
    EarlyStop {
        /// Global early-stop flag.
        should_stop: bool,
        /// Best evaluated loss so far (NaN before the first evaluation).
        best_loss: f64,
        /// Evaluations since the last strict improvement.
        bad_evaluations: u32,
    },
    /// Client -> server: this worker is done (it leaves synchronous rounds); server -> client:
    /// acknowledged, the connection closes.
    Bye,
    /// Server -> client: a request failed.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// A human-readable reason (at most [`MAX_ERROR_MESSAGE_BYTES`]).
        message: String,
    },
}

impl Message {
    /// The frame kind of this message.
    pub fn kind(&self) -> FrameKind {
        match self {
            Self::Hello { .. } => FrameKind::Hello,
            Self::Auth { .. } => FrameKind::Auth,
            Self::AuthOk { .. } => FrameKind::AuthOk,
            Self::Register { .. } => FrameKind::Register,
            Self::Registered { .. } => FrameKind::Registered,
            Self::Pull { .. } => FrameKind::Pull,
            Self::Params { .. } => FrameKind::Params,
            Self::Push(_) => FrameKind::Push,
            Self::PushAck { .. } => FrameKind::PushAck,
            Self::PushPull(_) => FrameKind::PushPull,
            Self::StatsRequest => FrameKind::StatsRequest,
            Self::Stats { .. } => FrameKind::Stats,
            Self::EarlyStopRequest => FrameKind::EarlyStopRequest,
            Self::EarlyStop { .. } => FrameKind::EarlyStop,
            Self::Bye => FrameKind::Bye,
            Self::Error { .. } => FrameKind::Error,
        }
    }

    /// An error message, truncated to [`MAX_ERROR_MESSAGE_BYTES`] at a character boundary.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_ERROR_MESSAGE_BYTES {
            let mut cut = MAX_ERROR_MESSAGE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Self::Error { code, message }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_frames_announce_their_dtype_and_halve_the_payload() {
        let push = Message::Push(PushMeta {
            worker: 1,
            attempt: 0,
            step: 3,
            batch_size: 8,
            loss: 0.5,
            val_loss: f64::NAN,
            base_version: 2,
        });
        let values = [1.0f32, -2.5, 0.1];
        let mut out = Vec::new();
        encode_head_as(&push, Dtype::Bf16, 6, &mut out).expect("encodes");
        let mut bytes = [0u8; 6];
        payload::encode_bf16(&values, &mut bytes);
        out.extend_from_slice(&bytes);
        let head = out.first_chunk::<HEADER_LEN>().expect("header");
        let header = decode_header(head, 6).expect("valid");
        assert_eq!((header.dtype, header.payload_values()), (Dtype::Bf16, 3));
        let frame = Decoder::default().decode_exact(&out).expect("decodes");
        assert_eq!(&frame.payload[..2], &values[..2]);
        // A pull may ask for a bfloat16 answer; an odd byte count or a flag on a kind that
        // has no tensor is refused.
        let mut pull = Vec::new();
        encode_head_as(&Message::Pull { newer_than: -1 }, Dtype::Bf16, 0, &mut pull)
            .expect("encodes");
        let head = pull.first_chunk::<HEADER_LEN>().expect("header");
        assert_eq!(decode_header(head, 0).map(|h| h.dtype), Ok(Dtype::Bf16));
        assert!(encode_head_as(&push, Dtype::Bf16, 5, &mut Vec::new()).is_err());
        assert!(encode_head_as(&Message::Bye, Dtype::Bf16, 0, &mut Vec::new()).is_err());
        let mut odd = out.clone();
        odd[12] = 5;
        let head = odd.first_chunk::<HEADER_LEN>().expect("header");
        assert_eq!(
            decode_header(head, 100),
            Err(ProtoError::PayloadMisaligned { len: 5 })
        );
    }

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn push_meta() -> PushMeta {
        PushMeta {
            worker: 3,
            attempt: 1,
            step: 42,
            batch_size: 64,
            loss: 0.25,
            val_loss: f64::NAN,
            base_version: 7,
        }
    }

    fn all_messages() -> Vec<Message> {
        vec![
            Message::Hello {
                version: PROTOCOL_VERSION,
                server_nonce: [9; NONCE_LEN],
            },
            Message::Auth {
                client_nonce: [1; NONCE_LEN],
                proof: [2; PROOF_LEN],
            },
            Message::AuthOk {
                server_proof: [3; PROOF_LEN],
            },
            Message::Register {
                worker: 2,
                attempt: 5,
            },
            Message::Registered {
                num_params: 10,
                resume_step: 4,
                version: 9,
                mode: Mode::Synchronous,
                round_timeout_ms: 600_000,
            },
            Message::Pull { newer_than: -1 },
            Message::Params {
                version: 3,
                should_stop: true,
            },
            Message::Push(push_meta()),
            Message::PushAck {
                version: 11,
                should_stop: false,
                duplicate: true,
                stale: false,
            },
            Message::PushPull(push_meta()),
            Message::StatsRequest,
            Message::Stats {
                version: 1,
                updates: 2,
                workers_live: 3,
                should_stop: false,
                best_loss: 0.5,
            },
            Message::EarlyStopRequest,
            Message::EarlyStop {
                should_stop: true,
                best_loss: 0.1,
                bad_evaluations: 3,
            },
            Message::Bye,
            Message::error(ErrorCode::StaleAttempt, "attempt 0 < 1 ✓"),
        ]
    }

    fn same(a: &Message, b: &Message) -> bool {
        // NaN-aware comparison via the encoding.
        let mut x = Vec::new();
        let mut y = Vec::new();
        encode_head(a, 0, &mut x).is_ok() && encode_head(b, 0, &mut y).is_ok() && x == y
    }

    #[test]
    fn every_message_roundtrips() -> TestResult {
        for m in all_messages() {
            let payload = if m.kind().has_payload() {
                vec![1.0, -2.0, 3.5]
            } else {
                vec![]
            };
            let frame = Frame {
                message: m.clone(),
                payload: payload.clone(),
            };
            let bytes = frame.encode()?;
            let back = Decoder::default().decode_exact(&bytes)?;
            assert!(same(&back.message, &m), "{m:?} -> {:?}", back.message);
            assert_eq!(back.payload, payload);
        }
        Ok(())
    }

    #[test]
    fn every_prefix_needs_more_and_never_errors() -> TestResult {
        let frame = Frame {
            message: Message::Push(push_meta()),
            payload: vec![0.5; 5],
        };
        let bytes = frame.encode()?;
        for cut in 0..bytes.len() {
            match Decoder::default().decode(&bytes[..cut])? {
                Decoded::NeedMore { needed } => assert!(needed > cut),
                other => panic!("prefix {cut} decoded: {other:?}"),
            }
            assert!(matches!(
                Decoder::default().decode_exact(&bytes[..cut]),
                Err(ProtoError::Truncated { .. })
            ));
        }
        Ok(())
    }

    #[test]
    fn oversized_payload_rejected_from_the_header_alone() -> TestResult {
        let mut head = Vec::new();
        encode_head(&Message::Push(push_meta()), 0, &mut head)?;
        head[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = Decoder::default().decode(&head[..HEADER_LEN]).err();
        assert!(matches!(err, Some(ProtoError::PayloadTooLarge { .. })));
        // A receiver bound (the model size) is enforced too.
        head[12..16].copy_from_slice(&400u32.to_le_bytes());
        let err = Decoder::new(40).decode(&head[..HEADER_LEN]).err();
        assert_eq!(err, Some(ProtoError::PayloadTooLarge { len: 400, max: 40 }));
        Ok(())
    }

    #[test]
    fn http_request_is_bad_magic_at_once() -> TestResult {
        let err = Decoder::default().decode(b"GE").err();
        assert!(matches!(err, Some(ProtoError::BadMagic { .. })));
        let err = Decoder::default()
            .decode(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .err();
        assert!(matches!(err, Some(ProtoError::BadMagic { .. })));
        Ok(())
    }

    #[test]
    fn header_field_checks() -> TestResult {
        let mut head = Vec::new();
        encode_head(&Message::Bye, 0, &mut head)?;
        let h: [u8; HEADER_LEN] = head[..HEADER_LEN].try_into()?;
        let mut v = h;
        v[4] = 3;
        assert!(matches!(
            decode_header(&v, 0),
            Err(ProtoError::UnsupportedVersion { found: 3, .. })
        ));
        let mut k = h;
        k[6] = 200;
        assert_eq!(
            decode_header(&k, 0),
            Err(ProtoError::UnknownKind { kind: 200 })
        );
        let mut f = h;
        f[7] = 1;
        assert_eq!(
            decode_header(&f, 0),
            Err(ProtoError::ReservedFlags { flags: 1 })
        );
        f[7] = 2;
        assert_eq!(
            decode_header(&f, 0),
            Err(ProtoError::ReservedFlags { flags: 2 })
        );
        let mut p = h;
        p[12] = 4;
        assert!(matches!(
            decode_header(&p, 100),
            Err(ProtoError::UnexpectedPayload { .. })
        ));
        let mut m = h;
        m[8] = 1;
        assert!(matches!(
            decode_header(&m, 0),
            Err(ProtoError::MetaLength { .. })
        ));
        let mut big = h;
        big[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_header(&big, 0),
            Err(ProtoError::MetaTooLarge { .. })
        ));
        Ok(())
    }

    #[test]
    fn invalid_bool_and_mode_rejected() -> TestResult {
        let frame = Frame {
            message: Message::PushAck {
                version: 1,
                should_stop: false,
                duplicate: false,
                stale: true,
            },
            payload: vec![],
        };
        let mut bytes = frame.encode()?;
        bytes[HEADER_LEN + 8] = 2;
        assert!(matches!(
            Decoder::default().decode(&bytes),
            Err(ProtoError::InvalidField {
                field: "should_stop",
                ..
            })
        ));
        Ok(())
    }

    #[test]
    fn long_error_messages_are_truncated_on_a_char_boundary() -> TestResult {
        let m = Message::error(ErrorCode::Protocol, "é".repeat(MAX_ERROR_MESSAGE_BYTES));
        let Message::Error { message, .. } = &m else {
            unreachable!()
        };
        assert!(message.len() <= MAX_ERROR_MESSAGE_BYTES);
        let bytes = Frame {
            message: m.clone(),
            payload: vec![],
        }
        .encode()?;
        assert_eq!(Decoder::default().decode_exact(&bytes)?.message, m);
        Ok(())
    }
}
