//! The blocking client used by executor tasks: `std::net::TcpStream` with read and write
//! timeouts, no runtime and no threads (PySpark forks its Python workers).
//!
//! Each call is one round trip on a persistent connection. Payloads are written straight from
//! the caller's slice and read straight into the caller's buffer.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use sparktorch_proto::{
    auth, decode_header, decode_meta, encode_head, payload, ErrorCode, FrameHeader, Message, Mode,
    PushMeta, HEADER_LEN, MAX_META_BYTES, MAX_PAYLOAD_BYTES, NONCE_LEN,
};

use crate::ClientError;

/// Timeouts of a client.
#[derive(Debug, Clone, Copy)]
pub struct ClientOptions {
    /// Bound on every read and write (a wait for a synchronous round adds the server's
    /// round timeout).
    pub timeout: Duration,
    /// How long to keep trying to connect (refused connections are retried until then).
    pub connect_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(30),
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
}

/// A connected, authenticated, registered worker.
pub struct Client {
    /// The socket (`None` once closed or broken).
    stream: Option<TcpStream>,
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
    /// Per-operation timeout.
    timeout: Duration,
    /// Last early-stop flag seen.
    should_stop: bool,
    /// Header encoding buffer.
    out: Vec<u8>,
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
    /// Connect to `host:port`, check the protocol version, prove `secret`, register `worker`
    /// with `attempt`.
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
        let hs = options.timeout.min(sparktorch_proto::HANDSHAKE_TIMEOUT);
        stream.set_read_timeout(Some(hs)).map_err(unavailable)?;
        stream
            .set_write_timeout(Some(options.timeout))
            .map_err(unavailable)?;
        let mut c = Self {
            stream: Some(stream),
            addr: addr.clone(),
            worker,
            attempt,
            num_params: 0,
            resume_step: 0,
            version: 0,
            mode: Mode::Async,
            round_timeout: Duration::ZERO,
            timeout: options.timeout,
            should_stop: false,
            out: Vec::with_capacity(256),
        };
        c.handshake(secret, hs)?;
        c.set_read_timeout(options.timeout)?;
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

    fn handshake(&mut self, secret: &[u8], hs: Duration) -> Result<(), ClientError> {
        let (header, hello) = match self.recv_head(0, "Hello", hs) {
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
        match self.recv_head(0, "AuthOk", hs) {
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

    fn stream(&mut self) -> Result<&mut TcpStream, ClientError> {
        match self.stream.as_mut() {
            Some(s) => Ok(s),
            None => Err(ClientError::Unavailable {
                addr: self.addr.clone(),
                reason: "the connection is closed (after close() or an earlier error)".into(),
            }),
        }
    }

    fn set_read_timeout(&mut self, t: Duration) -> Result<(), ClientError> {
        let addr = self.addr.clone();
        self.stream()?
            .set_read_timeout(Some(t))
            .map_err(|e| ClientError::Unavailable {
                addr,
                reason: e.to_string(),
            })
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
        let bytes = payload::as_wire_bytes(values);
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        let encoded = encode_head(msg, bytes.len(), &mut out);
        let timeout = self.timeout;
        let addr = self.addr.clone();
        let result = match encoded {
            Err(source) => Err(ClientError::Protocol { addr, source }),
            Ok(()) => {
                let stream = self.stream()?;
                let r = if bytes.len() <= 64 * 1024 {
                    out.extend_from_slice(&bytes);
                    stream.write_all(&out)
                } else {
                    stream
                        .write_all(&out)
                        .and_then(|()| stream.write_all(&bytes))
                };
                r.map_err(|e| io_err(&addr, "sending a request", timeout, e))
            }
        };
        self.out = out;
        result.map_err(|e| self.broken(e))
    }

    /// Read a header + meta with read timeout `wait` (restored afterwards).
    fn recv_head(
        &mut self,
        max_payload: usize,
        what: &'static str,
        wait: Duration,
    ) -> Result<(FrameHeader, Message), ClientError> {
        let addr = self.addr.clone();
        let stream = self.stream()?;
        let mut head = [0u8; HEADER_LEN];
        let r = stream
            .read_exact(&mut head)
            .map_err(|e| io_err(&addr, what, wait, e))
            .and_then(|()| {
                decode_header(&head, max_payload).map_err(|source| ClientError::Protocol {
                    addr: addr.clone(),
                    source,
                })
            })
            .and_then(|header| {
                let mut meta = [0u8; MAX_META_BYTES];
                let meta = &mut meta[..header.meta_len];
                stream
                    .read_exact(meta)
                    .map_err(|e| io_err(&addr, what, wait, e))?;
                let msg = decode_meta(&header, meta).map_err(|source| ClientError::Protocol {
                    addr: addr.clone(),
                    source,
                })?;
                Ok((header, msg))
            });
        r.map_err(|e| self.broken(e))
    }

    fn recv_small(&mut self, what: &'static str) -> Result<Message, ClientError> {
        let t = self.timeout;
        Ok(self.recv_head(0, what, t)?.1)
    }

    /// Receive a `Params` frame into `out`; `wait` bounds the wait for its header.
    fn recv_params(&mut self, out: &mut [f32], wait: Duration) -> Result<u64, ClientError> {
        self.set_read_timeout(wait)?;
        let head = self.recv_head(MAX_PAYLOAD_BYTES, "Params", wait);
        self.set_read_timeout(self.timeout)?;
        let (header, msg) = head?;
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
        let addr = self.addr.clone();
        let timeout = self.timeout;
        let r = self
            .stream()?
            .read_exact(payload::as_wire_bytes_mut(out))
            .map_err(|e| io_err(&addr, "the parameters", timeout, e));
        r.map_err(|e| self.broken(e))?;
        payload::from_wire_in_place(out);
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

    /// How long to wait for an answer that may wait for a version newer than some.
    fn wait_bound(&self) -> Duration {
        sparktorch_proto::pull_wait(self.round_timeout).saturating_add(self.timeout)
    }

    /// Write the parameters into `out` and return their version. With `newer_than`, the
    /// server answers once its version exceeds it (or with a `Timeout` error, `out` untouched).
    pub fn pull(&mut self, out: &mut [f32], newer_than: Option<u64>) -> Result<u64, ClientError> {
        self.check_len("out", out.len())?;
        let newer = newer_than.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX));
        self.send(&Message::Pull { newer_than: newer }, &[])?;
        let wait = if newer_than.is_some() {
            self.wait_bound()
        } else {
            self.timeout
        };
        self.recv_params(out, wait)
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
            } => {
                self.should_stop = should_stop;
                Ok(PushOutcome {
                    version,
                    should_stop,
                    duplicate,
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
        self.send(&Message::Push(meta), grads)?;
        self.recv_ack()
    }

    /// Push then pull (newer than the push's base version in synchronous mode) in one round
    /// trip. Returns the push outcome and the version pulled.
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
        self.send(&Message::PushPull(meta), grads)?;
        let ack = self.recv_ack()?;
        let wait = if self.mode == Mode::Synchronous {
            self.wait_bound()
        } else {
            self.timeout
        };
        let version = self.recv_params(out, wait)?;
        Ok((ack, version))
    }

    /// Ask the server for the global early-stop flag.
    pub fn should_stop(&mut self) -> Result<bool, ClientError> {
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
        if self.send(&Message::Bye, &[]).is_ok() {
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

/// Resolve and connect, retrying refused connections until `connect_timeout`.
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
        let addrs: Vec<SocketAddr> = match (host, port).to_socket_addrs() {
            Ok(a) => a.collect(),
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
