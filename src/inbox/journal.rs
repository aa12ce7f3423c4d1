//! The embedded mode's durable inbox: a redb file. Accepted events are
//! appended and fsynced before the 202 (group commit: one fsync for every
//! append that arrived while the previous commit ran), removed once settled
//! (so the file stops growing), and replayed on start if they were not.
//! Dead letters live here too, with the event they came from.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};

use crate::domain::clock::{unix_ms, unix_now};
use crate::domain::DeadLetter;

mod sweeps;

/// seq -> stored record (see `Record`).
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
/// webhook-id -> unix seconds accepted (dedupe window).
const IDS: TableDefinition<&str, u64> = TableDefinition::new("ids");
/// dead-letter id -> JSON `DeadLetter`.
const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
/// counters: "next_seq", "next_dead".
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Most appends waiting for a commit; beyond it the edge answers 503.
const MAX_QUEUED_APPENDS: usize = 16_384;
/// Most commands folded into one write transaction.
const MAX_GROUP: usize = 4_096;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal storage error: {0}")]
    Storage(String),
    #[error("journal is busy")]
    Busy,
    #[error("journal is closed")]
    Closed,
}

impl<E: Into<redb::Error>> From<E> for JournalError {
    fn from(e: E) -> Self {
        JournalError::Storage(e.into().to_string())
    }
}

/// The result of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    New(u64),
    /// This id was accepted before (within the dedupe window).
    Duplicate,
}

/// What a journal entry holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Record {
    /// An accepted event: its id and compact JSON, stored as JSON (not as an
    /// escaped string, which would cost a copy and an escape per event).
    Event {
        id: String,
        received_unix_ms: u64,
        body: Box<RawValue>,
    },
    /// A dead letter put back to work.
    Replay {
        received_unix_ms: u64,
        dead_letter: DeadLetter,
    },
}

type AppendReply = oneshot::Sender<Result<Appended, JournalError>>;

enum Cmd {
    Append {
        id: String,
        body: Box<RawValue>,
        reply: AppendReply,
    },
    Settle(u64),
    DeadLetter(Box<DeadLetter>),
    Replay {
        ids: Option<Vec<u64>>,
        reply: oneshot::Sender<Result<usize, JournalError>>,
    },
    Prune {
        older_than_unix: u64,
    },
    Sync(oneshot::Sender<()>),
}

/// A handle on the journal; cheap to clone.
#[derive(Clone)]
pub struct Journal {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<Database>,
    tx: mpsc::UnboundedSender<Cmd>,
    append_slots: Arc<Semaphore>,
    /// Wakes the intake loop when something new is committed.
    committed: Arc<Notify>,
    pending: Arc<AtomicU64>,
    path: PathBuf,
    /// Set when intake stops: appends are refused from then on.
    closed: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.inner.path)
            .finish()
    }
}

