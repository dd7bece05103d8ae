//! The server: accepts connections, runs the handshake, answers requests, closes synchronous
//! rounds, tracks workers, early stopping and counters.
//!
//! One tokio task per connection. A request frame is read whole (header, meta, payload) and
//! validated before anything is applied, so a connection dropped mid-push changes nothing.
//! Optimizer steps run on tokio's blocking pool (`spawn_blocking`) so that they never stall the
//! reactor. Locks, always taken in this order: the round (`tokio::sync::Mutex`, synchronous mode
//! only; held across the round's step), then the coordinator (`std::sync::Mutex`, short critical
//! sections, never held across an await), then the store's own locks.
//!
//! Submodules: `conn` (one connection: handshake, requests), `coord` (workers, idempotence,
//! early stopping, history), `round` (synchronous rounds and their lost-worker timer).

mod conn;
mod coord;
mod round;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sparktorch_optim::{HyperValue, Optimizer, OptimizerState};
use sparktorch_proto::{Mode, MAX_PARAMS};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::checkpoint::{
    effective_layout, now_unix, Checkpoint, CheckpointError, EarlyStopState, WorkerState,
    CHECKPOINT_FILE,
};
use crate::config::ServerConfig;
use crate::stats::Stats;
use crate::store::{Layout, Store};
use crate::{lock, PsError};
use conn::serve_connection;
use coord::{Coord, Status};
pub use coord::{HistoryEntry, HISTORY_CAP};
use round::Round;

/// A parameter server. Cheap to clone (shared state); [`Server::run`] serves a listener.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

/// What the server publishes to waiting pulls.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    /// Current version.
    version: u64,
    /// A fatal condition was recorded: waiters answer with an error.
    failed: bool,
}

/// Monotonic counters (atomics: updated from every connection without a lock).
#[derive(Default)]
struct Counters {
    /// Pushes applied (or accepted into a round).
    updates: AtomicU64,
    /// Replayed pushes acknowledged without applying.
    duplicates: AtomicU64,
    /// Synchronous pushes computed on a version older than the open round: acknowledged,
    /// not averaged.
    stale_discarded: AtomicU64,
    /// Async pushes refused for exceeding `max_staleness` (their workers compute the step
    /// again).
    stale_refused: AtomicU64,
    /// Connections open now.
    connections: AtomicU64,
    /// Frames refused.
    rejected_frames: AtomicU64,
    /// Handshakes refused.
    auth_failures: AtomicU64,
    /// Bytes read.
    bytes_in: AtomicU64,
    /// Bytes written.
    bytes_out: AtomicU64,
}

/// Checkpoint bookkeeping.
#[derive(Default)]
struct Checkpoints {
    /// An automatic write is queued or running (at most one at a time).
    in_progress: AtomicBool,
    /// The version at or after which the next automatic checkpoint is due.
    next_at: AtomicU64,
    /// Failed automatic / final writes.
    errors: AtomicU64,
    /// Serialises every checkpoint write (snapshot and file): the files appear in version
    /// order. Held across the file I/O, so nothing else ever takes it.
    writer: Mutex<()>,
    /// The last one written: `(version, file)`. Locked only to read or replace it (`stats()`
    /// reads it), never across I/O.
    last: Mutex<Option<(u64, PathBuf)>>,
    /// Tests: a slow filesystem stand-in, slept after the snapshot, before the file is
    /// written (`started` is set then).
    #[cfg(test)]
    slow_io: SlowIo,
}

/// A slow filesystem stand-in for tests.
#[cfg(test)]
#[derive(Default)]
struct SlowIo {
    /// How long each write sleeps.
    delay: Mutex<Duration>,
    /// A write is sleeping (or slept).
    started: AtomicBool,
}

