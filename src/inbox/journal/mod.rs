//! The embedded mode's durable inbox, in `journal.path`:
//! - `log/`: the event log (`log`), append-only segments of checksummed
//!   records; every accepted event is in it, fsynced, before its 202 (group
//!   commit: one `fdatasync` for every append that arrived while the
//!   previous group was written);
//! - `settled.ckpt`: which records have settled (`settled`), written at
//!   most once a second; a segment whose records have all settled is
//!   deleted whole, so the disk a backlog took comes back as it drains;
//! - `ids/`: the dedupe window (`dedupe`), time-bucketed runs of webhook-id
//!   fingerprints that expire whole after 7 days;
//! - `journal.redb`: dead letters, sweeps and counters (`state`, `sweeps`).
//!
//! One writer thread owns every write (`writer`); readers (the intake loop,
//! the admin routes) read the files through their own handles. Storage
//! faults (no space, I/O errors) make appends fail with an error (503 at
//! the edge) while everything already accepted stays safe; the writer rolls
//! a failed write back, retries with backoff, and resumes by itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, Notify, Semaphore};

pub use crate::config::JournalTuning as Tuning;
use crate::domain::clock::unix_now;
use crate::domain::DeadLetter;
use crate::domain::Durable;
pub use crate::storage_faults::StorageFaults;

/// Also the event records' index (the `fate` module's store): its
/// fingerprints and bloom filter.
pub(crate) mod dedupe;
mod log;
mod settled;
mod state;
mod sweeps;
mod writer;

use dedupe::{fingerprint, Memtable};
use log::{ChunkReader, Segment, HEADER_LEN};
use settled::Live;
use state::State;
use writer::{Cmd, Writer};

/// Most appends waiting for a commit; beyond it the edge answers 503.
const MAX_QUEUED_APPENDS: usize = 16_384;

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

/// Where a record is in the log: its seq, and its offset in its segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    pub seq: u64,
    offset: u64,
}

/// What a journal entry holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Record {
    /// An accepted event: its id and the body as it was received.
    Event {
        id: String,
        received_unix_ms: u64,
        body: Vec<u8>,
    },
    /// A dead letter put back to work.
    Replay {
        received_unix_ms: u64,
        dead_letter: DeadLetter,
    },
}

/// A live record read from the log.
#[derive(Debug)]
pub struct Entry {
    pub loc: Loc,
    pub record: Record,
}

/// Whether the journal can write, as `/readyz` and `/healthz` report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalHealth {
    Ok,
    /// Writes fail (no space, an I/O error); the writer retries with backoff
    /// and resumes by itself once they work.
    Failing(String),
    /// A file cannot be reopened, or the journal's files were removed while
    /// in use: only an operator (or a restart) can help.
    Broken(String),
}

/// What `/metrics` shows about the journal's storage.
#[derive(Debug, Clone, Copy, Default)]
pub struct JournalStats {
    /// Failed writes (and reopens) since start.
    pub write_errors: u64,
    /// Bytes the journal's files take.
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
    closed: AtomicBool,
}

/// A segment as readers see it.
struct SegView {
    seg: Arc<Segment>,
    /// Bytes durably written (readers stop there).
    end: AtomicU64,
    /// No longer appended to: once a reader reaches `end`, it moves on.
    sealed: AtomicBool,
}

/// What the writer thread and the handles share.
struct Shared {
    dir: PathBuf,
    log_dir: PathBuf,
    ids_dir: PathBuf,
    state: State,
    segments: RwLock<BTreeMap<u64, Arc<SegView>>>,
    /// Live records per segment (base -> set).
    live: Mutex<BTreeMap<u64, Live>>,
    health: Mutex<JournalHealth>,
    write_errors: AtomicU64,
    /// Wakes the intake loop when something new is durable.
    committed: Notify,
    /// Records not durably settled (`journal_events`).
    pending: AtomicU64,
    faults: Option<StorageFaults>,
    /// The record store's progress: a settle is applied once the record
    /// its event settled with is durable.
    records: std::sync::OnceLock<Durable>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("dir", &self.inner.shared.dir)
            .finish()
    }
}

/// A storage failure, and whether retrying may cure it.
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

