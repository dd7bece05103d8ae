//! `Push` and `PushPull`: the payload read whole before anything is applied; async pushes
//! (bounded staleness included; a bfloat16 gradient kept as it came and widened as it is
//! stepped) and synchronous ones (queued in the open round).

use std::sync::atomic::Ordering;
use std::time::Instant;

use sparktorch_optim::Grads;
use sparktorch_proto::payload::f32s_as_words;
use sparktorch_proto::{Dtype, ErrorCode, FrameHeader, Message, Mode, PushMeta};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::timeout;
use tracing::{debug, info};

use super::{Conn, End, Refusal};
use crate::lock;
use crate::server::coord::eval_loss;
use crate::server::round::Contribution;
use crate::wire::{read_payload, Bf16Payload};

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// A `Push` or `PushPull`: check it, read its payload whole, apply (or queue) it, answer
    /// (and, for `PushPull`, send the parameters).
    pub(super) async fn push_request(
        &mut self,
        header: &FrameHeader,
        meta: PushMeta,
    ) -> Result<(), End> {
        let inner = self.inner.clone();
        let n = inner.store.len();
        let io = inner.config.io_timeout;
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
        // An async step widens a bfloat16 gradient as it steps (no f32 copy of it); hogwild
        // steps and synchronous averages read f32, widened as the payload is read.
        let keep = inner.config.mode == Mode::Async && header.dtype == Dtype::Bf16;
        let bf16 = if keep {
            Bf16Payload::Keep
        } else {
            Bf16Payload::Widen
        };
        let read = read_payload(
            &mut self.stream,
            header,
            &mut self.grads,
            &mut self.chunk,
            bf16,
        );
        match timeout(io, read).await {
            Err(_) => return Err(End::Timeout("push payload")),
            Ok(Err(e)) => return Err(self.reject(e).await),
            Ok(Ok(())) => {}
        }
        // The whole frame is in and valid: now (and only now) act on it.
        let ack = match self.push(&meta, keep).await {
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

    /// Apply (or queue, in synchronous mode) the gradients in `self.grads`: `f32` values, or
    /// with `bf16_words` (async mode only) the push's bfloat16 wire words in its first half.
    async fn push(&mut self, p: &PushMeta, bf16_words: bool) -> Result<Message, Refusal> {
        let inner = self.inner.clone();
        if inner.config.mode == Mode::Synchronous {
            return self.push_sync(p).await;
        }
        // The staleness recorded is the one measured when the step is applied (below).
        let fresh = lock(&inner.coord).check_push(p, inner.store.version())?;
        if fresh.is_none() {
            return Ok(self.duplicate(p));
        }
        // The version the worker computed on: what it says, and never newer than what this
        // connection last delivered to it.
        let base = match self.last_pulled {
            Some(v) => v.min(p.base_version),
            None => p.base_version,
        };
        let max_staleness = inner.config.max_staleness;
        if max_staleness.is_some() {
            self.wait_for_starving(p.worker).await;
        }
        let grads = std::mem::take(&mut self.grads);
        let store_owner = inner.clone();
        let (worker, step, attempt) = (p.worker, p.step, p.attempt);
        let (grads, outcome) = tokio::task::spawn_blocking(move || {
            let gradient = if bf16_words {
                Grads::Bf16(&f32s_as_words(&grads)[..grads.len()])
            } else {
                Grads::F32(&grads)
            };
            // Bounded staleness is checked against the steps before this one: the version it
            // applies to (under the step lock, async), or the steps begun, this one's place
            // taken atomically (hogwild).
            let admit = |v: u64| max_staleness.is_none_or(|k| v.saturating_sub(base) <= k);
            let r = store_owner.store.try_apply_then(gradient, admit, |_| {
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
                coord.starve(p.worker);
                return Ok(Message::PushAck {
                    version: current,
                    should_stop: coord.should_stop,
                    duplicate: false,
                    stale: true,
                });
            }
        };
        let version = applied.version;
        if max_staleness.is_some() {
            inner.feed(p.worker);
        }
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

    /// Bounded staleness: while another worker starves (its last push was refused as too
    /// stale), hold this push until that worker's next push got in, it left or registered
    /// again, or a quarter of `io_timeout_s` passed since its refusal (a lost task is not
    /// waited for longer, and the held client's own exchange deadline is not reached).
    /// Starving workers are served oldest first. Refusals thus never starve a slow worker:
    /// after one, the others wait for it.
    async fn wait_for_starving(&mut self, worker: u32) {
        let inner = self.inner.clone();
        let patience = inner.config.io_timeout / 4;
        let mut fed = inner.fed.subscribe();
        let mut stop = inner.stop.subscribe();
        loop {
            let oldest = lock(&inner.coord).starving_ahead_of(worker);
            let Some((other, since)) = oldest else {
                return;
            };
            let left = (since + patience).saturating_duration_since(Instant::now());
            if left.is_zero() {
                debug!(
                    worker = other,
                    "starving worker not back in time: no longer waited for"
                );
                inner.feed(other);
                continue;
            }
            tokio::select! {
                _ = timeout(left, fed.changed()) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
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
}
