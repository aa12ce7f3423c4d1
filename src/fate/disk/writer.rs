//! The record store's one writer thread. Each cycle takes every record
//! handed over since the last one, encodes it (`SettledEvent::encode`,
//! not deflated: older deflated payloads still read), and writes the lot to the
//! open data file with one `pwrite` and one `fdatasync`; only then are they
//! indexed, readable and announced to the callbacks. Once a second it seals
//! the open file when its time bucket is over and applies retention.
//!
//! A write that fails is rolled back (the file cut back to its last good
//! record and sealed), counted and logged once; the records stay held in
//! memory and are tried again with backoff in a new file, and the oldest
//! are dropped (counted) past a bound. Nothing here ever reaches back into
//! the clean-up.

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use tokio::sync::{oneshot, watch};

use super::format::{self, Entry, Index, RecHead, Summary, HEADER_LEN, REC_HEAD};
use super::{sync_dir, Lookup, OpenFile, Position, Sealed, Shared};
use crate::domain::clock::unix_ms;
use crate::domain::RecordDrop;
use crate::fate::SettledEvent;
use crate::inbox::journal::dedupe::{fingerprint, Fp};
use crate::telemetry::Metrics;

pub(super) enum Cmd {
    Put(Arc<SettledEvent>),
    /// Answered once everything handed over before it was tried.
    Sync(oneshot::Sender<()>),
    /// Writes what is held, seals the open file and stops.
    Close(oneshot::Sender<()>),
    /// Stops at once, as a kill -9 would (tests).
    #[cfg(test)]
    Abandon,
}

/// Most records taken into one group.
const MAX_GROUP: usize = 4_096;
/// How long the first record of a group waits for more.
const GATHER: Duration = Duration::from_millis(20);
/// Records held (deflated) while writes fail; past it the oldest go.
const MAX_HELD: usize = 16_384;
/// Records per data file, which bounds the open file's in-memory index.
const MAX_PER_FILE: usize = 65_536;
const MAINTENANCE_EVERY: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A record waiting to be written.
struct Held {
    record: Arc<SettledEvent>,
    fp_id: Fp,
    fp_user: Fp,
    payload: Vec<u8>,
}

pub(super) struct Writer {
    shared: Arc<Shared>,
    rx: Receiver<Cmd>,
    queued: Arc<AtomicUsize>,
    metrics: Metrics,
    written: watch::Sender<Option<Position>>,
    /// Records handed over and no longer held (written, or dropped): the
    /// journal applies an event's settle once its record is counted here.
    released: u64,
    durable: watch::Sender<u64>,
    held: VecDeque<Held>,
    next_id: u64,
    retry_at: Option<Instant>,
    backoff: Duration,
    /// Writes are failing (logged once when they start and stop).
    failing: bool,
    last_maintenance: Instant,
    buf: Vec<u8>,
}

impl Writer {
    pub(super) fn new(
        shared: Arc<Shared>,
        rx: Receiver<Cmd>,
        queued: Arc<AtomicUsize>,
        metrics: Metrics,
        written: watch::Sender<Option<Position>>,
        durable: watch::Sender<u64>,
        next_id: u64,
    ) -> Writer {
        Writer {
            shared,
            rx,
            queued,
            metrics,
            written,
            released: 0,
            durable,
            held: VecDeque::new(),
            next_id,
            retry_at: None,
            backoff: BACKOFF_MIN,
            failing: false,
            // Retention runs soon after start (files may have expired
            // while the service was down).
            last_maintenance: Instant::now() - MAINTENANCE_EVERY,
            buf: Vec::with_capacity(1 << 20),
        }
    }

