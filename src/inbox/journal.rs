//! The embedded mode's durable inbox: a redb file. Accepted events are
//! appended and fsynced before the 202 (group commit: one fsync for every
//! append that arrived while the previous commit ran), removed once settled
//! (so the file stops growing), and replayed on start if they were not.
//! Dead letters live here too, with the event they came from.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{oneshot, Notify, Semaphore};

pub use super::faults::StorageFaults;
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
    /// The journal cannot be opened at start: names the file and what to do.
    #[error("{0}")]
    Open(String),
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
/// Which dead letters to replay, and where to say how many were.
type ReplayCmd = (
    Option<Vec<u64>>,
    oneshot::Sender<Result<usize, JournalError>>,
);

enum Cmd {
    Append {
        id: String,
        body: Box<RawValue>,
        reply: AppendReply,
    },
    Settle(u64),
    DeadLetter(Box<DeadLetter>),
    /// A dead letter whose event (id and body) is read from the entry `seq`.
    DeadLetterFor(u64, Box<DeadLetter>),
    Replay {
        ids: Option<Vec<u64>>,
        reply: oneshot::Sender<Result<usize, JournalError>>,
    },
    Prune {
        older_than_unix: u64,
    },
    Sync(oneshot::Sender<Result<(), JournalError>>),
    Shutdown(oneshot::Sender<()>),
}

/// Whether the journal can write, as `/readyz` and `/healthz` report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalHealth {
    Ok,
    /// Writes fail (no space, an I/O error); the writer reopens the file with
    /// backoff and resumes by itself once they work.
    Failing(String),
    /// The file cannot be reopened (corrupt, gone, no permission): only an
    /// operator (or a restart) can help.
    Broken(String),
}

/// What `/metrics` shows about the journal's storage.
#[derive(Debug, Clone, Copy, Default)]
pub struct JournalStats {
    /// Commits (and reopens) that failed since start.
    pub write_errors: u64,
    pub file_bytes: u64,
    /// Space left for an unprivileged writer on the journal's filesystem.
    pub free_bytes: u64,
}

/// A handle on the journal; cheap to clone.
#[derive(Clone)]
pub struct Journal {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    tx: std::sync::mpsc::Sender<Cmd>,
    append_slots: Arc<Semaphore>,
    /// Set when intake stops: appends are refused from then on.
    closed: std::sync::atomic::AtomicBool,
}

/// What the writer thread and the handles share.
struct Shared {
    /// The open database; `None` while the writer could not reopen it.
    db: RwLock<Option<Arc<Database>>>,
    health: Mutex<JournalHealth>,
    write_errors: AtomicU64,
    /// Wakes the intake loop when something new is committed.
    committed: Notify,
    pending: AtomicU64,
    path: PathBuf,
    faults: Option<StorageFaults>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.inner.shared.path)
            .finish()
    }
}

/// A storage failure, and whether reopening the file may cure it.
#[derive(Debug)]
struct Fault {
    message: String,
    /// Corrupt, gone, not permitted: retrying will not help by itself.
    incurable: bool,
}

impl<E: Into<redb::Error>> From<E> for Fault {
    fn from(e: E) -> Self {
        let e = e.into();
        let incurable = match &e {
            redb::Error::Corrupted(_)
            | redb::Error::UpgradeRequired(_)
            | redb::Error::RepairAborted
            | redb::Error::LockProtocolMismatch => true,
            redb::Error::Io(io) => io_incurable(io),
            _ => false,
        };
        Fault {
            message: e.to_string(),
            incurable,
        }
    }
}

fn io_incurable(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        NotFound | PermissionDenied | ReadOnlyFilesystem | InvalidData | NotADirectory
    )
}

fn io_no_space(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), StorageFull | QuotaExceeded | FileTooLarge)
}

/// What an operator should do when the journal cannot be opened at start.
fn advice(e: &redb::Error) -> &'static str {
    match e {
        redb::Error::Corrupted(_) => {
            "the file is corrupt: move it aside (or restore a backup) and start again; its unsettled events are lost"
        }
        redb::Error::DatabaseAlreadyOpen | redb::Error::LockProtocolMismatch => {
            "another process has it open: stop that one, or give this one another journal.path"
        }
        redb::Error::UpgradeRequired(_) => "it was written by another version: upgrade it or move it aside",
        redb::Error::Io(io) if io.kind() == std::io::ErrorKind::InvalidData => {
            "it is not a journal (or is corrupt): move it aside and start again; its unsettled events are lost"
        }
        redb::Error::Io(io) if io_no_space(io) => {
            "its filesystem is full (opening it needs room to repair): free some space and start again"
        }
        redb::Error::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
            ) =>
        {
            "make the directory and the file writable by this process's user"
        }
        _ => "check the path, its permissions and the disk, then start again",
    }
}

