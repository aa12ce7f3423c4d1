//! Sending batches. The batches of each API wait for its gate as data, in
//! that API's lane, not as a parked task each (a backlog of single-member
//! batches held that way took hundreds of MiB): the lane takes its next
//! batch only once the gate admits a call, and runs that one call as a task,
//! so tasks exist only for calls in flight. Lanes are independent, so a
//! saturated API never holds up another's batches. A batch goes through the
//! `Upstream` service (circuit, per-API gate, counted) until every item in
//! it settles, split in halves when the vendor refuses it as a whole so the
//! bad account is isolated.
//!
//! - `active`: whether this replica is the one that may call upstream;
//! - `gate`: the per-API limiter, in-flight cap and pause;
//! - `circuit`: stops everything while our credentials are rejected;
//! - `retry`: the one classification of failures, and backoff;
//! - `upstream`: the attempts, for batches and reads alike;
//! - `settle`: what each item of an answered batch becomes.

mod circuit;
mod fifo;
mod gate;
mod retry;
mod settle;
mod upstream;

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::coalesce::{Backlog, Batch, BatchKey, Input};
pub use crate::domain::active::{Active, HANDOVER_PAUSE};
use crate::domain::{Api, ItemResult};
use crate::fate::WaitingFor;
use crate::telemetry::Metrics;
pub use circuit::Circuit;
use fifo::Fifo;
use retry::{Decision, Retries};
use settle::{Call, Settler};
use upstream::Admission;
pub use upstream::{ReadError, Upstream};

/// Sends batches and settles their items.
pub struct Dispatcher {
    upstream: Arc<Upstream>,
    backlog: Arc<Backlog>,
    /// One per API a batch may be for, in `BatchKey::APIS` order.
    lanes: Vec<Lane>,
    settler: Settler,
    metrics: Metrics,
    stop: CancellationToken,
}

/// A batch that goes again after a failed attempt, with that attempt's
/// retry state.
struct Again {
    batch: Batch,
    retries: Retries,
}

/// A batch backing off until `at`.
struct Later {
    at: Instant,
    /// Tells apart equal `at`s, first come first.
    seq: u64,
    again: Again,
}

impl PartialEq for Later {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Later {}
impl PartialOrd for Later {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Later {
    /// Reversed: the heap's top is the earliest.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// One API's batches waiting for its gate. Batches going again (a refused
/// batch's halves, one that met a rate limit or a closed circuit) go first,
/// then those whose backoff is over, then fresh ones in the order the
/// coalescer sent them.
#[derive(Default)]
struct Queue {
    again: VecDeque<Again>,
    later: BinaryHeap<Later>,
    fresh: Fifo<Batch>,
    seq: u64,
}

/// What the lane takes next.
enum Next {
    Fresh(Batch),
    Again(Again),
}

impl Queue {
    fn push_fresh(&mut self, b: Batch) {
        b.mark(WaitingFor::Limiter);
        self.fresh.push_back(b);
    }

    fn ready(&self, now: Instant) -> bool {
        !self.again.is_empty()
            || !self.fresh.is_empty()
            || self.later.peek().is_some_and(|l| l.at <= now)
    }

    fn take(&mut self, now: Instant) -> Option<Next> {
        if let Some(a) = self.again.pop_front() {
            return Some(Next::Again(a));
        }
        if self.later.peek().is_some_and(|l| l.at <= now) {
            return self.later.pop().map(|l| Next::Again(l.again));
        }
        self.fresh.pop_front().map(Next::Fresh)
    }
}

struct Lane {
    api: Api,
    queue: Mutex<Queue>,
    wake: Notify,
}

impl Lane {
    fn push(&self, f: impl FnOnce(&mut Queue)) {
        f(&mut self.queue.lock());
        self.wake.notify_one();
    }
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
        let lanes = BatchKey::APIS
            .into_iter()
            .map(|api| Lane {
                api,
                queue: Mutex::default(),
                wake: Notify::new(),
            })
            .collect();
        Arc::new(Dispatcher {
            upstream,
            backlog,
            lanes,
            settler,
            metrics,
            stop,
        })
    }

    fn lane(&self, api: Api) -> &Lane {
        self.lanes
            .iter()
            .find(|l| l.api == api)
            .expect("every API a batch may be for has a lane")
    }

