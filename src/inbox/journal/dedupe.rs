//! The dedupe window: every webhook-id accepted in the last 7 days, kept on
//! disk, with a lookup whose cost does not grow as the window fills.
//!
//! An id is kept as its fingerprint (the first 16 bytes of its SHA-256: two
//! different ids share one with odds far below a disk's error rate, and no
//! sender can craft a collision). Fingerprints of recent appends sit in a
//! small in-memory table, the memtable; the event log holds their ids too,
//! so the memtable is rebuilt from the log after a restart. When it holds
//! `JournalTuning::flush_ids_at` ids (or its oldest is a few minutes old, or
//! a settled segment waits only for it) it is written out as a
//! *run*: a file of sorted fingerprints with a bloom filter and a sparse
//! index, tagged with the time span and the last log seq it covers. Only
//! then may the log segments holding those ids be deleted.
//!
//! Runs never change. Runs of one day are merged in the background (two of
//! similar size, so the merge work stays logarithmic; a finished day into
//! one), and a run whose newest id is older than the window is deleted
//! whole: no per-id deletes, no growing table. A lookup checks the memtable,
//! then each run's bloom filter (in memory, about 1.25 bytes per id) and
//! only on a hit reads one 4 KiB block of that run from disk.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::log::sync_dir;
use crate::storage_faults::StorageFaults;

/// An id's fingerprint.
pub type Fp = u128;

pub fn fingerprint(id: &str) -> Fp {
    let h = Sha256::digest(id.as_bytes());
    u128::from_le_bytes(h[..16].try_into().expect("16 bytes"))
}

/// A memtable whose oldest id is this old is flushed anyway (seconds), so
/// the log segments it pins can go.
pub const FLUSH_AFTER_SECS: u64 = 300;

/// Recent fingerprints: when each was accepted and under which log seq.
#[derive(Debug, Default)]
pub struct Memtable {
    map: HashMap<Fp, Entry>,
    /// Unix seconds of the oldest entry.
    oldest: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub seq: u64,
    pub at: u64,
}

impl Memtable {
    pub fn get(&self, fp: &Fp) -> Option<Entry> {
        self.map.get(fp).copied()
    }

    pub fn insert(&mut self, fp: Fp, seq: u64, at: u64) {
        self.map.insert(fp, Entry { seq, at });
        self.oldest = Some(self.oldest.map_or(at, |o| o.min(at)));
    }

