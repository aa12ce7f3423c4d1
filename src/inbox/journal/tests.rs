//! The journal on its own: appends, settles, dedupe, rotation, deletion,
//! restarts, an earlier version's file, and storage faults.

use std::time::{Duration, Instant};

use super::*;
use crate::domain::DeadLetterReason;
use crate::inbox::faults::{EACCES, EIO, ENOSPC};

/// Small files: a segment rotates every few dozen records, the memtable is
/// flushed every 100 ids.
const SMALL: Tuning = Tuning {
    segment_bytes: 8 * 1024,
    flush_ids_at: 100,
};

fn open_small(dir: &Path) -> Journal {
    Journal::open_tuned(dir, None, SMALL).unwrap()
}

fn body(n: usize) -> Vec<u8> {
    format!(
        r#"{{"type":"user.banned","data":{{"user_id":"{}"}}}}"#,
        "x".repeat(n)
    )
    .into_bytes()
}

async fn new_seq(j: &Journal, id: &str) -> u64 {
    match j.append(id, body(10)).await.unwrap() {
        Appended::New(seq) => seq,
        Appended::Duplicate => panic!("{id} is fresh"),
    }
}

/// Concurrent appends share fsyncs (group commit), as webhooks do.
async fn round(j: &Journal, start: usize, n: usize, pad: usize) -> Vec<u64> {
    let appends = (start..start + n).map(|i| {
        let j = j.clone();
        async move { j.append(&format!("id-{i}"), body(pad)).await.unwrap() }
    });
    futures_util::future::join_all(appends)
        .await
        .into_iter()
        .map(|a| match a {
            Appended::New(seq) => seq,
            Appended::Duplicate => panic!("fresh id"),
        })
        .collect()
}

/// Every live record, read from the start.
async fn live(j: &Journal) -> Vec<Entry> {
    let mut r = j.reader();
    let mut all = Vec::new();
    loop {
        let batch = r.next_batch(1000).await.unwrap();
        if batch.is_empty() {
            return all;
        }
        all.extend(batch);
    }
}

