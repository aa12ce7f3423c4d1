//! The record files' bytes.
//!
//! A data file `<id>.rec` is a 32-byte header (magic, file id, creation
//! time, checksum) and then records, each `len u32 | crc32 u32 | at_ms u64
//! | id fingerprint u128 | user fingerprint u128 | payload`, `len` counting
//! what follows the checksum and the checksum covering it. The payload is
//! what `kept` keeps of the settled event (its body, rules fingerprint and
//! packed outcomes), made into a record on read. Files written earlier hold
//! the record's JSON, plain or deflated, and are still read. A record is
//! written once and read rarely: deflating a few hundred bytes at a time
//! cost the writer about 180 µs a record with a compressor made for each
//! (three times an event's whole way from intake to settle) and about 37
//! µs with one reused, and building the whole JSON record at every settle
//! about a third of that way; the disk the kept form costs is bounded by
//! `max_bytes` anyway. The fingerprints let an index be rebuilt from the
//! data alone, without decoding any payload. Whatever follows the last
//! record that checks out (a torn write at a crash) is not a record.
//!
//! An index `<id>.idx`, written once its data file is sealed, is a 64-byte
//! header (magic, count, oldest and newest `at_ms`, the data's end, the
//! last record's offset, the filters' size, a checksum) and then the
//! `(fingerprint, offset)` pairs of ids and of users, each sorted, 24 bytes
//! each, then two blocked bloom filters (the journal's, 10 bits a record)
//! and a sparse index (every 256th fingerprint) for each list. The checksum
//! covers the header, the filters and the sparse indexes; the pairs are
//! only read on a filter hit, and a damaged one can only send a lookup to a
//! record whose own checksum or id then fails to match (a miss).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use flate2::read::DeflateDecoder;

use crate::fate::kept::{RulesBook, SettledEvent};
use crate::fate::record::EventRecord;
use crate::inbox::journal::dedupe::{Bloom, Fp};

pub const HEADER_LEN: u64 = 32;
const DATA_MAGIC: &[u8; 8] = b"CJFATE\0\x01";
/// `len`, `crc`, `at_ms`, two fingerprints.
pub const REC_HEAD: usize = 4 + 4 + 8 + 16 + 16;
/// Longest record read back; a length beyond it is damage.
const MAX_RECORD: usize = 64 << 20;

const INDEX_MAGIC: &[u8; 8] = b"CJFIDX\0\x01";
const INDEX_HEADER: usize = 64;
const PAIR: usize = 24;
/// Pairs per block of the sparse index.
pub const PER_BLOCK: usize = 256;

pub fn data_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.rec"))
}

pub fn index_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.idx"))
}

/// The file id a data or index file name stands for, and which it is.
pub fn parse_name(name: &str) -> Option<(u64, &str)> {
    let (stem, ext) = name.rsplit_once('.')?;
    if stem.len() != 20 {
        return None;
    }
    Some((stem.parse().ok()?, ext))
}

pub fn data_header(id: u64, created_ms: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(DATA_MAGIC);
    h[8..16].copy_from_slice(&id.to_le_bytes());
    h[16..24].copy_from_slice(&created_ms.to_le_bytes());
    let crc = crc32fast::hash(&h[..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The id and creation time a data file's header holds.
pub fn read_data_header(file: &File) -> io::Result<(u64, u64)> {
    let mut h = [0u8; HEADER_LEN as usize];
    file.read_exact_at(&mut h, 0)?;
    let crc = u32::from_le_bytes(h[24..28].try_into().expect("4"));
    if &h[..8] != DATA_MAGIC || crc32fast::hash(&h[..24]) != crc {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a record file (bad header)",
        ));
    }
    Ok((u64_at(&h, 8), u64_at(&h, 16)))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8"))
}

fn u128_at(b: &[u8], at: usize) -> u128 {
    u128::from_le_bytes(b[at..at + 16].try_into().expect("16"))
}

/// A payload back into a record: a kept settled event (`kept`), made into
/// its record with `book`'s rules; or, as files written before the kept
/// form hold, the record's JSON, plain or deflated. `None` if it is none of
/// these.
pub fn record_of(payload: &[u8], book: &RulesBook) -> Option<EventRecord> {
    if SettledEvent::is_kept(payload) {
        return SettledEvent::decode(payload)?.record(book);
    }
    if payload.first() == Some(&b'{') {
        if let Ok(r) = serde_json::from_slice(payload) {
            return Some(r);
        }
    }
    let mut json = Vec::with_capacity(payload.len() * 4);
    DeflateDecoder::new(payload)
        .take(MAX_RECORD as u64)
        .read_to_end(&mut json)
        .ok()?;
    serde_json::from_slice(&json).ok()
}

/// What precedes a record's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecHead {
    pub at_ms: u64,
    pub fp_id: Fp,
    pub fp_user: Fp,
}