    /// Takes back an insert whose append failed.
    pub fn remove(&mut self, fp: &Fp, seq: u64) {
        if self.map.get(fp).is_some_and(|e| e.seq == seq) {
            self.map.remove(fp);
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn oldest(&self) -> Option<u64> {
        self.oldest
    }

    /// Drops entries accepted before `cutoff` (unix seconds).
    pub fn prune(&mut self, cutoff: u64) {
        self.map.retain(|_, e| e.at >= cutoff);
        self.oldest = self.map.values().map(|e| e.at).min();
    }

    /// Every entry, sorted by fingerprint.
    pub fn sorted(&self) -> Vec<(Fp, Entry)> {
        let mut v: Vec<(Fp, Entry)> = self.map.iter().map(|(k, e)| (*k, *e)).collect();
        v.sort_unstable_by_key(|(fp, _)| *fp);
        v
    }

    /// Empties the table and keeps its room: under load it fills to the
    /// same size again, and regrowing it from nothing after each flush
    /// would churn the allocator for nothing.
    pub fn clear(&mut self) {
        self.map.clear();
        self.oldest = None;
    }
}

/// A blocked bloom filter over fingerprints (already uniformly random, so
/// their bits are the hash): one 64-byte block per lookup, 7 bits in it.
#[derive(Debug, Clone)]
pub struct Bloom {
    words: Vec<u64>,
}

const BLOCK_WORDS: usize = 8;
const BITS_PER_ID: usize = 10;
const PROBES: u32 = 7;

impl Bloom {
    pub fn with_capacity(ids: usize) -> Bloom {
        let blocks = (ids * BITS_PER_ID).div_ceil(512).max(1);
        Bloom {
            words: vec![0; blocks * BLOCK_WORDS],
        }
    }

    /// A filter read back from its `words`; `None` if they cannot be one.
    pub fn from_words(words: Vec<u64>) -> Option<Bloom> {
        (!words.is_empty() && words.len().is_multiple_of(BLOCK_WORDS)).then_some(Bloom { words })
    }

    /// Its bits, for storing it.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    fn block(&self, fp: Fp) -> usize {
        let blocks = (self.words.len() / BLOCK_WORDS) as u128;
        (((fp >> 64) * blocks) >> 64) as usize * BLOCK_WORDS
    }

    fn bits(fp: Fp) -> impl Iterator<Item = (usize, u64)> {
        let lo = fp as u64;
        (0..PROBES).map(move |i| {
            let bit = (lo >> (i * 9)) & 511;
            ((bit / 64) as usize, 1u64 << (bit % 64))
        })
    }

    pub fn insert(&mut self, fp: Fp) {
        let b = self.block(fp);
        for (w, mask) in Self::bits(fp) {
            self.words[b + w] |= mask;
        }
    }

    pub fn may_contain(&self, fp: Fp) -> bool {
        let b = self.block(fp);
        Self::bits(fp).all(|(w, mask)| self.words[b + w] & mask != 0)
    }
}

const RUN_MAGIC: &[u8; 8] = b"CJIDS\0\0\x01";
/// A run is `header | fingerprints (16 bytes each, sorted) | bloom words |
/// sparse index`. The header: magic, count, first_seq, last_seq, min_at,
/// max_at, bloom words, and a checksum over the header, filter and index
/// (the fingerprints themselves are read only on a filter hit, and a damaged
/// one can only make a lookup miss, which replays an idempotent event).
const RUN_HEADER: usize = 8 * 7 + 8;
/// Fingerprints per block of the sparse index (16 bytes each: 4 KiB).
const PER_BLOCK: usize = 256;

/// What a run covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub count: u64,
    /// The log seqs of its ids: every id with a seq up to `last_seq` that is
    /// not in the memtable is in some run.
    pub first_seq: u64,
    pub last_seq: u64,
    /// Unix seconds of its oldest and newest id.
    pub min_at: u64,
    pub max_at: u64,
}

impl Span {
    fn join(self, o: Span) -> Span {
        Span {
            count: self.count + o.count,
            first_seq: self.first_seq.min(o.first_seq),
            last_seq: self.last_seq.max(o.last_seq),
            min_at: self.min_at.min(o.min_at),
            max_at: self.max_at.max(o.max_at),
        }
    }

    /// The UTC day of its newest id: runs of one day are merged together.
    pub fn day(&self) -> u64 {
        self.max_at / 86_400
    }
}

/// A run on disk: its header, bloom filter and sparse index in memory.
#[derive(Debug)]
pub struct Run {
    pub path: PathBuf,
    pub span: Span,
    file: File,
    bloom: Bloom,
    /// The first fingerprint of each block of `PER_BLOCK`.
    fences: Vec<Fp>,
}

fn run_path(dir: &Path, span: &Span) -> PathBuf {
    dir.join(format!("{:020}-{:020}.run", span.last_seq, span.first_seq))
}

fn header_bytes(span: &Span, bloom_words: u64) -> [u8; RUN_HEADER] {
    let mut h = [0u8; RUN_HEADER];
    h[..8].copy_from_slice(RUN_MAGIC);
    for (i, v) in [
        span.count,
        span.first_seq,
        span.last_seq,
        span.min_at,
        span.max_at,
        bloom_words,
    ]
    .iter()
    .enumerate()
    {
        h[8 + i * 8..16 + i * 8].copy_from_slice(&v.to_le_bytes());
    }
    h
}