/// Opens (creating if need be) the redb file and its tables; redb repairs a
/// file that was not closed cleanly (a crash, a failed commit) on the way.
fn open_db(path: &Path, faults: Option<&StorageFaults>) -> Result<Database, redb::Error> {
    let mut builder = Database::builder();
    // A file damaged outside redb is reported as corrupt instead of trusted
    // (a plain open may panic on it). The check reads the whole file, which
    // stays small: settled entries are deleted and the file compacted.
    builder.set_check_integrity_on_open(true);
    let db = match faults {
        Some(f) => builder.create_with_backend(f.open(path)?)?,
        None => builder.create(path)?,
    };
    let txn = db.begin_write()?;
    {
        txn.open_table(EVENTS)?;
        txn.open_table(IDS)?;
        txn.open_table(DEAD)?;
        txn.open_table(META)?;
    }
    txn.commit()?;
    Ok(db)
}

fn count_pending(db: &Database) -> Result<u64, redb::Error> {
    let txn = db.begin_read()?;
    Ok(txn.open_table(EVENTS)?.len()?)
}

impl Journal {
    /// Opens (or creates) `dir/journal.redb` and starts the writer thread.
    pub fn open(dir: &Path) -> Result<Journal, JournalError> {
        Self::open_with(dir, None)
    }

