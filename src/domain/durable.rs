//! How far the record store has made what it was handed durable: the one
//! thing the inboxes need of it (they wait for it before they forget a
//! settled event), kept here so that the inbox does not depend on the
//! store.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

/// How far a store has made the records handed to it durable, in hand-over
/// order. The inbox waits for it before it forgets a settled event (broker
/// mode acks its message; the journal applies its settle), so an event it
/// has forgotten always has its record (and its callback); one it has not
/// is delivered again after a crash and gets them. A record the store
/// dropped (counted) is not waited for.
#[derive(Debug, Clone)]
pub struct Durable {
    handed: Arc<AtomicU64>,
    done: watch::Receiver<u64>,
}

impl Durable {
    /// A new one, and what the store's writer advances it with.
    pub fn new() -> (Durable, watch::Sender<u64>) {
        let (tx, done) = watch::channel(0);
        let handed = Arc::new(AtomicU64::new(0));
        (Durable { handed, done }, tx)
    }

    /// Counts one more record handed to the store (before it is sent to
    /// the writer: a mark read meanwhile then covers it too).
    pub fn handed_one(&self) {
        self.handed.fetch_add(1, Ordering::AcqRel);
    }

    /// Every record handed over so far.
    pub fn mark(&self) -> u64 {
        self.handed.load(Ordering::Acquire)
    }

    /// Whether every record up to `mark` is durable now.
    pub fn is_reached(&self, mark: u64) -> bool {
        *self.done.borrow() >= mark
    }

    /// Returns once every record up to `mark` is durable, or the store is
    /// gone (it outlives the inbox, which closes after it). A store that
    /// gives up at shutdown never gets there: the event's message is then
    /// not acked, and is delivered again.
    pub async fn reached(&self, mark: u64) {
        let mut done = self.done.clone();
        let _ = done.wait_for(|n| *n >= mark).await;
    }
}
