//! Engine errors as the classes of `sparktorch.errors` (imported at raise time, so that the
//! hierarchy is declared once, in Python).

use pyo3::exceptions::{PyOSError, PyRuntimeError};
use pyo3::prelude::*;
use sparktorch_proto::ErrorCode;
use sparktorch_ps::{ClientError, PsError};

/// An instance of `sparktorch.errors.<class>` carrying `message`.
pub(crate) fn engine_err(py: Python<'_>, class: &str, message: impl Into<String>) -> PyErr {
    let message = message.into();
    match py
        .import("sparktorch.errors")
        .and_then(|m| m.getattr(class))
        .and_then(|cls| cls.call1((message.clone(),)))
    {
        Ok(instance) => PyErr::from_value(instance),
        Err(e) => PyRuntimeError::new_err(format!(
            "{message} (and sparktorch.errors.{class} is unavailable: {e})"
        )),
    }
}

/// `ParamError(message)`.
pub(crate) fn param_err(py: Python<'_>, message: impl Into<String>) -> PyErr {
    engine_err(py, "ParamError", message)
}

/// A server-side error as a Python exception.
pub(crate) fn ps_err(py: Python<'_>, e: PsError) -> PyErr {
    match &e {
        PsError::InvalidConfig { .. } | PsError::Optimizer(_) => param_err(py, e.to_string()),
        PsError::Io(_) => PyOSError::new_err(e.to_string()),
        PsError::AlreadyRan => engine_err(py, "EngineError", e.to_string()),
        PsError::Checkpoint(_) => engine_err(py, "CheckpointError", e.to_string()),
    }
}

/// A client error as a Python exception.
pub(crate) fn client_err(py: Python<'_>, e: ClientError) -> PyErr {
    let class = match &e {
        ClientError::Unavailable { .. } => "ServerUnavailableError",
        ClientError::Timeout { .. } => "EngineTimeoutError",
        ClientError::Auth { .. } => "AuthenticationError",
        ClientError::Protocol { .. } | ClientError::Unexpected { .. } => "ProtocolError",
        ClientError::WrongLength { .. } => "ParamError",
        ClientError::Server { code, .. } => match code {
            ErrorCode::AuthFailed | ErrorCode::VersionMismatch => "AuthenticationError",
            ErrorCode::Timeout => "EngineTimeoutError",
            ErrorCode::WorkerLost => "WorkerLostError",
            ErrorCode::ShuttingDown => "ServerUnavailableError",
            ErrorCode::Protocol => "ProtocolError",
            ErrorCode::WrongLength => "ParamError",
            ErrorCode::NotRegistered
            | ErrorCode::StaleAttempt
            | ErrorCode::BadRequest
            | ErrorCode::Other(_) => "EngineError",
        },
    };
    engine_err(py, class, e.to_string())
}
