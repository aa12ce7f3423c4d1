//! An action (or a whole event) that could not be applied, with the event it
//! came from, and the one thing every inbox offers for them: a place to put
//! them.

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
        DeadLetter {
            id: 0,
            event_id: event_id.to_owned(),
            event_type: event_type.to_owned(),
            action,
            reason,
            detail: detail.into(),
            at_unix: super::clock::unix_now(),
            event: serde_json::from_slice(body).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// Where dead letters go: the journal in embedded mode, the dead-letter
/// exchange in broker mode.
pub trait DeadLetterSink: Send + Sync {
    fn record(&self, dl: DeadLetter);
}
