//! The whole API: restore with add_subscriber, sweeps with
//! get_subscriber_info, and resolving what an event leaves out.

use std::collections::HashSet;

use chat_janitor::emulator::{Seed, SeedChannel, SeedFollow};
use serde_json::json;

use crate::helpers::*;

const CHANNELS: [&str; 3] = ["@TOA#_r0", "@TOA#_r1", "@TOA#_r2"];

fn seed_all(up: &TestUpstream, members: &[String]) {
    up.emulator.seed(Seed {
        channels: CHANNELS
            .iter()
            .map(|c| SeedChannel::new(*c, members.to_vec()))
            .collect(),
        ..Seed::default()
    });
}

#[tokio::test]
async fn ban_then_unban_within_one_linger_sends_no_removal() {
    let up = TestUpstream::start().await;
    let members = users("bu", 250);
    seed_all(&up, &members);
    let dir = temp_dir();
    let mut settings = test_settings(&up.running.base_url(), dir.path());
    settings.batching.linger_ms = 3000;
    let app = TestApp::spawn(settings).await;
    for u in &members {
        let r = app
            .post_event(
                &format!("ban-{u}"),
                "user.banned",
                json!({"user_id": u, "channels": CHANNELS}),
            )
            .await;
        assert_eq!(r.status(), 202);
        let r = app
            .post_event(
                &format!("unban-{u}"),
                "user.unbanned",
                json!({"user_id": u, "channels": CHANNELS}),
            )
            .await;
        assert_eq!(r.status(), 202);
    }
    eventually(15, "every event settled", || async {
        app.metric("chat_janitor_pending_items{api=\"add_subscriber\"}")
            .await
            == 0.0
            && app
                .metric("chat_janitor_pending_items{api=\"delete_subscriber\"}")
                .await
                == 0.0
            && app.metric("chat_janitor_event_settle_seconds_count").await == 500.0
    })
    .await;
    assert_eq!(
        up.emulator.stats().api("delete_subscriber").calls,
        0,
        "no removal was sent"
    );
    for c in CHANNELS {
        assert_eq!(up.emulator.subscribers(c).unwrap().len(), 250, "{c}");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_settled_ban_is_restored_in_full_batches() {
    let up = TestUpstream::start().await;
    let members = users("rs", 250);
    seed_all(&up, &members);
    let dir = temp_dir();
    let mut settings = test_settings(&up.running.base_url(), dir.path());
    // Batches go out when full; the linger only bounds the last one, and is
    // long enough that a slow machine's posts still fill the others.
    settings.batching.linger_ms = 2000;
    let app = TestApp::spawn(settings).await;
    let post_all = |kind: &'static str| {
        let app = &app;
        futures_util::future::join_all(members.iter().map(move |u| async move {
            let r = app
                .post_event(
                    &format!("{kind}-{u}"),
                    kind,
                    json!({"user_id": u, "channels": CHANNELS}),
                )
                .await;
            assert_eq!(r.status(), 202);
        }))
    };
    post_all("user.banned").await;
    eventually(15, "banned everywhere", || async {
        CHANNELS
            .iter()
            .all(|c| up.emulator.subscribers(c).unwrap().is_empty())
    })
    .await;
    eventually(5, "the bans settled", || async {
        app.metric("chat_janitor_pending_items{api=\"delete_subscriber\"}")
            .await
            == 0.0
    })
    .await;
    post_all("user.unbanned").await;
    eventually(15, "all 750 subscriptions restored", || async {
        CHANNELS
            .iter()
            .all(|c| up.emulator.subscribers(c).unwrap().len() == 250)
    })
    .await;
    let adds = up.emulator.stats().api("add_subscriber");
    assert!(adds.calls <= 9, "{} add_subscriber calls", adds.calls);
    assert_eq!(adds.applied, 750);
    app.stop().await;
}

#[tokio::test]
async fn a_full_channel_is_a_dead_letter_not_a_retry() {
    let up = TestUpstream::start().await;
    up.emulator.seed(Seed {
        channels: vec![SeedChannel {
            max_subscribers: Some(1),
            ..SeedChannel::new("@TOA#_full", ["someone"])
        }],
        ..Seed::default()
    });
    let dir = temp_dir();
    let app = TestApp::spawn(test_settings(&up.running.base_url(), dir.path())).await;
    let r = app
        .post_event(
            "full-1",
            "user.unbanned",
            json!({"user_id": "late", "channels": ["@TOA#_full"]}),
        )
        .await;
    assert_eq!(r.status(), 202);
    eventually(10, "dead-lettered", || async {
        app.dead_letters().await.len() == 1
    })
    .await;
    let dl = &app.dead_letters().await[0];
    assert_eq!(dl["reason"], "channel_full");
    assert!(dl["detail"].as_str().unwrap().contains("130006"));
    assert_eq!(
        up.emulator.stats().api("add_subscriber").calls,
        1,
        "not retried"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_sweep_removes_exactly_the_denied_in_two_calls() {
    let up = TestUpstream::start().await;
    let members = users("sw", 1000);
    up.emulator.seed(Seed {
        channels: vec![SeedChannel::new("@TOA#_sweep", members.clone())],
        ..Seed::default()
    });
    // Every 7th subscriber and a few accounts that are not subscribed.
    let denied: Vec<String> = members.iter().step_by(7).take(137).cloned().collect();
    assert_eq!(denied.len(), 137);
    let dir = temp_dir();
    let deny_file = dir.path().join("deny.txt");
    let mut text = String::from("# accounts to remove\n\n");
    for d in &denied {
        text.push_str(d);
        text.push('\n');
    }
    text.push_str("not-a-subscriber\n");
    std::fs::write(&deny_file, text).unwrap();
    let app = TestApp::spawn(test_settings(&up.running.base_url(), &dir.path().join("j"))).await;

    // A dry run finds them and removes nothing.
    let out = sweep_cli(&app, &deny_file, true).await;
    assert!(
        out.contains("137 on the deny list; 0 removed (dry run); 137 left"),
        "{out}"
    );
    assert!(
        out.contains("pass 1: 1000 subscribers listed in 5 pages, 137 on the deny list"),
        "{out}"
    );
    assert_eq!(up.emulator.subscribers("@TOA#_sweep").unwrap().len(), 1000);
    up.emulator.reset();
    up.emulator.seed(Seed {
        channels: vec![SeedChannel::new("@TOA#_sweep", members.clone())],
        ..Seed::default()
    });

    let out = sweep_cli(&app, &deny_file, false).await;
    // One pass to find them, one to confirm none is left.
    assert!(
        out.contains("137 on the deny list; 137 removed; 0 left"),
        "{out}"
    );
    assert!(
        out.contains("pass 1: 1000 subscribers listed in 5 pages, 137 on the deny list"),
        "{out}"
    );
    assert!(
        out.contains("pass 2: 863 subscribers listed in 5 pages, 0 on the deny list"),
        "{out}"
    );
    assert!(out.contains("confirmed"), "{out}");
    let left: HashSet<String> = up
        .emulator
        .subscribers("@TOA#_sweep")
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(left.len(), 863);
    assert!(denied.iter().all(|d| !left.contains(d)));
    let stats = up.emulator.stats();
    assert_eq!(stats.api("get_subscriber_info").calls, 10);
    assert_eq!(stats.api("delete_subscriber").calls, 2);

    // --json: the final report as one JSON object.
    let out = sweep_cli_args(&app, &deny_file, &["--dry-run", "--json"]).await;
    let report: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(report["state"], "done");
    assert_eq!(report["found"], 0);
    assert_eq!(report["confirmed"], true);
    assert_eq!(report["passes"][0]["listed"], 863);
    app.stop().await;
}

async fn sweep_cli(app: &TestApp, deny: &std::path::Path, dry_run: bool) -> String {
    sweep_cli_args(app, deny, if dry_run { &["--dry-run"] } else { &[] }).await
}

async fn sweep_cli_args(app: &TestApp, deny: &std::path::Path, extra: &[&str]) -> String {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_chat-janitor"));
    cmd.args([
        "sweep",
        "--channel",
        "@TOA#_sweep",
        "--url",
        &app.url(""),
        "--token",
        ADMIN_TOKEN,
        "--deny",
    ])
    .arg(deny)
    .args(extra);
    let out = cmd.output().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn a_ban_without_lists_is_resolved_upstream() {
    let up = TestUpstream::start().await;
    let channels: Vec<String> = (0..7).map(|i| format!("@TOA#_res{i}")).collect();
    let following = users("followed", 30);
    let followers = users("fan", 45);
    up.emulator.seed(Seed {
        channels: channels
            .iter()
            .map(|c| SeedChannel::new(c.clone(), ["target", "bystander"]))
            .chain([SeedChannel::new("@TOA#_other", ["bystander"])])
            .collect(),
        follows: std::iter::once(SeedFollow::new("target", following.clone()))
            .chain(
                followers
                    .iter()
                    .map(|f| SeedFollow::new(f.clone(), ["target", "bystander"])),
            )
            .collect(),
        ..Seed::default()
    });
    let dir = temp_dir();
    let mut settings = test_settings(&up.running.base_url(), dir.path());
    settings.rules.get_mut("user.banned").unwrap().resolve = true;
    let app = TestApp::spawn(settings).await;
    let r = app
        .post_event("res-1", "user.banned", json!({"user_id": "target"}))
        .await;
    assert_eq!(r.status(), 202);
    eventually(10, "every relationship removed", || async {
        channels
            .iter()
            .all(|c| up.emulator.subscribers(c).unwrap() == ["bystander"])
            && up.emulator.following("target").is_empty()
            && followers
                .iter()
                .all(|f| up.emulator.following(f) == ["bystander"])
    })
    .await;
    assert_eq!(
        up.emulator.subscribers("@TOA#_other").unwrap(),
        ["bystander"]
    );
    let stats = up.emulator.stats();
    assert!(stats.api("get_subscribed_official_account_list").calls >= 1);
    assert!(stats.api("follow_get").calls >= 2);
    app.stop().await;
}
