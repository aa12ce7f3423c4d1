//! Embedded mode's record store, in `journal.path/records/`.
//!
//! Records are appended to time-bucketed data files (`format`) by one
//! writer thread (`writer`), in groups: one `pwrite` and one `fdatasync`
//! for every record handed over while the previous group was written. The
//! file being written is indexed in memory; when it is sealed (its time
//! bucket is over, or it reached its size or record cap) its index is
//! written beside it, so a lookup by id or user reads a closed file only
//! when that file's bloom filter says it may hold the key. Retention
//! deletes whole files: those whose newest record is older than
//! `[records] retention`, then the oldest while all of them take more than
//! `[records] max_bytes`. No record is ever deleted on its own.
//!
//! A record that expired but whose file is not deleted yet is never
//! answered. After a crash the file that was being written is scanned (its
//! torn tail, if any, cut off) and indexed; writing goes on in a new file.

mod format;
mod writer;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use parking_lot::{Mutex, RwLock};
use tokio::sync::{oneshot, watch};

use super::{
    Absent, CallbackCursor, Durable, EventRecord, FateError, FateStore, Position, RulesBook,
    SettledEvent, StoreStats,
};
use crate::domain::clock::unix_ms;
use crate::domain::RecordDrop;
use crate::inbox::journal::dedupe::{fingerprint, Fp};
use crate::telemetry::Metrics;
use format::{Entry, Index, Key, Scanner, Summary, HEADER_LEN};
use writer::{Cmd, Writer};

/// Records handed to the writer and not yet taken by it; beyond this a
/// record is dropped (and counted) rather than waited for.
const MAX_QUEUED: usize = 16_384;
/// The callbacks' cursor file.
const CURSOR_FILE: &str = "callbacks.cursor";

/// How long and how much the store keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// A record is answered for this long after it is written, and its file
    /// is deleted at most one time bucket later.
    pub retention: Duration,
    /// The files' total size; the oldest go first beyond it.
    pub max_bytes: u64,
}

impl StoreOptions {
    /// A data file takes new records for at most this long, so files
    /// expire close to their records' age: a 24th of the retention, at
    /// least a second, at most an hour.
    fn bucket(&self) -> Duration {
        (self.retention / 24).clamp(Duration::from_secs(1), Duration::from_secs(3600))
    }

    /// A data file is sealed past this size, so retention by bytes deletes
    /// a sixteenth of the budget at a time: at least 64 KiB, at most 64 MiB.
    fn roll_bytes(&self) -> u64 {
        (self.max_bytes / 16).clamp(64 << 10, 64 << 20)
    }

    pub fn retention_ms(&self) -> u64 {
        u64::try_from(self.retention.as_millis()).unwrap_or(u64::MAX)
    }
}

/// Embedded mode's `FateStore`; cheap to clone.
#[derive(Clone)]
pub struct DiskStore {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    tx: std::sync::mpsc::Sender<Cmd>,
    queued: Arc<AtomicUsize>,
    metrics: Metrics,
    written: watch::Receiver<Option<Position>>,
    closed: AtomicBool,
    /// Records handed over (counted by `put`) and released by the writer.
    durable: Durable,
}

/// A sealed data file and how to find its records.
pub(super) struct Sealed {
    id: u64,
    path: PathBuf,
    file: File,
    data_bytes: u64,
    lookup: Lookup,
}

/// A sealed file's index: on disk, or (when it could not be written) in
/// memory until it can.
pub(super) enum Lookup {
    Disk(Index),
    Memory(Summary, Vec<Entry>),
}

impl Lookup {
    fn summary(&self) -> Summary {
        match self {
            Lookup::Disk(i) => i.summary,
            Lookup::Memory(s, _) => *s,
        }
    }

    fn bytes(&self) -> u64 {
        match self {
            Lookup::Disk(i) => i.bytes(),
            Lookup::Memory(..) => 0,
        }
    }

