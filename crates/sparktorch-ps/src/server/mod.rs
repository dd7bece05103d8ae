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

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sparktorch_optim::{Optimizer, OptimizerState};
use sparktorch_proto::{Mode, MAX_PARAMS};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::config::ServerConfig;
use crate::stats::Stats;
use crate::store::{Layout, Store};
use crate::{lock, PsError};
use conn::serve_connection;
use coord::{Coord, Status};
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
    /// Set once the server stops; connections and timers watch it.
    stop: watch::Sender<bool>,
    /// Counters.
    counters: Counters,
    /// `run` was called.
    started: AtomicBool,
    /// Gradient buffers returned by closed rounds, reused by connections.
    pool: Mutex<Vec<Vec<f32>>>,
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
            let total: usize = layout
                .iter()
                .map(|(_, s)| s.iter().product::<usize>())
                .sum();
            if total != params.len() {
                return bad(
                    "layout",
                    format!(
                        "shapes add up to {total} elements, params has {}",
                        params.len()
                    ),
                );
            }
        }
        let store = Store::new(params, optimizer, config.mode);
        Ok(Self {
            inner: Arc::new(Inner {
                layout,
                store,
                coord: Mutex::new(Coord::default()),
                round: tokio::sync::Mutex::new(Round::default()),
                progress: watch::channel(Progress::default()).0,
                stop: watch::channel(false).0,
                counters: Counters::default(),
                started: AtomicBool::new(false),
                pool: Mutex::new(Vec::new()),
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
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let inner = self.inner.clone();
                        tasks.spawn(serve_connection(inner, stream, peer));
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
        info!(%local, "parameter server stopped");
        Ok(())
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

    /// Every applied push as `(worker, step, loss, val_loss)`, in order.
    pub fn history(&self) -> Vec<(u32, u64, f64, f64)> {
        lock(&self.inner.coord).history.clone()
    }

    /// The global early-stop flag.
    pub fn should_stop(&self) -> bool {
        lock(&self.inner.coord).should_stop
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let inner = &self.inner;
        let c = &inner.counters;
        let coord = lock(&inner.coord);
        let count = |s: Status| coord.workers.values().filter(|w| w.status == s).count() as u32;
        Stats {
            version: inner.store.version(),
            mode: inner.config.mode,
            updates: c.updates.load(Ordering::Relaxed),
            duplicates: c.duplicates.load(Ordering::Relaxed),
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
            should_stop: coord.should_stop,
            best_loss: coord.best_loss.unwrap_or(f64::NAN),
            error: coord.fatal.clone(),
        }
    }
}

impl Inner {
    /// Publish a new version to waiting pulls.
    fn publish(&self, version: u64) {
        self.progress
            .send_modify(|p| p.version = p.version.max(version));
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
}
