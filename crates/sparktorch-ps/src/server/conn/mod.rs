//! One connection: the TLS handshake (when configured), the protocol handshake, then requests
//! read whole and answered one at a time.
//!
//! This module reads each request's header and dispatches it; each request kind is answered
//! in its own module: `handshake` (nonce, proof), `session` (register, stats, early stop,
//! bye), `pull`, `push` (async and synchronous pushes, and the payload they carry).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sparktorch_proto::{Dtype, ErrorCode, Message, ProtoError};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::timeout;
use tracing::{debug, info, warn};

mod handshake;
mod pull;
mod push;
mod session;

use super::Inner;
use crate::framing::Values;
use crate::wire::{read_first_byte, read_head_after, write_frame, ReadError, WriteBuffers};

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
        last_pulled: None,
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
    chunk: Vec<u16>,
    /// The version of the last `Params` this connection delivered whole (the staleness base).
    last_pulled: Option<u64>,
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
            Message::Push(meta) | Message::PushPull(meta) => self.push_request(&header, meta).await,
            Message::StatsRequest => self.stats_request().await,
            Message::EarlyStopRequest => self.early_stop_request().await,
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
}
