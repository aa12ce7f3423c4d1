//! The leader lease against the real RabbitMQ on 127.0.0.1:5672: one lock
//! queue per test, deleted afterwards. Deadlines are generous; nothing
//! asserts a speed.

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chat_janitor::inbox::lease::{
    declare_lock_queue, leader_queue_name, LeaderLease, Leadership, LeaseConfig, LeaseHandle,
};
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use secrecy::SecretString;
use tokio::io::AsyncBufReadExt;
use tokio_util::sync::CancellationToken;

use crate::helpers::eventually;
use crate::helpers::AMQP_URL;

/// Set in the child half of the process tests: the work queue to lease.
const CHILD_QUEUE: &str = "CJ_LEASE_CHILD_QUEUE";
/// What the child prints on each change of leadership.
const STATE_LINE: &str = "LEASE-STATE ";

fn work_queue(test: &str) -> String {
    format!("cj-lease-{test}-{:08x}", rand::random::<u32>())
}

fn uri() -> SecretString {
    SecretString::from(AMQP_URL.to_owned())
}

fn config(renew_ms: u64, grace_ms: u64) -> LeaseConfig {
    LeaseConfig {
        heartbeat: Duration::from_secs(10),
        renew_every: Duration::from_millis(renew_ms),
        token_grace: Duration::from_millis(grace_ms),
    }
}

fn start(queue: &str, cfg: LeaseConfig) -> LeaseHandle {
    LeaderLease::start_with(uri(), queue, cfg, CancellationToken::new())
}

fn leaders(leases: &[&LeaseHandle]) -> usize {
    leases.iter().filter(|l| l.is_leader()).count()
}

async fn channel() -> (Connection, Channel) {
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    (conn, ch)
}

