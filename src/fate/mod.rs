//! Every event's fate, on record: what it asked for and what became of each
//! action (`record`), where settled records are kept and looked up by id or
//! by user (`FateStore`; embedded mode's implementation is `disk`, files
//! under `journal.path/records/`; broker mode's is `broker`, the RabbitMQ
//! stream `<queue>.records` read back into a local copy on every replica),
//! what the pipeline knows of events still
//! in flight (`InFlight`), and the signed completion callbacks that carry
//! each record to the app (`callbacks`).
//!
//! A record is written once, when its event settles, in the compact form
//! `kept` describes (body, rules fingerprint, packed outcomes), and made
//! into an `EventRecord` only when read; until it settles the pipeline
//! answers for it from memory. Writing is handed to the store's
//! own writer and never waits on the disk, so the clean-up is never slowed
//! by it: a store that cannot keep up drops records and counts them.

pub mod broker;
pub mod callbacks;
pub mod disk;
pub mod kept;
pub mod record;
pub mod recorder;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use crate::domain::Durable;
pub use kept::{RulesBook, SettledEvent};
pub use record::{
    ActionRecord, ActionResult, Counts, DeadLetteredAccount, EventRecord, ItemOutcome, LastCall,
    RecordBuilder, Settled, Status, WaitingFor,
};

/// Where a record is in a store, in write order: records written later have
/// greater positions. The callbacks' cursor is one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Position {
    /// A file (embedded mode), or 0 for a store that is one log.
    pub segment: u64,
    pub offset: u64,
}

/// How far the callbacks have gone: every record up to and including
/// `after` was delivered or given up (`None`: nothing yet, start with the
/// first record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallbackCursor {
    pub after: Option<Position>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum FateError {
    #[error("record store: {0}")]
    Storage(String),
    #[error("the record store is closed")]
    Closed,
}

/// What `/metrics` shows about a store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Bytes its files take.
    pub bytes: u64,
    /// Records it holds.
    pub records: u64,
}

/// Why an id is not known, as the 404 of `GET /v1/events/{id}` says it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Absent {
    /// Records are deleted after this long (humantime), so an older one
    /// may have expired.
    pub retention: String,
    /// The event may be accepted and still waiting where no record exists
    /// yet (a broker's queue).
    pub may_be_queued: bool,
    /// The same, for a person.
    pub detail: String,
}

/// Where settled events' records are kept.
pub trait FateStore: Send + Sync + 'static {
    /// Hands a settled event to the writer and returns at once. If the
    /// writer is too far behind, it is dropped and counted
    /// (`chat_janitor_records_dropped_total`), never waited for.
    fn put(&self, event: SettledEvent);

    /// The newest record of event `id` that has not expired.
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<EventRecord>, FateError>>;

    /// Records about `user_id`, newest first (one per event id), at most
    /// `limit`.
    fn by_user<'a>(
        &'a self,
        user_id: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<EventRecord>, FateError>>;

    /// What it holds.
    fn stats(&self) -> StoreStats;

    /// What an id it does not know may mean.
    fn absent(&self) -> Absent;

    /// Records written after `after` (from the first with `None`), in
    /// write order, at most `limit`: what the callbacks read.
    fn read_after(
        &self,
        after: Option<Position>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<(Position, EventRecord)>, FateError>>;

    /// The position of the newest durable record, updated as records are
    /// written (callbacks wait on it).
    fn written(&self) -> watch::Receiver<Option<Position>>;

    /// Where the callbacks stopped last time; `None` if they never ran on
    /// this store (or were turned off since).
    fn cursor(&self) -> Option<CallbackCursor>;

    /// Stores the callbacks' cursor durably; `None` forgets it (callbacks
    /// turned off: when they are turned on again they start with the
    /// records written from then on).
    fn save_cursor(&self, cursor: Option<CallbackCursor>) -> BoxFuture<'_, Result<(), FateError>>;

    /// How far its writing has got, for an inbox that must not forget an
    /// event before its record is durable (`None`: it need not wait).
    fn durable(&self) -> Option<Durable> {
        None
    }

    /// Writes everything handed over so far and stops the writer (the end
    /// of a graceful shutdown).
    fn close(&self) -> BoxFuture<'_, ()>;
}

/// What the pipeline knows of events not yet settled. A pending event is
/// answered from here, the store only has settled ones.
pub trait InFlight: Send + Sync + 'static {
    /// The record so far of event `id`, if it is in flight.
    fn pending(&self, id: &str) -> Option<EventRecord>;

    /// Records so far of in-flight events about `user_id`, at most `limit`.
    fn pending_for_user(&self, user_id: &str, limit: usize) -> Vec<EventRecord>;
}
