//! Broker mode against the real RabbitMQ on 127.0.0.1:5672. Each test uses
//! its own queue; they take a shared lock because one of them restarts the
//! broker application.

use std::time::Duration;

use chat_janitor::emulator::{Seed, SeedChannel};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;

use crate::helpers::*;

fn queue_name(test: &str) -> String {
    format!("cj-test-{test}-{:08x}", rand::random::<u32>())
}

fn broker_settings(
    upstream: &str,
    dir: &std::path::Path,
    queue: &str,
) -> chat_janitor::config::Settings {
    let mut s = test_settings(upstream, dir);
    s.amqp.url = secrecy::SecretString::from(AMQP_URL.to_owned());
    s.amqp.queue = queue.to_owned();
    s.amqp.prefetch = 500;
    s.batching.linger_ms = 50;
    s
}

/// A producer of our own: persistent messages, publisher confirms.
struct Producer {
    _conn: Connection,
    channel: lapin::Channel,
    queue: String,
}

impl Producer {
    async fn new(queue: &str) -> Producer {
        let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .expect("the broker at 127.0.0.1:5672 is running");
        let channel = conn.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        Producer {
            _conn: conn,
            channel,
            queue: queue.to_owned(),
        }
    }

    async fn publish(&self, id: &str, body: &[u8]) {
        self.channel
            .basic_publish(
                ShortString::from(""),
                ShortString::from(self.queue.as_str()),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default()
                    .with_message_id(ShortString::from(id))
                    .with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Publishes bans for every user back to back, then waits for all the
    /// confirms (as a real producer batches its publishes).
    async fn ban_all(&self, users: &[String], channels: &[&str]) {
        let mut confirms = Vec::with_capacity(users.len());
        for u in users {
            let body = json!({"type": "user.banned", "data": {"user_id": u, "channels": channels}});
            confirms.push(
                self.channel
                    .basic_publish(
                        ShortString::from(""),
                        ShortString::from(self.queue.as_str()),
                        BasicPublishOptions::default(),
                        body.to_string().as_bytes(),
                        BasicProperties::default()
                            .with_message_id(ShortString::from(format!("amqp-{u}").as_str()))
                            .with_delivery_mode(2),
                    )
                    .await
                    .unwrap(),
            );
        }
        for c in confirms {
            c.await.unwrap();
        }
    }

    async fn ban(&self, user: &str, channels: &[&str]) {
        let body = json!({"type": "user.banned", "data": {"user_id": user, "channels": channels}});
        self.publish(&format!("amqp-{user}"), body.to_string().as_bytes())
            .await;
    }
}

fn seed(up: &TestUpstream, channel: &str, members: &[String]) {
    up.emulator.seed(Seed {
        channels: vec![SeedChannel::new(channel, members.to_vec())],
        ..Seed::default()
    });
}

#[tokio::test]
async fn a_thousand_persistent_events_are_all_applied() {
    let _lock = BROKER.read().await;
    let up = TestUpstream::start().await;
    let members = users("p", 1000);
    seed(&up, "@TOA#_q1", &members);
    seed(&up, "@TOA#_q2", &members);
    let queue = queue_name("thousand");
    let dir = temp_dir();
    let mut settings = broker_settings(&up.running.base_url(), dir.path(), &queue);
    // Full batches go out at once; the linger only bounds the last ones.
    settings.batching.linger_ms = 1000;
    let app = TestApp::spawn(settings).await;
    app.wait_ready().await;
    let producer = Producer::new(&queue).await;
    producer.ban_all(&members, &["@TOA#_q1", "@TOA#_q2"]).await;
    eventually(30, "all 2,000 subscriptions removed", || async {
        up.emulator.subscribers("@TOA#_q1").unwrap().is_empty()
            && up.emulator.subscribers("@TOA#_q2").unwrap().is_empty()
    })
    .await;
    eventually(10, "every delivery settled", || async {
        app.metric("chat_janitor_pending_items{api=\"delete_subscriber\"}")
            .await
            == 0.0
    })
    .await;
    assert_eq!(
        app.metric("chat_janitor_events_received_total{source=\"amqp\",type=\"user.banned\"}")
            .await,
        1000.0
    );
    // Coalesced: one call per account would be 2,000. (Exact fill depends on
    // how fast the producer publishes; the embedded test and the benchmark
    // measure it.)
    let calls = up.emulator.stats().api("delete_subscriber").calls;
    assert!(calls < 200, "{calls} calls for 2,000 removals");
    app.stop().await;
    assert_eq!(
        message_count(&queue).await,
        0,
        "the queue ends empty, nothing unacked"
    );
    delete_queues(&queue).await;
}

#[tokio::test]
async fn bad_messages_go_to_the_dead_letter_queue_and_the_rest_proceed() {
    let _lock = BROKER.read().await;
    let up = TestUpstream::start().await;
    let members = users("d", 50);
    seed(&up, "@TOA#_dl", &members);
    let queue = queue_name("bad");
    let dir = temp_dir();
    let app = TestApp::spawn(broker_settings(&up.running.base_url(), dir.path(), &queue)).await;
    app.wait_ready().await;
    let producer = Producer::new(&queue).await;
    for (i, u) in members.iter().enumerate() {
        if i == 10 {
            producer.publish("not-json", b"this is not JSON").await;
        }
        if i == 30 {
            producer
                .publish(
                    "no-user",
                    br#"{"type":"user.banned","data":{"channels":["@TOA#_dl"]}}"#,
                )
                .await;
        }
        producer.ban(u, &["@TOA#_dl"]).await;
    }
    eventually(20, "the valid ones applied", || async {
        up.emulator.subscribers("@TOA#_dl").unwrap().is_empty()
    })
    .await;
    eventually(10, "both bad messages dead-lettered", || async {
        message_count(&format!("{queue}.dead")).await == 2
    })
    .await;
    assert_eq!(
        app.metric("chat_janitor_events_rejected_total{reason=\"malformed\",source=\"amqp\"}")
            .await,
        2.0
    );
    app.stop().await;
    assert_eq!(message_count(&queue).await, 0);
    delete_queues(&queue).await;
}

#[tokio::test]
async fn webhooks_travel_through_the_broker() {
    let _lock = BROKER.read().await;
    let up = TestUpstream::start().await;
    let members = users("h", 30);
    seed(&up, "@TOA#_wh", &members);
    let queue = queue_name("webhook");
    let dir = temp_dir();
    let app = TestApp::spawn(broker_settings(&up.running.base_url(), dir.path(), &queue)).await;
    app.wait_ready().await;
    for u in &members {
        let r = app
            .post_event(
                &format!("wh-{u}"),
                "user.banned",
                json!({"user_id": u, "channels": ["@TOA#_wh"]}),
            )
            .await;
        assert_eq!(r.status(), 202);
    }
    // The same id again: this replica remembers it.
    let r = app
        .post_event(
            "wh-h0",
            "user.banned",
            json!({"user_id": "h0", "channels": ["@TOA#_wh"]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    eventually(20, "applied", || async {
        up.emulator.subscribers("@TOA#_wh").unwrap().is_empty()
    })
    .await;
    assert_eq!(
        app.metric("chat_janitor_events_received_total{source=\"amqp\",type=\"user.banned\"}")
            .await,
        30.0,
        "each webhook was consumed back from the queue"
    );
    // The journal is not used in broker mode.
    assert!(!dir.path().join("journal.redb").exists());
    app.stop().await;
    delete_queues(&queue).await;
}

#[tokio::test]
async fn two_replicas_on_one_queue_are_one_dispatcher() {
    let _lock = BROKER.read().await;
    let up = TestUpstream::start().await;
    let members = users("r", 2000);
    seed(&up, "@TOA#_rep", &members);
    let queue = queue_name("replicas");
    let (d1, d2) = (temp_dir(), temp_dir());
    let mut s1 = broker_settings(&up.running.base_url(), d1.path(), &queue);
    let mut s2 = broker_settings(&up.running.base_url(), d2.path(), &queue);
    // Each is configured with the whole budget: only one dispatches.
    s1.tencent.requests_per_second = 200;
    s2.tencent.requests_per_second = 200;
    s1.amqp.prefetch = 200;
    s2.amqp.prefetch = 200;
    let a = TestApp::spawn(s1).await;
    let b = TestApp::spawn(s2).await;
    for app in [&a, &b] {
        app.wait_ready().await;
    }
    // The leader knows at once, with no work flowing.
    eventually(20, "exactly one replica active", || async {
        a.metric("chat_janitor_dispatch_active").await
            + b.metric("chat_janitor_dispatch_active").await
            == 1.0
    })
    .await;
    let producer = Producer::new(&queue).await;
    producer.ban_all(&members, &["@TOA#_rep"]).await;
    eventually(30, "the whole stream applied", || async {
        up.emulator.subscribers("@TOA#_rep").unwrap().is_empty()
    })
    .await;
    let ra = a
        .metric("chat_janitor_events_received_total{source=\"amqp\",type=\"user.banned\"}")
        .await;
    let rb = b
        .metric("chat_janitor_events_received_total{source=\"amqp\",type=\"user.banned\"}")
        .await;
    assert!(
        ra == 0.0 || rb == 0.0,
        "only the active replica consumed: {ra} + {rb}"
    );
    assert!(ra + rb >= 2000.0);
    let calls = "chat_janitor_upstream_requests_total{api=\"delete_subscriber\",error_code=\"0\"}";
    let (ca, cb) = (a.metric(calls).await, b.metric(calls).await);
    assert!(
        ca == 0.0 || cb == 0.0,
        "a standby calls nothing upstream: {ca} + {cb}"
    );
    a.stop().await;
    b.stop().await;
    assert_eq!(message_count(&queue).await, 0);
    delete_queues(&queue).await;
}

#[tokio::test]
async fn a_broker_restart_mid_stream_loses_nothing() {
    let _lock = BROKER.write().await;
    let up = TestUpstream::start().await;
    let members = users("b", 400);
    let channels = ["@TOA#_rs0", "@TOA#_rs1", "@TOA#_rs2", "@TOA#_rs3"];
    for c in channels {
        seed(&up, c, &members);
    }
    let queue = queue_name("restart");
    let dir = temp_dir();
    let mut settings = broker_settings(&up.running.base_url(), dir.path(), &queue);
    // Slow enough that deliveries are still unacked when the broker stops.
    settings.tencent.requests_per_second = 4;
    let app = TestApp::spawn(settings).await;
    app.wait_ready().await;
    {
        let producer = Producer::new(&queue).await;
        for u in &members[..200] {
            producer.ban(u, &channels).await;
        }
    }
    eventually(10, "work in flight", || async {
        app.metric("chat_janitor_pending_items{api=\"delete_subscriber\"}")
            .await
            > 0.0
    })
    .await;
    rabbitmqctl("stop_app");
    // Whatever happens below, the broker is started again for the others.
    let _restart = StartAppOnDrop;
    eventually(10, "readyz says the broker is unreachable", || async {
        let r = app.http.get(app.url("/readyz")).send().await.unwrap();
        r.status() == 503 && r.text().await.unwrap().contains("broker")
    })
    .await;
    rabbitmqctl("start_app");
    let producer = loop {
        // The broker takes a moment to accept connections again.
        match tokio::time::timeout(
            Duration::from_secs(2),
            Connection::connect(AMQP_URL, ConnectionProperties::default()),
        )
        .await
        {
            Ok(Ok(_)) => break Producer::new(&queue).await,
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    for u in &members[200..] {
        producer.ban(u, &channels).await;
    }
    eventually(
        60,
        "every event before and after the restart applied",
        || async {
            channels
                .iter()
                .all(|c| up.emulator.subscribers(c).unwrap().is_empty())
        },
    )
    .await;
    eventually(20, "ready again, nothing pending", || async {
        app.http
            .get(app.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status()
            == 200
            && app
                .metric("chat_janitor_pending_items{api=\"delete_subscriber\"}")
                .await
                == 0.0
    })
    .await;
    app.stop().await;
    assert_eq!(message_count(&queue).await, 0);
    delete_queues(&queue).await;
    // The tests after this one declare new streams (records), which a
    // broker just restarted may not take yet: they wait for nothing else.
    wait_streams_usable().await;
}

/// Waits (up to a minute) until RabbitMQ declares a new stream and
/// confirms a publish to it.
async fn wait_streams_usable() {
    use lapin::options::QueueDeleteOptions;
    use lapin::types::{AMQPValue, LongString};
    let name = format!("cj-probe-{}", std::process::id());
    eventually(60, "a new stream usable after the restart", || async {
        let Ok(conn) = Connection::connect(AMQP_URL, ConnectionProperties::default()).await else {
            return false;
        };
        let usable = async {
            let ch = conn.create_channel().await.ok()?;
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .ok()?;
            ch.queue_declare(
                ShortString::from(name.as_str()),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                chat_janitor::inbox::broker::table(&[(
                    "x-queue-type",
                    AMQPValue::LongString(LongString::from("stream")),
                )]),
            )
            .await
            .ok()?;
            let confirm = ch
                .basic_publish(
                    ShortString::from(""),
                    ShortString::from(name.as_str()),
                    Default::default(),
                    b"probe",
                    BasicProperties::default(),
                )
                .await
                .ok()?;
            let ok = confirm.await.ok()?.is_ack();
            let _ = ch
                .queue_delete(
                    ShortString::from(name.as_str()),
                    QueueDeleteOptions::default(),
                )
                .await;
            Some(ok)
        };
        let ok = tokio::time::timeout(Duration::from_secs(5), usable)
            .await
            .ok()
            .flatten()
            == Some(true);
        let _ = conn.close(200, ShortString::from("bye")).await;
        ok
    })
    .await;
}

fn rabbitmqctl(cmd: &str) {
    let status = std::process::Command::new("rabbitmqctl")
        .arg(cmd)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("rabbitmqctl is installed");
    assert!(status.success(), "rabbitmqctl {cmd}");
}

struct StartAppOnDrop;

impl Drop for StartAppOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .arg("start_app")
            .stdout(std::process::Stdio::null())
            .status();
    }
}

#[tokio::test]
async fn without_a_broker_webhooks_get_503_and_readyz_says_why() {
    let up = TestUpstream::start().await;
    let dir = temp_dir();
    let mut settings = broker_settings(&up.running.base_url(), dir.path(), "cj-test-nowhere");
    // Nothing listens there.
    settings.amqp.url =
        secrecy::SecretString::from("amqp://guest:guest@127.0.0.1:1/%2f".to_owned());
    let app = TestApp::spawn(settings).await;
    let r = app
        .post_event(
            "nb-1",
            "user.banned",
            json!({"user_id": "u", "channels": ["@TOA#_x"]}),
        )
        .await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let r = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.text().await.unwrap().contains("broker unreachable"));
    assert_eq!(app.metric("chat_janitor_broker_connected").await, 0.0);
    app.stop().await;
}

#[tokio::test]
async fn an_existing_classic_queue_is_used_as_it_is() {
    let _lock = BROKER.read().await;
    let up = TestUpstream::start().await;
    let members = users("cl", 20);
    seed(&up, "@TOA#_classic", &members);
    let queue = queue_name("classic");
    // A team's existing queue: classic, durable, no arguments.
    {
        let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.queue_declare(
            ShortString::from(queue.as_str()),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    let dir = temp_dir();
    let app = TestApp::spawn(broker_settings(&up.running.base_url(), dir.path(), &queue)).await;
    app.wait_ready().await;
    let producer = Producer::new(&queue).await;
    producer.ban_all(&members, &["@TOA#_classic"]).await;
    eventually(
        20,
        "consumed from the classic queue and applied",
        || async { up.emulator.subscribers("@TOA#_classic").unwrap().is_empty() },
    )
    .await;
    app.stop().await;
    assert_eq!(message_count(&queue).await, 0);
    delete_queues(&queue).await;
}

/// Broker mode's admin dead-letter routes: a dead-lettered action and a
/// message rejected at intake are listed (twice, the same: listing consumes
/// nothing), and a replay after the fault is gone applies the action and
/// leaves only the malformed message listed.
#[tokio::test]
async fn dead_letters_are_listed_and_replayed_in_broker_mode() {
    let _lock = BROKER.read().await;
    let up = TestUpstream::start().await;
    seed(&up, "@TOA#_bdl", &["b1".to_owned()]);
    up.emulator
        .set_faults(chat_janitor::emulator::Faults::new(vec![
            chat_janitor::emulator::FaultRule::error_code(Some("delete_subscriber"), 99999),
        ]));
    let queue = queue_name("bdl");
    let dir = temp_dir();
    let mut settings = broker_settings(&up.running.base_url(), dir.path(), &queue);
    settings.dispatch.max_attempts = 2;
    let app = TestApp::spawn(settings).await;
    app.wait_ready().await;
    let producer = Producer::new(&queue).await;
    producer.publish("bdl-bad", b"not json").await;
    producer.ban("b1", &["@TOA#_bdl"]).await;
    eventually(30, "both listed", || async {
        app.dead_letters().await.len() == 2
    })
    .await;
    let listed = app.dead_letters().await;
    assert_eq!(listed, app.dead_letters().await, "listing is stable");
    let action = listed
        .iter()
        .find(|d| d["dead_letter"]["reason"] == "unknown_error")
        .expect("the action's dead letter is listed");
    // The delivery's receipt filled in the event: the pipeline holds no
    // bodies.
    assert_eq!(action["dead_letter"]["event_id"], "amqp-b1");
    assert_eq!(
        action["dead_letter"]["event"],
        json!({"type": "user.banned", "data": {"user_id": "b1", "channels": ["@TOA#_bdl"]}})
    );
    assert!(
        listed.iter().any(|d| d["reason"] == "malformed"),
        "the rejected message is listed: {listed:?}"
    );
    up.emulator.clear_faults();
    let r = app
        .http
        .post(app.url("/v1/admin/dead-letters/replay"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"ids": [action["id"]]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    eventually(30, "the replayed action applied", || async {
        up.emulator.subscribers("@TOA#_bdl").unwrap().is_empty()
    })
    .await;
    eventually(10, "only the malformed one still listed", || async {
        let l = app.dead_letters().await;
        l.len() == 1 && l[0]["reason"] == "malformed"
    })
    .await;
    app.stop().await;
    delete_queues(&queue).await;
}