    pub(super) fn run(mut self) {
        let mut group = Vec::with_capacity(MAX_GROUP);
        loop {
            match self.rx.recv_timeout(self.next_wake()) {
                Ok(first) => {
                    // A record waits a moment for others: the writer is not
                    // woken (a futex call and a context switch on the
                    // pipeline's side) for every settled event. Nothing
                    // waits on a put; a sync or close is answered at once.
                    if matches!(first, Cmd::Put(_)) {
                        std::thread::sleep(GATHER);
                    }
                    group.push(first);
                    while group.len() < MAX_GROUP {
                        match self.rx.try_recv() {
                            Ok(c) => group.push(c),
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.finish();
                    return;
                }
            }
            let mut syncs = Vec::new();
            let mut close = None;
            for cmd in group.drain(..) {
                match cmd {
                    Cmd::Put(r) => {
                        self.queued.fetch_sub(1, Ordering::AcqRel);
                        self.hold(r);
                    }
                    Cmd::Sync(reply) => syncs.push(reply),
                    Cmd::Close(reply) => close = Some(reply),
                    #[cfg(test)]
                    Cmd::Abandon => return,
                }
            }
            if self.may_write() {
                self.write_held();
            }
            if self.last_maintenance.elapsed() >= MAINTENANCE_EVERY {
                self.maintain();
            }
            self.announce_released();
            for s in syncs {
                let _ = s.send(());
            }
            if let Some(reply) = close {
                self.finish();
                let _ = reply.send(());
                return;
            }
        }
    }

    fn announce_released(&self) {
        let n = self.released;
        self.durable
            .send_if_modified(|v| std::mem::replace(v, n) != n);
    }

    fn next_wake(&self) -> Duration {
        let mut at = self.last_maintenance + MAINTENANCE_EVERY;
        if let (Some(t), false) = (self.retry_at, self.held.is_empty()) {
            at = at.min(t);
        }
        at.saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    }

    fn may_write(&self) -> bool {
        self.retry_at.is_none_or(|t| Instant::now() >= t)
    }

    /// Serializes a record and queues it for the next write.
    fn hold(&mut self, record: Arc<SettledEvent>) {
        let mut payload = Vec::with_capacity(96 + record.body.len() + 40 * record.outcomes.len());
        record.encode(&mut payload);
        self.held.push_back(Held {
            fp_id: fingerprint(&record.id),
            fp_user: fingerprint(&record.user_id().unwrap_or_default()),
            payload,
            record,
        });
        while self.held.len() > MAX_HELD {
            if let Some(h) = self.held.pop_front() {
                self.shared.written(&h.record);
                self.released += 1;
                self.metrics.record_dropped(RecordDrop::StorageError);
            }
        }
    }

    /// Writes every held record, a group at a time, until done or a write
    /// fails.
    fn write_held(&mut self) {
        let roll = self.shared.opts.roll_bytes();
        while !self.held.is_empty() {
            // A group fits in one file (at least one record), so files
            // roll at their size and retention by bytes has whole files
            // to delete.
            let mut bytes = 0u64;
            let n = self
                .held
                .iter()
                .take(MAX_GROUP)
                .take_while(|h| {
                    bytes += (REC_HEAD + h.payload.len()) as u64;
                    bytes <= roll
                })
                .count()
                .max(1);
            if !self.write_group(n) {
                return;
            }
        }
    }

    /// Writes the first `n` held records durably; false if it failed.
    fn write_group(&mut self, n: usize) -> bool {
        let now = unix_ms();
        let bytes: u64 = self
            .held
            .iter()
            .take(n)
            .map(|h| (REC_HEAD + h.payload.len()) as u64)
            .sum();
        let open = match self.open_for(now, n, bytes) {
            Ok(o) => o,
            Err(e) => {
                self.fail("create a record file in", e);
                return false;
            }
        };
        let start = open.end.load(Ordering::Acquire);
        self.buf.clear();
        let mut entries = Vec::with_capacity(n);
        for h in self.held.iter().take(n) {
            let head = RecHead {
                at_ms: now,
                fp_id: h.fp_id,
                fp_user: h.fp_user,
            };
            entries.push(Entry {
                fp_id: h.fp_id,
                fp_user: h.fp_user,
                offset: start + self.buf.len() as u64,
                at_ms: now,
            });
            format::encode(&mut self.buf, head, &h.payload);
        }
        let wrote = open
            .file
            .write_all_at(&self.buf, start)
            .and_then(|()| open.file.sync_data());
        if let Err(e) = wrote {
            // What may have reached the file is not a record anyone saw;
            // cut it off (a scan would stop there anyway) and go on in a
            // new file.
            let _ = open.file.set_len(start);
            self.fail("write", e);
            self.seal_open();
            return false;
        }
        let last = entries.last().map(|e| e.offset);
        open.entries.write().extend(entries);
        open.end
            .store(start + self.buf.len() as u64, Ordering::Release);
        for h in self.held.drain(..n) {
            self.shared.written(&h.record);
        }
        self.released += n as u64;
        self.metrics.records_written(n);
        if let Some(offset) = last {
            self.written.send_replace(Some(Position {
                segment: open.id,
                offset,
            }));
        }
        if self.failing {
            tracing::info!("event record writes work again");
            self.failing = false;
        }
        self.retry_at = None;
        self.backoff = BACKOFF_MIN;
        true
    }

    /// The open file, sealed first and replaced if `n` records of `bytes`
    /// would not fit it or its bucket is over; created if there is none.
    fn open_for(&mut self, now: u64, n: usize, bytes: u64) -> std::io::Result<Arc<OpenFile>> {
        let opts = self.shared.opts;
        let current = self.shared.open.read().clone();
        if let Some(o) = current {
            let count = o.entries.read().len();
            let full = count + n > MAX_PER_FILE
                || (count > 0 && o.end.load(Ordering::Acquire) + bytes > opts.roll_bytes());
            let old = now.saturating_sub(o.created_ms) >= bucket_ms(&opts);
            if !full && !old {
                return Ok(o);
            }
            self.seal_open();
        }
        let id = self.next_id;
        let path = format::data_path(&self.shared.dir, id);
        let made = (|| {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)?;
            file.write_all_at(&format::data_header(id, now), 0)?;
            file.sync_data()?;
            sync_dir(&self.shared.dir)?;
            Ok(file)
        })();
        let file = match made {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                // A failed create must not reuse the name next time.
                self.next_id += 1;
                return Err(e);
            }
        };
        self.next_id += 1;
        let open = Arc::new(OpenFile {
            id,
            path,
            file,
            created_ms: now,
            end: AtomicU64::new(HEADER_LEN),
            entries: RwLock::new(Vec::new()),
        });
        *self.shared.open.write() = Some(open.clone());
        Ok(open)
    }

