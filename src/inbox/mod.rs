//! Where accepted events wait until they settle, behind one trait with two
//! implementations:
//! - embedded mode, `journal` (a redb file, fsynced before the 202; see
//!   `embedded` for its `Inbox`);
//! - broker mode, `broker` and `consumer` (RabbitMQ: published with
//!   confirms before the 202, consumed and acked once settled).
//!
//! An inbox stores what the webhook edge accepts, hands deliveries to the
//! one intake loop (see the `intake` module), and settles or dead-letters
//! each.

pub mod broker;
pub mod consumer;
pub mod dead_letters;
pub mod embedded;
#[doc(hidden)]
pub use crate::storage_faults as faults;
pub mod journal;
pub mod lease;
pub mod sweep_log;

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use crate::domain::Settle;
use crate::domain::{Action, DeadLetterSink, Source};
use crate::telemetry::Metrics;
use broker::BrokerError;
use journal::JournalError;

/// What an inbox operation resolves to.
pub type InboxFuture<'a, T> = BoxFuture<'a, Result<T, InboxError>>;

/// What storing an accepted webhook gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Durable now.
    New,
    /// This id was accepted before (within the dedupe window).
    Duplicate,
}

/// Why an inbox could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// This inbox has no such operation.
    #[error("{0}")]
    Unsupported(&'static str),
}

impl InboxError {
    /// Storage is only momentarily full: expected under load, not worth an
    /// error log.
    pub fn is_busy(&self) -> bool {
        matches!(self, InboxError::Journal(JournalError::Busy))
    }
}

/// What a delivery holds.
#[derive(Debug)]
pub enum Content {
    /// The event document as accepted.
    Event(Vec<u8>),
    /// A dead letter put back to work: its action as it was, or (`None`)
    /// the whole event planned anew.
    Replay {
        event_type: String,
        event: Vec<u8>,
        action: Option<Action>,
    },
    /// Broker mode: a sweep command (see `sweep_log`), for the sweeps
    /// rather than the pipeline.
    Sweep(Vec<u8>),
}

/// An accepted event on its way into the pipeline.
pub struct Delivery {
    /// The webhook-id or AMQP message_id.
    pub id: String,
    pub source: Source,
    /// Whether it is counted as received only now (it entered through the
    /// broker), not already at the webhook edge.
    pub count_received: bool,
    pub accepted_at: Instant,
    pub content: Content,
    pub receipt: Box<dyn Settle>,
}

/// The durable home of accepted events.
pub trait Inbox: DeadLetterSink + Send + Sync + 'static {
    /// Stores an accepted webhook (its body as received) durably, or says
    /// it has it already.
    fn store<'a>(&'a self, id: &'a str, body: Vec<u8>) -> InboxFuture<'a, Stored>;

    /// Accepted events, oldest first, starting with whatever a previous
    /// run left unsettled; ends when `stop` fires. Taken once, by the
    /// intake loop.
    fn deliveries(&self, stop: CancellationToken) -> BoxStream<'static, Delivery>;

    /// Dead letters, oldest first, at most `limit`, as the admin route
    /// shows them.
    fn dead_letters(&self, limit: usize) -> InboxFuture<'_, Vec<serde_json::Value>>;

    /// Puts dead letters (all, or the given ids) back to work.
    fn replay(&self, ids: Option<Vec<u64>>) -> InboxFuture<'_, usize>;

    /// Why events cannot be accepted now, if so.
    fn not_ready(&self) -> Option<String>;

    /// Why the process should be restarted, if so (a journal that cannot be
    /// reopened): `/healthz` fails so the orchestrator is told.
    fn broken(&self) -> Option<String> {
        None
    }

    /// Whether it holds accepted events not yet settled (an event asked
    /// about may be waiting among them). The broker cannot tell: yes.
    fn holds_unsettled(&self) -> bool {
        true
    }

    /// Brings this inbox's gauges up to date (at each scrape).
    fn observe(&self, metrics: &Metrics);

    /// Refuses further webhooks (shutdown); deliveries and settles go on.
    fn close_intake(&self);

    /// After the pipeline drained: makes every settle durable and lets go.
    fn close(&self) -> BoxFuture<'_, ()>;
}
