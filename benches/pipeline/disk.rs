//! Section 9: what a group's `fdatasync` costs on this machine's disk when
//! the journal appends to a new segment file, against writing over a spare
//! (a settled segment's file, which already has its blocks). The journal
//! keeps spares for this (`Segment::recycle`); this measures the reason.
//!
//! Both the same way the journal writes: one `pwrite` of a group and one
//! `fdatasync`, in a temporary directory (the same filesystem as the
//! bench's journals), rounds alternating so the disk's drift falls on both.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use crate::report::{Report, Verdict};

/// About a busy group: 64 webhooks of ~250 bytes.
const GROUP: usize = 16 * 1024;
const SYNCS: usize = 1_500;
const ROUNDS: usize = 3;

/// Sync latencies of one round, in ms, sorted.
fn round(dir: &Path, over_existing: bool) -> Vec<f64> {
    let path = dir.join("segment");
    let _ = std::fs::remove_file(&path);
    let file: File = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("test file");
    let group = vec![0x5a_u8; GROUP];
    if over_existing {
        // A spare: a whole segment's worth written and synced before.
        for i in 0..SYNCS {
            file.write_all_at(&group, (i * GROUP) as u64)
                .expect("write");
        }
        file.sync_all().expect("sync");
    }
    let mut took = Vec::with_capacity(SYNCS);
    for i in 0..SYNCS {
        let t = Instant::now();
        file.write_all_at(&group, (i * GROUP) as u64)
            .expect("write");
        file.sync_data().expect("fdatasync");
        took.push(t.elapsed().as_secs_f64() * 1e3);
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    took.sort_by(f64::total_cmp);
    took
}

fn pct(v: &[f64], p: f64) -> f64 {
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

pub fn section(rep: &mut Report) {
    println!(
        "\n== 9. A group's fdatasync: appending to a new file against writing over a spare ({ROUNDS} alternating rounds of {SYNCS} syncs of {} KiB)",
        GROUP / 1024
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut append, mut over) = (Vec::new(), Vec::new());
    for r in 0..ROUNDS {
        for existing in if r % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        } {
            let v = round(dir.path(), existing);
            println!(
                "  {:<22} p50 {:.3} ms  p99 {:.3} ms",
                if existing {
                    "over a spare"
                } else {
                    "appending, new file"
                },
                pct(&v, 0.5),
                pct(&v, 0.99)
            );
            if existing {
                over.extend(v);
            } else {
                append.extend(v);
            }
        }
    }
    append.sort_by(f64::total_cmp);
    over.sort_by(f64::total_cmp);
    let s = "9. Journal sync: new file vs spare";
    rep.row(
        s,
        "write + fdatasync of a group, p50 / p99",
        format!(
            "over a spare {:.3} / {:.3} ms",
            pct(&over, 0.5),
            pct(&over, 0.99)
        ),
        format!(
            "appending to a new file {:.3} / {:.3} ms",
            pct(&append, 0.5),
            pct(&append, 0.99)
        ),
        format!(
            "{:.2} (p50, spare / new)",
            pct(&over, 0.5) / pct(&append, 0.5)
        ),
        "",
        Verdict::Info,
    );
}