/// Appends one record to `buf`.
pub fn encode(buf: &mut Vec<u8>, head: RecHead, payload: &[u8]) {
    let len = u32::try_from(REC_HEAD - 8 + payload.len()).unwrap_or(u32::MAX);
    let start = buf.len();
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&head.at_ms.to_le_bytes());
    buf.extend_from_slice(&head.fp_id.to_le_bytes());
    buf.extend_from_slice(&head.fp_user.to_le_bytes());
    buf.extend_from_slice(payload);
    let crc = crc32fast::hash(&buf[start + 8..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// What the start of a buffer holds.
#[derive(Debug)]
pub enum Decoded<'a> {
    /// A whole record: its head, payload and length in bytes.
    Record(RecHead, &'a [u8], usize),
    /// A record longer than the buffer, of this total length.
    Partial(usize),
    /// Not a record: the end of the file's records.
    End,
}

pub fn decode(b: &[u8]) -> Decoded<'_> {
    if b.len() < 4 {
        return Decoded::Partial(REC_HEAD);
    }
    let len = u32::from_le_bytes(b[..4].try_into().expect("4")) as usize;
    if !(REC_HEAD - 8..=MAX_RECORD).contains(&len) {
        return Decoded::End;
    }
    let total = 8 + len;
    if b.len() < total {
        return Decoded::Partial(total);
    }
    let crc = u32::from_le_bytes(b[4..8].try_into().expect("4"));
    if crc32fast::hash(&b[8..total]) != crc {
        return Decoded::End;
    }
    let head = RecHead {
        at_ms: u64_at(b, 8),
        fp_id: u128_at(b, 16),
        fp_user: u128_at(b, 32),
    };
    Decoded::Record(head, &b[REC_HEAD..total], total)
}

/// Reads the record at `offset` (below `end`): its head and payload;
/// `None` if no record that checks out is there.
pub fn read_at(file: &File, offset: u64, end: u64) -> io::Result<Option<(RecHead, Vec<u8>)>> {
    if offset.saturating_add(REC_HEAD as u64) > end {
        return Ok(None);
    }
    let mut len = [0u8; 4];
    file.read_exact_at(&mut len, offset)?;
    let len = u32::from_le_bytes(len) as usize;
    if !(REC_HEAD - 8..=MAX_RECORD).contains(&len) || offset + 8 + len as u64 > end {
        return Ok(None);
    }
    let mut buf = vec![0u8; 8 + len];
    file.read_exact_at(&mut buf, offset)?;
    let head = match decode(&buf) {
        Decoded::Record(h, _, _) => h,
        _ => return Ok(None),
    };
    buf.drain(..REC_HEAD);
    Ok(Some((head, buf)))
}

/// Reads records one after another through a buffer: one `pread` per
/// chunk, not per record.
pub struct Scanner<'f> {
    file: &'f File,
    end: u64,
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    at: u64,
    used: usize,
}

const CHUNK: usize = 256 * 1024;

