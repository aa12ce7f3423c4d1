//! The journal's single writer thread. Each cycle takes every command
//! queued since the last one (group commit) and, in order:
//! 1. stores dead letters durably (they must be on disk before the settle
//!    of their event is);
//! 2. applies settles to the live sets (held while dead letters wait);
//! 3. answers duplicates and writes the new appends to the active segment
//!    with one `pwrite` and one `fdatasync`, then acknowledges them;
//! 4. writes the settled checkpoint when due (once a second) or asked;
//! 5. deletes segments that have fully settled, flushes the dedupe memtable
//!    into a run when it is full or old.
//!
//! On a storage error it rolls back what may have reached the disk (the
//! failed group's bytes, its ids), answers the appends with an error, keeps
//! what must not be lost (dead letters, settles) in memory, and retries
//! with backoff, probing the disk even when no request comes, so `/readyz`
//! turns 200 again by itself.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use serde_json::value::RawValue;
use tokio::sync::oneshot;

use super::dedupe::{self, fingerprint, Fp, Memtable, Run, Span};
use super::log::{self, Segment, HEADER_LEN};
use super::settled::{self, Live};
use super::state::Legacy;
use super::{
    now_secs, Appended, Fault, JournalError, JournalHealth, Loc, Recovered, SegView, Shared, Tuning,
};
use crate::domain::clock::unix_ms;
use crate::domain::DeadLetter;

type AppendReply = oneshot::Sender<Result<Appended, JournalError>>;

pub(super) enum Cmd {
    Append {
        id: String,
        fp: Fp,
        body: Vec<u8>,
        reply: AppendReply,
    },
    /// A record's seq, and the record store's count it waits for.
    Settle(u64, u64),
    /// A dead letter, and where its event's record is if `event` is to be
    /// filled in from it.
    DeadLetter(Box<DeadLetter>, Option<Loc>),
    Replay {
        ids: Option<Vec<u64>>,
        reply: oneshot::Sender<Result<usize, JournalError>>,
    },
    Prune {
        older_than_unix: u64,
    },
    Sync(oneshot::Sender<Result<(), JournalError>>),
    Shutdown(oneshot::Sender<()>),
    /// Stops at once, writing nothing more: the files as a kill -9 leaves
    /// them (tests).
    #[cfg(test)]
    Abandon(oneshot::Sender<()>),
}

/// Most commands taken into one cycle.
const MAX_GROUP: usize = 4_096;
/// How often the writer looks whether records it waits for are durable
/// (the record store gathers for 20 ms before it writes).
const RECORDS_POLL: Duration = Duration::from_millis(5);
/// Longest a settle waits for its event's record.
pub const RECORDS_WAIT: Duration = Duration::from_secs(30);
/// Settles are made durable (the checkpoint) at most this long after they
/// happen, so a kill -9 replays at most this much.
pub const SETTLE_SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// First and longest wait before writing again after a failure.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Held in memory while writes fail: settles (8 bytes each; beyond the
/// bound the oldest are dropped, which only replays their events after a
/// restart) and dead letters (beyond the bound, see `hold_dead`).
const MAX_HELD_SETTLES: usize = 1_000_000;
const MAX_HELD_DEAD: usize = 10_000;
/// How often an idle writer looks at its files (removed? memtable old?).
const MAINTENANCE_EVERY: Duration = Duration::from_secs(5);

pub(super) struct Writer {
    shared: Arc<Shared>,
    rx: Receiver<Cmd>,
    /// The segment new records go to (created on the first append).
    active: Option<(u64, Arc<SegView>)>,
    next_seq: u64,
    memtable: Memtable,
    /// Every id under a seq up to this is in a run.
    flushed_seq: u64,
    runs: Arc<RwLock<Vec<Arc<Run>>>>,
    /// Wakes the background merger after a flush.
    merger: Option<Sender<()>>,
    /// Dead letters not yet durable, committed first next time.
    held_dead: Vec<(DeadLetter, Option<Loc>)>,
    /// Settles waiting for those dead letters.
    held_settles: VecDeque<u64>,
    /// Settles waiting for their events' records (seq, the record store's
    /// count, since when), in the order they came.
    awaiting_records: VecDeque<(u64, u64, Instant)>,
    /// Settles stopped waiting for records (logged once).
    records_late: bool,
    /// A dead letter was dropped: settles from then on are not applied, so
    /// their events (and that dead letter) come back after a restart.
    dead_overflowed: bool,
    /// Live records in memory.
    live_total: u64,
    /// Settles applied since the last durable checkpoint.
    unsynced_settled: u64,
    ckpt_dirty: bool,
    last_ckpt: Instant,
    /// Set after a failure: no write is tried before this instant.
    retry_at: Option<Instant>,
    backoff: Duration,
    /// Something failed in this cycle.
    failed_now: bool,
    last_maintenance: Instant,
    stopped: bool,
    /// The journal's directory was removed while in use: broken until a
    /// restart.
    files_removed: bool,
    buf: Vec<u8>,
    tuning: Tuning,
    /// Settled segments kept to be written over (`Segment::recycle`), at
    /// most `SPARES`.
    spares: Vec<PathBuf>,
}

