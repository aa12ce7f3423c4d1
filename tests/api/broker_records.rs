//! Event records in broker mode, with real `serve` replicas on one RabbitMQ
//! queue (the harness of `replicas`): the active replica publishes each
//! record to the stream `<queue>.records`, every replica answers it from
//! its own copy, and the record outlives a kill -9 of the replica that
//! wrote it. With `[callbacks] exchange` the records also reach a queue
//! bound to that exchange. With `[callbacks] url` they are POSTed from the
//! callback queue by whichever replica holds them, and outlive a kill -9 of
//! that replica. Deadlines are generous; nothing asserts a speed.

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

use actix_web::web;
use chat_janitor::domain::clock::unix_ms;
use chat_janitor::domain::WebhookKey;
use chat_janitor::fate::callbacks::queue::{
    callback_queue_name, declare_callback_queue, properties,
};
use chat_janitor::fate::callbacks::{Callback, CallbackOptions, Callbacks, Tries};
use chat_janitor::inbox::broker::{BrokerDeadLetters, BrokerLink};
use chat_janitor::telemetry::Metrics;
use secrecy::SecretString;
use serde_json::json;

use crate::fate::{free_port, start_receiver, Seen};
use crate::helpers::{
    delete_queues, eventually, message_count, TestUpstream, ADMIN_TOKEN, AMQP_URL, BROKER, SECRET,
};
use crate::replicas::{
    assert_none_left, publish_bans, queue_depth, queue_name, upstream, wait_queue_empty, Cluster,
    REPLICAS,
};

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
    let env = [("CHAT_JANITOR__ADMIN__TOKEN", ADMIN_TOKEN)];
    let (mut cluster, leader) = Cluster::pair(&queue, &up, LINGER_MS, &env).await;
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

