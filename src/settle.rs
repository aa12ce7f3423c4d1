//! Settle tracking: an event is done when every action it produced is
//! applied, noop or dead-lettered. Only then is its inbox receipt settled:
//! the journal entry removed, or the AMQP delivery acknowledged, after its
//! record (see `fate`) is handed to the store.
//!
//! This is the only per-event state the pipeline keeps, shared by all of the
//! event's pending actions: its type (shared too), its receipt, its share of
//! `max_pending_items`, and for its record a few bytes per action (how it
//! settled, when, the vendor's code, attempts) plus fingerprints of its id
//! and user so it can be found while in flight. Neither its id nor its body
//! nor its plan: an action's dead letter goes through the receipt, and the
//! inbox that holds the event fills them in; the record reads the event
//! back through the receipt and plans it again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use dashmap::DashMap;
use parking_lot::Mutex;
use tokio::sync::Semaphore;

use crate::domain::clock::unix_ms;
use crate::domain::{Action, DeadLetter, DeadLetterReason, Settle};
use crate::fate::recorder::{Draft, Recorder};
use crate::fate::{EventRecord, ItemOutcome, Settled, Status, WaitingFor};
use crate::telemetry::Metrics;

/// What every event's tracker shares: the pool of `max_pending_items`
/// its share returns to, the metrics its settle is counted in, and where
/// its record goes.
pub struct Pending {
    pub permits: Arc<Semaphore>,
    pub metrics: Metrics,
    fate: Option<Fate>,
    /// Event types, each held once; trackers keep an index.
    kinds: Mutex<Kinds>,
    /// What trackers count their accept time from.
    epoch: Instant,
}

/// Types come from the rules (and stored dead letters), so they are few;
/// past `MAX_KINDS` new ones share one name.
#[derive(Default)]
struct Kinds {
    index: HashMap<Arc<str>, u16>,
    names: Vec<Arc<str>>,
}

const MAX_KINDS: usize = 1024;
const OTHER_KIND: &str = "(other)";

/// Records: where they go, and the events in flight by id fingerprint.
struct Fate {
    recorder: Arc<Recorder>,
    /// By `fp64` of the id (already a hash: foldhash only mixes it).
    in_flight: DashMap<u64, Weak<Tracker>, foldhash::fast::RandomState>,
}

impl Pending {
    pub fn new(max_pending_items: usize, metrics: Metrics) -> Arc<Pending> {
        Self::with_records(max_pending_items, metrics, None)
    }

    /// `new`, with settled events' records handed to `recorder`.
    pub fn with_records(
        max_pending_items: usize,
        metrics: Metrics,
        recorder: Option<Arc<Recorder>>,
    ) -> Arc<Pending> {
        Arc::new(Pending {
            permits: Arc::new(Semaphore::new(max_pending_items)),
            metrics,
            fate: recorder.map(|recorder| Fate {
                recorder,
                in_flight: DashMap::default(),
            }),
            kinds: Mutex::default(),
            epoch: Instant::now(),
        })
    }

    fn intern(&self, kind: &str) -> u16 {
        let mut k = self.kinds.lock();
        if let Some(i) = k.index.get(kind) {
            return *i;
        }
        let name: Arc<str> = if k.names.len() < MAX_KINDS {
            Arc::from(kind)
        } else {
            Arc::from(OTHER_KIND)
        };
        if let Some(i) = k.index.get(&name) {
            return *i;
        }
        let i = k.names.len() as u16;
        k.names.push(name.clone());
        k.index.insert(name, i);
        i
    }

    fn kind(&self, i: u16) -> Arc<str> {
        self.kinds
            .lock()
            .names
            .get(usize::from(i))
            .cloned()
            .unwrap_or_else(|| Arc::from(OTHER_KIND))
    }

    /// The record so far of event `id`, if it is in flight here.
    /// `circuit`: dispatch is stopped (the credentials are rejected), which
    /// is then what every pending action waits for.
    pub fn in_flight(&self, id: &str, circuit: bool) -> Option<EventRecord> {
        let fate = self.fate.as_ref()?;
        let t = fate.in_flight.get(&fp64(id))?.upgrade()?;
        let r = Origin(t).record_so_far(fate, circuit)?;
        (r.id == id).then_some(r)
    }

