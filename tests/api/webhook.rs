//! Every answer of `POST /v1/events` in the contract's table, each by a test.

use serde_json::json;

use crate::helpers::*;

const BODY: &str = r#"{"type":"user.banned","data":{"user_id":"e1","channels":["@TOA#_x"]}}"#;

async fn app() -> (TestUpstream, TestApp, tempfile::TempDir) {
    let up = TestUpstream::start().await;
    let dir = temp_dir();
    let app = TestApp::spawn(test_settings(&up.running.base_url(), dir.path())).await;
    (up, app, dir)
}

async fn problem(r: reqwest::Response) -> serde_json::Value {
    assert_eq!(
        r.headers()["content-type"].to_str().unwrap(),
        "application/problem+json"
    );
    r.json().await.unwrap()
}

#[tokio::test]
async fn accepted_then_duplicate() {
    let (_up, app, _dir) = app().await;
    let r = app.post_signed("msg_1", unix_now(), SECRET, BODY).await;
    assert_eq!(r.status(), 202);
    assert_eq!(
        r.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    assert_eq!(
        r.text().await.unwrap(),
        r#"{"id":"msg_1","status":"accepted"}"#
    );
    let r = app.post_signed("msg_1", unix_now(), SECRET, BODY).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.text().await.unwrap(),
        r#"{"id":"msg_1","status":"duplicate"}"#
    );
    assert_eq!(
        app.metric("chat_janitor_events_received_total{source=\"webhook\",type=\"user.banned\"}")
            .await,
        1.0
    );
    app.stop().await;
}

#[tokio::test]
async fn rotated_secrets_are_all_accepted() {
    let (_up, app, _dir) = app().await;
    assert_eq!(
        app.post_signed("rot-1", unix_now(), SECRET, BODY)
            .await
            .status(),
        202
    );
    assert_eq!(
        app.post_signed("rot-2", unix_now(), ROTATED_SECRET, BODY)
            .await
            .status(),
        202
    );
    // A list with a stale signature first and a valid one after.
    let ts = unix_now().to_string();
    let good =
        chat_janitor::ingest::signature::sign(&webhook_key(SECRET), "rot-3", &ts, BODY.as_bytes());
    let r = app
        .http
        .post(app.url("/v1/events"))
        .header("content-type", "application/json")
        .header("webhook-id", "rot-3")
        .header("webhook-timestamp", &ts)
        .header(
            "webhook-signature",
            format!("v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= v1a,xyz {good}"),
        )
        .body(BODY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    app.stop().await;
}

#[tokio::test]
async fn bad_and_missing_signatures_are_401() {
    let (_up, app, _dir) = app().await;
    let unknown = "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let r = app.post_signed("bad-1", unix_now(), unknown, BODY).await;
    assert_eq!(r.status(), 401);
    assert_eq!(problem(r).await["field"], "webhook-signature");

    for missing in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
        let ts = unix_now().to_string();
        let sig = chat_janitor::ingest::signature::sign(
            &webhook_key(SECRET),
            "m-1",
            &ts,
            BODY.as_bytes(),
        );
        let mut req = app
            .http
            .post(app.url("/v1/events"))
            .header("content-type", "application/json");
        for (h, v) in [
            ("webhook-id", "m-1".to_owned()),
            ("webhook-timestamp", ts.clone()),
            ("webhook-signature", sig.clone()),
        ] {
            if h != missing {
                req = req.header(h, v);
            }
        }
        let r = req.body(BODY).send().await.unwrap();
        assert_eq!(r.status(), 401, "{missing}");
        assert_eq!(problem(r).await["field"], missing);
    }
    // A body changed after signing.
    let ts = unix_now().to_string();
    let sig =
        chat_janitor::ingest::signature::sign(&webhook_key(SECRET), "t-1", &ts, BODY.as_bytes());
    let r = app
        .http
        .post(app.url("/v1/events"))
        .header("content-type", "application/json")
        .header("webhook-id", "t-1")
        .header("webhook-timestamp", ts)
        .header("webhook-signature", sig)
        .body(BODY.replace("e1", "e2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        app.metric(
            "chat_janitor_events_rejected_total{reason=\"signature_mismatch\",source=\"webhook\"}"
        )
        .await,
        2.0
    );
    app.stop().await;
}

#[tokio::test]
async fn stale_and_future_timestamps_are_401() {
    let (_up, app, _dir) = app().await;
    let r = app
        .post_signed("old-1", unix_now() - 301, SECRET, BODY)
        .await;
    assert_eq!(r.status(), 401);
    assert_eq!(problem(r).await["field"], "webhook-timestamp");
    let r = app
        .post_signed("new-1", unix_now() + 301, SECRET, BODY)
        .await;
    assert_eq!(r.status(), 401);
    // Inside the tolerance both ways is fine.
    assert_eq!(
        app.post_signed("ok-1", unix_now() - 250, SECRET, BODY)
            .await
            .status(),
        202
    );
    assert_eq!(
        app.post_signed("ok-2", unix_now() + 250, SECRET, BODY)
            .await
            .status(),
        202
    );
    app.stop().await;
}