    fn find(&self, key: Key, fp: Fp) -> io::Result<Vec<u64>> {
        match self {
            Lookup::Disk(i) => i.lookup(key, fp),
            Lookup::Memory(_, entries) => Ok(matching(entries, key, fp)),
        }
    }
}

/// Offsets of `entries` whose key is `fp`, ascending.
fn matching(entries: &[Entry], key: Key, fp: Fp) -> Vec<u64> {
    entries
        .iter()
        .filter(|e| match key {
            Key::Id => e.fp_id == fp,
            Key::User => e.fp_user == fp,
        })
        .map(|e| e.offset)
        .collect()
}

/// The data file being written: its records indexed in memory.
pub(super) struct OpenFile {
    id: u64,
    path: PathBuf,
    file: File,
    created_ms: u64,
    /// Bytes durably written; readers stop there.
    end: AtomicU64,
    entries: RwLock<Vec<Entry>>,
}

/// What the writer and the readers share.
pub(super) struct Shared {
    dir: PathBuf,
    opts: StoreOptions,
    sealed: RwLock<BTreeMap<u64, Arc<Sealed>>>,
    open: RwLock<Option<Arc<OpenFile>>>,
    /// Records handed over and not yet durable, so a lookup finds an event
    /// the moment it settled.
    unwritten: Mutex<HashMap<Box<str>, Arc<SettledEvent>, foldhash::fast::RandomState>>,
    /// The rules records are planned again with on read.
    book: Arc<RulesBook>,
    /// The callbacks' cursor, as last stored.
    cursor: Mutex<Option<CallbackCursor>>,
}

impl Shared {
    /// Records written before this (unix ms) have expired.
    fn cutoff(&self) -> u64 {
        unix_ms().saturating_sub(self.opts.retention_ms())
    }

    /// Forgets `record` as unwritten (it was written, or dropped), unless a
    /// newer record of the same event replaced it meanwhile.
    fn written(&self, record: &Arc<SettledEvent>) {
        let mut u = self.unwritten.lock();
        if u.get(record.id.as_str())
            .is_some_and(|r| Arc::ptr_eq(r, record))
        {
            u.remove(record.id.as_str());
        }
    }

    /// Files newest first: the open one, then the sealed ones (the open one
    /// is read first: the writer lists a file as sealed before it stops
    /// being the open one, so no file is missed in between).
    fn newest_first(&self) -> (Option<Arc<OpenFile>>, Vec<Arc<Sealed>>) {
        let open = self.open.read().clone();
        let sealed = self.sealed.read().values().rev().cloned().collect();
        (open, sealed)
    }

    fn stats(&self) -> StoreStats {
        let mut s = StoreStats::default();
        for f in self.sealed.read().values() {
            s.bytes += f.data_bytes + f.lookup.bytes();
            s.records += f.lookup.summary().count;
        }
        if let Some(o) = &*self.open.read() {
            s.bytes += o.end.load(Ordering::Acquire);
            s.records += o.entries.read().len() as u64;
        }
        s
    }

    /// Whether `last` (a file's newest record) is beyond the callbacks'
    /// cursor: its callback is not done yet.
    fn undelivered(&self, last: Position) -> bool {
        self.cursor
            .lock()
            .is_some_and(|c| c.after.is_none_or(|after| last > after))
    }
}

/// Reads the record at `offset` of `file` if it is event `id`'s (or, with
/// `user`, about that user) and not older than `cutoff`.
fn read_matching(
    file: &File,
    offset: u64,
    end: u64,
    cutoff: u64,
    book: &RulesBook,
    want: impl Fn(&EventRecord) -> bool,
) -> io::Result<Option<EventRecord>> {
    let Some((head, payload)) = format::read_at(file, offset, end)? else {
        return Ok(None);
    };
    if head.at_ms < cutoff {
        return Ok(None);
    }
    Ok(format::record_of(&payload, book).filter(|r| want(r)))
}