    /// Records so far of the events in flight about `user_id`, at most
    /// `limit` (a scan: an admin's question, not the hot path).
    pub fn in_flight_for_user(
        &self,
        user_id: &str,
        limit: usize,
        circuit: bool,
    ) -> Vec<EventRecord> {
        let Some(fate) = &self.fate else {
            return Vec::new();
        };
        let want = fp64(user_id);
        let found: Vec<Arc<Tracker>> = fate
            .in_flight
            .iter()
            .filter_map(|e| e.value().upgrade())
            .filter(|t| t.user_fp == want as u32)
            .take(limit)
            .collect();
        found
            .into_iter()
            .filter_map(|t| Origin(t).record_so_far(fate, circuit))
            .filter(|r| r.user_id.as_str() == user_id)
            .collect()
    }
}

/// A cheap 64-bit fingerprint (in-flight lookups check the id itself),
/// fixed for the process's life.
fn fp64(s: &str) -> u64 {
    use std::hash::BuildHasher;
    foldhash::fast::FixedState::with_seed(0x6a09_e667_f3bc_c908).hash_one(s)
}

/// What identifies an event for its record while it is in flight.
pub struct Identity<'a> {
    pub id: &'a str,
    pub user_id: &'a str,
    /// The plan, when it cannot be made again from the event (a replayed
    /// action, or a plan that read upstream).
    pub keep_plan: Option<Vec<Action>>,
}

/// How one action of an event settled, for the event's record.
#[derive(Debug, Clone, Copy)]
pub struct ItemFate<'a> {
    pub settled: Settled,
    /// The vendor's ErrorCode of the call that settled it (0: success, or
    /// no vendor answer: see `info`).
    pub code: i64,
    /// What went wrong, for a dead letter.
    pub info: Option<&'a str>,
    /// Calls it took part in.
    pub attempts: u32,
}

impl ItemFate<'_> {
    pub fn applied(attempts: u32) -> ItemFate<'static> {
        ItemFate {
            settled: Settled::Applied,
            code: 0,
            info: None,
            attempts,
        }
    }

    pub fn noop(code: i64, attempts: u32) -> ItemFate<'static> {
        ItemFate {
            settled: Settled::Noop,
            code,
            info: None,
            attempts,
        }
    }
}

/// One action's outcome in 12 bytes.
#[derive(Debug, Clone, Copy, Default)]
struct Packed {
    /// Milliseconds after the event was accepted.
    at: u32,
    code: i32,
    attempts: u16,
    /// 0 pending, 1 applied, 2 noop, 3 dead-lettered.
    state: u8,
    /// `DeadLetterReason::ALL` index, for a dead letter.
    reason: u8,
}

/// The outcomes of an event's actions: most events have one, held inline;
/// several in a box, with what is rare (a dead letter's text, a plan that
/// cannot be made again) boxed apart. A backlog of follows holds one of
/// these per waiting event, so the common case is two small allocations.
#[derive(Debug)]
enum Outcomes {
    None,
    One(Packed),
    Big(Box<Big>),
}

#[derive(Debug)]
struct Big {
    outcomes: Box<[Packed]>,
    rare: Option<Box<Rare>>,
}

#[derive(Debug, Default)]
struct Rare {
    /// Error texts of dead-lettered actions, by index.
    infos: Vec<(u32, Box<str>)>,
    plan: Option<Box<[Action]>>,
}

impl Outcomes {
    fn new(n: usize, plan: Option<Vec<Action>>) -> Outcomes {
        match (n, plan) {
            (0, None) => Outcomes::None,
            (1, None) => Outcomes::One(Packed::default()),
            (n, plan) => Outcomes::Big(Box::new(Big {
                outcomes: vec![Packed::default(); n].into_boxed_slice(),
                rare: plan.map(|p| {
                    Box::new(Rare {
                        infos: Vec::new(),
                        plan: Some(p.into_boxed_slice()),
                    })
                }),
            })),
        }
    }

    fn slot(&mut self, i: usize) -> Option<&mut Packed> {
        match self {
            Outcomes::None => None,
            Outcomes::One(p) => (i == 0).then_some(p),
            Outcomes::Big(b) => b.outcomes.get_mut(i),
        }
    }

    fn iter(&self) -> impl Iterator<Item = (usize, &Packed)> {
        let s: &[Packed] = match self {
            Outcomes::None => &[],
            Outcomes::One(p) => std::slice::from_ref(p),
            Outcomes::Big(b) => &b.outcomes,
        };
        s.iter().enumerate()
    }

