//! Sweeps under every reading of the vendor's `Next` (the emulator's cursor
//! modes), while other events change the channel, and the resolution reads
//! under the offset reading while entries are removed between pages.

use std::collections::HashSet;

use chat_janitor::emulator::SeedFollow;
use chat_janitor::emulator::{CursorMode, EmulatorConfig, FaultRule, Faults, Seed, SeedChannel};
use chat_janitor::tencent::{FollowBatch, SubscriberBatch};
use serde_json::{json, Value};

use crate::helpers::*;

pub const SWEPT: &str = "@TOA#_swp";

/// 1,000 subscribers; every 7th of them (137) on the deny list, plus two
/// deny-listed ids that are not members.
pub struct Case {
    pub members: Vec<String>,
    pub denied: Vec<String>,
    pub deny: Vec<String>,
}

pub fn case() -> Case {
    let members = users("m", 1000);
    let denied: Vec<String> = members.iter().step_by(7).take(137).cloned().collect();
    assert_eq!(denied.len(), 137);
    let mut deny = denied.clone();
    deny.extend(["ghost1".to_owned(), "ghost2".to_owned()]);
    Case {
        members,
        denied,
        deny,
    }
}

pub fn seed_case(up: &TestUpstream, case: &Case) {
    up.emulator.seed(Seed {
        channels: vec![SeedChannel::new(SWEPT, case.members.clone())],
        ..Seed::default()
    });
}

async fn upstream(cursor: CursorMode) -> TestUpstream {
    TestUpstream::start_with(EmulatorConfig {
        sdkappid: SDKAPPID,
        secret_key: KEY.into(),
        admins: vec![ADMIN.into()],
        cursor,
        ..EmulatorConfig::default()
    })
    .await
}

/// `POST /v1/admin/sweeps` on the service at `base`; the sweep's id.
pub async fn start_sweep(base: &str, deny: &[String], dry_run: bool) -> u64 {
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/admin/sweeps"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"channel": SWEPT, "deny": deny, "dry_run": dry_run}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    r.json::<Value>().await.unwrap()["id"].as_u64().unwrap()
}