impl<'f> Scanner<'f> {
    /// Records from `offset` up to `end` (exclusive).
    pub fn new(file: &'f File, offset: u64, end: u64) -> Scanner<'f> {
        Scanner {
            file,
            end,
            buf: Vec::new(),
            at: offset,
            used: 0,
        }
    }

    /// Where the next record starts (after the last one returned).
    pub fn position(&self) -> u64 {
        self.at + self.used as u64
    }

    /// The next record and its offset; `None` at the end (or the first
    /// bytes that are not a record).
    pub fn next(&mut self) -> io::Result<Option<(u64, RecHead, &[u8])>> {
        let mut want = REC_HEAD;
        loop {
            if self.buf.len() - self.used >= want {
                match decode(&self.buf[self.used..]) {
                    Decoded::Record(_, _, n) => {
                        let offset = self.position();
                        let start = self.used;
                        self.used += n;
                        let Decoded::Record(h, p, _) = decode(&self.buf[start..start + n]) else {
                            unreachable!("decoded just before")
                        };
                        return Ok(Some((offset, h, p)));
                    }
                    Decoded::Partial(n) => want = n,
                    Decoded::End => return Ok(None),
                }
                if self.buf.len() - self.used >= want {
                    continue;
                }
            }
            let pos = self.position();
            let have = self.buf.len() - self.used;
            if pos + have as u64 >= self.end {
                return Ok(None);
            }
            self.buf.drain(..self.used);
            self.at = pos;
            self.used = 0;
            let room = (self.end - pos) as usize - have;
            let take = room.min(CHUNK.max(want));
            self.buf.resize(have + take, 0);
            let n = self
                .file
                .read_at(&mut self.buf[have..], pos + have as u64)?;
            self.buf.truncate(have + n);
            if n == 0 {
                return Ok(None);
            }
        }
    }
}

/// One record as an index knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub fp_id: Fp,
    pub fp_user: Fp,
    pub offset: u64,
    pub at_ms: u64,
}

/// What an index says of its data file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub count: u64,
    pub min_at: u64,
    pub max_at: u64,
    /// Where its records end.
    pub data_end: u64,
    /// The newest record's offset (`HEADER_LEN` for a file without any).
    pub last_offset: u64,
}

impl Summary {
    pub fn of(entries: &[Entry], data_end: u64) -> Summary {
        Summary {
            count: entries.len() as u64,
            min_at: entries.iter().map(|e| e.at_ms).min().unwrap_or(0),
            max_at: entries.iter().map(|e| e.at_ms).max().unwrap_or(0),
            data_end,
            last_offset: entries.iter().map(|e| e.offset).max().unwrap_or(HEADER_LEN),
        }
    }
}

/// A sealed file's index: its summary, filters and sparse indexes in
/// memory, its sorted pairs on disk.
#[derive(Debug)]
pub struct Index {
    pub summary: Summary,
    file: File,
    ids: Filter,
    users: Filter,
    bytes: u64,
}

#[derive(Debug)]
struct Filter {
    bloom: Bloom,
    fences: Vec<Fp>,
    /// Where its sorted pairs start in the index file.
    at: u64,
}

/// Which of an index's two lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Id,
    User,
}

fn sorted_pairs(entries: &[Entry], key: Key) -> Vec<(Fp, u64)> {
    let mut v: Vec<(Fp, u64)> = entries
        .iter()
        .map(|e| {
            (
                match key {
                    Key::Id => e.fp_id,
                    Key::User => e.fp_user,
                },
                e.offset,
            )
        })
        .collect();
    v.sort_unstable();
    v
}