    fn add_info(&mut self, i: u32, info: &str) {
        if let Outcomes::One(p) = *self {
            *self = Outcomes::Big(Box::new(Big {
                outcomes: Box::new([p]),
                rare: None,
            }));
        }
        if let Outcomes::Big(b) = self {
            b.rare
                .get_or_insert_with(Box::default)
                .infos
                .push((i, info.into()));
        }
    }

    fn info(&self, i: usize) -> Option<String> {
        let Outcomes::Big(b) = self else { return None };
        b.rare
            .as_ref()?
            .infos
            .iter()
            .rev()
            .find(|(j, _)| *j as usize == i)
            .map(|(_, s)| s.to_string())
    }

    fn plan(&self) -> Option<&[Action]> {
        match self {
            Outcomes::Big(b) => b.rare.as_ref()?.plan.as_deref(),
            _ => None,
        }
    }
}

/// What is locked together: the receipt (taken at the settle) and the
/// record's makings.
struct Held {
    receipt: Option<Box<dyn Settle>>,
    outcomes: Outcomes,
}

/// One event: kept small (one allocation besides its receipt), as a backlog
/// of one-action events holds one per pending item.
struct Tracker {
    held: Mutex<Held>,
    pending: Arc<Pending>,
    /// Fingerprint of its id (0: not recorded).
    id_fp: u64,
    /// When it was accepted: ms after `pending.epoch` (u32: 49 days).
    accepted: u32,
    /// Its type, an index into `pending`'s names.
    kind: u16,
    /// What its latest moved action waits for (`WaitingFor` as a byte).
    stage: AtomicU8,
    /// Fingerprint of its user (for by-user lookups; the user is checked).
    user_fp: u32,
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
        let held = self.held.get_mut();
        if held.receipt.is_some() {
            let n = *self.permits.get_mut();
            self.pending.permits.add_permits(n as usize);
        }
        if let Some(f) = &self.pending.fate {
            f.in_flight
                .remove_if(&self.id_fp, |_, w| w.strong_count() == 0);
        }
    }
}

const STAGES: [WaitingFor; 5] = [
    WaitingFor::Queued,
    WaitingFor::Linger,
    WaitingFor::Limiter,
    WaitingFor::Circuit,
    WaitingFor::RetryBackoff,
];

fn reason_index(r: DeadLetterReason) -> u8 {
    DeadLetterReason::ALL
        .iter()
        .position(|x| *x == r)
        .unwrap_or(0) as u8
}

/// A handle on one event, held by each of its pending actions. Cloning adds
/// nothing to the count.
#[derive(Clone)]
pub struct Origin(Arc<Tracker>);

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origin")
            .field("kind", &self.kind())
            .field("remaining", &self.0.remaining.load(Ordering::Relaxed))
            .finish()
    }
}

