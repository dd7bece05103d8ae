//! A worker's session: `Register`, `StatsRequest`, `EarlyStopRequest`, `Bye`.

use sparktorch_proto::{ErrorCode, Message, Mode};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::info;

use super::{Conn, End, Refusal};
use crate::lock;
use crate::server::coord::{Coord, Status, Worker};
use crate::server::Server;

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub(super) async fn register(&mut self, worker: u32, attempt: u32) -> Result<(), End> {
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
        // A new attempt computes afresh: nobody holds pushes back for an old one.
        inner.feed(worker);
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

    /// `StatsRequest`: a few counters.
    pub(super) async fn stats_request(&mut self) -> Result<(), End> {
        let s = Server {
            inner: self.inner.clone(),
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

    /// `EarlyStopRequest`: the global early-stopping state.
    pub(super) async fn early_stop_request(&mut self) -> Result<(), End> {
        let msg = {
            let c = lock(&self.inner.coord);
            Message::EarlyStop {
                should_stop: c.should_stop,
                best_loss: c.best_loss.unwrap_or(f64::NAN),
                bad_evaluations: c.bad_evaluations,
            }
        };
        self.send(&msg).await
    }

    /// The worker leaves: it no longer holds up synchronous rounds nor evaluations.
    pub(super) async fn bye(&mut self) {
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
            {
                let mut coord = lock(&inner.coord);
                mark(&mut coord);
                coord.maybe_evaluate(inner.config.num_workers, inner.config.early_stop_patience);
            }
            inner.feed(w);
        }
    }
}
