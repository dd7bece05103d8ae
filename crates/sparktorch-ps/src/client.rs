//! The blocking client used by executor tasks: `std::net::TcpStream` (under rustls when the
//! server uses TLS), no runtime and no threads (PySpark forks its Python workers; the only
//! thread is a short-lived one for a host-name lookup, see [`resolve`]).
//!
//! Each call is one round trip on a persistent connection. `f32` payloads are written straight
//! from the caller's slice and read straight into the caller's buffer; with
//! [`ClientOptions::dtype`] = bfloat16 they are converted chunk by chunk on the way (see
//! [`crate::framing`], which the server shares).
//!
//! Deadlines are per exchange (a request and its answer), not per system call: every read and
//! write gets what is left of the exchange's deadline as its socket timeout, so a server that
//! trickles bytes cannot stretch a call beyond its bound.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sparktorch_proto::{
    auth, Dtype, ErrorCode, FrameHeader, Message, Mode, PushMeta, MAX_PAYLOAD_BYTES, NONCE_LEN,
};

use crate::framing::{write_bf16_pipelined, Head, Incoming, Outgoing, Scratch, Values};

use crate::tls::{self, Fingerprint};
use crate::ClientError;

/// Timeouts and transport of a client.
#[derive(Debug, Clone, Copy)]
pub struct ClientOptions {
    /// Bound on each exchange: a request and its whole answer (a wait for a newer version
    /// adds the server's round timeout and grace, see `pull_wait`).
    pub timeout: Duration,
    /// How long to keep trying to connect, address lookup included (refused connections are
    /// retried until then).
    pub connect_timeout: Duration,
    /// `Some`: speak TLS and accept only the server certificate with this SHA-256 digest.
    /// `None`: plaintext TCP.
    pub server_fingerprint: Option<Fingerprint>,
    /// Element type of pushed gradients and pulled parameters on the wire (the server keeps
    /// `f32` master weights either way): [`Dtype::Bf16`] halves the bytes.
    pub dtype: Dtype,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(30),
            server_fingerprint: None,
            dtype: Dtype::F32,
        }
    }
}

/// A socket whose reads and writes share one deadline: each system call gets what is left of
/// it as its timeout, and none starts once it has passed.
struct Timed {
    /// The socket.
    tcp: TcpStream,
    /// When the current exchange must be over.
    deadline: Instant,
}

impl Timed {
    /// Time left before the deadline, or `TimedOut`.
    fn left(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the exchange's deadline passed",
            ))
        } else {
            Ok(left)
        }
    }
}

impl Read for Timed {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.tcp.set_read_timeout(Some(left))?;
        self.tcp.read(buf)
    }
}

impl Write for Timed {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.tcp.set_write_timeout(Some(left))?;
        self.tcp.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

/// The connection: plaintext, or TLS over the same deadline-bounded socket.
enum Transport {
    /// Plain TCP.
    Plain(Timed),
    /// TLS 1.3 (rustls), the server certificate pinned.
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, Timed>>),
}

impl Transport {
    /// Start an exchange that must end within `within`.
    fn set_deadline(&mut self, within: Duration) {
        let timed = match self {
            Self::Plain(t) => t,
            Self::Tls(s) => &mut s.sock,
        };
        timed.deadline = Instant::now() + within;
    }
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Plain(t) => t.read(buf),
            Self::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Plain(t) => t.write(buf),
            Self::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Plain(t) => t.flush(),
            Self::Tls(s) => s.flush(),
        }
    }
}

/// What a push returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushOutcome {
    /// The server version after the push was accepted.
    pub version: u64,
    /// The global early-stop flag.
    pub should_stop: bool,
    /// The push had been applied before (a replay): nothing changed.
    pub duplicate: bool,
    /// The push was computed on a version staler than the server's `max_staleness`: nothing
    /// changed and the step is not done; compute it again on the current parameters (a
    /// `push_pull` has already pulled them).
    pub stale: bool,
}

