//! Event records and completion callbacks with the real app: records put
//! through the store's public API (as the pipeline will put them when its
//! events settle) are answered by both routes and by `chat-janitor status`;
//! unknown and expired ids get their 404; callbacks reach a real receiver
//! that verifies them by the Standard Webhooks rules, across a time it
//! refuses connections, and are dead-lettered once past `max_age`.

use std::time::Duration;

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chat_janitor::domain::clock::unix_ms;
use chat_janitor::domain::{Action, DeadLetterReason, Source};
use std::sync::Arc;

use chat_janitor::fate::{EventRecord, ItemOutcome, RulesBook, Settled, SettledEvent, Status};
use chat_janitor::rules::{default_rules, RuleChannels, Rules};
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use serde_json::{json, Value};
use sha2::Sha256;

use crate::helpers::*;

const READ_TOKEN: &str = "test-read-token";
const BIN: &str = env!("CARGO_BIN_EXE_chat-janitor");

fn ok(at: u64, result: Settled) -> ItemOutcome {
    ItemOutcome {
        result,
        error_code: 0,
        error_info: None,
        at_unix_ms: at,
        attempts: 1,
    }
}

/// An applied ban: two channels (one already left: a noop), two follows,
/// one follower.
fn ban(id: &str, user: &str) -> SettledEvent {
    let u = uid(user);
    let plan = vec![
        Action::Unsubscribe {
            channel: chan("@TOA#_news"),
            user: u.clone(),
        },
        Action::Unsubscribe {
            channel: chan("@TOA#_deals"),
            user: u.clone(),
        },
        Action::Unfollow {
            from: u.clone(),
            to: uid("user1"),
        },
        Action::Unfollow {
            from: u.clone(),
            to: uid("user2"),
        },
        Action::Unfollow {
            from: uid("user3"),
            to: u.clone(),
        },
    ];
    let t0 = unix_ms();
    kept(
        (id, Source::Webhook, "user.banned", u.as_str()),
        t0,
        plan,
        vec![
            ok(t0 + 210, Settled::Applied),
            ok(t0 + 211, Settled::Noop),
            ok(t0 + 220, Settled::Applied),
            ok(t0 + 220, Settled::Applied),
            ok(t0 + 230, Settled::Applied),
        ],
    )
}

/// A settled event as the pipeline hands it to the store: its body, the
/// plan kept (so these records do not depend on the rules), and how each
/// item settled, in plan order.
fn kept(
    (id, source, kind, user): (&str, Source, &str, &str),
    accepted_at_ms: u64,
    plan: Vec<Action>,
    outcomes: Vec<ItemOutcome>,
) -> SettledEvent {
    SettledEvent {
        id: id.into(),
        source,
        kind: kind.into(),
        accepted_at_ms,
        settled_at_ms: outcomes
            .iter()
            .map(|o| o.at_unix_ms)
            .max()
            .unwrap_or(accepted_at_ms),
        dead_lettered: outcomes
            .iter()
            .any(|o| matches!(o.result, Settled::DeadLettered(_))),
        rules: 0,
        body: json!({"type": kind, "data": {"user_id": user}})
            .to_string()
            .into_bytes(),
        plan: Some(plan),
        outcomes: outcomes
            .into_iter()
            .enumerate()
            .map(|(i, o)| (i as u32, o))
            .collect(),
    }
}

/// The record the routes answer for `e`.
fn rec(e: &SettledEvent) -> EventRecord {
    let rules = Rules::new(default_rules(), &RuleChannels::default());
    e.record(&RulesBook::new(Arc::new(rules)))
        .expect("a kept plan makes a record")
}

/// A deletion of which the vendor refused one follow (20001).
fn refused(id: &str, user: &str) -> SettledEvent {
    let u = uid(user);
    let plan = vec![
        Action::Unfollow {
            from: u.clone(),
            to: uid("good"),
        },
        Action::Unfollow {
            from: u.clone(),
            to: uid("bad"),
        },
    ];
    let t0 = unix_ms();
    kept(
        (id, Source::Amqp, "account.deleted", u.as_str()),
        t0,
        plan,
        vec![
            ok(t0 + 5, Settled::Applied),
            ItemOutcome {
                result: Settled::DeadLettered(DeadLetterReason::BadRequest),
                error_code: 20001,
                error_info: Some("invalid To_Account".into()),
                at_unix_ms: t0 + 9,
                attempts: 3,
            },
        ],
    )
}

