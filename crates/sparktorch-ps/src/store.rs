//! The parameter store: one flat `f32` buffer and the optimizer that updates it.
//!
//! Storage depends on the mode:
//! - **hogwild**: `Vec<AtomicF32>`; pushes call [`Optimizer::step_relaxed`] concurrently under a
//!   *read* lock of the optimizer (the lock only excludes a state import); pulls read the cells
//!   with relaxed loads, chunk by chunk as they are sent (a snapshot that may mix updates, as
//!   HOGWILD! allows; no model-size copy anywhere).
//! - **async** and **synchronous**: double-buffered, versioned snapshots. The current snapshot
//!   `(version, values)` is published through an [`ArcSwap`]: a pull loads it without a lock
//!   and sends the bytes straight from it, so pulls never wait for a step, nor for each other,
//!   nor copy. A step holds the optimizer's write lock (one update at a time, nothing lost) and
//!   steps *from* the current snapshot *into* a recycled buffer ([`Optimizer::step_into`]), then
//!   swaps the pointer: no allocation, no copy of the model, and a pull in flight always sends
//!   one whole version. The buffer the swap retires is recycled once the last pull holding it
//!   is done; only when every recycled buffer is still held by a slow pull does a step allocate
//!   a new one (counted in [`Store::allocations`]; at most the number of versions ever being
//!   sent at once, never one per step). Memory: two copies of the model, plus one per version
//!   that slow pulls hold at the same time.
//! - **bfloat16 copies** (async / synchronous): while clients pull bfloat16 (within the last
//!   [`BF16_COPY_WINDOW`] versions), each step also writes the bfloat16 words of the version it
//!   produces (each chunk narrowed right after it is stepped, while in cache), recycled like
//!   the values; bfloat16 pulls send them as they are. Only a pull of a version stepped without
//!   a copy (before the first bfloat16 pull, or after a lapse) converts. Memory: half the model
//!   more per version.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use arc_swap::ArcSwap;
use sparktorch_optim::{AtomicF32, Grads, Narrowed, Optimizer, OptimizerState};
use sparktorch_proto::Mode;

use crate::{lock, read, write};

/// Names and shapes of the tensors packed back to back in the flat buffer
/// (`named_parameters()` order), kept for checkpoints.
pub type Layout = Vec<(String, Vec<usize>)>;

/// Steps after the last bfloat16 pull that still write the bfloat16 copy of their version
/// ([`Store::note_bf16_pull`]).
pub const BF16_COPY_WINDOW: u64 = 64;

/// Free retired buffers kept for reuse (buffers that pulls still hold are always kept: they
/// become free when those pulls end). Enough for a handful of pulls overlapping the steps
/// without allocating again; beyond that, extra free buffers are dropped.
const MAX_FREE_SPARES: usize = 4;

/// A consistent version of the parameters.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Optimizer steps applied to produce it.
    pub version: u64,
    /// The values.
    pub data: Arc<Vec<f32>>,
    /// The same values as bfloat16 wire words, written by the step that produced them while
    /// clients pull bfloat16 ([`Store::note_bf16_pull`]): such pulls then send these bytes as
    /// they are, converting nothing.
    pub bf16: Option<Arc<Vec<u16>>>,
}

/// Async / synchronous storage: the published snapshot and the buffers to step into.
struct DoubleBuffer {
    /// The current version; pulls load it without locking.
    current: ArcSwap<Snapshot>,
    /// Retired buffers. Taken only by steps (which are serialised by the optimizer's write
    /// lock), so this lock is never contended by pulls.
    spares: Mutex<Vec<Arc<Vec<f32>>>>,
    /// Retired bfloat16 copies, recycled the same way.
    bf16_spares: Mutex<Vec<Arc<Vec<u16>>>>,
    /// Buffers allocated after construction because every spare was still held by a pull.
    allocations: AtomicU64,
}

impl DoubleBuffer {
    fn new(params: Vec<f32>, version: u64) -> Self {
        let spare = Arc::new(vec![0.0; params.len()]);
        Self {
            current: ArcSwap::from_pointee(Snapshot {
                version,
                data: Arc::new(params),
                bf16: None,
            }),
            spares: Mutex::new(vec![spare]),
            bf16_spares: Mutex::new(Vec::new()),
            allocations: AtomicU64::new(0),
        }
    }

