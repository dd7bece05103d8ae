//! The server: accepts connections, runs the handshake, answers requests, closes synchronous
//! rounds, tracks workers, early stopping and counters.
//!
//! One tokio task per connection. A request frame is read whole (header, meta, payload) and
//! validated before anything is applied, so a connection dropped mid-push changes nothing.
//! Optimizer steps run on tokio's blocking pool (`spawn_blocking`) so that they never stall the
//! reactor. Locks, always taken in this order: the round (`tokio::sync::Mutex`, synchronous mode
//! only; held across the round's step), then the coordinator (`std::sync::Mutex`, short critical
//! sections, never held across an await), then the store's own locks.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rayon::prelude::*;
use sparktorch_optim::{Optimizer, OptimizerState};
use sparktorch_proto::{
    auth, ErrorCode, Message, Mode, ProtoError, PushMeta, MAX_PARAMS, NONCE_LEN, PROTOCOL_VERSION,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::timeout;
use tracing::{debug, error, info, warn};

use crate::config::{LostWorkerPolicy, ServerConfig};
use crate::stats::Stats;
use crate::store::{Layout, Store};
use crate::wire::{read_head, read_payload, write_frame, ReadError};
use crate::{lock, PsError};

/// Number of recent losses averaged per worker in [`Stats::recent_loss`].
const RECENT_LOSSES: usize = 10;

/// How long a connection refused with an error keeps discarding the peer's bytes before closing.
const LINGER_TIME: Duration = Duration::from_millis(250);

/// How many of the peer's bytes a refused connection discards at most before closing.
const LINGER_BYTES: usize = 1 << 20;

/// How long the server tries to deliver an error frame before closing anyway.
const ERROR_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

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

/// Where a worker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// Registered and expected (or not yet registered).
    Live,
    /// Said `Bye`.
    Done,
    /// Missed a synchronous round (drop policy).
    Lost,
}

/// What the server remembers per worker.
#[derive(Debug)]
struct Worker {
    /// The newest attempt registered; older ones are refused.
    attempt: u32,
    /// Highest step applied (or accepted into a round) + 1: the resume step.
    next_step: u64,
    /// Where the worker is.
    status: Status,
    /// Pushes applied.
    updates: u64,
    /// Version of the parameters last sent to it (for staleness).
    last_pulled: Option<u64>,
    /// Its last few training losses.
    recent: VecDeque<f64>,
}

/// Workers, early stopping, history: small state under one short-held mutex.
struct Coord {
    /// Every worker that ever registered.
    workers: BTreeMap<u32, Worker>,
    /// Latest loss (validation loss when reported) per worker since the last evaluation.
    pending_losses: BTreeMap<u32, f64>,
    /// Best evaluated mean loss.
    best_loss: Option<f64>,
    /// Evaluations since the last strict improvement.
    bad_evaluations: u32,
    /// Global early stop reached.
    should_stop: bool,
    /// `(worker, step, loss, val_loss)` per applied push.
    history: Vec<(u32, u64, f64, f64)>,
    /// Sum of staleness over applied pushes.
    staleness_sum: u64,
    /// Largest staleness.
    staleness_max: u64,
    /// Number of staleness samples.
    staleness_count: u64,
    /// A fatal condition; every later request is answered with it.
    fatal: Option<String>,
}

/// A gradient waiting for its synchronous round to close.
struct Contribution {
    /// Weight in the average.
    batch_size: u64,
    /// The gradients.
    grads: Vec<f32>,
    /// The loss to evaluate for early stopping (validation loss when reported).
    loss: f64,
}

/// The open synchronous round.
#[derive(Default)]
struct Round {
    /// Rounds closed so far.
    number: u64,
    /// Gradients received in this round, by worker id (so averaging runs in worker order).
    pending: BTreeMap<u32, Contribution>,
    /// The round's lost-worker timer, aborted when the round closes in time.
    timer: Option<tokio::task::AbortHandle>,
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

/// Why a request was refused: the code and message sent in the `Error` frame.
type Refusal = (ErrorCode, String);

impl Coord {
    fn is_live(&self, w: u32) -> bool {
        self.workers
            .get(&w)
            .is_none_or(|x| x.status == Status::Live)
    }

    fn live(&self, num_workers: u32) -> Vec<u32> {
        (0..num_workers).filter(|&w| self.is_live(w)).collect()
    }

