//! The vocabulary every stage shares, and that depends on no stage:
//! identifiers, the upstream operations, actions, dead letters, the bounded
//! outcome labels, the clock, whether this process may dispatch
//! (`Active`, which the inbox, the dispatcher and sweeps all consult), and
//! how far the record store has made its records durable (`Durable`, which
//! the inboxes wait for).

pub mod action;
pub mod active;
pub mod api;
pub mod clock;
pub mod dead_letter;
pub mod durable;
pub mod ids;
pub mod outcome;
pub mod webhook_key;

pub use action::Action;
pub use active::Active;
pub use api::Api;
pub use dead_letter::{DeadLetter, DeadLetterSink, HeldEvent, Settle};
pub use durable::Durable;
pub use ids::{ChannelId, IdError, UserId, CHANNEL_PREFIX};
pub use outcome::{CallbackResult, DeadLetterReason, ItemResult, RecordDrop, RejectReason, Source};
pub use webhook_key::WebhookKey;