impl Origin {
    /// Tracks an event that will produce `actions` actions and holds
    /// `permits` (taken from `pending` and forgotten); its receipt settles
    /// once all have settled (at once if there are none), and the permits
    /// go back as they do. `identity`: the event is recorded (a sweep's
    /// removals are not).
    pub fn new(
        kind: &str,
        actions: usize,
        accepted_at: Instant,
        pending: Arc<Pending>,
        permits: u32,
        receipt: Box<dyn Settle>,
        identity: Option<Identity<'_>>,
    ) -> Origin {
        let recorded = identity.filter(|_| pending.fate.is_some());
        let (id_fp, user_fp, plan) = match recorded {
            Some(i) => (fp64(i.id).max(1), fp64(i.user_id) as u32, i.keep_plan),
            None => (0, 0, None),
        };
        let accepted = accepted_at
            .checked_duration_since(pending.epoch)
            .map_or(0, |d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX));
        let tracker = Arc::new(Tracker {
            kind: pending.intern(kind),
            accepted,
            held: Mutex::new(Held {
                receipt: Some(receipt),
                outcomes: if id_fp != 0 {
                    Outcomes::new(actions, plan)
                } else {
                    Outcomes::None
                },
            }),
            pending,
            remaining: AtomicU32::new(u32::try_from(actions).unwrap_or(u32::MAX)),
            permits: AtomicU32::new(permits),
            id_fp,
            user_fp,
            stage: AtomicU8::new(1),
        });
        if id_fp != 0 {
            if let Some(f) = &tracker.pending.fate {
                f.in_flight.insert(id_fp, Arc::downgrade(&tracker));
            }
        }
        let origin = Origin(tracker);
        if actions == 0 {
            origin.finish();
        }
        origin
    }

    /// The event's type.
    pub fn kind(&self) -> Arc<str> {
        self.0.pending.kind(self.0.kind)
    }

    /// How long ago it was accepted.
    fn age(&self) -> std::time::Duration {
        let at =
            self.0.pending.epoch + std::time::Duration::from_millis(u64::from(self.0.accepted));
        at.elapsed()
    }

    /// What its action just moved to waits for (shown in its record while
    /// it is pending).
    pub fn stage(&self, w: WaitingFor) {
        if self.0.id_fp != 0 {
            let i = STAGES.iter().position(|s| *s == w).unwrap_or(1) as u8;
            self.0.stage.store(i, Ordering::Relaxed);
        }
    }

    /// Action `index` of this event settled as `fate`: kept for the
    /// record, and its permit goes back at once (while the event holds more
    /// permits than it has actions left).
    pub fn settle(&self, index: u32, fate: ItemFate<'_>) {
        let t = &self.0;
        if t.id_fp != 0 {
            let at = u32::try_from(self.age().as_millis()).unwrap_or(u32::MAX);
            let mut held = t.held.lock();
            let (state, reason) = match fate.settled {
                Settled::Applied => (1, 0),
                Settled::Noop => (2, 0),
                Settled::DeadLettered(r) => (3, reason_index(r)),
            };
            if let Some(slot) = held.outcomes.slot(index as usize) {
                *slot = Packed {
                    at,
                    code: i32::try_from(fate.code).unwrap_or(i32::MAX),
                    attempts: u16::try_from(fate.attempts).unwrap_or(u16::MAX),
                    state,
                    reason,
                };
            }
            if let (3, Some(info)) = (state, fate.info) {
                held.outcomes.add_info(index, info);
            }
        }
        let before = t.remaining.fetch_sub(1, Ordering::AcqRel);
        let left = before.saturating_sub(1);
        if let Ok(n) = t
            .permits
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| {
                (h > left).then_some(left)
            })
        {
            t.pending.permits.add_permits((n - left) as usize);
        }
        if before == 1 {
            self.finish();
        }
    }

    /// One action of this event could not be applied: its dead letter (the
    /// event's id and body still empty) goes to the event's inbox, which
    /// fills them in. Call before that action's `settle`, so the dead
    /// letter is recorded before the event settles.
    pub fn dead_letter(&self, dl: DeadLetter) {
        if let Some(r) = &self.0.held.lock().receipt {
            r.action_dead_lettered(dl);
        }
    }

    /// What is needed to build the record from `held` (its receipt still
    /// in it, or just taken as `receipt`).
    fn draft_outcomes(&self, held: &Held) -> Vec<(usize, ItemOutcome)> {
        let accepted_ms = self.accepted_at_ms();
        held.outcomes
            .iter()
            .filter(|(_, p)| p.state != 0)
            .map(|(i, p)| {
                let result = match p.state {
                    1 => Settled::Applied,
                    2 => Settled::Noop,
                    _ => Settled::DeadLettered(
                        DeadLetterReason::ALL
                            .get(p.reason as usize)
                            .copied()
                            .unwrap_or(DeadLetterReason::UnknownError),
                    ),
                };
                let o = ItemOutcome {
                    result,
                    error_code: i64::from(p.code),
                    error_info: if p.state == 3 {
                        held.outcomes.info(i)
                    } else {
                        None
                    },
                    at_unix_ms: accepted_ms + u64::from(p.at),
                    attempts: u32::from(p.attempts),
                };
                (i, o)
            })
            .collect()
    }

    fn accepted_at_ms(&self) -> u64 {
        let ago = u64::try_from(self.age().as_millis()).unwrap_or(0);
        unix_ms().saturating_sub(ago)
    }

    fn record_so_far(&self, fate: &Fate, circuit: bool) -> Option<EventRecord> {
        let held = self.0.held.lock();
        let receipt = held.receipt.as_ref()?;
        let event = receipt.event()?;
        let outcomes = self.draft_outcomes(&held);
        let plan = held.outcomes.plan();
        let waiting = if circuit {
            WaitingFor::Circuit
        } else {
            STAGES
                .get(self.0.stage.load(Ordering::Relaxed) as usize)
                .copied()
                .unwrap_or(WaitingFor::Linger)
        };
        fate.recorder.build(
            Draft {
                held: event,
                kind: self.kind(),
                accepted_at_ms: self.accepted_at_ms(),
                plan,
                outcomes,
            },
            Status::Pending,
            None,
            Some(waiting),
        )
    }

    fn finish(&self) {
        let t = &self.0;
        let seconds = self.age().as_secs_f64();
        t.pending.metrics.event_settled(seconds);
        tracing::debug!(kind = %self.kind(), seconds, "event settled");
        let mut held = t.held.lock();
        let Some(receipt) = held.receipt.take() else {
            return;
        };
        let n = t.permits.swap(0, Ordering::AcqRel);
        t.pending.permits.add_permits(n as usize);
        if let (Some(fate), true) = (&t.pending.fate, t.id_fp != 0) {
            // The record goes to the store before the receipt settles, so a
            // settled event always has one (or is replayed and gets one).
            if let Some(event) = receipt.event() {
                let outcomes = self.draft_outcomes(&held);
                let dead = outcomes
                    .iter()
                    .any(|(_, o)| matches!(o.result, Settled::DeadLettered(_)));
                let plan = held.outcomes.plan();
                fate.recorder.settled(
                    Draft {
                        held: event,
                        kind: self.kind(),
                        accepted_at_ms: self.accepted_at_ms(),
                        plan,
                        outcomes,
                    },
                    dead,
                    unix_ms(),
                );
            }
            let me = Arc::as_ptr(&self.0);
            fate.in_flight
                .remove_if(&t.id_fp, |_, w| std::ptr::eq(w.as_ptr(), me));
        }
        held.outcomes = Outcomes::None;
        drop(held);
        receipt.settled();
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
            "user.banned",
            actions,
            Instant::now(),
            Pending::new(10, Metrics::new([])),
            0,
            Box::new(TestReceipt(seen.clone())),
            None,
        );
        (o, seen)
    }

    #[test]
    fn an_event_costs_one_small_allocation() {
        // A backlog of one-action events holds one tracker per item.
        assert!(
            std::mem::size_of::<Tracker>() <= 80,
            "{}",
            std::mem::size_of::<Tracker>()
        );
    }

    #[test]
    fn settles_after_the_last_action() {
        let (o, seen) = origin(2);
        o.settle(0, ItemFate::applied(1));
        assert!(!seen.settled.load(Ordering::SeqCst));
        o.clone().settle(0, ItemFate::applied(1));
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
        o.settle(0, ItemFate::applied(1));
        o.dead_letter(DeadLetter::unfilled(
            "user.banned",
            None,
            DeadLetterReason::BadRequest,
            "6017",
        ));
        o.settle(0, ItemFate::applied(1));
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
            "user.banned",
            3,
            Instant::now(),
            pending.clone(),
            3,
            Box::new(TestReceipt(seen.clone())),
            None,
        );
        assert_eq!(pending.permits.available_permits(), 7);
        o.settle(0, ItemFate::applied(1));
        assert_eq!(pending.permits.available_permits(), 8, "one back");
        o.settle(0, ItemFate::applied(1));
        assert_eq!(pending.permits.available_permits(), 9);
        assert!(!seen.settled.load(Ordering::SeqCst));
        o.settle(0, ItemFate::applied(1));
        assert_eq!(pending.permits.available_permits(), 10);
        assert!(seen.settled.load(Ordering::SeqCst));
    }

    #[test]
    fn an_event_larger_than_the_bound_gives_permits_back_once_below_it() {
        let pending = Pending::new(2, Metrics::new([]));
        pending.permits.try_acquire_many(2).unwrap().forget();
        let seen = Arc::new(Seen::default());
        let o = Origin::new(
            "user.banned",
            4,
            Instant::now(),
            pending.clone(),
            2,
            Box::new(TestReceipt(seen.clone())),
            None,
        );
        o.settle(0, ItemFate::applied(1));
        o.settle(0, ItemFate::applied(1));
        assert_eq!(pending.permits.available_permits(), 0, "two actions left");
        o.settle(0, ItemFate::applied(1));
        assert_eq!(pending.permits.available_permits(), 1);
        o.settle(0, ItemFate::applied(1));
        assert_eq!(pending.permits.available_permits(), 2);
    }
}