/// Everything the connections share.
struct Inner {
    /// How the server behaves.
    config: ServerConfig,
    /// Tensor names and shapes (for checkpoints).
    layout: Layout,
    /// Parameters and optimizer.
    store: Store,
    /// Workers, early stopping, history.
    coord: Mutex<Coord>,
    /// The open synchronous round.
    round: tokio::sync::Mutex<Round>,
    /// Version and failure, watched by waiting pulls.
    progress: watch::Sender<Progress>,
    /// Bumped whenever the starving queue of bounded staleness shrinks; pushes held back for
    /// a starving worker watch it.
    fed: watch::Sender<u64>,
    /// Set once the server stops; connections and timers watch it.
    stop: watch::Sender<bool>,
    /// Counters.
    counters: Counters,
    /// `run` was called.
    started: AtomicBool,
    /// Gradient buffers returned by closed rounds, reused by connections.
    pool: Mutex<Vec<Vec<f32>>>,
    /// Per worker, the highest step *applied to the parameters* + 1 and its attempt: updated
    /// under the store's step lock, so that a checkpoint's parameters and worker steps agree
    /// (a synchronous push counts once its round closed, unlike `Coord`'s `next_step`).
    ledger: Mutex<BTreeMap<u32, WorkerState>>,
    /// Checkpoint bookkeeping.
    checkpoints: Checkpoints,
}

impl Server {
    /// A server over `params` (the flat buffer; `layout` names its tensors, or is empty) with
    /// `optimizer` (built for `params.len()` elements).
    pub fn new(
        params: Vec<f32>,
        layout: Layout,
        optimizer: Box<dyn Optimizer>,
        config: ServerConfig,
    ) -> Result<Self, PsError> {
        Self::build(params, layout, optimizer, config, None)
    }