    /// Takes batches into their lanes until the coalescer closes or `stop`
    /// fires; the lanes run on `tasks` until `stop`.
    pub async fn run(self: Arc<Self>, mut batches: mpsc::Receiver<Batch>, tasks: TaskTracker) {
        for api in BatchKey::APIS {
            tasks.spawn(self.clone().run_lane(api, tasks.clone()));
        }
        loop {
            tokio::select! {
                b = batches.recv() => match b {
                    Some(b) => self.lane(b.api()).push(|q| q.push_fresh(b)),
                    None => break,
                },
                _ = self.stop.cancelled() => break,
            }
        }
    }

    /// One API's lane: waits for a batch that may go, then for the gate,
    /// then runs the call. What is queued when `stop` fires stays unsettled
    /// in the inbox and comes back.
    async fn run_lane(self: Arc<Self>, api: Api, tasks: TaskTracker) {
        let lane = self.lane(api);
        loop {
            loop {
                let now = Instant::now();
                let next_due = {
                    let q = lane.queue.lock();
                    if q.ready(now) {
                        break;
                    }
                    q.later.peek().map(|l| l.at)
                };
                tokio::select! {
                    _ = lane.wake.notified() => {}
                    _ = sleep_until_opt(next_due) => {}
                    _ = self.stop.cancelled() => return,
                }
            }
            let Some(admission) = self.upstream.admit(api).await else {
                return;
            };
            // Only this lane takes from its queue, and what was ready stays
            // ready, so there is work for the admission.
            let Some(next) = lane.queue.lock().take(Instant::now()) else {
                continue;
            };
            let again = match next {
                Next::Fresh(batch) => {
                    self.backlog.started(api);
                    Again {
                        batch,
                        retries: Retries::default(),
                    }
                }
                Next::Again(a) => a,
            };
            let span = tracing::info_span!(
                "batch",
                api = api.name(),
                target = %again.batch.key(),
                items = again.batch.size(),
            );
            let me = self.clone();
            tasks.spawn(tracing::Instrument::instrument(
                async move { me.attempt(again, admission).await },
                span,
            ));
        }
    }

    /// One attempt of one batch. What is left to do goes back to its lane:
    /// the halves of a refused batch, or the batch itself to go again.
    async fn attempt(&self, work: Again, admission: Admission) {
        let Again { batch, mut retries } = work;
        let api = batch.api();
        let lane = self.lane(api);
        let attempt = self
            .upstream
            .call(
                api,
                admission,
                Some(batch.size()),
                self.upstream.send(batch.request()),
            )
            .await;
        let err = match attempt.result {
            Ok(outcome) => {
                self.upstream.succeeded(attempt.pass);
                self.settler
                    .outcome(batch, outcome, retries.failed_calls() + 1);
                return;
            }
            Err(e) => e,
        };
        let decision = self
            .upstream
            .failed(api, attempt.pass, attempt.started, &err, &mut retries);
        match decision {
            // It waits at the circuit (or the paused gate), first in line.
            Decision::CredentialsRejected | Decision::RateLimited => {
                if decision == Decision::RateLimited {
                    self.metrics
                        .items(api, ItemResult::Retried, batch.item_count());
                }
                lane.push(|q| q.again.push_front(Again { batch, retries }));
            }
            Decision::Backoff(wait) => {
                self.metrics
                    .items(api, ItemResult::Retried, batch.item_count());
                let at = Instant::now() + wait;
                batch.mark(WaitingFor::RetryBackoff);
                lane.push(|q| {
                    q.seq += 1;
                    let seq = q.seq;
                    q.later.push(Later {
                        at,
                        seq,
                        again: Again { batch, retries },
                    });
                });
            }
            Decision::GiveUp(reason) => {
                let detail = err.to_string();
                let call = Call::failed(&err, retries.failed_calls());
                self.settler.dead_letter_batch(batch, reason, &detail, call);
            }
            Decision::Moot => {
                let call = Call::failed(&err, retries.failed_calls());
                self.settler.all(batch, ItemResult::Noop, call);
            }
            Decision::Refused(reason) => match batch.split() {
                Ok((a, b)) => {
                    tracing::info!(api = api.name(), code = %err.metric_code(), "batch refused as a whole; splitting to isolate the cause");
                    // Both halves next, the first half first; each with
                    // retries of its own.
                    lane.push(|q| {
                        q.again.push_front(Again {
                            batch: b,
                            retries: Retries::default(),
                        });
                        q.again.push_front(Again {
                            batch: a,
                            retries: Retries::default(),
                        });
                    });
                }
                Err(single) => {
                    let detail = err.to_string();
                    let call = Call::failed(&err, retries.failed_calls());
                    self.settler
                        .dead_letter_batch(single, reason, &detail, call);
                }
            },
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
