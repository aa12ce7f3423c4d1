//! Sending batches. Each batch the coalescer hands over runs as its own
//! task: through the `Upstream` service (circuit, per-API gate, counted),
//! until every item in it settles, splitting it in halves when the vendor
//! refuses it as a whole so the bad account is isolated.
//!
//! - `active`: whether this replica is the one that may call upstream;
//! - `gate`: the per-API limiter, in-flight cap and pause;
//! - `circuit`: stops everything while our credentials are rejected;
//! - `retry`: the one classification of failures, and backoff;
//! - `upstream`: the attempts, for batches and reads alike;
//! - `settle`: what each item of an answered batch becomes.

mod active;
mod circuit;
mod gate;
mod retry;
mod settle;
mod upstream;

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::coalesce::{Backlog, Batch, Input};
use crate::domain::ItemResult;
use crate::telemetry::Metrics;
pub use active::{Active, HANDOVER_PAUSE};
pub use circuit::Circuit;
use retry::{Decision, Retries};
use settle::Settler;
pub use upstream::{ReadError, Upstream};

/// Sends batches and settles their items.
pub struct Dispatcher {
    upstream: Arc<Upstream>,
    backlog: Arc<Backlog>,
    settler: Settler,
    metrics: Metrics,
    stop: CancellationToken,
}

impl Dispatcher {
    pub fn new(
        upstream: Arc<Upstream>,
        backlog: Arc<Backlog>,
        retries: mpsc::UnboundedSender<Input>,
        metrics: Metrics,
        stop: CancellationToken,
    ) -> Arc<Dispatcher> {
        let settler = Settler {
            metrics: metrics.clone(),
            retries,
            max_attempts: upstream.settings().max_attempts,
        };
        Arc::new(Dispatcher {
            upstream,
            backlog,
            settler,
            metrics,
            stop,
        })
    }

    /// Takes batches until the coalescer closes or `stop` fires; each batch
    /// runs as its own task on `tasks`.
    pub async fn run(self: Arc<Self>, mut batches: mpsc::Receiver<Batch>, tasks: TaskTracker) {
        loop {
            tokio::select! {
                b = batches.recv() => match b {
                    Some(b) => {
                        let me = self.clone();
                        let span = tracing::info_span!(
                            "batch",
                            api = b.api().name(),
                            target = %b.key(),
                            items = b.size(),
                        );
                        tasks.spawn(tracing::Instrument::instrument(
                            async move { me.run_batch(b).await },
                            span,
                        ));
                    }
                    None => break,
                },
                _ = self.stop.cancelled() => break,
            }
        }
    }

    async fn run_batch(&self, batch: Batch) {
        let mut fresh = true;
        let mut work = vec![batch];
        while let Some(b) = work.pop() {
            let first = std::mem::take(&mut fresh);
            if let Some((a, b)) = self.drive(b, first).await {
                work.push(b);
                work.push(a);
            }
        }
    }

    /// Sends one batch until it settles. Returns two halves when the batch
    /// must be split to isolate a bad account. Returns `None` also when
    /// stopped: unsettled items stay in the inbox and come back.
    /// `first`: the batch's first attempt, counted in the coalescer's
    /// backlog until it passes the gate.
    async fn drive(&self, batch: Batch, mut first: bool) -> Option<(Batch, Batch)> {
        let api = batch.api();
        let mut retries = Retries::default();
        loop {
            let leaves_backlog = std::mem::take(&mut first);
            let attempt = self
                .upstream
                .attempt(
                    api,
                    Some(batch.size()),
                    || {
                        if leaves_backlog {
                            self.backlog.started(api);
                        }
                    },
                    || self.upstream.send(batch.request()),
                )
                .await?;
            let err = match attempt.result {
                Ok(outcome) => {
                    self.upstream.succeeded(attempt.pass);
                    self.settler.outcome(batch, outcome);
                    return None;
                }
                Err(e) => e,
            };
            let decision =
                self.upstream
                    .failed(api, attempt.pass, attempt.started, &err, &mut retries);
            match decision {
                Decision::CredentialsRejected => {}
                Decision::RateLimited => {
                    self.metrics
                        .items(api, ItemResult::Retried, batch.item_count());
                }
                Decision::Backoff(wait) => {
                    self.metrics
                        .items(api, ItemResult::Retried, batch.item_count());
                    if !self.upstream.sleep(wait).await {
                        return None;
                    }
                }
                Decision::GiveUp(reason) => {
                    self.settler
                        .dead_letter_batch(batch, reason, &err.to_string());
                    return None;
                }
                Decision::Moot => {
                    self.settler.all(batch, ItemResult::Noop);
                    return None;
                }
                Decision::Refused(reason) => {
                    return match batch.split() {
                        Ok(halves) => {
                            tracing::info!(api = api.name(), code = %err.metric_code(), "batch refused as a whole; splitting to isolate the cause");
                            Some(halves)
                        }
                        Err(single) => {
                            self.settler
                                .dead_letter_batch(single, reason, &err.to_string());
                            None
                        }
                    };
                }
            }
        }
    }
}