impl Run {
    /// Writes a run of `fps` (sorted, distinct; `capacity` at least their
    /// number, for the filter's size) durably and opens it: as `<tmp>`
    /// first, then renamed, so a crash never leaves half a run. One pass:
    /// the header, with the count and checksum, is written last.
    pub fn write(
        dir: &Path,
        fps: impl Iterator<Item = io::Result<Fp>>,
        capacity: usize,
        span: Span,
        faults: Option<&StorageFaults>,
    ) -> io::Result<Run> {
        let check = || faults.map_or(Ok(()), StorageFaults::check_write);
        let path = run_path(dir, &span);
        let tmp = path.with_extension("tmp");
        let written = (|| {
            check()?;
            if let Some(f) = faults {
                f.check_open()?;
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            let mut w = BufWriter::with_capacity(256 << 10, file);
            w.write_all(&[0u8; RUN_HEADER])?;
            let mut bloom = Bloom::with_capacity(capacity);
            let mut fences = Vec::with_capacity(capacity / PER_BLOCK + 1);
            let mut count = 0u64;
            for fp in fps {
                let fp = fp?;
                bloom.insert(fp);
                if count.is_multiple_of(PER_BLOCK as u64) {
                    fences.push(fp);
                }
                count += 1;
                w.write_all(&fp.to_le_bytes())?;
            }
            let mut head = header_bytes(&Span { count, ..span }, bloom.words.len() as u64);
            let mut crc = crc32fast::Hasher::new();
            crc.update(&head[..RUN_HEADER - 8]);
            // The tail goes through the writer's buffer as it is checksummed:
            // a copy of it would be the bloom filter's size again.
            for word in &bloom.words {
                let b = word.to_le_bytes();
                crc.update(&b);
                w.write_all(&b)?;
            }
            for f in &fences {
                let b = f.to_le_bytes();
                crc.update(&b);
                w.write_all(&b)?;
            }
            head[RUN_HEADER - 8..].copy_from_slice(&u64::from(crc.finalize()).to_le_bytes());
            check()?;
            let file = w.into_inner().map_err(|e| e.into_error())?;
            file.write_all_at(&head, 0)?;
            file.sync_data()?;
            std::fs::rename(&tmp, &path)?;
            sync_dir(dir, faults)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Run::open(&path)
    }

    /// Opens a run, reading its header, bloom filter and index.
    pub fn open(path: &Path) -> io::Result<Run> {
        let bad = |what: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {what}", path.display()),
            )
        };
        let file = File::open(path)?;
        let mut head = [0u8; RUN_HEADER];
        file.read_exact_at(&mut head, 0)
            .map_err(|_| bad("too short"))?;
        if &head[..8] != RUN_MAGIC {
            return Err(bad("not a dedupe run"));
        }
        let field =
            |i: usize| u64::from_le_bytes(head[8 + i * 8..16 + i * 8].try_into().expect("8"));
        let span = Span {
            count: field(0),
            first_seq: field(1),
            last_seq: field(2),
            min_at: field(3),
            max_at: field(4),
        };
        let bloom_words = usize::try_from(field(5)).map_err(|_| bad("bad header"))?;
        let stored_crc = field(6);
        let count = usize::try_from(span.count).map_err(|_| bad("bad header"))?;
        let fence_count = count.div_ceil(PER_BLOCK);
        let tail_len = bloom_words
            .checked_mul(8)
            .and_then(|b| b.checked_add(fence_count * 16))
            .ok_or_else(|| bad("bad header"))?;
        let expected = (RUN_HEADER + tail_len + count * 16) as u64;
        if file.metadata()?.len() != expected {
            return Err(bad("truncated"));
        }
        let mut tail = vec![0u8; tail_len];
        file.read_exact_at(&mut tail, (RUN_HEADER + count * 16) as u64)?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head[..RUN_HEADER - 8]);
        crc.update(&tail);
        if u64::from(crc.finalize()) != stored_crc {
            return Err(bad("checksum mismatch"));
        }
        let words = tail[..bloom_words * 8]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8")))
            .collect();
        let fences = tail[bloom_words * 8..]
            .chunks_exact(16)
            .map(|c| u128::from_le_bytes(c.try_into().expect("16")))
            .collect();
        Ok(Run {
            path: path.to_owned(),
            span,
            file,
            bloom: Bloom::from_words(words).ok_or_else(|| bad("bad bloom filter"))?,
            fences,
        })
    }

