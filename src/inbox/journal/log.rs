//! The event log: segment files of checksummed records, appended to in
//! order, the embedded mode's durable copy of every accepted event. A
//! settled segment may be kept as a spare and written over from its start
//! by a later segment (`Segment::recycle`), so a segment's end is where its
//! records stop, not where its file does.
//!
//! A segment is `log/<base seq>.seg`: a 32-byte header (magic, base seq, a
//! random nonce that ties checkpoints to this very file) and then records,
//! each `len u32 | crc32 u32 | seq u64 | kind u8 | payload`, the checksum
//! covering everything after it. Seqs only grow, within a segment and across
//! segments, but are not contiguous: a seq given to an append whose write
//! failed is never used again.
//!
//! A group of records is written with one `pwrite` and made durable with one
//! `fdatasync` before any of them is acknowledged. Whatever follows the last
//! good record (a torn write at a crash, the remains of a write that failed
//! and was rolled back) ends the segment: a record that does not decode, or
//! whose seq does not exceed the one before, is the end. Segments are never
//! appended to after a restart: the writer starts a new one, so an old
//! segment's end is fixed once it has been scanned.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::storage_faults::StorageFaults;

/// Bytes before the first record.
pub const HEADER_LEN: u64 = 32;
const MAGIC: &[u8; 8] = b"CJLOG\0\0\x01";
/// `len`, `crc`, `seq`, `kind`.
const HEAD: usize = 4 + 4 + 8 + 1;
/// Longest record accepted when reading (far above any body limit): a
/// length beyond it is damage, not a record.
const MAX_RECORD: usize = 256 << 20;

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// An accepted event: `received_ms u64 | id_len u16 | id | body`.
    Event = 1,
    /// A dead letter put back to work: `received_ms u64 | dead letter JSON`.
    Replay = 2,
}

/// A record read back: borrowed from the buffer it was decoded from.
#[derive(Debug)]
pub struct RawRecord<'a> {
    pub seq: u64,
    pub kind: Kind,
    pub payload: &'a [u8],
}

impl RawRecord<'_> {
    /// When it was accepted, unix ms.
    pub fn received_ms(&self) -> u64 {
        read_u64(self.payload, 0)
    }

    /// An event's id and body; `None` for other kinds (or damage).
    pub fn event(&self) -> Option<(&str, &[u8])> {
        if self.kind != Kind::Event || self.payload.len() < 10 {
            return None;
        }
        let n = usize::from(u16::from_le_bytes([self.payload[8], self.payload[9]]));
        let id = self.payload.get(10..10 + n)?;
        let body = &self.payload[10 + n..];
        Some((std::str::from_utf8(id).ok()?, body))
    }

    /// A replay's dead-letter JSON; `None` for other kinds.
    pub fn replay(&self) -> Option<&[u8]> {
        (self.kind == Kind::Replay && self.payload.len() >= 8).then(|| &self.payload[8..])
    }
}

fn read_u64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
        .unwrap_or(0)
}