fn ids(entries: &[Entry]) -> Vec<String> {
    entries
        .iter()
        .map(|e| match &e.record {
            Record::Event { id, .. } => id.clone(),
            Record::Replay { dead_letter, .. } => format!("replay:{}", dead_letter.event_id),
        })
        .collect()
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

/// Segments and spares in the log directory.
fn log_files(log_dir: &Path) -> (usize, usize) {
    let names: Vec<String> = std::fs::read_dir(log_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let segs = names.iter().filter(|n| n.ends_with(".seg")).count();
    let spares = names.iter().filter(|n| log::is_spare_name(n)).count();
    (segs, spares)
}

/// Appends 600 events (ids from `first`) and settles them, until two
/// settled segments are kept as spares. Groups are well under a segment,
/// so segments are of their usual size.
async fn settle_into_spares(j: &Journal, log_dir: &Path, first: usize) {
    for r in 0..30 {
        for s in round(j, first + r * 20, 20, 200).await {
            j.settle(s);
        }
    }
    j.sync().await.unwrap();
    eventually(15, "spares kept", || async { log_files(log_dir).1 == 2 }).await;
}

fn dead_letter(event_id: &str) -> DeadLetter {
    DeadLetter {
        id: 0,
        event_id: event_id.into(),
        event_type: "user.banned".into(),
        action: None,
        reason: DeadLetterReason::BadRequest,
        detail: "test".into(),
        at_unix: 0,
        event: serde_json::Value::Null,
    }
}

async fn eventually<F: std::future::Future<Output = bool>>(
    secs: u64,
    what: &str,
    mut f: impl FnMut() -> F,
) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(Instant::now() < deadline, "not within {secs} s: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn appended_events_are_read_back_in_order_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    let j = open_small(dir.path());
    let mut seqs = Vec::new();
    for i in 0..200 {
        match j.append(&format!("e{i}"), body(100)).await.unwrap() {
            Appended::New(seq) => seqs.push(seq),
            Appended::Duplicate => panic!("fresh"),
        }
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    let files = std::fs::read_dir(dir.path().join("log")).unwrap().count();
    assert!(files > 3, "{files} segments: rotation did not happen");
    let read = live(&j).await;
    assert_eq!(
        ids(&read),
        (0..200).map(|i| format!("e{i}")).collect::<Vec<_>>()
    );
    let Record::Event { body: b, .. } = &read[7].record else {
        panic!("an event")
    };
    assert_eq!(b, &body(100), "the body as it was received");
    assert_eq!(j.pending(), 200);
}

#[tokio::test]
async fn a_reader_sees_records_appended_after_it_caught_up() {
    let dir = tempfile::tempdir().unwrap();
    let j = open_small(dir.path());
    let mut r = j.reader();
    assert!(r.next_batch(10).await.unwrap().is_empty());
    let mut got = Vec::new();
    for i in 0..150 {
        new_seq(&j, &format!("late{i}")).await;
        got.extend(r.next_batch(1000).await.unwrap());
    }
    assert_eq!(got.len(), 150, "nothing missed across rotations");
}

#[tokio::test]
async fn settled_segments_are_deleted_so_the_disk_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let j = open_small(dir.path());
    let log_dir = dir.path().join("log");
    let seqs = round(&j, 0, 600, 200).await;
    let backlog = dir_bytes(&log_dir);
    assert!(backlog > 100_000, "{backlog} bytes");
    for s in seqs {
        j.settle(s);
    }
    j.sync().await.unwrap();
    // All deleted but the spares kept to be written over (two at most).
    eventually(15, "settled segments deleted", || async {
        let (segs, spares) = log_files(&log_dir);
        segs == 0 && spares <= 2
    })
    .await;
    let kept = dir_bytes(&log_dir);
    assert!(kept <= 2 * 2 * SMALL.segment_bytes, "{kept} bytes kept");
    assert_eq!(j.pending(), 0);
    assert!(live(&j).await.is_empty());
    // The ids stay in the dedupe window after their events are gone.
    assert_eq!(
        j.append("id-7", body(1)).await.unwrap(),
        Appended::Duplicate
    );
    assert!(
        std::fs::read_dir(dir.path().join("ids")).unwrap().count() >= 1,
        "ids flushed into runs"
    );
}

#[tokio::test]
async fn a_spare_is_written_over_and_its_old_records_never_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().join("log");
    {
        let j = open_small(dir.path());
        settle_into_spares(&j, &log_dir, 0).await;
        eventually(15, "every segment gone", || async {
            log_files(&log_dir) == (0, 2)
        })
        .await;
        // Records of the same size into the recycled file: an old record
        // that checks out follows the last new one, and its seq ends the
        // segment.
        round(&j, 600, 5, 200).await;
        assert_eq!(log_files(&log_dir), (1, 1), "a spare became the segment");
        assert_eq!(live(&j).await.len(), 5);
        j.shutdown().await;
    }
    // After a restart the scan stops where the new records end.
    let j = open_small(dir.path());
    let back = ids(&live(&j).await);
    let want: Vec<String> = (600..605).map(|i| format!("id-{i}")).collect();
    assert_eq!(back, want);
    // And the log goes on after them.
    round(&j, 605, 40, 200).await;
    assert_eq!(live(&j).await.len(), 45);
}

#[tokio::test]
async fn a_restart_numbers_records_above_what_the_spares_hold() {
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().join("log");
    {
        let j = open_small(dir.path());
        // Ids of one length, as the new ones below: records of one size,
        // so an old record starts right where the new ones end.
        settle_into_spares(&j, &log_dir, 100).await;
        j.shutdown().await;
    }
    // Nothing else left to say how far seqs went: no segment, no
    // checkpoint, no runs (as if their writes had been lost).
    for e in std::fs::read_dir(&log_dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "seg") {
            std::fs::remove_file(p).unwrap();
        }
    }
    let _ = std::fs::remove_file(dir.path().join("settled.ckpt"));
    std::fs::remove_dir_all(dir.path().join("ids")).unwrap();
    {
        let j = open_small(dir.path());
        round(&j, 700, 5, 200).await;
        j.shutdown().await;
    }
    // The new records went to a spare; none of its old ones came back.
    let j = open_small(dir.path());
    let back = ids(&live(&j).await);
    let want: Vec<String> = (700..705).map(|i| format!("id-{i}")).collect();
    assert_eq!(back, want);
}

