//! The embedded pipeline end to end: signed webhooks in, coalesced calls out,
//! against the emulator, under faults.

use std::collections::HashSet;

use chat_janitor::emulator::{FaultRule, Faults, Seed, SeedChannel};
use secrecy::SecretString;
use serde_json::json;

use crate::helpers::*;

pub(crate) fn seed_channels(up: &TestUpstream, channels: &[String], members: &[String]) {
    up.emulator.seed(Seed {
        channels: channels
            .iter()
            .map(|c| SeedChannel::new(c.clone(), members.to_vec()))
            .collect(),
        ..Seed::default()
    });
}

#[tokio::test]
async fn a_ban_wave_is_coalesced_into_full_batches() {
    let up = TestUpstream::start().await;
    let channels: Vec<String> = (0..5).map(|i| format!("@TOA#_c{i}")).collect();
    let members = users("u", 400);
    seed_channels(&up, &channels, &members);
    let dir = temp_dir();
    let mut settings = test_settings(&up.running.base_url(), dir.path());
    // Full batches go out at once; the linger only bounds the last ones, and
    // is long enough that a slow machine's posts still fill the others.
    settings.batching.linger_ms = 2000;
    let app = TestApp::spawn(settings).await;

    let posts = members.iter().map(|u| {
        let app = &app;
        let channels = channels.clone();
        async move {
            let r = app
                .post_event(
                    &format!("ban-{u}"),
                    "user.banned",
                    json!({"user_id": u, "channels": channels}),
                )
                .await;
            assert_eq!(r.status(), 202);
        }
    });
    futures_util::future::join_all(posts).await;

    eventually(20, "every subscription removed", || async {
        channels
            .iter()
            .all(|c| up.emulator.subscribers(c).unwrap().is_empty())
    })
    .await;

    let calls: Vec<_> = up
        .emulator
        .calls()
        .into_iter()
        .filter(|c| c.api == "delete_subscriber")
        .collect();
    let minimum = channels.len() * 400usize.div_ceil(100);
    assert!(
        calls.len() <= 2 * minimum,
        "{} calls, minimum {minimum}",
        calls.len()
    );
    for c in &calls {
        assert!(c.accounts.len() <= 100);
        let distinct: HashSet<_> = c.accounts.iter().collect();
        assert_eq!(
            distinct.len(),
            c.accounts.len(),
            "an account twice in one call"
        );
    }
    assert!(app.dead_letters().await.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn unfollows_and_destroys_follow_the_rules() {
    let up = TestUpstream::start().await;
    up.emulator.seed(Seed {
        channels: vec![
            SeedChannel::new("@TOA#_a", ["gone", "stays"]),
            SeedChannel::new("@TOA#_mine", ["x", "y"]),
        ],
        follows: vec![
            chat_janitor::emulator::SeedFollow::new("gone", ["f1", "f2"]),
            chat_janitor::emulator::SeedFollow::new("g1", ["gone", "other"]),
        ],
        ..Seed::default()
    });
    let dir = temp_dir();
    let app = TestApp::spawn(test_settings(&up.running.base_url(), dir.path())).await;
    let r = app
        .post_event(
            "del-1",
            "account.deleted",
            json!({"user_id": "gone", "channels": ["@TOA#_a", "@TOA#_mine"],
                   "following": ["f1", "f2"], "followers": ["g1"], "owned_channels": ["@TOA#_mine"]}),
        )
        .await;
    assert_eq!(r.status(), 202);
    eventually(10, "account cleaned up", || async {
        up.emulator.subscribers("@TOA#_a").unwrap() == ["stays"]
            && !up.emulator.channel_exists("@TOA#_mine")
            && up.emulator.following("gone").is_empty()
            && up.emulator.following("g1") == ["other"]
    })
    .await;
    eventually(5, "settled", || async {
        app.metric("chat_janitor_pending_items{api=\"follow_delete\"}")
            .await
            == 0.0
    })
    .await;
    // Leaving a channel the same event destroys is never sent.
    assert!(up
        .emulator
        .calls()
        .iter()
        .all(|c| !(c.api == "delete_subscriber" && c.key.as_deref() == Some("@TOA#_mine"))));
    app.stop().await;
}

#[tokio::test]
async fn everything_is_applied_through_transient_faults() {
    let up = TestUpstream::start().await;
    let channels: Vec<String> = (0..3).map(|i| format!("@TOA#_f{i}")).collect();
    let members = users("v", 300);
    seed_channels(&up, &channels, &members);
    up.emulator.set_faults(Faults::new(vec![
        FaultRule::error_code(None, 10004).with_rate(0.20),
        FaultRule::http_status(None, 502).with_rate(0.02),
        FaultRule {
            item_failure_rate: 0.05,
            ..FaultRule::for_api(None)
        },
    ]));
    let dir = temp_dir();
    let mut settings = test_settings(&up.running.base_url(), dir.path());
    settings.batching.linger_ms = 50;
    let app = TestApp::spawn(settings).await;
    for (i, u) in members.iter().enumerate() {
        let following = if i % 10 == 0 {
            json!(["t1", "t2"])
        } else {
            json!([])
        };
        let r = app
            .post_event(
                &format!("f-{u}"),
                "user.banned",
                json!({"user_id": u, "channels": channels, "following": following}),
            )
            .await;
        assert_eq!(r.status(), 202);
    }
    eventually(30, "every subscription removed despite faults", || async {
        channels
            .iter()
            .all(|c| up.emulator.subscribers(c).unwrap().is_empty())
    })
    .await;
    eventually(10, "nothing pending", || async {
        app.metric("chat_janitor_pending_items{api=\"delete_subscriber\"}")
            .await
            == 0.0
            && app
                .metric("chat_janitor_pending_items{api=\"follow_delete\"}")
                .await
                == 0.0
    })
    .await;
    let stats = up.emulator.stats().api("delete_subscriber");
    assert!(stats.code("10004") > 0, "faults were injected: {stats:?}");
    assert!(
        stats.item_failures > 0,
        "item faults were injected: {stats:?}"
    );
    assert!(app.dead_letters().await.is_empty());
    let m = app.metrics().await;
    assert!(m.contains(
        "chat_janitor_upstream_requests_total{api=\"delete_subscriber\",error_code=\"10004\"}"
    ));
    assert!(m.contains("chat_janitor_upstream_requests_total{api=\"delete_subscriber\",error_code=\"http_502\"}") || stats.code("http_502") == 0);
    app.stop().await;
}

#[tokio::test]
async fn a_bad_account_is_isolated_and_dead_lettered_alone() {
    let up = TestUpstream::start().await;
    let mut members = users("w", 99);
    seed_channels(&up, &["@TOA#_iso".to_owned()], &members);
    members.insert(40, "bad account".to_owned());
    let dir = temp_dir();
    let mut settings = test_settings(&up.running.base_url(), dir.path());
    // Long enough that the batch only goes out once all 100 are in (it
    // fills then), however slowly this machine posts them.
    settings.batching.linger_ms = 30_000;
    let app = TestApp::spawn(settings).await;
    for u in &members {
        let r = app
            .post_event(
                &format!("iso-{u}"),
                "user.banned",
                json!({"user_id": u, "channels": ["@TOA#_iso"]}),
            )
            .await;
        assert_eq!(r.status(), 202, "{u}");
    }
    eventually(10, "the 99 removed", || async {
        up.emulator.subscribers("@TOA#_iso").unwrap().is_empty()
    })
    .await;
    eventually(5, "one dead letter", || async {
        app.dead_letters().await.len() == 1
    })
    .await;
    let dl = &app.dead_letters().await[0];
    assert_eq!(dl["reason"], "bad_request");
    assert_eq!(dl["action"]["user"], "bad account");
    assert!(dl["detail"].as_str().unwrap().contains("6017"), "{dl}");
    assert_eq!(dl["event_id"], "iso-bad account");
    // The journal filled the event in: the pipeline holds no bodies.
    assert_eq!(
        dl["event"],
        json!({
            "type": "user.banned",
            "timestamp": "2026-11-21T10:00:00Z",
            "data": {"user_id": "bad account", "channels": ["@TOA#_iso"]}
        })
    );
    assert_eq!(
        app.metric("chat_janitor_dead_letters_total{reason=\"bad_request\"}")
            .await,
        1.0
    );
    // The first call carried all 100 and was refused as a whole.
    let calls = up.emulator.calls();
    assert_eq!(calls[0].accounts.len(), 100);
    assert_eq!(calls[0].error_code, 6017);
    app.stop().await;
}

#[tokio::test]
async fn rejected_credentials_stop_dispatch_without_dead_letters() {
    let up = TestUpstream::start().await;
    let members = users("k", 20);
    seed_channels(&up, &["@TOA#_cred".to_owned()], &members);
    let dir = temp_dir();
    let mut settings = test_settings(&up.running.base_url(), dir.path());
    settings.tencent.secret_key = SecretString::from("a-rotated-away-key".to_owned());
    let app = TestApp::spawn(settings).await;
    for u in &members {
        let r = app
            .post_event(
                &format!("cred-{u}"),
                "user.banned",
                json!({"user_id": u, "channels": ["@TOA#_cred"]}),
            )
            .await;
        assert_eq!(r.status(), 202);
    }
    eventually(10, "readyz names the credentials", || async {
        let r = app.http.get(app.url("/readyz")).send().await.unwrap();
        r.status() == 503 && r.text().await.unwrap().contains("credentials")
    })
    .await;
    // Probes keep being refused; nothing is dead-lettered meanwhile.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(app.dead_letters().await.is_empty());
    assert_eq!(app.metric("chat_janitor_circuit_open").await, 1.0);
    assert_eq!(up.emulator.subscribers("@TOA#_cred").unwrap().len(), 20);
    app.stop().await;

    // The key fixed, a restart applies the backlog from the journal.
    let app = TestApp::spawn(test_settings(&up.running.base_url(), dir.path())).await;
    eventually(10, "backlog applied", || async {
        up.emulator.subscribers("@TOA#_cred").unwrap().is_empty()
    })
    .await;
    let r = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(app.dead_letters().await.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn dead_letters_can_be_replayed() {
    let up = TestUpstream::start().await;
    up.emulator.seed(Seed {
        channels: vec![SeedChannel::new("@TOA#_rp", ["r1"])],
        ..Seed::default()
    });
    // Every call fails with a code no table lists, so the item is
    // dead-lettered after max_attempts.
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
    let r = app
        .post_event(
            "rp-1",
            "user.banned",
            json!({"user_id": "r1", "channels": ["@TOA#_rp"]}),
        )
        .await;
    assert_eq!(r.status(), 202);
    eventually(10, "dead-lettered", || async {
        app.dead_letters().await.len() == 1
    })
    .await;
    assert_eq!(app.dead_letters().await[0]["reason"], "unknown_error");

    up.emulator.clear_faults();
    let r = app
        .http
        .post(app.url("/v1/admin/dead-letters/replay"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    eventually(10, "replayed and applied", || async {
        up.emulator.subscribers("@TOA#_rp").unwrap().is_empty()
    })
    .await;
    assert!(app.dead_letters().await.is_empty());
    // Without the token the admin routes refuse.
    let r = app
        .http
        .get(app.url("/v1/admin/dead-letters"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    app.stop().await;
}

/// A replayed action that fails again is dead-lettered again with the
/// event it came from: the journal reads it from the replay entry.
#[tokio::test]
async fn a_replayed_action_that_fails_again_keeps_its_event() {
    let up = TestUpstream::start().await;
    up.emulator.seed(Seed {
        channels: vec![SeedChannel::new("@TOA#_rp2", ["r2"])],
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
    let event = json!({"user_id": "r2", "channels": ["@TOA#_rp2"], "following": []});
    let r = app.post_event("rp2-1", "user.banned", event.clone()).await;
    assert_eq!(r.status(), 202);
    eventually(10, "dead-lettered", || async {
        app.dead_letters().await.len() == 1
    })
    .await;
    let first = app.dead_letters().await.remove(0);
    let want = json!({"type": "user.banned", "timestamp": "2026-11-21T10:00:00Z", "data": event});
    assert_eq!(first["event_id"], "rp2-1");
    assert_eq!(first["event"], want);
    let r = app
        .http
        .post(app.url("/v1/admin/dead-letters/replay"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    eventually(10, "dead-lettered again", || async {
        let l = app.dead_letters().await;
        l.len() == 1 && l[0]["id"] != first["id"]
    })
    .await;
    let again = app.dead_letters().await.remove(0);
    assert_eq!(again["event_id"], "rp2-1");
    assert_eq!(again["event"], want);
    assert_eq!(again["action"], first["action"]);
    app.stop().await;
}

#[tokio::test]
async fn the_limiter_keeps_every_second_within_the_rate() {
    // The emulator refuses the 51st call in any sliding second.
    let up = TestUpstream::start_with(chat_janitor::emulator::EmulatorConfig {
        sdkappid: SDKAPPID,
        secret_key: KEY.into(),
        admins: vec![ADMIN.into()],
        rate_per_api: 50,
        ..Default::default()
    })
    .await;
    let owned: Vec<String> = (0..100).map(|i| format!("@TOA#_own{i}")).collect();
    up.emulator.seed(Seed {
        channels: owned
            .iter()
            .map(|c| SeedChannel::new(c.clone(), ["x"]))
            .collect(),
        ..Seed::default()
    });
    let dir = temp_dir();
    let mut settings = test_settings(&up.running.base_url(), dir.path());
    settings.tencent.requests_per_second = 50;
    let app = TestApp::spawn(settings).await;
    let r = app
        .post_event(
            "own-1",
            "account.deleted",
            json!({"user_id": "owner", "channels": [], "owned_channels": owned}),
        )
        .await;
    assert_eq!(r.status(), 202);
    eventually(10, "100 channels destroyed", || async {
        owned.iter().all(|c| !up.emulator.channel_exists(c))
    })
    .await;
    let stats = up.emulator.stats().api("destroy_official_account");
    assert_eq!(stats.code("60007"), 0, "{stats:?}");
    assert!(stats.peak_calls_per_second <= 50, "{stats:?}");
    assert_eq!(stats.calls, 100);
    app.stop().await;
}

#[tokio::test]
async fn pending_work_in_memory_stays_within_its_bound() {
    let up = TestUpstream::start().await;
    // One action per event, each on its own channel: nothing coalesces, so
    // every action is a call and work piles up behind the rate limit.
    let channels: Vec<String> = (0..300).map(|i| format!("@TOA#_bp{i}")).collect();
    up.emulator.seed(Seed {
        channels: channels
            .iter()
            .map(|c| SeedChannel::new(c.clone(), ["victim"]))
            .collect(),
        ..Seed::default()
    });
    let dir = temp_dir();
    let mut settings = test_settings(&up.running.base_url(), dir.path());
    // 300 calls at 60/s: five seconds of backlog.
    settings.tencent.requests_per_second = 60;
    settings.dispatch.max_pending_items = 100;
    settings.batching.linger_ms = 10;
    let app = TestApp::spawn(settings).await;
    let (mut peak, mut journal_peak) = (0.0f64, 0.0f64);
    let sample = || async {
        (
            app.metric("chat_janitor_pending_items{api=\"delete_subscriber\"}")
                .await,
            app.metric("chat_janitor_journal_events").await,
        )
    };
    for (i, c) in channels.iter().enumerate() {
        let r = app
            .post_event(
                &format!("bp-{i}"),
                "user.banned",
                json!({"user_id": "victim", "channels": [c]}),
            )
            .await;
        assert_eq!(r.status(), 202);
        if i % 20 == 0 {
            let (p, j) = sample().await;
            (peak, journal_peak) = (peak.max(p), journal_peak.max(j));
        }
    }
    while !channels
        .iter()
        .all(|c| up.emulator.subscribers(c).unwrap().is_empty())
    {
        let (p, j) = sample().await;
        (peak, journal_peak) = (peak.max(p), journal_peak.max(j));
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(peak <= 100.0, "in memory: {peak}");
    assert!(
        journal_peak > 100.0,
        "the rest waited in the journal: {journal_peak}"
    );
    app.stop().await;
}

#[tokio::test]
async fn batches_keep_filling_while_the_limiter_holds_their_api() {
    let up = TestUpstream::start().await;
    let channels: Vec<String> = (0..5).map(|i| format!("@TOA#_sat{i}")).collect();
    let members = users("sat", 100);
    seed_channels(&up, &channels, &members);
    let dir = temp_dir();
    let mut settings = test_settings(&up.running.base_url(), dir.path());
    // A linger far shorter than it takes to post the events, and a slow
    // limiter: sealed at the linger, batches would go out a few accounts
    // each; kept open while earlier ones wait for the limiter, they fill.
    settings.batching.linger_ms = 20;
    settings.tencent.requests_per_second = 4;
    let app = TestApp::spawn(settings).await;
    for u in &members {
        for c in &channels {
            let r = app
                .post_event(
                    &format!("sat-{u}-{c}"),
                    "user.banned",
                    json!({"user_id": u, "channels": [c]}),
                )
                .await;
            assert_eq!(r.status(), 202);
        }
    }
    eventually(20, "all removed", || async {
        channels
            .iter()
            .all(|c| up.emulator.subscribers(c).unwrap().is_empty())
    })
    .await;
    let sizes: Vec<usize> = up
        .emulator
        .calls()
        .iter()
        .filter(|c| c.api == "delete_subscriber")
        .map(|c| c.accounts.len())
        .collect();
    // Sealed at the linger they would be dozens of calls of a few accounts.
    // Kept open, each free limiter slot takes a batch as full as it got: a
    // few partial ones while posting is under way, then full ones.
    let calls = sizes.len();
    assert!(
        calls <= 16,
        "{calls} calls for 500 removals (minimum 5): {sizes:?}"
    );
    app.stop().await;
}

/// A journal entry that no longer parses (written by an older version, or
/// accepted under another schema) goes through the same intake loop as a
/// broker message that does not parse: labelled `malformed`, kept as a
/// dead letter, never dropped, and the entries after it proceed.
#[tokio::test]
async fn an_unparseable_journal_entry_is_dead_lettered_as_malformed() {
    let up = TestUpstream::start().await;
    up.emulator.seed(Seed {
        channels: vec![SeedChannel::new("@TOA#_jm", ["j1"])],
        ..Seed::default()
    });
    let dir = temp_dir();
    let mut settings = test_settings(&up.running.base_url(), dir.path());
    settings.batching.linger_ms = 10;
    let app = TestApp::spawn(settings).await;
    let journal = app.journal.clone().expect("embedded mode");
    let bad = serde_json::to_vec(&json!({"type": "user.banned", "data": {}})).unwrap();
    journal.append("jm-bad", bad).await.unwrap();
    let r = app
        .post_event(
            "jm-good",
            "user.banned",
            json!({"user_id": "j1", "channels": ["@TOA#_jm"]}),
        )
        .await;
    assert_eq!(r.status(), 202);
    eventually(10, "the good event applied", || async {
        up.emulator.subscribers("@TOA#_jm").unwrap().is_empty()
    })
    .await;
    eventually(10, "the bad one dead-lettered", || async {
        app.dead_letters().await.len() == 1
    })
    .await;
    let dl = &app.dead_letters().await[0];
    assert_eq!(dl["reason"], "malformed");
    assert_eq!(dl["event_id"], "jm-bad");
    assert_eq!(
        app.metric("chat_janitor_events_rejected_total{reason=\"malformed\",source=\"webhook\"}")
            .await,
        1.0
    );
    app.stop().await;
}

/// A saturated API keeps its backlog as data, not as a parked task per
/// batch, and holds up no other API: 600 single-account `follow_delete`
/// batches wait for a 10 calls/s limiter while 300 removals from one
/// channel fill their three batches and go.
#[tokio::test]
async fn a_saturated_api_waits_as_data_and_holds_up_no_other_api() {
    let up = TestUpstream::start().await;
    let members = users("hol", 300);
    seed_channels(&up, &["@TOA#_hol".to_owned()], &members);
    let dir = temp_dir();
    let mut settings = test_settings(&up.running.base_url(), dir.path());
    settings.tencent.requests_per_second = 10;
    // Removals go when their batch is full, not at a linger; follow keys
    // past the first 50 go to the dispatcher at once.
    settings.batching.linger_ms = 5_000;
    settings.dispatch.max_open_keys = 50;
    let app = TestApp::spawn(settings).await;
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let idle = tasks();
    // Each follower is the From_Account of its own follow_delete.
    for i in 0..30 {
        let followers: Vec<String> = (0..20).map(|j| format!("fan{i}-{j}")).collect();
        let r = app
            .post_event(
                &format!("hol-f{i}"),
                "user.banned",
                json!({"user_id": format!("star{i}"), "channels": [], "followers": followers}),
            )
            .await;
        assert_eq!(r.status(), 202);
    }
    let follows_pending = || async {
        app.metric("chat_janitor_pending_items{api=\"follow_delete\"}")
            .await
    };
    eventually(10, "the follow backlog in the pipeline", || async {
        follows_pending().await >= 550.0
    })
    .await;
    let busy = tasks();
    assert!(
        busy < idle + 100,
        "{busy} tasks alive with 600 batches waiting ({idle} idle): batches wait as tasks"
    );
    for u in &members {
        let r = app
            .post_event(
                &format!("hol-{u}"),
                "user.banned",
                json!({"user_id": u, "channels": ["@TOA#_hol"]}),
            )
            .await;
        assert_eq!(r.status(), 202);
    }
    eventually(10, "the removals applied", || async {
        up.emulator.subscribers("@TOA#_hol").unwrap().is_empty()
    })
    .await;
    let backlog = follows_pending().await;
    assert!(
        backlog > 300.0,
        "the follow backlog was still there ({backlog} left), behind its own limiter"
    );
    let sizes: Vec<usize> = up
        .emulator
        .calls()
        .iter()
        .filter(|c| c.api == "delete_subscriber")
        .map(|c| c.accounts.len())
        .collect();
    assert_eq!(sizes, [100, 100, 100]);
    // Dropped without waiting for the follow backlog: shutdown would give it
    // its full grace.
}
