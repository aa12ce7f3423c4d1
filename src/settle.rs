//! Settle tracking: an event is done when every action it produced is
//! applied, noop or dead-lettered. Only then is its inbox receipt settled:
//! the journal entry removed, or the AMQP delivery acknowledged.
//!
//! This is the only per-event state the pipeline keeps, shared by all of the
//! event's pending actions: its type (shared too), its receipt, and its
//! share of `max_pending_items`. Neither its id nor its body: an action's
//! dead letter goes through the receipt, and the inbox that holds the event
//! fills both in.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use tokio::sync::Semaphore;

use crate::domain::{DeadLetter, Settle};
use crate::telemetry::Metrics;

/// What every event's tracker shares: the pool of `max_pending_items`
/// its share returns to, and the metrics its settle is counted in.
pub struct Pending {
    pub permits: Arc<Semaphore>,
    pub metrics: Metrics,
}

impl Pending {
    pub fn new(max_pending_items: usize, metrics: Metrics) -> Arc<Pending> {
        Arc::new(Pending {
            permits: Arc::new(Semaphore::new(max_pending_items)),
            metrics,
        })
    }
}

/// One event: kept small (one allocation besides its receipt), as a backlog
/// of one-action events holds one per pending item.
struct Tracker {
    /// Shared by every event of the type (see `pipeline::Pipeline::submit`).
    kind: Arc<str>,
    accepted_at: Instant,
    /// Taken once, when the last action settles.
    receipt: Mutex<Option<Box<dyn Settle>>>,
    pending: Arc<Pending>,
    remaining: AtomicU32,
    /// Its share of `max_pending_items` still held: given back one by one
    /// as its actions settle (so the bound counts actions in memory, and an
    /// event whose follows wait does not hold up room its settled removals
    /// freed), the rest when it settles or, at shutdown, when its last item
    /// is dropped unsettled.
    permits: AtomicU32,
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if self.receipt.get_mut().is_some() {
            let held = *self.permits.get_mut();
            self.pending.permits.add_permits(held as usize);
        }
    }
}

/// A handle on one event, held by each of its pending actions. Cloning adds
/// nothing to the count.
#[derive(Clone)]
pub struct Origin(Arc<Tracker>);

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origin")
            .field("kind", &self.0.kind)
            .field("remaining", &self.0.remaining.load(Ordering::Relaxed))
            .finish()
    }
}

impl Origin {
    /// Tracks an event that will produce `actions` actions and holds
    /// `permits` (taken from `pending` and forgotten); its receipt settles
    /// once all have settled (at once if there are none), and the permits
    /// go back then.
    pub fn new(
        kind: Arc<str>,
        actions: usize,
        accepted_at: Instant,
        pending: Arc<Pending>,
        permits: u32,
        receipt: Box<dyn Settle>,
    ) -> Origin {
        let origin = Origin(Arc::new(Tracker {
            kind,
            accepted_at,
            receipt: Mutex::new(Some(receipt)),
            pending,
            remaining: AtomicU32::new(u32::try_from(actions).unwrap_or(u32::MAX)),
            permits: AtomicU32::new(permits),
        }));
        if actions == 0 {
            origin.finish();
        }
        origin
    }

    /// The event's type.
    pub fn kind(&self) -> &str {
        &self.0.kind
    }