/// Settled segments kept for reuse: one is enough while the log turns
/// over, a second covers a burst that seals two before the next look.
const SPARES: usize = 2;

fn drain_into(rx: &Receiver<Cmd>, group: &mut Vec<Cmd>) {
    while group.len() < MAX_GROUP {
        match rx.try_recv() {
            Ok(c) => group.push(c),
            Err(_) => break,
        }
    }
}

/// What earlier versions stored as an event record (JSON in redb).
#[derive(serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum LegacyRecord {
    Event {
        id: String,
        received_unix_ms: u64,
        body: Box<RawValue>,
    },
    Replay {
        received_unix_ms: u64,
        dead_letter: DeadLetter,
    },
}

impl Writer {
    pub(super) fn new(
        shared: Arc<Shared>,
        rx: Receiver<Cmd>,
        r: Recovered,
        tuning: Tuning,
    ) -> Writer {
        let live_total = r.live.values().map(Live::count).sum();
        let runs = Arc::new(RwLock::new(r.runs));
        let (tx, merges) = std::sync::mpsc::channel();
        let merger = {
            let (runs, dir, faults) = (runs.clone(), shared.ids_dir.clone(), shared.faults.clone());
            std::thread::Builder::new()
                .name("journal-merger".into())
                .spawn(move || merge_runs(dir, runs, merges, faults))
                .ok()
                .map(|_| tx)
        };
        if let Some(m) = &merger {
            // Merges a restart interrupted, or a day that ended meanwhile.
            let _ = m.send(());
        }
        let mut spares = r.spares;
        for extra in spares.split_off(spares.len().min(SPARES)) {
            let _ = std::fs::remove_file(extra);
        }
        Writer {
            spares,
            shared,
            rx,
            active: None,
            next_seq: r.next_seq,
            memtable: r.memtable,
            flushed_seq: r.flushed_seq,
            runs,
            merger,
            held_dead: Vec::new(),
            held_settles: VecDeque::new(),
            awaiting_records: VecDeque::new(),
            records_late: false,
            dead_overflowed: false,
            live_total,
            unsynced_settled: 0,
            ckpt_dirty: false,
            last_ckpt: Instant::now(),
            retry_at: None,
            backoff: BACKOFF_MIN,
            failed_now: false,
            // The first look (old segments to delete) soon after start.
            last_maintenance: Instant::now() - MAINTENANCE_EVERY + Duration::from_millis(200),
            stopped: false,
            files_removed: false,
            buf: Vec::with_capacity(1 << 20),
            tuning,
        }
    }

