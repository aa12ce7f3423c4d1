//! Turns what the pipeline kept of an event (a few bytes per action: how it
//! settled, when, the vendor's code) and what its inbox holds (its id and
//! body) into its record while it is pending, and into what the store
//! keeps (`SettledEvent`) once it settled. The plan is not kept in memory while the event is
//! in flight: it is made again from the body, with the same rules that made
//! it (a rule is a pure function of the event), except for plans that are
//! not (a replayed dead letter's single action, or a plan that read
//! upstream), which the pipeline keeps and passes in.

use std::sync::Arc;

use super::record::{EventRecord, ItemOutcome, RecordBuilder, Status, WaitingFor};
use super::{FateStore, SettledEvent};
use crate::domain::{Action, HeldEvent};
use crate::event::Event;
use crate::rules::Rules;

/// Where the pipeline hands its settled events' outcomes.
pub struct Recorder {
    rules: Arc<Rules>,
    store: Arc<dyn FateStore>,
}

/// What the pipeline knows of one event.
pub struct Draft<'a> {
    /// Read from its inbox for this record: moved into what is kept.
    pub held: HeldEvent,
    /// Its type (the pipeline's interned copy: shared, not copied).
    pub kind: Arc<str>,
    pub accepted_at_ms: u64,
    /// The plan, when it cannot be made again from the body.
    pub plan: Option<&'a [Action]>,
    /// Each settled item: its index in the plan, and how it settled.
    pub outcomes: Vec<(usize, ItemOutcome)>,
}

impl Recorder {
    pub fn new(rules: Arc<Rules>, store: Arc<dyn FateStore>) -> Recorder {
        Recorder { rules, store }
    }

    /// The event's record as it stands; `None` if its body no longer makes
    /// an event (it could not have been planned either).
    pub fn build(
        &self,
        d: Draft<'_>,
        status: Status,
        settled_at_ms: Option<u64>,
        waiting_for: Option<WaitingFor>,
    ) -> Option<EventRecord> {
        let event = Event::parse(&d.held.body).ok()?;
        let plan = match d.plan {
            Some(p) => p.to_vec(),
            None => self.rules.plan(&event).ok()?,
        };
        let mut b = RecordBuilder::new(
            &d.held.id,
            d.held.source,
            &d.kind,
            event.data.user_id,
            d.accepted_at_ms,
            plan,
        );
        for (i, o) in d.outcomes {
            b.outcome(i, o);
        }
        Some(b.build(status, settled_at_ms, waiting_for))
    }

    /// Hands a settled event to the store (never waits): what is kept of
    /// it, not its record, which is made on read (see `kept`).
    pub fn settled(&self, d: Draft<'_>, dead_lettered: bool, settled_at_ms: u64) {
        let Draft {
            held,
            kind,
            accepted_at_ms,
            plan,
            outcomes,
        } = d;
        self.store.put(SettledEvent {
            id: held.id,
            source: held.source,
            kind,
            accepted_at_ms,
            settled_at_ms,
            dead_lettered,
            rules: self.rules.fingerprint(),
            body: held.body,
            plan: plan.map(<[Action]>::to_vec),
            outcomes: outcomes
                .into_iter()
                .map(|(i, o)| (u32::try_from(i).unwrap_or(u32::MAX), o))
                .collect(),
        });
    }
}
