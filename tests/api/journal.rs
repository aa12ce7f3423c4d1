//! The embedded journal under storage faults: writes failing (ENOSPC, EIO)
//! injected through a redb backend, a journal that cannot be reopened, and
//! restarts after a failure.

use std::time::Duration;

use chat_janitor::emulator::{FaultRule, Faults, Seed, SeedChannel};
use chat_janitor::inbox::faults::{StorageFaults, EACCES, EIO, ENOSPC};
use serde_json::json;

use crate::helpers::*;

const CHANNEL: &str = "@TOA#_jf";

async fn app_with_faults(up: &TestUpstream, dir: &std::path::Path) -> (TestApp, StorageFaults) {
    let faults = StorageFaults::new();
    let mut settings = test_settings(&up.running.base_url(), dir);
    settings.journal.faults = Some(faults.clone());
    settings.batching.linger_ms = 20;
    (TestApp::spawn(settings).await, faults)
}

fn seed(up: &TestUpstream, members: &[String]) {
    up.emulator.seed(Seed {
        channels: vec![SeedChannel::new(CHANNEL, members.to_vec())],
        ..Seed::default()
    });
}

async fn ban(app: &TestApp, id: &str, user: &str) -> reqwest::Response {
    app.post_event(
        id,
        "user.banned",
        json!({"user_id": user, "channels": [CHANNEL]}),
    )
    .await
}

async fn healthz(app: &TestApp) -> (u16, String) {
    let r = app.http.get(app.url("/healthz")).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn journal_writes_failing_answer_503_and_resume_without_a_restart() {
    let up = TestUpstream::start().await;
    let members = users("jf", 3);
    seed(&up, &members);
    let dir = temp_dir();
    let (app, faults) = app_with_faults(&up, dir.path()).await;
    assert_eq!(ban(&app, "jf-0", "jf0").await.status(), 202);
    assert!(app.metric("chat_janitor_journal_file_bytes").await > 0.0);
    assert!(
        app.metric("chat_janitor_journal_filesystem_free_bytes")
            .await
            > 0.0
    );
    assert_eq!(
        app.metric("chat_janitor_journal_write_errors_total").await,
        0.0
    );

    faults.fail_writes(ENOSPC);
    for _ in 0..3 {
        let r = ban(&app, "jf-1", "jf1").await;
        assert_eq!(r.status(), 503);
        assert!(r.headers().contains_key("retry-after"));
    }
    let (status, body) = app.readyz().await;
    assert_eq!(status, 503);
    assert!(body.contains("journal: "), "{body}");
    assert!(body.contains("No space left on device"), "{body}");
    assert_eq!(
        healthz(&app).await.0,
        200,
        "a full disk is no reason to restart"
    );
    assert!(app.metric("chat_janitor_journal_write_errors_total").await >= 1.0);

    faults.heal();
    // The id that got 503s was never accepted: its retry is stored as new.
    let healed = tokio::time::Instant::now();
    loop {
        let r = ban(&app, "jf-1", "jf1").await;
        match r.status().as_u16() {
            202 => break,
            503 => {}
            other => panic!("unexpected {other}"),
        }
        assert!(
            healed.elapsed() < Duration::from_secs(5),
            "no 202 within 5 s of healing"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.readyz().await.0, 200);
    assert_eq!(ban(&app, "jf-2", "jf2").await.status(), 202);
    eventually(10, "every 202'd event applied", || async {
        up.emulator.subscribers(CHANNEL).unwrap().is_empty()
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn settles_made_while_writes_fail_are_committed_and_not_replayed_after_a_restart() {
    let up = TestUpstream::start().await;
    let members = users("js", 40);
    seed(&up, &members);
    let dir = temp_dir();
    let (app, faults) = app_with_faults(&up, dir.path()).await;
    // The upstream holds them (transient errors, retried) until the store
    // fails: their settles come while no commit can succeed.
    up.emulator
        .set_faults(Faults::new(vec![FaultRule::error_code(None, 10004)]));
    for u in &members {
        assert_eq!(ban(&app, &format!("js-{u}"), u).await.status(), 202);
    }
    faults.fail_writes(EIO);
    up.emulator.clear_faults();
    eventually(
        20,
        "every 202'd event applied while writes fail",
        || async { up.emulator.subscribers(CHANNEL).unwrap().is_empty() },
    )
    .await;
    // Settle-only commits are fsynced within a second; that one fails, so
    // the journal still holds all 40 and the settles wait in memory.
    eventually(10, "the settles not durable while writes fail", || async {
        app.metric("chat_janitor_journal_events").await == 40.0
            && app.metric("chat_janitor_journal_write_errors_total").await >= 1.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(app.metric("chat_janitor_journal_events").await, 40.0);
    faults.heal();
    eventually(10, "the held settles committed", || async {
        app.metric("chat_janitor_journal_events").await == 0.0
    })
    .await;
    app.stop().await;

    let calls = up.emulator.calls().len();
    let app = TestApp::spawn(test_settings(&up.running.base_url(), dir.path())).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(app.metric("chat_janitor_journal_events").await, 0.0);
    assert_eq!(
        up.emulator.calls().len(),
        calls,
        "no settled event is sent upstream again"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_journal_that_cannot_be_reopened_fails_healthz() {
    let up = TestUpstream::start().await;
    seed(&up, &users("jb", 1));
    let dir = temp_dir();
    let (app, faults) = app_with_faults(&up, dir.path()).await;
    assert_eq!(healthz(&app).await.0, 200);
    faults.fail_writes(EIO);
    faults.fail_opens(EACCES);
    assert_eq!(ban(&app, "jb-0", "jb0").await.status(), 503);
    let (status, body) = healthz(&app).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("journal: cannot reopen"), "{body}");
    assert!(body.contains("Permission denied"), "{body}");
    let (status, body) = app.readyz().await;
    assert_eq!(status, 503);
    assert!(body.contains("journal: "), "{body}");
    // Fixed (permissions restored): it heals without the restart.
    faults.heal();
    eventually(5, "alive again", || async { healthz(&app).await.0 == 200 }).await;
    eventually(5, "accepting again", || async {
        ban(&app, "jb-0", "jb0").await.status() == 202
    })
    .await;
    app.stop().await;
}