    /// A server that continues from `checkpoint` (read from `path`): its parameters, optimizer
    /// state, version, per-worker next steps and early-stopping state. `layout` (names and
    /// shapes), the optimizer's name and `config.mode` must match the checkpoint's; other
    /// hyperparameters may differ (the given ones win, with a warning), as may `num_workers`.
    pub fn resume(
        layout: Layout,
        mut optimizer: Box<dyn Optimizer>,
        config: ServerConfig,
        checkpoint: Checkpoint,
        path: &Path,
    ) -> Result<Self, PsError> {
        let mismatch = |field, reason: String| {
            PsError::Checkpoint(CheckpointError::Mismatch {
                path: path.to_path_buf(),
                field,
                reason,
            })
        };
        let c = checkpoint;
        if c.mode != config.mode {
            return Err(mismatch(
                "mode",
                format!(
                    "the checkpoint was written in mode {:?}, this server runs {:?}",
                    c.mode.as_str(),
                    config.mode.as_str()
                ),
            ));
        }
        if !c.optimizer.eq_ignore_ascii_case(optimizer.name()) {
            return Err(mismatch(
                "optimizer",
                format!(
                    "the checkpoint holds {} state, this server runs {}",
                    c.optimizer,
                    optimizer.name()
                ),
            ));
        }
        let ours = effective_layout(&layout, optimizer.len());
        if ours != c.layout {
            let first = ours
                .iter()
                .zip(&c.layout)
                .position(|(a, b)| a != b)
                .unwrap_or(ours.len().min(c.layout.len()));
            let show = |l: &Layout| {
                l.get(first)
                    .map_or("nothing".to_string(), |(n, s)| format!("{n:?} {s:?}"))
            };
            return Err(mismatch(
                "layout",
                format!(
                    "tensor #{first}: the checkpoint has {}, the model has {} ({} vs {} tensors)",
                    show(&c.layout),
                    show(&ours),
                    c.layout.len(),
                    ours.len()
                ),
            ));
        }
        if c.params.len() != optimizer.len() {
            return Err(mismatch(
                "params",
                format!(
                    "the checkpoint has {} parameters, the model {}",
                    c.params.len(),
                    optimizer.len()
                ),
            ));
        }
        let buffers = optimizer.len() - optimizer.trainable_len();
        if c.model_buffers != buffers {
            return Err(mismatch(
                "model_buffers",
                format!(
                    "the checkpoint holds {} model-buffer values after its trainable ones, the model {}",
                    c.model_buffers, buffers
                ),
            ));
        }
        let given = optimizer.hyperparameters();
        for (name, value) in &given {
            let saved = c
                .hyperparameters
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| *v);
            if !saved.is_some_and(|s| same_hyper(&s, value)) {
                warn!(path = %path.display(), hyperparameter = %name, checkpoint = ?saved,
                      now = ?value, "resuming with a hyperparameter that differs from the checkpoint");
            }
        }
        if c.num_workers != config.num_workers {
            warn!(path = %path.display(), checkpoint = c.num_workers, now = config.num_workers,
                  "resuming with another num_workers");
        }
        optimizer
            .import_state(&c.optimizer_state)
            .map_err(|e| mismatch("optimizer_state", e.to_string()))?;
        let params = Arc::try_unwrap(c.params).unwrap_or_else(|a| Vec::clone(&a));
        let server = Self::build(
            params,
            layout,
            optimizer,
            config,
            Some((c.version, c.workers.clone(), c.early_stop)),
        )?;
        info!(path = %path.display(), version = c.version, workers = ?c.workers,
              "resumed from checkpoint");
        Ok(server)
    }

    fn build(
        params: Vec<f32>,
        layout: Layout,
        optimizer: Box<dyn Optimizer>,
        config: ServerConfig,
        resumed: Option<(u64, BTreeMap<u32, WorkerState>, EarlyStopState)>,
    ) -> Result<Self, PsError> {
        config.validate()?;
        let bad = |param, reason: String| Err(PsError::InvalidConfig { param, reason });
        if params.len() > MAX_PARAMS {
            return bad(
                "params",
                format!(
                    "{} elements exceed the protocol bound of {MAX_PARAMS}",
                    params.len()
                ),
            );
        }
        if optimizer.len() != params.len() {
            return bad(
                "optimizer",
                format!(
                    "built for {} elements, the model has {}",
                    optimizer.len(),
                    params.len()
                ),
            );
        }
        if !layout.is_empty() {
            let total = crate::layout::layout_len(&layout);
            if total != Some(params.len()) {
                let total = total.map_or("more than usize::MAX".to_string(), |t| t.to_string());
                return bad(
                    "layout",
                    format!(
                        "shapes add up to {total} elements, params has {}",
                        params.len()
                    ),
                );
            }
        }
        if let Some(dir) = &config.checkpoint_dir {
            std::fs::create_dir_all(dir).map_err(|source| CheckpointError::Io {
                path: dir.clone(),
                op: "create the checkpoint directory",
                source,
            })?;
        }
        let (version, workers, early) = resumed.unwrap_or_default();
        let store = Store::with_version(params, optimizer, config.mode, version);
        let mut coord = Coord::default();
        for (&w, s) in &workers {
            // A resumed fit is a new Spark job: attempts count from 0 again.
            let mut worker = coord::Worker::new(0);
            worker.next_step = s.next_step;
            coord.workers.insert(w, worker);
        }
        coord.best_loss = early.best_loss;
        coord.bad_evaluations = early.bad_evaluations;
        coord.should_stop = early.should_stop;
        let checkpoints = Checkpoints::default();
        if config.checkpoint_interval > 0 {
            let i = config.checkpoint_interval;
            checkpoints.next_at.store(
                (version / i).saturating_add(1).saturating_mul(i),
                Ordering::Relaxed,
            );
        }
        Ok(Self {
            inner: Arc::new(Inner {
                layout,
                store,
                coord: Mutex::new(coord),
                round: tokio::sync::Mutex::new(Round::default()),
                progress: watch::channel(Progress {
                    version,
                    failed: false,
                })
                .0,
                fed: watch::channel(0).0,
                stop: watch::channel(false).0,
                counters: Counters::default(),
                started: AtomicBool::new(false),
                pool: Mutex::new(Vec::new()),
                ledger: Mutex::new(workers),
                checkpoints,
                config,
            }),
        })
    }

    /// Serve `listener` until `shutdown` completes; then close every connection and return.
    /// The listener is bound by the caller (tests bind `127.0.0.1:0`).
    pub async fn run(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), PsError> {
        if self.inner.started.swap(true, Ordering::SeqCst) {
            return Err(PsError::AlreadyRan);
        }
        let local = listener.local_addr()?;
        info!(%local, mode = %self.inner.config.mode, num_params = self.inner.store.len(),
              num_workers = self.inner.config.num_workers, "parameter server listening");
        let mut tasks = JoinSet::new();
        // One permit per connection that has not authenticated yet: at the cap, stop accepting
        // (the kernel's backlog holds further connections) until a handshake ends.
        let preauth = Arc::new(Semaphore::new(self.inner.config.max_unauthenticated));
        tokio::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                _ = &mut shutdown => break,
                permit = preauth.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break, // never closed
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            };
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let inner = self.inner.clone();
                        tasks.spawn(serve_connection(inner, stream, peer, permit));
                    }
                    Err(e) => {
                        // E.g. out of file descriptors: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        self.inner.stop.send_replace(true);
        drop(listener);
        while tasks.join_next().await.is_some() {}
        let mut result = Ok(());
        if self.inner.config.checkpoint_dir.is_some() {
            // The final checkpoint is what a resume starts from: its failure is the caller's
            // to know (it is also logged and counted like any other).
            let inner = self.inner.clone();
            result = match tokio::task::spawn_blocking(move || inner.write_automatic("final")).await
            {
                Ok(written) => written.map_err(PsError::Checkpoint),
                Err(e) => Err(PsError::Checkpoint(CheckpointError::Io {
                    path: self.inner.config.checkpoint_dir.clone().unwrap_or_default(),
                    op: "write the final checkpoint",
                    source: std::io::Error::other(e.to_string()),
                })),
            };
        }
        info!(%local, "parameter server stopped");
        result
    }

    /// Serve one already-established connection over any byte stream (an in-memory pipe in
    /// tests and in the session fuzz target), as `run` serves an accepted socket after its TLS
    /// handshake: protocol handshake, then requests, until the peer leaves, a limit is hit, or
    /// the server stops. Not counted against `max_unauthenticated`.
    pub async fn serve_io<S>(&self, stream: S)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let inner = self.inner.clone();
        inner.counters.connections.fetch_add(1, Ordering::Relaxed);
        let _guard = conn::ConnGuard(inner.clone());
        let peer = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
        let (end, worker) = conn::serve_stream(inner, stream, peer, None).await;
        conn::log_end(peer, worker, end);
    }

    /// A checkpoint of the current state (see [`Store::consistent_snapshot`] for what
    /// "consistent" means per mode; the early-stopping state is read just before).
    pub fn checkpoint(&self) -> Checkpoint {
        self.inner.checkpoint()
    }

    /// Write a checkpoint to `path`: a file when it ends in `.safetensors`, else a directory
    /// (then `<dir>/checkpoint.safetensors`); missing directories are created. Returns the
    /// version written and the file.
    pub fn save_checkpoint(&self, path: &Path) -> Result<(u64, PathBuf), PsError> {
        let file = crate::checkpoint::resolve_for_write(path);
        if let Some(parent) = file.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| CheckpointError::Io {
                path: parent.to_path_buf(),
                op: "create the directory",
                source,
            })?;
        }
        Ok(self.inner.write_checkpoint(&file)?)
    }

    /// The training style.
    pub fn mode(&self) -> Mode {
        self.inner.config.mode
    }

    /// The configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.inner.store.len()
    }

    /// Number of leading elements the optimizer steps; the rest are model buffers (see
    /// [`sparktorch_optim::WithModelBuffers`]).
    pub fn num_trainable(&self) -> usize {
        self.inner.store.with_optimizer(|o| o.trainable_len())
    }

    /// Tensor names and shapes.
    pub fn layout(&self) -> &Layout {
        &self.inner.layout
    }

    /// Optimizer steps applied.
    pub fn version(&self) -> u64 {
        self.inner.store.version()
    }

    /// A copy of the parameters (a consistent snapshot except in hogwild mode) and its version.
    pub fn parameters(&self) -> (u64, Vec<f32>) {
        self.inner.store.snapshot()
    }

    /// The optimizer's name and hyperparameters.
    pub fn optimizer_info(&self) -> (&'static str, sparktorch_optim::Hyperparameters) {
        self.inner
            .store
            .with_optimizer(|o| (o.name(), o.hyperparameters()))
    }

    /// The optimizer's state.
    pub fn optimizer_state(&self) -> OptimizerState {
        self.inner.store.optimizer_state()
    }

    /// Replace the optimizer state; with `rebuild`, first rebuild the optimizer with other
    /// hyperparameters (`torch`'s `load_state_dict` restores them too).
    pub fn load_optimizer_state(
        &self,
        rebuild: Option<Box<dyn Optimizer>>,
        state: &OptimizerState,
    ) -> Result<(), PsError> {
        if let Some(o) = &rebuild {
            if o.len() != self.num_params() {
                return Err(PsError::InvalidConfig {
                    param: "state",
                    reason: "optimizer built for another number of parameters".into(),
                });
            }
        }
        Ok(self.inner.store.replace_optimizer(rebuild, state)?)
    }

    /// Every applied push as `(worker, step, loss, val_loss)`, in order: the newest
    /// [`HISTORY_CAP`] ones.
    pub fn history(&self) -> Vec<HistoryEntry> {
        lock(&self.inner.coord).history_since(0).1
    }

    /// An incremental read of the history: the entries of index `since` and later still held
    /// (entry `i` is the `i`-th applied push; past [`HISTORY_CAP`] the oldest are dropped), and
    /// the index to pass next time. Copies only those entries.
    pub fn history_since(&self, since: u64) -> (u64, Vec<HistoryEntry>) {
        lock(&self.inner.coord).history_since(since)
    }

    /// The global early-stop flag.
    pub fn should_stop(&self) -> bool {
        lock(&self.inner.coord).should_stop
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let inner = &self.inner;
        let c = &inner.counters;
        let last = lock(&inner.checkpoints.last).clone();
        let coord = lock(&inner.coord);
        let count = |s: Status| coord.workers.values().filter(|w| w.status == s).count() as u32;
        Stats {
            version: inner.store.version(),
            mode: inner.config.mode,
            updates: c.updates.load(Ordering::Relaxed),
            duplicates: c.duplicates.load(Ordering::Relaxed),
            stale_discarded: c.stale_discarded.load(Ordering::Relaxed),
            stale_refused: c.stale_refused.load(Ordering::Relaxed),
            store_allocations: inner.store.allocations(),
            updates_per_worker: coord.workers.iter().map(|(&k, w)| (k, w.updates)).collect(),
            steps_per_worker: coord
                .workers
                .iter()
                .map(|(&k, w)| (k, w.next_step))
                .collect(),
            workers_live: coord.live(inner.config.num_workers).len() as u32,
            workers_done: count(Status::Done),
            workers_lost: count(Status::Lost),
            connections: c.connections.load(Ordering::Relaxed),
            rejected_frames: c.rejected_frames.load(Ordering::Relaxed),
            auth_failures: c.auth_failures.load(Ordering::Relaxed),
            bytes_in: c.bytes_in.load(Ordering::Relaxed),
            bytes_out: c.bytes_out.load(Ordering::Relaxed),
            recent_loss: coord
                .workers
                .iter()
                .filter(|(_, w)| !w.recent.is_empty())
                .map(|(&k, w)| (k, w.recent.iter().sum::<f64>() / w.recent.len() as f64))
                .collect(),
            staleness_mean: if coord.staleness_count == 0 {
                0.0
            } else {
                coord.staleness_sum as f64 / coord.staleness_count as f64
            },
            staleness_max: coord.staleness_max,
            history_total: coord.history_total(),
            should_stop: coord.should_stop,
            best_loss: coord.best_loss.unwrap_or(f64::NAN),
            error: coord.fatal.clone(),
            checkpoint_errors: inner.checkpoints.errors.load(Ordering::Relaxed),
            last_checkpoint_version: last.as_ref().map(|l| l.0),
            last_checkpoint_path: last.map(|l| l.1.display().to_string()),
        }
    }
}