#[tokio::test]
async fn ids_dedupe_from_the_memtable_from_runs_and_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let j = open_small(dir.path());
        round(&j, 0, 450, 10).await;
        // In the memtable, and (the first few hundred) in runs.
        for i in [0, 99, 100, 350, 449] {
            let a = j.append(&format!("id-{i}"), body(1)).await.unwrap();
            assert_eq!(a, Appended::Duplicate, "id-{i}");
        }
        j.shutdown().await;
    }
    let j = open_small(dir.path());
    for i in [0, 250, 449] {
        let a = j.append(&format!("id-{i}"), body(1)).await.unwrap();
        assert_eq!(a, Appended::Duplicate, "id-{i} after a reopen");
    }
    assert!(matches!(
        j.append("id-450", body(1)).await.unwrap(),
        Appended::New(_)
    ));
    // Pruning the window forgets them all.
    j.prune_ids(u64::MAX);
    j.sync().await.unwrap();
    assert!(matches!(
        j.append("id-7", body(1)).await.unwrap(),
        Appended::New(_)
    ));
}

#[tokio::test]
async fn one_id_twice_in_one_group_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let j = open_small(dir.path());
    let both = futures_util::future::join_all((0..20).map(|_| {
        let j = j.clone();
        async move { j.append("same", body(1)).await.unwrap() }
    }))
    .await;
    let new = both
        .iter()
        .filter(|a| matches!(a, Appended::New(_)))
        .count();
    assert_eq!(new, 1, "{both:?}");
    assert_eq!(live(&j).await.len(), 1);
}

#[tokio::test]
async fn runs_of_a_day_are_merged_and_still_dedupe() {
    let dir = tempfile::tempdir().unwrap();
    let j = open_small(dir.path());
    round(&j, 0, 1_000, 1).await;
    j.sync().await.unwrap();
    let ids_dir = dir.path().join("ids");
    // Ten flushes of 100, merged pairwise as they come: far fewer files.
    eventually(10, "runs merged", || async {
        std::fs::read_dir(&ids_dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "run")
            })
            .count()
            <= 4
    })
    .await;
    for i in (0..1_000).step_by(37) {
        assert_eq!(
            j.append(&format!("id-{i}"), body(1)).await.unwrap(),
            Appended::Duplicate,
            "id-{i}"
        );
    }
}

#[tokio::test]
async fn unsettled_records_survive_a_reopen_and_settled_ones_do_not() {
    let dir = tempfile::tempdir().unwrap();
    {
        let j = open_small(dir.path());
        let a = new_seq(&j, "a").await;
        new_seq(&j, "b").await;
        j.settle(a);
        j.sync().await.unwrap();
        j.shutdown().await;
    }
    let j = open_small(dir.path());
    let left = live(&j).await;
    assert_eq!(ids(&left), ["b"]);
    assert_eq!(j.pending(), 1);
    // Seqs go on from where they were.
    assert!(new_seq(&j, "c").await > left[0].loc.seq);
}