    /// Moves what an earlier version's `journal.redb` held (unsettled
    /// events, dedupe ids) into the log and a run, before anything else.
    pub(super) fn migrate(&mut self, legacy: Legacy) -> Result<(), Fault> {
        if legacy.events.is_empty() && legacy.ids.is_empty() {
            return Ok(());
        }
        if !legacy.ids.is_empty() {
            let mut fps: Vec<(Fp, u64)> = legacy
                .ids
                .iter()
                .map(|(id, at)| (fingerprint(id), *at))
                .collect();
            fps.sort_unstable_by_key(|(fp, _)| *fp);
            fps.dedup_by_key(|(fp, _)| *fp);
            let span = Span {
                count: fps.len() as u64,
                first_seq: 0,
                last_seq: 0,
                min_at: fps.iter().map(|(_, a)| *a).min().unwrap_or(0),
                max_at: fps.iter().map(|(_, a)| *a).max().unwrap_or(0),
            };
            let run = Run::write(
                &self.shared.ids_dir,
                fps.iter().map(|(fp, _)| Ok(*fp)),
                fps.len(),
                span,
                self.shared.faults.as_ref(),
            )
            .map_err(|e| Fault::io(&e))?;
            self.runs.write().insert(0, Arc::new(run));
        }
        if !legacy.events.is_empty() {
            self.buf.clear();
            let first = self.next_seq;
            let mut seqs = Vec::new();
            for bytes in &legacy.events {
                let seq = self.next_seq;
                match serde_json::from_slice::<LegacyRecord>(bytes) {
                    Ok(LegacyRecord::Event {
                        id,
                        received_unix_ms,
                        body,
                    }) => {
                        log::encode_event(
                            &mut self.buf,
                            seq,
                            received_unix_ms,
                            &id,
                            body.get().as_bytes(),
                        );
                        self.memtable
                            .insert(fingerprint(&id), seq, received_unix_ms / 1000);
                    }
                    Ok(LegacyRecord::Replay {
                        received_unix_ms,
                        dead_letter,
                    }) => {
                        let dl = serde_json::to_vec(&dead_letter).expect("dead letters serialize");
                        log::encode_replay(&mut self.buf, seq, received_unix_ms, &dl);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "an earlier version's journal entry is unreadable; skipped");
                        continue;
                    }
                }
                self.next_seq += 1;
                seqs.push(seq);
            }
            if !seqs.is_empty() {
                let base = self.write_buf(first).map_err(|(f, _)| f)?;
                self.add_live(base, &seqs, self.buf.len());
            }
            tracing::warn!(
                events = seqs.len(),
                ids = legacy.ids.len(),
                "moved an earlier version's journal entries into the log"
            );
        }
        self.shared.state.drop_legacy()?;
        self.publish_pending();
        Ok(())
    }

    pub(super) fn run(mut self) {
        let mut group = Vec::with_capacity(MAX_GROUP);
        loop {
            match self.rx.recv_timeout(self.next_wake()) {
                Ok(first) => {
                    group.push(first);
                    drain_into(&self.rx, &mut group);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.finish();
                    return;
                }
            }
            self.cycle(std::mem::take(&mut group));
            if self.stopped {
                return;
            }
        }
    }

    fn next_wake(&self) -> Duration {
        let now = Instant::now();
        let mut at = self.last_maintenance + MAINTENANCE_EVERY;
        if self.ckpt_dirty {
            at = at.min(self.last_ckpt + SETTLE_SYNC_INTERVAL);
        }
        if let Some(t) = self.retry_at {
            at = at.min(t);
        }
        if !self.awaiting_records.is_empty() {
            at = at.min(now + RECORDS_POLL);
        }
        at.saturating_duration_since(now)
            .max(Duration::from_millis(1))
    }

    /// Applies (or holds behind dead letters) the settles whose records
    /// are durable, in the order they came; one that waited `RECORDS_WAIT`
    /// goes on without (the record store cannot write: its records are
    /// counted as dropped, the clean-up is not held up by them).
    fn release_settles(&mut self) {
        if self.awaiting_records.is_empty() {
            return;
        }
        let records = self.shared.records.get().cloned();
        while let Some(&(seq, mark, since)) = self.awaiting_records.front() {
            if records.as_ref().is_some_and(|r| !r.is_reached(mark)) {
                if since.elapsed() < RECORDS_WAIT {
                    break;
                }
                if !std::mem::replace(&mut self.records_late, true) {
                    tracing::warn!(
                        "event records are not written within {RECORDS_WAIT:?}; settles go on without waiting for them (a kill -9 may leave settled events without a record)"
                    );
                }
            } else if std::mem::take(&mut self.records_late) {
                tracing::info!("event records are written again; settles wait for them");
            }
            self.awaiting_records.pop_front();
            if self.held_dead.is_empty() {
                self.apply_settle(seq);
            } else {
                self.hold_settle(seq);
            }
        }
    }

    fn may_write(&self) -> bool {
        self.retry_at.is_none_or(|t| Instant::now() >= t)
    }

    fn cycle(&mut self, group: Vec<Cmd>) {
        let mut appends = Vec::new();
        let mut replays = Vec::new();
        let mut syncs = Vec::new();
        let mut shutdown = None;
        for cmd in group {
            match cmd {
                Cmd::Append {
                    id,
                    fp,
                    body,
                    reply,
                } => appends.push((id, fp, body, reply)),
                Cmd::Settle(seq, records) => {
                    self.awaiting_records
                        .push_back((seq, records, Instant::now()));
                }
                Cmd::DeadLetter(dl, at) => self.hold_dead(*dl, at),
                Cmd::Replay { ids, reply } => replays.push((ids, reply)),
                Cmd::Prune { older_than_unix } => self.prune(older_than_unix),
                Cmd::Sync(reply) => syncs.push(reply),
                Cmd::Shutdown(reply) => shutdown = Some(reply),
                #[cfg(test)]
                Cmd::Abandon(reply) => {
                    self.shared.state.shutdown();
                    self.stopped = true;
                    let _ = reply.send(());
                    return;
                }
            }
        }
        self.release_settles();
        if let Some(reply) = shutdown {
            self.refuse(appends);
            for (_, r) in replays {
                let _ = r.send(Err(JournalError::Closed));
            }
            self.finish();
            for s in syncs {
                let _ = s.send(Ok(()));
            }
            let _ = reply.send(());
            return;
        }
        let retrying = self.retry_at.is_some();
        let may_write = self.may_write();
        self.failed_now = false;
        if may_write {
            self.retry_at = None;
            self.commit_dead();
        }
        if !appends.is_empty() {
            if may_write && !self.failed_now {
                self.write_appends(appends);
            } else {
                self.refuse(appends);
            }
        }
        for (ids, reply) in replays {
            let r = if may_write && !self.failed_now {
                self.replay(ids)
            } else {
                Err(self.refusal())
            };
            let _ = reply.send(r);
        }
        let ckpt_due = self.ckpt_dirty
            && (!syncs.is_empty() || self.last_ckpt.elapsed() >= SETTLE_SYNC_INTERVAL);
        if ckpt_due && may_write && !self.failed_now {
            self.checkpoint();
        }
        if retrying && may_write && !self.failed_now {
            // Nothing else may come to show the disk works again (a load
            // balancer stops sending while /readyz says 503): probe it.
            self.probe();
        }
        let durable = !self.ckpt_dirty && self.held_dead.is_empty() && !self.failed_now;
        // Whoever a sync answers reads the count next.
        self.publish_pending();
        for s in syncs {
            let _ = s.send(if durable { Ok(()) } else { Err(self.refusal()) });
        }
        if may_write && !self.failed_now {
            self.healthy();
        }
        self.delete_settled_segments();
        if self.last_maintenance.elapsed() >= MAINTENANCE_EVERY {
            self.last_maintenance = Instant::now();
            self.maintain();
        }
        if self.memtable.len() >= self.tuning.flush_ids_at && may_write && !self.failed_now {
            self.flush_memtable();
        }
        self.publish_pending();
    }

    /// Writes work (again).
    fn healthy(&mut self) {
        self.backoff = BACKOFF_MIN;
        if !self.files_removed {
            self.shared.set_health(JournalHealth::Ok);
        }
    }

    /// The error appends and syncs get while the store cannot write.
    fn refusal(&self) -> JournalError {
        JournalError::Storage(match &*self.shared.health.lock() {
            JournalHealth::Failing(r) | JournalHealth::Broken(r) => r.clone(),
            JournalHealth::Ok => "journal writes fail".to_owned(),
        })
    }

    fn refuse(&self, appends: Vec<(String, Fp, Vec<u8>, AppendReply)>) {
        let e = self.refusal();
        for (_, _, _, reply) in appends {
            let _ = reply.send(Err(JournalError::Storage(e.to_string())));
        }
    }

    fn publish_pending(&self) {
        self.shared
            .pending
            .store(self.live_total + self.unsynced_settled, Ordering::Relaxed);
    }

    /// A write failed: counted, said in the health, retried after backoff.
    fn failed(&mut self, verb: &str, what: &std::path::Path, fault: &Fault) {
        self.shared.record_fault(verb, what, fault);
        self.failed_now = true;
        self.retry_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
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

    fn hold_dead(&mut self, dl: DeadLetter, at: Option<Loc>) {
        if self.held_dead.len() >= MAX_HELD_DEAD {
            if !self.dead_overflowed {
                tracing::error!(
                    "journal: too many dead letters held while writes fail; events settled from now on are replayed after a restart instead"
                );
            }
            self.dead_overflowed = true;
            return;
        }
        self.held_dead.push((dl, at));
    }

    fn apply_settle(&mut self, seq: u64) {
        if self.dead_overflowed {
            return;
        }
        let mut live = self.shared.live.lock();
        let Some((base, l)) = live.range_mut(..=seq).next_back() else {
            return;
        };
        if l.settle(seq - base) {
            self.live_total -= 1;
            self.unsynced_settled += 1;
            self.ckpt_dirty = true;
        }
    }

    /// Stores the held dead letters (filling in their events), then applies
    /// the settles that waited for them.
    fn commit_dead(&mut self) {
        if self.held_dead.is_empty() {
            return;
        }
        for i in 0..self.held_dead.len() {
            if let Some(loc) = self.held_dead[i].1.take() {
                if let Some((id, event)) = self.event_at(loc) {
                    let dl = &mut self.held_dead[i].0;
                    dl.event_id = id;
                    dl.event = event;
                }
            }
        }
        let mut dls: Vec<DeadLetter> = self.held_dead.iter().map(|(d, _)| d.clone()).collect();
        match self.shared.state.commit_dead(&mut dls) {
            Ok(()) => {
                self.held_dead.clear();
                while let Some(seq) = self.held_settles.pop_front() {
                    self.apply_settle(seq);
                }
            }
            Err(fault) => {
                // Keep the ids given, so a commit that reached the disk
                // anyway is not stored twice.
                for ((held, _), d) in self.held_dead.iter_mut().zip(dls) {
                    held.id = d.id;
                }
                let path = self.shared.state.path.clone();
                self.failed("write", &path, &fault);
            }
        }
    }

    /// The event id and event a record holds (for a dead letter: the
    /// pipeline keeps neither).
    fn event_at(&self, loc: Loc) -> Option<(String, serde_json::Value)> {
        let (id, body) = self.shared.event_at(loc)?;
        Some((
            id,
            serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        ))
    }

    /// The segment a group of `len` bytes starting at `first_seq` goes to:
    /// the active one while it has room, else a new one.
    fn segment_for(
        &mut self,
        first_seq: u64,
        len: usize,
    ) -> Result<Arc<SegView>, (Fault, PathBuf)> {
        if let Some((_, view)) = &self.active {
            let end = view.end.load(Ordering::Relaxed);
            if end == HEADER_LEN || end + len as u64 <= self.tuning.segment_bytes {
                return Ok(view.clone());
            }
            self.seal_active();
        }
        let nonce = rand::random::<u64>();
        let seg = match self.recycled(first_seq, nonce) {
            Some(seg) => seg,
            None => Segment::create(
                &self.shared.log_dir,
                first_seq,
                nonce,
                self.shared.faults.as_ref(),
            )
            .map_err(|e| {
                (
                    Fault::io(&e),
                    log::segment_path(&self.shared.log_dir, first_seq),
                )
            })?,
        };
        let view = Arc::new(SegView {
            seg: Arc::new(seg),
            end: std::sync::atomic::AtomicU64::new(HEADER_LEN),
            sealed: std::sync::atomic::AtomicBool::new(false),
        });
        self.shared.live.lock().insert(first_seq, Live::new(nonce));
        self.shared.segments.write().insert(first_seq, view.clone());
        self.active = Some((first_seq, view.clone()));
        Ok(view)
    }

    /// A spare made the segment for `base`, if there is one and that
    /// works; a spare that fails is removed (a new file is made instead).
    fn recycled(&mut self, base: u64, nonce: u64) -> Option<Segment> {
        let spare = self.spares.pop()?;
        let dir = &self.shared.log_dir;
        match Segment::recycle(&spare, dir, base, nonce, self.shared.faults.as_ref()) {
            Ok(seg) => Some(seg),
            Err(e) => {
                tracing::debug!(error = %e, path = %spare.display(), "a spare journal segment could not be reused; removed");
                // Nothing was written to the new segment yet, whichever
                // name the failure left it under.
                let _ = std::fs::remove_file(&spare);
                let _ = std::fs::remove_file(log::segment_path(dir, base));
                None
            }
        }
    }

    /// The active segment takes no more records; an empty one goes at once.
    fn seal_active(&mut self) {
        let Some((base, view)) = self.active.take() else {
            return;
        };
        view.sealed.store(true, Ordering::Release);
        if view.end.load(Ordering::Relaxed) == HEADER_LEN {
            self.shared.segments.write().remove(&base);
            self.shared.live.lock().remove(&base);
            let _ = std::fs::remove_file(&view.seg.path);
        }
    }

    /// Writes `self.buf` (records from `first_seq` on) and syncs it. On
    /// failure cuts the segment back to where it was and seals it, so the
    /// failed bytes are never read, and nothing is written after them.
    fn write_buf(&mut self, first_seq: u64) -> Result<u64, (Fault, PathBuf)> {
        let view = self.segment_for(first_seq, self.buf.len())?;
        let base = self.active.as_ref().map_or(first_seq, |(b, _)| *b);
        let end = view.end.load(Ordering::Relaxed);
        match view
            .seg
            .write_at(end, &self.buf)
            .and_then(|()| view.seg.sync())
        {
            // Published after the live bits (see `add_live`): a reader
            // must never see a record before it is live.
            Ok(()) => Ok(base),
            Err(e) => {
                let fault = Fault::io(&e);
                if let Err(t) = view.seg.truncate(end) {
                    tracing::warn!(error = %t, "a failed journal write could not be cut back; a restart may replay what got 503");
                }
                self.seal_active();
                Err((fault, view.seg.path.clone()))
            }
        }
    }

    /// Marks records just written (`len` bytes in segment `base`) live,
    /// then makes them visible to readers.
    fn add_live(&mut self, base: u64, seqs: &[u64], len: usize) {
        {
            let mut live = self.shared.live.lock();
            if let Some(l) = live.get_mut(&base) {
                for s in seqs {
                    l.add(s - base);
                }
            }
        }
        self.live_total += seqs.len() as u64;
        self.publish_pending();
        if let Some(view) = self.shared.segments.read().get(&base) {
            let end = view.end.load(Ordering::Relaxed) + len as u64;
            view.end.store(end, Ordering::Release);
        }
        self.shared.committed.notify_one();
    }

    fn write_appends(&mut self, appends: Vec<(String, Fp, Vec<u8>, AppendReply)>) {
        let received_ms = unix_ms();
        let at = received_ms / 1000;
        let first_seq = self.next_seq;
        let runs = self.runs.read().clone();
        self.buf.clear();
        let mut fresh: Vec<(u64, Fp, AppendReply)> = Vec::with_capacity(appends.len());
        let mut waiting: Vec<AppendReply> = Vec::new();
        for (id, fp, body, reply) in appends {
            if let Some(e) = self.memtable.get(&fp) {
                if e.seq >= first_seq {
                    // Its first copy is in this very group: the answer
                    // depends on whether the group gets written.
                    waiting.push(reply);
                } else {
                    let _ = reply.send(Ok(Appended::Duplicate));
                }
                continue;
            }
            if in_runs(&runs, fp) {
                let _ = reply.send(Ok(Appended::Duplicate));
                continue;
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            self.memtable.insert(fp, seq, at);
            log::encode_event(&mut self.buf, seq, received_ms, &id, &body);
            fresh.push((seq, fp, reply));
        }
        if fresh.is_empty() {
            return;
        }
        match self.write_buf(first_seq) {
            Ok(base) => {
                let seqs: Vec<u64> = fresh.iter().map(|(s, _, _)| *s).collect();
                self.add_live(base, &seqs, self.buf.len());
                // Said before the 202s: whoever got one may ask /readyz.
                if !self.failed_now {
                    self.healthy();
                }
                for (seq, _, reply) in fresh {
                    let _ = reply.send(Ok(Appended::New(seq)));
                }
                for reply in waiting {
                    let _ = reply.send(Ok(Appended::Duplicate));
                }
            }
            Err((fault, path)) => {
                // Never accepted: a retry of the id is stored as new.
                for (seq, fp, _) in &fresh {
                    self.memtable.remove(fp, *seq);
                }
                self.failed("write", &path, &fault);
                self.reopen_probe();
                let e = self.refusal();
                for (_, _, reply) in fresh {
                    let _ = reply.send(Err(JournalError::Storage(e.to_string())));
                }
                for reply in waiting {
                    let _ = reply.send(Err(JournalError::Storage(e.to_string())));
                }
            }
        }
    }

    /// Right after a failed write: can a segment be created at all? If not
    /// for a reason retrying will not cure (no permission, a read-only
    /// filesystem, the directory gone), the journal is broken, and
    /// `/healthz` says so at once.
    fn reopen_probe(&mut self) {
        if let Err((fault, path)) = self.segment_for(self.next_seq, 0) {
            let verb = if fault.incurable { "reopen" } else { "write" };
            self.shared.record_fault(verb, &path, &fault);
        }
    }

    /// After a failure, with nothing else to write: can the store write
    /// again? Creates the next segment (and writes the checkpoint if it
    /// is dirty), which `cycle` turns into a healthy state.
    fn probe(&mut self) {
        if let Err((fault, path)) = self.segment_for(self.next_seq, 0) {
            let verb = if fault.incurable { "reopen" } else { "write" };
            self.failed(verb, &path, &fault);
        }
    }

    fn replay(&mut self, ids: Option<Vec<u64>>) -> Result<usize, JournalError> {
        let dls = match self.shared.state.read_dead(ids.as_deref()) {
            Ok(d) => d,
            Err(fault) => {
                let path = self.shared.state.path.clone();
                self.failed("read", &path, &fault);
                return Err(self.refusal());
            }
        };
        if dls.is_empty() {
            return Ok(0);
        }
        let received_ms = unix_ms();
        let first = self.next_seq;
        self.buf.clear();
        let mut seqs = Vec::with_capacity(dls.len());
        for dl in &dls {
            let seq = self.next_seq;
            self.next_seq += 1;
            let json = serde_json::to_vec(dl).expect("dead letters serialize");
            log::encode_replay(&mut self.buf, seq, received_ms, &json);
            seqs.push(seq);
        }
        match self.write_buf(first) {
            Ok(base) => self.add_live(base, &seqs, self.buf.len()),
            Err((fault, path)) => {
                self.failed("write", &path, &fault);
                return Err(self.refusal());
            }
        }
        // Back at work now. If forgetting them fails they are listed (and
        // could be replayed) again: a repeat, never a loss.
        let done: Vec<u64> = dls.iter().map(|d| d.id).collect();
        if let Err(fault) = self.shared.state.remove_dead(&done) {
            tracing::warn!(error = %fault.message, "replayed dead letters are still listed");
        }
        Ok(dls.len())
    }

    /// Makes the live sets durable: settles up to now survive a kill -9.
    fn checkpoint(&mut self) -> bool {
        let live = self.shared.live.lock().clone();
        match settled::write(
            &self.shared.dir,
            &live,
            self.next_seq,
            self.shared.faults.as_ref(),
        ) {
            Ok(()) => {
                self.ckpt_dirty = false;
                self.unsynced_settled = 0;
                self.publish_pending();
                self.last_ckpt = Instant::now();
                true
            }
            Err(e) => {
                let path = self.shared.dir.join("settled.ckpt");
                self.failed("write", &path, &Fault::io(&e));
                false
            }
        }
    }

    /// Deletes sealed segments with nothing live whose ids are in runs.
    fn delete_settled_segments(&mut self) {
        let active = self.active.as_ref().map(|(b, _)| *b);
        let gone: Vec<u64> = {
            let live = self.shared.live.lock();
            live.iter()
                .filter(|(base, l)| {
                    Some(**base) != active
                        && l.count() == 0
                        && (l.bound() == 0 || **base + l.bound() - 1 <= self.flushed_seq)
                })
                .map(|(b, _)| *b)
                .collect()
        };
        if gone.is_empty() {
            return;
        }
        for base in &gone {
            self.shared.live.lock().remove(base);
            if let Some(view) = self.shared.segments.write().remove(base) {
                // Kept to be written over if there is room among the
                // spares, and it is about a segment's size (a short one
                // would grow again; one group can make a segment larger,
                // and a spare that large would hold that disk for good).
                let len = view.end.load(Ordering::Relaxed);
                let size = self.tuning.segment_bytes;
                if self.spares.len() < SPARES && len * 2 >= size && len <= size * 2 {
                    let spare = log::spare_path(&self.shared.log_dir, self.next_seq, *base);
                    match std::fs::rename(&view.seg.path, &spare) {
                        Ok(()) => {
                            self.spares.push(spare);
                            continue;
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, path = %view.seg.path.display(), "a settled journal segment could not be kept as a spare")
                        }
                    }
                }
                if let Err(e) = std::fs::remove_file(&view.seg.path) {
                    tracing::warn!(error = %e, path = %view.seg.path.display(), "a settled journal segment could not be removed");
                }
            }
        }
        // A removal (or a rename to spare) the disk forgot would bring the
        // segment back, all live, after a crash: sync the directory.
        if let Err(e) = log::sync_dir(&self.shared.log_dir, self.shared.faults.as_ref()) {
            tracing::debug!(error = %e, "journal directory not synced after removals");
        }
        self.ckpt_dirty = true;
    }

    /// Whether a segment that has fully settled waits only for its ids to
    /// be flushed: after a backlog drained, its disk comes back within one
    /// maintenance round instead of when the memtable fills.
    fn pinned_by_memtable(&self) -> bool {
        let active = self.active.as_ref().map(|(b, _)| *b);
        self.shared.live.lock().iter().any(|(base, l)| {
            Some(*base) != active
                && l.count() == 0
                && l.bound() > 0
                && *base + l.bound() - 1 > self.flushed_seq
        })
    }

    /// Writes the memtable out as a run, after which the segments holding
    /// its ids may go.
    fn flush_memtable(&mut self) {
        if self.memtable.is_empty() {
            return;
        }
        let entries = self.memtable.sorted();
        let span = Span {
            count: entries.len() as u64,
            first_seq: entries.iter().map(|(_, e)| e.seq).min().unwrap_or(0),
            last_seq: entries.iter().map(|(_, e)| e.seq).max().unwrap_or(0),
            min_at: entries.iter().map(|(_, e)| e.at).min().unwrap_or(0),
            max_at: entries.iter().map(|(_, e)| e.at).max().unwrap_or(0),
        };
        match Run::write(
            &self.shared.ids_dir,
            entries.iter().map(|(fp, _)| Ok(*fp)),
            entries.len(),
            span,
            self.shared.faults.as_ref(),
        ) {
            Ok(run) => {
                {
                    let mut runs = self.runs.write();
                    runs.push(Arc::new(run));
                    runs.sort_by_key(|r| r.span.last_seq);
                }
                // The memtable covers every seq above the last flush, so
                // all of them up to its newest are in runs now.
                self.flushed_seq = self.flushed_seq.max(span.last_seq).max(self.next_seq - 1);
                self.memtable.clear();
                if let Some(m) = &self.merger {
                    let _ = m.send(());
                }
            }
            Err(e) => {
                let path = self.shared.ids_dir.clone();
                self.failed("write", &path, &Fault::io(&e));
            }
        }
    }

    /// Forgets ids older than the window: whole runs, and memtable entries.
    fn prune(&mut self, cutoff: u64) {
        self.memtable.prune(cutoff);
        let expired: Vec<Arc<Run>> = {
            let mut runs = self.runs.write();
            let (old, keep): (Vec<_>, Vec<_>) =
                runs.drain(..).partition(|r| r.span.max_at < cutoff);
            *runs = keep;
            old
        };
        for r in expired {
            let _ = std::fs::remove_file(&r.path);
        }
    }

    /// Idle upkeep: notice the journal's directory removed under us, and
    /// flush a memtable that has grown old (so its segments can go).
    fn maintain(&mut self) {
        for dir in [&self.shared.dir, &self.shared.log_dir] {
            if let Err(e) = std::fs::metadata(dir) {
                if e.kind() == std::io::ErrorKind::NotFound {
                    // Writes go on into unlinked files, and would be lost on
                    // the next start: say so loudly.
                    self.files_removed = true;
                    self.shared.set_health(JournalHealth::Broken(format!(
                        "{} was removed while in use; restart to recreate it",
                        dir.display()
                    )));
                    return;
                }
            }
        }
        // A drained backlog's last segment goes too: once nothing in the
        // active segment is live, the next append starts a new one.
        let drained = self.active.as_ref().is_some_and(|(base, view)| {
            view.end.load(Ordering::Relaxed) > HEADER_LEN
                && self
                    .shared
                    .live
                    .lock()
                    .get(base)
                    .is_some_and(|l| l.count() == 0)
        });
        if drained {
            self.seal_active();
        }
        let old = self
            .memtable
            .oldest()
            .is_some_and(|t| now_secs().saturating_sub(t) >= dedupe::FLUSH_AFTER_SECS);
        if (old || self.pinned_by_memtable()) && self.may_write() {
            self.flush_memtable();
        }
        self.delete_settled_segments();
        if let Some(m) = &self.merger {
            // A day may have ended: its runs are merged into one.
            let _ = m.send(());
        }
    }

    /// The end: what is held is written if it can be, then the files close.
    fn finish(&mut self) {
        self.retry_at = None;
        self.commit_dead();
        if self.ckpt_dirty || self.unsynced_settled > 0 {
            self.checkpoint();
        }
        self.seal_active();
        self.publish_pending();
        self.merger = None;
        self.shared.state.shutdown();
        self.stopped = true;
    }
}

