//! One connection: the TLS handshake (when configured), the protocol handshake, then requests
//! read whole and answered one at a time.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sparktorch_proto::{
    auth, Dtype, ErrorCode, Message, Mode, ProtoError, PushMeta, NONCE_LEN, PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::timeout;
use tracing::{debug, info, warn};

use super::coord::{eval_loss, Coord, Status, Worker};
use super::round::Contribution;
use super::{Inner, Server};
use crate::framing::Values;
use crate::lock;
use crate::wire::{
    read_first_byte, read_head, read_head_after, read_payload, write_frame, ReadError, WriteBuffers,
};

/// How long a connection refused with an error keeps discarding the peer's bytes before closing.
const LINGER_TIME: Duration = Duration::from_millis(250);

/// How many of the peer's bytes a refused connection discards at most before closing.
const LINGER_BYTES: usize = 1 << 20;

/// How long the server tries to deliver an error frame before closing anyway.
const ERROR_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a request was refused: the code and message sent in the `Error` frame.
pub(super) type Refusal = (ErrorCode, String);

/// How a connection ended, for the log.
#[derive(Debug)]
pub(super) enum End {
    /// The peer closed between frames, said `Bye`, or the server stopped.
    Closed,
    /// A bounded wait ran out.
    Timeout(&'static str),
    /// The socket failed.
    Io(std::io::Error),
    /// The TLS handshake failed (a plaintext client, a client pinning another certificate).
    Tls(std::io::Error),
    /// The peer broke the protocol.
    Proto(ProtoError),
    /// A request was refused and the connection closed.
    Refused(ErrorCode, String),
}

/// Decrements the open-connections gauge when a connection task ends.
pub(super) struct ConnGuard(pub(super) Arc<Inner>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.counters.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serve one accepted TCP connection: TLS first when the server has it, then the protocol.
/// `permit` is the connection's slot among the unauthenticated ones, released once it
/// authenticates.
pub(super) async fn serve_connection(
    inner: Arc<Inner>,
    stream: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
) {
    inner.counters.connections.fetch_add(1, Ordering::Relaxed);
    let _guard = ConnGuard(inner.clone());
    if let Err(e) = stream.set_nodelay(true) {
        debug!(%peer, error = %e, "set_nodelay failed");
    }
    let (end, worker) = match inner.config.tls.clone() {
        None => serve_stream(inner.clone(), stream, peer, Some(permit)).await,
        Some(tls) => {
            let mut stop = inner.stop.subscribe();
            let accepted = tokio::select! {
                a = timeout(inner.config.handshake_timeout, tls.acceptor().accept(stream)) => Some(a),
                _ = stop.wait_for(|s| *s) => None,
            };
            match accepted {
                None => (End::Closed, None),
                Some(Ok(Ok(tls_stream))) => {
                    serve_stream(inner.clone(), tls_stream, peer, Some(permit)).await
                }
                Some(Ok(Err(e))) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    // Connect-and-close (a port scanner): nothing to count.
                    (End::Closed, None)
                }
                Some(Ok(Err(e))) => {
                    inner.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
                    (End::Tls(e), None)
                }
                Some(Err(_)) => {
                    inner.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
                    (End::Timeout("TLS handshake"), None)
                }
            }
        }
    };
    log_end(peer, worker, end);
}

/// Serve one connection over any byte stream (plaintext protocol; TLS, when used, is already
/// established underneath). Returns how it ended and the worker it registered, if any.
pub(super) async fn serve_stream<S: AsyncRead + AsyncWrite + Unpin>(
    inner: Arc<Inner>,
    stream: S,
    peer: SocketAddr,
    permit: Option<OwnedSemaphorePermit>,
) -> (End, Option<u32>) {
    let mut stop = inner.stop.subscribe();
    let mut conn = Conn {
        inner: inner.clone(),
        stream,
        peer,
        preauth: permit,
        who: None,
        grads: Vec::new(),
        chunk: Vec::new(),
        out: WriteBuffers::default(),
    };
    let end = tokio::select! {
        end = conn.run() => end,
        _ = stop.wait_for(|s| *s) => End::Closed,
    };
    (end, conn.who.map(|w| w.0))
}

/// Log how a connection ended.
pub(super) fn log_end(peer: SocketAddr, worker: Option<u32>, end: End) {
    match end {
        End::Closed => debug!(%peer, ?worker, "connection closed"),
        End::Timeout(what) => info!(%peer, ?worker, what, "connection timed out"),
        End::Io(e) => info!(%peer, ?worker, error = %e, "connection failed"),
        End::Tls(e) => warn!(%peer, error = %e, "TLS handshake failed"),
        End::Proto(e) => warn!(%peer, ?worker, error = %e, "connection closed: protocol violation"),
        End::Refused(code, msg) => {
            info!(%peer, ?worker, ?code, reason = %msg, "connection closed: request refused")
        }
    }
}

/// One connection's state.
struct Conn<S> {
    /// Shared server state.
    inner: Arc<Inner>,
    /// The socket (or the TLS stream over it).
    stream: S,
    /// The peer's address, for logs.
    peer: SocketAddr,
    /// The connection's slot among the unauthenticated ones; released after the handshake.
    preauth: Option<OwnedSemaphorePermit>,
    /// `(worker, attempt)` once registered.
    who: Option<(u32, u32)>,
    /// Gradient buffer, reused across pushes.
    grads: Vec<f32>,
    /// Chunk buffer for reading bfloat16 payloads.
    chunk: Vec<u8>,
    /// Frame encoding buffers.
    out: WriteBuffers,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    async fn run(&mut self) -> End {
        if let Err(end) = self.handshake().await {
            return end;
        }
        // Authenticated: this connection no longer counts against the pre-auth cap.
        self.preauth = None;
        loop {
            if let Err(end) = self.request().await {
                return end;
            }
        }
    }

