//! The disk store against real files in a temp dir: lookups, reopening,
//! a crash's torn tail, retention by age and by bytes, the callbacks'
//! reading order and cursor.

use std::time::Duration;

use super::*;
use crate::domain::Source;
use crate::fate::{ItemOutcome, Settled, Status};
use crate::rules::{default_rules, RuleChannels, Rules};

fn opts() -> StoreOptions {
    StoreOptions {
        retention: Duration::from_secs(7 * 86_400),
        max_bytes: 1 << 30,
    }
}

fn metrics() -> Metrics {
    Metrics::new(["user.banned"])
}

/// The rules every store here plans its records with.
fn book() -> Arc<RulesBook> {
    RulesBook::new(Arc::new(Rules::new(
        default_rules(),
        &RuleChannels::default(),
    )))
}

/// A ban of `user` out of `channels` channels, settled now, each applied.
fn record(id: &str, user: &str, channels: usize) -> SettledEvent {
    ban(
        id,
        user,
        (0..channels).map(|i| format!("@TOA#_c{i}")).collect(),
    )
}

fn ban(id: &str, user: &str, channels: Vec<String>) -> SettledEvent {
    let now = unix_ms();
    let n = channels.len();
    SettledEvent {
        id: id.into(),
        source: Source::Webhook,
        kind: "user.banned".into(),
        accepted_at_ms: now,
        settled_at_ms: now,
        dead_lettered: false,
        rules: book().current().fingerprint(),
        body: serde_json::json!({
            "type": "user.banned",
            "data": {"user_id": user, "channels": channels}
        })
        .to_string()
        .into_bytes(),
        plan: None,
        outcomes: (0..n as u32)
            .map(|i| {
                (
                    i,
                    ItemOutcome {
                        result: Settled::Applied,
                        error_code: 0,
                        error_info: None,
                        at_unix_ms: now,
                        attempts: 1,
                    },
                )
            })
            .collect(),
    }
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some(ext))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn put_get_and_by_user_newest_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(dir.path(), opts(), metrics(), book()).unwrap();
    let a = record("e1", "alice", 2);
    store.put(a.clone());
    // Found at once, before the writer has written it.
    assert_eq!(store.get("e1").await.unwrap(), a.record(&book()));
    assert_eq!(store.get("e1").await.unwrap().unwrap().actions.len(), 2);
    store.sync().await;
    store.put(record("e2", "bob", 1));
    store.put(record("e3", "alice", 3));
    store.sync().await;
    assert_eq!(store.get("e1").await.unwrap(), a.record(&book()));
    assert_eq!(store.get("e3").await.unwrap().unwrap().actions.len(), 3);
    assert_eq!(store.get("nope").await.unwrap(), None);
    let ids = |v: Vec<EventRecord>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(ids(store.by_user("alice", 10).await.unwrap()), ["e3", "e1"]);
    assert_eq!(ids(store.by_user("alice", 1).await.unwrap()), ["e3"]);
    assert_eq!(ids(store.by_user("bob", 10).await.unwrap()), ["e2"]);
    assert!(store.by_user("carol", 10).await.unwrap().is_empty());
    // A record rewritten (its event replayed) answers as the newest, once.
    let mut again = record("e1", "alice", 2);
    again.dead_lettered = true;
    store.put(again);
    store.sync().await;
    assert_eq!(
        store.get("e1").await.unwrap().unwrap().status,
        Status::DeadLettered
    );
    assert_eq!(ids(store.by_user("alice", 10).await.unwrap()), ["e1", "e3"]);
    assert_eq!(store.stats().records, 4);
    assert!(store.stats().bytes > 0);
    store.close().await;
}

#[tokio::test]
async fn records_survive_a_reopen_and_writing_goes_on_in_a_new_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(dir.path(), opts(), metrics(), book()).unwrap();
    for i in 0..100 {
        store.put(record(&format!("e{i}"), &format!("u{}", i % 7), 2));
    }
    store.close().await;
    assert_eq!(files(dir.path(), "rec").len(), 1);
    assert_eq!(files(dir.path(), "idx").len(), 1, "sealed on close");
    let store = DiskStore::open(dir.path(), opts(), metrics(), book()).unwrap();
    for i in 0..100 {
        let r = store.get(&format!("e{i}")).await.unwrap().unwrap();
        assert_eq!(r.user_id, format!("u{}", i % 7));
    }
    assert_eq!(store.by_user("u3", 100).await.unwrap().len(), 14);
    assert_eq!(*store.written().borrow(), {
        let all = store.read_after(None, 1_000).await.unwrap();
        assert_eq!(all.len(), 100);
        Some(all.last().unwrap().0)
    });
    store.put(record("later", "u3", 1));
    store.sync().await;
    assert_eq!(files(dir.path(), "rec").len(), 2);
    let u3 = store.by_user("u3", 100).await.unwrap();
    assert_eq!(u3.len(), 15);
    assert_eq!(u3[0].id, "later");
    store.close().await;
}