async fn get(app: &TestApp, path: &str, token: Option<&str>) -> (u16, String, Value) {
    let mut req = app.http.get(app.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, ct, r.json().await.unwrap_or(Value::Null))
}

async fn spawn(
    dir: &std::path::Path,
    up: &TestUpstream,
    f: impl FnOnce(&mut chat_janitor::config::Settings),
) -> TestApp {
    let mut s = test_settings(&up.running.base_url(), dir);
    s.records.read_token = READ_TOKEN.to_owned().into();
    f(&mut s);
    TestApp::spawn(s).await
}

#[tokio::test]
async fn settled_records_are_answered_by_id_and_by_user_behind_either_token() {
    let up = TestUpstream::start().await;
    let dir = temp_dir();
    let app = spawn(dir.path(), &up, |_| {}).await;
    let store = app.fate.clone().expect("embedded mode keeps records");
    let first = ban("msg_ban", "107867");
    // Accepted later, so listed first.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let second = refused("msg_del", "107867");
    store.put(first.clone());
    store.put(second.clone());
    store.put(ban("msg_other", "someone"));

    let (code, _, body) = get(&app, "/v1/events/msg_ban", Some(ADMIN_TOKEN)).await;
    assert_eq!(code, 200);
    assert_eq!(body, serde_json::to_value(rec(&first)).unwrap());
    // Every channel and follow, each applied or noop with its call time.
    let actions = body["actions"].as_array().unwrap();
    let summary: Vec<(&str, &str, &str)> = actions
        .iter()
        .map(|a| {
            (
                a["api"].as_str().unwrap(),
                a["target"].as_str().unwrap(),
                a["result"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("delete_subscriber", "@TOA#_news", "applied"),
            ("delete_subscriber", "@TOA#_deals", "noop"),
            ("follow_delete", "107867", "applied"),
            ("follow_delete", "user3", "applied"),
        ]
    );
    assert_eq!(actions[2]["accounts"], json!(["user1", "user2"]));
    assert!(actions
        .iter()
        .all(|a| a["last_call"]["at"].as_str().unwrap().ends_with('Z')));

    // The refused account: dead-lettered with the vendor's code.
    let (code, _, body) = get(&app, "/v1/events/msg_del", Some(READ_TOKEN)).await;
    assert_eq!(code, 200, "the read token reads records");
    assert_eq!(body["status"], "dead_lettered");
    assert_eq!(body["source"], "amqp");
    let dl = &body["actions"][0]["dead_lettered"][0];
    assert_eq!(dl["account"], "bad");
    assert_eq!(dl["reason"], "bad_request");
    assert_eq!(dl["error_code"], 20001);
    assert_eq!(dl["error_info"], "invalid To_Account");

    // By user, newest first; the limit holds.
    let (code, _, body) = get(&app, "/v1/events?user_id=107867", Some(ADMIN_TOKEN)).await;
    assert_eq!(code, 200);
    assert_eq!(body["user_id"], "107867");
    let ids: Vec<&str> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["msg_del", "msg_ban"]);
    let (_, _, body) = get(&app, "/v1/events?user_id=107867&limit=1", Some(READ_TOKEN)).await;
    assert_eq!(body["events"].as_array().unwrap().len(), 1);
    let (_, _, body) = get(&app, "/v1/events?user_id=nobody", Some(READ_TOKEN)).await;
    assert_eq!(body["events"], json!([]));
    let (code, ct, body) = get(&app, "/v1/events", Some(READ_TOKEN)).await;
    assert_eq!((code, ct.as_str()), (400, "application/problem+json"));
    assert_eq!(body["field"], "user_id");

    // An unknown id: 404, saying records expire.
    let (code, ct, body) = get(&app, "/v1/events/msg_never", Some(ADMIN_TOKEN)).await;
    assert_eq!((code, ct.as_str()), (404, "application/problem+json"));
    assert_eq!(body["title"], "No such event");
    assert_eq!(body["id"], "msg_never");
    assert_eq!(body["retention"], "7days");
    assert_eq!(body["may_have_expired"], true);
    assert_eq!(body["may_be_queued"], false);
    assert!(body["detail"].as_str().unwrap().contains("kept for 7days"));

    // Tokens: none or a wrong one is 401; the read token reads nothing else.
    assert_eq!(get(&app, "/v1/events/msg_ban", None).await.0, 401);
    assert_eq!(get(&app, "/v1/events/msg_ban", Some("nope")).await.0, 401);
    assert_eq!(
        get(&app, "/v1/events?user_id=107867", Some("nope")).await.0,
        401
    );
    assert_eq!(
        get(&app, "/v1/admin/dead-letters", Some(READ_TOKEN))
            .await
            .0,
        401
    );
    // POST /v1/events is untouched by the guard on GET.
    let r = app
        .post_event(
            "msg_post",
            "user.banned",
            json!({"user_id": "x", "channels": ["@TOA#_x"]}),
        )
        .await;
    assert_eq!(r.status(), 202);
    app.stop().await;
}

#[tokio::test]
async fn the_status_command_prints_a_record_or_says_there_is_none() {
    let up = TestUpstream::start().await;
    let dir = temp_dir();
    let app = spawn(dir.path(), &up, |_| {}).await;
    let store = app.fate.clone().unwrap();
    let record = refused("msg_del", "107867");
    store.put(record.clone());
    let base = app.url("");
    let status = |args: Vec<String>| async move {
        tokio::process::Command::new(BIN)
            .arg("status")
            .args(args)
            .env_remove("CHAT_JANITOR__ADMIN__TOKEN")
            .output()
            .await
            .unwrap()
    };
    let args = |id: &str, token: &str, json: bool| {
        let mut v = vec![
            id.to_owned(),
            "--url".to_owned(),
            base.clone(),
            "--token".to_owned(),
            token.to_owned(),
        ];
        if json {
            v.push("--json".to_owned());
        }
        v
    };
    let out = status(args("msg_del", READ_TOKEN, false)).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("event msg_del: account.deleted from amqp, user 107867\n"),
        "{text}"
    );
    assert!(
        text.contains("  follow_delete 107867: mixed (1 applied, 1 dead-lettered)\n"),
        "{text}"
    );
    assert!(text.contains("      accounts: good, bad\n"), "{text}");
    assert!(
        text.contains("      dead-lettered bad: bad_request, ErrorCode 20001 (invalid To_Account)"),
        "{text}"
    );
    let out = status(args("msg_del", ADMIN_TOKEN, true)).await;
    assert_eq!(out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v, serde_json::to_value(rec(&record)).unwrap());
    let out = status(args("msg_never", ADMIN_TOKEN, false)).await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("no record of event msg_never"), "{err}");
    let out = status(args("msg_del", "wrong", false)).await;
    assert_eq!(out.status.code(), Some(1));
    // No token at all: a usage error.
    let out = status(vec!["msg_del".to_owned(), "--url".to_owned(), base.clone()]).await;
    assert_eq!(out.status.code(), Some(2));
    app.stop().await;
}

