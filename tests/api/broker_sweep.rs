//! Sweeps in broker mode, with real `serve` replicas on one RabbitMQ queue
//! (the harness of `replicas`: each replica reaches the emulator through a
//! proxy of its own, so every upstream call is attributed to a replica).
//! Any replica takes a sweep; the active dispatcher runs it; every replica
//! answers `GET` from the sweep log, also after restarts and failovers.

use std::collections::HashSet;
use std::time::Duration;

use chat_janitor::emulator::{FaultRule, Faults};
use chat_janitor::inbox::lease::LeaderLease;
use secrecy::SecretString;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::helpers::{eventually, ADMIN_TOKEN, AMQP_URL, BROKER};
use crate::replicas::{
    assert_queue_drained, assert_within_budget, calls_of, now_ms, queue_name, upstream, Cluster,
    BIN, DELETE, REPLICAS,
};
use crate::sweep::{
    assert_clean_result, case, finished_sweep, passes, remaining, removals_sent, seed_case,
    start_sweep, sweep_status, Case,
};

const READ: &str = "get_subscriber_info";
/// Short, so the 37 left over after the first full batch go soon.
const LINGER_MS: u64 = 200;
const ENV: [(&str, &str); 1] = [("CHAT_JANITOR__ADMIN__TOKEN", ADMIN_TOKEN)];

/// Starts `n` replicas; waits for one leader; (leader, the others).
async fn replicas(
    cluster: &mut Cluster,
    up: &crate::helpers::TestUpstream,
    n: usize,
) -> (usize, Vec<usize>) {
    let first = cluster.replicas.len();
    for _ in 0..n {
        cluster.add(up, LINGER_MS, &ENV).await;
    }
    let these: Vec<usize> = (first..first + n).collect();
    let leader = cluster
        .wait_sole_active(&these, 30, "exactly one replica active")
        .await;
    let others = these.into_iter().filter(|&i| i != leader).collect();
    (leader, others)
}

/// Exactly the deny-listed members were removed (each at least once), and
/// everyone else is still subscribed.
fn assert_exactly_denied_removed(up: &crate::helpers::TestUpstream, case: &Case) {
    let denied: HashSet<String> = case.denied.iter().cloned().collect();
    let sent: HashSet<String> = removals_sent(up).into_iter().collect();
    assert_eq!(sent, denied, "exactly the deny-listed members were removed");
    let expected: HashSet<String> = case
        .members
        .iter()
        .filter(|m| !denied.contains(*m))
        .cloned()
        .collect();
    assert_eq!(remaining(up), expected);
}