impl DiskStore {
    /// Opens (or creates) the store in `dir` and starts its writer. A file
    /// that cannot be read is set aside (renamed `*.bad`) rather than
    /// stopping the service: records are an account of the work, not the
    /// work. `book`'s current rules are kept there (`RulesBook::keep_in`)
    /// before any record planned with them.
    pub fn open(
        dir: &Path,
        opts: StoreOptions,
        metrics: Metrics,
        book: Arc<RulesBook>,
    ) -> Result<DiskStore, FateError> {
        std::fs::create_dir_all(dir).map_err(|e| storage(dir, &e))?;
        book.keep_in(dir).map_err(|e| storage(dir, &e))?;
        let (sealed, next_id) = recover(dir).map_err(|e| storage(dir, &e))?;
        let last = sealed
            .values()
            .filter(|s| s.lookup.summary().count > 0)
            .map(|s| Position {
                segment: s.id,
                offset: s.lookup.summary().last_offset,
            })
            .max();
        let cursor = read_cursor(dir);
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            opts,
            sealed: RwLock::new(sealed),
            open: RwLock::new(None),
            unwritten: Mutex::new(HashMap::default()),
            book,
            cursor: Mutex::new(cursor),
        });
        let (written_tx, written) = watch::channel(last);
        let (durable, released) = Durable::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let writer = Writer::new(
            shared.clone(),
            rx,
            queued.clone(),
            metrics.clone(),
            written_tx,
            released,
            next_id,
        );
        std::thread::Builder::new()
            .name("records-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| FateError::Storage(e.to_string()))?;
        Ok(DiskStore {
            inner: Arc::new(Inner {
                shared,
                tx,
                queued,
                metrics,
                written,
                closed: AtomicBool::new(false),
                durable,
            }),
        })
    }

    /// `put`, of a record shared with its writer (broker mode's copy of
    /// the records its own replica published).
    pub fn put_shared(&self, record: Arc<SettledEvent>) {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            // The service closes the store only once the pipeline drained.
            inner.metrics.record_dropped(RecordDrop::Shutdown);
            return;
        }
        if inner.queued.fetch_add(1, Ordering::AcqRel) >= MAX_QUEUED {
            inner.queued.fetch_sub(1, Ordering::AcqRel);
            inner.metrics.record_dropped(RecordDrop::QueueFull);
            return;
        }
        inner
            .shared
            .unwritten
            .lock()
            .insert(record.id.as_str().into(), record.clone());
        // Counted before it is sent: a mark read on another thread meanwhile
        // then waits for this record too, never for fewer than were sent
        // before it. (A send that fails, once the writer stopped, leaves
        // the count one high: later settles then wait out RECORDS_WAIT or
        // are replayed, never applied early.)
        inner.durable.handed_one();
        if inner.tx.send(Cmd::Put(record.clone())).is_err() {
            inner.queued.fetch_sub(1, Ordering::AcqRel);
            inner.shared.written(&record);
            inner.metrics.record_dropped(RecordDrop::Shutdown);
        }
    }

    /// Waits until every record handed over so far is durable (or dropped).
    pub async fn sync(&self) {
        let (reply, rx) = oneshot::channel();
        if self.inner.tx.send(Cmd::Sync(reply)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Stops the writer as a kill -9 would: nothing more is written, the
    /// files stay as they are (tests).
    #[cfg(test)]
    fn abandon(&self) {
        let _ = self.inner.tx.send(Cmd::Abandon);
    }

    /// Runs `f` on the shared state in a blocking task.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Shared) -> io::Result<T> + Send + 'static,
    ) -> Result<T, FateError> {
        let shared = self.inner.shared.clone();
        tokio::task::spawn_blocking(move || f(&shared))
            .await
            .map_err(|e| FateError::Storage(e.to_string()))?
            .map_err(|e| FateError::Storage(e.to_string()))
    }
}

fn storage(path: &Path, e: &io::Error) -> FateError {
    FateError::Storage(format!("{}: {e}", path.display()))
}

