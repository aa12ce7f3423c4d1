//! Wires rules, coalescer and dispatcher together behind one `submit`, with
//! the in-memory bound (`max_pending_items`) that gives backpressure to
//! whatever feeds it: the intake loop, and sweeps.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::coalesce::{Backlog, Coalescer, Input, Item};
use crate::config::{BatchingSettings, DispatchSettings};
use crate::dispatch::{Active, Dispatcher, Upstream};
use crate::domain::{Action, Settle};
use crate::fate::recorder::Recorder;
use crate::fate::{EventRecord, InFlight};
pub use crate::settle::Identity;
use crate::settle::{Origin, Pending};
use crate::telemetry::Metrics;
use crate::tencent::TencentClient;

/// The pipeline has shut down.
#[derive(Debug, thiserror::Error)]
#[error("the pipeline is shut down")]
pub struct Closed;

/// The entrance to the pipeline. Dropping every clone closes it: the
/// coalescer then flushes what it holds.
#[derive(Clone)]
pub struct Pipeline {
    input: mpsc::Sender<Input>,
    pending: Arc<Pending>,
    max_pending: usize,
}

/// What keeps running behind the pipeline, for shutdown and readiness.
pub struct PipelineHandles {
    /// For reads (resolution, sweeps, counts) under the same limits, and
    /// the circuit's state.
    pub upstream: Arc<Upstream>,
    pub tasks: TaskTracker,
    /// Fires to abandon waits (backoff, circuit) at the end of the grace.
    pub hard_stop: CancellationToken,
    pending: Arc<Pending>,
    max_pending: usize,
}

/// What the pipeline answers for events it holds, for the record routes.
struct PipelineInFlight {
    pending: Arc<Pending>,
    upstream: Arc<Upstream>,
}

impl InFlight for PipelineInFlight {
    fn pending(&self, id: &str) -> Option<EventRecord> {
        let circuit = self.upstream.circuit().open_reason().is_some();
        self.pending.in_flight(id, circuit)
    }

    fn pending_for_user(&self, user_id: &str, limit: usize) -> Vec<EventRecord> {
        let circuit = self.upstream.circuit().open_reason().is_some();
        self.pending.in_flight_for_user(user_id, limit, circuit)
    }
}

impl PipelineHandles {
    /// Events in flight, as the record routes see them.
    pub fn records_in_flight(&self) -> Arc<dyn InFlight> {
        Arc::new(PipelineInFlight {
            pending: self.pending.clone(),
            upstream: self.upstream.clone(),
        })
    }

    /// Items accepted and not yet settled.
    pub fn in_flight(&self) -> usize {
        self.max_pending - self.pending.permits.available_permits()
    }

    /// Waits until nothing is in flight, or `grace` passes; then stops
    /// everything and waits for the tasks to end.
    pub async fn drain(self, grace: Duration) {
        let deadline = Instant::now() + grace;
        // Waiting is pointless while upstream rejects our credentials, or
        // on a standby (the work it holds was redelivered to the leader).
        while self.in_flight() > 0
            && Instant::now() < deadline
            && self.upstream.circuit().open_reason().is_none()
            && self.upstream.is_active()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if self.in_flight() > 0 {
            tracing::warn!(
                items = self.in_flight(),
                "shutdown grace over; unsettled items are replayed on the next start"
            );
        }
        self.hard_stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

impl Pipeline {
    /// Starts the coalescer and dispatcher tasks.
    pub fn start(
        batching: &BatchingSettings,
        d: &DispatchSettings,
        requests_per_second: u32,
        active: Active,
        client: Arc<TencentClient>,
        metrics: Metrics,
        recorder: Option<Arc<Recorder>>,
    ) -> (Pipeline, PipelineHandles) {
        let hard_stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (input_tx, input_rx) = mpsc::channel(1024);
        let (retry_tx, retry_rx) = mpsc::unbounded_channel();
        let (batch_tx, batch_rx) = mpsc::channel(d.max_in_flight.max(8) * 2);
        let upstream = Upstream::new(
            client,
            requests_per_second,
            d.clone(),
            active,
            metrics.clone(),
            hard_stop.clone(),
        );
        let backlog = Arc::new(Backlog::default());
        let coalescer = Coalescer::new(
            Duration::from_millis(batching.linger_ms),
            d.max_open_keys,
            batching.max_batch_items,
            backlog.clone(),
            batch_tx,
            metrics.clone(),
        );
        tasks.spawn(coalescer.run(input_rx, retry_rx, hard_stop.clone()));
        let dispatcher = Dispatcher::new(
            upstream.clone(),
            backlog,
            retry_tx,
            metrics.clone(),
            hard_stop.clone(),
        );
        tasks.spawn(dispatcher.run(batch_rx, tasks.clone()));
        let pending = Pending::with_records(d.max_pending_items, metrics, recorder);
        (
            Pipeline {
                input: input_tx,
                pending: pending.clone(),
                max_pending: d.max_pending_items,
            },
            PipelineHandles {
                upstream,
                tasks,
                hard_stop,
                pending,
                max_pending: d.max_pending_items,
            },
        )
    }

    /// Puts the actions of an event of type `kind` to work; its `receipt`
    /// settles once all settled, and takes the dead letters of those that
    /// could not be applied. Waits while the pipeline holds
    /// `max_pending_items` (backpressure). `identity`: the event gets a
    /// record (a sweep's removals do not).
    pub async fn submit(
        &self,
        kind: &str,
        actions: Vec<Action>,
        accepted_at: Instant,
        receipt: Box<dyn Settle>,
        identity: Option<Identity<'_>>,
    ) -> Result<(), Closed> {
        let want = actions.len().clamp(1, self.max_pending) as u32;
        // Held by the event's tracker as a count, and given back when it
        // settles: a permit object each would cost every event 16 bytes.
        self.pending
            .permits
            .acquire_many(want)
            .await
            .map_err(|_| Closed)?
            .forget();
        let origin = Origin::new(
            kind,
            actions.len(),
            accepted_at.into_std(),
            self.pending.clone(),
            want,
            receipt,
            identity,
        );
        for (index, action) in actions.into_iter().enumerate() {
            self.pending.metrics.pending_add(action.api(), 1);
            let item = Item {
                origin: origin.clone(),
                attempts: 0,
                index: u32::try_from(index).unwrap_or(u32::MAX),
            };
            self.input
                .send(Input::Action(action, item))
                .await
                .map_err(|_| Closed)?;
        }
        Ok(())
    }
}
