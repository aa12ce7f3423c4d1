//! Which log records are still live (accepted, not yet settled), per
//! segment, and the checkpoint file that keeps it across restarts.
//!
//! A segment's live records are a bitset indexed by `seq - base`. Settling
//! clears a bit; a segment with no bit set (and whose ids are in the dedupe
//! runs) can be deleted whole. Settles need no fsync of their own: losing
//! one only replays an event whose calls are idempotent upstream. So the
//! bitsets are written to `settled.ckpt` at most once a second (write a
//! temporary file, fdatasync, rename), which bounds what a kill -9 replays.
//! Each entry carries its segment's nonce, so a checkpoint can never be
//! applied to another file that happens to have the same name.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use super::log::sync_dir;
use crate::storage_faults::StorageFaults;

const MAGIC: &[u8; 8] = b"CJCKP\0\0\x01";

/// One segment's live records.
#[derive(Debug, Clone, Default)]
pub struct Live {
    pub nonce: u64,
    /// Bit `seq - base` set: the record is live.
    bits: Vec<u64>,
    count: u64,
    /// One past the highest seq recorded: bits at and beyond it are unknown
    /// to a checkpoint (appended after it was written).
    bound: u64,
}

impl Live {
    pub fn new(nonce: u64) -> Live {
        Live {
            nonce,
            ..Live::default()
        }
    }

    /// Records `seq` (relative to its segment's base) as live.
    pub fn add(&mut self, rel: u64) {
        let (w, b) = ((rel / 64) as usize, rel % 64);
        if self.bits.len() <= w {
            self.bits.resize(w + 1, 0);
        }
        if self.bits[w] & (1 << b) == 0 {
            self.bits[w] |= 1 << b;
            self.count += 1;
        }
        self.bound = self.bound.max(rel + 1);
    }

    /// Clears `rel`; whether it was live.
    pub fn settle(&mut self, rel: u64) -> bool {
        let (w, b) = ((rel / 64) as usize, rel % 64);
        match self.bits.get_mut(w) {
            Some(word) if *word & (1 << b) != 0 => {
                *word &= !(1 << b);
                self.count -= 1;
                true
            }
            _ => false,
        }
    }

    pub fn is_live(&self, rel: u64) -> bool {
        self.bits
            .get((rel / 64) as usize)
            .is_some_and(|w| w & (1 << (rel % 64)) != 0)
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// One past the highest relative seq ever recorded (0: none).
    pub fn bound(&self) -> u64 {
        self.bound
    }

    /// What a checkpoint said of `rel`: `None` if it was written before
    /// that record existed.
    pub fn known(&self, rel: u64) -> Option<bool> {
        (rel < self.bound).then(|| self.is_live(rel))
    }
}

/// Writes every segment's live set (base -> live) to `dir/settled.ckpt`,
/// durably and atomically, with `next_seq` (so seqs never go back, even
/// once every segment is gone).
pub fn write(
    dir: &Path,
    live: &BTreeMap<u64, Live>,
    next_seq: u64,
    faults: Option<&StorageFaults>,
) -> io::Result<()> {
    if let Some(f) = faults {
        f.check_write()?;
    }
    let mut buf =
        Vec::with_capacity(64 + live.values().map(|l| 32 + l.bits.len() * 8).sum::<usize>());
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&next_seq.to_le_bytes());
    buf.extend_from_slice(&(live.len() as u64).to_le_bytes());
    for (base, l) in live {
        for v in [*base, l.nonce, l.bound, l.bits.len() as u64] {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        for w in &l.bits {
            buf.extend_from_slice(&w.to_le_bytes());
        }
    }
    let crc = crc32fast::hash(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    let path = dir.join("settled.ckpt");
    let tmp = dir.join("settled.ckpt.tmp");
    let written = (|| {
        std::fs::write(&tmp, &buf)?;
        std::fs::File::open(&tmp)?.sync_data()?;
        std::fs::rename(&tmp, &path)?;
        sync_dir(dir, faults)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// What a checkpoint holds.
#[derive(Debug, Default)]
pub struct Checkpoint {
    pub next_seq: u64,
    pub live: BTreeMap<u64, Live>,
}

/// Reads `dir/settled.ckpt`; `None` if there is none or it is damaged (then
/// every record in the log counts as live: replays, never losses).
pub fn read(dir: &Path) -> Option<Checkpoint> {
    let buf = std::fs::read(dir.join("settled.ckpt")).ok()?;
    if buf.len() < 28 || &buf[..8] != MAGIC {
        return None;
    }
    let (body, crc) = buf.split_at(buf.len() - 4);
    if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().ok()?) {
        return None;
    }
    let mut words = body[8..]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")));
    let next_seq = words.next()?;
    let n = words.next()?;
    let mut live = BTreeMap::new();
    for _ in 0..n {
        let (base, nonce, bound, len) =
            (words.next()?, words.next()?, words.next()?, words.next()?);
        let bits: Vec<u64> = (0..len).map(|_| words.next()).collect::<Option<_>>()?;
        let count = bits.iter().map(|w| u64::from(w.count_ones())).sum();
        live.insert(
            base,
            Live {
                nonce,
                bits,
                count,
                bound,
            },
        );
    }
    Some(Checkpoint { next_seq, live })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_sets_survive_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Live::new(11);
        for rel in [0, 1, 5, 64, 200] {
            a.add(rel);
        }
        assert!(a.settle(5));
        assert!(!a.settle(5), "settled once");
        assert!(!a.settle(3), "never live");
        assert_eq!(a.count(), 4);
        let mut live = BTreeMap::new();
        live.insert(100, a);
        write(dir.path(), &live, 999, None).unwrap();
        let c = read(dir.path()).unwrap();
        assert_eq!(c.next_seq, 999);
        let a = &c.live[&100];
        assert_eq!((a.nonce, a.count()), (11, 4));
        assert_eq!(a.known(64), Some(true));
        assert_eq!(a.known(5), Some(false));
        assert_eq!(a.known(201), None, "appended after the checkpoint");
        // Damage makes it absent, not wrong.
        let p = dir.path().join("settled.ckpt");
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[20] ^= 1;
        std::fs::write(&p, bytes).unwrap();
        assert!(read(dir.path()).is_none());
    }
}
