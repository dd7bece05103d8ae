//! Checkpoints: one `safetensors` file with the parameters, the optimizer state and everything a
//! server needs to resume a fit.
//!
//! Tensors (all `F32`, little-endian):
//! - `param/<name>`: one per layout entry, with its shape (a model with no layout is stored as
//!   one entry `params` of shape `[n]`);
//! - `optim/<buffer>`: each optimizer buffer (torch's name, e.g. `optim/exp_avg`), flat over
//!   all parameters, shape `[n]`.
//!
//! The `__metadata__` string map holds the rest; see [`Checkpoint`] and `docs/engine.md`
//! ("Checkpoints") for every key. Writes are atomic (temp file in the same directory, fsync,
//! rename, fsync of the directory). Reading validates every field and every tensor; a corrupt,
//! truncated or hostile file is an error naming the file and the cause, never a panic, and no
//! allocation exceeds the file's size (itself bounded by [`MAX_CHECKPOINT_BYTES`]).
//!
//! Submodules, re-exported here: `error` ([`CheckpointError`]), `path` (what a user's path
//! names: [`resolve`], [`resolve_for_write`]), `time` (the creation stamp: [`now_unix`],
//! [`iso8601`]), `json` (the JSON inside the metadata: [`hyper_json`]), `format` (the file:
//! [`Checkpoint::write`], [`Checkpoint::read`]) and `summary` (what a front end shows of one:
//! [`Checkpoint::summary`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use sparktorch_optim::{Hyperparameters, OptimizerState};
use sparktorch_proto::{Mode, MAX_PAYLOAD_BYTES};

use crate::store::Layout;

mod error;
mod format;
mod json;
mod path;
mod summary;
mod time;

pub use error::CheckpointError;
pub use json::hyper_json;
pub use path::{resolve, resolve_for_write};
pub use summary::Summary;
pub use time::{iso8601, now_unix};

/// The value of the `format` metadata key.
pub const FORMAT_NAME: &str = "sparktorch-checkpoint";

/// The format version this engine writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;

/// The file name inside a checkpoint directory.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";

/// Most optimizer buffers a checkpoint may carry (the largest optimizer keeps 3).
pub const MAX_BUFFERS: usize = 8;

/// Upper bound on a checkpoint file, in bytes: the parameters at the protocol's bound
/// ([`MAX_PAYLOAD_BYTES`]) plus [`MAX_BUFFERS`] buffers of the same size, plus a 100 MB header
/// (the `safetensors` header bound). Larger files are refused before anything is read.
pub const MAX_CHECKPOINT_BYTES: u64 =
    (MAX_PAYLOAD_BYTES as u64) * (1 + MAX_BUFFERS as u64) + (100 << 20);

/// What the server remembers per worker for a resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WorkerState {
    /// Highest step applied + 1: what `resume_step` answers after a resume.
    pub next_step: u64,
    /// The attempt that pushed last (informational: a resumed fit is a new Spark job, whose
    /// attempts count from 0 again, so a resumed server accepts every attempt).
    pub attempt: u32,
}

/// Early-stopping state.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct EarlyStopState {
    /// Best evaluated mean loss (`None` before the first evaluation).
    pub best_loss: Option<f64>,
    /// Evaluations since the last strict improvement.
    pub bad_evaluations: u32,
    /// Global early stop reached.
    pub should_stop: bool,
}

/// Everything in a checkpoint file.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// The engine version that wrote it (`engine_version`).
    pub engine_version: String,
    /// Training style (`mode`).
    pub mode: Mode,
    /// Optimizer steps applied (`version`).
    pub version: u64,
    /// `torch.optim` class name (`optimizer`).
    pub optimizer: String,
    /// Every hyperparameter, defaults filled in (`hyperparameters`, JSON).
    pub hyperparameters: Hyperparameters,
    /// Step, scalars (`optimizer_state`, JSON) and buffers (`optim/<name>` tensors).
    pub optimizer_state: OptimizerState,
    /// Per worker id (`workers`, JSON).
    pub workers: BTreeMap<u32, WorkerState>,
    /// The server's `num_workers` (`num_workers`).
    pub num_workers: u32,
    /// Tensor names and shapes (`layout`, JSON); never empty (see the module doc).
    pub layout: Layout,
    /// Elements at the tail of `params` that are model buffers (BatchNorm running statistics,
    /// ...), not stepped by the optimizer (`model_buffers`; absent in older files: 0). The
    /// optimizer buffers cover the other `params.len() - model_buffers` elements.
    pub model_buffers: usize,
    /// Early stopping (`early_stop`, JSON).
    pub early_stop: EarlyStopState,
    /// Seconds since the Unix epoch when it was written (`created_unix`); `created` holds the
    /// same instant as ISO 8601 UTC.
    pub created_unix: u64,
    /// The flat parameters (layout order).
    pub params: Arc<Vec<f32>>,
}

impl Checkpoint {
    /// Each parameter tensor in layout order: `(name, shape, values)`.
    pub fn param_tensors(&self) -> impl Iterator<Item = (&str, &[usize], &[f32])> {
        crate::layout::tensors(&self.layout, &self.params)
    }
}

/// `layout`, or the single entry `params: [n]` when it is empty.
pub fn effective_layout(layout: &Layout, n: usize) -> Layout {
    if layout.is_empty() {
        vec![("params".to_string(), vec![n])]
    } else {
        layout.clone()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! What the tests of the submodules share.

    use std::collections::BTreeMap;
    use std::sync::Arc;

    use sparktorch_optim::{HyperValue, OptimizerState};
    use sparktorch_proto::Mode;

    use super::{Checkpoint, EarlyStopState, WorkerState};

    /// A small checkpoint with every field set.
    pub(crate) fn sample() -> Checkpoint {
        Checkpoint {
            engine_version: "0.0.0-test".into(),
            mode: Mode::Synchronous,
            version: 7,
            optimizer: "Adam".into(),
            hyperparameters: vec![
                ("lr".into(), HyperValue::Float(1e-3)),
                ("betas".into(), HyperValue::Pair(0.9, 0.999)),
                ("amsgrad".into(), HyperValue::Bool(false)),
            ],
            optimizer_state: OptimizerState {
                step: 7,
                scalars: vec![("mu_product".into(), 0.123_456_789_012_345_67)],
                buffers: vec![
                    (
                        "exp_avg".into(),
                        vec![0.1, -0.2, 0.3, f32::MIN_POSITIVE, 5.0],
                    ),
                    ("exp_avg_sq".into(), vec![1e-30, 2.0, 3.0, 4.0, f32::MAX]),
                ],
            },
            workers: BTreeMap::from([
                (
                    0,
                    WorkerState {
                        next_step: 4,
                        attempt: 1,
                    },
                ),
                (
                    1,
                    WorkerState {
                        next_step: 3,
                        attempt: 0,
                    },
                ),
            ]),
            num_workers: 2,
            layout: vec![
                ("fc.weight".into(), vec![2, 2]),
                ("fc.bias".into(), vec![1]),
            ],
            model_buffers: 0,
            early_stop: EarlyStopState {
                best_loss: Some(0.1 + 0.2),
                bad_evaluations: 2,
                should_stop: false,
            },
            created_unix: 1_764_000_000,
            params: Arc::new(vec![1.0, -0.0, f32::EPSILON, -3.5e-12, 9.0]),
        }
    }
}