    /// Judge a push. `Ok(None)`: a duplicate. `Ok(Some(staleness))`: accept (the step is
    /// reserved).
    fn check_push(&mut self, p: &PushMeta, version: u64) -> Result<Option<u64>, Refusal> {
        if let Some(f) = &self.fatal {
            return Err((ErrorCode::WorkerLost, f.clone()));
        }
        let Some(w) = self.workers.get_mut(&p.worker) else {
            return Err((
                ErrorCode::NotRegistered,
                format!("worker {} is not registered", p.worker),
            ));
        };
        if p.attempt < w.attempt {
            return Err((
                ErrorCode::StaleAttempt,
                format!(
                    "worker {} attempt {} is stale: attempt {} has registered",
                    p.worker, p.attempt, w.attempt
                ),
            ));
        }
        if p.step < w.next_step {
            return Ok(None);
        }
        if w.status != Status::Live {
            // A worker dropped for missing a round (it was slow, not dead), or one that said
            // Bye and pushes again: it takes part again from this push on.
            info!(worker = p.worker, attempt = p.attempt, "worker rejoined");
            w.status = Status::Live;
        }
        w.next_step = p.step + 1;
        let base = w.last_pulled.unwrap_or(p.base_version);
        Ok(Some(version.saturating_sub(base)))
    }

    /// Book an applied (or round-accepted) push.
    fn record(&mut self, p: &PushMeta, staleness: u64) {
        self.history.push((p.worker, p.step, p.loss, p.val_loss));
        if let Some(w) = self.workers.get_mut(&p.worker) {
            w.updates += 1;
            if w.recent.len() == RECENT_LOSSES {
                w.recent.pop_front();
            }
            w.recent.push_back(p.loss);
        }
        self.staleness_sum += staleness;
        self.staleness_count += 1;
        self.staleness_max = self.staleness_max.max(staleness);
    }

    /// One early-stopping evaluation of a mean loss.
    fn evaluate(&mut self, mean: f64, patience: Option<u32>) {
        // Only a strict improvement counts (a NaN loss never improves).
        let improved = self.best_loss.is_none_or(|best| mean < best) && !mean.is_nan();
        if improved {
            self.best_loss = Some(mean);
            self.bad_evaluations = 0;
        } else {
            self.bad_evaluations += 1;
        }
        if let Some(p) = patience {
            if self.bad_evaluations >= p {
                self.should_stop = true;
            }
        }
    }

