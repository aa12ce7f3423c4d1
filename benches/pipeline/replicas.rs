//! Scale-out (issue 11): real `chat-janitor serve` processes in broker mode
//! on one queue, each configured with the vendor's whole budget
//! (`tencent.requests_per_second = 200`), draining a backlog that is in
//! RabbitMQ before they start. The emulator runs as a process of its own
//! (`chat-janitor emulator --rate 200`), so upstream CPU is not charged to
//! the service, and is read back through `/emulator/stats` and
//! `/emulator/calls`.
//!
//! The backlog: 200 channels of 500 subscribers; the same 500 users are
//! banned from all 200 channels, one message each (persistent, confirmed,
//! `message_id` set): 100,000 `delete_subscriber` items, 1,000 full calls,
//! 5 s at 200 calls/s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_janitor::emulator::{CallRecord, Seed, SeedChannel, Stats};
use serde_json::json;

use crate::common::*;
use crate::report::{Report, Verdict};
use crate::{secs, thousands, verdict};

pub const CHANNELS: usize = 200;
pub const MEMBERS: usize = 500;
pub const ITEMS: u64 = (CHANNELS * MEMBERS) as u64;
/// Full batches of 100: the fewest calls that carry the backlog.
pub const MIN_CALLS: u64 = ITEMS / 100;
const API: &str = "delete_subscriber";
/// The leader is killed (row C) once this many calls went upstream.
const KILL_AFTER_CALLS: u64 = 300;

fn user(i: usize) -> String {
    format!("rpu{i}")
}

fn chan(c: usize) -> String {
    channel("rp", c)
}

/// `@` and `#` (and anything else not plain) percent-encoded, for a path.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

// ---------------------------------------------------------------- processes

/// What this section reads back from the emulator process.
impl EmulatorProc {
    async fn stats(&self) -> ApiStatsView {
        let s: Stats = self
            .http
            .get(format!("{}/emulator/stats", self.url))
            .send()
            .await
            .expect("stats")
            .json()
            .await
            .expect("stats json");
        let a = s.api(API);
        ApiStatsView {
            calls: a.calls,
            applied: a.applied,
            noop: a.noop,
            refused_60007: a.code("60007"),
            peak: a.peak_calls_per_second,
            other_errors: a
                .error_codes
                .iter()
                .filter(|(k, _)| k.as_str() != "0" && k.as_str() != "60007")
                .map(|(k, v)| format!("{k}:{v}"))
                .collect::<Vec<_>>()
                .join(" "),
        }
    }

    async fn calls(&self) -> Vec<CallRecord> {
        self.http
            .get(format!("{}/emulator/calls?api={API}", self.url))
            .send()
            .await
            .expect("calls")
            .json()
            .await
            .expect("calls json")
    }

    /// Subscriptions left over all the backlog's channels.
    async fn left(&self) -> usize {
        let mut left = 0;
        for c in 0..CHANNELS {
            let url = format!(
                "{}/emulator/channels/{}/subscribers",
                self.url,
                encode(&chan(c))
            );
            let list: Vec<serde_json::Value> = self
                .http
                .get(url)
                .send()
                .await
                .expect("subscribers")
                .json()
                .await
                .expect("subscribers json");
            left += list.len();
        }
        left
    }
}

#[derive(Default)]
struct ApiStatsView {
    calls: u64,
    applied: u64,
    noop: u64,
    refused_60007: u64,
    peak: u64,
    other_errors: String,
}

