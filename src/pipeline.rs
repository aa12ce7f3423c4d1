//! Wires rules, coalescer and dispatcher together behind one `submit`, with
//! the in-memory bound (`max_pending_items`) that gives backpressure to
//! whatever feeds it: the intake loop, and sweeps.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::coalesce::{Backlog, Coalescer, Input, Item};
use crate::config::{BatchingSettings, DispatchSettings};
use crate::dispatch::{Active, Dispatcher, Upstream};
use crate::domain::{Action, DeadLetterSink};
use crate::settle::{EventMeta, Origin};
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
    permits: Arc<Semaphore>,
    max_pending: usize,
    metrics: Metrics,
}

/// What keeps running behind the pipeline, for shutdown and readiness.
pub struct PipelineHandles {
    /// For reads (resolution, sweeps, counts) under the same limits, and
    /// the circuit's state.
    pub upstream: Arc<Upstream>,
    pub tasks: TaskTracker,
    /// Fires to abandon waits (backoff, circuit) at the end of the grace.
    pub hard_stop: CancellationToken,
    permits: Arc<Semaphore>,
    max_pending: usize,
}

impl PipelineHandles {
    /// Items accepted and not yet settled.
    pub fn in_flight(&self) -> usize {
        self.max_pending - self.permits.available_permits()
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
        dead: Arc<dyn DeadLetterSink>,
        metrics: Metrics,
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
            dead,
            metrics.clone(),
            hard_stop.clone(),
        );
        tasks.spawn(dispatcher.run(batch_rx, tasks.clone()));
        let permits = Arc::new(Semaphore::new(d.max_pending_items));
        (
            Pipeline {
                input: input_tx,
                permits: permits.clone(),
                max_pending: d.max_pending_items,
                metrics,
            },
            PipelineHandles {
                upstream,
                tasks,
                hard_stop,
                permits,
                max_pending: d.max_pending_items,
            },
        )
    }

    /// Puts an event's actions to work; `on_settled` runs once all settled.
    /// Waits while the pipeline holds `max_pending_items` (backpressure).
    pub async fn submit(
        &self,
        meta: EventMeta,
        actions: Vec<Action>,
        accepted_at: Instant,
        on_settled: impl FnOnce() + Send + 'static,
    ) -> Result<(), Closed> {
        let want = actions.len().clamp(1, self.max_pending) as u32;
        let permit = self
            .permits
            .clone()
            .acquire_many_owned(want)
            .await
            .map_err(|_| Closed)?;
        let origin = Origin::new(
            meta,
            actions.len(),
            accepted_at.into_std(),
            self.metrics.clone(),
            Some(permit),
            on_settled,
        );
        for action in actions {
            self.metrics.pending_add(action.api(), 1);
            let item = Item {
                origin: origin.clone(),
                attempts: 0,
            };
            self.input
                .send(Input::Action(action, item))
                .await
                .map_err(|_| Closed)?;
        }
        Ok(())
    }
}
