//! What a server is started with.

use std::path::PathBuf;
use std::time::Duration;

use sparktorch_proto::{Mode, MIN_SECRET_LEN};

use crate::tls::ServerTls;
use crate::PsError;

/// Default cap on connections that have not authenticated yet
/// ([`ServerConfig::max_unauthenticated`]). Workers connect once per task, so a fit needs a
/// handful at a time; the cap bounds what unauthenticated peers can hold (sockets, tasks,
/// handshake buffers).
pub const MAX_UNAUTHENTICATED_CONNECTIONS: usize = 64;

/// What a synchronous round does about a worker that has not pushed within the round timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostWorkerPolicy {
    /// Close the round without it; it is counted as lost (it may re-register later).
    Drop,
    /// Record a fatal `WorkerLost` error and answer every waiter (and every later request)
    /// with it.
    Fail,
}

impl LostWorkerPolicy {
    /// Parse the Python API name (`"drop"`, `"fail"`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "drop" => Some(Self::Drop),
            "fail" => Some(Self::Fail),
            _ => None,
        }
    }
}

/// How a server behaves. Build with [`ServerConfig::new`] and adjust fields.
#[derive(Clone)]
pub struct ServerConfig {
    /// The per-server secret clients prove with HMAC (at least [`MIN_SECRET_LEN`] bytes).
    pub secret: Vec<u8>,
    /// Training style.
    pub mode: Mode,
    /// Worker ids are `0..num_workers`; synchronous rounds and early-stop evaluations wait for
    /// every one of them that is neither done nor lost.
    pub num_workers: u32,
    /// How long a synchronous round (or a pull waiting for a newer version) waits.
    pub round_timeout: Duration,
    /// What happens to a worker missing at the round timeout.
    pub lost_worker_policy: LostWorkerPolicy,
    /// Evaluations without strict improvement before `should_stop`; `None` disables.
    pub early_stop_patience: Option<u32>,
    /// Bound on every read and write of an established connection. The wait for the first
    /// byte of the next request (a worker computing) is bounded by the larger of this and
    /// `round_timeout`.
    pub io_timeout: Duration,
    /// Bound on each handshake step.
    pub handshake_timeout: Duration,
    /// Directory of the server's checkpoint (`<dir>/checkpoint.safetensors`, created if
    /// needed): written every `checkpoint_interval` versions and once more when the server
    /// stops. `None`: no automatic checkpoints.
    pub checkpoint_dir: Option<PathBuf>,
    /// Versions between two automatic checkpoints; 0: only the final one (needs
    /// `checkpoint_dir`).
    pub checkpoint_interval: u64,
    /// TLS for every connection (`None`: plaintext TCP). Clients must pin
    /// [`ServerTls::fingerprint`].
    pub tls: Option<ServerTls>,
    /// Connections that may be open at once before they authenticate (TLS handshake and HMAC
    /// proof). At the cap the server stops accepting: further connections wait in the
    /// kernel's backlog until a slot frees up (an unauthenticated connection holds its slot
    /// at most `handshake_timeout` per handshake step).
    pub max_unauthenticated: usize,
    /// Bounded staleness (SSP) for the async styles (`hogwild`, `async`): a push computed on a
    /// version more than this many versions behind the one it would be applied to is refused
    /// (acknowledged with `stale`, nothing applied) and its worker computes the step again on
    /// the current version. `None`: unbounded (plain asynchronous SGD). Synchronous mode has
    /// staleness 0 by construction and refuses this option.
    pub max_staleness: Option<u64>,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("secret", &"<redacted>")
            .field("mode", &self.mode)
            .field("num_workers", &self.num_workers)
            .field("round_timeout", &self.round_timeout)
            .field("lost_worker_policy", &self.lost_worker_policy)
            .field("early_stop_patience", &self.early_stop_patience)
            .field("io_timeout", &self.io_timeout)
            .field("checkpoint_dir", &self.checkpoint_dir)
            .field("checkpoint_interval", &self.checkpoint_interval)
            .field("tls", &self.tls)
            .field("max_unauthenticated", &self.max_unauthenticated)
            .field("max_staleness", &self.max_staleness)
            .finish()
    }
}

impl ServerConfig {
    /// Defaults of the Python API: one worker, 600 s rounds, drop policy, no early stop, 60 s
    /// I/O timeout, no TLS, [`MAX_UNAUTHENTICATED_CONNECTIONS`].
    pub fn new(secret: impl Into<Vec<u8>>, mode: Mode) -> Self {
        Self {
            secret: secret.into(),
            mode,
            num_workers: 1,
            round_timeout: Duration::from_secs(600),
            lost_worker_policy: LostWorkerPolicy::Drop,
            early_stop_patience: None,
            io_timeout: sparktorch_proto::DEFAULT_IO_TIMEOUT,
            handshake_timeout: sparktorch_proto::HANDSHAKE_TIMEOUT,
            checkpoint_dir: None,
            checkpoint_interval: 0,
            tls: None,
            max_unauthenticated: MAX_UNAUTHENTICATED_CONNECTIONS,
            max_staleness: None,
        }
    }

    /// Check every field; the error names the offending one.
    pub fn validate(&self) -> Result<(), PsError> {
        let bad = |param, reason: String| Err(PsError::InvalidConfig { param, reason });
        if self.secret.len() < MIN_SECRET_LEN {
            return bad(
                "secret",
                format!(
                    "must be at least {MIN_SECRET_LEN} bytes, got {}",
                    self.secret.len()
                ),
            );
        }
        if self.num_workers == 0 {
            return bad("num_workers", "must be >= 1".into());
        }
        if self.round_timeout.is_zero() {
            return bad("round_timeout_s", "must be > 0".into());
        }
        if self.io_timeout.is_zero() {
            return bad("io_timeout_s", "must be > 0".into());
        }
        if self.handshake_timeout.is_zero() {
            return bad("handshake_timeout", "must be > 0".into());
        }
        if self.max_unauthenticated == 0 {
            return bad("max_unauthenticated", "must be >= 1".into());
        }
        if self.max_staleness.is_some() && self.mode == Mode::Synchronous {
            return bad(
                "max_staleness",
                "applies to the asynchronous styles (hogwild, async): synchronous rounds are never stale"
                    .into(),
            );
        }
        if self.checkpoint_interval > 0 && self.checkpoint_dir.is_none() {
            return bad(
                "checkpoint_interval",
                "needs checkpoint_path (the directory to write checkpoints to)".into(),
            );
        }
        Ok(())
    }
}

/// A positive, finite number of seconds as a `Duration`, or an error naming `param`.
pub fn seconds(param: &'static str, s: f64) -> Result<Duration, PsError> {
    if !(s.is_finite() && s > 0.0 && s < 1e9) {
        return Err(PsError::InvalidConfig {
            param,
            reason: format!("must be a positive number of seconds, got {s}"),
        });
    }
    Ok(Duration::from_secs_f64(s))
}
