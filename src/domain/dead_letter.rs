//! An action (or a whole event) that could not be applied, with the event it
//! came from; the one thing every inbox offers for them, a place to put them;
//! and the receipt through which an event in the pipeline reaches the inbox
//! that holds it (to settle, or to keep a dead letter with its body).

use serde::{Deserialize, Serialize};

use super::{Action, DeadLetterReason};

/// An action that could not be applied, with the event it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Assigned by the store that keeps it.
    #[serde(default)]
    pub id: u64,
    pub event_id: String,
    pub event_type: String,
    /// `None`: the event as a whole could not be turned into actions.
    pub action: Option<Action>,
    pub reason: DeadLetterReason,
    /// The vendor's ErrorCode and ErrorInfo, or what else went wrong.
    pub detail: String,
    pub at_unix: u64,
    /// The event as accepted.
    pub event: serde_json::Value,
}

impl DeadLetter {
    /// A dead letter stamped now, for the event whose accepted body is `body`.
    pub fn new(
        event_id: &str,
        event_type: &str,
        body: &[u8],
        action: Option<Action>,
        reason: DeadLetterReason,
        detail: impl Into<String>,
    ) -> DeadLetter {
        let mut dl = DeadLetter::unfilled(event_type, action, reason, detail);
        dl.event_id = event_id.to_owned();
        dl.fill_event(body);
        dl
    }

    /// A dead letter stamped now whose `event_id` is still empty and
    /// `event` still `Null`: the pipeline keeps neither, so the inbox
    /// holding the event fills them in (see
    /// [`Settle::action_dead_lettered`]).
    pub fn unfilled(
        event_type: &str,
        action: Option<Action>,
        reason: DeadLetterReason,
        detail: impl Into<String>,
    ) -> DeadLetter {
        DeadLetter {
            id: 0,
            event_id: String::new(),
            event_type: event_type.to_owned(),
            action,
            reason,
            detail: detail.into(),
            at_unix: super::clock::unix_now(),
            event: serde_json::Value::Null,
        }
    }

    /// Sets `event` from the event's accepted body (`Null` if it is not
    /// JSON).
    pub fn fill_event(&mut self, body: &[u8]) {
        self.event = serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
    }
}

/// Where dead letters go: the journal in embedded mode, the dead-letter
/// exchange in broker mode.
pub trait DeadLetterSink: Send + Sync {
    fn record(&self, dl: DeadLetter);
}

/// An accepted event as the inbox that holds it has it: its id and its
/// body as accepted (for its record; the pipeline keeps neither).
#[derive(Debug, Clone)]
pub struct HeldEvent {
    pub id: String,
    pub source: super::Source,
    pub body: Vec<u8>,
}

/// How an accepted event is settled with the inbox it came from: the one
/// handle the pipeline keeps per event while its actions are pending.
pub trait Settle: Send + 'static {
    /// Every action it produced has settled.
    fn settled(self: Box<Self>);
    /// It could not be turned into actions: kept as `dl` (and `body`, the
    /// message as it came), never dropped.
    fn dead_lettered(self: Box<Self>, dl: DeadLetter, body: Vec<u8>);
    /// One of its actions could not be applied: `dl` (its `event_id` still
    /// empty, its `event` still `Null`) is kept with both filled in by the
    /// inbox, which holds the event; recorded before this receipt's
    /// `settled`.
    fn action_dead_lettered(&self, dl: DeadLetter);
    /// The event, read back from where the inbox keeps it, for its record;
    /// `None` where there is no event (a sweep's removals) or it cannot be
    /// read.
    fn event(&self) -> Option<HeldEvent> {
        None
    }
}