#[tokio::test]
async fn without_a_shutdown_settles_of_the_last_second_at_most_are_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let settled_before;
    {
        let j = open_small(dir.path());
        let seqs = round(&j, 0, 100, 10).await;
        for s in &seqs[..50] {
            j.settle(*s);
        }
        j.sync().await.unwrap();
        for s in &seqs[50..60] {
            j.settle(*s);
        }
        settled_before = 50;
        // Stopped without a shutdown, as a kill -9 leaves it: the last ten
        // settles were not checkpointed yet.
        j.abandon().await;
    }
    let j = open_small(dir.path());
    let left = live(&j).await.len();
    assert!(
        (40..=100 - settled_before).contains(&left),
        "{left} records live after the crash"
    );
}

#[tokio::test]
async fn dead_letters_are_kept_with_their_event_and_replayed_through_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let j = open_small(dir.path());
    let ev = br#"{"type":"user.banned","data":{"user_id":"u1"}}"#.to_vec();
    j.append("ev-1", ev.clone()).await.unwrap();
    let entry = live(&j).await.remove(0);
    j.dead_letter_for(entry.loc, dead_letter("ev-1"));
    j.settle(entry.loc.seq);
    j.sync().await.unwrap();
    let dead = j.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].event,
        serde_json::from_slice::<serde_json::Value>(&ev).unwrap(),
        "the event filled in from its record"
    );
    assert!(live(&j).await.is_empty());
    assert_eq!(j.replay_dead_letters(None).await.unwrap(), 1);
    assert!(j.dead_letters(10).await.unwrap().is_empty());
    let back = live(&j).await;
    assert_eq!(ids(&back), ["replay:ev-1"]);
}

#[tokio::test]
async fn an_earlier_versions_journal_is_moved_into_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let old = |id: &str| {
        format!(
            r#"{{"event":{{"id":"{id}","received_unix_ms":5,"body":{{"type":"user.banned","data":{{"user_id":"{id}"}}}}}}}}"#
        )
        .into_bytes()
    };
    State::write_legacy(
        &dir.path().join("journal.redb"),
        &[(3, old("old-a")), (4, old("old-b"))],
        &[
            ("old-a", unix_now()),
            ("old-b", unix_now()),
            ("settled-c", unix_now()),
        ],
    );
    let j = open_small(dir.path());
    let left = live(&j).await;
    assert_eq!(ids(&left), ["old-a", "old-b"]);
    let Record::Event { body: stored, .. } = &left[0].record else {
        panic!("an event")
    };
    assert!(serde_json::from_slice::<serde_json::Value>(stored).is_ok());
    for id in ["old-a", "settled-c"] {
        assert_eq!(
            j.append(id, body(1)).await.unwrap(),
            Appended::Duplicate,
            "{id}"
        );
    }
    j.shutdown().await;
    // Moved once: a restart does not bring them in again.
    let j = open_small(dir.path());
    assert_eq!(live(&j).await.len(), 2);
}

/// Retries `append` until it is stored or `secs` pass.
async fn append_eventually(j: &Journal, id: &str, secs: u64) -> Appended {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match j.append(id, body(1)).await {
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
    let j = Journal::open_tuned(dir.path(), Some(faults.clone()), SMALL).unwrap();
    let a = new_seq(&j, "a").await;
    let b_entry = {
        new_seq(&j, "b").await;
        live(&j).await.remove(1)
    };
    faults.fail_writes(ENOSPC);
    let refused = j.append("c", body(1)).await;
    assert!(
        matches!(refused, Err(JournalError::Storage(_))),
        "{refused:?}"
    );
    assert!(matches!(j.health(), JournalHealth::Failing(r) if r.contains("No space left")));
    j.settle(a);
    j.dead_letter_for(b_entry.loc, dead_letter("b"));
    assert!(
        j.sync().await.is_err(),
        "nothing is durable while writes fail"
    );
    assert_eq!(j.pending(), 2, "a settle not yet durable still counts");
    assert!(j.stats().write_errors >= 1);
    faults.heal();
    // The id that got an error was never accepted: stored as new.
    assert!(matches!(
        append_eventually(&j, "c", 5).await,
        Appended::New(_)
    ));
    j.sync().await.unwrap();
    assert_eq!(j.health(), JournalHealth::Ok);
    assert_eq!(ids(&live(&j).await), ["b", "c"], "the held settle applied");
    assert_eq!(j.pending(), 2);
    let dead = j.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1, "the held dead letter was committed once");
    assert_eq!(dead[0].event_id, "b");
    assert_eq!(dead[0].event["type"], "user.banned");
}