impl FateStore for DiskStore {
    fn put(&self, record: SettledEvent) {
        self.put_shared(Arc::new(record));
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<EventRecord>, FateError>> {
        let id = id.to_owned();
        async move {
            let unwritten = self.inner.shared.unwritten.lock().get(id.as_str()).cloned();
            if let Some(r) = unwritten {
                return Ok(r.record(&self.inner.shared.book));
            }
            self.blocking(move |s| get_blocking(s, &id)).await
        }
        .boxed()
    }

    fn by_user<'a>(
        &'a self,
        user_id: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<EventRecord>, FateError>> {
        let user = user_id.to_owned();
        async move {
            let unwritten: Vec<Arc<SettledEvent>> = self
                .inner
                .shared
                .unwritten
                .lock()
                .values()
                .cloned()
                .collect();
            let book = &self.inner.shared.book;
            let mut out: Vec<EventRecord> = unwritten
                .iter()
                .filter(|r| r.user_id().as_deref() == Some(user.as_str()))
                .filter_map(|r| r.record(book))
                .collect();
            out.sort_by_key(|r| std::cmp::Reverse(r.settled_at_ms));
            out.truncate(limit);
            self.blocking(move |s| by_user_blocking(s, &user, limit, out))
                .await
        }
        .boxed()
    }

    fn stats(&self) -> StoreStats {
        self.inner.shared.stats()
    }

    fn absent(&self) -> Absent {
        let o = &self.inner.shared.opts;
        let retention = humantime::format_duration(o.retention).to_string();
        Absent {
            detail: format!(
                "no record of this event id: it was not accepted here, it is still being \
                 processed, or its record expired (records are kept for {retention} after \
                 the event settles, and the oldest go first beyond {} bytes)",
                o.max_bytes
            ),
            retention,
            may_be_queued: false,
        }
    }

    fn read_after(
        &self,
        after: Option<Position>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<(Position, EventRecord)>, FateError>> {
        self.blocking(move |s| read_after_blocking(s, after, limit))
            .boxed()
    }

    fn written(&self) -> watch::Receiver<Option<Position>> {
        self.inner.written.clone()
    }

    fn durable(&self) -> Option<Durable> {
        Some(self.inner.durable.clone())
    }

    fn cursor(&self) -> Option<CallbackCursor> {
        *self.inner.shared.cursor.lock()
    }

    fn save_cursor(&self, cursor: Option<CallbackCursor>) -> BoxFuture<'_, Result<(), FateError>> {
        async move {
            self.blocking(move |s| {
                write_cursor(&s.dir, cursor)?;
                *s.cursor.lock() = cursor;
                Ok(())
            })
            .await
        }
        .boxed()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        async move {
            self.inner.closed.store(true, Ordering::Release);
            let (reply, rx) = oneshot::channel();
            if self.inner.tx.send(Cmd::Close(reply)).is_ok() {
                let _ = rx.await;
            }
        }
        .boxed()
    }
}

fn get_blocking(s: &Shared, id: &str) -> io::Result<Option<EventRecord>> {
    let fp = fingerprint(id);
    let cutoff = s.cutoff();
    let want = |r: &EventRecord| r.id == id;
    let (open, sealed) = s.newest_first();
    if let Some(o) = open {
        let end = o.end.load(Ordering::Acquire);
        let offsets = matching(&o.entries.read(), Key::Id, fp);
        for off in offsets.into_iter().rev() {
            if let Some(r) = read_matching(&o.file, off, end, cutoff, &s.book, want)? {
                return Ok(Some(r));
            }
        }
    }
    for f in sealed {
        let summary = f.lookup.summary();
        if summary.count > 0 && summary.max_at < cutoff {
            // Older files hold older records still.
            break;
        }
        for off in f.lookup.find(Key::Id, fp)?.into_iter().rev() {
            if let Some(r) = read_matching(&f.file, off, summary.data_end, cutoff, &s.book, want)? {
                return Ok(Some(r));
            }
        }
    }
    Ok(None)
}

fn by_user_blocking(
    s: &Shared,
    user: &str,
    limit: usize,
    mut out: Vec<EventRecord>,
) -> io::Result<Vec<EventRecord>> {
    let fp = fingerprint(user);
    let cutoff = s.cutoff();
    let want = |r: &EventRecord| r.user_id == user;
    let mut seen: HashSet<String> = out.iter().map(|r| r.id.clone()).collect();
    let mut push = |r: EventRecord, out: &mut Vec<EventRecord>| {
        if seen.insert(r.id.clone()) {
            out.push(r);
        }
    };
    let (open, sealed) = s.newest_first();
    if let Some(o) = open {
        let end = o.end.load(Ordering::Acquire);
        let offsets = matching(&o.entries.read(), Key::User, fp);
        for off in offsets.into_iter().rev() {
            if out.len() >= limit {
                return Ok(out);
            }
            if let Some(r) = read_matching(&o.file, off, end, cutoff, &s.book, want)? {
                push(r, &mut out);
            }
        }
    }
    for f in sealed {
        let summary = f.lookup.summary();
        if summary.count > 0 && summary.max_at < cutoff {
            break;
        }
        for off in f.lookup.find(Key::User, fp)?.into_iter().rev() {
            if out.len() >= limit {
                return Ok(out);
            }
            if let Some(r) = read_matching(&f.file, off, summary.data_end, cutoff, &s.book, want)? {
                push(r, &mut out);
            }
        }
    }
    out.truncate(limit);
    Ok(out)
}

fn read_after_blocking(
    s: &Shared,
    after: Option<Position>,
    limit: usize,
) -> io::Result<Vec<(Position, EventRecord)>> {
    // Oldest first this time: sealed files, then the open one.
    let mut files: Vec<(u64, Arc<dyn AsFile>)> = Vec::new();
    let open = s.open.read().clone();
    for f in s.sealed.read().values() {
        files.push((f.id, f.clone()));
    }
    if let Some(o) = open {
        if files.last().is_none_or(|(id, _)| *id < o.id) {
            files.push((o.id, o));
        }
    }
    let mut out = Vec::new();
    for (id, f) in files {
        if out.len() >= limit {
            break;
        }
        let from = match after {
            Some(p) if p.segment > id => continue,
            Some(p) if p.segment == id => p.offset,
            _ => 0,
        };
        let (file, end) = (f.file(), f.end());
        let start = if from == 0 {
            HEADER_LEN
        } else {
            // Just past the record at `from`.
            match format::read_at(file, from, end)? {
                Some((_, payload)) => from + (format::REC_HEAD + payload.len()) as u64,
                None => end,
            }
        };
        let mut scan = Scanner::new(file, start, end);
        while out.len() < limit {
            let Some((offset, _, payload)) = scan.next()? else {
                break;
            };
            let at = Position {
                segment: id,
                offset,
            };
            match format::record_of(payload, &s.book) {
                Some(r) => out.push((at, r)),
                None => tracing::warn!(?at, "an unreadable event record skipped"),
            }
        }
    }
    Ok(out)
}

/// A data file, sealed or open, as a sequential reader sees it.
trait AsFile: Send + Sync {
    fn file(&self) -> &File;
    fn end(&self) -> u64;
}

impl AsFile for Sealed {
    fn file(&self) -> &File {
        &self.file
    }
    fn end(&self) -> u64 {
        self.lookup.summary().data_end
    }
}

impl AsFile for OpenFile {
    fn file(&self) -> &File {
        &self.file
    }
    fn end(&self) -> u64 {
        self.end.load(Ordering::Acquire)
    }
}

/// Reads the files back: each data file is sealed, with its index read,
/// or rebuilt by scanning it (the file a crash left open, or one whose
/// index is missing or damaged). Returns them and the next file id.
fn recover(dir: &Path) -> io::Result<(BTreeMap<u64, Arc<Sealed>>, u64)> {
    let mut data = BTreeMap::new();
    let mut indexes = HashSet::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(".tmp") {
            let _ = std::fs::remove_file(&path);
            continue;
        }
        match format::parse_name(name) {
            Some((id, "rec")) => {
                data.insert(id, path);
            }
            Some((id, "idx")) => {
                indexes.insert(id);
            }
            _ => {}
        }
    }
    let next_id = data.keys().next_back().map_or(1, |id| id + 1);
    for id in &indexes {
        if !data.contains_key(id) {
            let _ = std::fs::remove_file(format::index_path(dir, *id));
        }
    }
    let mut sealed = BTreeMap::new();
    for (id, path) in data {
        match recover_file(dir, id, &path, indexes.contains(&id)) {
            Ok(Some(f)) => {
                sealed.insert(id, Arc::new(f));
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "an event record file cannot be read; set aside as *.bad");
                let _ = std::fs::rename(&path, path.with_extension("rec.bad"));
                let _ = std::fs::remove_file(format::index_path(dir, id));
            }
        }
    }
    Ok((sealed, next_id))
}

