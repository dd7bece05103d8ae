//! Errors of the server and of the client.

use std::time::Duration;

use sparktorch_proto::{ErrorCode, ProtoError};

/// Why a server could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum PsError {
    /// A configuration value is out of range; `param` names it as the Python API does.
    #[error("invalid {param}: {reason}")]
    InvalidConfig {
        /// The parameter's name (`secret`, `num_workers`, ...).
        param: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The optimizer could not be built or its state imported.
    #[error(transparent)]
    Optimizer(#[from] sparktorch_optim::OptimError),
    /// The listener failed (accept errors are logged and retried; this is for setup).
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    /// A checkpoint could not be written, read, or used to resume.
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    /// `run` was called a second time on the same server.
    #[error("this server is already running or has run")]
    AlreadyRan,
}

/// Why a client call failed. After any variant but [`ClientError::Server`] with code
/// `Timeout` the connection is closed and further calls fail with `Unavailable`.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached, or the connection broke.
    #[error("parameter server at {addr} unavailable: {reason}")]
    Unavailable {
        /// `host:port`.
        addr: String,
        /// What happened.
        reason: String,
    },
    /// A bounded wait ran out.
    #[error("timed out after {after:?} waiting for {what} from the parameter server at {addr}")]
    Timeout {
        /// `host:port`.
        addr: String,
        /// What the client waited for.
        what: &'static str,
        /// The bound.
        after: Duration,
    },
    /// The handshake failed: wrong secret (either side), or another protocol version.
    #[error("authentication with the parameter server at {addr} failed: {reason}")]
    Auth {
        /// `host:port`.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The server sent bytes that break the protocol.
    #[error("protocol error from the parameter server at {addr}: {source}")]
    Protocol {
        /// `host:port`.
        addr: String,
        /// The decoding error.
        source: ProtoError,
    },
    /// The server sent a frame that does not answer the request.
    #[error("unexpected {got} frame from the parameter server at {addr} (expected {expected})")]
    Unexpected {
        /// `host:port`.
        addr: String,
        /// The kind received.
        got: sparktorch_proto::FrameKind,
        /// The kind expected.
        expected: &'static str,
    },
    /// The server refused the request.
    #[error("parameter server refused the request ({code:?}): {message}")]
    Server {
        /// The server's code.
        code: ErrorCode,
        /// The server's message.
        message: String,
    },
    /// A buffer passed by the caller does not have the model's length.
    #[error("{what} has {got} elements, the model has {expected}")]
    WrongLength {
        /// Which argument.
        what: &'static str,
        /// The model's number of parameters.
        expected: usize,
        /// The argument's length.
        got: usize,
    },
}