#[tokio::test]
async fn after_a_crash_the_torn_tail_is_cut_and_every_whole_record_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(dir.path(), opts(), metrics(), book()).unwrap();
    for i in 0..10 {
        store.put(record(&format!("e{i}"), "alice", 1));
    }
    store.sync().await;
    store.abandon();
    // The writer is gone, as after a kill -9: the open file has no index.
    let data = files(dir.path(), "rec");
    assert_eq!(data.len(), 1);
    assert!(files(dir.path(), "idx").is_empty());
    let whole = std::fs::metadata(&data[0]).unwrap().len();
    // Half a record that a crash tore.
    let mut torn = Vec::new();
    format::encode(
        &mut torn,
        format::RecHead {
            at_ms: unix_ms(),
            fp_id: 1,
            fp_user: 2,
        },
        &[7u8; 500],
    );
    let f = OpenOptions::new().append(true).open(&data[0]).unwrap();
    std::io::Write::write_all(&mut &f, &torn[..300]).unwrap();
    drop(f);
    let store = DiskStore::open(dir.path(), opts(), metrics(), book()).unwrap();
    assert_eq!(std::fs::metadata(&data[0]).unwrap().len(), whole);
    assert_eq!(files(dir.path(), "idx").len(), 1, "indexed on open");
    for i in 0..10 {
        assert!(store.get(&format!("e{i}")).await.unwrap().is_some());
    }
    assert_eq!(store.by_user("alice", 100).await.unwrap().len(), 10);
    store.close().await;
}

#[tokio::test]
async fn records_expire_after_the_retention_and_their_files_go() {
    let dir = tempfile::tempdir().unwrap();
    let short = StoreOptions {
        retention: Duration::from_secs(2),
        ..opts()
    };
    let store = DiskStore::open(dir.path(), short, metrics(), book()).unwrap();
    store.put(record("old", "alice", 1));
    store.sync().await;
    assert!(store.get("old").await.unwrap().is_some());
    // Not answered once expired, even before its file is deleted...
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if store.get("old").await.unwrap().is_none() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(store.by_user("alice", 10).await.unwrap().is_empty());
    // ... and then the file goes whole.
    eventually("the expired file deleted", || {
        files(dir.path(), "rec").is_empty()
    })
    .await;
    assert_eq!(store.stats(), StoreStats::default());
    store.put(record("new", "alice", 1));
    store.sync().await;
    assert!(store.get("new").await.unwrap().is_some());
    store.close().await;
}

#[tokio::test]
async fn files_holding_undelivered_callbacks_wait_for_them_before_expiring() {
    let dir = tempfile::tempdir().unwrap();
    let short = StoreOptions {
        retention: Duration::from_secs(1),
        ..opts()
    };
    let store = DiskStore::open(dir.path(), short, metrics(), book()).unwrap();
    store
        .save_cursor(Some(CallbackCursor { after: None }))
        .await
        .unwrap();
    store.put(record("e", "alice", 1));
    store.sync().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        store.get("e").await.unwrap().is_none(),
        "expired for lookups"
    );
    assert_eq!(files(dir.path(), "rec").len(), 1, "kept for its callback");
    let (at, _) = store.read_after(None, 10).await.unwrap()[0].clone();
    store
        .save_cursor(Some(CallbackCursor { after: Some(at) }))
        .await
        .unwrap();
    eventually("the file deleted once its callback is done", || {
        files(dir.path(), "rec").is_empty()
    })
    .await;
    store.close().await;
}

#[tokio::test]
async fn the_oldest_files_go_when_the_store_is_over_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let small = StoreOptions {
        max_bytes: 512 << 10,
        ..opts()
    };
    let store = DiskStore::open(dir.path(), small, metrics(), book()).unwrap();
    // Big records (about 1.6 KB each): 40 distinct random-looking
    // channels.
    let big = |id: String| {
        let channels = (0..40)
            .map(|_| format!("@TOA#_{:032x}", rand::random::<u128>()))
            .collect();
        ban(&id, "alice", channels)
    };
    for i in 0..1_500 {
        store.put(big(format!("e{i}")));
        if i % 100 == 99 {
            store.sync().await;
        }
    }
    store.sync().await;
    eventually("the store back under max_bytes", || {
        store.stats().bytes <= small.max_bytes
    })
    .await;
    assert!(store.get("e0").await.unwrap().is_none(), "the oldest went");
    assert!(
        store.get("e1499").await.unwrap().is_some(),
        "the newest stay"
    );
    let kept = store.by_user("alice", 10_000).await.unwrap();
    assert!(!kept.is_empty() && kept.len() < 1_500);
    assert_eq!(kept[0].id, "e1499");
    store.close().await;
}