fn in_runs(runs: &[Arc<Run>], fp: Fp) -> bool {
    runs.iter().rev().any(|r| match r.contains(fp) {
        Ok(found) => found,
        Err(e) => {
            // A duplicate let through is processed again (idempotent); an
            // id refused as a duplicate would be lost: err on new.
            tracing::warn!(error = %e, path = %r.path.display(), "dedupe run unreadable; id taken as new");
            false
        }
    })
}

/// The background merger: whenever woken, merges what `pick_merge` says
/// until nothing is left to merge.
fn merge_runs(
    dir: PathBuf,
    runs: Arc<RwLock<Vec<Arc<Run>>>>,
    wake: Receiver<()>,
    faults: Option<super::StorageFaults>,
) {
    while wake.recv().is_ok() {
        while wake.try_recv().is_ok() {}
        loop {
            let today = now_secs() / 86_400;
            let Some(pick) = dedupe::pick_merge(&runs.read(), today) else {
                break;
            };
            match dedupe::merge(&dir, &pick, faults.as_ref()) {
                Ok(out) => {
                    {
                        let mut all = runs.write();
                        all.retain(|r| !pick.iter().any(|p| Arc::ptr_eq(p, r)));
                        all.push(Arc::new(out));
                        all.sort_by_key(|r| r.span.last_seq);
                    }
                    for p in pick {
                        let _ = std::fs::remove_file(&p.path);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "dedupe runs not merged; retried later");
                    break;
                }
            }
        }
    }
}