    fn data_offset(&self) -> u64 {
        RUN_HEADER as u64
    }

    /// Whether `fp` is in this run (one block read when the filter says
    /// maybe).
    pub fn contains(&self, fp: Fp) -> io::Result<bool> {
        if !self.bloom.may_contain(fp) {
            return Ok(false);
        }
        let block = match self.fences.partition_point(|f| *f <= fp) {
            0 => return Ok(false),
            n => n - 1,
        };
        let first = block * PER_BLOCK;
        let n = (self.span.count as usize - first).min(PER_BLOCK);
        let mut buf = vec![0u8; n * 16];
        self.file
            .read_exact_at(&mut buf, self.data_offset() + first as u64 * 16)?;
        let found = buf
            .chunks_exact(16)
            .map(|c| u128::from_le_bytes(c.try_into().expect("16")))
            .collect::<Vec<_>>()
            .binary_search(&fp)
            .is_ok();
        Ok(found)
    }

    /// Its fingerprints in order, read in blocks of `READ_FPS`.
    fn fingerprints(&self) -> RunIter<'_> {
        RunIter {
            run: self,
            next: 0,
            bytes: Vec::new(),
            pos: 0,
        }
    }
}

struct RunIter<'a> {
    run: &'a Run,
    /// Next fingerprint index to read from disk.
    next: usize,
    /// The block read last, as read; refilled in place.
    bytes: Vec<u8>,
    pos: usize,
}

/// Fingerprints a run's reader takes from disk at a time (64 KiB). A merge
/// reads two runs or more at once, on top of a full pending bound, whose
/// peak RSS is measured against 100 MiB (section 7d): a megabyte a run,
/// decoded into a second megabyte, was 4-5 MiB of buffers while a merge
/// ran. Smaller reads are more `pread` calls on a background thread;
/// whether merges got slower was not measured.
const READ_FPS: usize = 4 * 1024;

impl Iterator for RunIter<'_> {
    type Item = io::Result<Fp>;

    fn next(&mut self) -> Option<io::Result<Fp>> {
        if self.pos == self.bytes.len() {
            let count = self.run.span.count as usize;
            if self.next >= count {
                return None;
            }
            let n = (count - self.next).min(READ_FPS);
            self.bytes.resize(n * 16, 0);
            let at = self.run.data_offset() + self.next as u64 * 16;
            if let Err(e) = self.run.file.read_exact_at(&mut self.bytes, at) {
                self.next = count;
                return Some(Err(e));
            }
            self.pos = 0;
            self.next += n;
        }
        let fp = u128::from_le_bytes(
            self.bytes[self.pos..self.pos + 16]
                .try_into()
                .expect("16 bytes"),
        );
        self.pos += 16;
        Some(Ok(fp))
    }
}

/// Writes the union of `runs` (sorted by fingerprint, duplicates once) as one
/// new run. The inputs stay until the caller swaps them out.
pub fn merge(dir: &Path, runs: &[Arc<Run>], faults: Option<&StorageFaults>) -> io::Result<Run> {
    let span = runs
        .iter()
        .map(|r| r.span)
        .reduce(Span::join)
        .expect("merging at least one run");
    let capacity = span.count as usize;
    Run::write(dir, Merged::new(runs), capacity, span, faults)
}

/// The k-way merge of runs' fingerprints, each once.
struct Merged<'a> {
    iters: Vec<std::iter::Peekable<RunIter<'a>>>,
    last: Option<Fp>,
}