impl Journal {
    /// Opens (or creates) `dir/journal.redb` and starts the writer thread.
    pub fn open(dir: &Path) -> Result<Journal, JournalError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| JournalError::Storage(format!("{}: {e}", dir.display())))?;
        let path = dir.join("journal.redb");
        let mut db = Database::create(&path)?;
        // Settled entries were deleted; give their pages back to the OS.
        let _ = db.compact();
        let txn = db.begin_write()?;
        let pending = {
            let events = txn.open_table(EVENTS)?;
            txn.open_table(IDS)?;
            txn.open_table(DEAD)?;
            txn.open_table(META)?;
            events.len()?
        };
        txn.commit()?;
        let db = Arc::new(db);
        let (tx, rx) = mpsc::unbounded_channel();
        let committed = Arc::new(Notify::new());
        let pending = Arc::new(AtomicU64::new(pending));
        let writer_db = db.clone();
        let writer_notify = committed.clone();
        let writer_pending = pending.clone();
        std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || writer(writer_db, rx, writer_notify, writer_pending))
            .map_err(|e| JournalError::Storage(e.to_string()))?;
        Ok(Journal {
            inner: Arc::new(Inner {
                db,
                tx,
                append_slots: Arc::new(Semaphore::new(MAX_QUEUED_APPENDS)),
                committed,
                pending,
                path,
                closed: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }

    /// Appends an event and returns once it is on disk (or known already).
    pub async fn append(&self, id: &str, body: Box<RawValue>) -> Result<Appended, JournalError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(JournalError::Closed);
        }
        let _slot = tokio::time::timeout(Duration::from_secs(1), self.inner.append_slots.acquire())
            .await
            .map_err(|_| JournalError::Busy)?
            .map_err(|_| JournalError::Closed)?;
        let (reply, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Cmd::Append {
                id: id.to_owned(),
                body,
                reply,
            })
            .map_err(|_| JournalError::Closed)?;
        rx.await.map_err(|_| JournalError::Closed)?
    }

    /// Refuses further appends (shutdown); everything else goes on.
    pub fn close_intake(&self) {
        self.inner.closed.store(true, Ordering::Release);
    }

    /// Marks an entry settled (removed in a later group commit).
    pub fn settle(&self, seq: u64) {
        let _ = self.inner.tx.send(Cmd::Settle(seq));
    }

    /// Records a dead letter; ordered before any later `settle`.
    pub fn dead_letter(&self, dl: DeadLetter) {
        let _ = self.inner.tx.send(Cmd::DeadLetter(Box::new(dl)));
    }

    /// Moves dead letters (all, or the given ids) back to work as one
    /// journal entry, atomically. Returns how many.
    pub async fn replay_dead_letters(&self, ids: Option<Vec<u64>>) -> Result<usize, JournalError> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Cmd::Replay { ids, reply })
            .map_err(|_| JournalError::Closed)?;
        rx.await.map_err(|_| JournalError::Closed)?
    }

    /// Drops dedupe ids accepted before `older_than_unix`.
    pub fn prune_ids(&self, older_than_unix: u64) {
        let _ = self.inner.tx.send(Cmd::Prune { older_than_unix });
    }

    /// Waits until everything sent so far is committed durably.
    pub async fn sync(&self) -> Result<(), JournalError> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Cmd::Sync(reply))
            .map_err(|_| JournalError::Closed)?;
        rx.await.map_err(|_| JournalError::Closed)
    }

    /// Resolves when a commit added entries (or at once if one did since the
    /// last call).
    pub async fn committed(&self) {
        self.inner.committed.notified().await;
    }

    /// Entries not yet settled.
    pub fn pending(&self) -> u64 {
        self.inner.pending.load(Ordering::Relaxed)
    }

    /// Up to `limit` entries with seq >= `from`, in order.
    pub async fn read_from(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Record)>, JournalError> {
        let db = self.inner.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read()?;
            let table = txn.open_table(EVENTS)?;
            let mut out = Vec::with_capacity(limit.min(1024));
            for entry in table.range(from..)?.take(limit) {
                let (k, v) = entry?;
                match serde_json::from_slice::<Record>(v.value()) {
                    Ok(r) => out.push((k.value(), r)),
                    Err(e) => tracing::error!(seq = k.value(), error = %e, "unreadable journal entry skipped"),
                }
            }
            Ok(out)
        })
        .await
        .map_err(|e| JournalError::Storage(e.to_string()))?
    }

    /// Dead letters in id order, at most `limit`.
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, JournalError> {
        let db = self.inner.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read()?;
            let table = txn.open_table(DEAD)?;
            let mut out = Vec::new();
            for entry in table.iter()?.take(limit) {
                let (_, v) = entry?;
                if let Ok(dl) = serde_json::from_slice(v.value()) {
                    out.push(dl);
                }
            }
            Ok(out)
        })
        .await
        .map_err(|e| JournalError::Storage(e.to_string()))?
    }
}

fn next_counter(meta: &mut redb::Table<&str, u64>, key: &str) -> Result<u64, JournalError> {
    let n = meta.get(key)?.map(|v| v.value()).unwrap_or(1);
    meta.insert(key, n + 1)?;
    Ok(n)
}