fn recover_file(dir: &Path, id: u64, path: &Path, has_index: bool) -> io::Result<Option<Sealed>> {
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    let (header_id, _) = format::read_data_header(&file)?;
    if header_id != id {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("its header says it is file {header_id}"),
        ));
    }
    let size = file.metadata()?.len();
    let index_path = format::index_path(dir, id);
    if has_index {
        match Index::open(&index_path) {
            Ok(index) if index.summary.data_end <= size => {
                return Ok(Some(Sealed {
                    id,
                    path: path.to_owned(),
                    file,
                    data_bytes: size,
                    lookup: Lookup::Disk(index),
                }));
            }
            Ok(_) => {
                tracing::warn!(path = %index_path.display(), "a record index longer than its data; rebuilt")
            }
            Err(e) => tracing::warn!(error = %e, "a record index is damaged; rebuilt"),
        }
    }
    let mut entries = Vec::new();
    let mut scan = Scanner::new(&file, HEADER_LEN, size);
    while let Some((offset, head, _)) = scan.next()? {
        entries.push(Entry {
            fp_id: head.fp_id,
            fp_user: head.fp_user,
            offset,
            at_ms: head.at_ms,
        });
    }
    let end = scan.position().max(HEADER_LEN);
    if entries.is_empty() {
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_file(&index_path);
        return Ok(None);
    }
    if end < size {
        tracing::warn!(path = %path.display(), bytes = size - end, "a torn tail after the last whole event record cut off");
        file.set_len(end)?;
        file.sync_data()?;
    }
    let lookup = match Index::write(&index_path, &entries, end) {
        Ok(i) => Lookup::Disk(i),
        Err(e) => {
            tracing::warn!(path = %index_path.display(), error = %e, "a record index cannot be written; kept in memory");
            Lookup::Memory(Summary::of(&entries, end), entries)
        }
    };
    Ok(Some(Sealed {
        id,
        path: path.to_owned(),
        file,
        data_bytes: end,
        lookup,
    }))
}

fn read_cursor(dir: &Path) -> Option<CallbackCursor> {
    let path = dir.join(CURSOR_FILE);
    let bytes = std::fs::read(&path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "the callbacks' cursor is unreadable: callbacks start with the records written from now on");
            None
        }
    }
}

/// Stores (or, with `None`, removes) the cursor durably: a temporary file,
/// synced, renamed over the old one.
fn write_cursor(dir: &Path, cursor: Option<CallbackCursor>) -> io::Result<()> {
    let path = dir.join(CURSOR_FILE);
    match cursor {
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        },
        Some(c) => {
            let tmp = dir.join(format!("{CURSOR_FILE}.tmp"));
            let f = File::create(&tmp)?;
            serde_json::to_writer(&f, &c).map_err(io::Error::other)?;
            f.sync_data()?;
            std::fs::rename(&tmp, &path)?;
        }
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests;