/// The replicas' summed `callback_deliveries_total{result}`.
async fn deliveries(cluster: &Cluster, among: &[usize], result: &str) -> Vec<f64> {
    let label = format!("result=\"{result}\"");
    let mut v = Vec::new();
    for &i in among {
        let n = cluster.replicas[i]
            .metric("chat_janitor_callback_deliveries_total", &[&label])
            .await;
        v.push(n.unwrap_or(0.0));
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_callbacks_in_broker_mode_outlive_the_replica_that_held_them() {
    let _broker = BROKER.read().await;
    let _lock = REPLICAS.lock().await;
    let users = ["cb0", "cb1", "cb2", "cb3", "cb4", "cb5"];
    let up = upstream().await;
    seed(&up, &users);
    let queue = queue_name("bcb");
    // The receiver is down (connections refused) until the kill.
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let env = [
        ("CHAT_JANITOR__ADMIN__TOKEN", ADMIN_TOKEN),
        ("CHAT_JANITOR__CALLBACKS__URL", url.as_str()),
        ("CHAT_JANITOR__CALLBACKS__SECRET", SECRET),
        ("CHAT_JANITOR__CALLBACKS__MAX_BACKOFF", "500ms"),
    ];
    let (mut cluster, leader) = Cluster::pair(&queue, &up, LINGER_MS, &env).await;
    let all = cluster.all();
    let bans: Vec<_> = users.iter().map(|u| ban(u)).collect();
    publish_bans(&queue, "brec", &bans).await;

    // Every callback is attempted while the receiver is down; each is
    // held by whichever replica RabbitMQ gave it to.
    let callbacks = format!("{queue}.callbacks");
    eventually(
        60,
        "every callback published, held and attempted",
        || async {
            let tried: f64 = deliveries(&cluster, &all, "unreachable").await.iter().sum();
            let delivered: f64 = deliveries(&cluster, &all, "delivered").await.iter().sum();
            assert_eq!(delivered, 0.0, "nothing can be delivered yet");
            // All on the queue (ready and unacked), none ready: each is held
            // in some replica's window.
            tried >= users.len() as f64
                && queue_depth(&callbacks) == Some(users.len() as u64)
                && message_count(&callbacks).await == 0
        },
    )
    .await;
    let tried = deliveries(&cluster, &all, "unreachable").await;
    // The replica that holds some of them dies (the leader, if both do).
    let victim = if tried[leader] > 0.0 {
        leader
    } else {
        all.iter().copied().find(|&i| tried[i] > 0.0).unwrap()
    };
    let survivor = cluster.others(victim)[0];
    cluster.replicas[victim].kill9();

    let seen = web::Data::new(Seen::default());
    let receiver = start_receiver(port, seen.clone());
    eventually(60, "every callback delivered by the survivor", || async {
        let got = seen.got.lock();
        users.iter().all(|u| {
            got.iter()
                .any(|g| g.verified && g.msg_id == format!("fate_brec-{u}_settled"))
        })
    })
    .await;
    let got = seen.got.lock().clone();
    assert!(got.iter().all(|g| g.verified), "every callback verifies");
    for u in users {
        let c = got
            .iter()
            .find(|g| g.msg_id == format!("fate_brec-{u}_settled"))
            .unwrap();
        assert_eq!(c.body["type"], "event.settled", "{:#}", c.body);
        assert_ban_record(&c.body["data"], u);
        assert_eq!(c.body["timestamp"], c.body["data"]["settled_at"]);
    }
    assert!(
        deliveries(&cluster, &[survivor], "delivered").await[0] >= users.len() as f64,
        "the survivor delivered them all, the dead replica's included"
    );

    // Acked once delivered: nothing is left, ready or unacked.
    wait_queue_empty(&callbacks, 30).await;
    cluster.stop_all(&[survivor]).await;
    assert_none_left(&callbacks).await;
    receiver.stop(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_held_past_hold_is_handed_on_with_its_attempts_then_expires_once() {
    let _broker = BROKER.read().await;
    let queue = queue_name("bcbh");
    let link = BrokerLink::new(SecretString::from(AMQP_URL), queue.clone(), 10, 10);
    let callbacks_queue = callback_queue_name(&queue);
    let conn = link.connection().await.unwrap();
    declare_callback_queue(&conn, &callbacks_queue)
        .await
        .unwrap();
    // A dead-letter consumer first, so the dead letter is seen.
    let ch = conn.create_channel().await.unwrap();
    let mut dead = ch
        .basic_consume(
            ShortString::from(format!("{queue}.dead").as_str()),
            ShortString::from(""),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let metrics = Metrics::new(["account.deleted"]);
    let opts = CallbackOptions {
        url: format!("http://127.0.0.1:{}/hook", free_port()),
        key: WebhookKey::decode(SECRET).unwrap(),
        max_age: Duration::from_secs(5),
        max_backoff: Duration::from_millis(200),
    };
    let callbacks = Callbacks::start_queue(
        link.clone(),
        BrokerDeadLetters::start(link.clone()),
        opts,
        metrics.clone(),
        Duration::from_secs(1),
    )
    .unwrap();
    // What the replica that settled an event publishes.
    let callback = Callback {
        msg_id: "fate_held-1_dead_lettered".into(),
        event_id: "held-1".into(),
        event_type: "account.deleted".into(),
        body: br#"{"type":"event.dead_lettered","timestamp":"t","data":{"id":"held-1"}}"#.to_vec(),
        settled_ms: unix_ms(),
    };
    link.publish(
        "",
        &callbacks_queue,
        &callback.body,
        properties(&callback, &Tries::default(), None),
    )
    .await
    .unwrap();

    let d = tokio::time::timeout(Duration::from_secs(30), dead.next())
        .await
        .expect("a dead letter within 30 s")
        .unwrap()
        .unwrap();
    d.acker.ack(BasicAckOptions::default()).await.unwrap();
    let dl: Value = serde_json::from_slice(&d.data).unwrap();
    assert_eq!(dl["reason"], "callback_expired", "{dl:#}");
    assert_eq!(dl["event_id"], "held-1");
    assert_eq!(dl["event_type"], "account.deleted");
    assert_eq!(
        dl["event"],
        json!({"id": "held-1"}),
        "the record, from the body"
    );
    // Held a second at a time, it was handed on several times, and the
    // copies carried the attempts: the dead letter counts every attempt
    // this process made, not only those since the last copy.
    assert!(
        callbacks.handed_on() >= 2,
        "handed on {}",
        callbacks.handed_on()
    );
    let text = metrics.render();
    let attempts = text
        .lines()
        .find(|l| l.starts_with("chat_janitor_callback_deliveries_total{result=\"unreachable\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap()
        .to_owned();
    let detail = dl["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!("({attempts} attempts; last: cannot connect)")),
        "{detail} (attempts made: {attempts})"
    );
    // Acked once its dead letter was confirmed (ready and unacked: none).
    wait_queue_empty(&callbacks_queue, 30).await;
    callbacks.stop().await;
    assert_none_left(&callbacks_queue).await;
    assert!(
        tokio::time::timeout(Duration::from_secs(2), dead.next())
            .await
            .is_err(),
        "one dead letter"
    );
    link.close().await;
    delete_queues(&queue).await;
}

/// RabbitMQ's memory alarm, raised: every connection that publishes is
/// blocked (a consumer's own connection is not) until it is dropped, which
/// puts the watermark back as it was.
struct PublishersBlocked(String);

impl PublishersBlocked {
    fn on() -> PublishersBlocked {
        let ctl = |args: &[&str]| {
            std::process::Command::new("rabbitmqctl")
                .args(args)
                .output()
                .expect("rabbitmqctl runs")
        };
        let was = ctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."]);
        let was = String::from_utf8_lossy(&was.stdout).trim().to_owned();
        let was = match was.parse::<f64>() {
            // Left by a run killed while its alarm was on: restoring it
            // would leave every later publisher blocked.
            Ok(0.0) => "0.4".to_owned(),
            Ok(_) => was,
            Err(_) => panic!("the watermark: {was:?}"),
        };
        assert!(ctl(&["set_vm_memory_high_watermark", "0"]).status.success());
        PublishersBlocked(was)
    }
}

impl Drop for PublishersBlocked {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["set_vm_memory_high_watermark", &self.0])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_is_acked_only_once_its_record_and_callback_are_published() {
    // The alarm blocks every publisher on the broker: no other broker test
    // runs meanwhile.
    let _broker = BROKER.write().await;
    let _lock = REPLICAS.lock().await;
    let up = upstream().await;
    seed(&up, &["ack1", "other"]);
    let queue = queue_name("back");
    let seen = web::Data::new(Seen::default());
    let port = free_port();
    let receiver = start_receiver(port, seen.clone());
    let url = format!("http://127.0.0.1:{port}/hook");
    let env = [
        ("CHAT_JANITOR__ADMIN__TOKEN", ADMIN_TOKEN),
        ("CHAT_JANITOR__CALLBACKS__URL", url.as_str()),
        ("CHAT_JANITOR__CALLBACKS__SECRET", SECRET),
    ];
    // A replica declares the queues and stops; the event waits on the
    // queue for the next one, which starts with publishers blocked: it can
    // consume, dispatch and ack (its consumer's connection publishes
    // nothing), but not publish the event's record or callback.
    let mut cluster = Cluster::new(&queue);
    let zero = cluster.add(&up, LINGER_MS, &env).await;
    cluster
        .wait_sole_active(&[zero], 30, "the replica active")
        .await;
    cluster.stop_all(&[zero]).await;
    publish_bans(&queue, "brec", &[ban("ack1")]).await;
    let alarm = PublishersBlocked::on();
    let first = cluster.add(&up, LINGER_MS, &env).await;
    eventually(60, "the removal made upstream", || async {
        cluster.replicas[first].proxy.count() >= 1
    })
    .await;
    // Time for an ack that should not come. (`rabbitmqctl`'s count of a
    // quorum queue lags by up to its 5 s tick, so it cannot tell whether
    // one came: it can still read 0 here, from before the publish.)
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Killed now, it leaves the message to the next replica: back on the
    // queue, ready (a passive declare's count is current), which it is
    // only if it was never acked. The next replica settles the event again
    // (a no-op upstream) and publishes both.
    cluster.replicas[first].kill9();
    let log = cluster.replicas[first].log_tail(40);
    eventually(
        30,
        &format!("the event's message back on the queue, unacked while its record could not be published:\n{log}"),
        || async { message_count(&queue).await == 1 },
    )
    .await;
    let second = cluster.add(&up, LINGER_MS, &env).await;
    drop(alarm);
    eventually(60, "the callback delivered", || async {
        seen.got
            .lock()
            .iter()
            .any(|g| g.verified && g.msg_id == "fate_brec-ack1_settled")
    })
    .await;
    let r = settled_record(&cluster.replicas[second].url(""), "brec-ack1").await;
    assert_eq!(r["user_id"], "ack1", "{r:#}");
    wait_queue_empty(&queue, 60).await;
    cluster.stop_all(&[second]).await;
    assert_none_left(&queue).await;
    receiver.stop(true).await;
}