#[tokio::test]
async fn an_idle_journal_notices_by_itself_that_the_disk_works_again() {
    let dir = tempfile::tempdir().unwrap();
    let faults = StorageFaults::new();
    let j = Journal::open_tuned(dir.path(), Some(faults.clone()), SMALL).unwrap();
    new_seq(&j, "a").await;
    faults.fail_writes(EIO);
    assert!(j.append("b", body(1)).await.is_err());
    assert!(matches!(j.health(), JournalHealth::Failing(_)));
    faults.heal();
    // No request comes (a load balancer stops sending to a 503 /readyz):
    // the writer's own probe turns it healthy.
    eventually(5, "healthy again without a request", || async {
        j.health() == JournalHealth::Ok
    })
    .await;
}

#[tokio::test]
async fn a_journal_that_cannot_be_reopened_is_broken_until_it_can() {
    let dir = tempfile::tempdir().unwrap();
    let faults = StorageFaults::new();
    let j = Journal::open_tuned(dir.path(), Some(faults.clone()), SMALL).unwrap();
    new_seq(&j, "a").await;
    faults.fail_writes(EIO);
    faults.fail_opens(EACCES);
    assert!(j.append("b", body(1)).await.is_err());
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
    assert_eq!(ids(&live(&j).await), ["a", "b"]);
}

#[tokio::test]
async fn a_failed_write_leaves_nothing_behind_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let faults = StorageFaults::new();
    {
        let j = Journal::open_tuned(dir.path(), Some(faults.clone()), SMALL).unwrap();
        new_seq(&j, "kept").await;
        faults.fail_writes(EIO);
        assert!(j.append("refused", body(1)).await.is_err());
        faults.heal();
        j.shutdown().await;
    }
    let j = open_small(dir.path());
    assert_eq!(ids(&live(&j).await), ["kept"]);
    assert!(matches!(
        j.append("refused", body(1)).await.unwrap(),
        Appended::New(_)
    ));
}

#[test]
fn a_corrupt_state_file_fails_to_open_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("journal.redb");
    std::fs::write(&file, vec![0xA5u8; 64 * 1024]).unwrap();
    let e = Journal::open(dir.path()).unwrap_err().to_string();
    assert!(e.contains(&file.display().to_string()), "{e}");
    assert!(e.contains("move it aside"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
}

#[tokio::test]
async fn a_segment_that_is_not_one_fails_to_open_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    {
        let j = open_small(dir.path());
        new_seq(&j, "a").await;
        j.shutdown().await;
    }
    let seg = std::fs::read_dir(dir.path().join("log"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&seg).unwrap();
    for b in bytes.iter_mut().take(32) {
        *b ^= 0x5A;
    }
    std::fs::write(&seg, bytes).unwrap();
    let e = Journal::open(dir.path()).unwrap_err().to_string();
    assert!(e.contains(&seg.display().to_string()), "{e}");
    assert!(e.contains("move it aside"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
}

#[tokio::test]
async fn a_journal_directory_removed_while_in_use_is_broken() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    let j = Journal::open(&path).unwrap();
    j.append("a", body(1)).await.unwrap();
    std::fs::remove_dir_all(&path).unwrap();
    eventually(20, "broken, naming the removal", || async {
        matches!(j.health(), JournalHealth::Broken(ref r) if r.contains("removed"))
    })
    .await;
    // Writes into the unlinked file still work, but the state stays
    // broken: they would be lost on restart.
    j.append("b", body(1)).await.unwrap();
    assert!(matches!(j.health(), JournalHealth::Broken(_)));
}