/// A connected, authenticated, registered worker.
pub struct Client {
    /// The connection (`None` once closed or broken).
    stream: Option<Transport>,
    /// `host:port` for messages.
    addr: String,
    /// This worker's id.
    worker: u32,
    /// This worker's attempt.
    attempt: u32,
    /// Model size.
    num_params: usize,
    /// Steps already applied by earlier attempts.
    resume_step: u64,
    /// Version last pulled.
    version: u64,
    /// The server's mode.
    mode: Mode,
    /// The server's round timeout.
    round_timeout: Duration,
    /// Bound on one exchange.
    timeout: Duration,
    /// The bound of the exchange in progress (for error messages).
    budget: Duration,
    /// Last early-stop flag seen.
    should_stop: bool,
    /// Payload element type on the wire.
    dtype: Dtype,
    /// Frame encoding buffers (head and converted chunks).
    out: Scratch,
    /// Chunk buffer for reading converted payloads.
    chunk: Vec<u16>,
}

fn io_err(addr: &str, what: &'static str, after: Duration, e: io::Error) -> ClientError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout {
            addr: addr.to_string(),
            what,
            after,
        },
        io::ErrorKind::UnexpectedEof => ClientError::Unavailable {
            addr: addr.to_string(),
            reason: format!("connection closed by the server while waiting for {what}"),
        },
        _ => ClientError::Unavailable {
            addr: addr.to_string(),
            reason: format!("{what}: {e}"),
        },
    }
}

impl Client {
    /// Connect to `host:port` (TLS with the pinned certificate when
    /// `options.server_fingerprint` is set), check the protocol version, prove `secret`,
    /// register `worker` with `attempt`.
    pub fn connect(
        host: &str,
        port: u16,
        secret: &[u8],
        worker: u32,
        attempt: u32,
        options: ClientOptions,
    ) -> Result<Self, ClientError> {
        let addr = format!("{host}:{port}");
        let stream = connect_with_retry(host, port, &addr, options.connect_timeout)?;
        let unavailable = |e: io::Error| ClientError::Unavailable {
            addr: addr.clone(),
            reason: e.to_string(),
        };
        stream.set_nodelay(true).map_err(unavailable)?;
        // The whole handshake (TLS and proof of the secret) shares one deadline.
        let hs = options.timeout.min(sparktorch_proto::HANDSHAKE_TIMEOUT);
        let timed = Timed {
            tcp: stream,
            deadline: Instant::now() + hs,
        };
        let transport = match options.server_fingerprint {
            None => Transport::Plain(timed),
            Some(pin) => Transport::Tls(Box::new(tls_handshake(&addr, timed, pin, hs)?)),
        };
        let mut c = Self {
            stream: Some(transport),
            addr: addr.clone(),
            worker,
            attempt,
            num_params: 0,
            resume_step: 0,
            version: 0,
            mode: Mode::Async,
            round_timeout: Duration::ZERO,
            timeout: options.timeout,
            budget: hs,
            should_stop: false,
            dtype: options.dtype,
            out: Scratch::default(),
            chunk: Vec::new(),
        };
        c.handshake(secret, options.server_fingerprint.is_some())?;
        c.begin(options.timeout)?;
        c.send(&Message::Register { worker, attempt }, &[])?;
        match c.recv_small("Registered")? {
            Message::Registered {
                num_params,
                resume_step,
                version,
                mode,
                round_timeout_ms,
            } => {
                c.num_params = usize::try_from(num_params).unwrap_or(usize::MAX);
                c.resume_step = resume_step;
                c.version = version;
                c.mode = mode;
                c.round_timeout = Duration::from_millis(round_timeout_ms);
                Ok(c)
            }
            other => Err(c.unexpected(&other, "Registered")),
        }
    }