impl<'a> Merged<'a> {
    fn new(runs: &'a [Arc<Run>]) -> Merged<'a> {
        Merged {
            iters: runs.iter().map(|r| r.fingerprints().peekable()).collect(),
            last: None,
        }
    }
}

impl Iterator for Merged<'_> {
    type Item = io::Result<Fp>;

    fn next(&mut self) -> Option<io::Result<Fp>> {
        loop {
            let mut best: Option<(usize, Fp)> = None;
            for (i, it) in self.iters.iter_mut().enumerate() {
                match it.peek() {
                    Some(Ok(fp)) if best.is_none_or(|(_, b)| *fp < b) => best = Some((i, *fp)),
                    Some(Ok(_)) => {}
                    Some(Err(_)) => return it.next(),
                    None => {}
                }
            }
            let (i, fp) = best?;
            self.iters[i].next();
            if self.last == Some(fp) {
                continue;
            }
            self.last = Some(fp);
            return Some(Ok(fp));
        }
    }
}

/// Lists the runs in `dir` (oldest last seq first), removing leftovers of
/// an interrupted write or merge: `*.tmp` files, and runs wholly covered by
/// a newer merged run.
pub fn open_all(dir: &Path) -> io::Result<Vec<Arc<Run>>> {
    let mut runs = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        match path.extension().and_then(|e| e.to_str()) {
            Some("tmp") => {
                let _ = std::fs::remove_file(&path);
            }
            Some("run") => runs.push(Arc::new(Run::open(&path)?)),
            _ => {}
        }
    }
    runs.sort_by_key(|r| (r.span.last_seq, std::cmp::Reverse(r.span.first_seq)));
    // A merge writes its output before deleting its inputs: an input left by
    // a crash in between lies within the output's seq range.
    let mut kept: Vec<Arc<Run>> = Vec::new();
    for r in runs.into_iter().rev() {
        let covered = kept
            .iter()
            .any(|k| k.span.first_seq <= r.span.first_seq && r.span.last_seq <= k.span.last_seq);
        if covered {
            let _ = std::fs::remove_file(&r.path);
        } else {
            kept.push(r);
        }
    }
    kept.reverse();
    Ok(kept)
}

