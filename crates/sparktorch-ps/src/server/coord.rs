//! Workers, idempotence, early stopping, history and staleness: the small state every
//! connection updates, under one short-held mutex.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use sparktorch_proto::{ErrorCode, PushMeta};
use tracing::info;

use super::conn::Refusal;

/// Number of recent losses averaged per worker in [`crate::Stats::recent_loss`].
const RECENT_LOSSES: usize = 10;

/// History entries kept (the newest ones): 2^20 entries of 32 bytes, 32 MiB at most.
pub const HISTORY_CAP: usize = 1 << 20;

/// One history entry: `(worker, step, loss, val_loss)` of an applied push.
pub type HistoryEntry = (u32, u64, f64, f64);

/// Where a worker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Status {
    /// Registered and expected (or not yet registered).
    Live,
    /// Said `Bye`.
    Done,
    /// Missed a synchronous round (drop policy).
    Lost,
}

/// What the server remembers per worker.
#[derive(Debug)]
pub(super) struct Worker {
    /// The newest attempt registered; older ones are refused.
    pub(super) attempt: u32,
    /// Highest step applied (or accepted into a round) + 1: the resume step.
    pub(super) next_step: u64,
    /// Where the worker is.
    pub(super) status: Status,
    /// Pushes applied.
    pub(super) updates: u64,
    /// Version of the parameters last sent to it (for staleness).
    pub(super) last_pulled: Option<u64>,
    /// Synchronous mode: the version of the open round its gradient waits in (`None`: none
    /// waits). A pull from the worker meanwhile waits for that round to close.
    pub(super) round_base: Option<u64>,
    /// Its last few training losses.
    pub(super) recent: VecDeque<f64>,
}

impl Worker {
    /// A worker seen for the first time (live, nothing applied).
    pub(super) fn new(attempt: u32) -> Self {
        Self {
            attempt,
            next_step: 0,
            status: Status::Live,
            updates: 0,
            last_pulled: None,
            round_base: None,
            recent: VecDeque::new(),
        }
    }
}

/// Workers, early stopping, history: small state under one short-held mutex.
#[derive(Default)]
pub(super) struct Coord {
    /// Every worker that ever registered.
    pub(super) workers: BTreeMap<u32, Worker>,
    /// Latest loss (validation loss when reported) per worker since the last evaluation.
    pub(super) pending_losses: BTreeMap<u32, f64>,
    /// Best evaluated mean loss.
    pub(super) best_loss: Option<f64>,
    /// Evaluations since the last strict improvement.
    pub(super) bad_evaluations: u32,
    /// Global early stop reached.
    pub(super) should_stop: bool,
    /// `(worker, step, loss, val_loss)` per applied push: the newest [`HISTORY_CAP`] ones.
    /// Only [`Coord::record`] adds to it, keeping `history_total` in step.
    history: VecDeque<HistoryEntry>,
    /// Entries ever recorded (the index the next one gets).
    history_total: u64,
    /// Sum of staleness over applied pushes.
    pub(super) staleness_sum: u64,
    /// Largest staleness.
    pub(super) staleness_max: u64,
    /// Number of staleness samples.
    pub(super) staleness_count: u64,
    /// A fatal condition; every later request is answered with it.
    pub(super) fatal: Option<String>,
    /// Bounded staleness: workers whose last push was refused as too stale, oldest first, with
    /// when. While one is here, the other workers' pushes wait (bounded) so that its next push
    /// gets in: refusals never starve a slow worker.
    pub(super) starving: VecDeque<(u32, Instant)>,
}

impl Coord {
    pub(super) fn is_live(&self, w: u32) -> bool {
        self.workers
            .get(&w)
            .is_none_or(|x| x.status == Status::Live)
    }

    pub(super) fn live(&self, num_workers: u32) -> Vec<u32> {
        (0..num_workers).filter(|&w| self.is_live(w)).collect()
    }

    /// Judge a push. `Ok(None)`: a duplicate. `Ok(Some(staleness))`: accept (the step is
    /// reserved).
    pub(super) fn check_push(
        &mut self,
        p: &PushMeta,
        version: u64,
    ) -> Result<Option<u64>, Refusal> {
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
        // Client-sent numbers are checked, never wrapped: a step of u64::MAX would make the
        // resume step 0 again, and every earlier step new.
        let Some(next_step) = p.step.checked_add(1) else {
            return Err((
                ErrorCode::Protocol,
                format!("step {} is out of range (no step can follow it)", p.step),
            ));
        };
        if w.status != Status::Live {
            // A worker dropped for missing a round (it was slow, not dead), or one that said
            // Bye and pushes again: it takes part again from this push on.
            info!(worker = p.worker, attempt = p.attempt, "worker rejoined");
            w.status = Status::Live;
        }
        w.next_step = next_step;
        let base = w.last_pulled.unwrap_or(p.base_version);
        Ok(Some(version.saturating_sub(base)))
    }