/// Hyperparameters compared bit for bit (NaN equals NaN).
fn same_hyper(a: &HyperValue, b: &HyperValue) -> bool {
    match (a, b) {
        (HyperValue::Float(x), HyperValue::Float(y)) => x.to_bits() == y.to_bits(),
        (HyperValue::Bool(x), HyperValue::Bool(y)) => x == y,
        (HyperValue::Pair(a1, a2), HyperValue::Pair(b1, b2)) => {
            a1.to_bits() == b1.to_bits() && a2.to_bits() == b2.to_bits()
        }
        _ => false,
    }
}

impl Inner {
    /// Publish a new version to waiting pulls.
    fn publish(&self, version: u64) {
        self.progress
            .send_modify(|p| p.version = p.version.max(version));
    }

    /// Bounded staleness: `worker` no longer starves; wake the pushes held back for it.
    fn feed(&self, worker: u32) {
        if lock(&self.coord).fed(worker) {
            self.fed.send_modify(|g| *g = g.wrapping_add(1));
        }
    }

    /// Record a fatal condition and wake every waiter.
    fn fail(&self, reason: String) {
        error!(reason = %reason, "parameter server failed");
        lock(&self.coord).fatal.get_or_insert(reason);
        self.progress.send_modify(|p| p.failed = true);
    }

