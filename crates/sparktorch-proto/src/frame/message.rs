//! What a frame says: the messages and their field types.

use std::fmt;

use super::FrameKind;
use crate::{MAX_ERROR_MESSAGE_BYTES, NONCE_LEN, PROOF_LEN};

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

    pub(super) fn from_u8(b: u8) -> Option<Self> {
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