    /// One action of this event settled: its permit goes back at once
    /// (while the event holds more permits than it has actions left).
    pub fn settle_one(&self) {
        let before = self.0.remaining.fetch_sub(1, Ordering::AcqRel);
        let left = before.saturating_sub(1);
        let t = &self.0;
        if let Ok(held) = t
            .permits
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| {
                (h > left).then_some(left)
            })
        {
            t.pending.permits.add_permits((held - left) as usize);
        }
        if before == 1 {
            self.finish();
        }
    }

    /// One action of this event could not be applied: its dead letter (the
    /// event's id and body still empty) goes to the event's inbox, which
    /// fills them in. Call before that action's `settle_one`, so the dead letter is
    /// recorded before the event settles.
    pub fn dead_letter(&self, dl: DeadLetter) {
        if let Some(r) = &*self.0.receipt.lock() {
            r.action_dead_lettered(dl);
        }
    }

    fn finish(&self) {
        let t = &self.0;
        let seconds = t.accepted_at.elapsed().as_secs_f64();
        t.pending.metrics.event_settled(seconds);
        tracing::debug!(kind = %t.kind, seconds, "event settled");
        let receipt = t.receipt.lock().take();
        if let Some(r) = receipt {
            let held = t.permits.swap(0, Ordering::AcqRel);
            t.pending.permits.add_permits(held as usize);
            r.settled();
        }
    }

    pub fn is_settled(&self) -> bool {
        self.0.remaining.load(Ordering::Acquire) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::DeadLetterReason;
    use std::sync::atomic::AtomicBool;

    /// Records what the pipeline asked of it.
    #[derive(Default)]
    struct Seen {
        settled: AtomicBool,
        dead: Mutex<Vec<DeadLetter>>,
    }

    struct TestReceipt(Arc<Seen>);

    impl Settle for TestReceipt {
        fn settled(self: Box<Self>) {
            self.0.settled.store(true, Ordering::SeqCst);
        }
        fn dead_lettered(self: Box<Self>, _dl: DeadLetter, _body: Vec<u8>) {}
        fn action_dead_lettered(&self, dl: DeadLetter) {
            // Nothing may be recorded after the event settled.
            assert!(!self.0.settled.load(Ordering::SeqCst));
            self.0.dead.lock().push(dl);
        }
    }

    fn origin(actions: usize) -> (Origin, Arc<Seen>) {
        let seen = Arc::new(Seen::default());
        let o = Origin::new(
            Arc::from("user.banned"),
            actions,
            Instant::now(),
            Pending::new(10, Metrics::new([])),
            0,
            Box::new(TestReceipt(seen.clone())),
        );
        (o, seen)
    }

    #[test]
    fn an_event_costs_one_small_allocation() {
        // A backlog of one-action events holds one tracker per item.
        assert!(
            std::mem::size_of::<Tracker>() <= 72,
            "{}",
            std::mem::size_of::<Tracker>()
        );
    }

    #[test]
    fn settles_after_the_last_action() {
        let (o, seen) = origin(2);
        o.settle_one();
        assert!(!seen.settled.load(Ordering::SeqCst));
        o.clone().settle_one();
        assert!(seen.settled.load(Ordering::SeqCst));
        assert!(o.is_settled());
    }

    #[test]
    fn no_actions_settles_at_once() {
        let (_o, seen) = origin(0);
        assert!(seen.settled.load(Ordering::SeqCst));
    }

    #[test]
    fn an_actions_dead_letter_reaches_the_receipt_before_the_settle() {
        let (o, seen) = origin(2);
        o.settle_one();
        o.dead_letter(DeadLetter::unfilled(
            "user.banned",
            None,
            DeadLetterReason::BadRequest,
            "6017",
        ));
        o.settle_one();
        assert!(seen.settled.load(Ordering::SeqCst));
        let dead = seen.dead.lock();
        assert_eq!(dead.len(), 1);
        assert_eq!(
            dead[0].event,
            serde_json::Value::Null,
            "filled by the inbox"
        );
    }

    #[test]
    fn each_settled_action_gives_its_permit_back() {
        let pending = Pending::new(10, Metrics::new([]));
        pending.permits.try_acquire_many(3).unwrap().forget();
        let seen = Arc::new(Seen::default());
        let o = Origin::new(
            Arc::from("user.banned"),
            3,
            Instant::now(),
            pending.clone(),
            3,
            Box::new(TestReceipt(seen.clone())),
        );
        assert_eq!(pending.permits.available_permits(), 7);
        o.settle_one();
        assert_eq!(pending.permits.available_permits(), 8, "one back");
        o.settle_one();
        assert_eq!(pending.permits.available_permits(), 9);
        assert!(!seen.settled.load(Ordering::SeqCst));
        o.settle_one();
        assert_eq!(pending.permits.available_permits(), 10);
        assert!(seen.settled.load(Ordering::SeqCst));
    }

    #[test]
    fn an_event_larger_than_the_bound_gives_permits_back_once_below_it() {
        let pending = Pending::new(2, Metrics::new([]));
        pending.permits.try_acquire_many(2).unwrap().forget();
        let seen = Arc::new(Seen::default());
        let o = Origin::new(
            Arc::from("user.banned"),
            4,
            Instant::now(),
            pending.clone(),
            2,
            Box::new(TestReceipt(seen.clone())),
        );
        o.settle_one();
        o.settle_one();
        assert_eq!(pending.permits.available_permits(), 0, "two actions left");
        o.settle_one();
        assert_eq!(pending.permits.available_permits(), 1);
        o.settle_one();
        assert_eq!(pending.permits.available_permits(), 2);
    }
}