    fn handshake(&mut self, secret: &[u8], tls: bool) -> Result<(), ClientError> {
        let hello_from = if tls {
            "Hello"
        } else {
            "Hello (a server with TLS on waits for a TLS client: pass its fingerprint)"
        };
        let (header, hello) = match self.recv_head(0, hello_from) {
            Err(ClientError::Protocol {
                source: sparktorch_proto::ProtoError::BadMagic { .. },
                ..
            }) if !tls => {
                return Err(ClientError::Auth {
                    addr: self.addr.clone(),
                    reason: "the server did not answer with the sparktorch protocol (a server \
                             with TLS on needs a client given its fingerprint)"
                        .into(),
                })
            }
            Err(ClientError::Protocol {
                source: sparktorch_proto::ProtoError::UnsupportedVersion { found, supported },
                ..
            }) => {
                return Err(ClientError::Auth {
                    addr: self.addr.clone(),
                    reason: format!(
                        "the server speaks protocol version {found}, this client {supported}"
                    ),
                })
            }
            r => r?,
        };
        let _ = header;
        let Message::Hello { server_nonce, .. } = hello else {
            return Err(self.unexpected(&hello, "Hello"));
        };
        let mut client_nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut client_nonce).map_err(|e| ClientError::Unavailable {
            addr: self.addr.clone(),
            reason: format!("no randomness for the handshake nonce: {e}"),
        })?;
        let proof = auth::client_proof(secret, &server_nonce, &client_nonce);
        self.send(
            &Message::Auth {
                client_nonce,
                proof,
            },
            &[],
        )?;
        match self.recv_head(0, "AuthOk") {
            Ok((_, Message::AuthOk { server_proof })) => {
                if auth::verify_server_proof(secret, &server_nonce, &client_nonce, &server_proof) {
                    Ok(())
                } else {
                    self.stream = None;
                    Err(ClientError::Auth {
                        addr: self.addr.clone(),
                        reason: "the server could not prove it holds the secret".into(),
                    })
                }
            }
            Ok((_, Message::Error { code, message })) => {
                self.stream = None;
                Err(ClientError::Auth {
                    addr: self.addr.clone(),
                    reason: format!("{message} ({code:?})"),
                })
            }
            Ok((_, other)) => Err(self.unexpected(&other, "AuthOk")),
            Err(ClientError::Unavailable { .. }) => {
                // The server closed without a word: it refused us.
                Err(ClientError::Auth {
                    addr: self.addr.clone(),
                    reason: "the server closed the connection during the handshake".into(),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Number of parameters of the model.
    pub fn num_params(&self) -> usize {
        self.num_params
    }

    /// Steps of this worker already applied by earlier attempts.
    pub fn resume_step(&self) -> u64 {
        self.resume_step
    }

    /// The version of the parameters last pulled.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Element type of payloads on the wire (from [`ClientOptions::dtype`]).
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The server's mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// This worker's id.
    pub fn worker(&self) -> u32 {
        self.worker
    }

    /// The last early-stop flag seen in an answer.
    pub fn last_should_stop(&self) -> bool {
        self.should_stop
    }

    /// `host:port` of the server.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn stream(&mut self) -> Result<&mut Transport, ClientError> {
        match self.stream.as_mut() {
            Some(s) => Ok(s),
            None => Err(ClientError::Unavailable {
                addr: self.addr.clone(),
                reason: "the connection is closed (after close() or an earlier error)".into(),
            }),
        }
    }

    /// Start an exchange that must end within `within`.
    fn begin(&mut self, within: Duration) -> Result<(), ClientError> {
        self.stream()?.set_deadline(within);
        self.budget = within;
        Ok(())
    }

    /// Fail and drop the connection: its framing state is unknown after an error.
    fn broken(&mut self, e: ClientError) -> ClientError {
        self.stream = None;
        e
    }

    fn unexpected(&mut self, got: &Message, expected: &'static str) -> ClientError {
        if let Message::Error { code, message } = got {
            if *code != ErrorCode::Timeout {
                self.stream = None;
            }
            return ClientError::Server {
                code: *code,
                message: message.clone(),
            };
        }
        let e = ClientError::Unexpected {
            addr: self.addr.clone(),
            got: got.kind(),
            expected,
        };
        self.broken(e)
    }

    fn send(&mut self, msg: &Message, values: &[f32]) -> Result<(), ClientError> {
        let scratch = std::mem::take(&mut self.out);
        let timeout = self.budget;
        let addr = self.addr.clone();
        // Tensor requests travel as the chosen dtype; the others have no tensor.
        let dtype = if msg.kind().may_be_bf16() {
            self.dtype
        } else {
            Dtype::F32
        };
        let mut out = match Outgoing::new(msg, Values::Slice(values), dtype, scratch) {
            Ok(o) => o,
            Err(source) => return Err(self.broken(ClientError::Protocol { addr, source })),
        };
        let result = match self.stream() {
            Err(e) => Err(e),
            Ok(stream) => {
                let mut r = Ok(());
                while let Some(b) = out.next_bytes() {
                    r = stream.write_all(b);
                    if r.is_err() {
                        break;
                    }
                    if let Some(rest) = out.take_bf16_rest() {
                        // A large bfloat16 payload: encoded ahead on a helper thread.
                        r = write_bf16_pipelined(rest, |b| stream.write_all(b));
                        break;
                    }
                }
                r.and_then(|()| stream.flush())
                    .map_err(|e| io_err(&addr, "sending a request", timeout, e))
            }
        };
        self.out = out.into_scratch();
        result.map_err(|e| self.broken(e))
    }

    /// Read a header + meta (within the current exchange's deadline).
    fn recv_head(
        &mut self,
        max_payload: usize,
        what: &'static str,
    ) -> Result<(FrameHeader, Message), ClientError> {
        let addr = self.addr.clone();
        let wait = self.budget;
        let stream = self.stream()?;
        let mut head = Head::new();
        let proto = |source| ClientError::Protocol {
            addr: addr.clone(),
            source,
        };
        let r = stream
            .read_exact(head.header_bytes())
            .map_err(|e| io_err(&addr, what, wait, e))
            .and_then(|()| head.header(max_payload).map_err(proto))
            .and_then(|_| {
                stream
                    .read_exact(head.meta_bytes())
                    .map_err(|e| io_err(&addr, what, wait, e))?;
                head.message().map_err(proto)
            });
        r.map_err(|e| self.broken(e))
    }

    fn recv_small(&mut self, what: &'static str) -> Result<Message, ClientError> {
        Ok(self.recv_head(0, what)?.1)
    }

    /// Receive a `Params` frame into `out` (within the current exchange's deadline).
    fn recv_params(&mut self, out: &mut [f32]) -> Result<u64, ClientError> {
        let (header, msg) = self.recv_head(MAX_PAYLOAD_BYTES, "Params")?;
        let Message::Params {
            version,
            should_stop,
        } = msg
        else {
            return Err(self.unexpected(&msg, "Params"));
        };
        if header.payload_values() != out.len() {
            let e = ClientError::WrongLength {
                what: "the server's parameters",
                expected: out.len(),
                got: header.payload_values(),
            };
            return Err(self.broken(e));
        }
        if header.dtype != self.dtype {
            let e = ClientError::Protocol {
                addr: self.addr.clone(),
                source: sparktorch_proto::ProtoError::InvalidField {
                    kind: header.kind,
                    field: "flags",
                    reason: "the parameters came in another dtype than the request asked for",
                },
            };
            return Err(self.broken(e));
        }
        let addr = self.addr.clone();
        let timeout = self.budget;
        let mut chunk = std::mem::take(&mut self.chunk);
        let r = match self.stream() {
            Err(e) => Err(e),
            Ok(stream) => {
                let mut rx = Incoming::new(&header, out, &mut chunk);
                let mut r = Ok(());
                while let Some(b) = rx.buffer() {
                    r = stream.read_exact(b);
                    if r.is_err() {
                        break;
                    }
                    rx.filled();
                }
                r.map_err(|e| io_err(&addr, "the parameters", timeout, e))
            }
        };
        self.chunk = chunk;
        r.map_err(|e| self.broken(e))?;
        self.version = version;
        self.should_stop = should_stop;
        Ok(version)
    }

    fn check_len(&self, what: &'static str, got: usize) -> Result<(), ClientError> {
        if got != self.num_params {
            return Err(ClientError::WrongLength {
                what,
                expected: self.num_params,
                got,
            });
        }
        Ok(())
    }

    /// The bound of an exchange whose answer may wait for a version newer than some: the
    /// server's own wait, then one `timeout` for the transfer.
    fn wait_bound(&self) -> Duration {
        sparktorch_proto::pull_wait(self.round_timeout).saturating_add(self.timeout)
    }

    /// Write the parameters into `out` and return their version. With `newer_than`, the
    /// server answers once its version exceeds it (or with a `Timeout` error, `out` untouched).
    /// In synchronous mode, while this worker's gradient waits in the open round, the server
    /// answers once that round has closed, whatever `newer_than`.
    pub fn pull(&mut self, out: &mut [f32], newer_than: Option<u64>) -> Result<u64, ClientError> {
        self.check_len("out", out.len())?;
        let newer = newer_than.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX));
        let within = if newer_than.is_some() || self.mode == Mode::Synchronous {
            self.wait_bound()
        } else {
            self.timeout
        };
        self.begin(within)?;
        self.send(&Message::Pull { newer_than: newer }, &[])?;
        self.recv_params(out)
    }

    fn push_meta(&self, step: u64, batch_size: u64, loss: f64, val_loss: Option<f64>) -> PushMeta {
        PushMeta {
            worker: self.worker,
            attempt: self.attempt,
            step,
            batch_size,
            loss,
            val_loss: val_loss.unwrap_or(f64::NAN),
            base_version: self.version,
        }
    }

    fn recv_ack(&mut self) -> Result<PushOutcome, ClientError> {
        match self.recv_small("PushAck")? {
            Message::PushAck {
                version,
                should_stop,
                duplicate,
                stale,
            } => {
                self.should_stop = should_stop;
                Ok(PushOutcome {
                    version,
                    should_stop,
                    duplicate,
                    stale,
                })
            }
            other => Err(self.unexpected(&other, "PushAck")),
        }
    }

    /// Send this worker's gradients for `step` (idempotent per (worker, attempt, step)).
    pub fn push(
        &mut self,
        grads: &[f32],
        step: u64,
        batch_size: u64,
        loss: f64,
        val_loss: Option<f64>,
    ) -> Result<PushOutcome, ClientError> {
        self.check_len("grads", grads.len())?;
        let meta = self.push_meta(step, batch_size, loss, val_loss);
        self.begin(self.timeout)?;
        self.send(&Message::Push(meta), grads)?;
        self.recv_ack()
    }

    /// Push then pull (synchronous mode: once the round holding the push has closed) in one round
    /// trip. Returns the push outcome and the version pulled. Two deadlines: the push and its
    /// acknowledgement, then the parameters (which may wait for a synchronous round).
    pub fn push_pull(
        &mut self,
        grads: &[f32],
        out: &mut [f32],
        step: u64,
        batch_size: u64,
        loss: f64,
        val_loss: Option<f64>,
    ) -> Result<(PushOutcome, u64), ClientError> {
        self.check_len("grads", grads.len())?;
        self.check_len("out", out.len())?;
        let meta = self.push_meta(step, batch_size, loss, val_loss);
        self.begin(self.timeout)?;
        self.send(&Message::PushPull(meta), grads)?;
        let ack = self.recv_ack()?;
        let within = if self.mode == Mode::Synchronous {
            self.wait_bound()
        } else {
            self.timeout
        };
        self.begin(within)?;
        let version = self.recv_params(out)?;
        Ok((ack, version))
    }

    /// Ask the server for the global early-stop flag.
    pub fn should_stop(&mut self) -> Result<bool, ClientError> {
        self.begin(self.timeout)?;
        self.send(&Message::EarlyStopRequest, &[])?;
        match self.recv_small("EarlyStop")? {
            Message::EarlyStop { should_stop, .. } => {
                self.should_stop = should_stop;
                Ok(should_stop)
            }
            other => Err(self.unexpected(&other, "EarlyStop")),
        }
    }

    /// Ask the server for its headline counters: `(version, updates, workers_live)`.
    pub fn remote_stats(&mut self) -> Result<(u64, u64, u32), ClientError> {
        self.begin(self.timeout)?;
        self.send(&Message::StatsRequest, &[])?;
        match self.recv_small("Stats")? {
            Message::Stats {
                version,
                updates,
                workers_live,
                ..
            } => Ok((version, updates, workers_live)),
            other => Err(self.unexpected(&other, "Stats")),
        }
    }

    /// Tell the server this worker is done (it leaves synchronous rounds) and close.
    /// Idempotent; errors while saying goodbye are ignored (the server also notices a close).
    pub fn close(&mut self) {
        if self.stream.is_none() {
            return;
        }
        if self.begin(self.timeout).is_ok() && self.send(&Message::Bye, &[]).is_ok() {
            let _ = self.recv_small("Bye");
        }
        self.stream = None;
    }

    /// Whether the connection is still usable.
    pub fn is_open(&self) -> bool {
        self.stream.is_some()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // No Bye here: a dropped client (e.g. a crashed task) must not count as "done".
        self.stream = None;
    }
}

/// The TLS handshake over `timed` (whose deadline bounds it), accepting only the certificate
/// whose SHA-256 digest is `pin`.
fn tls_handshake(
    addr: &str,
    timed: Timed,
    pin: Fingerprint,
    hs: Duration,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, Timed>, ClientError> {
    let auth = |reason: String| ClientError::Auth {
        addr: addr.to_string(),
        reason,
    };
    let config = tls::client_config(pin).map_err(|e| auth(format!("TLS setup: {e}")))?;
    let conn = rustls::ClientConnection::new(config, tls::server_name())
        .map_err(|e| auth(format!("TLS setup: {e}")))?;
    let mut s = rustls::StreamOwned::new(conn, timed);
    while s.conn.is_handshaking() {
        if let Err(e) = s.conn.complete_io(&mut s.sock) {
            // Tell the server why (best effort): rustls queued an alert.
            let _ = s.conn.write_tls(&mut s.sock);
            return Err(match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout {
                    addr: addr.to_string(),
                    what: "the TLS handshake",
                    after: hs,
                },
                _ => {
                    let pinned = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
                    let reason = match pinned {
                        Some(rustls::Error::InvalidCertificate(_)) => format!(
                            "TLS: the server's certificate does not match the pinned fingerprint \
                             {}",
                            tls::hex(&pin)
                        ),
                        _ => format!(
                            "TLS handshake failed (is the server running without TLS?): {e}"
                        ),
                    };
                    auth(reason)
                }
            });
        }
    }
    Ok(s)
}

/// Resolve `host` within `within`. Numeric addresses need no lookup; names are looked up on a
/// helper thread, since the system resolver cannot be cancelled: a lookup that outlives its
/// bound is abandoned (its thread ends when the resolver returns) and reported as a timeout.
pub(crate) fn resolve(host: &str, port: u16, within: Duration) -> io::Result<Vec<SocketAddr>> {
    if let Ok(ip) = host
        .trim_matches(|c| c == '[' || c == ']')
        .parse::<IpAddr>()
    {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let name = host.to_string();
    resolve_with(
        move || {
            (name.as_str(), port)
                .to_socket_addrs()
                .map(Iterator::collect)
        },
        within,
    )
}

/// Run `lookup` on a helper thread and wait for it at most `within`.
fn resolve_with(
    lookup: impl FnOnce() -> io::Result<Vec<SocketAddr>> + Send + 'static,
    within: Duration,
) -> io::Result<Vec<SocketAddr>> {
    let (tx, rx) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("sparktorch-resolve".into())
        .spawn(move || {
            let _ = tx.send(lookup());
        })?;
    match rx.recv_timeout(within) {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the address lookup did not finish within {:.1}s",
                within.as_secs_f64()
            ),
        )),
    }
}

