//! Wires rules, coalescer and dispatcher together behind one `submit`, with
//! the in-memory bound (`max_pending_items`) that gives backpressure to
//! whatever feeds it: the intake loop, and sweeps.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::coalesce::{Backlog, Coalescer, Input, Item};
use crate::config::{BatchingSettings, DispatchSettings};
use crate::dispatch::{Active, Dispatcher, Upstream};
use crate::domain::{Action, Settle};
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
    kinds: Arc<Kinds>,
}

/// Event types, held once each: every pending event of a type shares its
/// name. Types come from the rules (and stored dead letters), so they are
/// few; past `MAX_KINDS` a name is simply not shared.
#[derive(Default)]
struct Kinds(Mutex<HashSet<Arc<str>>>);

const MAX_KINDS: usize = 1024;

impl Kinds {
    fn intern(&self, kind: &str) -> Arc<str> {
        let mut set = self.0.lock();
        if let Some(k) = set.get(kind) {
            return k.clone();
        }
        let k: Arc<str> = Arc::from(kind);
        if set.len() < MAX_KINDS {
            set.insert(k.clone());
        }
        k
    }
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

impl PipelineHandles {
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
        let pending = Pending::new(d.max_pending_items, metrics);
        (
            Pipeline {
                input: input_tx,
                pending: pending.clone(),
                max_pending: d.max_pending_items,
                kinds: Arc::default(),
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
    /// `max_pending_items` (backpressure).
    pub async fn submit(
        &self,
        kind: &str,
        actions: Vec<Action>,
        accepted_at: Instant,
        receipt: Box<dyn Settle>,
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
            self.kinds.intern(kind),
            actions.len(),
            accepted_at.into_std(),
            self.pending.clone(),
            want,
            receipt,
        );
        for action in actions {
            self.pending.metrics.pending_add(action.api(), 1);
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
