//! Event records in broker mode, with real `serve` replicas on one RabbitMQ
//! queue (the harness of `replicas`): the active replica publishes each
//! record to the stream `<queue>.records`, every replica answers it from
//! its own copy, and the record outlives a kill -9 of the replica that
//! wrote it. With `[callbacks] exchange` the records also reach a queue
//! bound to that exchange. Deadlines are generous; nothing asserts a speed.

use std::time::Duration;

use chat_janitor::emulator::{Seed, SeedChannel};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use serde_json::Value;

use crate::helpers::{eventually, TestUpstream, ADMIN_TOKEN, AMQP_URL, BROKER};
use crate::replicas::{publish_bans, queue_name, upstream, Cluster, REPLICAS};

const LINGER_MS: u64 = 50;
const CHANNEL: &str = "@TOA#_brec";

/// `GET /v1/events/{id}` on the replica at `base`: status and body.
async fn record(base: &str, id: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .get(format!("{base}/v1/events/{id}"))
        .bearer_auth(ADMIN_TOKEN)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Waits until the replica at `base` answers `id`'s settled record.
async fn settled_record(base: &str, id: &str) -> Value {
    eventually(60, &format!("{id}'s settled record at {base}"), || async {
        let (code, r) = record(base, id).await;
        code == 200 && r["status"] == "settled"
    })
    .await;
    record(base, id).await.1
}

fn seed(up: &TestUpstream, users: &[&str]) {
    up.emulator.seed(Seed {
        channels: vec![SeedChannel::new(CHANNEL, users.iter().copied())],
        ..Seed::default()
    });
}

fn ban(user: &str) -> (String, Vec<String>) {
    (user.to_owned(), vec![CHANNEL.to_owned()])
}

/// The record of a ban of `user` published with prefix `brec`.
fn assert_ban_record(r: &Value, user: &str) {
    assert_eq!(r["id"], format!("brec-{user}"), "{r:#}");
    assert_eq!(r["source"], "amqp", "{r:#}");
    assert_eq!(r["user_id"], user, "{r:#}");
    let a = &r["actions"][0];
    assert_eq!(a["api"], "delete_subscriber", "{r:#}");
    assert_eq!(a["target"], CHANNEL, "{r:#}");
    assert_eq!(a["result"], "applied", "{r:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_survives_the_failover_of_the_active_replica() {
    let _broker = BROKER.read().await;
    let _lock = REPLICAS.lock().await;
    let up = upstream().await;
    seed(&up, &["bu1", "bu2", "other"]);
    let queue = queue_name("brec");
    let mut cluster = Cluster::new(&queue);
    let env = [("CHAT_JANITOR__ADMIN__TOKEN", ADMIN_TOKEN)];
    for _ in 0..2 {
        cluster.add(&up, LINGER_MS, &env).await;
    }
    let all = cluster.all();
    let leader = cluster
        .wait_sole_active(&all, 30, "exactly one of two replicas active")
        .await;
    let standby = cluster.others(leader)[0];
    let on_leader = cluster.replicas[leader].url("");
    let on_standby = cluster.replicas[standby].url("");

    publish_bans(&queue, "brec", &[ban("bu1")]).await;
    // Written by the leader, read on the standby (which never settled it).
    let first = settled_record(&on_standby, "brec-bu1").await;
    assert_ban_record(&first, "bu1");
    assert_eq!(
        cluster.replicas[standby].proxy.count(),
        0,
        "the standby made no upstream call: the leader settled the event"
    );
    assert_eq!(record(&on_leader, "brec-bu1").await, (200, first.clone()));

    cluster.replicas[leader].kill9();
    assert_eq!(
        record(&on_standby, "brec-bu1").await,
        (200, first.clone()),
        "the survivor answers the record the dead replica wrote"
    );
    cluster
        .wait_sole_active(&[standby], 60, "the survivor takes over")
        .await;

    publish_bans(&queue, "brec", &[ban("bu2")]).await;
    let second = settled_record(&on_standby, "brec-bu2").await;
    assert_ban_record(&second, "bu2");

    // A replica started now rebuilds its copy from the stream: it answers
    // both, the one the dead replica wrote and the one the survivor wrote.
    let late = cluster.add(&up, LINGER_MS, &env).await;
    let on_late = cluster.replicas[late].url("");
    assert_eq!(settled_record(&on_late, "brec-bu1").await, first);
    assert_eq!(settled_record(&on_late, "brec-bu2").await, second);
    let r = reqwest::Client::new()
        .get(format!("{on_late}/v1/events?user_id=bu2"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let listed: Value = r.json().await.unwrap();
    assert_eq!(listed["events"][0]["id"], "brec-bu2", "{listed:#}");
    assert_eq!(listed["events"].as_array().unwrap().len(), 1, "{listed:#}");

    let order = [late, standby];
    cluster.stop_all(&order).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_id_in_broker_mode_is_404_and_may_be_queued() {
    let _broker = BROKER.read().await;
    let _lock = REPLICAS.lock().await;
    let up = upstream().await;
    let queue = queue_name("b404");
    let mut cluster = Cluster::new(&queue);
    let env = [
        ("CHAT_JANITOR__ADMIN__TOKEN", ADMIN_TOKEN),
        ("CHAT_JANITOR__RECORDS__RETENTION", "2days"),
    ];
    let i = cluster.add(&up, LINGER_MS, &env).await;
    let base = cluster.replicas[i].url("");
    let (code, body) = record(&base, "never-sent").await;
    assert_eq!(code, 404, "{body:#}");
    assert_eq!(body["may_be_queued"], true, "{body:#}");
    assert_eq!(body["may_have_expired"], true, "{body:#}");
    assert_eq!(body["retention"], "2days", "{body:#}");
    assert_eq!(body["id"], "never-sent", "{body:#}");

    // The stream carries the retention: the broker takes a declaration with
    // the same arguments and refuses one with another age or size.
    let stream = format!("{queue}.records");
    let gib = 1i64 << 30;
    assert!(
        declares(&stream, "172800s", gib).await,
        "the same arguments"
    );
    assert!(
        !declares(&stream, "1s", gib).await,
        "x-max-age is the retention"
    );
    assert!(
        !declares(&stream, "172800s", gib / 2).await,
        "x-max-length-bytes is max_bytes"
    );
    cluster.stop_all(&[i]).await;
}

/// Whether the broker accepts declaring `stream` with these retention
/// arguments (it refuses arguments unlike an existing queue's).
async fn declares(stream: &str, max_age: &str, max_bytes: i64) -> bool {
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    let long = |s: &str| AMQPValue::LongString(LongString::from(s));
    args.insert(ShortString::from("x-queue-type"), long("stream"));
    args.insert(ShortString::from("x-max-age"), long(max_age));
    args.insert(
        ShortString::from("x-max-length-bytes"),
        AMQPValue::LongLongInt(max_bytes),
    );
    args.insert(
        ShortString::from("x-stream-max-segment-size-bytes"),
        AMQPValue::LongLongInt(max_bytes / 16),
    );
    let ok = ch
        .queue_declare(
            ShortString::from(stream),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .is_ok();
    let _ = conn.close(200, ShortString::from("bye")).await;
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_reach_a_queue_bound_to_the_callbacks_exchange() {
    let _broker = BROKER.read().await;
    let _lock = REPLICAS.lock().await;
    let up = upstream().await;
    seed(&up, &["bx1", "other"]);
    let queue = queue_name("bxch");
    let exchange = format!("{queue}.fate");
    // Bound before the service runs, so nothing is published unrouted.
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        ShortString::from(exchange.as_str()),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let sink = ch
        .queue_declare(
            ShortString::from(""),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    ch.queue_bind(
        sink.name().clone(),
        ShortString::from(exchange.as_str()),
        ShortString::from("event.*"),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut consumer = ch
        .basic_consume(
            sink.name().clone(),
            ShortString::from(""),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let mut cluster = Cluster::new(&queue);
    let env = [
        ("CHAT_JANITOR__ADMIN__TOKEN", ADMIN_TOKEN),
        ("CHAT_JANITOR__CALLBACKS__EXCHANGE", exchange.as_str()),
    ];
    let i = cluster.add(&up, LINGER_MS, &env).await;
    cluster
        .wait_sole_active(&[i], 30, "the replica active")
        .await;
    publish_bans(&queue, "brec", &[ban("bx1")]).await;

    let d = tokio::time::timeout(Duration::from_secs(60), consumer.next())
        .await
        .expect("a record on the exchange within a minute")
        .expect("the consumer runs")
        .unwrap();
    d.acker.ack(BasicAckOptions::default()).await.unwrap();
    assert_eq!(d.routing_key.as_str(), "event.settled");
    let body: Value = serde_json::from_slice(&d.data).unwrap();
    assert_eq!(body["type"], "event.settled", "{body:#}");
    assert_ban_record(&body["data"], "bx1");
    assert_eq!(
        d.properties.message_id().as_ref().map(|m| m.as_str()),
        Some("fate_brec-bx1_settled"),
        "the callback's webhook-id, for consumers to dedupe"
    );
    // The same record is on the stream, answered by id.
    let stored = settled_record(&cluster.replicas[i].url(""), "brec-bx1").await;
    assert_eq!(stored, body["data"]);

    cluster.stop_all(&[i]).await;
    if let Ok(ch) = conn.create_channel().await {
        let _ = ch
            .exchange_delete(ShortString::from(exchange.as_str()), Default::default())
            .await;
    }
    let _ = conn.close(200, ShortString::from("bye")).await;
}