impl Index {
    /// Writes the index of `entries` durably (as a temporary file, then
    /// renamed) and opens it.
    pub fn write(path: &Path, entries: &[Entry], data_end: u64) -> io::Result<Index> {
        let summary = Summary::of(entries, data_end);
        let tmp = path.with_extension("tmp");
        let written = (|| {
            let mut body = Vec::with_capacity(entries.len() * PAIR * 2);
            let mut tail = Vec::new();
            let mut blooms = Vec::new();
            let mut fences = Vec::new();
            for key in [Key::Id, Key::User] {
                let pairs = sorted_pairs(entries, key);
                let mut bloom = Bloom::with_capacity(pairs.len());
                for (i, (fp, offset)) in pairs.iter().enumerate() {
                    bloom.insert(*fp);
                    if i % PER_BLOCK == 0 {
                        fences.extend_from_slice(&fp.to_le_bytes());
                    }
                    body.extend_from_slice(&fp.to_le_bytes());
                    body.extend_from_slice(&offset.to_le_bytes());
                }
                blooms.push(bloom);
            }
            let bloom_words = blooms[0].words().len() as u64;
            for b in &blooms {
                for w in b.words() {
                    tail.extend_from_slice(&w.to_le_bytes());
                }
            }
            tail.extend_from_slice(&fences);
            let mut head = [0u8; INDEX_HEADER];
            head[..8].copy_from_slice(INDEX_MAGIC);
            for (i, v) in [
                summary.count,
                summary.min_at,
                summary.max_at,
                summary.data_end,
                summary.last_offset,
                bloom_words,
            ]
            .iter()
            .enumerate()
            {
                head[8 + i * 8..16 + i * 8].copy_from_slice(&v.to_le_bytes());
            }
            let mut crc = crc32fast::Hasher::new();
            crc.update(&head[..56]);
            crc.update(&tail);
            head[56..].copy_from_slice(&u64::from(crc.finalize()).to_le_bytes());
            let mut f = File::create(&tmp)?;
            f.write_all(&head)?;
            f.write_all(&body)?;
            f.write_all(&tail)?;
            f.sync_data()?;
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Index::open(path)
    }

    /// Opens an index, reading its header, filters and sparse indexes.
    pub fn open(path: &Path) -> io::Result<Index> {
        let bad = |what: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {what}", path.display()),
            )
        };
        let file = File::open(path)?;
        let mut head = [0u8; INDEX_HEADER];
        file.read_exact_at(&mut head, 0)
            .map_err(|_| bad("too short"))?;
        if &head[..8] != INDEX_MAGIC {
            return Err(bad("not a record index"));
        }
        let field = |i: usize| u64_at(&head, 8 + i * 8);
        let summary = Summary {
            count: field(0),
            min_at: field(1),
            max_at: field(2),
            data_end: field(3),
            last_offset: field(4),
        };
        let words = usize::try_from(field(5)).map_err(|_| bad("bad header"))?;
        let count = usize::try_from(summary.count).map_err(|_| bad("bad header"))?;
        let fence_count = count.div_ceil(PER_BLOCK);
        let tail_len = words
            .checked_mul(16)
            .and_then(|b| b.checked_add(fence_count.checked_mul(32)?))
            .ok_or_else(|| bad("bad header"))?;
        let body_len = count
            .checked_mul(PAIR * 2)
            .ok_or_else(|| bad("bad header"))?;
        let bytes = file.metadata()?.len();
        if bytes != (INDEX_HEADER + body_len + tail_len) as u64 {
            return Err(bad("truncated"));
        }
        let mut tail = vec![0u8; tail_len];
        file.read_exact_at(&mut tail, (INDEX_HEADER + body_len) as u64)?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head[..56]);
        crc.update(&tail);
        if u64::from(crc.finalize()) != u64_at(&head, 56) {
            return Err(bad("checksum mismatch"));
        }
        let word = |i: usize| u64_at(&tail, i * 8);
        let bloom = |k: usize| {
            Bloom::from_words((0..words).map(|i| word(k * words + i)).collect())
                .ok_or_else(|| bad("bad bloom filter"))
        };
        let fence_at = words * 16;
        let fences = |k: usize| -> Vec<Fp> {
            (0..fence_count)
                .map(|i| u128_at(&tail, fence_at + (k * fence_count + i) * 16))
                .collect()
        };
        Ok(Index {
            summary,
            ids: Filter {
                bloom: bloom(0)?,
                fences: fences(0),
                at: INDEX_HEADER as u64,
            },
            users: Filter {
                bloom: bloom(1)?,
                fences: fences(1),
                at: (INDEX_HEADER + count * PAIR) as u64,
            },
            file,
            bytes,
        })
    }

    /// Bytes the index takes on disk.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Offsets of the records whose id (or user) has fingerprint `fp`, in
    /// ascending order: none without reading the disk when the filter says
    /// so, else the one or two blocks of pairs where `fp` may be.
    pub fn lookup(&self, key: Key, fp: Fp) -> io::Result<Vec<u64>> {
        let f = match key {
            Key::Id => &self.ids,
            Key::User => &self.users,
        };
        let mut out = Vec::new();
        if self.summary.count == 0 || !f.bloom.may_contain(fp) {
            return Ok(out);
        }
        let count = self.summary.count as usize;
        // Equal fingerprints may begin in the block before the first fence
        // above or equal to `fp`.
        let mut block = f.fences.partition_point(|x| *x < fp).saturating_sub(1);
        while block * PER_BLOCK < count {
            let first = block * PER_BLOCK;
            let n = (count - first).min(PER_BLOCK);
            let mut buf = vec![0u8; n * PAIR];
            self.file
                .read_exact_at(&mut buf, f.at + (first * PAIR) as u64)?;
            let mut past = false;
            for pair in buf.chunks_exact(PAIR) {
                let x = u128_at(pair, 0);
                if x == fp {
                    out.push(u64_at(pair, 16));
                } else if x > fp {
                    past = true;
                    break;
                }
            }
            if past {
                break;
            }
            block += 1;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbox::journal::dedupe::fingerprint;

    fn entries(n: u64) -> Vec<Entry> {
        (0..n)
            .map(|i| Entry {
                fp_id: fingerprint(&format!("id-{i}")),
                // 10 users, so each has many entries spanning blocks.
                fp_user: fingerprint(&format!("user-{}", i % 10)),
                offset: HEADER_LEN + i * 100,
                at_ms: 1_000 + i,
            })
            .collect()
    }

    #[test]
    fn an_index_finds_every_id_and_all_of_a_users_records_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let e = entries(3_000);
        let path = index_path(dir.path(), 7);
        let idx = Index::write(&path, &e, 99_999).unwrap();
        let idx2 = Index::open(&path).unwrap();
        assert_eq!(idx.summary, idx2.summary);
        assert_eq!(
            idx2.summary,
            Summary {
                count: 3_000,
                min_at: 1_000,
                max_at: 3_999,
                data_end: 99_999,
                last_offset: HEADER_LEN + 2_999 * 100,
            }
        );
        for x in &e {
            assert_eq!(idx2.lookup(Key::Id, x.fp_id).unwrap(), [x.offset]);
        }
        let u3 = idx2.lookup(Key::User, fingerprint("user-3")).unwrap();
        assert_eq!(u3.len(), 300);
        assert!(u3.windows(2).all(|w| w[0] < w[1]));
        assert!(idx2
            .lookup(Key::Id, fingerprint("id-x"))
            .unwrap()
            .is_empty());
        assert!(idx2
            .lookup(Key::User, fingerprint("user-10"))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_damaged_or_truncated_index_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = index_path(dir.path(), 1);
        Index::write(&path, &entries(10), 5_000).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 40] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(Index::open(&path).is_err());
        bytes[n - 40] ^= 1;
        bytes.truncate(n - 1);
        std::fs::write(&path, &bytes).unwrap();
        assert!(Index::open(&path).is_err());
        // An empty file's index is valid and finds nothing.
        let idx = Index::write(&path, &[], HEADER_LEN).unwrap();
        assert!(idx.lookup(Key::Id, 5).unwrap().is_empty());
    }

    #[test]
    fn records_round_trip_and_a_torn_one_ends_the_scan() {
        let dir = tempfile::tempdir().unwrap();
        let path = data_path(dir.path(), 3);
        let mut buf = data_header(3, 42).to_vec();
        let head = |i: u128| RecHead {
            at_ms: 10 + i as u64,
            fp_id: i,
            fp_user: 100 + i,
        };
        encode(&mut buf, head(1), b"one");
        encode(&mut buf, head(2), &vec![b'x'; 300_000]);
        let whole = buf.len();
        encode(&mut buf, head(3), b"three");
        std::fs::write(&path, &buf[..buf.len() - 2]).unwrap();
        let f = File::open(&path).unwrap();
        assert_eq!(read_data_header(&f).unwrap(), (3, 42));
        let size = f.metadata().unwrap().len();
        let mut s = Scanner::new(&f, HEADER_LEN, size);
        let (o1, h1, p1) = s.next().unwrap().unwrap();
        assert_eq!((o1, h1, p1), (HEADER_LEN, head(1), &b"one"[..]));
        let (_, h2, p2) = s.next().unwrap().unwrap();
        assert_eq!((h2, p2.len()), (head(2), 300_000));
        assert!(
            s.next().unwrap().is_none(),
            "the torn third is not a record"
        );
        assert_eq!(s.position(), whole as u64);
        let (h, p) = read_at(&f, o1, size).unwrap().unwrap();
        assert_eq!((h, p.as_slice()), (head(1), &b"one"[..]));
        assert!(read_at(&f, whole as u64, size).unwrap().is_none());
        // Garbage where a record should be.
        assert!(read_at(&f, o1 + 1, size).unwrap().is_none());
    }

    #[test]
    fn names_parse() {
        assert_eq!(parse_name("00000000000000000012.rec"), Some((12, "rec")));
        assert_eq!(parse_name("12.rec"), None);
        assert_eq!(parse_name("callbacks.cursor"), None);
    }
}
