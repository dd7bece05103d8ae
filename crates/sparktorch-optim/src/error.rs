//! Errors of optimizer construction and state import.

/// Why an optimizer could not be built or its state loaded.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum OptimError {
    /// The name is not one of [`crate::SUPPORTED`].
    #[error("unknown optimizer {name:?}; supported: {supported}")]
    UnknownOptimizer { name: String, supported: String },
    /// A hyperparameter this optimizer does not have.
    #[error("{optimizer} has no hyperparameter {name:?}; it takes: {accepted}")]
    UnknownHyperparameter {
        optimizer: &'static str,
        name: String,
        accepted: String,
    },
    /// A hyperparameter of the wrong kind (e.g. a bool where a float is expected).
    #[error("{optimizer}: hyperparameter {name:?} must be {expected}")]
    WrongType {
        optimizer: &'static str,
        name: String,
        expected: &'static str,
    },
    /// A hyperparameter outside the range torch accepts.
    #[error("{optimizer}: invalid {name} value: {value} ({reason})")]
    OutOfRange {
        optimizer: &'static str,
        name: String,
        value: String,
        reason: &'static str,
    },
    /// Imported state does not fit this optimizer (missing buffer, wrong length, ...).
    #[error("{optimizer}: cannot import state: {reason}")]
    BadState {
        optimizer: &'static str,
        reason: String,
    },
}