    /// Take back what [`Coord::check_push`] booked for a push that was then refused (bounded
    /// staleness): its step is not done, so the worker (or its retry) may push it again.
    pub(super) fn undo_step(&mut self, p: &PushMeta) {
        if let Some(w) = self.workers.get_mut(&p.worker) {
            if w.next_step == p.step.saturating_add(1) {
                w.next_step = p.step;
            }
        }
    }

    /// `worker` was refused as too stale: it goes to the back of the starving queue (once).
    pub(super) fn starve(&mut self, worker: u32) {
        if !self.starving.iter().any(|(w, _)| *w == worker) {
            self.starving.push_back((worker, Instant::now()));
        }
    }

    /// `worker` no longer starves (its push got in, it left, or it registered again); true if
    /// it did.
    pub(super) fn fed(&mut self, worker: u32) -> bool {
        let before = self.starving.len();
        self.starving.retain(|(w, _)| *w != worker);
        self.starving.len() != before
    }

    /// The starving worker that `worker`'s push must wait for, with when it was refused: the
    /// oldest one, unless `worker` is that one (the queue's head never waits, so two starving
    /// workers never wait for each other).
    pub(super) fn starving_ahead_of(&self, worker: u32) -> Option<(u32, Instant)> {
        self.starving.front().copied().filter(|(w, _)| *w != worker)
    }

    /// Book an applied (or round-accepted) push.
    pub(super) fn record(&mut self, p: &PushMeta, staleness: u64) {
        if self.history.len() == HISTORY_CAP {
            self.history.pop_front();
        }
        self.history
            .push_back((p.worker, p.step, p.loss, p.val_loss));
        self.history_total += 1;
        if let Some(w) = self.workers.get_mut(&p.worker) {
            w.updates += 1;
            if w.recent.len() == RECENT_LOSSES {
                w.recent.pop_front();
            }
            w.recent.push_back(p.loss);
        }
        self.staleness_sum = self.staleness_sum.saturating_add(staleness);
        self.staleness_count += 1;
        self.staleness_max = self.staleness_max.max(staleness);
    }

    /// The held history entries of index `since` and later (entry `i` is the `i`-th push
    /// recorded; the oldest are no longer held past [`HISTORY_CAP`]), and the index after the
    /// last one (the `since` of the next incremental read).
    pub(super) fn history_since(&self, since: u64) -> (u64, Vec<HistoryEntry>) {
        let first = self.history_total - self.history.len() as u64;
        let skip = usize::try_from(since.saturating_sub(first)).unwrap_or(usize::MAX);
        let new = self.history.iter().skip(skip).copied().collect();
        (self.history_total, new)
    }

    /// Entries ever recorded.
    pub(super) fn history_total(&self) -> u64 {
        self.history_total
    }

    /// One early-stopping evaluation of a mean loss.
    pub(super) fn evaluate(&mut self, mean: f64, patience: Option<u32>) {
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
    pub(super) fn maybe_evaluate(&mut self, num_workers: u32, patience: Option<u32>) {
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
pub(super) fn eval_loss(p: &PushMeta) -> f64 {
    if p.val_loss.is_nan() {
        p.loss
    } else {
        p.val_loss
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(step: u64) -> PushMeta {
        PushMeta {
            worker: 0,
            attempt: 0,
            step,
            batch_size: 1,
            loss: step as f64,
            val_loss: f64::NAN,
            base_version: 0,
        }
    }

    #[test]
    fn history_is_a_bounded_ring_read_incrementally() {
        let mut c = Coord::default();
        for s in 0..3 {
            c.record(&push(s), 0);
        }
        let (next, all) = c.history_since(0);
        assert_eq!(
            (next, all.iter().map(|e| e.1).collect::<Vec<_>>()),
            (3, vec![0, 1, 2])
        );
        let (next, new) = c.history_since(2);
        assert_eq!(
            (next, new.iter().map(|e| e.1).collect::<Vec<_>>()),
            (3, vec![2])
        );
        assert_eq!(c.history_since(3), (3, vec![]));
        assert_eq!(c.history_since(99), (3, vec![]));
        for s in 3..(HISTORY_CAP as u64 + 5) {
            c.record(&push(s), 0);
        }
        // Only the newest HISTORY_CAP entries are held; a read from before them starts at the
        // oldest one held.
        let total = HISTORY_CAP as u64 + 5;
        let (next, all) = c.history_since(0);
        assert_eq!((next, all.len(), all[0].1), (total, HISTORY_CAP, 5));
        let (next, new) = c.history_since(total - 2);
        assert_eq!(
            (next, new.iter().map(|e| e.1).collect::<Vec<_>>()),
            (total, vec![total - 2, total - 1])
        );
    }

    #[test]
    fn early_stopping_counts_non_improvements() {
        let mut c = Coord::default();
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