#[tokio::test]
async fn records_expire_after_the_retention() {
    let up = TestUpstream::start().await;
    let dir = temp_dir();
    let app = spawn(dir.path(), &up, |s| {
        s.records.retention = Duration::from_secs(2);
    })
    .await;
    let store = app.fate.clone().unwrap();
    store.put(ban("msg_short", "107867"));
    assert_eq!(
        get(&app, "/v1/events/msg_short", Some(ADMIN_TOKEN)).await.0,
        200
    );
    eventually(20, "the record expired", || async {
        get(&app, "/v1/events/msg_short", Some(ADMIN_TOKEN)).await.0 == 404
    })
    .await;
    let (_, _, body) = get(&app, "/v1/events/msg_short", Some(ADMIN_TOKEN)).await;
    assert_eq!(body["retention"], "2s");
    assert_eq!(body["may_have_expired"], true);
    let (_, _, body) = get(&app, "/v1/events?user_id=107867", Some(ADMIN_TOKEN)).await;
    assert_eq!(body["events"], json!([]));
    // And its file goes whole: nothing kept on disk.
    eventually(20, "the record's file deleted", || async {
        app.metric("chat_janitor_records_stored").await == 0.0
    })
    .await;
    app.stop().await;
}

// ---- callbacks

/// A callback as the receiver saw it.
#[derive(Debug, Clone)]
pub(crate) struct Got {
    pub(crate) msg_id: String,
    pub(crate) body: Value,
    pub(crate) verified: bool,
}

#[derive(Default)]
pub(crate) struct Seen {
    pub(crate) got: Mutex<Vec<Got>>,
    /// Answer 503 to this many verified callbacks first.
    pub(crate) reject_first: Mutex<usize>,
}