    fn fatal(&self) -> Option<String> {
        lock(&self.coord).fatal.clone()
    }

    /// Book a step applied to the parameters (called under the store's step lock).
    fn applied(&self, worker: u32, step: u64, attempt: u32) {
        let mut ledger = lock(&self.ledger);
        let e = ledger.entry(worker).or_insert(WorkerState {
            next_step: 0,
            attempt,
        });
        e.next_step = e.next_step.max(step.saturating_add(1));
        e.attempt = attempt;
    }

    fn checkpoint(&self) -> Checkpoint {
        let early_stop = {
            let c = lock(&self.coord);
            EarlyStopState {
                best_loss: c.best_loss,
                bad_evaluations: c.bad_evaluations,
                should_stop: c.should_stop,
            }
        };
        let (version, params, optimizer_state, (name, hyperparameters, workers, model_buffers)) =
            self.store.consistent_snapshot(|opt| {
                (
                    opt.name(),
                    opt.hyperparameters(),
                    lock(&self.ledger).clone(),
                    opt.len() - opt.trainable_len(),
                )
            });
        Checkpoint {
            engine_version: env!("CARGO_PKG_VERSION").to_string(),
            mode: self.config.mode,
            version,
            optimizer: name.to_string(),
            hyperparameters,
            optimizer_state,
            workers,
            num_workers: self.config.num_workers,
            layout: effective_layout(&self.layout, self.store.len()),
            model_buffers,
            early_stop,
            created_unix: now_unix(),
            params,
        }
    }

