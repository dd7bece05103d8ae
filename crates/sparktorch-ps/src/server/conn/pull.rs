//! `Pull` (and the pull half of `PushPull`): wait for a newer version when asked (or for the
//! round holding this worker's gradient), then send the parameters.

use sparktorch_proto::{Dtype, ErrorCode, Message};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::timeout;

use super::{Conn, End};
use crate::framing::Values;
use crate::lock;

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// Answer a pull with the current parameters as `dtype`, once newer than `newer_than`.
    pub(super) async fn pull(&mut self, newer_than: i64, dtype: Dtype) -> Result<(), End> {
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
        // read chunk by chunk as they are sent: no model-size copy on this tokio worker. While
        // clients pull bfloat16, steps also write each version's bfloat16 copy, which such
        // pulls then send as it is (a pull of a version stepped without one converts chunk by
        // chunk).
        if dtype == Dtype::Bf16 {
            inner.store.note_bf16_pull();
        }
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
        self.send_with(&msg, Values::View(&view), dtype).await?;
        self.last_pulled = Some(version);
        Ok(())
    }
}