/// The sweep's status on the replica at `base` (200 expected).
async fn known(base: &str, id: u64) -> Value {
    let (code, s) = sweep_status(base, id).await;
    assert_eq!(code, 200, "sweep {id} is known at {base}: {s}");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_posted_to_a_standby_is_run_by_the_leader() {
    let _broker = BROKER.read().await;
    let _lock = REPLICAS.lock().await;
    let up = upstream().await;
    let case = case();
    seed_case(&up, &case);
    let queue = queue_name("swp");
    let mut cluster = Cluster::new(&queue);
    let (leader, others) = replicas(&mut cluster, &up, 2).await;
    let standby = others[0];
    let on_standby = cluster.replicas[standby].url("");
    let on_leader = cluster.replicas[leader].url("");

    let id = start_sweep(&on_standby, &case.deny, false).await;
    // Known at once on both, whoever took it.
    for base in [&on_standby, &on_leader] {
        let s = known(base, id).await;
        assert!(
            ["queued", "running", "done"].contains(&s["state"].as_str().unwrap()),
            "{s}"
        );
    }
    let s = finished_sweep(&on_standby, id).await;
    assert_clean_result(&s);
    assert_eq!(passes(&s), [(5, 1000, 137), (5, 863, 0)], "{s}");
    assert_eq!(s["resumed"], 0, "{s}");
    assert_eq!(
        finished_sweep(&on_leader, id).await,
        s,
        "the leader and the standby answer the same final state"
    );
    assert_exactly_denied_removed(&up, &case);

    let calls = up.emulator.calls();
    let reads = calls_of(&calls, READ).len();
    let deletes = calls_of(&calls, DELETE).len();
    assert_eq!(reads, 10, "two passes of 5 pages");
    assert_eq!(deletes, 2, "full batches");
    assert_eq!(
        cluster.replicas[leader].proxy.count(),
        reads + deletes,
        "every get_subscriber_info and delete_subscriber came through the leader"
    );
    assert_eq!(
        cluster.replicas[standby].proxy.count(),
        0,
        "none through the standby that took the sweep"
    );
    assert_within_budget(&up, &cluster);
    cluster.stop_all(&[standby, leader]).await;
    assert_queue_drained(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_is_queued_until_a_replica_leads() {
    let _broker = BROKER.read().await;
    let _lock = REPLICAS.lock().await;
    let up = upstream().await;
    let case = case();
    seed_case(&up, &case);
    let queue = queue_name("swq");
    // The test holds the dispatch lease first, so no replica leads.
    let held = LeaderLease::start(
        SecretString::from(AMQP_URL.to_owned()),
        &queue,
        10,
        CancellationToken::new(),
    );
    eventually(30, "the test holds the lease", || async {
        held.is_leader()
    })
    .await;
    let mut cluster = Cluster::new(&queue);
    for _ in 0..2 {
        cluster.add(&up, LINGER_MS, &ENV).await;
    }
    for r in &cluster.replicas {
        assert_eq!(r.active().await, Some(0.0), "{} stands by", r.name);
    }
    let base = cluster.replicas[0].url("");
    let id = start_sweep(&base, &case.deny, false).await;
    // Nobody runs it, and every replica says so.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for r in &cluster.replicas {
        let s = known(&r.url(""), id).await;
        assert_eq!(s["state"], "queued", "{}: {s}", r.name);
        assert_eq!(s["pages"], 0, "{s}");
        assert_eq!(r.proxy.count(), 0, "{} made no upstream call", r.name);
    }
    held.release().await;
    let all = cluster.all();
    let leader = cluster
        .wait_sole_active(&all, 60, "a replica leads once the test let go")
        .await;
    let s = finished_sweep(&base, id).await;
    assert_clean_result(&s);
    assert_eq!(passes(&s), [(5, 1000, 137), (5, 863, 0)], "{s}");
    assert_exactly_denied_removed(&up, &case);
    let other = cluster.others(leader)[0];
    assert_eq!(cluster.replicas[other].proxy.count(), 0);
    cluster.stop_all(&[other, leader]).await;
    assert_queue_drained(&queue).await;
}

/// How the leader is taken away mid-sweep.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Loss {
    Kill9,
    Sigterm,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_leader_mid_sweep_the_next_leader_finishes_it() {
    let _broker = BROKER.read().await;
    leader_lost_mid_sweep(Loss::Kill9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_the_leader_mid_sweep_hands_it_to_the_next_leader() {
    let _broker = BROKER.read().await;
    leader_lost_mid_sweep(Loss::Sigterm).await;
}

async fn leader_lost_mid_sweep(how: Loss) {
    let _lock = REPLICAS.lock().await;
    let up = upstream().await;
    let case = case();
    seed_case(&up, &case);
    // Slow removals, so the leader goes with its first round in flight.
    up.emulator
        .set_faults(Faults::new(vec![FaultRule::latency(Some(DELETE), 1500)]));
    let queue = queue_name("swk");
    let mut cluster = Cluster::new(&queue);
    let (leader, others) = replicas(&mut cluster, &up, 3).await;
    let took = cluster.replicas[others[0]].url("");
    let id = start_sweep(&took, &case.deny, false).await;
    // The leader's proxy sees each request as it goes out: the first pass's
    // 5 pages, then the first removal call (which the emulator holds).
    eventually(60, "the first removal call under way", || async {
        cluster.replicas[leader].proxy.count() > 5
    })
    .await;
    match how {
        Loss::Kill9 => cluster.replicas[leader].kill9(),
        Loss::Sigterm => {
            // It drains its removals in flight, then hands over.
            let r = &mut cluster.replicas[leader];
            let status = r.terminate(60).await;
            assert!(status.success(), "{status:?}:\n{}", r.log_tail(40));
        }
    }
    let gone_at = now_ms();
    let answered = calls_of(&up.emulator.calls(), DELETE).len();
    up.emulator.clear_faults();
    let next = cluster
        .wait_sole_active(&others, 60, "another replica leads")
        .await;

    let s = finished_sweep(&took, id).await;
    // The same result as a sweep nobody interrupted.
    assert_clean_result(&s);
    assert_eq!(passes(&s), [(5, 1000, 137), (5, 863, 0)], "{s}");
    assert_eq!(s["resumed"], 1, "taken up once by the next leader: {s}");
    assert_exactly_denied_removed(&up, &case);
    for &i in &others {
        assert_eq!(
            finished_sweep(&cluster.replicas[i].url(""), id).await,
            s,
            "{} answers the same after the failover",
            cluster.replicas[i].name
        );
    }
    let old = &cluster.replicas[leader];
    assert!(old.proxy.count() > 0, "the first leader started the sweep");
    assert_eq!(old.proxy.since(gone_at), 0, "the old leader is gone");
    let standby = others.iter().copied().find(|&i| i != next).unwrap();
    assert_eq!(
        cluster.replicas[standby].proxy.count(),
        0,
        "{} (still standby) made no call",
        cluster.replicas[standby].name
    );
    // The old leader's removal was held by the injected latency when it
    // went: the emulator, like the vendor, answers it in full later (no
    // one reads that answer). Its record is written then.
    let through = old.proxy.count() + cluster.replicas[next].proxy.count();
    let recorded = || {
        let calls = up.emulator.calls();
        calls_of(&calls, READ).len() + calls_of(&calls, DELETE).len()
    };
    eventually(10, "the held call on record", || async {
        recorded() >= through
    })
    .await;
    let total = recorded();
    assert_eq!(
        old.proxy.count() + cluster.replicas[next].proxy.count(),
        total,
        "every call came through one of the two leaders"
    );
    cluster.stop_all(&[standby, next]).await;
    assert_queue_drained(&queue).await;
    eprintln!(
        "{how:?} of the leader with {answered} of its delete_subscriber calls answered; \
         the next leader sent {} requests",
        cluster.replicas[next].proxy.count()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweeps_answer_after_restarts_and_ids_never_repeat() {
    let _broker = BROKER.read().await;
    let _lock = REPLICAS.lock().await;
    let up = upstream().await;
    let case = case();
    seed_case(&up, &case);
    let queue = queue_name("swr");
    let mut cluster = Cluster::new(&queue);
    let (leader, others) = replicas(&mut cluster, &up, 2).await;
    let first = start_sweep(&cluster.replicas[others[0]].url(""), &case.deny, false).await;
    let done = finished_sweep(&cluster.replicas[leader].url(""), first).await;
    assert_clean_result(&done);
    cluster.stop_all(&[others[0], leader]).await;

    // Every replica restarted: the sweep log still has it.
    let (leader, others) = replicas(&mut cluster, &up, 2).await;
    for i in [leader, others[0]] {
        let r = &cluster.replicas[i];
        assert_eq!(
            known(&r.url(""), first).await,
            done,
            "{} (restarted) answers the sweep finished before",
            r.name
        );
    }
    // New ids, also when two replicas take sweeps at once.
    let a = cluster.replicas[leader].url("");
    let b = cluster.replicas[others[0]].url("");
    let (x, y) = tokio::join!(start_sweep(&a, &[], true), start_sweep(&b, &[], true));
    assert!(x != y, "two replicas gave out {x} and {y}");
    assert!(x > first && y > first, "{x}, {y} after {first}");
    // An id no replica gave out is not found (after reading the log up to
    // now), rather than waited for.
    let (code, body) = sweep_status(&b, x.max(y) + 1000).await;
    assert_eq!(code, 404, "{body}");
    for (base, id) in [(&a, x), (&b, y)] {
        let s = finished_sweep(base, id).await;
        assert_eq!(s["state"], "done", "{s}");
        assert_eq!(s["dry_run"], true, "{s}");
    }
    cluster.stop_all(&[others[0], leader]).await;
    assert_queue_drained(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_cli_works_against_a_standby() {
    let _broker = BROKER.read().await;
    let _lock = REPLICAS.lock().await;
    let up = upstream().await;
    let case = case();
    seed_case(&up, &case);
    let queue = queue_name("swc");
    let mut cluster = Cluster::new(&queue);
    let (leader, others) = replicas(&mut cluster, &up, 2).await;
    let standby = others[0];
    let dir = tempfile::tempdir().unwrap();
    let deny_file = dir.path().join("deny.txt");
    std::fs::write(&deny_file, format!("# banned\n{}\n", case.deny.join("\n"))).unwrap();
    let out = tokio::process::Command::new(BIN)
        .args(["sweep", "--channel", crate::sweep::SWEPT, "--url"])
        .arg(cluster.replicas[standby].url(""))
        .args(["--token", ADMIN_TOKEN, "--json", "--deny"])
        .arg(&deny_file)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    assert_clean_result(&report);
    assert_eq!(passes(&report), [(5, 1000, 137), (5, 863, 0)], "{report}");
    assert!(
        stderr
            .lines()
            .all(|l| serde_json::from_str::<Value>(l).is_ok()),
        "progress as JSON lines: {stderr}"
    );
    assert_exactly_denied_removed(&up, &case);
    let id = report["id"].as_u64().unwrap();
    assert_eq!(
        known(&cluster.replicas[leader].url(""), id).await,
        report,
        "the leader answers what the CLI printed"
    );
    assert_eq!(cluster.replicas[standby].proxy.count(), 0);
    assert!(cluster.replicas[leader].proxy.count() > 0);
    cluster.stop_all(&[standby, leader]).await;
    assert_queue_drained(&queue).await;
}