/// The Standard Webhooks rules as the `standardwebhooks` libraries apply
/// them, written out here rather than taken from the service: HMAC-SHA256
/// with the secret's decoded key over `{id}.{timestamp}.{body}`, any `v1,`
/// entry of the list, the timestamp within 5 minutes either way.
fn verify(secret: &str, id: &str, ts: &str, signatures: &str, body: &[u8]) -> bool {
    let Ok(t) = ts.parse::<i64>() else {
        return false;
    };
    if (unix_now() - t).abs() > 300 || id.is_empty() {
        return false;
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(&webhook_key(secret)).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    let expected = STANDARD.encode(mac.finalize().into_bytes());
    signatures
        .split(' ')
        .filter_map(|s| s.strip_prefix("v1,"))
        .any(|s| s == expected)
}

async fn receive(req: HttpRequest, body: web::Bytes, seen: web::Data<Seen>) -> HttpResponse {
    let h = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let (id, ts, sigs) = (
        h("webhook-id"),
        h("webhook-timestamp"),
        h("webhook-signature"),
    );
    let verified = verify(SECRET, &id, &ts, &sigs, &body);
    seen.got.lock().push(Got {
        msg_id: id,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        verified,
    });
    if !verified {
        return HttpResponse::BadRequest().finish();
    }
    let mut reject = seen.reject_first.lock();
    if *reject > 0 {
        *reject -= 1;
        return HttpResponse::ServiceUnavailable().finish();
    }
    HttpResponse::NoContent().finish()
}

/// A port nothing listens on (yet): connections to it are refused.
pub(crate) fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Starts the receiver on `port`; returns its handle.
pub(crate) fn start_receiver(port: u16, seen: web::Data<Seen>) -> actix_web::dev::ServerHandle {
    let listener =
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is free again");
    let server = HttpServer::new(move || {
        App::new()
            .app_data(seen.clone())
            .route("/hook", web::post().to(receive))
    })
    .listen(listener)
    .unwrap()
    .workers(1)
    .disable_signals()
    .run();
    let handle = server.handle();
    tokio::spawn(server);
    handle
}

fn callbacks_on(s: &mut chat_janitor::config::Settings, port: u16) {
    s.callbacks.url = format!("http://127.0.0.1:{port}/hook");
    s.callbacks.secret = Some(chat_janitor::domain::WebhookKey::decode(SECRET).unwrap());
    s.callbacks.max_backoff = Duration::from_millis(500);
}

#[tokio::test]
async fn callbacks_reach_a_receiver_that_was_down_each_verified_and_one_id_per_record() {
    let up = TestUpstream::start().await;
    let dir = temp_dir();
    let port = free_port();
    let app = spawn(dir.path(), &up, |s| callbacks_on(s, port)).await;
    let store = app.fate.clone().unwrap();
    let mut records: Vec<SettledEvent> = (0..20)
        .map(|i| {
            if i % 5 == 4 {
                refused(&format!("msg_{i}"), &format!("u{i}"))
            } else {
                ban(&format!("msg_{i}"), &format!("u{i}"))
            }
        })
        .collect();
    for r in &records {
        store.put(r.clone());
    }
    // The receiver refuses connections for a while.
    eventually(20, "attempts while the receiver is down", || async {
        app.metric("chat_janitor_callback_deliveries_total{result=\"unreachable\"}")
            .await
            >= 20.0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        app.metric("chat_janitor_callback_deliveries_total{result=\"delivered\"}")
            .await,
        0.0
    );
    assert!(
        app.metric("chat_janitor_callback_oldest_pending_seconds")
            .await
            >= 1.0
    );
    // Up, answering 503 to its first few, then 204.
    let seen = web::Data::new(Seen::default());
    *seen.reject_first.lock() = 3;
    let receiver = start_receiver(port, seen.clone());
    let delivered = |seen: &web::Data<Seen>| {
        let got = seen.got.lock();
        let mut ids: Vec<String> = got
            .iter()
            .filter(|g| g.verified)
            .map(|g| g.body["data"]["id"].as_str().unwrap_or("").to_owned())
            .collect();
        ids.sort();
        ids.dedup();
        ids.len()
    };
    eventually(60, "every callback delivered", || async {
        delivered(&seen) == 20
    })
    .await;
    // One more while it is up.
    let late = ban("msg_late", "u_late");
    store.put(late.clone());
    records.push(late);
    eventually(30, "the late callback delivered", || async {
        delivered(&seen) == 21
    })
    .await;

    let got = seen.got.lock().clone();
    assert!(got.iter().all(|g| g.verified), "every callback verifies");
    for r in records.iter().map(rec) {
        let copies: Vec<&Got> = got
            .iter()
            .filter(|g| g.body["data"]["id"] == r.id.as_str())
            .collect();
        assert!(!copies.is_empty(), "{} never arrived", r.id);
        let outcome = if r.status == Status::DeadLettered {
            "dead_lettered"
        } else {
            "settled"
        };
        for c in &copies {
            assert_eq!(
                c.msg_id,
                format!("fate_{}_{outcome}", r.id),
                "one id per record"
            );
            assert_eq!(c.body["type"], format!("event.{outcome}"));
            assert_eq!(c.body["data"], serde_json::to_value(&r).unwrap());
            assert_eq!(c.body["timestamp"], c.body["data"]["settled_at"]);
        }
    }
    assert_eq!(
        app.metric("chat_janitor_callback_deliveries_total{result=\"rejected\"}")
            .await,
        3.0
    );
    assert!(
        app.metric("chat_janitor_callback_deliveries_total{result=\"delivered\"}")
            .await
            >= 21.0
    );
    eventually(10, "nothing pending", || async {
        app.metric("chat_janitor_callback_oldest_pending_seconds")
            .await
            == 0.0
    })
    .await;
    assert_eq!(
        app.metric("chat_janitor_dead_letters_total{reason=\"callback_expired\"}")
            .await,
        0.0
    );
    app.stop().await;
    receiver.stop(true).await;
}

#[tokio::test]
async fn undelivered_callbacks_are_sent_after_a_restart() {
    let up = TestUpstream::start().await;
    let dir = temp_dir();
    let port = free_port();
    let app = spawn(dir.path(), &up, |s| callbacks_on(s, port)).await;
    let store = app.fate.clone().unwrap();
    for i in 0..5 {
        store.put(ban(&format!("msg_r{i}"), "u"));
    }
    eventually(20, "attempts while the receiver is down", || async {
        app.metric("chat_janitor_callback_deliveries_total{result=\"unreachable\"}")
            .await
            >= 5.0
    })
    .await;
    app.stop().await;
    let seen = web::Data::new(Seen::default());
    let receiver = start_receiver(port, seen.clone());
    let app = spawn(dir.path(), &up, |s| callbacks_on(s, port)).await;
    eventually(30, "every callback delivered after the restart", || async {
        let got = seen.got.lock();
        (0..5).all(|i| {
            got.iter()
                .any(|g| g.verified && g.msg_id == format!("fate_msg_r{i}_settled"))
        })
    })
    .await;
    app.stop().await;
    receiver.stop(true).await;
}

#[tokio::test]
async fn a_receiver_down_past_max_age_gets_a_callback_expired_dead_letter() {
    let up = TestUpstream::start().await;
    let dir = temp_dir();
    let port = free_port();
    let app = spawn(dir.path(), &up, |s| {
        callbacks_on(s, port);
        s.callbacks.max_age = Duration::from_secs(2);
        s.callbacks.max_backoff = Duration::from_millis(200);
    })
    .await;
    let store = app.fate.clone().unwrap();
    let record = refused("msg_lost", "107867");
    store.put(record.clone());
    eventually(30, "the callback dead-lettered", || async {
        app.dead_letters()
            .await
            .iter()
            .any(|d| d["reason"] == "callback_expired")
    })
    .await;
    let dls = app.dead_letters().await;
    let dl = dls
        .iter()
        .find(|d| d["reason"] == "callback_expired")
        .unwrap();
    assert_eq!(dl["event_id"], "msg_lost");
    assert_eq!(dl["event_type"], "account.deleted");
    assert_eq!(dl["action"], Value::Null);
    assert_eq!(dl["event"], serde_json::to_value(rec(&record)).unwrap());
    let detail = dl["detail"].as_str().unwrap();
    assert!(
        detail.contains("fate_msg_lost_dead_lettered") && detail.contains("cannot connect"),
        "{detail}"
    );
    assert_eq!(
        app.metric("chat_janitor_dead_letters_total{reason=\"callback_expired\"}")
            .await,
        1.0
    );
    eventually(10, "nothing pending", || async {
        app.metric("chat_janitor_callback_oldest_pending_seconds")
            .await
            == 0.0
    })
    .await;
    app.stop().await;
}
