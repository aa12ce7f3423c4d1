//! Records of real events, from the pipeline: an applied ban lists every
//! channel and follow with its call; an account the vendor refuses is
//! dead-lettered with the vendor's code; a pending event says what it waits
//! for (its batch lingering, or the circuit while our credentials are
//! rejected).

use chat_janitor::emulator::{Seed, SeedChannel, SeedFollow};
use secrecy::SecretString;
use serde_json::{json, Value};

use crate::helpers::*;
use crate::pipeline::seed_channels;

async fn record(app: &TestApp, id: &str) -> (u16, Value) {
    let r = app
        .http
        .get(app.url(&format!("/v1/events/{id}")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The action of `record` on `api` and `target`.
fn action<'a>(record: &'a Value, api: &str, target: &str) -> &'a Value {
    record["actions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["api"] == api && a["target"] == target)
        .unwrap_or_else(|| panic!("no {api} on {target} in {record:#}"))
}

#[tokio::test]
async fn an_applied_ban_is_on_record_with_every_channel_and_follow() {
    let up = TestUpstream::start().await;
    up.emulator.seed(Seed {
        channels: vec![
            SeedChannel::new("@TOA#_ra", ["rec-u", "other"]),
            // Not a member: the removal is a no-op upstream.
            SeedChannel::new("@TOA#_rb", ["other"]),
        ],
        follows: vec![
            SeedFollow::new("rec-u", ["f1", "f2"]),
            SeedFollow::new("g1", ["rec-u"]),
        ],
        ..Seed::default()
    });
    let dir = temp_dir();
    let mut settings = test_settings(&up.running.base_url(), dir.path());
    settings.batching.linger_ms = 20;
    let app = TestApp::spawn(settings).await;
    let r = app
        .post_event(
            "rec-ban-1",
            "user.banned",
            json!({"user_id": "rec-u", "channels": ["@TOA#_ra", "@TOA#_rb"],
                   "following": ["f1", "f2"], "followers": ["g1"]}),
        )
        .await;
    assert_eq!(r.status(), 202);
    eventually(10, "the ban's record written", || async {
        record(&app, "rec-ban-1").await.1["status"] == "settled"
    })
    .await;
    let (status, rec) = record(&app, "rec-ban-1").await;
    assert_eq!(status, 200);
    assert_eq!(rec["id"], "rec-ban-1");
    assert_eq!(rec["type"], "user.banned");
    assert_eq!(rec["user_id"], "rec-u");
    assert_eq!(rec["source"], "webhook");
    assert!(rec["settled_at"].is_string(), "{rec:#}");
    assert_eq!(rec["actions"].as_array().unwrap().len(), 4, "{rec:#}");
    let a = action(&rec, "delete_subscriber", "@TOA#_ra");
    assert_eq!(a["result"], "applied");
    assert_eq!(a["accounts"], json!(["rec-u"]));
    let b = action(&rec, "delete_subscriber", "@TOA#_rb");
    assert_eq!(b["result"], "noop", "not a member: {b:#}");
    let f = action(&rec, "follow_delete", "rec-u");
    assert_eq!(f["accounts"], json!(["f1", "f2"]));
    assert_eq!(f["result"], "applied");
    let g = action(&rec, "follow_delete", "g1");
    assert_eq!(g["accounts"], json!(["rec-u"]));
    assert_eq!(g["result"], "applied");
    for a in rec["actions"].as_array().unwrap() {
        let call = &a["last_call"];
        assert!(
            call["at"].is_string(),
            "every action has its call time: {a:#}"
        );
        assert_eq!(call["error_code"], 0, "{a:#}");
        assert!(call["attempts"].as_u64().unwrap() >= 1, "{a:#}");
    }
    // And by user.
    let r = app
        .http
        .get(app.url("/v1/events?user_id=rec-u"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let list: Value = r.json().await.unwrap();
    let ids: Vec<&str> = list["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["rec-ban-1"]);
    app.stop().await;
}

#[tokio::test]
async fn an_account_the_vendor_refuses_is_dead_lettered_on_record_with_its_code() {
    let up = TestUpstream::start().await;
    let mut members = users("rr", 3);
    seed_channels(&up, &["@TOA#_rr".to_owned()], &members);
    members.push("bad account".to_owned());
    let dir = temp_dir();
    let mut settings = test_settings(&up.running.base_url(), dir.path());
    settings.batching.linger_ms = 20;
    let app = TestApp::spawn(settings).await;
    let r = app
        .post_event(
            "rec-bad-1",
            "account.deleted",
            json!({"user_id": "bad account", "channels": ["@TOA#_rr"]}),
        )
        .await;
    assert_eq!(r.status(), 202);
    eventually(10, "the record written", || async {
        record(&app, "rec-bad-1").await.1["status"] == "dead_lettered"
    })
    .await;
    let (_, rec) = record(&app, "rec-bad-1").await;
    let a = action(&rec, "delete_subscriber", "@TOA#_rr");
    assert_eq!(a["result"], "dead_lettered", "{rec:#}");
    let dead = &a["dead_lettered"][0];
    assert_eq!(dead["account"], "bad account");
    assert_eq!(dead["reason"], "bad_request");
    assert_eq!(dead["error_code"], 6017, "the vendor's ErrorCode: {dead:#}");
    assert!(
        dead["error_info"].as_str().unwrap().contains("6017"),
        "{dead:#}"
    );
    assert!(dead["at"].is_string());
    app.stop().await;
}

#[tokio::test]
async fn a_pending_event_says_its_batch_is_lingering() {
    let up = TestUpstream::start().await;
    seed_channels(&up, &["@TOA#_rp".to_owned()], &users("rp", 2));
    let dir = temp_dir();
    let mut settings = test_settings(&up.running.base_url(), dir.path());
    settings.batching.linger_ms = 60_000;
    let app = TestApp::spawn(settings).await;
    let r = app
        .post_event(
            "rec-wait-1",
            "user.banned",
            json!({"user_id": "rp0", "channels": ["@TOA#_rp"]}),
        )
        .await;
    assert_eq!(r.status(), 202);
    eventually(10, "the event in flight", || async {
        record(&app, "rec-wait-1").await.0 == 200
    })
    .await;
    let (_, rec) = record(&app, "rec-wait-1").await;
    assert_eq!(rec["status"], "pending", "{rec:#}");
    assert_eq!(rec["waiting_for"], "linger", "{rec:#}");
    assert!(rec["settled_at"].is_null());
    let a = action(&rec, "delete_subscriber", "@TOA#_rp");
    assert_eq!(a["result"], "pending");
    assert_eq!(a["counts"]["pending"], 1);
    app.stop().await;
}

#[tokio::test]
async fn a_pending_event_says_it_waits_for_the_circuit_while_credentials_are_rejected() {
    let up = TestUpstream::start().await;
    seed_channels(&up, &["@TOA#_rc".to_owned()], &users("rc", 2));
    let dir = temp_dir();
    let mut settings = test_settings(&up.running.base_url(), dir.path());
    settings.batching.linger_ms = 20;
    settings.tencent.secret_key = SecretString::from("a-rotated-away-key".to_owned());
    let app = TestApp::spawn(settings).await;
    let r = app
        .post_event(
            "rec-circ-1",
            "user.banned",
            json!({"user_id": "rc0", "channels": ["@TOA#_rc"]}),
        )
        .await;
    assert_eq!(r.status(), 202);
    eventually(10, "the circuit open and the record says so", || async {
        record(&app, "rec-circ-1").await.1["waiting_for"] == "circuit"
    })
    .await;
    let (_, rec) = record(&app, "rec-circ-1").await;
    assert_eq!(rec["status"], "pending");
    app.stop().await;
}