    /// Snapshot and write to `file`, one write at a time (blocking: call from a blocking
    /// thread).
    fn write_checkpoint(&self, file: &Path) -> Result<(u64, PathBuf), CheckpointError> {
        let _writing = lock(&self.checkpoints.writer);
        let c = self.checkpoint();
        #[cfg(test)]
        {
            self.checkpoints
                .slow_io
                .started
                .store(true, Ordering::SeqCst);
            std::thread::sleep(*lock(&self.checkpoints.slow_io.delay));
        }
        c.write(file)?;
        *lock(&self.checkpoints.last) = Some((c.version, file.to_path_buf()));
        Ok((c.version, file.to_path_buf()))
    }

    /// Write the automatic checkpoint (`reason`: "periodic" or "final"); a failure is logged
    /// and counted (never fatal to training), and returned.
    fn write_automatic(&self, reason: &'static str) -> Result<(), CheckpointError> {
        let Some(dir) = &self.config.checkpoint_dir else {
            return Ok(());
        };
        let file = dir.join(CHECKPOINT_FILE);
        let written = std::fs::create_dir_all(dir)
            .map_err(|source| CheckpointError::Io {
                path: dir.clone(),
                op: "create the checkpoint directory",
                source,
            })
            .and_then(|()| self.write_checkpoint(&file));
        match written {
            Ok((version, path)) => {
                info!(version, path = %path.display(), reason, "checkpoint written");
                Ok(())
            }
            Err(e) => {
                self.checkpoints.errors.fetch_add(1, Ordering::Relaxed);
                error!(error = %e, reason, "checkpoint failed");
                Err(e)
            }
        }
    }