/// How long the writer waits for more appends once several are queued.
const GATHER: Duration = Duration::from_micros(300);

fn drain_into(rx: &mut mpsc::UnboundedReceiver<Cmd>, group: &mut Vec<Cmd>) {
    while group.len() < MAX_GROUP {
        match rx.try_recv() {
            Ok(c) => group.push(c),
            Err(_) => break,
        }
    }
}

/// The single writer: folds every queued command into one transaction.
fn writer(
    db: Arc<Database>,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    committed: Arc<Notify>,
    pending: Arc<AtomicU64>,
) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while let Some(first) = rx.blocking_recv() {
        group.push(first);
        drain_into(&mut rx, &mut group);
        // Appends under load arrive a few microseconds apart: waiting a
        // moment gathers many more of them into this commit, so each pays a
        // smaller share of its fsync and bookkeeping (at most GATHER more
        // latency before a 202).
        let appends = group
            .iter()
            .filter(|c| matches!(c, Cmd::Append { .. }))
            .count();
        if appends > 1 && group.len() < MAX_GROUP / 4 {
            std::thread::sleep(GATHER);
            drain_into(&mut rx, &mut group);
        }
        let mut replies: Vec<(AppendReply, Result<Appended, JournalError>)> = Vec::new();
        let mut replay_replies = Vec::new();
        let mut syncs = Vec::new();
        let result = (|| -> Result<(bool, i64), JournalError> {
            let mut txn = db.begin_write()?;
            let mut durable = false;
            let mut added = false;
            let mut delta: i64 = 0;
            {
                let mut events = txn.open_table(EVENTS)?;
                let mut ids = txn.open_table(IDS)?;
                let mut dead = txn.open_table(DEAD)?;
                let mut meta = txn.open_table(META)?;
                for cmd in group.drain(..) {
                    match cmd {
                        Cmd::Append { id, body, reply } => {
                            durable = true;
                            if ids.get(id.as_str())?.is_some() {
                                replies.push((reply, Ok(Appended::Duplicate)));
                                continue;
                            }
                            let seq = next_counter(&mut meta, "next_seq")?;
                            let rec = Record::Event {
                                id: id.clone(),
                                received_unix_ms: unix_ms(),
                                body,
                            };
                            let bytes = serde_json::to_vec(&rec).expect("records serialize");
                            events.insert(seq, bytes.as_slice())?;
                            ids.insert(id.as_str(), unix_now())?;
                            added = true;
                            delta += 1;
                            replies.push((reply, Ok(Appended::New(seq))));
                        }
                        Cmd::Settle(seq) => {
                            if events.remove(seq)?.is_some() {
                                delta -= 1;
                            }
                        }
                        Cmd::DeadLetter(mut dl) => {
                            durable = true;
                            dl.id = next_counter(&mut meta, "next_dead")?;
                            let bytes = serde_json::to_vec(&dl).expect("dead letters serialize");
                            dead.insert(dl.id, bytes.as_slice())?;
                        }
                        Cmd::Replay { ids: which, reply } => {
                            durable = true;
                            let mut n = 0;
                            let keys: Vec<u64> = match which {
                                Some(v) => v,
                                None => dead
                                    .iter()?
                                    .filter_map(|e| e.ok().map(|(k, _)| k.value()))
                                    .collect(),
                            };
                            for k in keys {
                                if let Some(v) = dead.remove(k)? {
                                    let Ok(dl) = serde_json::from_slice::<DeadLetter>(v.value())
                                    else {
                                        continue;
                                    };
                                    let seq = next_counter(&mut meta, "next_seq")?;
                                    let rec = Record::Replay {
                                        received_unix_ms: unix_ms(),
                                        dead_letter: dl,
                                    };
                                    let bytes =
                                        serde_json::to_vec(&rec).expect("records serialize");
                                    events.insert(seq, bytes.as_slice())?;
                                    added = true;
                                    delta += 1;
                                    n += 1;
                                }
                            }
                            replay_replies.push((reply, n));
                        }
                        Cmd::Prune { older_than_unix } => {
                            ids.retain(|_, at| at >= older_than_unix)?;
                        }
                        Cmd::Sync(reply) => {
                            durable = true;
                            syncs.push(reply);
                        }
                    }
                }
            }
            // Settles alone need no fsync: losing one only replays an
            // event whose calls are idempotent upstream.
            txn.set_durability(if durable {
                Durability::Immediate
            } else {
                Durability::None
            })
            .map_err(|e| JournalError::Storage(e.to_string()))?;
            txn.commit()?;
            Ok((added, delta))
        })();
        match result {
            Ok((added, delta)) => {
                if delta >= 0 {
                    pending.fetch_add(delta as u64, Ordering::Relaxed);
                } else {
                    pending.fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
                }
                for (reply, r) in replies {
                    let _ = reply.send(r);
                }
                for (reply, n) in replay_replies {
                    let _ = reply.send(Ok(n));
                }
                for s in syncs {
                    let _ = s.send(());
                }
                if added {
                    committed.notify_one();
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "journal commit failed");
                for (reply, _) in replies {
                    let _ = reply.send(Err(JournalError::Storage(e.to_string())));
                }
                for (reply, _) in replay_replies {
                    let _ = reply.send(Err(JournalError::Storage(e.to_string())));
                }
                group.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    async fn round(j: &Journal, start: usize, n: usize) {
        let body = raw(&format!(
            r#"{{"type":"user.banned","data":{{"user_id":"{}"}}}}"#,
            "x".repeat(200)
        ));
        // Concurrent appends share fsyncs (group commit), as webhooks do.
        let appends = (start..start + n).map(|i| {
            let (j, body) = (j.clone(), body.clone());
            async move { j.append(&format!("id-{i}"), body).await.unwrap() }
        });
        let seqs: Vec<u64> = futures_util::future::join_all(appends)
            .await
            .into_iter()
            .map(|a| match a {
                Appended::New(seq) => seq,
                Appended::Duplicate => panic!("fresh id"),
            })
            .collect();
        for s in seqs {
            j.settle(s);
        }
        j.sync().await.unwrap();
    }

    #[tokio::test]
    async fn settled_entries_free_their_space_and_ids_dedupe() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let file = dir.path().join("journal.redb");
        round(&j, 0, 3000).await;
        assert_eq!(j.pending(), 0);
        let after_first = std::fs::metadata(&file).unwrap().len();
        for r in 1..4 {
            round(&j, r * 3000, 3000).await;
        }
        let after_four = std::fs::metadata(&file).unwrap().len();
        // The ids are kept for dedupe (pruned after a week), the events are
        // not: four rounds must not take anything like four times the room.
        assert!(
            after_four < after_first * 3,
            "{after_first} bytes after one round, {after_four} after four"
        );
        assert_eq!(
            j.append("id-7", raw("{}")).await.unwrap(),
            Appended::Duplicate
        );
        j.prune_ids(u64::MAX);
        j.sync().await.unwrap();
        assert!(matches!(
            j.append("id-7", raw("{}")).await.unwrap(),
            Appended::New(_)
        ));
    }

    #[tokio::test]
    async fn unsettled_entries_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = Journal::open(dir.path()).unwrap();
            j.append("a", raw("{\"n\":1}")).await.unwrap();
            j.append("b", raw("{\"n\":2}")).await.unwrap();
            let first = j.read_from(0, 10).await.unwrap();
            j.settle(first[0].0);
            j.sync().await.unwrap();
        }
        // The writer thread ends with the last handle; give it a moment.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let j = Journal::open(dir.path()).unwrap();
        let left = j.read_from(0, 10).await.unwrap();
        assert_eq!(left.len(), 1);
        assert!(matches!(&left[0].1, Record::Event { id, .. } if id == "b"));
        assert_eq!(j.pending(), 1);
    }
}