#[tokio::test]
async fn callbacks_read_in_write_order_from_a_position_across_files_and_keep_their_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(dir.path(), opts(), metrics(), book()).unwrap();
    assert_eq!(store.cursor(), None);
    for i in 0..5 {
        store.put(record(&format!("a{i}"), "u", 1));
    }
    store.close().await;
    let store = DiskStore::open(dir.path(), opts(), metrics(), book()).unwrap();
    for i in 0..5 {
        store.put(record(&format!("b{i}"), "u", 1));
    }
    store.sync().await;
    let all = store.read_after(None, 100).await.unwrap();
    let ids: Vec<&str> = all.iter().map(|(_, r)| r.id.as_str()).collect();
    assert_eq!(
        ids,
        ["a0", "a1", "a2", "a3", "a4", "b0", "b1", "b2", "b3", "b4"]
    );
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0));
    let after_a4 = store.read_after(Some(all[4].0), 3).await.unwrap();
    assert_eq!(
        after_a4
            .iter()
            .map(|(_, r)| r.id.as_str())
            .collect::<Vec<_>>(),
        ["b0", "b1", "b2"]
    );
    assert!(store
        .read_after(Some(all[9].0), 10)
        .await
        .unwrap()
        .is_empty());
    let c = CallbackCursor {
        after: Some(all[6].0),
    };
    store.save_cursor(Some(c)).await.unwrap();
    store.close().await;
    let store = DiskStore::open(dir.path(), opts(), metrics(), book()).unwrap();
    assert_eq!(store.cursor(), Some(c));
    store.save_cursor(None).await.unwrap();
    store.close().await;
    let store = DiskStore::open(dir.path(), opts(), metrics(), book()).unwrap();
    assert_eq!(store.cursor(), None);
    store.close().await;
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_rather_than_waits() {
    let dir = tempfile::tempdir().unwrap();
    let m = metrics();
    let store = DiskStore::open(dir.path(), opts(), m.clone(), book()).unwrap();
    // As if the writer were far behind.
    store.inner.queued.store(MAX_QUEUED, Ordering::Release);
    store.put(record("lost", "u", 1));
    assert!(m
        .render()
        .contains("chat_janitor_records_dropped_total{reason=\"queue_full\"} 1"));
    assert!(store.get("lost").await.unwrap().is_none());
    store.inner.queued.store(0, Ordering::Release);
    store.put(record("kept", "u", 1));
    store.sync().await;
    assert!(m.render().contains("chat_janitor_records_written_total 1"));
    store.close().await;
    // After close, a record is counted, not written.
    store.put(record("late", "u", 1));
    assert!(m
        .render()
        .contains("chat_janitor_records_dropped_total{reason=\"shutdown\"} 1"));
}

/// Record files written before the kept form hold the record's JSON, plain
/// or deflated: both still read.
#[test]
fn kept_payloads_and_older_json_and_deflated_ones_all_read() {
    use std::io::Write as _;
    let e = record("evt-legacy", "u-legacy", 3);
    let mut kept = Vec::new();
    e.encode(&mut kept);
    let r = format::record_of(&kept, &book()).unwrap();
    assert_eq!(r.id, e.id);
    assert_eq!(r.actions.len(), 3);
    let plain = serde_json::to_vec(&r).unwrap();
    assert_eq!(format::record_of(&plain, &book()), Some(r.clone()));
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&plain).unwrap();
    let deflated = enc.finish().unwrap();
    assert_eq!(format::record_of(&deflated, &book()), Some(r));
    assert!(format::record_of(b"{not json and not deflate", &book()).is_none());
}

/// Records are planned again on read with the rules that planned them,
/// though the service runs with other rules since.
#[tokio::test]
async fn a_record_reads_back_as_its_own_rules_planned_it_after_the_rules_changed() {
    let dir = tempfile::tempdir().unwrap();
    let mut no_follows = default_rules();
    no_follows.get_mut("user.banned").unwrap().unfollow = false;
    let old = RulesBook::new(Arc::new(Rules::new(no_follows, &RuleChannels::default())));
    let store = DiskStore::open(dir.path(), opts(), metrics(), old.clone()).unwrap();
    let mut e = record("e1", "alice", 2);
    e.rules = old.current().fingerprint();
    e.body = serde_json::json!({
        "type": "user.banned",
        "data": {"user_id": "alice", "channels": ["@TOA#_c0", "@TOA#_c1"], "following": ["bob"]}
    })
    .to_string()
    .into_bytes();
    let before = e.record(&old).unwrap();
    assert_eq!(before.actions.len(), 2, "no unfollow under the old rules");
    store.put(e);
    store.close().await;

    let store = DiskStore::open(dir.path(), opts(), metrics(), book()).unwrap();
    assert_ne!(book().current().fingerprint(), old.current().fingerprint());
    assert_eq!(store.get("e1").await.unwrap(), Some(before));
    store.close().await;
}