/// Appends one record to `buf`.
fn encode(buf: &mut Vec<u8>, seq: u64, kind: Kind, parts: &[&[u8]]) {
    let payload: usize = parts.iter().map(|p| p.len()).sum();
    let len = u32::try_from(8 + 1 + payload).expect("records are far below 4 GiB");
    let start = buf.len();
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.push(kind as u8);
    for p in parts {
        buf.extend_from_slice(p);
    }
    let crc = crc32fast::hash(&buf[start + 8..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Appends an event record to `buf`. `id` is at most 256 bytes (checked at
/// the edge), so its length fits the u16.
pub fn encode_event(buf: &mut Vec<u8>, seq: u64, received_ms: u64, id: &str, body: &[u8]) {
    let id_len = u16::try_from(id.len()).unwrap_or(u16::MAX);
    let id = &id.as_bytes()[..usize::from(id_len)];
    encode(
        buf,
        seq,
        Kind::Event,
        &[&received_ms.to_le_bytes(), &id_len.to_le_bytes(), id, body],
    );
}

/// Appends a replay record (a dead letter's JSON) to `buf`.
pub fn encode_replay(buf: &mut Vec<u8>, seq: u64, received_ms: u64, dead_letter: &[u8]) {
    encode(
        buf,
        seq,
        Kind::Replay,
        &[&received_ms.to_le_bytes(), dead_letter],
    );
}

/// What the start of a buffer holds.
#[derive(Debug)]
pub enum Decoded<'a> {
    /// A whole record, and its length in bytes.
    Record(RawRecord<'a>, usize),
    /// The start of a record that continues past the buffer (read more), of
    /// this total length.
    Partial(usize),
    /// Not a record: the end of the segment.
    End,
}

/// Decodes the record at the start of `b`.
pub fn decode(b: &[u8]) -> Decoded<'_> {
    if b.len() < HEAD {
        return if b.len() >= 4 && read_len(b) == 0 {
            Decoded::End
        } else {
            Decoded::Partial(HEAD)
        };
    }
    let len = read_len(b);
    if !(9..=MAX_RECORD).contains(&len) {
        return Decoded::End;
    }
    let total = 8 + len;
    if b.len() < total {
        return Decoded::Partial(total);
    }
    let crc = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes"));
    if crc32fast::hash(&b[8..total]) != crc {
        return Decoded::End;
    }
    let kind = match b[16] {
        1 => Kind::Event,
        2 => Kind::Replay,
        _ => return Decoded::End,
    };
    Decoded::Record(
        RawRecord {
            seq: read_u64(b, 8),
            kind,
            payload: &b[HEAD..total],
        },
        total,
    )
}

fn read_len(b: &[u8]) -> usize {
    u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")) as usize
}

/// A segment's name for `base`.
pub fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.seg"))
}

/// A spare's name: a settled segment kept to be written over by a later
/// one (`Segment::recycle`). It does not parse as a segment's name. `above`
/// is a seq above every record the file holds (the writer's next seq when
/// it was set aside): a restart raises its next seq to it, so a segment
/// made from the spare always starts above the old records left in it.
/// `base` (the segment it was) keeps two spares set aside at once apart.
pub fn spare_path(dir: &Path, above: u64, base: u64) -> PathBuf {
    dir.join(format!("{above:020}-{base:020}.spare"))
}

/// The seq a spare's name says is above all its records; `None` if the
/// name is not a spare's.
pub fn parse_spare_name(name: &str) -> Option<u64> {
    let (above, base) = name.strip_suffix(".spare")?.split_once('-')?;
    base.parse::<u64>().ok()?;
    above.parse().ok()
}

/// Whether a file in the log directory is a spare.
pub fn is_spare_name(name: &str) -> bool {
    name.ends_with(".spare")
}

/// The base seq a segment file name stands for.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    name.strip_suffix(".seg")?.parse().ok()
}

fn header(base: u64, nonce: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&base.to_le_bytes());
    h[16..24].copy_from_slice(&nonce.to_le_bytes());
    let crc = crc32fast::hash(&h[..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Makes a directory's entries (a new or removed file) durable.
pub fn sync_dir(dir: &Path, faults: Option<&StorageFaults>) -> io::Result<()> {
    if let Some(f) = faults {
        f.check_write()?;
    }
    File::open(dir)?.sync_all()
}

/// An open segment: written by the writer thread, read by anyone through
/// its own handle.
#[derive(Debug)]
pub struct Segment {
    file: File,
    pub path: PathBuf,
    pub base: u64,
    pub nonce: u64,
    faults: Option<StorageFaults>,
}

impl Segment {
    /// Creates `dir/<base>.seg` with its header, durably (the file, and its
    /// name in the directory).
    pub fn create(
        dir: &Path,
        base: u64,
        nonce: u64,
        faults: Option<&StorageFaults>,
    ) -> io::Result<Segment> {
        let path = segment_path(dir, base);
        if let Some(f) = faults {
            f.check_open()?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        let seg = Segment {
            file,
            path,
            base,
            nonce,
            faults: faults.cloned(),
        };
        let made = seg
            .write_at(0, &header(base, nonce))
            .and_then(|()| seg.sync())
            .and_then(|()| sync_dir(dir, faults));
        if let Err(e) = made {
            // Leave no headerless file behind to confuse the next start.
            let _ = std::fs::remove_file(&seg.path);
            return Err(e);
        }
        Ok(seg)
    }

    /// Turns the spare file `spare` into the segment `dir/<base>.seg`.
    ///
    /// Writing over blocks a file already has makes each group's
    /// `fdatasync` a data flush alone: appending to a new file also commits
    /// the filesystem's journal (the file's size and blocks) every time, and
    /// deleting settled segments frees blocks (a discard, on disks mounted
    /// so) in the same commits.
    ///
    /// The new header is written and synced while the file still has its
    /// spare name, then it is renamed and the directory synced: a crash
    /// leaves either a spare or an empty segment. Its old records stay
    /// behind the header until written over; their seqs are below `base`,
    /// so a scan ends at the first of them.
    pub fn recycle(
        spare: &Path,
        dir: &Path,
        base: u64,
        nonce: u64,
        faults: Option<&StorageFaults>,
    ) -> io::Result<Segment> {
        if let Some(f) = faults {
            f.check_open()?;
        }
        let file = OpenOptions::new().read(true).write(true).open(spare)?;
        // The spare's name first: were the rename that made it a spare
        // still undone on disk, a crash after the new header could leave
        // the old segment's name on a file whose header says otherwise.
        sync_dir(dir, faults)?;
        let mut seg = Segment {
            file,
            path: spare.to_owned(),
            base,
            nonce,
            faults: faults.cloned(),
        };
        seg.write_at(0, &header(base, nonce))?;
        seg.sync()?;
        let path = segment_path(dir, base);
        std::fs::rename(spare, &path)?;
        seg.path = path;
        sync_dir(dir, faults)?;
        Ok(seg)
    }

    /// Opens an existing segment for reading and rewriting its tail.
    pub fn open(path: &Path, faults: Option<&StorageFaults>) -> io::Result<Segment> {
        if let Some(f) = faults {
            f.check_open()?;
        }
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let mut h = [0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut h, 0)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let crc = u32::from_le_bytes(h[24..28].try_into().expect("4 bytes"));
        if &h[..8] != MAGIC || crc32fast::hash(&h[..24]) != crc {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a journal segment (bad header)",
            ));
        }
        Ok(Segment {
            file,
            path: path.to_owned(),
            base: read_u64(&h, 8),
            nonce: read_u64(&h, 16),
            faults: faults.cloned(),
        })
    }

    fn check(&self) -> io::Result<()> {
        match &self.faults {
            Some(f) => f.check_write(),
            None => Ok(()),
        }
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check()?;
        self.file.write_all_at(data, offset)
    }

    /// `fdatasync`.
    pub fn sync(&self) -> io::Result<()> {
        self.check()?;
        self.file.sync_data()
    }

    /// Cuts the file back to `len` (a failed write's remains) and syncs.
    pub fn truncate(&self, len: u64) -> io::Result<()> {
        self.check()?;
        self.file.set_len(len)?;
        self.file.sync_data()
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }

    pub fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
}

/// One record found by a scan: where it is and what it is.
#[derive(Debug, Clone)]
pub struct Scanned {
    pub seq: u64,
    /// For events: the webhook-id (dedupe) and when it was accepted.
    pub id: Option<String>,
    pub received_ms: u64,
}

/// Reads a segment's records from the start, in order, up to its end.
/// Returns them and the offset where the segment ends.
pub fn scan(seg: &Segment) -> io::Result<(Vec<Scanned>, u64)> {
    let mut out = Vec::new();
    let mut reader = ChunkReader::new(HEADER_LEN);
    let size = seg.len()?;
    let mut last = None;
    loop {
        match reader.next(seg, size)? {
            Some((rec, offset)) => {
                // Below the base: a recycled file's old records.
                if rec.seq < seg.base || last.is_some_and(|l| rec.seq <= l) {
                    return Ok((out, offset));
                }
                last = Some(rec.seq);
                out.push(Scanned {
                    seq: rec.seq,
                    id: rec.event().map(|(id, _)| id.to_owned()),
                    received_ms: rec.received_ms(),
                });
            }
            None => return Ok((out, reader.position())),
        }
    }
}

/// Reads records one after another from a segment through a buffer, so a
/// scan or a reader makes one `pread` per chunk, not per record.
#[derive(Debug)]
pub struct ChunkReader {
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    at: u64,
    /// Consumed bytes of `buf`.
    used: usize,
}

/// How much a reader asks for at a time.
const CHUNK: usize = 256 * 1024;

impl ChunkReader {
    pub fn new(offset: u64) -> ChunkReader {
        ChunkReader {
            buf: Vec::new(),
            at: offset,
            used: 0,
        }
    }

    /// The offset of the next record.
    pub fn position(&self) -> u64 {
        self.at + self.used as u64
    }

    /// The next record below `end` and its offset, or `None` at the end.
    pub fn next(&mut self, seg: &Segment, end: u64) -> io::Result<Option<(RawRecord<'_>, u64)>> {
        let mut want = HEAD;
        loop {
            if self.buf.len() - self.used >= want {
                // Decide with what is buffered; borrowck: decode twice, cheap.
                match decode(&self.buf[self.used..]) {
                    Decoded::Record(_, n) => {
                        let offset = self.position();
                        let start = self.used;
                        self.used += n;
                        let Decoded::Record(rec, _) = decode(&self.buf[start..start + n]) else {
                            unreachable!("decoded just before")
                        };
                        return Ok(Some((rec, offset)));
                    }
                    Decoded::Partial(n) => want = n,
                    Decoded::End => return Ok(None),
                }
                if self.buf.len() - self.used >= want {
                    continue;
                }
            }
            let pos = self.position();
            if pos >= end {
                return Ok(None);
            }
            // Refill: keep the unconsumed tail, read the next chunk after it.
            self.buf.drain(..self.used);
            self.at = pos;
            self.used = 0;
            let have = self.buf.len();
            let room = (end - pos) as usize - have;
            let take = room.min(CHUNK.max(want));
            if take == 0 {
                return Ok(None);
            }
            self.buf.resize(have + take, 0);
            let n = seg.read_at(&mut self.buf[have..], pos + have as u64)?;
            self.buf.truncate(have + n);
            if n == 0 {
                return Ok(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(dir: &Path) -> Segment {
        Segment::create(dir, 7, 42, None).unwrap()
    }

    #[test]
    fn a_recycled_segment_holds_only_what_was_written_after_its_header() {
        let dir = tempfile::tempdir().unwrap();
        let s = seg(dir.path());
        let mut buf = Vec::new();
        for seq in 7..20 {
            encode_event(&mut buf, seq, 1000, "old", b"{}");
        }
        s.write_at(HEADER_LEN, &buf).unwrap();
        let spare = spare_path(dir.path(), 20, 7);
        assert_eq!(
            parse_spare_name(&spare.file_name().unwrap().to_string_lossy()),
            Some(20)
        );
        std::fs::rename(&s.path, &spare).unwrap();
        // Reused, and a crash before any record was written.
        let r = Segment::recycle(&spare, dir.path(), 50, 43, None).unwrap();
        assert!(!spare.exists());
        let r = Segment::open(&r.path, None).unwrap();
        assert_eq!((r.base, r.nonce), (50, 43));
        let (recs, end) = scan(&r).unwrap();
        assert!(recs.is_empty(), "old records are not read: {recs:?}");
        assert_eq!(end, HEADER_LEN);
        // Two new records: the scan ends where they do.
        buf.clear();
        encode_event(&mut buf, 50, 1000, "new", b"{}");
        encode_event(&mut buf, 51, 1000, "new2", b"{}");
        r.write_at(HEADER_LEN, &buf).unwrap();
        let (recs, end) = scan(&r).unwrap();
        assert_eq!(recs.iter().map(|r| r.seq).collect::<Vec<_>>(), [50, 51]);
        assert_eq!(end, HEADER_LEN + buf.len() as u64);
    }

    #[test]
    fn records_round_trip_and_a_torn_tail_ends_the_segment() {
        let dir = tempfile::tempdir().unwrap();
        let s = seg(dir.path());
        let mut buf = Vec::new();
        encode_event(&mut buf, 7, 1000, "a", b"{\"n\":1}");
        encode_replay(&mut buf, 9, 2000, b"{\"dl\":1}");
        encode_event(&mut buf, 10, 3000, "c", &vec![b'x'; 300_000]);
        let whole = buf.len() as u64;
        // The third record torn: only part of it reached the disk.
        s.write_at(HEADER_LEN, &buf[..buf.len() - 10]).unwrap();
        let s = Segment::open(&s.path, None).unwrap();
        assert_eq!((s.base, s.nonce), (7, 42));
        let (recs, end) = scan(&s).unwrap();
        assert_eq!(recs.iter().map(|r| r.seq).collect::<Vec<_>>(), [7, 9]);
        assert_eq!(recs[0].id.as_deref(), Some("a"));
        assert_eq!(recs[1].id, None);
        assert_eq!(recs[1].received_ms, 2000);
        assert!(end < HEADER_LEN + whole);
        // Rewritten whole, all three read back, the big one across chunks.
        s.write_at(HEADER_LEN, &buf).unwrap();
        let (recs, end) = scan(&s).unwrap();
        assert_eq!(recs.len(), 3);
        assert_eq!(end, HEADER_LEN + whole);
        let mut r = ChunkReader::new(HEADER_LEN);
        let mut bodies = Vec::new();
        while let Some((rec, _)) = r.next(&s, end).unwrap() {
            bodies.push(rec.event().map(|(_, b)| b.len()));
        }
        assert_eq!(bodies, [Some(7), None, Some(300_000)]);
    }

    #[test]
    fn stale_records_after_a_rewrite_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let s = seg(dir.path());
        // A failed group (seqs 7, 8) left on disk; the next group (seq 9)
        // rewrote from the same offset but is shorter.
        let mut old = Vec::new();
        encode_event(&mut old, 7, 0, "a", &[b'x'; 100]);
        encode_event(&mut old, 8, 0, "b", &[b'y'; 100]);
        s.write_at(HEADER_LEN, &old).unwrap();
        let mut new = Vec::new();
        encode_event(&mut new, 9, 0, "c", &[b'z'; 10]);
        s.write_at(HEADER_LEN, &new).unwrap();
        let (recs, _) = scan(&s).unwrap();
        assert_eq!(recs.iter().map(|r| r.seq).collect::<Vec<_>>(), [9]);
        // Aligned stale records with a smaller seq end it too.
        let mut aligned = Vec::new();
        encode_event(&mut aligned, 9, 0, "c", &[b'z'; 10]);
        encode_event(&mut aligned, 8, 0, "b", &[b'y'; 10]);
        s.write_at(HEADER_LEN, &aligned).unwrap();
        let (recs, _) = scan(&s).unwrap();
        assert_eq!(recs.iter().map(|r| r.seq).collect::<Vec<_>>(), [9]);
    }

    #[test]
    fn a_file_that_is_not_a_segment_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("00000000000000000001.seg");
        std::fs::write(&p, [0xA5u8; 64]).unwrap();
        let e = Segment::open(&p, None).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(parse_segment_name("00000000000000000001.seg"), Some(1));
        assert_eq!(parse_segment_name("x.tmp"), None);
    }
}
