//! Settle tracking: an event is done when every action it produced is
//! applied, noop or dead-lettered. Only then is its inbox receipt settled:
//! the journal entry removed, or the AMQP delivery acknowledged.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use tokio::sync::OwnedSemaphorePermit;

use crate::telemetry::Metrics;

/// What the pipeline knows of an event while its actions are in flight.
#[derive(Debug, Clone)]
pub struct EventMeta {
    /// The webhook-id or AMQP message_id.
    pub id: String,
    pub kind: String,
    /// The event as accepted (compact JSON), kept for dead letters.
    pub body: Arc<[u8]>,
}

type OnSettled = Box<dyn FnOnce() + Send>;

struct Tracker {
    meta: EventMeta,
    remaining: AtomicUsize,
    accepted_at: Instant,
    on_settled: Mutex<Option<OnSettled>>,
    metrics: Metrics,
    /// The event's share of `max_pending_items`, released when it settles.
    _permit: Mutex<Option<OwnedSemaphorePermit>>,
}

/// A handle on one event, held by each of its pending actions. Cloning adds
/// nothing to the count; `expect` does.
#[derive(Clone)]
pub struct Origin(Arc<Tracker>);

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origin")
            .field("event", &self.0.meta.id)
            .field("remaining", &self.0.remaining.load(Ordering::Relaxed))
            .finish()
    }
}

impl Origin {
    /// Tracks an event that will produce `actions` actions; `on_settled` runs
    /// once all have settled (at once if there are none).
    pub fn new(
        meta: EventMeta,
        actions: usize,
        accepted_at: Instant,
        metrics: Metrics,
        permit: Option<OwnedSemaphorePermit>,
        on_settled: impl FnOnce() + Send + 'static,
    ) -> Origin {
        let origin = Origin(Arc::new(Tracker {
            meta,
            remaining: AtomicUsize::new(actions),
            accepted_at,
            on_settled: Mutex::new(Some(Box::new(on_settled))),
            metrics,
            _permit: Mutex::new(permit),
        }));
        if actions == 0 {
            origin.finish();
        }
        origin
    }

    pub fn meta(&self) -> &EventMeta {
        &self.0.meta
    }

    /// One action of this event settled.
    pub fn settle_one(&self) {
        if self.0.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.finish();
        }
    }

    fn finish(&self) {
        let t = &self.0;
        let seconds = t.accepted_at.elapsed().as_secs_f64();
        t.metrics.event_settled(seconds);
        tracing::debug!(event = %t.meta.id, kind = %t.meta.kind, seconds, "event settled");
        t._permit.lock().take();
        if let Some(f) = t.on_settled.lock().take() {
            f();
        }
    }

    pub fn is_settled(&self) -> bool {
        self.0.remaining.load(Ordering::Acquire) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn meta() -> EventMeta {
        EventMeta {
            id: "e".into(),
            kind: "user.banned".into(),
            body: Arc::from(&b"{}"[..]),
        }
    }

    #[test]
    fn settles_after_the_last_action() {
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let o = Origin::new(
            meta(),
            2,
            Instant::now(),
            Metrics::new([]),
            None,
            move || d.store(true, Ordering::SeqCst),
        );
        o.settle_one();
        assert!(!done.load(Ordering::SeqCst));
        o.clone().settle_one();
        assert!(done.load(Ordering::SeqCst));
        assert!(o.is_settled());
    }

    #[test]
    fn no_actions_settles_at_once() {
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        Origin::new(
            meta(),
            0,
            Instant::now(),
            Metrics::new([]),
            None,
            move || d.store(true, Ordering::SeqCst),
        );
        assert!(done.load(Ordering::SeqCst));
    }
}