#[tokio::test]
async fn malformed_json_and_schema_errors_are_400_naming_the_field() {
    let (_up, app, _dir) = app().await;
    let cases = [
        ("{not json", "(body)"),
        (r#"{"data":{"user_id":"1"}}"#, "type"),
        (r#"{"type":"user.banned"}"#, "data"),
        (r#"{"type":"user.banned","data":{}}"#, "data.user_id"),
        (
            r#"{"type":"user.banned","data":{"user_id":42}}"#,
            "data.user_id",
        ),
        (
            r#"{"type":"user.banned","data":{"user_id":"1","channels":"@TOA#_x"}}"#,
            "data.channels",
        ),
        (
            r#"{"type":"user.banned","data":{"user_id":"1","following":[1]}}"#,
            "data.following[0]",
        ),
        (
            r#"{"type":"user.banned","data":{"user_id":"1","channels":["x"]}}"#,
            "data.channels[0]",
        ),
    ];
    for (i, (body, field)) in cases.into_iter().enumerate() {
        let r = app
            .post_signed(&format!("bad-{i}"), unix_now(), SECRET, body)
            .await;
        assert_eq!(r.status(), 400, "{body}");
        let p = problem(r).await;
        assert_eq!(p["field"], field, "{body}");
        assert_eq!(p["status"], 400);
    }
    app.stop().await;
}

#[tokio::test]
async fn an_unknown_type_is_422() {
    let (_up, app, _dir) = app().await;
    let r = app
        .post_event("u-1", "user.promoted", json!({"user_id": "1"}))
        .await;
    assert_eq!(r.status(), 422);
    assert_eq!(problem(r).await["field"], "type");
    app.stop().await;
}

#[tokio::test]
async fn an_oversize_body_is_413() {
    let (_up, app, _dir) = app().await;
    let big = format!(
        r#"{{"type":"user.banned","data":{{"user_id":"1","pad":"{}"}}}}"#,
        "x".repeat(300_000)
    );
    let r = app.post_signed("big-1", unix_now(), SECRET, &big).await;
    assert_eq!(r.status(), 413);
    problem(r).await;
    app.stop().await;
}

#[tokio::test]
async fn a_body_that_is_not_json_is_415() {
    let (_up, app, _dir) = app().await;
    let ts = unix_now().to_string();
    let sig =
        chat_janitor::ingest::signature::sign(&webhook_key(SECRET), "ct-1", &ts, BODY.as_bytes());
    let r = app
        .http
        .post(app.url("/v1/events"))
        .header("content-type", "text/plain")
        .header("webhook-id", "ct-1")
        .header("webhook-timestamp", ts)
        .header("webhook-signature", sig)
        .body(BODY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    assert_eq!(problem(r).await["field"], "content-type");
    app.stop().await;
}

#[tokio::test]
async fn storage_refusing_is_503_with_retry_after_and_keeps_what_was_accepted() {
    let up = TestUpstream::start().await;
    up.emulator.seed(chat_janitor::emulator::Seed {
        channels: vec![chat_janitor::emulator::SeedChannel::new("@TOA#_x", ["e1"])],
        ..Default::default()
    });
    let dir = temp_dir();
    let app = TestApp::spawn(test_settings(&up.running.base_url(), dir.path())).await;
    assert_eq!(
        app.post_signed("s-1", unix_now(), SECRET, BODY)
            .await
            .status(),
        202
    );
    app.journal.as_ref().expect("embedded mode").close_intake();
    let r = app.post_signed("s-2", unix_now(), SECRET, BODY).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    problem(r).await;
    // What was accepted before still goes through.
    eventually(5, "the accepted event applied", || async {
        up.emulator.subscribers("@TOA#_x").unwrap().is_empty()
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn health_and_metrics_answer_from_startup() {
    let (_up, app, _dir) = app().await;
    assert_eq!(
        app.http
            .get(app.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        app.http
            .get(app.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let m = app.metrics().await;
    for series in [
        "chat_janitor_events_received_total{source=\"amqp\",type=\"tier.downgraded\"} 0",
        "chat_janitor_events_rejected_total{reason=\"too_large\",source=\"webhook\"} 0",
        "chat_janitor_upstream_requests_total{api=\"follow_delete\",error_code=\"0\"} 0",
        "chat_janitor_items_total{api=\"delete_subscriber\",result=\"dead_lettered\"} 0",
        "chat_janitor_pending_items{api=\"destroy_official_account\"} 0",
        "chat_janitor_dead_letters_total{reason=\"retries_exhausted\"} 0",
        "chat_janitor_event_settle_seconds_count 0",
        "chat_janitor_batch_items_count{api=\"delete_subscriber\"} 0",
        "chat_janitor_upstream_request_duration_seconds_count{api=\"delete_subscriber\"} 0",
    ] {
        assert!(m.contains(series), "missing at startup: {series}");
    }
    app.stop().await;
}