    /// Send a frame without payload.
    async fn send(&mut self, msg: &Message) -> Result<(), End> {
        self.send_with(msg, Values::Slice(&[]), Dtype::F32).await
    }

    /// Send a frame carrying `values` as `dtype` (within the I/O timeout).
    async fn send_with(
        &mut self,
        msg: &Message,
        values: Values<'_>,
        dtype: Dtype,
    ) -> Result<(), End> {
        let io = self.inner.config.io_timeout;
        match timeout(
            io,
            write_frame(&mut self.stream, msg, values, dtype, &mut self.out),
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
            write_frame(
                &mut self.stream,
                &msg,
                Values::Slice(&[]),
                Dtype::F32,
                &mut self.out,
            ),
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
            write_frame(
                &mut self.stream,
                &hello,
                Values::Slice(&[]),
                Dtype::F32,
                &mut self.out,
            ),
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
        self.send(&Message::AuthOk { server_proof }).await
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
        let first = match timeout(idle, read_first_byte(&mut self.stream)).await {
            Err(_) => return Err(End::Timeout("next request")),
            Ok(Ok(None)) => return Err(End::Closed),
            Ok(Err(e)) => return Err(End::Io(e)),
            Ok(Ok(Some(b))) => b,
        };
        let read = read_head_after(&mut self.stream, Some(first), n * 4);
        let (header, msg) = match timeout(io, read).await {
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
                self.pull(newer_than, header.dtype).await
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
                if header.payload_values() != n {
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
                let read =
                    read_payload(&mut self.stream, &header, &mut self.grads, &mut self.chunk);
                match timeout(io, read).await {
                    Err(_) => return Err(End::Timeout("push payload")),
                    Ok(Err(e)) => return Err(self.reject(e).await),
                    Ok(Ok(())) => {}
                }
                // The whole frame is in and valid: now (and only now) act on it.
                let ack = match self.push(&meta).await {
                    Ok(ack) => ack,
                    Err((code, m)) => return self.refuse(code, m).await,
                };
                self.send(&ack).await?;
                if also_pull {
                    // Synchronous mode: `pull` waits for the round holding this worker's
                    // gradient, if one does (not for a discarded or duplicate push).
                    self.pull(-1, header.dtype).await?;
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
                self.send(&msg).await
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
                self.send(&msg).await
            }
            Message::Bye => {
                self.bye().await;
                let _ = self.send(&Message::Bye).await;
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
                    let w = coord
                        .workers
                        .entry(worker)
                        .or_insert_with(|| Worker::new(attempt));
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
        self.send(&msg).await
    }

    /// Answer a pull with the current parameters as `dtype`, once newer than `newer_than`.
    async fn pull(&mut self, newer_than: i64, dtype: Dtype) -> Result<(), End> {
        let inner = self.inner.clone();
        // Synchronous mode: a worker whose gradient waits in the open round gets the round's
        // result, never the version the round started from (on which it already computed).
        let round_base = self.who.and_then(|(w, _)| {
            let coord = lock(&inner.coord);
            coord.workers.get(&w).and_then(|x| x.round_base)
        });
        let newer_than = match round_base {
            Some(base) => newer_than.max(i64::try_from(base).unwrap_or(i64::MAX)),
            None => newer_than,
        };
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
        // A snapshot (async / synchronous) is sent straight from the store; hogwild cells are
        // read chunk by chunk as they are sent: no model-size copy on this tokio worker.
        let view = inner.store.view();
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
        self.send_with(&msg, Values::View(&view), dtype).await
    }

    /// Apply (or queue, in synchronous mode) the gradients in `self.grads`.
    async fn push(&mut self, p: &PushMeta) -> Result<Message, Refusal> {
        let inner = self.inner.clone();
        if inner.config.mode == Mode::Synchronous {
            return self.push_sync(p).await;
        }
        let checked_at = inner.store.version();
        let staleness = {
            let mut coord = lock(&inner.coord);
            coord.check_push(p, checked_at)?
        };
        let Some(staleness) = staleness else {
            return Ok(self.duplicate(p));
        };
        // The version the worker computed on (as far as the server knows what it pulled).
        let base = checked_at - staleness;
        let max_staleness = inner.config.max_staleness;
        let grads = std::mem::take(&mut self.grads);
        let store_owner = inner.clone();
        let (worker, step, attempt) = (p.worker, p.step, p.attempt);
        let (grads, outcome) = tokio::task::spawn_blocking(move || {
            // Bounded staleness is checked against the steps before this one: the version it
            // applies to (under the step lock, async), or the steps begun, this one's place
            // taken atomically (hogwild).
            let admit = |v: u64| max_staleness.is_none_or(|k| v.saturating_sub(base) <= k);
            let r = store_owner.store.try_apply_then(&grads, admit, |_| {
                store_owner.applied(worker, step, attempt);
            });
            (grads, r)
        })
        .await
        .map_err(|e| {
            inner.fail(format!("optimizer step panicked: {e}"));
            (ErrorCode::WorkerLost, format!("optimizer step failed: {e}"))
        })?;
        self.grads = grads;
        let applied = match outcome {
            Ok(a) => a,
            Err(current) => {
                // Too stale: nothing applied, the step is not done; the worker pulls the
                // current version and computes the step again.
                inner.counters.stale_refused.fetch_add(1, Ordering::Relaxed);
                debug!(
                    worker = p.worker,
                    step = p.step,
                    base,
                    current,
                    "push refused: staler than max_staleness"
                );
                let mut coord = lock(&inner.coord);
                coord.undo_step(p);
                return Ok(Message::PushAck {
                    version: current,
                    should_stop: coord.should_stop,
                    duplicate: false,
                    stale: true,
                });
            }
        };
        let version = applied.version;
        inner.counters.updates.fetch_add(1, Ordering::Relaxed);
        let should_stop = {
            let mut coord = lock(&inner.coord);
            // Staleness as applied: the steps that came between the worker's pull and this one
            // (hogwild: including those still running beside it).
            coord.record(p, applied.before.saturating_sub(base));
            coord.pending_losses.insert(p.worker, eval_loss(p));
            coord.maybe_evaluate(inner.config.num_workers, inner.config.early_stop_patience);
            coord.should_stop
        };
        inner.publish(version);
        inner.after_step(version);
        Ok(Message::PushAck {
            version,
            should_stop,
            duplicate: false,
            stale: false,
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
            stale: false,
        }
    }

    async fn push_sync(&mut self, p: &PushMeta) -> Result<Message, Refusal> {
        let inner = self.inner.clone();
        let mut round = inner.round.lock().await;
        // Only rounds step the parameters, and they do so under the round lock: the open
        // round applies to this version.
        let version = inner.store.version();
        {
            let mut coord = lock(&inner.coord);
            if let Some(f) = &coord.fatal {
                return Err((ErrorCode::WorkerLost, f.clone()));
            }
            if p.base_version < version {
                // Computed on parameters older than the open round's (a worker dropped for
                // missing a round, pushing late): averaging it would mix versions. The step
                // counts as done (its replay is a duplicate), the worker is live again, and
                // its pull answers at once with the current version to continue from.
                let Some(_) = coord.check_push(p, version)? else {
                    drop(coord);
                    drop(round);
                    return Ok(self.duplicate(p));
                };
                inner
                    .counters
                    .stale_discarded
                    .fetch_add(1, Ordering::Relaxed);
                info!(
                    worker = p.worker,
                    attempt = p.attempt,
                    step = p.step,
                    base_version = p.base_version,
                    version,
                    "stale synchronous gradient discarded"
                );
                return Ok(Message::PushAck {
                    version,
                    should_stop: coord.should_stop,
                    duplicate: false,
                    stale: false,
                });
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
            // Checked before anything is booked: a refused push leaves no trace.
            round.check_batch(p.batch_size)?;
            let Some(staleness) = coord.check_push(p, version)? else {
                drop(coord);
                drop(round);
                return Ok(self.duplicate(p));
            };
            coord.record(p, staleness);
            if let Some(w) = coord.workers.get_mut(&p.worker) {
                w.round_base = Some(version);
            }
        }
        inner.counters.updates.fetch_add(1, Ordering::Relaxed);
        let opened = round.pending.is_empty();
        let grads = std::mem::take(&mut self.grads);
        round.add(
            p.worker,
            Contribution {
                batch_size: p.batch_size,
                grads,
                loss: eval_loss(p),
                step: p.step,
                attempt: p.attempt,
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
            stale: false,
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