/// Which runs to merge next, if any: all of a finished day's runs, or the
/// two newest of today when the newer is at least half the older's size.
pub fn pick_merge(runs: &[Arc<Run>], today: u64) -> Option<Vec<Arc<Run>>> {
    let mut by_day: std::collections::BTreeMap<u64, Vec<Arc<Run>>> = Default::default();
    for r in runs {
        by_day.entry(r.span.day()).or_default().push(r.clone());
    }
    for (day, group) in &by_day {
        if *day < today && group.len() > 1 {
            return Some(group.clone());
        }
    }
    let group = by_day.get(&today)?;
    let n = group.len();
    (n >= 2 && group[n - 1].span.count * 2 >= group[n - 2].span.count)
        .then(|| group[n - 2..].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fps(range: std::ops::Range<u64>) -> Vec<Fp> {
        let mut v: Vec<Fp> = range.map(|i| fingerprint(&format!("id-{i}"))).collect();
        v.sort_unstable();
        v
    }

    fn write(dir: &Path, v: &[Fp], span: Span) -> Run {
        Run::write(dir, v.iter().map(|f| Ok(*f)), v.len(), span, None).unwrap()
    }

    fn span(count: usize, first: u64, last: u64, at: u64) -> Span {
        Span {
            count: count as u64,
            first_seq: first,
            last_seq: last,
            min_at: at,
            max_at: at,
        }
    }

    #[test]
    fn the_bloom_filter_has_no_false_negatives_and_few_false_positives() {
        let mut b = Bloom::with_capacity(10_000);
        let ins = fps(0..10_000);
        for fp in &ins {
            b.insert(*fp);
        }
        assert!(ins.iter().all(|fp| b.may_contain(*fp)));
        let out = fps(10_000..110_000);
        let fp = out.iter().filter(|f| b.may_contain(**f)).count();
        assert!(fp < 3_000, "{fp} false positives in 100,000");
    }

    #[test]
    fn a_run_finds_exactly_its_fingerprints_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let v = fps(0..5_000);
        let run = write(dir.path(), &v, span(5_000, 1, 5_000, 100));
        assert!(v.iter().all(|fp| run.contains(*fp).unwrap()));
        let run = Run::open(&run.path).unwrap();
        assert_eq!(run.span, span(5_000, 1, 5_000, 100));
        assert!(v.iter().all(|fp| run.contains(*fp).unwrap()));
        assert!(fps(5_000..10_000)
            .iter()
            .all(|fp| !run.contains(*fp).unwrap()));
    }

    #[test]
    fn merging_keeps_every_fingerprint_once_and_the_inputs_are_cleaned_up_on_open() {
        let dir = tempfile::tempdir().unwrap();
        // Each input spans several of a reader's blocks (`READ_FPS`).
        let a = Arc::new(write(dir.path(), &fps(0..9_000), span(9_000, 1, 9_000, 10)));
        let b = Arc::new(write(
            dir.path(),
            &fps(6_000..15_000),
            span(9_000, 9_001, 18_000, 20),
        ));
        let m = merge(dir.path(), &[a.clone(), b.clone()], None).unwrap();
        assert_eq!(m.span.count, 15_000);
        assert_eq!((m.span.first_seq, m.span.last_seq), (1, 18_000));
        assert_eq!((m.span.min_at, m.span.max_at), (10, 20));
        let merged: Vec<Fp> = m.fingerprints().map(Result::unwrap).collect();
        assert_eq!(merged, fps(0..15_000), "in order, each once");
        assert!(fps(0..15_000).iter().all(|fp| m.contains(*fp).unwrap()));
        assert!(!fps(15_000..16_000)
            .iter()
            .all(|fp| m.contains(*fp).unwrap()));
        // As if the process died before deleting the inputs.
        let left = open_all(dir.path()).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].path, m.path);
        assert!(!a.path.exists() && !b.path.exists());
    }

    #[test]
    fn a_damaged_run_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let run = write(dir.path(), &fps(0..10), span(10, 1, 10, 0));
        let mut bytes = std::fs::read(&run.path).unwrap();
        // In the filter (the header's checksum covers it).
        let n = bytes.len();
        bytes[n - 20] ^= 1;
        std::fs::write(&run.path, &bytes).unwrap();
        assert!(Run::open(&run.path).is_err());
        bytes.truncate(bytes.len() - 1);
        std::fs::write(&run.path, &bytes).unwrap();
        assert!(Run::open(&run.path).is_err());
    }

    #[test]
    fn merges_are_picked_by_day_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let mk = |n: usize, first: u64, at: u64| {
            Arc::new(write(
                dir.path(),
                &fps(first..first + n as u64),
                span(n, first, first + n as u64, at),
            ))
        };
        let today = 10;
        let big = mk(400, 0, today * 86_400);
        let small = mk(100, 1_000, today * 86_400 + 1);
        assert!(pick_merge(&[big.clone(), small.clone()], today).is_none());
        let small2 = mk(90, 2_000, today * 86_400 + 2);
        let pick = pick_merge(&[big.clone(), small.clone(), small2.clone()], today).unwrap();
        assert_eq!(pick.len(), 2);
        assert_eq!(pick[1].path, small2.path);
        let old1 = mk(10, 3_000, 86_400);
        let old2 = mk(1_000, 4_000, 86_400 + 5);
        let pick = pick_merge(&[old1.clone(), big, old2.clone()], today).unwrap();
        assert_eq!(pick.len(), 2, "a finished day is merged whatever the sizes");
    }
}