    /// Async/hogwild: evaluate once every live worker has reported since the last evaluation.
    fn maybe_evaluate(&mut self, num_workers: u32, patience: Option<u32>) {
        let live = self.live(num_workers);
        if self.pending_losses.is_empty()
            || !live.iter().all(|w| self.pending_losses.contains_key(w))
        {
            return;
        }
        let n = self.pending_losses.len() as f64;
        let mean = self.pending_losses.values().sum::<f64>() / n;
        self.pending_losses.clear();
        self.evaluate(mean, patience);
    }
}

/// The loss early stopping looks at: the validation loss when reported.
fn eval_loss(p: &PushMeta) -> f64 {
    if p.val_loss.is_nan() {
        p.loss
    } else {
        p.val_loss
    }
}

/// The batch-size weighted average of the round's gradients: accumulated in `f64` in worker-id
/// order, then cast to `f32`. With every batch size 0 the plain mean is taken.
fn weighted_average(pending: &BTreeMap<u32, Contribution>, len: usize) -> Vec<f32> {
    let total: u64 = pending.values().map(|c| c.batch_size).sum();
    let parts: Vec<(f64, &[f32])> = pending
        .values()
        .map(|c| {
            let w = if total == 0 { 1.0 } else { c.batch_size as f64 };
            (w, c.grads.as_slice())
        })
        .collect();
    let denom = if total == 0 {
        parts.len() as f64
    } else {
        total as f64
    };
    let mut out = vec![0f32; len];
    const CHUNK: usize = 1 << 16;
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, dst)| {
        let start = c * CHUNK;
        for (i, o) in dst.iter_mut().enumerate() {
            let mut acc = 0f64;
            for (w, g) in &parts {
                acc += w * f64::from(g[start + i]);
            }
            *o = (acc / denom) as f32;
        }
    });
    out
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
                coord: Mutex::new(Coord {
                    workers: BTreeMap::new(),
                    pending_losses: BTreeMap::new(),
                    best_loss: None,
                    bad_evaluations: 0,
                    should_stop: false,
                    history: Vec::new(),
                    staleness_sum: 0,
                    staleness_max: 0,
                    staleness_count: 0,
                    fatal: None,
                }),
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

    /// Close the synchronous round: average, step once, bump the version, evaluate early
    /// stopping over the round's losses, wake waiting pulls.
    async fn close_round(self: &Arc<Self>, round: &mut Round) {
        let pending = std::mem::take(&mut round.pending);
        round.number += 1;
        if let Some(timer) = round.timer.take() {
            timer.abort();
        }
        if pending.is_empty() {
            return;
        }
        let workers: Vec<u32> = pending.keys().copied().collect();
        let losses: Vec<f64> = pending.values().map(|c| c.loss).collect();
        let inner = self.clone();
        let stepped = tokio::task::spawn_blocking(move || {
            let avg = weighted_average(&pending, inner.store.len());
            let version = inner.store.apply(&avg);
            (version, pending)
        })
        .await;
        match stepped {
            Ok((version, pending)) => {
                {
                    let mut pool = lock(&self.pool);
                    for (_, c) in pending {
                        if pool.len() < self.config.num_workers as usize {
                            pool.push(c.grads);
                        }
                    }
                }
                {
                    let mut coord = lock(&self.coord);
                    let mean = losses.iter().sum::<f64>() / losses.len() as f64;
                    coord.evaluate(mean, self.config.early_stop_patience);
                }
                debug!(
                    round = round.number,
                    version,
                    ?workers,
                    "synchronous round closed"
                );
                self.publish(version);
            }
            Err(e) => self.fail(format!("optimizer step panicked: {e}")),
        }
    }

    /// If every live worker has pushed into the open round, close it.
    async fn close_round_if_complete(self: &Arc<Self>, round: &mut Round) {
        if round.pending.is_empty() {
            return;
        }
        let complete = {
            let coord = lock(&self.coord);
            coord
                .live(self.config.num_workers)
                .iter()
                .all(|w| round.pending.contains_key(w))
        };
        if complete {
            self.close_round(round).await;
        }
    }

    /// Applied when round `number` is still open after the round timeout.
    async fn round_timer(self: Arc<Self>, number: u64) {
        let mut stop = self.stop.subscribe();
        tokio::select! {
            _ = tokio::time::sleep(self.config.round_timeout) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let mut round = self.round.lock().await;
        if round.number != number || round.pending.is_empty() {
            return;
        }
        // This task is the timer: closing the round below must not abort it.
        round.timer = None;
        let missing: Vec<u32> = {
            let coord = lock(&self.coord);
            coord
                .live(self.config.num_workers)
                .into_iter()
                .filter(|w| !round.pending.contains_key(w))
                .collect()
        };
        let after = self.config.round_timeout;
        match self.config.lost_worker_policy {
            LostWorkerPolicy::Drop => {
                warn!(
                    round = number,
                    ?missing,
                    ?after,
                    "workers lost: closing the round without them"
                );
                {
                    let mut coord = lock(&self.coord);
                    for &w in &missing {
                        let entry = coord.workers.entry(w).or_insert_with(|| Worker {
                            attempt: 0,
                            next_step: 0,
                            status: Status::Live,
                            updates: 0,
                            last_pulled: None,
                            recent: VecDeque::new(),
                        });
                        entry.status = Status::Lost;
                    }
                }
                self.close_round(&mut round).await;
            }
            LostWorkerPolicy::Fail => {
                self.fail(format!(
                    "worker(s) {missing:?} sent no gradient for synchronous round {number} within \
                     round_timeout_s={}",
                    after.as_secs_f64()
                ));
            }
        }
    }
}