/// Resolve and connect, retrying refused connections until `connect_timeout` (which bounds the
/// address lookup too).
fn connect_with_retry(
    host: &str,
    port: u16,
    addr: &str,
    connect_timeout: Duration,
) -> Result<TcpStream, ClientError> {
    let deadline = Instant::now() + connect_timeout;
    let mut backoff = Duration::from_millis(20);
    let mut last = String::from("no address to try");
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let addrs: Vec<SocketAddr> = match resolve(host, port, left.max(Duration::from_millis(1))) {
            Ok(a) => a,
            Err(e) => {
                return Err(ClientError::Unavailable {
                    addr: addr.to_string(),
                    reason: format!("cannot resolve {host}: {e}"),
                })
            }
        };
        for a in &addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match TcpStream::connect_timeout(a, left) {
                Ok(s) => return Ok(s),
                Err(e) => last = e.to_string(),
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ClientError::Unavailable {
                addr: addr.to_string(),
                reason: format!(
                    "could not connect within {:.1}s: {last}",
                    connect_timeout.as_secs_f64()
                ),
            });
        }
        std::thread::sleep(backoff.min(left));
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hanging_address_lookup_is_abandoned_at_its_bound() {
        let t0 = Instant::now();
        let err = resolve_with(
            || {
                std::thread::sleep(Duration::from_secs(5));
                Ok(vec![])
            },
            Duration::from_millis(200),
        )
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    }

    #[test]
    fn numeric_addresses_need_no_lookup() {
        let a = resolve("127.0.0.1", 7, Duration::from_millis(1)).unwrap();
        assert_eq!(a, vec![SocketAddr::from(([127, 0, 0, 1], 7))]);
        let a = resolve("::1", 7, Duration::from_millis(1)).unwrap();
        assert_eq!(a.len(), 1);
        assert!(resolve("localhost", 7, Duration::from_secs(5)).is_ok());
    }
}