    /// A buffer no pull holds (its contents are overwritten by the step).
    fn take_spare(&self, len: usize) -> Arc<Vec<f32>> {
        take_free(&self.spares, len, &self.allocations)
    }

    /// Keep a retired version's buffers for later steps. Buffers still held by pulls are kept
    /// (so that a step allocates only when more versions are being sent at once than ever
    /// before); of the free ones, at most [`MAX_FREE_SPARES`] of each kind.
    fn retire(&self, data: Arc<Vec<f32>>, bf16: Option<Arc<Vec<u16>>>) {
        keep_spare(&self.spares, data);
        if let Some(words) = bf16 {
            keep_spare(&self.bf16_spares, words);
        }
    }
}

/// A buffer of `len` values from `spares` that nothing else holds, else a new one (counted).
fn take_free<T: Clone + Default>(
    spares: &Mutex<Vec<Arc<Vec<T>>>>,
    len: usize,
    allocations: &AtomicU64,
) -> Arc<Vec<T>> {
    let mut spares = lock(spares);
    if let Some(i) = spares.iter().position(|b| Arc::strong_count(b) == 1) {
        let buf = spares.swap_remove(i);
        debug_assert_eq!(buf.len(), len, "a recycled buffer of another length");
        return buf;
    }
    drop(spares);
    allocations.fetch_add(1, Ordering::Relaxed);
    Arc::new(vec![T::default(); len])
}

/// Keep a retired `buf`: held ones always, free ones up to [`MAX_FREE_SPARES`].
fn keep_spare<T>(spares: &Mutex<Vec<Arc<Vec<T>>>>, buf: Arc<Vec<T>>) {
    let mut spares = lock(spares);
    spares.push(buf);
    let mut free = 0;
    spares.retain(|b| {
        let held = Arc::strong_count(b) > 1;
        free += usize::from(!held);
        held || free <= MAX_FREE_SPARES
    });
}

/// A step that was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// The version after it.
    pub version: u64,
    /// The steps before it (see [`Store::try_apply_then`]): its staleness is `before` minus
    /// the version its gradient was computed on.
    pub before: u64,
}

/// The values, stored per mode.
enum Values {
    /// Hogwild: element-wise relaxed atomics.
    Atomic(Vec<AtomicF32>),
    /// Async / synchronous: double-buffered snapshots.
    Locked(DoubleBuffer),
}

/// The parameters and their optimizer.
pub struct Store {
    /// The values.
    values: Values,
    /// The optimizer; read-locked by concurrent hogwild steps, write-locked by exclusive steps
    /// and state imports. Pulls never take it.
    optimizer: RwLock<Box<dyn Optimizer>>,
    /// Steps applied (in hogwild mode the authority; in the others a mirror of the snapshot's).
    version: AtomicU64,
    /// Hogwild: steps begun (admitted), `>= version`; a step's staleness is counted against it
    /// so that concurrent steps in flight count too.
    started: AtomicU64,
    /// Async / synchronous: 1 + the version current at the last bfloat16 pull (0: none yet).
    /// Steps within [`BF16_COPY_WINDOW`] versions of it also write the bfloat16 copy of the
    /// version they produce ([`Snapshot::bf16`]).
    bf16_pulled_at: AtomicU64,
    /// Number of elements.
    len: usize,
}

/// A view of the parameters for sending.
pub enum ParamsView<'a> {
    /// A shared snapshot (async / synchronous): sent straight from the store.
    Shared(Arc<Snapshot>),
    /// The hogwild cells, read while sending.
    Cells {
        /// Version read before the cells.
        version: u64,
        /// The cells.
        cells: &'a [AtomicF32],
    },
}

