//! What a front end shows of a checkpoint: [`Summary`], the one description that
//! `sparktorch-ps inspect` (text and `--json`) and the binding's `read_checkpoint` format.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Serialize, Serializer};
use sparktorch_optim::Hyperparameters;

use super::{hyper_json, iso8601, Checkpoint, EarlyStopState, WorkerState};
use super::{FORMAT_NAME, FORMAT_VERSION};

/// A checkpoint's description, borrowed from it: its metadata in the form the front ends show
/// it. Serialized (`serde_json`), it is the header of `sparktorch-ps inspect --json`:
/// hyperparameters as [`hyper_json`], worker ids as string keys, non-finite floats as `null`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary<'a> {
    /// The file read.
    pub path: String,
    /// [`FORMAT_NAME`].
    pub format: &'static str,
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// The engine version that wrote it.
    pub engine_version: &'a str,
    /// When it was written, ISO 8601 UTC.
    pub created: String,
    /// When it was written, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Training style (`"hogwild"`, `"async"`, `"synchronous"`).
    pub mode: &'static str,
    /// Optimizer steps applied.
    pub version: u64,
    /// The server's `num_workers`.
    pub num_workers: u32,
    /// Elements in the flat parameters (model buffers included).
    pub num_params: usize,
    /// Elements at the tail of the parameters that are model buffers.
    pub model_buffers: usize,
    /// `torch.optim` class name.
    pub optimizer: &'a str,
    /// Every hyperparameter.
    #[serde(serialize_with = "hyper")]
    pub hyperparameters: &'a Hyperparameters,
    /// The optimizer's step count.
    pub optimizer_step: u64,
    /// The optimizer's scalar state, by name.
    #[serde(serialize_with = "scalars")]
    pub optimizer_scalars: &'a [(String, f64)],
    /// Early stopping.
    pub early_stop: &'a EarlyStopState,
    /// Per worker id.
    pub workers: &'a BTreeMap<u32, WorkerState>,
}

/// Hyperparameters as [`hyper_json`] writes them.
fn hyper<S: Serializer>(h: &&Hyperparameters, s: S) -> Result<S::Ok, S::Error> {
    hyper_json(h).serialize(s)
}

/// Scalars as a map by name.
fn scalars<S: Serializer>(v: &&[(String, f64)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(v.iter().map(|(k, x)| (k, x)))
}

impl Checkpoint {
    /// Its description, with `path` (the file it was read from) as given.
    pub fn summary(&self, path: &Path) -> Summary<'_> {
        Summary {
            path: path.display().to_string(),
            format: FORMAT_NAME,
            format_version: FORMAT_VERSION,
            engine_version: &self.engine_version,
            created: iso8601(self.created_unix),
            created_unix: self.created_unix,
            mode: self.mode.as_str(),
            version: self.version,
            num_workers: self.num_workers,
            num_params: self.params.len(),
            model_buffers: self.model_buffers,
            optimizer: &self.optimizer,
            hyperparameters: &self.hyperparameters,
            optimizer_step: self.optimizer_state.step,
            optimizer_scalars: &self.optimizer_state.scalars,
            early_stop: &self.early_stop,
            workers: &self.workers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::tests::sample;

    #[test]
    fn summary_describes_the_checkpoint_and_serializes_non_finite_floats_as_null() {
        let mut c = sample();
        c.optimizer_state.scalars.push(("bad".into(), f64::NAN));
        let s = c.summary(Path::new("/x/checkpoint.safetensors"));
        assert_eq!(s.path, "/x/checkpoint.safetensors");
        assert_eq!((s.format, s.format_version), (FORMAT_NAME, FORMAT_VERSION));
        assert_eq!(s.created, "2025-11-24T16:00:00Z");
        assert_eq!(
            (s.mode, s.num_params, s.optimizer_step),
            ("synchronous", 5, 7)
        );
        let v = serde_json::to_value(&s).unwrap_or_default();
        assert_eq!(
            v,
            serde_json::json!({
                "path": "/x/checkpoint.safetensors",
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "engine_version": "0.0.0-test",
                "created": "2025-11-24T16:00:00Z",
                "created_unix": 1_764_000_000u64,
                "mode": "synchronous",
                "version": 7,
                "num_workers": 2,
                "num_params": 5,
                "model_buffers": 0,
                "optimizer": "Adam",
                "hyperparameters": hyper_json(&c.hyperparameters),
                "optimizer_step": 7,
                "optimizer_scalars": {"mu_product": 0.123_456_789_012_345_67, "bad": null},
                "early_stop": {
                    "best_loss": 0.1 + 0.2,
                    "bad_evaluations": 2,
                    "should_stop": false,
                },
                "workers": {
                    "0": {"next_step": 4, "attempt": 1},
                    "1": {"next_step": 3, "attempt": 0},
                },
            })
        );
    }
}
