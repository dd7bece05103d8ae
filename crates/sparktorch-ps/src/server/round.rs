//! Synchronous rounds: gradients wait per worker; when every live worker has pushed (or left),
//! their batch-size weighted average (f64, worker-id order) is applied in one optimizer step.
//! A timer applies the lost-worker policy to a round that stays open too long.

use std::collections::BTreeMap;
use std::sync::Arc;

use rayon::prelude::*;
use tracing::{debug, warn};

use sparktorch_proto::ErrorCode;

use super::conn::Refusal;
use super::coord::{Status, Worker};
use super::Inner;
use crate::config::LostWorkerPolicy;
use crate::lock;

/// A gradient waiting for its synchronous round to close.
pub(super) struct Contribution {
    /// Weight in the average.
    pub(super) batch_size: u64,
    /// The gradients.
    pub(super) grads: Vec<f32>,
    /// The loss to evaluate for early stopping (validation loss when reported).
    pub(super) loss: f64,
    /// The worker's step (booked as applied when the round closes).
    pub(super) step: u64,
    /// The worker's attempt.
    pub(super) attempt: u32,
}

/// The open synchronous round.
#[derive(Default)]
pub(super) struct Round {
    /// Rounds closed so far.
    pub(super) number: u64,
    /// Gradients received in this round, by worker id (so averaging runs in worker order).
    /// Added to only by [`Round::add`], which keeps `batch_total` in step.
    pub(super) pending: BTreeMap<u32, Contribution>,
    /// Sum of the pending contributions' batch sizes (checked when each is added, so the
    /// average never overflows).
    pub(super) batch_total: u64,
    /// The round's lost-worker timer, aborted when the round closes in time.
    pub(super) timer: Option<tokio::task::AbortHandle>,
    /// The averaged gradient's buffer, reused by every round (allocated by the first).
    average: Vec<f32>,
}

impl Round {
    /// Refuse a batch size that would overflow the round's total (batch sizes are
    /// client-sent numbers).
    pub(super) fn check_batch(&self, batch_size: u64) -> Result<(), Refusal> {
        match self.batch_total.checked_add(batch_size) {
            Some(_) => Ok(()),
            None => Err((
                ErrorCode::Protocol,
                format!(
                    "batch_size {batch_size} is out of range: the round's batch sizes would add \
                     up to more than {}",
                    u64::MAX
                ),
            )),
        }
    }

    /// Add a worker's contribution (its batch size passed [`Round::check_batch`]).
    pub(super) fn add(&mut self, worker: u32, c: Contribution) {
        self.batch_total = self.batch_total.saturating_add(c.batch_size);
        if let Some(old) = self.pending.insert(worker, c) {
            self.batch_total = self.batch_total.saturating_sub(old.batch_size);
        }
    }

    /// Take the pending contributions, leaving the round empty.
    fn take(&mut self) -> BTreeMap<u32, Contribution> {
        self.batch_total = 0;
        std::mem::take(&mut self.pending)
    }
}

/// The batch-size weighted average of the round's gradients, written into `out` (resized to
/// `len`; its allocation is reused): accumulated in `f64` in worker-id order, then cast to
/// `f32`. With every batch size 0 the plain mean is taken.
pub(super) fn weighted_average(
    pending: &BTreeMap<u32, Contribution>,
    len: usize,
    out: &mut Vec<f32>,
) {
    // u128: no overflow for any number of u64 batch sizes (Round::add also bounds the sum).
    let total: u128 = pending.values().map(|c| u128::from(c.batch_size)).sum();
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
    // Every element is written below: only a new length needs filling.
    if out.len() != len {
        out.clear();
        out.resize(len, 0.0);
    }
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
}

impl Inner {
    /// Close the synchronous round: average, step once, bump the version, evaluate early
    /// stopping over the round's losses, wake waiting pulls.
    pub(super) async fn close_round(self: &Arc<Self>, round: &mut Round) {
        let pending = round.take();
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
        let mut avg = std::mem::take(&mut round.average);
        let stepped = tokio::task::spawn_blocking(move || {
            weighted_average(&pending, inner.store.len(), &mut avg);
            let version = inner.store.apply_then(&avg, |_| {
                for (&w, c) in &pending {
                    inner.applied(w, c.step, c.attempt);
                }
            });
            (version, pending, avg)
        })
        .await;
        match stepped {
            Ok((version, pending, avg)) => {
                round.average = avg;
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
                    for w in &workers {
                        if let Some(x) = coord.workers.get_mut(w) {
                            x.round_base = None;
                        }
                    }
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
                self.after_step(version);
            }
            Err(e) => self.fail(format!("optimizer step panicked: {e}")),
        }
    }

    /// If every live worker has pushed into the open round, close it.
    pub(super) async fn close_round_if_complete(self: &Arc<Self>, round: &mut Round) {
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
    pub(super) async fn round_timer(self: Arc<Self>, number: u64) {
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
                        let entry = coord.workers.entry(w).or_insert_with(|| Worker::new(0));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn contrib(b: u64, g: Vec<f32>) -> Contribution {
        Contribution {
            batch_size: b,
            grads: g,
            loss: 0.0,
            step: 0,
            attempt: 0,
        }
    }

    #[test]
    fn weighted_average_is_f64_in_worker_order() {
        let mut p = BTreeMap::new();
        p.insert(1, contrib(3, vec![1.0, 0.1]));
        p.insert(0, contrib(1, vec![5.0, 0.7]));
        let mut got = Vec::new();
        weighted_average(&p, 2, &mut got);
        let want0 = ((1.0 * 5.0f64) + 3.0 * 1.0f64) / 4.0;
        let want1 = ((1.0 * f64::from(0.7f32)) + 3.0 * f64::from(0.1f32)) / 4.0;
        assert_eq!(got, vec![want0 as f32, want1 as f32]);
        // All-zero batch sizes: the plain mean.
        let mut z = BTreeMap::new();
        z.insert(0, contrib(0, vec![2.0]));
        z.insert(1, contrib(0, vec![4.0]));
        let buf = got.as_ptr();
        weighted_average(&z, 1, &mut got);
        assert_eq!(got, vec![3.0]);
        // The buffer is reused, not reallocated.
        assert_eq!(got.as_ptr(), buf);
    }
}
