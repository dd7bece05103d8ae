//! The parameter store: one flat `f32` buffer and the optimizer that updates it.
//!
//! Storage depends on the mode:
//! - **hogwild**: `Vec<AtomicF32>`; pushes call [`Optimizer::step_relaxed`] concurrently under a
//!   *read* lock of the optimizer (the lock only excludes a state import); pulls copy the cells
//!   out with relaxed loads (a snapshot that may mix updates, as HOGWILD! allows).
//! - **async** and **synchronous**: a versioned copy-on-write snapshot `(version, Arc<Vec<f32>>)`
//!   behind an `RwLock`. A pull takes the read lock only long enough to clone the `Arc`, then
//!   sends the bytes straight from it: pulls never wait for each other nor copy. A step holds
//!   the optimizer's write lock (one update at a time, nothing lost); it updates the buffer in
//!   place when no pull holds the snapshot, else it steps a copy and swaps it in, so a pull
//!   in flight always sends one whole version.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use sparktorch_optim::{AtomicF32, Optimizer, OptimizerState};
use sparktorch_proto::Mode;

use crate::{read, write};

/// Names and shapes of the tensors packed back to back in the flat buffer
/// (`named_parameters()` order), kept for checkpoints.
pub type Layout = Vec<(String, Vec<usize>)>;

/// A consistent version of the parameters.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Optimizer steps applied to produce it.
    pub version: u64,
    /// The values.
    pub data: Arc<Vec<f32>>,
}

/// The values, stored per mode.
enum Values {
    /// Hogwild: element-wise relaxed atomics.
    Atomic(Vec<AtomicF32>),
    /// Async / synchronous: the current snapshot.
    Locked(RwLock<Snapshot>),
}

/// The parameters and their optimizer.
pub struct Store {
    /// The values.
    values: Values,
    /// The optimizer; read-locked by concurrent hogwild steps, write-locked by exclusive steps
    /// and state imports.
    optimizer: RwLock<Box<dyn Optimizer>>,
    /// Steps applied (in hogwild mode the authority; in the others a mirror of the snapshot's).
    version: AtomicU64,
    /// Number of elements.
    len: usize,
}

/// A view of the parameters for sending.
pub enum ParamsView<'a> {
    /// A shared snapshot (async / synchronous): sent straight from the store.
    Shared(Snapshot),
    /// Copied into the caller's scratch buffer (hogwild).
    Copied {
        /// Version read before copying.
        version: u64,
        /// The copy.
        data: &'a [f32],
    },
}

impl ParamsView<'_> {
    /// The version.
    pub fn version(&self) -> u64 {
        match self {
            Self::Shared(s) => s.version,
            Self::Copied { version, .. } => *version,
        }
    }
    /// The values.
    pub fn data(&self) -> &[f32] {
        match self {
            Self::Shared(s) => &s.data,
            Self::Copied { data, .. } => data,
        }
    }
}

impl Store {
    /// A store over `params` for `mode`.
    pub fn new(params: Vec<f32>, optimizer: Box<dyn Optimizer>, mode: Mode) -> Self {
        Self::with_version(params, optimizer, mode, 0)
    }