/// Ready (not unacked) messages in the lock queue.
async fn ready_tokens(queue: &str) -> u32 {
    let (_conn, ch) = channel().await;
    ch.queue_declare(
        ShortString::from(leader_queue_name(queue).as_str()),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap()
    .message_count()
}

async fn publish_tokens(queue: &str, n: usize) {
    let (_conn, ch) = channel().await;
    for _ in 0..n {
        ch.basic_publish(
            ShortString::from(""),
            ShortString::from(leader_queue_name(queue).as_str()),
            BasicPublishOptions::default(),
            b"extra",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
}

async fn delete_lock_queue(queue: &str) {
    let (_conn, ch) = channel().await;
    let _ = ch
        .queue_delete(
            ShortString::from(leader_queue_name(queue).as_str()),
            QueueDeleteOptions::default(),
        )
        .await;
}

/// Waits until the lease leads, failing after `secs`.
async fn becomes_leader(lease: &LeaseHandle, secs: u64, what: &str) {
    let mut w = lease.watch();
    tokio::time::timeout(Duration::from_secs(secs), w.wait_for(|s| s.is_leader()))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for: {what}"))
        .unwrap();
}

/// Records whether the lease ever reported follower after this call.
fn watch_for_loss(lease: &LeaseHandle) -> Arc<AtomicBool> {
    let lost = Arc::new(AtomicBool::new(false));
    let flag = lost.clone();
    let mut w = lease.watch();
    tokio::spawn(async move {
        while w.changed().await.is_ok() {
            if *w.borrow_and_update() == Leadership::Follower {
                flag.store(true, Ordering::SeqCst);
            }
        }
    });
    lost
}

/// Records whether the lease ever reported leader after this call.
fn watch_for_gain(lease: &LeaseHandle) -> Arc<AtomicBool> {
    let gained = Arc::new(AtomicBool::new(lease.is_leader()));
    let flag = gained.clone();
    let mut w = lease.watch();
    tokio::spawn(async move {
        while w.changed().await.is_ok() {
            if w.borrow_and_update().is_leader() {
                flag.store(true, Ordering::SeqCst);
            }
        }
    });
    gained
}

#[tokio::test]
async fn three_leases_elect_exactly_one_leader_that_knows_without_traffic() {
    let _broker = crate::helpers::BROKER.read().await;
    let q = work_queue("three");
    let cfg = config(60_000, 3_600_000);
    let (a, b, c) = (
        start(&q, cfg.clone()),
        start(&q, cfg.clone()),
        start(&q, cfg),
    );
    // Nothing is published to any work queue: the token alone tells.
    eventually(20, "one leader", || async { leaders(&[&a, &b, &c]) == 1 }).await;
    let gains: Vec<_> = [&a, &b, &c].iter().map(|l| watch_for_gain(l)).collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(leaders(&[&a, &b, &c]), 1);
    // Two of them never led during the watch.
    assert_eq!(gains.iter().filter(|g| g.load(Ordering::SeqCst)).count(), 1);
    drop((a, b, c));
    delete_lock_queue(&q).await;
}

#[tokio::test]
async fn renewals_keep_the_same_leader() {
    let _broker = crate::helpers::BROKER.read().await;
    let q = work_queue("renew");
    // Renew every 100 ms: dozens of renewals in the watch below.
    let a = start(&q, config(100, 3_600_000));
    becomes_leader(&a, 20, "the first lease leads").await;
    let b = start(&q, config(100, 3_600_000));
    let a_lost = watch_for_loss(&a);
    let b_gained = watch_for_gain(&b);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(a.is_leader());
    assert!(!a_lost.load(Ordering::SeqCst), "the leader lost its lease");
    assert!(!b_gained.load(Ordering::SeqCst), "the follower led");
    // Dozens of renewals (a fresh token each, the old one acked) leave
    // exactly one token behind.
    a.release().await;
    b.release().await;
    eventually(10, "exactly one token left", || async {
        ready_tokens(&q).await == 1
    })
    .await;
    delete_lock_queue(&q).await;
}

/// A broker fact the lease relies on (RabbitMQ 3.10): on a quorum queue with
/// single active consumer and no delivery limit, a message rejected with
/// requeue again and again goes back to the same active consumer every time,
/// and is neither dead-lettered nor dropped.
#[tokio::test]
async fn requeue_forever_goes_to_the_same_consumer_and_keeps_the_token() {
    let _broker = crate::helpers::BROKER.read().await;
    let q = work_queue("requeue");
    let lock = leader_queue_name(&q);
    let (_c1, first) = channel().await;
    let (_c2, second) = channel().await;
    declare_lock_queue(&first, &lock).await.unwrap();
    let consume = |ch: Channel, tag: &'static str| {
        let lock = lock.clone();
        async move {
            ch.basic_qos(4, BasicQosOptions::default()).await.unwrap();
            ch.basic_consume(
                ShortString::from(lock.as_str()),
                ShortString::from(tag),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap()
        }
    };
    let mut active = consume(first, "first").await;
    let mut standby = consume(second, "second").await;
    publish_tokens(&q, 1).await;
    let mut last_count = -1i64;
    for round in 0..60 {
        let d = tokio::time::timeout(Duration::from_secs(10), active.next())
            .await
            .unwrap_or_else(|_| panic!("round {round}: the token did not come back"))
            .unwrap()
            .unwrap();
        let count = d
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-delivery-count").cloned());
        let count = match count {
            None => 0,
            Some(AMQPValue::LongLongInt(n)) => n,
            Some(AMQPValue::LongInt(n)) => i64::from(n),
            Some(other) => panic!("unexpected x-delivery-count {other:?}"),
        };
        assert!(count > last_count, "round {round}: delivery count {count}");
        last_count = count;
        d.acker
            .reject(BasicRejectOptions { requeue: true })
            .await
            .unwrap();
    }
    assert!(last_count >= 59, "the broker counts requeues: {last_count}");
    let nothing = tokio::time::timeout(Duration::from_millis(300), standby.next()).await;
    assert!(nothing.is_err(), "the standby consumer got a delivery");
    drop((active, standby, _c1, _c2));
    // Still there, and nothing went anywhere else.
    eventually(10, "the token is back to ready", || async {
        ready_tokens(&q).await == 1
    })
    .await;
    delete_lock_queue(&q).await;
}

#[tokio::test]
async fn stopping_or_dropping_the_leader_hands_over() {
    let _broker = crate::helpers::BROKER.read().await;
    let q = work_queue("stop");
    let cfg = config(60_000, 3_600_000);
    let stop_a = CancellationToken::new();
    let a = LeaderLease::start_with(uri(), &q, cfg.clone(), stop_a.clone());
    becomes_leader(&a, 20, "a leads").await;
    let b = start(&q, cfg.clone());
    let c = start(&q, cfg);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(leaders(&[&a, &b, &c]), 1);

    // Its stop token fires: the connection closes and another one leads.
    let mut a_state = a.watch();
    stop_a.cancel();
    a.stopped().await;
    assert_eq!(*a_state.borrow_and_update(), Leadership::Follower);
    eventually(20, "b or c leads after a stopped", || async {
        leaders(&[&b, &c]) == 1
    })
    .await;

    // The new leader's handle is dropped: the last one takes over.
    let (leader, rest) = if b.is_leader() { (b, c) } else { (c, b) };
    drop(leader);
    becomes_leader(&rest, 20, "the last lease leads after a drop").await;
    drop(rest);
    delete_lock_queue(&q).await;
}

#[tokio::test]
async fn release_hands_the_token_over() {
    let _broker = crate::helpers::BROKER.read().await;
    let q = work_queue("release");
    let cfg = config(60_000, 3_600_000);
    let a = start(&q, cfg.clone());
    becomes_leader(&a, 20, "a leads").await;
    let b = start(&q, cfg);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!b.is_leader());
    let a_state = a.watch();
    a.release().await;
    assert_eq!(*a_state.borrow(), Leadership::Follower);
    becomes_leader(&b, 20, "b leads after the release").await;
    drop(b);
    delete_lock_queue(&q).await;
}

#[tokio::test]
async fn a_lost_token_is_recreated() {
    let _broker = crate::helpers::BROKER.read().await;
    let q = work_queue("lost");
    let lock = leader_queue_name(&q);
    // A rogue consumer registers first, so it is the active one: it eats
    // every token the leases publish on declare.
    let (rogue_conn, rogue) = channel().await;
    declare_lock_queue(&rogue, &lock).await.unwrap();
    let mut eater = rogue
        .basic_consume(
            ShortString::from(lock.as_str()),
            ShortString::from("rogue"),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let cfg = config(60_000, 1_000);
    let a = start(&q, cfg.clone());
    let b = start(&q, cfg);
    // Both leases found the queue empty and published; the rogue ate them.
    for _ in 0..2 {
        tokio::time::timeout(Duration::from_secs(20), eater.next())
            .await
            .expect("the rogue consumer gets the declare-time tokens")
            .unwrap()
            .unwrap();
    }
    // The rogue goes: a lease is activated with no token anywhere.
    drop(eater);
    rogue_conn
        .close(200, ShortString::from("bye"))
        .await
        .unwrap();
    eventually(30, "a lease leads on a re-created token", || async {
        leaders(&[&a, &b]) == 1
    })
    .await;
    drop((a, b));
    delete_lock_queue(&q).await;
}

#[tokio::test]
async fn extra_tokens_leave_one_leader_and_one_token() {
    let _broker = crate::helpers::BROKER.read().await;
    let q = work_queue("extra");
    let cfg = config(200, 3_600_000);
    let a = start(&q, cfg.clone());
    becomes_leader(&a, 20, "a leads").await;
    // Joining while a holds the token, b sees no ready message and
    // publishes an extra token on declare.
    let b = start(&q, cfg.clone());
    let c = start(&q, cfg);
    publish_tokens(&q, 5).await;
    // The leader acks every extra; the token it holds is not ready.
    eventually(20, "the extras are acked", || async {
        ready_tokens(&q).await == 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(leaders(&[&a, &b, &c]), 1);
    assert!(a.is_leader());
    for l in [a, b, c] {
        l.release().await;
    }
    eventually(10, "exactly one token left", || async {
        ready_tokens(&q).await == 1
    })
    .await;
    delete_lock_queue(&q).await;
}

/// A lease held by another process (this test binary run again as the
/// child half of the tests below), reporting its state on stdout.
struct ChildLease {
    child: tokio::process::Child,
    pid: u32,
    state: tokio::sync::watch::Receiver<Option<Leadership>>,
}

impl ChildLease {
    fn spawn(queue: &str, heartbeat_secs: u16) -> ChildLease {
        let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "lease::lease_holder_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_QUEUE, queue)
            .env("CJ_LEASE_CHILD_HEARTBEAT", heartbeat_secs.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        let (tx, state) = tokio::sync::watch::channel(None);
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                match line.strip_prefix(STATE_LINE) {
                    Some("leader") => tx.send_replace(Some(Leadership::Leader)),
                    Some("follower") => tx.send_replace(Some(Leadership::Follower)),
                    _ => continue,
                };
            }
        });
        ChildLease { child, pid, state }
    }

    async fn wait_for(&mut self, want: Leadership, secs: u64, what: &str) {
        tokio::time::timeout(
            Duration::from_secs(secs),
            self.state.wait_for(|s| *s == Some(want)),
        )
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for: {what}"))
        .unwrap();
    }

    fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([sig, &self.pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {}", self.pid);
    }
}

/// The child half of the process tests; does nothing unless they start it.
#[tokio::test]
#[ignore = "started by the process tests as a separate lease holder"]
async fn lease_holder_child() {
    let Ok(queue) = std::env::var(CHILD_QUEUE) else {
        return;
    };
    let hb: u16 = std::env::var("CJ_LEASE_CHILD_HEARTBEAT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let lease = LeaderLease::start(uri(), &queue, hb, CancellationToken::new());
    let mut w = lease.watch();
    loop {
        let s = *w.borrow_and_update();
        println!(
            "{STATE_LINE}{}",
            if s.is_leader() { "leader" } else { "follower" }
        );
        if w.changed().await.is_err() {
            break;
        }
    }
}

#[tokio::test]
async fn a_killed_leader_process_is_replaced() {
    let _broker = crate::helpers::BROKER.read().await;
    let q = work_queue("kill");
    let mut child = ChildLease::spawn(&q, 10);
    child
        .wait_for(Leadership::Leader, 60, "the child process leads")
        .await;
    let b = start(&q, config(60_000, 3_600_000));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!b.is_leader());
    // kill -9: the OS closes the socket, the broker activates b.
    child.child.kill().await.unwrap();
    becomes_leader(&b, 20, "b leads after the kill").await;
    drop(b);
    delete_lock_queue(&q).await;
}

#[tokio::test]
async fn a_paused_leader_is_replaced_and_sees_it_lost() {
    let _broker = crate::helpers::BROKER.read().await;
    let q = work_queue("pause");
    let hb = 2u16;
    let mut child = ChildLease::spawn(&q, hb);
    child
        .wait_for(Leadership::Leader, 60, "the child process leads")
        .await;
    let b = LeaderLease::start(uri(), &q, hb, CancellationToken::new());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!b.is_leader());
    // SIGSTOP: no heartbeats; the broker gives up on it after about two
    // intervals and activates b.
    child.signal("-STOP");
    let paused = tokio::time::Instant::now();
    becomes_leader(&b, 60, "b leads while the child is paused").await;
    // For the record, not asserted: the broker's detection time.
    println!(
        "heartbeat {hb} s: another lease led {:?} after SIGSTOP",
        paused.elapsed()
    );
    child.signal("-CONT");
    child
        .wait_for(
            Leadership::Follower,
            30,
            "the resumed child reports follower",
        )
        .await;
    // It does not take the lease back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(b.is_leader());
    assert_eq!(*child.state.borrow(), Some(Leadership::Follower));
    child.child.kill().await.unwrap();
    drop(b);
    delete_lock_queue(&q).await;
}