    /// Seals the open file: writes its index and lists it as sealed (before
    /// it stops being the open one, so readers never miss it).
    fn seal_open(&mut self) {
        let Some(o) = self.shared.open.read().clone() else {
            return;
        };
        let entries = o.entries.read().clone();
        let end = o.end.load(Ordering::Acquire);
        if entries.is_empty() {
            *self.shared.open.write() = None;
            let _ = std::fs::remove_file(&o.path);
            return;
        }
        let file = match o.file.try_clone() {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "cannot seal the open event record file yet");
                return;
            }
        };
        let lookup = index_or_memory(&self.shared, o.id, entries, end);
        self.shared.sealed.write().insert(
            o.id,
            Arc::new(Sealed {
                id: o.id,
                path: o.path.clone(),
                file,
                data_bytes: end,
                lookup,
            }),
        );
        *self.shared.open.write() = None;
    }

    fn fail(&mut self, verb: &str, e: std::io::Error) {
        self.metrics.record_write_error();
        if !self.failing {
            tracing::error!(dir = %self.shared.dir.display(), error = %e, "cannot {verb} the event record store; records are held and retried (the clean-up goes on)");
            self.failing = true;
        } else {
            tracing::debug!(error = %e, "event record writes still fail");
        }
        self.retry_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    /// Seals a file whose bucket is over, writes indexes that could not be
    /// written before, and applies retention: by age, then by bytes.
    fn maintain(&mut self) {
        self.last_maintenance = Instant::now();
        let opts = self.shared.opts;
        let now = unix_ms();
        let stale = self
            .shared
            .open
            .read()
            .as_ref()
            .is_some_and(|o| now.saturating_sub(o.created_ms) >= bucket_ms(&opts));
        if stale {
            self.seal_open();
        }
        let in_memory: Vec<Arc<Sealed>> = self
            .shared
            .sealed
            .read()
            .values()
            .filter(|f| matches!(f.lookup, Lookup::Memory(..)))
            .cloned()
            .collect();
        for f in in_memory {
            if let Lookup::Memory(s, entries) = &f.lookup {
                let path = format::index_path(&self.shared.dir, f.id);
                if let Ok(index) = Index::write(&path, entries, s.data_end) {
                    if let Ok(file) = f.file.try_clone() {
                        self.shared.sealed.write().insert(
                            f.id,
                            Arc::new(Sealed {
                                id: f.id,
                                path: f.path.clone(),
                                file,
                                data_bytes: f.data_bytes,
                                lookup: Lookup::Disk(index),
                            }),
                        );
                    }
                }
            }
        }
        // By age: files whose newest record expired, unless a callback in
        // them is still to be delivered (callbacks.max_age is at most the
        // retention, so that is only ever a short wait).
        let cutoff = self.shared.cutoff();
        let expired: Vec<Arc<Sealed>> = self
            .shared
            .sealed
            .read()
            .values()
            .filter(|f| f.lookup.summary().max_at < cutoff)
            .filter(|f| !self.shared.undelivered(last_position(f)))
            .cloned()
            .collect();
        for f in expired {
            self.delete(&f);
        }
        // By bytes: the oldest first, whatever they hold.
        while self.shared.stats().bytes > opts.max_bytes {
            let Some(oldest) = self.shared.sealed.read().values().next().cloned() else {
                break;
            };
            if self.shared.undelivered(last_position(&oldest)) {
                let n = oldest.lookup.summary().count;
                tracing::error!(
                    records = n,
                    "records.max_bytes deleted event records whose callbacks were not delivered yet; raise records.max_bytes or fix the callback receiver"
                );
                self.metrics.callbacks_lost(n);
            }
            self.delete(&oldest);
        }
    }

    fn delete(&self, f: &Sealed) {
        self.shared.sealed.write().remove(&f.id);
        let _ = std::fs::remove_file(&f.path);
        let _ = std::fs::remove_file(format::index_path(&self.shared.dir, f.id));
        let _ = sync_dir(&self.shared.dir);
        tracing::debug!(file = f.id, "an event record file deleted by retention");
    }

    /// The end of a graceful stop: one last try at what is held, then the
    /// open file is sealed so the next start need not scan it.
    fn finish(&mut self) {
        self.retry_at = None;
        self.write_held();
        for h in self.held.drain(..) {
            self.shared.written(&h.record);
            self.released += 1;
            self.metrics.record_dropped(RecordDrop::StorageError);
        }
        self.announce_released();
        self.seal_open();
    }
}

fn bucket_ms(opts: &super::StoreOptions) -> u64 {
    u64::try_from(opts.bucket().as_millis()).unwrap_or(u64::MAX)
}

fn last_position(f: &Sealed) -> Position {
    Position {
        segment: f.id,
        offset: f.lookup.summary().last_offset,
    }
}

/// Writes a sealed file's index; keeps it in memory if that fails.
fn index_or_memory(shared: &Shared, id: u64, entries: Vec<Entry>, end: u64) -> Lookup {
    let path = format::index_path(&shared.dir, id);
    match Index::write(&path, &entries, end) {
        Ok(i) => Lookup::Disk(i),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "a record index cannot be written; kept in memory and retried");
            Lookup::Memory(Summary::of(&entries, end), entries)
        }
    }
}