    /// A store over `params` that has already applied `version` steps (a resumed checkpoint).
    pub fn with_version(
        params: Vec<f32>,
        optimizer: Box<dyn Optimizer>,
        mode: Mode,
        version: u64,
    ) -> Self {
        let len = params.len();
        let values = match mode {
            Mode::Hogwild => Values::Atomic(AtomicF32::vec_from(&params)),
            Mode::Async | Mode::Synchronous => Values::Locked(RwLock::new(Snapshot {
                version,
                data: Arc::new(params),
            })),
        };
        Self {
            values,
            optimizer: RwLock::new(optimizer),
            version: AtomicU64::new(version),
            len,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty model.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Steps applied so far.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Apply one gradient (`grads.len() == self.len()`); returns the new version. Hogwild steps
    /// run concurrently; the others one at a time.
    pub fn apply(&self, grads: &[f32]) -> u64 {
        self.apply_then(grads, |_| {})
    }

    /// [`Store::apply`], then `on_applied(new_version)` while the step's lock is still held
    /// (async / synchronous), so that [`Store::consistent_snapshot`] sees the step and whatever
    /// `on_applied` records together, or neither. Hogwild steps hold no exclusive lock:
    /// `on_applied` runs right after the step.
    pub fn apply_then(&self, grads: &[f32], on_applied: impl FnOnce(u64)) -> u64 {
        match &self.values {
            Values::Atomic(cells) => {
                let opt = read(&self.optimizer);
                opt.step_relaxed(cells, grads);
                let v = self.version.fetch_add(1, Ordering::AcqRel) + 1;
                on_applied(v);
                v
            }
            Values::Locked(lock) => {
                let mut opt = write(&self.optimizer);
                {
                    let mut snap = write(lock);
                    if let Some(values) = Arc::get_mut(&mut snap.data) {
                        opt.step(values, grads);
                        snap.version += 1;
                        self.version.store(snap.version, Ordering::Release);
                        on_applied(snap.version);
                        return snap.version;
                    }
                }
                // A pull holds the current snapshot: step a copy, then swap it in.
                let current = read(lock).data.clone();
                let mut next = Vec::clone(&current);
                drop(current);
                opt.step(&mut next, grads);
                let mut snap = write(lock);
                snap.data = Arc::new(next);
                snap.version += 1;
                self.version.store(snap.version, Ordering::Release);
                on_applied(snap.version);
                snap.version
            }
        }
    }

    /// For a checkpoint: the version, the parameters, the optimizer state and `with()`'s
    /// result, taken together under the optimizer's read lock. In async / synchronous mode no
    /// step can run meanwhile (steps take the write lock), so all four belong to one version;
    /// the parameters are shared, not copied (the next step copies them instead of stepping
    /// in place). In hogwild mode concurrent steps continue: the result is best effort (the
    /// parameters and the state may mix steps around the reported version).
    pub fn consistent_snapshot<T>(
        &self,
        with: impl FnOnce(&dyn Optimizer) -> T,
    ) -> (u64, Arc<Vec<f32>>, OptimizerState, T) {
        let opt = read(&self.optimizer);
        let opt = opt.as_ref();
        match &self.values {
            Values::Atomic(cells) => {
                let version = self.version();
                let data: Vec<f32> = cells.iter().map(AtomicF32::load).collect();
                let state = opt.export_state();
                (version, Arc::new(data), state, with(opt))
            }
            Values::Locked(lock) => {
                let snap = read(lock).clone();
                let state = opt.export_state();
                (snap.version, snap.data, state, with(opt))
            }
        }
    }

    /// The parameters for sending; hogwild copies into `scratch`.
    pub fn view<'a>(&self, scratch: &'a mut Vec<f32>) -> ParamsView<'a> {
        match &self.values {
            Values::Atomic(cells) => {
                let version = self.version();
                scratch.clear();
                scratch.extend(cells.iter().map(AtomicF32::load));
                ParamsView::Copied {
                    version,
                    data: scratch,
                }
            }
            Values::Locked(lock) => ParamsView::Shared(read(lock).clone()),
        }
    }

    /// A copy of the parameters and their version.
    pub fn snapshot(&self) -> (u64, Vec<f32>) {
        let mut scratch = Vec::new();
        let view = self.view(&mut scratch);
        (view.version(), view.data().to_vec())
    }

    /// Write the parameters into `out` (same length) and return their version.
    pub fn copy_into(&self, out: &mut [f32]) -> u64 {
        match &self.values {
            Values::Atomic(cells) => {
                let version = self.version();
                for (o, c) in out.iter_mut().zip(cells) {
                    *o = c.load();
                }
                version
            }
            Values::Locked(lock) => {
                let snap = read(lock).clone();
                out.copy_from_slice(&snap.data[..out.len().min(snap.data.len())]);
                snap.version
            }
        }
    }

    /// Run `f` on the optimizer (shared access).
    pub fn with_optimizer<R>(&self, f: impl FnOnce(&dyn Optimizer) -> R) -> R {
        f(read(&self.optimizer).as_ref())
    }

    /// The optimizer's state.
    pub fn optimizer_state(&self) -> OptimizerState {
        read(&self.optimizer).export_state()
    }

    /// Replace the optimizer (e.g. rebuilt with other hyperparameters), then import `state`.
    pub fn replace_optimizer(
        &self,
        optimizer: Option<Box<dyn Optimizer>>,
        state: &OptimizerState,
    ) -> Result<(), sparktorch_optim::OptimError> {
        let mut guard = write(&self.optimizer);
        match optimizer {
            Some(mut new) => {
                new.import_state(state)?;
                *guard = new;
            }
            None => guard.import_state(state)?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sparktorch_optim::{build, HyperValue};

    fn sgd(len: usize) -> Result<Box<dyn Optimizer>, sparktorch_optim::OptimError> {
        build("SGD", &vec![("lr".into(), HyperValue::Float(1.0))], len)
    }

    #[test]
    fn locked_store_steps_in_place_and_copy_on_write() -> Result<(), sparktorch_optim::OptimError> {
        let store = Store::new(vec![0.0; 4], sgd(4)?, Mode::Async);
        assert_eq!(store.apply(&[1.0; 4]), 1);
        let mut scratch = Vec::new();
        let held = store.view(&mut scratch);
        // A pull holds version 1: the next step must not change what it sends.
        assert_eq!(store.apply(&[1.0; 4]), 2);
        assert_eq!(held.version(), 1);
        assert_eq!(held.data(), &[-1.0; 4]);
        assert_eq!(store.snapshot(), (2, vec![-2.0; 4]));
        Ok(())
    }

    #[test]
    fn hogwild_store_steps() -> Result<(), sparktorch_optim::OptimError> {
        let store = Store::new(vec![1.0; 3], sgd(3)?, Mode::Hogwild);
        store.apply(&[0.5; 3]);
        let mut out = [0.0; 3];
        assert_eq!(store.copy_into(&mut out), 1);
        assert_eq!(out, [0.5; 3]);
        Ok(())
    }
}