impl Fault {
    fn io(e: &std::io::Error) -> Fault {
        Fault {
            message: e.to_string(),
            incurable: io_incurable(e),
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

/// One line naming `path`, what went wrong and what to do.
fn cannot_open(path: &Path, e: &redb::Error) -> JournalError {
    JournalError::Open(format!(
        "cannot open the journal {}: {e}; {}",
        path.display(),
        advice(e)
    ))
}

fn cannot_open_io(path: &Path, e: std::io::Error) -> JournalError {
    cannot_open(path, &redb::Error::Io(e))
}

/// What recovery found in the log.
struct Recovered {
    segments: BTreeMap<u64, Arc<SegView>>,
    live: BTreeMap<u64, Live>,
    memtable: Memtable,
    next_seq: u64,
    flushed_seq: u64,
    runs: Vec<Arc<dedupe::Run>>,
    /// Settled segments kept to be written over.
    spares: Vec<PathBuf>,
}

/// Reads the log, the checkpoint and the runs back: which records are live,
/// which ids the memtable must hold again, where seqs go on.
fn recover(shared: &Shared, faults: Option<&StorageFaults>) -> Result<Recovered, JournalError> {
    let runs = dedupe::open_all(&shared.ids_dir).map_err(|e| cannot_open_io(&shared.ids_dir, e))?;
    let flushed_seq = runs.iter().map(|r| r.span.last_seq).max().unwrap_or(0);
    let ckpt = settled::read(&shared.dir).unwrap_or_default();
    let mut bases = Vec::new();
    let mut spares = Vec::new();
    for entry in
        std::fs::read_dir(&shared.log_dir).map_err(|e| cannot_open_io(&shared.log_dir, e))?
    {
        let entry = entry.map_err(|e| cannot_open_io(&shared.log_dir, e))?;
        let name = entry.file_name();
        if let Some(base) = name.to_str().and_then(log::parse_segment_name) {
            bases.push((base, entry.path()));
        } else if let Some(above) = name.to_str().and_then(log::parse_spare_name) {
            spares.push((above, entry.path()));
        } else if name.to_str().is_some_and(log::is_spare_name) {
            // Not a name the writer gives: not trusted to be reused.
            let _ = std::fs::remove_file(entry.path());
        }
    }
    bases.sort();
    let mut out = Recovered {
        segments: BTreeMap::new(),
        live: BTreeMap::new(),
        memtable: Memtable::default(),
        // Above every record a spare still holds too (see `spare_path`).
        next_seq: spares
            .iter()
            .map(|(above, _)| *above)
            .fold(ckpt.next_seq.max(flushed_seq + 1).max(1), u64::max),
        flushed_seq,
        runs,
        spares: spares.into_iter().map(|(_, path)| path).collect(),
    };
    for (base, path) in bases {
        // A segment whose creation a crash cut short holds nothing that was
        // acknowledged (its header is synced before any record): drop it.
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if size < HEADER_LEN {
            let _ = std::fs::remove_file(&path);
            continue;
        }
        let seg = Segment::open(&path, faults).map_err(|e| cannot_open_io(&path, e))?;
        if seg.base != base {
            return Err(cannot_open_io(
                &path,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("its header says it starts at seq {}", seg.base),
                ),
            ));
        }
        let (records, end) = log::scan(&seg).map_err(|e| cannot_open_io(&path, e))?;
        if end < size {
            // A crash's torn write, or the remains of a failed one rolled
            // back (the records after the last good one never got a 202).
            tracing::debug!(path = %path.display(), ignored = size - end, "bytes after the last good journal record ignored");
        }
        let known = ckpt.live.get(&base).filter(|l| l.nonce == seg.nonce);
        let mut live = Live::new(seg.nonce);
        for r in &records {
            let rel = r.seq - base;
            if known.and_then(|k| k.known(rel)) != Some(false) {
                live.add(rel);
            }
            if r.seq > flushed_seq {
                if let Some(id) = &r.id {
                    out.memtable
                        .insert(fingerprint(id), r.seq, r.received_ms / 1000);
                }
            }
            out.next_seq = out.next_seq.max(r.seq + 1);
        }
        out.live.insert(base, live);
        out.segments.insert(
            base,
            Arc::new(SegView {
                seg: Arc::new(seg),
                end: AtomicU64::new(end),
                sealed: AtomicBool::new(true),
            }),
        );
    }
    Ok(out)
}

impl Journal {
    /// Opens (or creates) the journal in `dir` and starts its writer.
    pub fn open(dir: &Path) -> Result<Journal, JournalError> {
        Self::open_with(dir, None)
    }

    /// `open`, with its storage under a fault-injecting switchboard (tests).
    #[doc(hidden)]
    pub fn open_with(dir: &Path, faults: Option<StorageFaults>) -> Result<Journal, JournalError> {
        Self::open_tuned(dir, faults, Tuning::default())
    }

    /// `open_with`, with other file sizes (tests).
    #[doc(hidden)]
    pub fn open_tuned(
        dir: &Path,
        faults: Option<StorageFaults>,
        tuning: Tuning,
    ) -> Result<Journal, JournalError> {
        let log_dir = dir.join("log");
        let ids_dir = dir.join("ids");
        for d in [dir, &log_dir, &ids_dir] {
            std::fs::create_dir_all(d).map_err(|e| cannot_open_io(d, e))?;
        }
        let state_path = dir.join("journal.redb");
        let state = State::open(state_path.clone(), faults.clone())
            .map_err(|e| cannot_open(&state_path, &e))?;
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            log_dir,
            ids_dir,
            state,
            segments: RwLock::new(BTreeMap::new()),
            live: Mutex::new(BTreeMap::new()),
            health: Mutex::new(JournalHealth::Ok),
            write_errors: AtomicU64::new(0),
            committed: Notify::new(),
            pending: AtomicU64::new(0),
            faults: faults.clone(),
            records: std::sync::OnceLock::new(),
        });
        let recovered = recover(&shared, faults.as_ref())?;
        let legacy = shared
            .state
            .legacy()
            .map_err(|e| cannot_open(&state_path, &e))?;
        let pending: u64 = recovered.live.values().map(Live::count).sum();
        shared.pending.store(pending, Ordering::Relaxed);
        *shared.segments.write() = recovered.segments.clone();
        *shared.live.lock() = recovered.live.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut writer = Writer::new(shared.clone(), rx, recovered, tuning);
        writer
            .migrate(legacy)
            .map_err(|e| JournalError::Open(format!(
                "cannot move the events of an earlier version's journal {} into the log: {}; free some space and start again",
                state_path.display(),
                e.message
            )))?;
        std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| JournalError::Storage(e.to_string()))?;
        Ok(Journal {
            inner: Arc::new(Inner {
                shared,
                tx,
                append_slots: Arc::new(Semaphore::new(MAX_QUEUED_APPENDS)),
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// Appends an event (the body as received) and returns once it is on
    /// disk, or known already.
    pub async fn append(&self, id: &str, body: Vec<u8>) -> Result<Appended, JournalError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(JournalError::Closed);
        }
        // Most of the time a slot is free at once: no timer.
        let _slot = match self.inner.append_slots.try_acquire() {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::Closed) => return Err(JournalError::Closed),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                tokio::time::timeout(Duration::from_secs(1), self.inner.append_slots.acquire())
                    .await
                    .map_err(|_| JournalError::Busy)?
                    .map_err(|_| JournalError::Closed)?
            }
        };
        let (reply, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Cmd::Append {
                fp: fingerprint(id),
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

    /// Marks a record settled, once every event record handed to the
    /// record store so far (this event's included) is durable.
    pub fn settle(&self, seq: u64) {
        let records = self.inner.shared.records.get().map_or(0, Durable::mark);
        let _ = self.inner.tx.send(Cmd::Settle(seq, records));
    }

    /// From now on a settle waits for the event's record to be durable in
    /// `records` (at most `writer::RECORDS_WAIT`), so a kill -9 never
    /// leaves a settled event without its record: until its settle is
    /// applied and checkpointed, the event is replayed after a restart and
    /// its record written then.
    pub fn settle_after_records(&self, records: Durable) {
        let _ = self.inner.shared.records.set(records);
    }

    /// Records a dead letter as it is (`dl.event` already filled in);
    /// durable before any later `settle`.
    pub fn dead_letter(&self, dl: DeadLetter) {
        let _ = self.inner.tx.send(Cmd::DeadLetter(Box::new(dl), None));
    }

    /// Records `dl` with its `event` filled in from the record at `at`;
    /// durable before any later `settle` of it.
    pub fn dead_letter_for(&self, at: Loc, dl: DeadLetter) {
        let _ = self.inner.tx.send(Cmd::DeadLetter(Box::new(dl), Some(at)));
    }

    /// Puts dead letters (all, or the given ids) back to work as log
    /// records. Returns how many.
    pub async fn replay_dead_letters(&self, ids: Option<Vec<u64>>) -> Result<usize, JournalError> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Cmd::Replay { ids, reply })
            .map_err(|_| JournalError::Closed)?;
        rx.await.map_err(|_| JournalError::Closed)?
    }

    /// Forgets dedupe ids accepted before `older_than_unix`.
    pub fn prune_ids(&self, older_than_unix: u64) {
        let _ = self.inner.tx.send(Cmd::Prune { older_than_unix });
    }

    /// Waits until everything sent so far is durable, settles included; an
    /// error if the store cannot write now (what it holds is written later).
    pub async fn sync(&self) -> Result<(), JournalError> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Cmd::Sync(reply))
            .map_err(|_| JournalError::Closed)?;
        rx.await.map_err(|_| JournalError::Closed)?
    }

    /// Writes what is held, closes the files and stops the writer (the end
    /// of a graceful shutdown; the journal can be opened again at once).
    pub async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        if self.inner.tx.send(Cmd::Shutdown(reply)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Stops the writer as a kill -9 would: nothing more is written, the
    /// files stay as they are (tests).
    #[cfg(test)]
    async fn abandon(&self) {
        let (reply, rx) = oneshot::channel();
        if self.inner.tx.send(Cmd::Abandon(reply)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Resolves when new records became durable (or at once if some did
    /// since the last call).
    pub async fn committed(&self) {
        self.inner.shared.committed.notified().await;
    }

    /// Records not yet durably settled.
    pub fn pending(&self) -> u64 {
        self.inner.shared.pending.load(Ordering::Relaxed)
    }

    /// Whether the journal can write now.
    pub fn health(&self) -> JournalHealth {
        self.inner.shared.health.lock().clone()
    }

    /// Write errors so far, the files' size and their filesystem's space.
    pub fn stats(&self) -> JournalStats {
        self.inner.shared.stats()
    }

    /// The state database (dead letters, sweeps).
    fn db(&self) -> Result<Arc<redb::Database>, JournalError> {
        self.inner.shared.state.db().ok_or_else(|| {
            JournalError::Storage(match self.health() {
                JournalHealth::Failing(r) | JournalHealth::Broken(r) => r,
                JournalHealth::Ok => "the journal is being reopened".to_owned(),
            })
        })
    }

    /// The event id and body of the record at `at` (a replay's: its dead
    /// letter's event), read from the page cache or the disk; for an
    /// event's record while the record is still in the log.
    pub fn read_event(&self, at: Loc) -> Option<(String, Vec<u8>)> {
        self.inner.shared.event_at(at)
    }

    /// A reader of live records in log order, from the oldest.
    pub fn reader(&self) -> LogReader {
        LogReader {
            state: Some(Box::new(ReaderState {
                shared: self.inner.shared.clone(),
                at: None,
            })),
        }
    }

    /// Dead letters in id order, at most `limit`.
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, JournalError> {
        let db = self.db()?;
        tokio::task::spawn_blocking(move || Ok(State::list_dead(&db, limit)?))
            .await
            .map_err(|e| JournalError::Storage(e.to_string()))?
    }
}

/// Reads live records in order across segments; see `Journal::reader`.
pub struct LogReader {
    /// Moved into the blocking task while it reads.
    state: Option<Box<ReaderState>>,
}

struct ReaderState {
    shared: Arc<Shared>,
    /// The segment being read (its base and view) and the position in it.
    at: Option<(u64, Arc<SegView>, ChunkReader)>,
}

impl LogReader {
    /// Up to `limit` live records after the last ones returned; empty when
    /// nothing durable is left to read (wait for `Journal::committed`).
    pub async fn next_batch(&mut self, limit: usize) -> Result<Vec<Entry>, JournalError> {
        let mut st = self.state.take().ok_or(JournalError::Closed)?;
        let (st, out) = tokio::task::spawn_blocking(move || {
            let out = st.read(limit);
            (st, out)
        })
        .await
        .map_err(|e| JournalError::Storage(e.to_string()))?;
        self.state = Some(st);
        out.map_err(|e| JournalError::Storage(e.to_string()))
    }
}

impl ReaderState {
    fn read(&mut self, limit: usize) -> std::io::Result<Vec<Entry>> {
        let mut out = Vec::new();
        while out.len() < limit {
            let Some((base, view, reader)) = &mut self.at else {
                // The oldest segment.
                let first = self
                    .shared
                    .segments
                    .read()
                    .iter()
                    .next()
                    .map(|(b, v)| (*b, v.clone()));
                match first {
                    Some((b, v)) => {
                        self.at = Some((b, v, ChunkReader::new(HEADER_LEN)));
                        continue;
                    }
                    None => break,
                }
            };
            // Read `sealed` before `end`: a sealed segment's end is final.
            let sealed = view.sealed.load(Ordering::Acquire);
            let end = view.end.load(Ordering::Acquire);
            let base = *base;
            match reader.next(&view.seg, end)? {
                Some((rec, offset)) => {
                    let live = self
                        .shared
                        .live
                        .lock()
                        .get(&base)
                        .is_some_and(|l| l.is_live(rec.seq - base));
                    if !live {
                        continue;
                    }
                    let loc = Loc {
                        seq: rec.seq,
                        offset,
                    };
                    if let Some(record) = to_record(&rec) {
                        out.push(Entry { loc, record });
                    } else {
                        tracing::error!(seq = rec.seq, "unreadable journal record skipped");
                    }
                }
                None if sealed => {
                    let next = self
                        .shared
                        .segments
                        .read()
                        .range(base + 1..)
                        .next()
                        .map(|(b, v)| (*b, v.clone()));
                    match next {
                        Some((b, v)) => self.at = Some((b, v, ChunkReader::new(HEADER_LEN))),
                        None => break,
                    }
                }
                None => break,
            }
        }
        Ok(out)
    }
}

/// A record decoded from the log, owned.
fn to_record(rec: &log::RawRecord<'_>) -> Option<Record> {
    let received_unix_ms = rec.received_ms();
    if let Some((id, body)) = rec.event() {
        return Some(Record::Event {
            id: id.to_owned(),
            received_unix_ms,
            body: body.to_vec(),
        });
    }
    let dl = serde_json::from_slice(rec.replay()?).ok()?;
    Some(Record::Replay {
        received_unix_ms,
        dead_letter: dl,
    })
}

impl Shared {
    /// The event id and body a record holds (a replay's: its dead letter's
    /// event), read straight from its segment.
    fn event_at(&self, loc: Loc) -> Option<(String, Vec<u8>)> {
        let view = self
            .segments
            .read()
            .range(..=loc.seq)
            .next_back()
            .map(|(_, v)| v.clone())?;
        // One read for most records: the length is learnt from what it
        // brought, and only a longer record takes a second.
        let mut buf = vec![0u8; 1024];
        let got = view.seg.read_at(&mut buf, loc.offset).ok()?;
        if got < 4 {
            return None;
        }
        let len = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")) as usize + 8;
        if len > got {
            buf.resize(len, 0);
            if view
                .seg
                .read_at(&mut buf[got..], loc.offset + got as u64)
                .ok()
                != Some(len - got)
            {
                return None;
            }
        }
        buf.truncate(len);
        let log::Decoded::Record(rec, _) = log::decode(&buf) else {
            return None;
        };
        if rec.seq != loc.seq {
            return None;
        }
        if let Some((id, body)) = rec.event() {
            return Some((id.to_owned(), body.to_vec()));
        }
        let dl = serde_json::from_slice::<DeadLetter>(rec.replay()?).ok()?;
        let body = serde_json::to_vec(&dl.event).ok()?;
        Some((dl.event_id, body))
    }

    fn stats(&self) -> JournalStats {
        let dir_bytes = |d: &Path| -> u64 {
            std::fs::read_dir(d)
                .map(|it| {
                    it.filter_map(Result::ok)
                        .filter_map(|e| e.metadata().ok())
                        .map(|m| m.len())
                        .sum()
                })
                .unwrap_or(0)
        };
        let file = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let file_bytes = dir_bytes(&self.log_dir)
            + dir_bytes(&self.ids_dir)
            + file(&self.state.path)
            + file(&self.dir.join("settled.ckpt"));
        let free_bytes = rustix::fs::statvfs(&self.dir)
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

    /// Counts a storage fault and says in the health what it was (`verb`:
    /// what failed, e.g. "write" or "reopen").
    fn record_fault(&self, verb: &str, what: &Path, fault: &Fault) {
        self.write_errors.fetch_add(1, Ordering::Relaxed);
        let reason = format!("cannot {verb} {}: {}", what.display(), fault.message);
        self.set_health(if fault.incurable {
            JournalHealth::Broken(reason)
        } else {
            JournalHealth::Failing(reason)
        });
    }
}

/// The dedupe window (senders retry for about a day; a week is generous).
pub const DEDUPE_WINDOW_SECS: u64 = 7 * 24 * 3600;

/// Unix seconds now, as the dedupe window counts.
fn now_secs() -> u64 {
    unix_now()
}

#[cfg(test)]
mod tests;
