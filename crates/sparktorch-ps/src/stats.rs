//! A snapshot of a server's counters (what `ParameterServer.stats()` returns).

use std::collections::BTreeMap;

use sparktorch_proto::Mode;

/// The server's counters at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    /// Optimizer steps applied.
    pub version: u64,
    /// Training style.
    pub mode: Mode,
    /// Pushes applied (synchronous: accepted into a round).
    pub updates: u64,
    /// Replayed pushes acknowledged without applying.
    pub duplicates: u64,
    /// Synchronous pushes whose gradient was computed on a version older than the open round
    /// (a worker dropped for missing a round, pushing late): acknowledged, not averaged.
    pub stale_discarded: u64,
    /// Asynchronous pushes refused for exceeding `max_staleness` (recomputed by their workers).
    pub stale_refused: u64,
    /// Model-size buffers the store allocated after start (async / synchronous: only when
    /// every recycled buffer was still being sent by a pull).
    pub store_allocations: u64,
    /// Pushes applied per worker.
    pub updates_per_worker: BTreeMap<u32, u64>,
    /// Per worker: highest step applied + 1 (what `resume_step` answers).
    pub steps_per_worker: BTreeMap<u32, u64>,
    /// Workers of `0..num_workers` neither done nor lost.
    pub workers_live: u32,
    /// Workers that said `Bye`.
    pub workers_done: u32,
    /// Workers dropped for missing a synchronous round.
    pub workers_lost: u32,
    /// Connections open now.
    pub connections: u64,
    /// Frames refused as malformed, oversized, truncated or out of place.
    pub rejected_frames: u64,
    /// Handshakes refused (wrong or missing proof of the secret, other protocol version).
    pub auth_failures: u64,
    /// Bytes read from clients.
    pub bytes_in: u64,
    /// Bytes written to clients.
    pub bytes_out: u64,
    /// Per worker: mean of its last 10 losses.
    pub recent_loss: BTreeMap<u32, f64>,
    /// Mean staleness of applied pushes (server version at push minus the version the worker
    /// last pulled); 0 before any push.
    pub staleness_mean: f64,
    /// Largest staleness seen.
    pub staleness_max: u64,
    /// History entries ever recorded (the history holds the newest
    /// [`crate::server::HISTORY_CAP`] of them).
    pub history_total: u64,
    /// Global early stop reached.
    pub should_stop: bool,
    /// Best evaluated loss (NaN before the first evaluation).
    pub best_loss: f64,
    /// A fatal condition (e.g. a lost worker under the "fail" policy).
    pub error: Option<String>,
    /// Checkpoint writes that failed (automatic and final ones; each is logged).
    pub checkpoint_errors: u64,
    /// Version of the last checkpoint written (`None`: none yet).
    pub last_checkpoint_version: Option<u64>,
    /// File of the last checkpoint written.
    pub last_checkpoint_path: Option<String>,
}