impl ParamsView<'_> {
    /// The version.
    pub fn version(&self) -> u64 {
        match self {
            Self::Shared(s) => s.version,
            Self::Cells { version, .. } => *version,
        }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Self::Shared(s) => s.data.len(),
            Self::Cells { cells, .. } => cells.len(),
        }
    }

    /// True for an empty model.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copy the values `[start, start + out.len())` into `out`.
    pub fn copy_range(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match self {
            Self::Shared(s) => out.copy_from_slice(&s.data[start..end]),
            Self::Cells { cells, .. } => {
                for (o, c) in out.iter_mut().zip(&cells[start..end]) {
                    *o = c.load();
                }
            }
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
            Mode::Async | Mode::Synchronous => Values::Locked(DoubleBuffer::new(params, version)),
        };
        Self {
            values,
            optimizer: RwLock::new(optimizer),
            version: AtomicU64::new(version),
            started: AtomicU64::new(version),
            bf16_pulled_at: AtomicU64::new(0),
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

    /// Model-size buffers allocated by steps since the store was built, values and bfloat16
    /// copies alike (async / synchronous: only when every recycled buffer was still held by a
    /// pull, and for the first bfloat16 copies; hogwild: always 0).
    pub fn allocations(&self) -> u64 {
        match &self.values {
            Values::Atomic(_) => 0,
            Values::Locked(db) => db.allocations.load(Ordering::Relaxed),
        }
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
        match self.try_apply_then(Grads::F32(grads), |_| true, on_applied) {
            Ok(a) => a.version,
            Err(v) => v,
        }
    }

    /// [`Store::apply_then`] if `admit(n)` says so, where `n` counts the steps that come
    /// before this one; else nothing (`Err(current version)`). In async / synchronous mode `n`
    /// is the version the step applies to, read under the step lock. In hogwild mode `n` counts
    /// the steps *begun* before this one (finished or still running concurrently), and the
    /// admission takes its place atomically, so `n - pulled_version <= k` bounds what really
    /// overlaps this step. `admit` may be called more than once (hogwild, under contention).
    pub fn try_apply_then(
        &self,
        grads: Grads<'_>,
        admit: impl Fn(u64) -> bool,
        on_applied: impl FnOnce(u64),
    ) -> Result<Applied, u64> {
        match &self.values {
            Values::Atomic(cells) => {
                let opt = read(&self.optimizer);
                let mut before = self.started.load(Ordering::Acquire);
                loop {
                    if !admit(before) {
                        return Err(self.version());
                    }
                    match self.started.compare_exchange_weak(
                        before,
                        before + 1,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    ) {
                        Ok(_) => break,
                        Err(now) => before = now,
                    }
                }
                match grads {
                    Grads::F32(g) => opt.step_relaxed(cells, g),
                    // The server widens hogwild pushes as it reads them; this path (a widened
                    // model-size copy per step) serves other callers of the API only.
                    Grads::Bf16(w) => {
                        let mut g = vec![0.0; w.len()];
                        sparktorch_proto::payload::decode_bf16_words(w, &mut g);
                        opt.step_relaxed(cells, &g);
                    }
                }
                let version = self.version.fetch_add(1, Ordering::AcqRel) + 1;
                on_applied(version);
                Ok(Applied { version, before })
            }
            Values::Locked(db) => {
                let mut opt = write(&self.optimizer);
                let cur = db.current.load_full();
                if !admit(cur.version) {
                    return Err(cur.version);
                }
                let mut next = db.take_spare(self.len);
                let Some(dst) = Arc::get_mut(&mut next) else {
                    // `take_spare` returns only buffers nothing else holds.
                    unreachable!("a spare buffer is shared");
                };
                // While clients pull bfloat16, the step also writes the new version's bfloat16
                // copy, chunk by chunk while the values are in cache.
                let mut bf16 = self
                    .bf16_copy_wanted(cur.version)
                    .then(|| take_free(&db.bf16_spares, self.len, &db.allocations));
                let narrowed = bf16.as_mut().map(|words| {
                    let Some(out) = Arc::get_mut(words) else {
                        unreachable!("a spare buffer is shared");
                    };
                    Narrowed {
                        out,
                        encode: sparktorch_proto::payload::encode_bf16_words,
                    }
                });
                opt.step_into_with(&cur.data, dst, grads, narrowed);
                let cur_version = cur.version;
                let version = cur_version + 1;
                db.current.store(Arc::new(Snapshot {
                    version,
                    data: next,
                    bf16,
                }));
                self.version.store(version, Ordering::Release);
                on_applied(version);
                drop(opt);
                let (data, bf16) = (cur.data.clone(), cur.bf16.clone());
                drop(cur);
                db.retire(data, bf16);
                Ok(Applied {
                    version,
                    before: cur_version,
                })
            }
        }
    }

    /// For a checkpoint: the version, the parameters, the optimizer state and `with()`'s
    /// result, taken together under the optimizer's read lock. In async / synchronous mode no
    /// step can run meanwhile (steps take the write lock), so all four belong to one version;
    /// the parameters are shared, not copied (the step after keeps them intact: it writes
    /// another buffer). In hogwild mode concurrent steps continue: the result is best effort
    /// (the parameters and the state may mix steps around the reported version).
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
            Values::Locked(db) => {
                let snap = db.current.load_full();
                let state = opt.export_state();
                (snap.version, snap.data.clone(), state, with(opt))
            }
        }
    }

    /// The parameters for sending: never waits for a step, never copies the model.
    pub fn view(&self) -> ParamsView<'_> {
        match &self.values {
            Values::Atomic(cells) => ParamsView::Cells {
                version: self.version(),
                cells,
            },
            Values::Locked(db) => ParamsView::Shared(db.current.load_full()),
        }
    }

    /// Note a bfloat16 pull: the next [`BF16_COPY_WINDOW`] steps (async / synchronous) also
    /// keep the version they produce as bfloat16 words, written once by the step, instead of
    /// having every pull that sends it convert it. While clients pull bfloat16 (every worker of
    /// a `psDtype='bfloat16'` fit does, every step) that never lapses; once they stop (say a
    /// monitoring client that pulled once), the copies stop after the window. Costs one more
    /// buffer of half the model's size per version held. No effect in hogwild mode (pulls read
    /// the live cells).
    pub fn note_bf16_pull(&self) {
        if matches!(self.values, Values::Locked(_)) {
            self.bf16_pulled_at
                .fetch_max(self.version() + 1, Ordering::Relaxed);
        }
    }

    /// Whether the step from `version` writes a bfloat16 copy: a bfloat16 pull was noted within
    /// [`BF16_COPY_WINDOW`] versions.
    fn bf16_copy_wanted(&self, version: u64) -> bool {
        match self.bf16_pulled_at.load(Ordering::Relaxed) {
            0 => false,
            at => version + 1 - at < BF16_COPY_WINDOW,
        }
    }

    /// A copy of the parameters and their version.
    pub fn snapshot(&self) -> (u64, Vec<f32>) {
        let view = self.view();
        let mut out = vec![0.0; view.len()];
        view.copy_range(0, &mut out);
        (view.version(), out)
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
    fn a_held_snapshot_keeps_its_version_and_buffers_are_recycled(
    ) -> Result<(), sparktorch_optim::OptimError> {
        let store = Store::new(vec![0.0; 4], sgd(4)?, Mode::Async);
        assert_eq!(store.apply(&[1.0; 4]), 1);
        let held = store.view();
        // A pull holds version 1: the next steps must not change what it sends.
        assert_eq!(store.apply(&[1.0; 4]), 2);
        assert_eq!(store.apply(&[1.0; 4]), 3);
        assert_eq!(held.version(), 1);
        let mut out = [0.0; 4];
        held.copy_range(0, &mut out);
        assert_eq!(out, [-1.0; 4]);
        assert_eq!(store.snapshot(), (3, vec![-3.0; 4]));
        // Held across two steps, version 1 took a third buffer (current, held, stepped into).
        assert_eq!(store.allocations(), 1);
        drop(held);
        for _ in 0..100 {
            store.apply(&[1.0; 4]);
        }
        // Then every step reused a retired buffer: no allocation per step.
        assert_eq!(store.allocations(), 1);
        Ok(())
    }

    #[test]
    fn steps_allocate_only_when_every_spare_is_held() -> Result<(), sparktorch_optim::OptimError> {
        let store = Store::new(vec![0.0; 2], sgd(2)?, Mode::Synchronous);
        let held: Vec<_> = (0..3)
            .map(|_| {
                let v = store.view();
                store.apply(&[1.0; 2]);
                v
            })
            .collect();
        // Versions 0, 1 and 2 are held: the spare built with the store covered the first step.
        assert_eq!(store.allocations(), 2);
        assert_eq!(
            held.iter().map(ParamsView::version).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        drop(held);
        for _ in 0..10 {
            store.apply(&[1.0; 2]);
        }
        assert_eq!(store.allocations(), 2);
        assert_eq!(store.snapshot(), (13, vec![-13.0; 2]));
        Ok(())
    }

    #[test]
    fn admission_sees_the_version_the_step_applies_to() -> Result<(), sparktorch_optim::OptimError>
    {
        for mode in [Mode::Async, Mode::Hogwild] {
            let store = Store::new(vec![0.0; 2], sgd(2)?, mode);
            store.apply(&[1.0; 2]);
            assert_eq!(
                store.try_apply_then(Grads::F32(&[1.0; 2]), |v| v < 1, |_| {}),
                Err(1)
            );
            assert_eq!(
                store.try_apply_then(Grads::F32(&[1.0; 2]), |v| v == 1, |_| {}),
                Ok(Applied {
                    version: 2,
                    before: 1
                })
            );
            assert_eq!(store.snapshot(), (2, vec![-2.0; 2]));
        }
        Ok(())
    }

    #[test]
    fn while_bf16_is_pulled_each_step_writes_its_versions_bf16_copy(
    ) -> Result<(), sparktorch_optim::OptimError> {
        use sparktorch_proto::payload::encode_bf16_words;
        let n = 3 * (1 << 16) + 5;
        let init: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let store = Store::new(init, sgd(n)?, Mode::Async);
        store.apply(&vec![0.001; n]);
        let ParamsView::Shared(before) = store.view() else {
            unreachable!("async mode shares snapshots");
        };
        assert!(before.bf16.is_none(), "no copy before a bf16 pull");
        store.note_bf16_pull();
        let grads: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut held = Vec::new();
        for _ in 0..6 {
            store.apply(&grads);
            let ParamsView::Shared(snap) = store.view() else {
                unreachable!("async mode shares snapshots");
            };
            let mut want = vec![0u16; n];
            encode_bf16_words(&snap.data, &mut want);
            assert_eq!(snap.bf16.as_deref(), Some(&want), "v{}", snap.version);
            // Held twice, like a slow pull: its copy must survive the next steps.
            if held.len() < 2 {
                held.push((snap.clone(), want));
            }
        }
        for (snap, want) in &held {
            assert_eq!(snap.bf16.as_deref(), Some(want), "held v{}", snap.version);
        }
        // Copies are recycled like the values: a few buffers for 6 steps, not one per step.
        let allocated = store.allocations();
        drop(held);
        for _ in 0..20 {
            store.apply(&grads);
        }
        assert_eq!(store.allocations(), allocated, "no allocation per step");
        // 26 steps since the last bf16 pull: still copied; past the window, no longer.
        let copied = |s: &Store| match s.view() {
            ParamsView::Shared(snap) => snap.bf16.is_some(),
            ParamsView::Cells { .. } => false,
        };
        assert!(copied(&store));
        for _ in 0..BF16_COPY_WINDOW {
            store.apply(&grads);
        }
        assert!(!copied(&store), "copies lapse once bf16 pulls stop");
        store.note_bf16_pull();
        store.apply(&grads);
        assert!(copied(&store), "and resume with the next bf16 pull");
        // Hogwild stores ignore it (pulls read the live cells).
        let cells = Store::new(vec![0.0; 4], sgd(4)?, Mode::Hogwild);
        cells.note_bf16_pull();
        cells.apply(&[1.0; 4]);
        assert_eq!(cells.snapshot(), (1, vec![-1.0; 4]));
        Ok(())
    }

    #[test]
    fn hogwild_store_steps() -> Result<(), sparktorch_optim::OptimError> {
        let store = Store::new(vec![1.0; 3], sgd(3)?, Mode::Hogwild);
        store.apply(&[0.5; 3]);
        assert_eq!(store.snapshot(), (1, vec![0.5; 3]));
        Ok(())
    }
}