/// One `chat-janitor serve` replica (broker mode, port 0).
struct Replica {
    proc: Proc,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Replica {
    fn spawn(name: &str, upstream: &str, queue: &str) -> (Proc, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("serve.log");
        let child = serve_command(dir.path(), upstream)
            .env("RUST_LOG", "info")
            .env("CHAT_JANITOR__AMQP__URL", AMQP_URL)
            .env("CHAT_JANITOR__AMQP__QUEUE", queue)
            .env("CHAT_JANITOR__SERVER__LISTEN", "127.0.0.1:0")
            .env(
                "CHAT_JANITOR__TENCENT__REQUESTS_PER_SECOND",
                VENDOR_RATE.to_string(),
            )
            .stderr(std::fs::File::create(&log).expect("serve log"))
            .spawn()
            .expect("chat-janitor serve starts");
        (Proc::new(name, child, log), dir)
    }

    /// Waits for the "chat-janitor serving" line and its port.
    async fn ready(mut proc: Proc, dir: tempfile::TempDir) -> Replica {
        let port = serving_port(&mut proc, Duration::from_secs(60)).await;
        Replica {
            proc,
            port,
            _dir: dir,
        }
    }

    async fn metric(&self, http: &reqwest::Client, name: &str) -> Option<f64> {
        let text = http
            .get(format!("http://127.0.0.1:{}/metrics", self.port))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        metric_sum(&text, name, "")
    }

    async fn active(&self, http: &reqwest::Client) -> bool {
        self.metric(http, "chat_janitor_dispatch_active").await == Some(1.0)
    }
}

/// Waits until exactly one of `among` reports `dispatch_active 1`.
async fn sole_active(
    http: &reqwest::Client,
    replicas: &[Replica],
    among: &[usize],
    limit: Duration,
) -> Option<usize> {
    let deadline = Instant::now() + limit;
    loop {
        let mut ones = Vec::new();
        for &i in among {
            if replicas[i].active(http).await {
                ones.push(i);
            }
        }
        if ones.len() == 1 {
            return Some(ones[0]);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- a run

pub struct RunResult {
    pub replicas: usize,
    pub complete: bool,
    /// Subscriptions left upstream at the end (0: everything applied).
    pub left: usize,
    /// Ready messages left in the work queue once every replica stopped.
    pub queue_left: Option<u32>,
    pub calls: u64,
    pub ok_calls: u64,
    pub ok_items: u64,
    pub applied: u64,
    pub noop: u64,
    pub refused_60007: u64,
    pub other_errors: String,
    /// Most calls in any sliding 1,000 ms window (from the call log), and
    /// the emulator's own figure.
    pub busiest: usize,
    pub emulator_peak: u64,
    /// First to last upstream call, plus one call slot (1/200 s).
    pub drain: Duration,
    pub publish: Duration,
    /// Replicas started to first upstream call.
    pub start_to_first: Duration,
    /// `chat_janitor_upstream_requests_total` of each replica still
    /// running at the end (`None`: killed), leader first marked.
    pub per_replica: Vec<(String, Option<f64>, bool)>,
    /// Row C: kill to the next upstream call, and to the next replica
    /// reporting active.
    pub kill_to_next_call: Option<Duration>,
    pub kill_to_active: Option<Duration>,
    pub calls_before_kill: u64,
    /// Calls per second of the drain.
    pub per_second: Vec<u64>,
    /// When each call refused with 60007 arrived, ms after the first call.
    pub refused_at: Vec<u64>,
    /// The kill, ms after the first call (row C).
    pub kill_at: Option<u64>,
    /// Exit 0 on SIGTERM for every replica still running at the end.
    pub clean_exit: bool,
}

impl RunResult {
    pub fn rate(&self) -> f64 {
        ITEMS as f64 / self.drain.as_secs_f64()
    }

    pub fn ceiling() -> f64 {
        f64::from(VENDOR_RATE) * 100.0
    }

    pub fn of_ceiling(&self) -> f64 {
        self.rate() / Self::ceiling()
    }

    pub fn fill(&self) -> f64 {
        if self.ok_calls == 0 {
            return 0.0;
        }
        self.ok_items as f64 / (self.ok_calls as f64 * 100.0)
    }

    pub fn all_applied(&self) -> bool {
        self.complete && self.left == 0 && self.queue_left == Some(0)
    }
}

/// The most calls whose arrivals lie within one window `[t, t + 1000)`.
fn busiest_second(calls: &[CallRecord]) -> usize {
    let mut at: Vec<u64> = calls.iter().map(|c| c.at_ms).collect();
    at.sort_unstable();
    let (mut best, mut lo) = (0, 0);
    for hi in 0..at.len() {
        while at[hi] >= at[lo] + 1000 {
            lo += 1;
        }
        best = best.max(hi + 1 - lo);
    }
    best
}

/// `n` replicas drain the backlog; with `kill`, the active one gets
/// SIGKILL once `KILL_AFTER_CALLS` calls went upstream.
pub async fn run(n: usize, kill: bool, timeout: Duration) -> RunResult {
    let dir = tempfile::tempdir().expect("temp dir");
    let emu = EmulatorProc::start(dir.path());
    let users: Vec<String> = (0..MEMBERS).map(user).collect();
    emu.seed(&Seed {
        channels: (0..CHANNELS)
            .map(|c| SeedChannel::new(chan(c), users.clone()))
            .collect(),
        ..Seed::default()
    })
    .await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let queue = unique_queue(&format!("replicas{n}{}", if kill { "k" } else { "" }));

    // Once, to declare the topology (work queue, lock queue, dead letters)
    // exactly as the service does; it then hands the token back on SIGTERM.
    {
        let (p, d) = Replica::spawn("declare", &emu.url, &queue);
        let mut r = Replica::ready(p, d).await;
        let active = sole_active(
            &http,
            std::slice::from_ref(&r),
            &[0],
            Duration::from_secs(30),
        )
        .await
        .is_some();
        assert!(
            active,
            "the declaring replica never became active:\n{}",
            r.proc.log_tail(20)
        );
        // Active is reported when the lease is won, a moment before the
        // work queue is declared; a publish to a queue not declared yet is
        // confirmed and dropped, so wait for the queue itself.
        let deadline = Instant::now() + Duration::from_secs(30);
        while ready_messages(&queue).await.is_none() {
            assert!(
                Instant::now() < deadline,
                "the declaring replica never declared {queue}:\n{}",
                r.proc.log_tail(20)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        r.proc.terminate(30).await;
    }

    let channels: Arc<Vec<String>> = Arc::new((0..CHANNELS).map(chan).collect());
    let make: MakeReq = Arc::new(move |k| Req {
        id: format!("rp-ban-{k}"),
        body: json!({
            "type": "user.banned",
            "timestamp": "2026-11-21T10:00:00Z",
            "data": {"user_id": user(k as usize), "channels": *channels}
        })
        .to_string(),
    });
    let publish = publish_backlog(&queue, MEMBERS as u64, make).await;
    let queued = ready_messages(&queue).await;
    assert_eq!(
        queued,
        Some(MEMBERS as u32),
        "the whole backlog waits in {queue} before the replicas start"
    );

    let started_ms = wall_ms();
    let spawned: Vec<_> = (0..n)
        .map(|i| Replica::spawn(&format!("replica-{i}"), &emu.url, &queue))
        .collect();
    let mut replicas = Vec::new();
    for (p, d) in spawned {
        replicas.push(Replica::ready(p, d).await);
    }
    let all: Vec<usize> = (0..n).collect();

    let mut kill_ms = None;
    let mut dead_ms = 0;
    let mut killed = None;
    let mut calls_before_kill = 0;
    let mut kill_to_active = None;
    if kill {
        let deadline = Instant::now() + timeout;
        loop {
            let s = emu.stats().await;
            if s.calls >= KILL_AFTER_CALLS || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let leader = sole_active(&http, &replicas, &all, Duration::from_secs(5)).await;
        if let Some(l) = leader {
            let at = wall_ms();
            replicas[l].proc.kill9();
            dead_ms = wall_ms();
            kill_ms = Some(at);
            killed = Some(l);
            calls_before_kill = emu.stats().await.calls;
            let survivors: Vec<usize> = all.iter().copied().filter(|&i| i != l).collect();
            if sole_active(&http, &replicas, &survivors, Duration::from_secs(60))
                .await
                .is_some()
            {
                kill_to_active = Some(Duration::from_millis(wall_ms() - at));
            }
        } else {
            eprintln!("  no sole active replica to kill");
        }
    }

    let deadline = Instant::now() + timeout;
    let mut complete = false;
    while Instant::now() < deadline {
        let s = emu.stats().await;
        if s.applied >= ITEMS {
            complete = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !complete {
        eprintln!(
            "  {n} replicas: not complete after {} s ({} of {ITEMS} applied)",
            timeout.as_secs(),
            emu.stats().await.applied
        );
    }
    // Anything still in flight lands in the log.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let stats = emu.stats().await;
    let calls = emu.calls().await;
    let left = emu.left().await;
    let first = calls.iter().map(|c| c.at_ms).min().unwrap_or(0);
    let last = calls.iter().map(|c| c.at_ms).max().unwrap_or(0);
    let ok: Vec<&CallRecord> = calls
        .iter()
        .filter(|c| c.error_code == 0 && c.http_status.is_none())
        .collect();
    let mut per_second = vec![0u64; ((last.saturating_sub(first)) / 1000 + 1) as usize];
    for c in &calls {
        per_second[((c.at_ms - first) / 1000) as usize] += 1;
    }
    let kill_to_next_call = kill_ms.and_then(|k| {
        calls
            .iter()
            .map(|c| c.at_ms)
            .filter(|&t| t >= dead_ms)
            .min()
            .map(|t| Duration::from_millis(t - k))
    });
    let leader_now = if killed.is_none() {
        sole_active(&http, &replicas, &all, Duration::from_secs(2)).await
    } else {
        None
    };
    let mut per_replica = Vec::new();
    for (i, r) in replicas.iter().enumerate() {
        let up = if Some(i) == killed {
            None
        } else {
            r.metric(&http, "chat_janitor_upstream_requests_total")
                .await
        };
        let lead = Some(i) == leader_now || Some(i) == killed;
        per_replica.push((r.proc.name.clone(), up, lead));
    }

    if !complete || left > 0 {
        // Say why: what each replica counted, and what it logged.
        for r in &replicas {
            let text = match http
                .get(format!("http://127.0.0.1:{}/metrics", r.port))
                .send()
                .await
            {
                Ok(x) => x.text().await.unwrap_or_default(),
                Err(e) => format!("(no /metrics: {e})"),
            };
            let keep: Vec<&str> = text
                .lines()
                .filter(|l| {
                    !l.starts_with('#')
                        && [
                            "chat_janitor_dispatch_active",
                            "chat_janitor_pending_items",
                            "chat_janitor_events_received_total",
                            "chat_janitor_events_duplicate_total",
                            "chat_janitor_upstream_requests_total",
                            "(no",
                        ]
                        .iter()
                        .any(|p| l.starts_with(p))
                })
                .collect();
            eprintln!(
                "  ---- {} (port {}):\n{}\n  -- last log lines:\n{}",
                r.proc.name,
                r.port,
                keep.join("\n"),
                r.proc.log_tail(25)
            );
        }
        eprintln!(
            "  ready messages: {queue} {:?}, {queue}.dead {:?}",
            ready_messages(&queue).await,
            ready_messages(&format!("{queue}.dead")).await
        );
    }

    let mut clean_exit = true;
    for r in replicas.iter_mut() {
        if r.proc.running() {
            clean_exit &= r.proc.terminate(60).await;
        }
    }
    let queue_left = ready_messages(&queue).await;
    drop(replicas);
    let mut emu_proc = emu.proc;
    emu_proc.terminate(10).await;
    delete_queue(&queue).await;

    RunResult {
        replicas: n,
        complete,
        left,
        queue_left,
        calls: stats.calls,
        ok_calls: ok.len() as u64,
        ok_items: ok.iter().map(|c| c.accounts.len() as u64).sum(),
        applied: stats.applied,
        noop: stats.noop,
        refused_60007: stats.refused_60007,
        other_errors: if stats.other_errors.is_empty() {
            "none".into()
        } else {
            stats.other_errors
        },
        busiest: busiest_second(&calls),
        emulator_peak: stats.peak,
        drain: Duration::from_secs_f64(
            ((last - first) as f64 + 1000.0 / f64::from(VENDOR_RATE)) / 1000.0,
        ),
        publish,
        start_to_first: Duration::from_millis(first.saturating_sub(started_ms)),
        per_replica,
        kill_to_next_call,
        kill_to_active,
        calls_before_kill,
        per_second,
        refused_at: calls
            .iter()
            .filter(|c| c.error_code == 60_007)
            .map(|c| c.at_ms - first)
            .collect(),
        kill_at: kill_ms.map(|k| k.saturating_sub(first)),
        clean_exit,
    }
}

// ---------------------------------------------------------------- the rows

fn print_run(what: &str, r: &RunResult) {
    println!(
        "  {what} ({} serve process{}): backlog published in {} ({} messages, confirmed); first call {} after the replicas started; {} calls ({} ok), {} applied + {} no-op, drain {} ({:.0} removals/s, {:.3} of ceiling), fill {:.3}, 60007: {}, other errors: {}, busiest 1 s window {} calls (emulator's peak {}), subscriptions left {}, ready messages left {:?}, SIGTERM exits clean: {}",
        r.replicas,
        if r.replicas == 1 { "" } else { "es" },
        secs(r.publish),
        MEMBERS,
        secs(r.start_to_first),
        thousands(r.calls),
        thousands(r.ok_calls),
        thousands(r.applied),
        thousands(r.noop),
        secs(r.drain),
        r.rate(),
        r.of_ceiling(),
        r.fill(),
        r.refused_60007,
        r.other_errors,
        r.busiest,
        r.emulator_peak,
        r.left,
        r.queue_left,
        r.clean_exit
    );
    let per: Vec<String> = r
        .per_replica
        .iter()
        .map(|(n, c, lead)| {
            format!(
                "{n}{}: {}",
                if *lead { " (leader)" } else { "" },
                c.map_or("killed".into(), |c| format!("{c:.0}"))
            )
        })
        .collect();
    println!("    upstream_requests_total by replica: {}", per.join(", "));
    if let Some(k) = r.kill_to_next_call {
        println!(
            "    kill -9 of the leader after {} calls: next upstream call {} later; a survivor reported active after {}",
            r.calls_before_kill,
            secs(k),
            r.kill_to_active.map_or("never".into(), secs)
        );
    }
    if !r.refused_at.is_empty() {
        println!(
            "    60007 refusals at ms after the first call: {:?}{}",
            r.refused_at,
            r.kill_at
                .map_or(String::new(), |k| format!(" (the kill at {k} ms)"))
        );
    }
    println!(
        "    calls per second of the drain: {}",
        r.per_second
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    );
}

fn vs(x: f64, base: f64) -> String {
    if base > 0.0 {
        format!("; {:.3}x row A", x / base)
    } else {
        String::new()
    }
}

/// The common rows of a drain; with `goals`, judged, else the goals shown
/// in parentheses.
fn rows(rep: &mut Report, section: &str, r: &RunResult, base: Option<&RunResult>, goals: bool) {
    let g = |ok: bool| if goals { verdict(ok) } else { Verdict::Info };
    let goal = |s: &str| {
        if goals {
            s.to_owned()
        } else {
            format!("({s})")
        }
    };
    rep.row(
        section,
        "drain rate, first to last upstream call (+1 slot)",
        format!("{:.0} removals/s ({})", r.rate(), secs(r.drain)),
        format!(
            "ceiling {}/s = {VENDOR_RATE} calls/s x 100",
            thousands(RunResult::ceiling() as u64)
        ),
        format!(
            "{:.3} of ceiling{}",
            r.of_ceiling(),
            base.map_or(String::new(), |b| vs(r.rate(), b.rate()))
        ),
        &goal(">= 0.95"),
        g(r.of_ceiling() >= 0.95 && r.complete),
    );
    rep.row(
        section,
        "batch fill (accounts per delete_subscriber / 100)",
        format!(
            "{:.1} per call ({} calls)",
            r.fill() * 100.0,
            thousands(r.calls)
        ),
        format!("minimum {} calls", thousands(MIN_CALLS)),
        format!(
            "{:.3}{}",
            r.fill(),
            base.map_or(String::new(), |b| vs(r.fill(), b.fill()))
        ),
        &goal(">= 0.98"),
        g(r.fill() >= 0.98),
    );
    rep.row(
        section,
        "most calls in any sliding 1,000 ms window",
        r.busiest.to_string(),
        format!("vendor limit {VENDOR_RATE}"),
        format!(
            "{:.3}{}",
            r.busiest as f64 / f64::from(VENDOR_RATE),
            base.map_or(String::new(), |b| vs(r.busiest as f64, b.busiest as f64))
        ),
        &goal("<= 200"),
        g(r.busiest <= VENDOR_RATE as usize),
    );
    rep.row(
        section,
        "calls refused for frequency (60007)",
        r.refused_60007.to_string(),
        format!(
            "of {} calls; row A: {}; other errors: {}",
            thousands(r.calls),
            base.map_or(r.refused_60007, |b| b.refused_60007),
            r.other_errors
        ),
        "",
        &goal("= 0"),
        g(r.refused_60007 == 0),
    );
}

fn applied_row(rep: &mut Report, section: &str, r: &RunResult) {
    rep.row(
        section,
        "everything applied (subscriptions left; queue left)",
        format!(
            "{} of {} removed ({} left; {} ready messages)",
            thousands(ITEMS - r.left as u64),
            thousands(ITEMS),
            r.left,
            r.queue_left.map_or("?".into(), |q| thousands(u64::from(q)))
        ),
        format!(
            "{} no-op repeats; SIGTERM exit 0: {}",
            thousands(r.noop),
            if r.clean_exit { "all" } else { "NOT all" }
        ),
        "",
        "all, 0 left",
        verdict(r.all_applied()),
    );
}

fn per_replica(r: &RunResult) -> String {
    r.per_replica
        .iter()
        .map(|(_, c, lead)| {
            let c = c.map_or("killed".into(), |c| thousands(c as u64));
            if *lead {
                format!("leader {c}")
            } else {
                c
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Section 6: rows A (1 replica), B (3 replicas) and C (3, kill -9).
pub async fn section(rep: &mut Report) {
    println!(
        "\n== 6. Scale-out (issue 11): {} serve replicas in broker mode, each with requests_per_second = {VENDOR_RATE}, a backlog of {} removals ({MEMBERS} bans x {CHANNELS} channels of {MEMBERS}) in RabbitMQ before they start; the emulator as its own process (--rate {VENDOR_RATE})",
        binary().display(),
        thousands(ITEMS)
    );
    let limit = Duration::from_secs(90);

    let cpu = CpuMeter::start();
    let a = run(1, false, limit).await;
    print_run("A. 1 replica", &a);
    println!("    {}", cpu.report());
    let s = "6a. Scale-out: 1 replica (baseline)";
    rows(rep, s, &a, None, false);
    applied_row(rep, s, &a);

    let cpu = CpuMeter::start();
    let b = run(3, false, limit).await;
    print_run("B. 3 replicas", &b);
    println!("    {}", cpu.report());
    let s = "6b. Scale-out: 3 replicas, 200/s each";
    rows(rep, s, &b, Some(&a), true);
    applied_row(rep, s, &b);
    rep.row(
        s,
        "upstream calls by replica (upstream_requests_total)",
        per_replica(&b),
        format!("row A: {}", per_replica(&a)),
        "",
        "",
        Verdict::Info,
    );

    let cpu = CpuMeter::start();
    let c = run(3, true, limit).await;
    print_run("C. 3 replicas, kill -9 of the leader", &c);
    println!("    {}", cpu.report());
    let s = "6c. Scale-out: kill -9 of the leader mid-drain";
    rep.row(
        s,
        "kill -9 to the next upstream call",
        c.kill_to_next_call.map_or("never".into(), secs),
        format!(
            "killed after {} calls; a survivor active after {}",
            thousands(c.calls_before_kill),
            c.kill_to_active.map_or("never".into(), secs)
        ),
        c.kill_to_next_call.map_or(String::new(), |k| {
            format!("{:.3} of 5 s", k.as_secs_f64() / 5.0)
        }),
        "<= 5 s",
        verdict(
            c.kill_to_next_call
                .is_some_and(|k| k <= Duration::from_secs(5)),
        ),
    );
    rep.row(
        s,
        "calls refused for frequency (60007), across the handover",
        c.refused_60007.to_string(),
        format!(
            "of {} calls; busiest 1,000 ms window {} calls",
            thousands(c.calls),
            c.busiest
        ),
        "",
        "= 0",
        verdict(c.refused_60007 == 0),
    );
    applied_row(rep, s, &c);
    rep.row(
        s,
        "drain with the handover (first to last call); fill",
        format!(
            "{:.0} removals/s ({}); fill {:.3}",
            c.rate(),
            secs(c.drain),
            c.fill()
        ),
        format!("row B: {:.0} removals/s; fill {:.3}", b.rate(), b.fill()),
        format!("{:.3} of ceiling", c.of_ceiling()),
        "",
        Verdict::Info,
    );
}