    /// Is the periodic checkpoint due at `version`?
    fn checkpoint_due(&self, version: u64) -> bool {
        self.config.checkpoint_interval > 0
            && self.config.checkpoint_dir.is_some()
            && version >= self.checkpoints.next_at.load(Ordering::Acquire)
    }

    /// After a step reached `version`: start the periodic checkpoint if one is due, on the
    /// blocking pool. At most one writer runs; it loops while checkpoints are still due
    /// (steps that arrived while it wrote), so pushes never wait for the file I/O.
    fn after_step(self: &Arc<Self>, version: u64) {
        if !self.checkpoint_due(version)
            || self.checkpoints.in_progress.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let inner = self.clone();
        tokio::task::spawn_blocking(move || loop {
            let v = inner.store.version();
            if inner.checkpoint_due(v) {
                let i = inner.config.checkpoint_interval;
                inner.checkpoints.next_at.store(
                    (v / i).saturating_add(1).saturating_mul(i),
                    Ordering::Release,
                );
                // Counted and logged; training goes on.
                let _ = inner.write_automatic("periodic");
                continue;
            }
            inner
                .checkpoints
                .in_progress
                .store(false, Ordering::Release);
            // A step that found the flag set just before it was cleared: take over its turn.
            if !inner.checkpoint_due(inner.store.version())
                || inner.checkpoints.in_progress.swap(true, Ordering::AcqRel)
            {
                break;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// `stats()`, `history()`, the optimizer's description, pulls and steps never wait for a
    /// checkpoint's file I/O (a write made to last 2 s by a slow filesystem stand-in).
    #[test]
    fn nothing_waits_for_checkpoint_io() {
        let n = 1024;
        let opt = sparktorch_optim::build("SGD", &vec![("lr".into(), HyperValue::Float(0.1))], n)
            .unwrap();
        let dir = std::env::temp_dir().join(format!("spt-slow-io-{}", std::process::id()));
        let mut config = ServerConfig::new(b"secret-0123456789".to_vec(), Mode::Async);
        config.checkpoint_dir = Some(dir.clone());
        let server = Server::new(vec![0.0; n], Vec::new(), opt, config).unwrap();
        *lock(&server.inner.checkpoints.slow_io.delay) = Duration::from_secs(2);
        let writer = {
            let server = server.clone();
            let file = dir.join("slow.safetensors");
            std::thread::spawn(move || server.save_checkpoint(&file))
        };
        while !server
            .inner
            .checkpoints
            .slow_io
            .started
            .load(Ordering::SeqCst)
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        let t0 = Instant::now();
        let stats = server.stats();
        let _ = server.history();
        let _ = server.optimizer_info();
        let _ = server.parameters();
        let v = server.inner.store.apply_then(&vec![1.0; n], |_| {});
        let took = t0.elapsed();
        assert!(!writer.is_finished(), "the write should still be sleeping");
        assert!(
            took < Duration::from_millis(50),
            "took {took:?} during a checkpoint write"
        );
        assert_eq!(
            (stats.version, v, stats.last_checkpoint_version),
            (0, 1, None)
        );
        let (version, _) = writer.join().unwrap().unwrap();
        assert_eq!(version, 0);
        assert_eq!(server.stats().last_checkpoint_version, Some(0));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