/// How a connection ended, for the log.
#[derive(Debug)]
enum End {
    /// The peer closed between frames, said `Bye`, or the server stopped.
    Closed,
    /// A bounded wait ran out.
    Timeout(&'static str),
    /// The socket failed.
    Io(std::io::Error),
    /// The peer broke the protocol.
    Proto(ProtoError),
    /// A request was refused and the connection closed.
    Refused(ErrorCode, String),
}

/// Decrements the open-connections gauge when a connection task ends.
struct ConnGuard(Arc<Inner>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.counters.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_connection(inner: Arc<Inner>, stream: TcpStream, peer: SocketAddr) {
    inner.counters.connections.fetch_add(1, Ordering::Relaxed);
    let _guard = ConnGuard(inner.clone());
    if let Err(e) = stream.set_nodelay(true) {
        debug!(%peer, error = %e, "set_nodelay failed");
    }
    let mut stop = inner.stop.subscribe();
    let mut conn = Conn {
        inner: inner.clone(),
        stream,
        peer,
        who: None,
        grads: Vec::new(),
        scratch: Vec::new(),
        out: Vec::with_capacity(256),
    };
    let end = tokio::select! {
        end = conn.run() => end,
        _ = stop.wait_for(|s| *s) => End::Closed,
    };
    let worker = conn.who.map(|w| w.0);
    match end {
        End::Closed => debug!(%peer, ?worker, "connection closed"),
        End::Timeout(what) => info!(%peer, ?worker, what, "connection timed out"),
        End::Io(e) => info!(%peer, ?worker, error = %e, "connection failed"),
        End::Proto(e) => warn!(%peer, ?worker, error = %e, "connection closed: protocol violation"),
        End::Refused(code, msg) => {
            info!(%peer, ?worker, ?code, reason = %msg, "connection closed: request refused")
        }
    }
}

/// One connection's state.
struct Conn {
    /// Shared server state.
    inner: Arc<Inner>,
    /// The socket.
    stream: TcpStream,
    /// The peer's address, for logs.
    peer: SocketAddr,
    /// `(worker, attempt)` once registered.
    who: Option<(u32, u32)>,
    /// Gradient buffer, reused across pushes.
    grads: Vec<f32>,
    /// Scratch buffer for hogwild snapshots.
    scratch: Vec<f32>,
    /// Header/meta encoding buffer.
    out: Vec<u8>,
}

impl Conn {
    async fn run(&mut self) -> End {
        if let Err(end) = self.handshake().await {
            return end;
        }
        loop {
            if let Err(end) = self.request().await {
                return end;
            }
        }
    }

    async fn send(&mut self, msg: &Message, values: &[f32]) -> Result<(), End> {
        let io = self.inner.config.io_timeout;
        match timeout(
            io,
            write_frame(&mut self.stream, msg, values, &mut self.out),
        )
        .await
        {
            Err(_) => Err(End::Timeout("write")),
            Ok(Err(e)) => Err(End::Io(e)),
            Ok(Ok(n)) => {
                self.inner
                    .counters
                    .bytes_out
                    .fetch_add(n, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    /// Send an error frame (best effort, bounded) and end the connection — except for
    /// `Timeout`, after which the connection stays usable.
    async fn refuse(&mut self, code: ErrorCode, message: String) -> Result<(), End> {
        let msg = Message::error(code, message.clone());
        let sent = timeout(
            ERROR_WRITE_TIMEOUT,
            write_frame(&mut self.stream, &msg, &[], &mut self.out),
        )
        .await;
        if code == ErrorCode::Timeout {
            return match sent {
                Ok(Ok(_)) => Ok(()),
                _ => Err(End::Timeout("write")),
            };
        }
        self.linger().await;
        Err(End::Refused(code, message))
    }

    /// Before closing after an error: stop writing, then discard what the peer already sent
    /// (bounded in bytes and time), so that its kernel delivers our error frame instead of
    /// answering the unread bytes with a reset.
    async fn linger(&mut self) {
        use tokio::io::AsyncReadExt;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut self.stream).await;
        let mut sink = [0u8; 16 * 1024];
        let mut left = LINGER_BYTES;
        let _ = timeout(LINGER_TIME, async {
            while left > 0 {
                match self.stream.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        })
        .await;
    }

    /// A malformed frame: count it, tell the peer (best effort), close.
    async fn reject(&mut self, e: ReadError) -> End {
        match e {
            ReadError::Io(e) => End::Io(e),
            ReadError::Proto(p) => {
                self.inner
                    .counters
                    .rejected_frames
                    .fetch_add(1, Ordering::Relaxed);
                if !matches!(p, ProtoError::Truncated { .. }) {
                    let code = if matches!(p, ProtoError::UnsupportedVersion { .. }) {
                        ErrorCode::VersionMismatch
                    } else {
                        ErrorCode::Protocol
                    };
                    let _ = self.refuse(code, p.to_string()).await;
                }
                End::Proto(p)
            }
        }
    }

    async fn handshake(&mut self) -> Result<(), End> {
        let mut server_nonce = [0u8; NONCE_LEN];
        if let Err(e) = getrandom::fill(&mut server_nonce) {
            return Err(End::Io(std::io::Error::other(format!("getrandom: {e}"))));
        }
        let hello = Message::Hello {
            version: PROTOCOL_VERSION,
            server_nonce,
        };
        let ht = self.inner.config.handshake_timeout;
        match timeout(
            ht,
            write_frame(&mut self.stream, &hello, &[], &mut self.out),
        )
        .await
        {
            Err(_) => return Err(End::Timeout("handshake write")),
            Ok(Err(e)) => return Err(End::Io(e)),
            Ok(Ok(_)) => {}
        }
        let head = match timeout(ht, read_head(&mut self.stream, 0)).await {
            Err(_) => return Err(End::Timeout("handshake")),
            Ok(Ok(None)) => return Err(End::Closed),
            Ok(Err(e)) => {
                if matches!(e, ReadError::Proto(ProtoError::UnsupportedVersion { .. })) {
                    self.inner
                        .counters
                        .auth_failures
                        .fetch_add(1, Ordering::Relaxed);
                }
                return Err(self.reject(e).await);
            }
            Ok(Ok(Some(h))) => h,
        };
        self.inner
            .counters
            .bytes_in
            .fetch_add(head.0.frame_len() as u64, Ordering::Relaxed);
        let ok = match &head.1 {
            Message::Auth {
                client_nonce,
                proof,
            } => auth::verify_client_proof(
                &self.inner.config.secret,
                &server_nonce,
                client_nonce,
                proof,
            )
            .then_some(*client_nonce),
            _ => None,
        };
        let Some(client_nonce) = ok else {
            self.inner
                .counters
                .auth_failures
                .fetch_add(1, Ordering::Relaxed);
            warn!(peer = %self.peer, got = %head.1.kind(), "authentication failed");
            self.refuse(
                ErrorCode::AuthFailed,
                "authentication failed: wrong or missing proof of the secret".into(),
            )
            .await?;
            return Err(End::Closed);
        };
        let server_proof =
            auth::server_proof(&self.inner.config.secret, &server_nonce, &client_nonce);
        self.send(&Message::AuthOk { server_proof }, &[]).await
    }

    /// Read and answer one request.
    async fn request(&mut self) -> Result<(), End> {
        let inner = self.inner.clone();
        let n = inner.store.len();
        let io = inner.config.io_timeout;
        // Between requests a worker computes (forward/backward): wait for the first byte of the
        // next request up to the larger of the I/O and round timeouts; the frame itself must
        // then arrive within the I/O timeout.
        let idle = io.max(inner.config.round_timeout);
        let mut first = [0u8; 1];
        match timeout(idle, self.stream.peek(&mut first)).await {
            Err(_) => return Err(End::Timeout("next request")),
            Ok(Ok(0)) => return Err(End::Closed),
            Ok(Err(e)) => return Err(End::Io(e)),
            Ok(Ok(_)) => {}
        }
        let (header, msg) = match timeout(io, read_head(&mut self.stream, n * 4)).await {
            Err(_) => return Err(End::Timeout("request")),
            Ok(Ok(None)) => return Err(End::Closed),
            Ok(Err(e)) => return Err(self.reject(e).await),
            Ok(Ok(Some(h))) => h,
        };
        inner
            .counters
            .bytes_in
            .fetch_add(header.frame_len() as u64, Ordering::Relaxed);
        match msg {
            Message::Register { worker, attempt } => self.register(worker, attempt).await,
            Message::Pull { newer_than } => {
                self.require_registered().await?;
                self.pull(newer_than).await
            }
            Message::Push(meta) | Message::PushPull(meta) => {
                let also_pull = header.kind == sparktorch_proto::FrameKind::PushPull;
                let (w, a) = self.require_registered().await?;
                if meta.worker != w || meta.attempt != a {
                    return self
                        .refuse(
                            ErrorCode::NotRegistered,
                            format!(
                                "push names worker {} attempt {}, this connection registered worker {w} attempt {a}",
                                meta.worker, meta.attempt
                            ),
                        )
                        .await;
                }
                if header.payload_len != n * 4 {
                    inner
                        .counters
                        .rejected_frames
                        .fetch_add(1, Ordering::Relaxed);
                    return self
                        .refuse(
                            ErrorCode::WrongLength,
                            format!(
                                "push carries {} values, the model has {n}",
                                header.payload_values()
                            ),
                        )
                        .await;
                }
                if self.grads.capacity() < n {
                    if let Some(buf) = lock(&inner.pool).pop() {
                        self.grads = buf;
                    }
                }
                match timeout(io, read_payload(&mut self.stream, &header, &mut self.grads)).await {
                    Err(_) => return Err(End::Timeout("push payload")),
                    Ok(Err(e)) => return Err(self.reject(e).await),
                    Ok(Ok(())) => {}
                }
                // The whole frame is in and valid: now (and only now) act on it.
                let ack = match self.push(&meta).await {
                    Ok(ack) => ack,
                    Err((code, m)) => return self.refuse(code, m).await,
                };
                self.send(&ack, &[]).await?;
                if also_pull {
                    let newer_than = if inner.config.mode == Mode::Synchronous {
                        i64::try_from(meta.base_version).unwrap_or(i64::MAX)
                    } else {
                        -1
                    };
                    self.pull(newer_than).await?;
                }
                Ok(())
            }
            Message::StatsRequest => {
                let s = Server {
                    inner: inner.clone(),
                }
                .stats();
                let msg = Message::Stats {
                    version: s.version,
                    updates: s.updates,
                    workers_live: s.workers_live,
                    should_stop: s.should_stop,
                    best_loss: s.best_loss,
                };
                self.send(&msg, &[]).await
            }
            Message::EarlyStopRequest => {
                let msg = {
                    let c = lock(&inner.coord);
                    Message::EarlyStop {
                        should_stop: c.should_stop,
                        best_loss: c.best_loss.unwrap_or(f64::NAN),
                        bad_evaluations: c.bad_evaluations,
                    }
                };
                self.send(&msg, &[]).await
            }
            Message::Bye => {
                self.bye().await;
                let _ = self.send(&Message::Bye, &[]).await;
                Err(End::Closed)
            }
            other => {
                inner
                    .counters
                    .rejected_frames
                    .fetch_add(1, Ordering::Relaxed);
                self.refuse(
                    ErrorCode::Protocol,
                    format!("{} is not a request a client may send", other.kind()),
                )
                .await?;
                Err(End::Closed)
            }
        }
    }

    async fn require_registered(&mut self) -> Result<(u32, u32), End> {
        match self.who {
            Some(w) => Ok(w),
            None => {
                self.refuse(ErrorCode::NotRegistered, "register first".into())
                    .await?;
                Err(End::Closed)
            }
        }
    }

    async fn register(&mut self, worker: u32, attempt: u32) -> Result<(), End> {
        let inner = self.inner.clone();
        let num_workers = inner.config.num_workers;
        if worker >= num_workers {
            return self
                .refuse(
                    ErrorCode::BadRequest,
                    format!(
                        "worker {worker} out of range: this server has num_workers={num_workers}"
                    ),
                )
                .await;
        }
        let admitted: Result<u64, Refusal> = {
            let mut coord = lock(&inner.coord);
            match &coord.fatal {
                Some(f) => Err((ErrorCode::WorkerLost, f.clone())),
                None => {
                    let w = coord.workers.entry(worker).or_insert_with(|| Worker {
                        attempt,
                        next_step: 0,
                        status: Status::Live,
                        updates: 0,
                        last_pulled: None,
                        recent: VecDeque::new(),
                    });
                    if attempt < w.attempt {
                        Err((
                            ErrorCode::StaleAttempt,
                            format!(
                                "worker {worker} attempt {attempt} is stale: attempt {} has registered",
                                w.attempt
                            ),
                        ))
                    } else {
                        w.attempt = attempt;
                        w.status = Status::Live;
                        Ok(w.next_step)
                    }
                }
            }
        };
        let resume_step = match admitted {
            Ok(s) => s,
            Err((code, m)) => return self.refuse(code, m).await,
        };
        self.who = Some((worker, attempt));
        info!(peer = %self.peer, worker, attempt, resume_step, "worker registered");
        let msg = Message::Registered {
            num_params: inner.store.len() as u64,
            resume_step,
            version: inner.store.version(),
            mode: inner.config.mode,
            round_timeout_ms: u64::try_from(inner.config.round_timeout.as_millis())
                .unwrap_or(u64::MAX),
        };
        self.send(&msg, &[]).await
    }

    async fn pull(&mut self, newer_than: i64) -> Result<(), End> {
        let inner = self.inner.clone();
        if newer_than >= 0 {
            let mut rx = inner.progress.subscribe();
            let mut stop = inner.stop.subscribe();
            let wait = async {
                tokio::select! {
                    r = rx.wait_for(|p| p.failed || p.version as i64 > newer_than) => r.map(|p| *p).ok(),
                    _ = stop.wait_for(|s| *s) => None,
                }
            };
            let bound = sparktorch_proto::pull_wait(inner.config.round_timeout);
            match timeout(bound, wait).await {
                Err(_) => {
                    return self
                        .refuse(
                            ErrorCode::Timeout,
                            format!(
                                "no version newer than {newer_than} within {:.1}s (round_timeout_s + grace)",
                                bound.as_secs_f64()
                            ),
                        )
                        .await
                }
                Ok(None) => {
                    return self
                        .refuse(ErrorCode::ShuttingDown, "the server is stopping".into())
                        .await
                }
                Ok(Some(_)) => {}
            }
        }
        if let Some(f) = inner.fatal() {
            return self.refuse(ErrorCode::WorkerLost, f).await;
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        let result = {
            let view = inner.store.view(&mut scratch);
            let version = view.version();
            let should_stop = {
                let mut coord = lock(&inner.coord);
                if let Some((w, _)) = self.who {
                    if let Some(x) = coord.workers.get_mut(&w) {
                        x.last_pulled = Some(version);
                    }
                }
                coord.should_stop
            };
            let msg = Message::Params {
                version,
                should_stop,
            };
            self.send(&msg, view.data()).await
        };
        self.scratch = scratch;
        result
    }

    /// Apply (or queue, in synchronous mode) the gradients in `self.grads`.
    async fn push(&mut self, p: &PushMeta) -> Result<Message, Refusal> {
        let inner = self.inner.clone();
        if inner.config.mode == Mode::Synchronous {
            return self.push_sync(p).await;
        }
        let staleness = {
            let mut coord = lock(&inner.coord);
            coord.check_push(p, inner.store.version())?
        };
        let Some(staleness) = staleness else {
            return Ok(self.duplicate(p));
        };
        let grads = std::mem::take(&mut self.grads);
        let store_owner = inner.clone();
        let (grads, version) = tokio::task::spawn_blocking(move || {
            let v = store_owner.store.apply(&grads);
            (grads, v)
        })
        .await
        .map_err(|e| {
            inner.fail(format!("optimizer step panicked: {e}"));
            (ErrorCode::WorkerLost, format!("optimizer step failed: {e}"))
        })?;
        self.grads = grads;
        inner.counters.updates.fetch_add(1, Ordering::Relaxed);
        let should_stop = {
            let mut coord = lock(&inner.coord);
            coord.record(p, staleness);
            coord.pending_losses.insert(p.worker, eval_loss(p));
            coord.maybe_evaluate(inner.config.num_workers, inner.config.early_stop_patience);
            coord.should_stop
        };
        inner.publish(version);
        Ok(Message::PushAck {
            version,
            should_stop,
            duplicate: false,
        })
    }

    fn duplicate(&self, p: &PushMeta) -> Message {
        self.inner
            .counters
            .duplicates
            .fetch_add(1, Ordering::Relaxed);
        debug!(
            worker = p.worker,
            attempt = p.attempt,
            step = p.step,
            "duplicate push acknowledged"
        );
        Message::PushAck {
            version: self.inner.store.version(),
            should_stop: lock(&self.inner.coord).should_stop,
            duplicate: true,
        }
    }

    async fn push_sync(&mut self, p: &PushMeta) -> Result<Message, Refusal> {
        let inner = self.inner.clone();
        let mut round = inner.round.lock().await;
        {
            let mut coord = lock(&inner.coord);
            if let Some(f) = &coord.fatal {
                return Err((ErrorCode::WorkerLost, f.clone()));
            }
            let next = coord.workers.get(&p.worker).map_or(0, |w| w.next_step);
            if round.pending.contains_key(&p.worker) && p.step >= next {
                return Err((
                    ErrorCode::BadRequest,
                    format!(
                        "worker {} already pushed in synchronous round {}: pull a newer version first",
                        p.worker, round.number
                    ),
                ));
            }
            let Some(staleness) = coord.check_push(p, inner.store.version())? else {
                drop(coord);
                drop(round);
                return Ok(self.duplicate(p));
            };
            coord.record(p, staleness);
        }
        inner.counters.updates.fetch_add(1, Ordering::Relaxed);
        let opened = round.pending.is_empty();
        let grads = std::mem::take(&mut self.grads);
        round.pending.insert(
            p.worker,
            Contribution {
                batch_size: p.batch_size,
                grads,
                loss: eval_loss(p),
            },
        );
        let number = round.number;
        inner.close_round_if_complete(&mut round).await;
        if opened && round.number == number {
            let timer = tokio::spawn(inner.clone().round_timer(number));
            round.timer = Some(timer.abort_handle());
        }
        drop(round);
        if let Some(f) = inner.fatal() {
            return Err((ErrorCode::WorkerLost, f));
        }
        let should_stop = lock(&inner.coord).should_stop;
        Ok(Message::PushAck {
            version: inner.store.version(),
            should_stop,
            duplicate: false,
        })
    }

    /// The worker leaves: it no longer holds up synchronous rounds nor evaluations.
    async fn bye(&mut self) {
        let Some((w, a)) = self.who else { return };
        let inner = self.inner.clone();
        let mark = |coord: &mut Coord| {
            if let Some(x) = coord.workers.get_mut(&w) {
                if x.attempt == a && x.status == Status::Live {
                    x.status = Status::Done;
                }
            }
        };
        info!(peer = %self.peer, worker = w, attempt = a, "worker done");
        if inner.config.mode == Mode::Synchronous {
            let mut round = inner.round.lock().await;
            mark(&mut lock(&inner.coord));
            inner.close_round_if_complete(&mut round).await;
        } else {
            let mut coord = lock(&inner.coord);
            mark(&mut coord);
            coord.maybe_evaluate(inner.config.num_workers, inner.config.early_stop_patience);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contrib(b: u64, g: Vec<f32>) -> Contribution {
        Contribution {
            batch_size: b,
            grads: g,
            loss: 0.0,
        }
    }

    #[test]
    fn weighted_average_is_f64_in_worker_order() {
        let mut p = BTreeMap::new();
        p.insert(1, contrib(3, vec![1.0, 0.1]));
        p.insert(0, contrib(1, vec![5.0, 0.7]));
        let got = weighted_average(&p, 2);
        let want0 = ((1.0 * 5.0f64) + 3.0 * 1.0f64) / 4.0;
        let want1 = ((1.0 * f64::from(0.7f32)) + 3.0 * f64::from(0.1f32)) / 4.0;
        assert_eq!(got, vec![want0 as f32, want1 as f32]);
        // All-zero batch sizes: the plain mean.
        let mut z = BTreeMap::new();
        z.insert(0, contrib(0, vec![2.0]));
        z.insert(1, contrib(0, vec![4.0]));
        assert_eq!(weighted_average(&z, 1), vec![3.0]);
    }

    #[test]
    fn early_stopping_counts_non_improvements() {
        let mut c = Coord {
            workers: BTreeMap::new(),
            pending_losses: BTreeMap::new(),
            best_loss: None,
            bad_evaluations: 0,
            should_stop: false,
            history: vec![],
            staleness_sum: 0,
            staleness_max: 0,
            staleness_count: 0,
            fatal: None,
        };
        c.evaluate(1.0, Some(2));
        c.evaluate(0.5, Some(2));
        c.evaluate(0.5, Some(2)); // not a strict improvement
        assert!(!c.should_stop);
        c.evaluate(0.7, Some(2));
        assert!(c.should_stop);
        assert_eq!(c.best_loss, Some(0.5));
        // Async evaluation waits for every live worker.
        c.pending_losses.insert(0, 0.1);
        c.maybe_evaluate(2, None);
        assert_eq!(c.best_loss, Some(0.5));
        c.pending_losses.insert(1, 0.3);
        c.maybe_evaluate(2, None);
        assert_eq!(c.best_loss, Some(0.2));
    }
}
