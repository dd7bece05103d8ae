//! Why a checkpoint could not be written, read or used.

use std::path::PathBuf;

/// Why a checkpoint could not be written, read or used.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file system refused (open, read, write, fsync, rename, create directory).
    #[error("checkpoint {path}: cannot {op}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was attempted.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a valid checkpoint: truncated, corrupt, hostile, another format, a newer
    /// format version, or inconsistent fields.
    #[error("checkpoint {path} is invalid: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A valid checkpoint that does not fit the server resuming from it (`field` names what
    /// differs: `layout`, `optimizer`, `mode`, `params`, `optimizer_state`).
    #[error("checkpoint {path} does not match this server: {field}: {reason}")]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// What differs.
        field: &'static str,
        /// How.
        reason: String,
    },
}