    /// `open`, with the file under a fault-injecting backend (tests).
    #[doc(hidden)]
    pub fn open_with(dir: &Path, faults: Option<StorageFaults>) -> Result<Journal, JournalError> {
        let path = dir.join("journal.redb");
        let cannot = |what: String, todo: &str| {
            JournalError::Open(format!(
                "cannot open the journal {}: {what}; {todo}",
                path.display()
            ))
        };
        std::fs::create_dir_all(dir).map_err(|e| {
            cannot(
                e.to_string(),
                advice(&redb::Error::Io(std::io::Error::new(e.kind(), ""))),
            )
        })?;
        let db = open_db(&path, faults.as_ref()).map_err(|e| cannot(e.to_string(), advice(&e)))?;
        let pending = count_pending(&db).map_err(|e| cannot(e.to_string(), advice(&e)))?;
        let shared = Arc::new(Shared {
            db: RwLock::new(Some(Arc::new(db))),
            health: Mutex::new(JournalHealth::Ok),
            write_errors: AtomicU64::new(0),
            committed: Notify::new(),
            pending: AtomicU64::new(pending),
            path: path.clone(),
            faults,
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let writer = Writer::new(shared.clone(), rx);
        std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| JournalError::Storage(e.to_string()))?;
        Ok(Journal {
            inner: Arc::new(Inner {
                shared,
                tx,
                append_slots: Arc::new(Semaphore::new(MAX_QUEUED_APPENDS)),
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

    /// Records `dl` with its `event_id` and `event` filled from the journal
    /// entry `seq` (read in the commit that stores it), ordered before any
    /// later settle of that entry.
    pub fn dead_letter_for(&self, seq: u64, dl: DeadLetter) {
        let _ = self.inner.tx.send(Cmd::DeadLetterFor(seq, Box::new(dl)));
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

    /// Waits until everything sent so far is committed durably; an error if
    /// the store cannot write now (what it holds is committed later).
    pub async fn sync(&self) -> Result<(), JournalError> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Cmd::Sync(reply))
            .map_err(|_| JournalError::Closed)?;
        rx.await.map_err(|_| JournalError::Closed)?
    }

    /// Commits what is held, closes the file and stops the writer (the end
    /// of a graceful shutdown; the file can be opened again at once).
    pub async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        if self.inner.tx.send(Cmd::Shutdown(reply)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Resolves when a commit added entries (or at once if one did since the
    /// last call).
    pub async fn committed(&self) {
        self.inner.shared.committed.notified().await;
    }

    /// Entries not yet settled.
    pub fn pending(&self) -> u64 {
        self.inner.shared.pending.load(Ordering::Relaxed)
    }

    /// Whether the journal can write now.
    pub fn health(&self) -> JournalHealth {
        self.inner.shared.health.lock().clone()
    }

    /// Write errors so far, the file's size and its filesystem's free space.
    pub fn stats(&self) -> JournalStats {
        self.inner.shared.stats()
    }

    fn db(&self) -> Result<Arc<Database>, JournalError> {
        self.inner.shared.db.read().clone().ok_or_else(|| {
            JournalError::Storage(match self.health() {
                JournalHealth::Failing(r) | JournalHealth::Broken(r) => r,
                JournalHealth::Ok => "the journal is being reopened".to_owned(),
            })
        })
    }

    /// Up to `limit` entries with seq >= `from`, in order.
    pub async fn read_from(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Record)>, JournalError> {
        let db = self.db()?;
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
        let db = self.db()?;
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

impl Shared {
    fn stats(&self) -> JournalStats {
        let file_bytes = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let free_bytes = rustix::fs::statvfs(dir)
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
            .unwrap_or(0);
        JournalStats {
            write_errors: self.write_errors.load(Ordering::Relaxed),
            file_bytes,
            free_bytes,
        }
    }

    fn set_health(&self, h: JournalHealth) {
        let mut cur = self.health.lock();
        if *cur != h {
            match &h {
                JournalHealth::Ok => tracing::info!("journal writes work again"),
                JournalHealth::Failing(r) => {
                    tracing::error!(reason = %r, "journal writes fail; retrying with backoff")
                }
                JournalHealth::Broken(r) => {
                    tracing::error!(reason = %r, "journal cannot be reopened; /healthz fails until it can")
                }
            }
            *cur = h;
        }
    }
}

fn next_counter(meta: &mut redb::Table<&str, u64>, key: &str) -> Result<u64, redb::Error> {
    let n = meta.get(key)?.map(|v| v.value()).unwrap_or(1);
    meta.insert(key, n + 1)?;
    Ok(n)
}

/// How long the writer waits for more appends once several are queued.
const GATHER: Duration = Duration::from_micros(300);
/// Settle-only commits are not fsynced; the next durable commit comes at
/// most this long after one (so a kill -9 replays at most this much).
pub const SETTLE_SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// First and longest wait before writing again after a failed commit.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Held in memory while commits fail: settles (8 bytes each; beyond the
/// bound the oldest are dropped, which only replays their events after a
/// restart) and dead letters (beyond the bound, see `Writer::hold_dead`).
const MAX_HELD_SETTLES: usize = 1_000_000;
const MAX_HELD_DEAD: usize = 10_000;
/// How often an idle writer looks at the file (gone? mostly free?).
const MAINTENANCE_EVERY: Duration = Duration::from_secs(5);
/// Compact when the file is at least this big and at most a quarter used.
const COMPACT_MIN_BYTES: u64 = 8 * 1024 * 1024;

fn drain_into(rx: &std::sync::mpsc::Receiver<Cmd>, group: &mut Vec<Cmd>) {
    while group.len() < MAX_GROUP {
        match rx.try_recv() {
            Ok(c) => group.push(c),
            Err(_) => break,
        }
    }
}

/// Record, borrowed: what `Record::Event` serializes to, without a copy.
#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum RecordRef<'a> {
    Event {
        id: &'a str,
        received_unix_ms: u64,
        body: &'a RawValue,
    },
}

/// The single writer: folds every queued command into one transaction; on a
/// storage error it keeps what must not be lost, reopens the file and tries
/// again with backoff.
struct Writer {
    shared: Arc<Shared>,
    rx: std::sync::mpsc::Receiver<Cmd>,
    /// Settles and dead letters whose commit failed, committed first next
    /// time (dead letters before settles, as they were sent).
    held_settles: VecDeque<u64>,
    /// Settles committed since the last durable commit.
    unsynced_settles: VecDeque<u64>,
    /// What those commits took off `pending`.
    unsynced_delta: i64,
    /// With the entry whose event fills a dead letter in, until it has.
    held_dead: Vec<(DeadLetter, Option<u64>)>,
    /// A dead letter was dropped: settles from then on are not committed,
    /// so their events (and that dead letter) come back after a restart.
    dead_overflowed: bool,
    /// Appends refused with an error whose commit might still have reached
    /// the disk: (id, seq), undone after the reopen.
    refused: Vec<(String, u64)>,
    /// Set after a failure: no commit is tried before this instant.
    retry_at: Option<Instant>,
    backoff: Duration,
    /// When the oldest commit not yet fsynced was made.
    undurable_since: Option<Instant>,
    last_maintenance: Instant,
    /// Shut down: the file is closed, every later command is refused.
    stopped: bool,
    /// The file was unlinked while open: broken until a restart.
    file_removed: bool,
}

impl Writer {
    fn new(shared: Arc<Shared>, rx: std::sync::mpsc::Receiver<Cmd>) -> Writer {
        Writer {
            shared,
            rx,
            held_settles: VecDeque::new(),
            unsynced_settles: VecDeque::new(),
            unsynced_delta: 0,
            held_dead: Vec::new(),
            dead_overflowed: false,
            refused: Vec::new(),
            retry_at: None,
            backoff: BACKOFF_MIN,
            undurable_since: None,
            // The first look (compaction after a backlog) soon after start.
            last_maintenance: Instant::now() - MAINTENANCE_EVERY + Duration::from_millis(200),
            stopped: false,
            file_removed: false,
        }
    }

    fn run(mut self) {
        let mut group = Vec::with_capacity(MAX_GROUP);
        loop {
            let wait = self.next_wake();
            match self.rx.recv_timeout(wait) {
                Ok(first) => {
                    group.push(first);
                    drain_into(&self.rx, &mut group);
                    // Appends under load arrive a few microseconds apart:
                    // waiting a moment gathers many more of them into this
                    // commit, so each pays a smaller share of its fsync and
                    // bookkeeping (at most GATHER more latency before a 202).
                    let appends = group
                        .iter()
                        .filter(|c| matches!(c, Cmd::Append { .. }))
                        .count();
                    if appends > 1 && group.len() < MAX_GROUP / 4 && self.retry_at.is_none() {
                        std::thread::sleep(GATHER);
                        drain_into(&self.rx, &mut group);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // The last handle is gone: a final durable commit of what
                    // is held or not yet fsynced.
                    if self.undurable_since.is_some() || !self.held_settles.is_empty() {
                        self.retry_at = None;
                        self.process(Vec::new(), true);
                    }
                    return;
                }
            }
            let due = self
                .undurable_since
                .is_some_and(|t| t.elapsed() >= SETTLE_SYNC_INTERVAL);
            let retry_due = self.retry_at.is_some_and(|t| Instant::now() >= t);
            if !group.is_empty() || due || retry_due {
                self.process(std::mem::take(&mut group), due);
                group = Vec::with_capacity(MAX_GROUP);
                if self.stopped {
                    return;
                }
            } else if self.last_maintenance.elapsed() >= MAINTENANCE_EVERY {
                self.last_maintenance = Instant::now();
                self.maintain();
            }
        }
    }

    fn next_wake(&self) -> Duration {
        let now = Instant::now();
        let mut at = self.last_maintenance + MAINTENANCE_EVERY;
        if let Some(t) = self.undurable_since {
            at = at.min(t + SETTLE_SYNC_INTERVAL);
        }
        if let Some(t) = self.retry_at {
            at = at.min(t);
        }
        at.saturating_duration_since(now)
            .max(Duration::from_millis(1))
    }

    fn hold_settle(&mut self, seq: u64) {
        if self.dead_overflowed {
            return;
        }
        if self.held_settles.len() >= MAX_HELD_SETTLES {
            self.held_settles.pop_front();
        }
        self.held_settles.push_back(seq);
    }

    fn hold_dead(&mut self, dl: DeadLetter, from: Option<u64>) {
        if self.held_dead.len() >= MAX_HELD_DEAD {
            if !self.dead_overflowed {
                tracing::error!(
                    "journal: too many dead letters held while writes fail; events settled from now on are replayed after a restart instead"
                );
            }
            self.dead_overflowed = true;
            return;
        }
        self.held_dead.push((dl, from));
    }

    /// One group: commits it (with whatever is held), or answers and holds
    /// it if the store cannot write now.
    fn process(&mut self, group: Vec<Cmd>, force_durable: bool) {
        let mut appends = Vec::new();
        let mut replays = Vec::new();
        let mut prunes = Vec::new();
        let mut syncs = Vec::new();
        let mut shutdown = None;
        for cmd in group {
            match cmd {
                Cmd::Append { id, body, reply } => appends.push((id, body, reply)),
                Cmd::Settle(seq) => self.hold_settle(seq),
                Cmd::DeadLetter(dl) => self.hold_dead(*dl, None),
                Cmd::DeadLetterFor(seq, dl) => self.hold_dead(*dl, Some(seq)),
                Cmd::Replay { ids, reply } => replays.push((ids, reply)),
                Cmd::Prune { older_than_unix } => prunes.push(older_than_unix),
                Cmd::Sync(reply) => syncs.push(reply),
                Cmd::Shutdown(reply) => shutdown = Some(reply),
            }
        }
        if let Some(reply) = shutdown {
            self.retry_at = None;
            self.commit_or_refuse(appends, replays, prunes, syncs, true);
            self.close_db();
            self.stopped = true;
            let _ = reply.send(());
            return;
        }
        self.commit_or_refuse(appends, replays, prunes, syncs, force_durable);
    }

    fn commit_or_refuse(
        &mut self,
        appends: Vec<(String, Box<RawValue>, AppendReply)>,
        replays: Vec<ReplayCmd>,
        prunes: Vec<u64>,
        syncs: Vec<oneshot::Sender<Result<(), JournalError>>>,
        force_durable: bool,
    ) {
        let waiting = self.retry_at.is_some_and(|t| Instant::now() < t);
        let db = if waiting {
            None
        } else {
            self.retry_at = None;
            let current = self.shared.db.read().clone();
            current.or_else(|| self.reopen())
        };
        let Some(db) = db else {
            self.refuse(appends, replays, syncs);
            return;
        };
        let durable = force_durable
            || !appends.is_empty()
            || !self.held_dead.is_empty()
            || !replays.is_empty()
            || !syncs.is_empty();
        let mut results = Vec::with_capacity(appends.len());
        let mut replayed = Vec::with_capacity(replays.len());
        let outcome = self.commit(
            &db,
            &appends,
            &mut results,
            &replays,
            &mut replayed,
            &prunes,
            durable,
        );
        drop(db);
        match outcome {
            Ok((added, delta)) => {
                let pending = &self.shared.pending;
                if delta >= 0 {
                    pending.fetch_add(delta as u64, Ordering::Relaxed);
                } else {
                    pending.fetch_sub(
                        delta.unsigned_abs().min(pending.load(Ordering::Relaxed)),
                        Ordering::Relaxed,
                    );
                }
                if durable {
                    self.unsynced_settles.clear();
                    self.unsynced_delta = 0;
                    self.held_settles.clear();
                } else {
                    self.unsynced_delta += delta;
                    // Lost if the file must be reopened before the next
                    // durable commit: kept until then.
                    self.unsynced_settles.extend(self.held_settles.drain(..));
                }
                self.held_dead.clear();
                self.undurable_since = if durable {
                    None
                } else {
                    self.undurable_since.or(Some(Instant::now()))
                };
                self.backoff = BACKOFF_MIN;
                if !self.file_removed {
                    self.shared.set_health(JournalHealth::Ok);
                }
                for ((_, _, reply), r) in appends.into_iter().zip(results) {
                    let _ = reply.send(Ok(r));
                }
                for ((_, reply), n) in replays.into_iter().zip(replayed) {
                    let _ = reply.send(Ok(n));
                }
                for s in syncs {
                    let _ = s.send(Ok(()));
                }
                if added {
                    self.shared.committed.notify_one();
                }
            }
            Err(fault) => {
                // Appends given a seq in the failed commit: if it reached
                // the disk after all, the reopen undoes them, so a retry of
                // the id is stored as new.
                for (r, (id, _, _)) in results.iter().zip(&appends) {
                    if let Appended::New(seq) = r {
                        self.refused.push((id.clone(), *seq));
                    }
                }
                // Settles committed without an fsync since the last durable
                // commit are rolled back by the reopen: commit them again.
                let undone = std::mem::take(&mut self.unsynced_delta);
                if undone < 0 {
                    self.shared
                        .pending
                        .fetch_add(undone.unsigned_abs(), Ordering::Relaxed);
                }
                let mut settles = std::mem::take(&mut self.unsynced_settles);
                settles.extend(self.held_settles.drain(..));
                while settles.len() > MAX_HELD_SETTLES {
                    settles.pop_front();
                }
                self.held_settles = settles;
                self.failed(fault);
                self.refuse(appends, replays, syncs);
            }
        }
    }

    /// Answers what cannot wait for the store to work again.
    fn refuse(
        &self,
        appends: Vec<(String, Box<RawValue>, AppendReply)>,
        replays: Vec<ReplayCmd>,
        syncs: Vec<oneshot::Sender<Result<(), JournalError>>>,
    ) {
        let reason = match &*self.shared.health.lock() {
            JournalHealth::Failing(r) | JournalHealth::Broken(r) => r.clone(),
            JournalHealth::Ok => "journal writes fail".to_owned(),
        };
        for (_, _, reply) in appends {
            let _ = reply.send(Err(JournalError::Storage(reason.clone())));
        }
        for (_, reply) in replays {
            let _ = reply.send(Err(JournalError::Storage(reason.clone())));
        }
        for s in syncs {
            let _ = s.send(Err(JournalError::Storage(reason.clone())));
        }
    }

    /// A commit (or reopen) failed: close the file, and reopen it once the
    /// backoff has passed (at once for reads, if it opens).
    fn failed(&mut self, fault: Fault) {
        self.record_fault("write", &fault);
        self.retry_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        self.close_db();
        // Reads (the intake loop draining the backlog) go on from the
        // reopened file while writes wait for the backoff.
        let _ = self.reopen();
    }

    /// Counts a storage fault and says in the health what it was (`verb`:
    /// what failed, "write" or "reopen").
    fn record_fault(&self, verb: &str, fault: &Fault) {
        self.shared.write_errors.fetch_add(1, Ordering::Relaxed);
        let reason = format!(
            "cannot {verb} {}: {}",
            self.shared.path.display(),
            fault.message
        );
        self.shared.set_health(if fault.incurable {
            JournalHealth::Broken(reason)
        } else {
            JournalHealth::Failing(reason)
        });
    }

    /// Takes the database out of reach of new readers and closes it once
    /// the readers that have it are done (redb refuses a second open while
    /// it lives).
    fn close_db(&self) {
        let Some(mut db) = self.shared.db.write().take() else {
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match Arc::try_unwrap(db) {
                Ok(d) => {
                    if let Err(e) = d.close() {
                        tracing::debug!(error = %e, "closing the failed journal");
                    }
                    return;
                }
                Err(shared) if Instant::now() < deadline => {
                    db = shared;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return,
            }
        }
    }

    /// Reopens the file (redb repairs it), undoes refused appends, and
    /// publishes it; `None` (and the health says why) if it cannot.
    fn reopen(&mut self) -> Option<Arc<Database>> {
        let db = self.open_quietly()?;
        *self.shared.db.write() = Some(db.clone());
        Some(db)
    }

    fn open_quietly(&mut self) -> Option<Arc<Database>> {
        match self.open_and_undo() {
            Ok(db) => Some(Arc::new(db)),
            Err(fault) => {
                self.record_fault("reopen", &fault);
                if self.retry_at.is_none_or(|t| t <= Instant::now()) {
                    self.retry_at = Some(Instant::now() + self.backoff);
                    self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                }
                None
            }
        }
    }

    fn open_and_undo(&mut self) -> Result<Database, Fault> {
        let db = open_db(&self.shared.path, self.shared.faults.as_ref())?;
        if !self.refused.is_empty() {
            let txn = db.begin_write()?;
            {
                let mut events = txn.open_table(EVENTS)?;
                let mut ids = txn.open_table(IDS)?;
                for (id, seq) in &self.refused {
                    let landed = events
                        .get(*seq)?
                        .and_then(|v| serde_json::from_slice::<Record>(v.value()).ok())
                        .is_some_and(
                            |r| matches!(r, Record::Event { id: ref got, .. } if got == id),
                        );
                    if landed {
                        events.remove(*seq)?;
                        ids.remove(id.as_str())?;
                    }
                }
            }
            txn.commit()?;
            self.refused.clear();
        }
        let pending = count_pending(&db)?;
        self.shared.pending.store(pending, Ordering::Relaxed);
        // The feeder re-reads: whatever it missed while reads failed.
        self.shared.committed.notify_one();
        Ok(db)
    }

    #[allow(clippy::too_many_arguments)]
    fn commit(
        &mut self,
        db: &Database,
        appends: &[(String, Box<RawValue>, AppendReply)],
        results: &mut Vec<Appended>,
        replays: &[ReplayCmd],
        replayed: &mut Vec<usize>,
        prunes: &[u64],
        durable: bool,
    ) -> Result<(bool, i64), Fault> {
        let mut txn = db.begin_write()?;
        let mut added = false;
        let mut delta: i64 = 0;
        {
            let mut events = txn.open_table(EVENTS)?;
            let mut ids = txn.open_table(IDS)?;
            let mut dead = txn.open_table(DEAD)?;
            let mut meta = txn.open_table(META)?;
            // Dead letters keep the id they were first given, so one whose
            // failed commit reached the disk after all is not stored twice.
            for (dl, from) in self.held_dead.iter_mut() {
                if let Some(seq) = *from {
                    if let Some(v) = events.get(seq)? {
                        match serde_json::from_slice::<Record>(v.value()) {
                            Ok(Record::Event { id, body, .. }) => {
                                dl.event_id = id;
                                dl.event = serde_json::from_str(body.get()).unwrap_or_default();
                            }
                            Ok(Record::Replay { dead_letter, .. }) => {
                                dl.event_id = dead_letter.event_id;
                                dl.event = dead_letter.event;
                            }
                            Err(_) => {}
                        }
                    }
                    *from = None;
                }
                if dl.id == 0 {
                    dl.id = next_counter(&mut meta, "next_dead")?;
                } else {
                    let next = meta.get("next_dead")?.map(|v| v.value()).unwrap_or(1);
                    if next <= dl.id {
                        meta.insert("next_dead", dl.id + 1)?;
                    }
                }
                let bytes = serde_json::to_vec(&*dl).expect("dead letters serialize");
                dead.insert(dl.id, bytes.as_slice())?;
            }
            for seq in &self.held_settles {
                if events.remove(*seq)?.is_some() {
                    delta -= 1;
                }
            }
            for (id, body, _) in appends {
                if ids.get(id.as_str())?.is_some() {
                    results.push(Appended::Duplicate);
                    continue;
                }
                let seq = next_counter(&mut meta, "next_seq")?;
                let rec = RecordRef::Event {
                    id,
                    received_unix_ms: unix_ms(),
                    body,
                };
                let bytes = serde_json::to_vec(&rec).expect("records serialize");
                events.insert(seq, bytes.as_slice())?;
                ids.insert(id.as_str(), unix_now())?;
                added = true;
                delta += 1;
                results.push(Appended::New(seq));
            }
            for (which, _) in replays {
                let mut n = 0;
                let keys: Vec<u64> = match which {
                    Some(v) => v.clone(),
                    None => dead
                        .iter()?
                        .filter_map(|e| e.ok().map(|(k, _)| k.value()))
                        .collect(),
                };
                for k in keys {
                    if let Some(v) = dead.remove(k)? {
                        let Ok(dl) = serde_json::from_slice::<DeadLetter>(v.value()) else {
                            continue;
                        };
                        let seq = next_counter(&mut meta, "next_seq")?;
                        let rec = Record::Replay {
                            received_unix_ms: unix_ms(),
                            dead_letter: dl,
                        };
                        let bytes = serde_json::to_vec(&rec).expect("records serialize");
                        events.insert(seq, bytes.as_slice())?;
                        added = true;
                        delta += 1;
                        n += 1;
                    }
                }
                replayed.push(n);
            }
            for older_than_unix in prunes {
                ids.retain(|_, at| at >= *older_than_unix)?;
            }
        }
        // Settles alone need no fsync: losing one only replays an event
        // whose calls are idempotent upstream, and SETTLE_SYNC_INTERVAL
        // bounds how many.
        txn.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        })?;
        txn.commit()?;
        Ok((added, delta))
    }

    /// Idle upkeep: notice a journal file removed under us, and give the
    /// space of a drained backlog back to the filesystem.
    fn maintain(&mut self) {
        if self.retry_at.is_some() {
            return;
        }
        if let Err(e) = std::fs::metadata(&self.shared.path) {
            if e.kind() == std::io::ErrorKind::NotFound {
                // Writes go on into the unlinked file, and would be lost on
                // the next start: say so loudly.
                self.file_removed = true;
                self.shared.set_health(JournalHealth::Broken(format!(
                    "{} was removed while in use; restart to recreate it",
                    self.shared.path.display()
                )));
            }
            return;
        }
        let file_bytes = self.shared.stats().file_bytes;
        if file_bytes < COMPACT_MIN_BYTES {
            return;
        }
        let used = {
            let Some(db) = self.shared.db.read().clone() else {
                return;
            };
            let stats = db.begin_write().and_then(|t| {
                let s = t.stats().map_err(Into::into);
                t.abort().map_err(Into::into).and(s)
            });
            match stats {
                Ok(s) => s.allocated_pages() * s.page_size() as u64,
                Err(_) => return,
            }
        };
        if used * 4 > file_bytes {
            return;
        }
        self.compact(file_bytes, used);
    }

    fn compact(&mut self, before: u64, used: u64) {
        let Some(db) = self.shared.db.write().take() else {
            return;
        };
        // Compaction needs the database to itself: wait for readers to go.
        let mut db = db;
        let deadline = Instant::now() + Duration::from_secs(2);
        while Arc::get_mut(&mut db).is_none() {
            if Instant::now() >= deadline {
                *self.shared.db.write() = Some(db);
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let Some(inner) = Arc::get_mut(&mut db) else {
            return;
        };
        let result = inner.compact();
        *self.shared.db.write() = Some(db);
        match result {
            Ok(_) => {
                let after = self.shared.stats().file_bytes;
                tracing::info!(before, after, used, "journal compacted");
            }
            Err(e) => {
                tracing::warn!(error = %e, "journal compaction failed");
                self.failed(Fault::from(e));
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
            j.shutdown().await;
        }
        let j = Journal::open(dir.path()).unwrap();
        let left = j.read_from(0, 10).await.unwrap();
        assert_eq!(left.len(), 1);
        assert!(matches!(&left[0].1, Record::Event { id, .. } if id == "b"));
        assert_eq!(j.pending(), 1);
    }
    /// Retries `append` until it is stored or `secs` pass.
    async fn append_eventually(j: &Journal, id: &str, secs: u64) -> Appended {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            match j.append(id, raw("{}")).await {
                Ok(a) => return a,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("still failing after {secs} s: {e}"),
            }
        }
    }

    #[tokio::test]
    async fn a_full_disk_refuses_appends_holds_settles_and_heals() {
        let dir = tempfile::tempdir().unwrap();
        let faults = StorageFaults::new();
        let j = Journal::open_with(dir.path(), Some(faults.clone())).unwrap();
        let Appended::New(a) = j.append("a", raw("{}")).await.unwrap() else {
            panic!("fresh id")
        };
        let Appended::New(b) = j.append("b", raw("{}")).await.unwrap() else {
            panic!("fresh id")
        };
        faults.fail_writes(super::super::faults::ENOSPC);
        let refused = j.append("c", raw("{}")).await;
        assert!(
            matches!(refused, Err(JournalError::Storage(_))),
            "{refused:?}"
        );
        assert!(matches!(j.health(), JournalHealth::Failing(r) if r.contains("No space left")));
        j.settle(a);
        j.dead_letter(DeadLetter {
            id: 0,
            event_id: "b".into(),
            event_type: "user.banned".into(),
            action: None,
            reason: crate::domain::DeadLetterReason::BadRequest,
            detail: "test".into(),
            at_unix: 0,
            event: serde_json::Value::Null,
        });
        assert!(
            j.sync().await.is_err(),
            "nothing is durable while writes fail"
        );
        assert!(j.stats().write_errors >= 1);
        faults.heal();
        // The id that got an error was never accepted: stored as new.
        assert!(matches!(
            append_eventually(&j, "c", 5).await,
            Appended::New(_)
        ));
        j.sync().await.unwrap();
        assert_eq!(j.health(), JournalHealth::Ok);
        let left: Vec<u64> = j
            .read_from(0, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert!(
            !left.contains(&a),
            "the held settle was committed: {left:?}"
        );
        assert!(left.contains(&b));
        assert_eq!(j.pending(), 2);
        let dead = j.dead_letters(10).await.unwrap();
        assert_eq!(dead.len(), 1, "the held dead letter was committed once");
        assert_eq!(dead[0].event_id, "b");
    }

    #[tokio::test]
    async fn a_journal_that_cannot_be_reopened_is_broken_until_it_can() {
        let dir = tempfile::tempdir().unwrap();
        let faults = StorageFaults::new();
        let j = Journal::open_with(dir.path(), Some(faults.clone())).unwrap();
        j.append("a", raw("{}")).await.unwrap();
        faults.fail_writes(super::super::faults::EIO);
        faults.fail_opens(super::super::faults::EACCES);
        assert!(j.append("b", raw("{}")).await.is_err());
        assert!(
            matches!(j.health(), JournalHealth::Broken(r) if r.contains("cannot reopen")),
            "{:?}",
            j.health()
        );
        faults.heal();
        assert!(matches!(
            append_eventually(&j, "b", 5).await,
            Appended::New(_)
        ));
        assert_eq!(j.health(), JournalHealth::Ok);
    }

    #[test]
    fn a_corrupt_file_fails_to_open_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("journal.redb");
        std::fs::write(&file, vec![0xA5u8; 64 * 1024]).unwrap();
        let e = Journal::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains(&file.display().to_string()), "{e}");
        assert!(e.contains("move it aside"), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }

    #[tokio::test]
    async fn a_damaged_journal_fails_to_open_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = Journal::open(dir.path()).unwrap();
            round(&j, 0, 50).await;
            j.append("keep", raw("{\"n\":1}")).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let file = dir.path().join("journal.redb");
        let mut bytes = std::fs::read(&file).unwrap();
        // Scribble over everything past the header pages.
        for b in bytes.iter_mut().skip(8192) {
            *b ^= 0x5A;
        }
        std::fs::write(&file, bytes).unwrap();
        let e = Journal::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains(&file.display().to_string()), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }
    #[tokio::test]
    async fn the_file_shrinks_once_a_backlog_has_drained() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let file = dir.path().join("journal.redb");
        let body = raw(&format!(r#"{{"pad":"{}"}}"#, "p".repeat(2000)));
        let appends = (0..6000).map(|i| {
            let (j, body) = (j.clone(), body.clone());
            async move { j.append(&format!("b-{i}"), body).await.unwrap() }
        });
        let seqs: Vec<Appended> = futures_util::future::join_all(appends).await;
        let backlog = std::fs::metadata(&file).unwrap().len();
        assert!(backlog > COMPACT_MIN_BYTES, "{backlog} bytes");
        for a in seqs {
            if let Appended::New(seq) = a {
                j.settle(seq);
            }
        }
        j.sync().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = std::fs::metadata(&file).unwrap().len();
            if now < backlog / 2 {
                break;
            }
            assert!(Instant::now() < deadline, "still {now} bytes of {backlog}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(j.pending(), 0);
        assert!(matches!(
            j.append("after", raw("{}")).await.unwrap(),
            Appended::New(_)
        ));
    }
    #[tokio::test]
    async fn a_journal_directory_removed_while_in_use_is_broken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let j = Journal::open(&path).unwrap();
        j.append("a", raw("{}")).await.unwrap();
        std::fs::remove_dir_all(&path).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !matches!(j.health(), JournalHealth::Broken(ref r) if r.contains("removed")) {
            assert!(Instant::now() < deadline, "{:?}", j.health());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Writes into the unlinked file still work, but the state stays
        // broken: they would be lost on restart.
        j.append("b", raw("{}")).await.unwrap();
        assert!(matches!(j.health(), JournalHealth::Broken(_)));
    }
}