/// `GET /v1/admin/sweeps/{id}`: status code and body.
pub async fn sweep_status(base: &str, id: u64) -> (u16, Value) {
    let r = reqwest::Client::new()
        .get(format!("{base}/v1/admin/sweeps/{id}"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(Value::Null))
}

/// Waits until the sweep is no longer queued (broker mode) or running;
/// its final status.
pub async fn finished_sweep(base: &str, id: u64) -> Value {
    eventually(90, "the sweep finished", || async {
        let (code, s) = sweep_status(base, id).await;
        code == 200 && s["state"] != "running" && s["state"] != "queued"
    })
    .await;
    sweep_status(base, id).await.1
}

/// (pages, listed, found) of each pass.
pub fn passes(s: &Value) -> Vec<(u64, u64, u64)> {
    s["passes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["pages"].as_u64().unwrap(),
                p["listed"].as_u64().unwrap(),
                p["found"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Found, removed and left 137 / 137 / 0, confirmed.
pub fn assert_clean_result(s: &Value) {
    assert_eq!(s["state"], "done", "{s}");
    assert_eq!(s["found"], 137, "{s}");
    assert_eq!(s["removed"], 137, "{s}");
    assert_eq!(s["left"], 0, "{s}");
    assert_eq!(s["confirmed"], true, "{s}");
}

/// Every account sent to `delete_subscriber` for the swept channel.
pub fn removals_sent(up: &TestUpstream) -> Vec<String> {
    up.emulator
        .calls()
        .into_iter()
        .filter(|c| c.api == "delete_subscriber" && c.key.as_deref() == Some(SWEPT))
        .flat_map(|c| c.accounts)
        .collect()
}

pub fn remaining(up: &TestUpstream) -> HashSet<String> {
    up.emulator
        .subscribers(SWEPT)
        .unwrap()
        .into_iter()
        .collect()
}

async fn sweep_under(mode: CursorMode) {
    let up = upstream(mode).await;
    let case = case();
    seed_case(&up, &case);
    let dir = temp_dir();
    let app = TestApp::spawn(test_settings(&up.running.base_url(), dir.path())).await;
    let id = start_sweep(&app.url(""), &case.deny, false).await;
    let s = finished_sweep(&app.url(""), id).await;
    assert_clean_result(&s);
    // Pass 1 lists 1,000 in 5 pages of 200 and finds the 137; pass 2 lists
    // the 863 left in 5 pages and confirms.
    assert_eq!(passes(&s), [(5, 1000, 137), (5, 863, 0)], "{mode}");
    let stats = up.emulator.stats();
    assert_eq!(stats.api("get_subscriber_info").calls, 10, "{mode}");
    assert_eq!(
        stats.api("delete_subscriber").calls,
        2,
        "{mode}: full batches"
    );
    let sent = removals_sent(&up);
    assert_eq!(sent.len(), 137, "each sent once");
    let sent: HashSet<String> = sent.into_iter().collect();
    let denied: HashSet<String> = case.denied.iter().cloned().collect();
    assert_eq!(sent, denied, "exactly the deny-listed members");
    let expected: HashSet<String> = case
        .members
        .iter()
        .filter(|m| !denied.contains(*m))
        .cloned()
        .collect();
    assert_eq!(remaining(&up), expected);
    app.stop().await;
}

#[tokio::test]
async fn sweep_under_offset_cursors() {
    sweep_under(CursorMode::Offset).await;
}

#[tokio::test]
async fn sweep_under_key_cursors() {
    sweep_under(CursorMode::Key).await;
}

#[tokio::test]
async fn sweep_under_stable_cursors() {
    sweep_under(CursorMode::Stable).await;
}

#[tokio::test]
async fn sweep_while_other_events_remove_and_add_subscribers() {
    let up = upstream(CursorMode::Offset).await;
    let case = case();
    seed_case(&up, &case);
    // Slow pages, so the events land while the first pass pages.
    up.emulator.set_faults(Faults::new(vec![FaultRule::latency(
        Some("get_subscriber_info"),
        400,
    )]));
    let dir = temp_dir();
    let mut settings = test_settings(&up.running.base_url(), dir.path());
    settings.batching.linger_ms = 20;
    let app = TestApp::spawn(settings).await;
    let id = start_sweep(&app.url(""), &case.deny, false).await;
    eventually(20, "the second page asked for", || async {
        up.emulator.stats().api("get_subscriber_info").calls >= 2
    })
    .await;
    // 30 members near the front (none deny-listed) are banned, and 20 new
    // accounts subscribe, while the sweep pages.
    let banned: Vec<String> = case.members[1..35]
        .iter()
        .enumerate()
        .filter(|(i, _)| (i + 1) % 7 != 0)
        .map(|(_, m)| m.clone())
        .collect();
    assert_eq!(banned.len(), 30);
    let late = users("late", 20);
    for u in &banned {
        let r = app
            .post_event(
                &format!("ban-{u}"),
                "user.banned",
                json!({"user_id": u, "channels": [SWEPT]}),
            )
            .await;
        assert_eq!(r.status(), 202);
    }
    for u in &late {
        let r = app
            .post_event(
                &format!("sub-{u}"),
                "user.unbanned",
                json!({"user_id": u, "channels": [SWEPT]}),
            )
            .await;
        assert_eq!(r.status(), 202);
    }
    eventually(20, "the events applied", || async {
        let now = remaining(&up);
        banned.iter().all(|b| !now.contains(b)) && late.iter().all(|l| now.contains(l))
    })
    .await;
    let pages_when_applied = up.emulator.stats().api("get_subscriber_info").calls;
    let s = finished_sweep(&app.url(""), id).await;
    assert_clean_result(&s);
    let p = passes(&s);
    assert!(p.len() >= 2 && p.len() <= 4, "{s}");
    assert_eq!(p.last().unwrap().2, 0, "the last pass confirms: {s}");
    if pages_when_applied < 5 {
        // The removals landed before the first pass's last page: the
        // offset moved under it, and a later pass found whom it skipped.
        assert!(p[0].2 < 137, "{s}");
        assert!(p.len() >= 3, "{s}");
    }
    let denied: HashSet<String> = case.denied.iter().cloned().collect();
    let sent: HashSet<String> = removals_sent(&up).into_iter().collect();
    assert!(denied.is_subset(&sent));
    assert!(!sent.contains("ghost1") && !sent.contains("ghost2"));
    let expected: HashSet<String> = case
        .members
        .iter()
        .filter(|m| !denied.contains(*m) && !banned.contains(*m))
        .chain(late.iter())
        .cloned()
        .collect();
    assert_eq!(remaining(&up), expected);
    assert_eq!(expected.len(), 1000 - 137 - 30 + 20);
    app.stop().await;
}

/// Waits until `api` has been asked at least `n` times.
async fn asked(up: &TestUpstream, api: &str, n: u64) {
    eventually(20, "the listing paged on", || async {
        up.emulator.stats().api(api).calls >= n
    })
    .await;
}

#[tokio::test]
async fn resolving_channels_holds_under_offset_paging_with_removals() {
    let up = upstream(CursorMode::Offset).await;
    let channels: Vec<String> = (0..250).map(|i| format!("@TOA#_rc{i:03}")).collect();
    up.emulator.seed(Seed {
        channels: channels
            .iter()
            .map(|c| SeedChannel::new(c.clone(), ["target", "bystander"]))
            .collect(),
        ..Seed::default()
    });
    // Each page waits 500 ms before it is read: time to remove entries in
    // between.
    up.emulator.set_faults(Faults::new(vec![FaultRule::latency(
        Some("get_subscribed_official_account_list"),
        500,
    )]));
    let dir = temp_dir();
    let mut settings = test_settings(&up.running.base_url(), dir.path());
    settings.rules.get_mut("user.banned").unwrap().resolve = true;
    let app = TestApp::spawn(settings).await;
    let r = app
        .post_event(
            "rc-1",
            "user.banned",
            json!({"user_id": "target", "following": [], "followers": []}),
        )
        .await;
    assert_eq!(r.status(), 202);
    // Page 1 (offsets 0..200) read, page 2 waiting: other work removes
    // target from 30 channels it already listed, so offset 200 now skips
    // the 30 channels after them.
    asked(&up, "get_subscribed_official_account_list", 2).await;
    let client = up.client();
    for c in &channels[..30] {
        let batch = SubscriberBatch::try_from_iter([uid("target")]).unwrap();
        client.delete_subscriber(&chan(c), &batch).await.unwrap();
    }
    eventually(30, "target left every channel", || async {
        up.emulator.subscriptions("target").is_empty()
    })
    .await;
    for c in &channels {
        assert_eq!(up.emulator.subscribers(c).unwrap(), ["bystander"], "{c}");
    }
    // Two pages per pass; a second pass found the skipped ones, a third
    // added nothing.
    assert!(
        up.emulator
            .stats()
            .api("get_subscribed_official_account_list")
            .calls
            >= 4
    );
    assert!(app.dead_letters().await.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn resolving_follows_holds_under_offset_paging_with_removals() {
    let up = upstream(CursorMode::Offset).await;
    let followed = users("fd", 2500);
    up.emulator.seed(Seed {
        follows: vec![SeedFollow::new("target", followed.clone())],
        ..Seed::default()
    });
    up.emulator.set_faults(Faults::new(vec![FaultRule::latency(
        Some("follow_get"),
        500,
    )]));
    let dir = temp_dir();
    let mut settings = test_settings(&up.running.base_url(), dir.path());
    settings.rules.get_mut("user.banned").unwrap().resolve = true;
    let app = TestApp::spawn(settings).await;
    let r = app
        .post_event(
            "rf-1",
            "user.banned",
            json!({"user_id": "target", "channels": [], "followers": []}),
        )
        .await;
    assert_eq!(r.status(), 202);
    // Page 1 (1,000 follows) read, page 2 waiting: 100 of those already
    // listed are unfollowed by other work.
    asked(&up, "follow_get", 2).await;
    let client = up.client();
    for chunk in followed[..100].chunks(20) {
        let batch = FollowBatch::try_from_iter(chunk.iter().cloned().map(uid)).unwrap();
        client.follow_delete(&uid("target"), &batch).await.unwrap();
    }
    eventually(30, "target follows no one", || async {
        up.emulator.following("target").is_empty()
    })
    .await;
    assert!(up.emulator.stats().api("follow_get").calls >= 6);
    assert!(app.dead_letters().await.is_empty());
    app.stop().await;
}

/// A removal a sweep cannot make is a dead letter that names the sweep (it
/// has no event of its own).
#[tokio::test]
async fn a_sweeps_failed_removal_is_a_dead_letter_naming_the_sweep() {
    let up = TestUpstream::start().await;
    up.emulator.seed(Seed {
        channels: vec![SeedChannel::new(SWEPT, ["keep", "deny-me"])],
        ..Seed::default()
    });
    up.emulator
        .set_faults(Faults::new(vec![FaultRule::error_code(
            Some("delete_subscriber"),
            99999,
        )]));
    let dir = temp_dir();
    let mut settings = test_settings(&up.running.base_url(), dir.path());
    settings.dispatch.max_attempts = 2;
    settings.batching.linger_ms = 10;
    let app = TestApp::spawn(settings).await;
    let id = start_sweep(&app.url(""), &["deny-me".to_owned()], false).await;
    let s = finished_sweep(&app.url(""), id).await;
    assert_eq!(s["left"], 1, "{s}");
    let dead = app.dead_letters().await;
    assert!(!dead.is_empty());
    for dl in &dead {
        assert_eq!(dl["event_id"], format!("sweep-{id}"), "{dl}");
        assert_eq!(dl["event_type"], "sweep", "{dl}");
        assert_eq!(dl["event"], json!({"sweep": id, "channel": SWEPT}), "{dl}");
        assert_eq!(dl["action"]["user"], "deny-me", "{dl}");
        assert_eq!(dl["reason"], "unknown_error", "{dl}");
    }
    app.stop().await;
}
