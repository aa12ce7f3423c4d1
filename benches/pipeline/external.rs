//! External ingest (issue 13): the figure users measure. Every part is a
//! process of its own, as a user would run it:
//!
//! - the service: the release binary, `chat-janitor serve`, embedded mode on
//!   the defaults (default log level too), configured by `CHAT_JANITOR__*`
//!   variables: the embedded emulator off, the bench's webhook secret;
//! - its upstream, `chat-janitor emulator --rate 200`, so the emulator's CPU
//!   is not charged to intake;
//! - for reference, a bare actix-web 4 handler: this bench binary run again
//!   with [`BARE_ENV`] set; default workers, it takes the body and answers
//!   202 to any non-empty POST;
//! - the load generator: `wrk -t1 -c64` (installed with apt-get if missing)
//!   with a Lua script replaying a file of requests signed beforehand with
//!   the service's webhook secret: each a fresh `webhook-id`, timestamps
//!   taken when the file is written (just before its round, so they are
//!   within the service's 300 s tolerance).
//!
//! One service process goes through the embedded phases in order, so what
//! the earlier ones left behind (accepted ids, a backlog) is there for the
//! later ones:
//!
//! A. fresh journal: rounds alternating bare handler / service, bans naming
//!    two channels (the issue's shape; 2 actions per event, so intake at
//!    more than 10,000 events/s outruns the vendor's 20,000 removals/s and
//!    a backlog builds);
//! B. fill: wrk until 1,000,000 ids were accepted (the service's
//!    `events_received_total{source="webhook"}`);
//! C. the rounds of A again, with those ids in the dedupe window;
//! D. rounds with mixed events (2 channels, 1 following, 1 follower):
//!    `follow_delete` is keyed by From_Account, so every banned user and
//!    every follower is a key of its own, one item per call at 200 calls/s,
//!    and a backlog builds, as in a real ban wave;
//! E. more mixed events until the backlog passes `dispatch.max_pending_items`
//!    (see [`MemResult`] for how that is read from outside), and on for a
//!    while: VmRSS over time, VmHWM.
//!
//! Then broker mode (F): a backlog of events carrying 120 actions each
//! (40 channels, 40 following, 40 followers), so the default prefetch
//! (2,000 deliveries) holds more than `max_pending_items`, published to
//! RabbitMQ before a broker-mode `serve` starts: VmRSS over time, VmHWM.
//!
//! Last (G), the records' cost: fresh embedded services, alternately with
//! `[records] enabled = false` and `true`, each given one round of wrk and
//! then waited for until every accepted event settled; the process's CPU
//! over that, per event.
//!
//! `--long-ids` gives every user id of E and F a 14-byte prefix, so that
//! none fits the 15 bytes an id is held in without an allocation: the
//! memory figures for UUID-like UserIDs.
//!
//! Per service round: 202s per second (from the service's counters, with the
//! full status mix), wrk's p50 / p99, and the service's CPU per accepted
//! event by thread group, from /proc/<pid>/task/*/stat before and after:
//! journal (`journal-*`), HTTP (`actix-server*`: workers and acceptor),
//! pipeline (the rest: tokio workers, main, threads that exited); how long
//! those groups' threads waited for a core per 202 (runnable but not
//! running, from /proc/<pid>/task/*/schedstat), and how busy the machine's
//! cores were (/proc/stat): together they tell a service short of cores
//! from one waiting on something else (the disk, a lock).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpResponse, HttpServer};
use chat_janitor::emulator::{Seed, SeedChannel};
use chat_janitor::ingest::signature;
use serde_json::json;

use crate::common::*;
use crate::report::{Report, Verdict};
use crate::{mib, secs, thousands, verdict};

/// Set in the environment of a re-run of this bench binary to make it the
/// bare handler.
pub const BARE_ENV: &str = "CJ_BENCH_BARE_HANDLER";
const CONNECTIONS: u32 = 64;
/// Channels the events name (seeded, empty: every removal is a no-op
/// upstream, which costs the service the same as an applied one).
const CHANNELS: usize = 50;
const FULL_FILL: u64 = 1_000_000;
const QUICK_FILL: u64 = 200_000;
const P99_GOAL_MS: f64 = 13.0;
/// Events in the broker backlog (each 120 actions).
const BROKER_EVENTS: u64 = 4_000;

/// The Lua side of the load: replays the pool file named by
/// `CJ_BENCH_POOL`, records of an 8-digit length and a raw HTTP request; at
/// its end it starts over (`wraps` counts that: a repeated id is answered
/// 200 by the service). One file per wrk process, so run it with `-t1`.
/// `done` prints one line the bench parses; it runs once, so it costs
/// nothing per request (a `response` hook would, on both servers).
const LUA: &str = r#"-- chat-janitor bench: replay pre-signed webhook requests
local pool = os.getenv("CJ_BENCH_POOL")
local f = nil
wraps = 0
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  f = assert(io.open(pool, "rb"))
end

function request()
  local len = f:read(8)
  if not len then
    wraps = wraps + 1
    f:seek("set", 0)
    len = f:read(8)
  end
  return f:read(tonumber(len))
end

function done(summary, latency, requests)
  local wrapped = 0
  for _, t in ipairs(threads) do
    wrapped = wrapped + t:get("wraps")
  end
  local e = summary.errors
  io.write(string.format(
    "CJBENCH requests=%.0f duration_us=%.0f connect=%.0f read=%.0f write=%.0f status=%.0f timeout=%.0f p50_us=%.0f p99_us=%.0f mean_us=%.0f max_us=%.0f wraps=%.0f threads=%.0f\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(99), latency.mean,
    latency.max, wrapped, #threads))
end
"#;

// ---------------------------------------------------------------- the bare handler

/// The bare handler's process: prints its address on stdout, serves until
/// killed.
pub fn serve_bare() {
    let ran = actix_web::rt::System::new().block_on(async {
        let server =
            HttpServer::new(|| App::new().default_service(web::to(bare))).bind(("127.0.0.1", 0))?;
        let port = server.addrs()[0].port();
        println!("bare handler on http://127.0.0.1:{port}");
        std::io::stdout().flush()?;
        server.run().await
    });
    if let Err(e) = ran {
        eprintln!("bare handler: {e}");
        std::process::exit(1);
    }
}

/// Takes the body (so the connection stays keep-alive, as for the service).
async fn bare(body: web::Bytes) -> HttpResponse {
    if body.is_empty() {
        HttpResponse::BadRequest().finish()
    } else {
        HttpResponse::Accepted().finish()
    }
}

pub fn start_bare(dir: &Path) -> (Proc, String) {
    let log = dir.join("bare.log");
    let mut child = Command::new(std::env::current_exe().expect("the bench binary"))
        .env(BARE_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("bare log"))
        .spawn()
        .expect("the bare handler starts");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the bare handler prints its address");
    let base = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();
    (Proc::new("bare handler", child, log), base)
}

// ---------------------------------------------------------------- requests

/// The events sent.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// `user.banned` naming two channels (the issue's shape).
    Ban,
    /// `user.banned` naming 2 channels, 1 following, 1 follower.
    Mixed,
    /// 40 channels, 40 following, 40 followers (the broker backlog).
    Wide,
}

impl Shape {
    fn actions(self) -> usize {
        match self {
            Shape::Ban => 2,
            Shape::Mixed => 4,
            Shape::Wide => 120,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Shape::Ban => "bans naming 2 channels",
            Shape::Mixed => "mixed: bans naming 2 channels, 1 following, 1 follower",
            Shape::Wide => "wide: bans naming 40 channels, 40 following, 40 followers",
        }
    }

    fn body(self, user: &str, k: u64) -> String {
        let ch = |i: u64| channel("ext", ((k + i) % CHANNELS as u64) as usize);
        let data = match self {
            Shape::Ban => json!({"user_id": user, "channels": [ch(0), ch(1)]}),
            Shape::Mixed => json!({
                "user_id": user,
                "channels": [ch(0), ch(1)],
                "following": [format!("star{}", k % 1000)],
                "followers": [format!("{user}-fan")],
            }),
            Shape::Wide => json!({
                "user_id": user,
                "channels": (0..40).map(ch).collect::<Vec<_>>(),
                "following": (0..40).map(|i| format!("star{i}")).collect::<Vec<_>>(),
                "followers": (0..40).map(|i| format!("{user}-fan{i}")).collect::<Vec<_>>(),
            }),
        };
        json!({"type": "user.banned", "timestamp": "2026-11-21T10:00:00Z", "data": data})
            .to_string()
    }
}

/// `--long-ids`: every user id the section sends gets this prefix, so
/// that ids (and followers' ids) are 22 to 30 bytes, past what the service
/// holds inline (15 bytes), as UUID-like UserIDs would be.
const LONG_ID_PREFIX: &str = "u7f3a9c2e5b1d-";

/// A tag for the ids of one pool: as given, or with `LONG_ID_PREFIX`.
fn id_tag(tag: &str) -> String {
    if std::env::args().any(|a| a == "--long-ids") {
        format!("{LONG_ID_PREFIX}{tag}")
    } else {
        tag.to_owned()
    }
}

/// Prints the longest user id a phase sends and its followers' (`Shape`
/// names them `{user}-{suffix}`), with their lengths.
fn print_ids(user: &str, suffix: &str) {
    let fan = format!("{user}-{suffix}");
    println!(
        "    ids: users like {user} ({} bytes), followers {fan} ({} bytes); ids of up to 15 bytes are held inline (README, For operators)",
        user.len(),
        fan.len()
    );
}

/// Writes `n` requests signed now (ids `{tag}-0..n`) to `path`, as the Lua
/// script reads them.
fn write_pool(path: &Path, tag: &str, shape: Shape, n: u64) {
    let key = webhook_key();
    let ts = unix_secs().to_string();
    let file = std::fs::File::create(path).expect("pool file");
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut req = String::with_capacity(4096);
    for k in 0..n {
        let id = format!("{tag}-{k}");
        let body = shape.body(&id, k);
        let sig = signature::sign(&key, &id, &ts, body.as_bytes());
        req.clear();
        let _ = write!(
            req,
            "POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nwebhook-id: {id}\r\nwebhook-timestamp: {ts}\r\nwebhook-signature: {sig}\r\n\r\n{body}",
            body.len()
        );
        write!(w, "{:08}", req.len()).expect("pool write");
        w.write_all(req.as_bytes()).expect("pool write");
    }
    w.flush().expect("pool write");
}

// ---------------------------------------------------------------- wrk

fn ensure_wrk() -> Option<String> {
    let have = || !sh("sh", &["-c", "command -v wrk"]).is_empty();
    if !have() {
        println!("  wrk not found: installing it (apt-get install -y wrk)");
        let install = || {
            Command::new("apt-get")
                .args(["install", "-y", "-q", "wrk"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !install() {
            let _ = Command::new("apt-get")
                .args(["update", "-q"])
                .stdout(Stdio::null())
                .status();
            install();
        }
    }
    if !have() {
        return None;
    }
    let out = Command::new("wrk").arg("-v").output().ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(text.lines().next().unwrap_or("wrk").trim().to_owned())
}

/// What one wrk run reported (its `done` line) and cost.
#[derive(Default)]
struct WrkOut {
    requests: u64,
    secs: f64,
    /// Answers with a status >= 400.
    status_errors: u64,
    socket_errors: u64,
    timeouts: u64,
    p50_ms: f64,
    p99_ms: f64,
    /// Times the pool ran out and started over.
    wraps: u64,
    /// wrk's own CPU, per request.
    cpu_us: f64,
}

/// A running wrk: stdout to a file, read once it exited.
struct Wrk {
    child: std::process::Child,
    out: PathBuf,
    ticks0: u64,
}

impl Wrk {
    fn start(script: &Path, pool: &Path, url: &str, limit: Duration) -> Wrk {
        let out = pool.with_extension("wrk.out");
        let ticks0 = children_ticks();
        let child = Command::new("wrk")
            .args(["-t1", &format!("-c{CONNECTIONS}")])
            .arg(format!("-d{}s", limit.as_secs().max(1)))
            .args(["--timeout", "10s", "-s"])
            .arg(script)
            .arg(url)
            .env("CJ_BENCH_POOL", pool)
            .stdout(std::fs::File::create(&out).expect("wrk output"))
            .stderr(Stdio::inherit())
            .spawn()
            .expect("wrk starts");
        Wrk { child, out, ticks0 }
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Asks wrk to stop now (SIGINT: it prints its summary and exits).
    fn interrupt(&self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
    }

    async fn finish(mut self) -> WrkOut {
        while self.running() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self.child.wait();
        let cpu = (children_ticks() - self.ticks0) as f64 / TICKS_PER_S;
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        let _ = std::fs::remove_file(&self.out);
        let Some(line) = text.lines().find_map(|l| l.strip_prefix("CJBENCH ")) else {
            panic!("wrk printed no summary line:\n{text}");
        };
        let v: BTreeMap<&str, f64> = line
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
            .collect();
        let g = |k: &str| v.get(k).copied().unwrap_or(0.0);
        let requests = g("requests") as u64;
        WrkOut {
            requests,
            secs: g("duration_us") / 1e6,
            status_errors: g("status") as u64,
            socket_errors: (g("connect") + g("read") + g("write")) as u64,
            timeouts: g("timeout") as u64,
            p50_ms: g("p50_us") / 1000.0,
            p99_ms: g("p99_us") / 1000.0,
            wraps: g("wraps") as u64,
            cpu_us: cpu * 1e6 / requests.max(1) as f64,
        }
    }
}

// ---------------------------------------------------------------- the service, read from outside

/// The service's counters, from /metrics.
#[derive(Default, Clone)]
struct Snap {
    received: f64,
    amqp_received: f64,
    duplicate: f64,
    rejected: BTreeMap<String, f64>,
    pending: BTreeMap<String, f64>,
    journal_events: Option<f64>,
    /// Events whose every action settled (`event_settle_seconds_count`).
    settled: f64,
}

impl Snap {
    fn pending_sum(&self) -> f64 {
        self.pending.values().sum()
    }

    /// Events accepted (webhooks) or taken from the queue, not yet settled.
    fn outstanding(&self) -> f64 {
        (self.received + self.amqp_received - self.settled).max(0.0)
    }

    fn rejected_sum(&self) -> f64 {
        self.rejected.values().sum()
    }

    /// Requests answered (any status the service counts) since `before`.
    fn answered_since(&self, before: &Snap) -> f64 {
        (self.received - before.received)
            + (self.duplicate - before.duplicate)
            + (self.rejected_sum() - before.rejected_sum())
    }

    fn pending_line(&self) -> String {
        let by: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, v)| **v > 0.0)
            .map(|(k, v)| format!("{k} {}", thousands(*v as u64)))
            .collect();
        format!(
            "pending {}{}",
            thousands(self.pending_sum() as u64),
            if by.is_empty() {
                String::new()
            } else {
                format!(" ({})", by.join(", "))
            }
        )
    }
}

/// Thread groups of the service.
const GROUPS: [&str; 3] = ["journal", "HTTP", "pipeline"];

fn group_of(comm: &str) -> usize {
    if comm.starts_with("journal-") {
        0
    } else if comm.starts_with("actix-server") {
        1
    } else {
        2
    }
}

/// One live thread's readings.
struct Task {
    comm: String,
    /// CPU ticks (/proc/<pid>/task/<tid>/stat).
    ticks: u64,
    /// Time waiting for a core, runnable but not running (ns), and times
    /// it was put on a core: /proc/<pid>/task/<tid>/schedstat's second and
    /// third fields (zero where the kernel has no schedstat).
    waited_ns: u64,
    slices: u64,
}

/// CPU ticks of a process, and each of its live threads' readings.
struct Threads {
    total: u64,
    each: BTreeMap<u32, Task>,
}

fn threads(pid: u32) -> Threads {
    let mut each = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for e in dir.flatten() {
            let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")) else {
                continue;
            };
            let comm = text
                .split_once('(')
                .and_then(|(_, r)| r.rsplit_once(')'))
                .map_or("", |(c, _)| c)
                .to_owned();
            let sched = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat"))
                .unwrap_or_default();
            let field = |i: usize| {
                sched
                    .split_whitespace()
                    .nth(i)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            each.insert(
                tid,
                Task {
                    comm,
                    ticks: ticks_in(&text).unwrap_or(0),
                    waited_ns: field(1),
                    slices: field(2),
                },
            );
        }
    }
    Threads {
        total: stat_ticks(&format!("/proc/{pid}/stat")).unwrap_or(0),
        each,
    }
}

impl Threads {
    /// A reading's growth between `self` and `later`, summed by group, over
    /// the threads alive at `later`.
    fn grown_until(&self, later: &Threads, f: fn(&Task) -> u64) -> [u64; 3] {
        let mut g = [0u64; 3];
        for (tid, t) in &later.each {
            let before = self.each.get(tid).map_or(0, f);
            g[group_of(&t.comm)] += f(t).saturating_sub(before);
        }
        g
    }

    /// Ticks per group between `self` and `later`: journal and HTTP from
    /// their threads, pipeline the rest of the process (so threads that
    /// exited meanwhile count there).
    fn groups_until(&self, later: &Threads) -> [u64; 3] {
        let mut g = self.grown_until(later, |t| t.ticks);
        g[2] = later
            .total
            .saturating_sub(self.total)
            .saturating_sub(g[0] + g[1]);
        g
    }

    /// Time the live threads of each group waited for a core between
    /// `self` and `later` (ns); threads that exited meanwhile are left out.
    fn waited_until(&self, later: &Threads) -> [u64; 3] {
        self.grown_until(later, |t| t.waited_ns)
    }

    /// "journal: journal-writer; HTTP: actix-server wo x2, ..."
    fn names(&self) -> String {
        let mut by: [BTreeMap<&str, usize>; 3] = Default::default();
        for t in self.each.values() {
            *by[group_of(&t.comm)].entry(t.comm.as_str()).or_default() += 1;
        }
        GROUPS
            .iter()
            .zip(&by)
            .map(|(g, names)| {
                let list: Vec<String> = names
                    .iter()
                    .map(|(n, c)| {
                        if *c > 1 {
                            format!("\"{n}\" x{c}")
                        } else {
                            format!("\"{n}\"")
                        }
                    })
                    .collect();
                format!("{g}: {}", list.join(", "))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// A `chat-janitor serve` process (port 0, read from its log).
struct Svc {
    proc: Proc,
    port: u16,
    http: reqwest::Client,
}

impl Svc {
    async fn start(dir: &Path, upstream: &str, name: &str, queue: Option<&str>) -> Svc {
        Svc::start_of(&binary(), dir, upstream, name, queue, &[]).await
    }

    async fn start_of(
        bin: &Path,
        dir: &Path,
        upstream: &str,
        name: &str,
        queue: Option<&str>,
        env: &[(&str, &str)],
    ) -> Svc {
        let log = dir.join(format!("{name}.log"));
        let mut cmd = serve_command_of(bin, dir, upstream);
        cmd.envs(env.iter().copied());
        // The default log level (info), as users run it.
        cmd.env_remove("RUST_LOG")
            .env("CHAT_JANITOR__SERVER__LISTEN", "127.0.0.1:0")
            .stderr(std::fs::File::create(&log).expect("serve log"));
        if let Some(q) = queue {
            cmd.env("CHAT_JANITOR__AMQP__URL", AMQP_URL)
                .env("CHAT_JANITOR__AMQP__QUEUE", q);
        }
        let mut proc = Proc::new(name, cmd.spawn().expect("chat-janitor serve starts"), log);
        let port = serving_port(&mut proc, Duration::from_secs(60)).await;
        Svc {
            proc,
            port,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/events", self.port)
    }

    fn pid(&self) -> u32 {
        self.proc.pid()
    }

    async fn snap(&self) -> Snap {
        let url = format!("http://127.0.0.1:{}/metrics", self.port);
        for _ in 0..10 {
            let text = match self.http.get(&url).send().await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            if text.is_empty() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            return Snap {
                received: metric_sum(
                    &text,
                    "chat_janitor_events_received_total",
                    "source=\"webhook\"",
                )
                .unwrap_or(0.0),
                amqp_received: metric_sum(
                    &text,
                    "chat_janitor_events_received_total",
                    "source=\"amqp\"",
                )
                .unwrap_or(0.0),
                duplicate: metric_sum(
                    &text,
                    "chat_janitor_events_duplicate_total",
                    "source=\"webhook\"",
                )
                .unwrap_or(0.0),
                rejected: metric_by_label(
                    &text,
                    "chat_janitor_events_rejected_total",
                    "source=\"webhook\"",
                    "reason",
                ),
                pending: metric_by_label(&text, "chat_janitor_pending_items", "", "api"),
                journal_events: metric_sum(&text, "chat_janitor_journal_events", ""),
                settled: metric_sum(&text, "chat_janitor_event_settle_seconds_count", "")
                    .unwrap_or(0.0),
            };
        }
        panic!(
            "{} does not answer /metrics:\n{}",
            self.proc.name,
            self.proc.log_tail(20)
        );
    }

    /// Waits (up to `limit`) until the service holds no unsettled event, so
    /// its background work does not slow the next bare round down.
    async fn wait_idle(&self, limit: Duration) -> Snap {
        let deadline = Instant::now() + limit;
        loop {
            let s = self.snap().await;
            let idle = match s.journal_events {
                Some(j) => j == 0.0,
                None => s.pending_sum() == 0.0,
            };
            if idle || Instant::now() >= deadline {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn rss(&self) -> u64 {
        status_kib(self.pid(), "VmRSS:").unwrap_or(0)
    }

    fn hwm(&self) -> u64 {
        status_kib(self.pid(), "VmHWM:").unwrap_or(0)
    }
}

// ---------------------------------------------------------------- rounds

struct Round {
    /// 202s per second.
    rate: f64,
    statuses: String,
    p50_ms: f64,
    p99_ms: f64,
    wrk_us: f64,
    /// Server CPU per 202 (µs): the service by group, or the bare process.
    cpu_us: [f64; 3],
    /// The service's threads' wait for a core per 202 (µs), by group
    /// (zero for the bare handler: not measured).
    wait_us: [f64; 3],
    /// Share of the machine's cores busy over the round (/proc/stat).
    busy: f64,
    /// Other processes' CPU over the round.
    background: String,
    wraps: u64,
}

impl Round {
    fn server_us(&self) -> f64 {
        self.cpu_us.iter().sum()
    }
}

/// Share of all cores busy between two `proc_stat` readings.
fn busy_share((t0, b0): (u64, u64), (t1, b1): (u64, u64)) -> f64 {
    b1.saturating_sub(b0) as f64 / t1.saturating_sub(t0).max(1) as f64
}

fn pct_core(ticks: u64, secs: f64) -> f64 {
    ticks as f64 / TICKS_PER_S / secs.max(1e-3) * 100.0
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

struct Plan {
    rounds: usize,
    round: Duration,
    warm: Duration,
    fill: u64,
    quick: bool,
}

impl Plan {
    fn from_args() -> Plan {
        if std::env::args().any(|a| a == "--quick") {
            Plan {
                rounds: 2,
                round: Duration::from_secs(3),
                warm: Duration::from_secs(1),
                fill: QUICK_FILL,
                quick: true,
            }
        } else {
            Plan {
                rounds: 3,
                round: Duration::from_secs(5),
                warm: Duration::from_secs(2),
                fill: FULL_FILL,
                quick: false,
            }
        }
    }
}

/// One phase's alternating rounds.
struct Phase {
    bare: Vec<Round>,
    svc: Vec<Round>,
    /// Thread names of the service as the first round ended.
    names: String,
    rss_end: u64,
}

impl Phase {
    fn rates(v: &[Round]) -> String {
        v.iter()
            .map(|r| thousands(r.rate as u64))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn ratio(&self) -> f64 {
        median(
            self.bare
                .iter()
                .zip(&self.svc)
                .map(|(b, s)| s.rate / b.rate.max(1.0))
                .collect(),
        )
    }

    fn svc_rate(&self) -> f64 {
        median(self.svc.iter().map(|r| r.rate).collect())
    }

    fn bare_rate(&self) -> f64 {
        median(self.bare.iter().map(|r| r.rate).collect())
    }

    fn svc_p50(&self) -> f64 {
        median(self.svc.iter().map(|r| r.p50_ms).collect())
    }

    fn svc_p99(&self) -> f64 {
        median(self.svc.iter().map(|r| r.p99_ms).collect())
    }

    fn p99s(&self) -> String {
        self.svc
            .iter()
            .map(|r| format!("{:.1}", r.p99_ms))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn cpu(&self, g: usize) -> f64 {
        median(self.svc.iter().map(|r| r.cpu_us[g]).collect())
    }

    /// Median runqueue wait per 202 by group: "9 / 30 / 25 us".
    fn wait_line(&self) -> String {
        let w = |g: usize| median(self.svc.iter().map(|r| r.wait_us[g]).collect());
        format!("{:.0} / {:.0} / {:.0} us", w(0), w(1), w(2))
    }

    fn cpu_line(&self) -> String {
        format!(
            "{:.0} / {:.0} / {:.0} us (total {:.0})",
            self.cpu(0),
            self.cpu(1),
            self.cpu(2),
            median(self.svc.iter().map(Round::server_us).collect())
        )
    }

    fn wraps(&self) -> u64 {
        self.svc.iter().map(|r| r.wraps).sum()
    }
}

struct Bench {
    plan: Plan,
    dir: tempfile::TempDir,
    script: PathBuf,
    emu: EmulatorProc,
    bare: Proc,
    bare_url: String,
    svc: Svc,
    /// Bare pools per shape, reused (the handler does not look at ids).
    bare_pools: BTreeMap<&'static str, PathBuf>,
    /// Highest 202/s seen from either server: sizes the bare handler's pools.
    fastest: f64,
    /// Highest 202/s seen from the service: sizes its pools.
    svc_fastest: f64,
    /// Pool files written so far (their ids never repeat).
    pools: u64,
}

impl Bench {
    fn pool(&mut self, tag: &str, shape: Shape, n: u64) -> PathBuf {
        self.pools += 1;
        let path = self.dir.path().join(format!("pool-{}.bin", self.pools));
        write_pool(&path, &id_tag(&format!("{tag}{}", self.pools)), shape, n);
        path
    }

    /// Requests enough for `d` at 1.5 x the fastest rate seen from either
    /// server (at least 40,000/s): the bare handler's pools.
    fn pool_size(&self, d: Duration) -> u64 {
        (self.fastest.max(40_000.0) * 1.5 * d.as_secs_f64()).ceil() as u64
    }

    /// Requests enough for `d` at twice the service's best rate so far (the
    /// bare handler's sizing before the service was measured); a pool that
    /// runs out anyway is reported.
    fn svc_pool_size(&self, d: Duration) -> u64 {
        if self.svc_fastest > 0.0 {
            (self.svc_fastest * 2.0 * d.as_secs_f64())
                .max(20_000.0)
                .ceil() as u64
        } else {
            self.pool_size(d)
        }
    }

    async fn bare_round(&mut self, shape: Shape, d: Duration) -> Round {
        let n = self.pool_size(self.plan.round);
        let pool = match self.bare_pools.get(shape.describe()) {
            Some(p) => p.clone(),
            None => {
                let p = self.pool("bare", shape, n);
                self.bare_pools.insert(shape.describe(), p.clone());
                p
            }
        };
        let (svc0, emu0) = (self.svc_ticks(), self.emu_ticks());
        let bare0 = stat_ticks(&format!("/proc/{}/stat", self.bare.pid())).unwrap_or(0);
        let m0 = proc_stat();
        let w = Wrk::start(
            &self.script,
            &pool,
            &format!("{}/v1/events", self.bare_url),
            d,
        )
        .finish()
        .await;
        let m1 = proc_stat();
        let bare1 = stat_ticks(&format!("/proc/{}/stat", self.bare.pid())).unwrap_or(0);
        let accepted = w.requests - w.status_errors;
        let rate = accepted as f64 / w.secs.max(1e-3);
        self.fastest = self.fastest.max(rate);
        Round {
            rate,
            statuses: format!(
                "202: {}{}{}",
                thousands(accepted),
                if w.status_errors > 0 {
                    format!(", >= 400: {}", w.status_errors)
                } else {
                    String::new()
                },
                errors(&w)
            ),
            p50_ms: w.p50_ms,
            p99_ms: w.p99_ms,
            wrk_us: w.cpu_us,
            cpu_us: [
                0.0,
                (bare1 - bare0) as f64 / TICKS_PER_S * 1e6 / accepted.max(1) as f64,
                0.0,
            ],
            wait_us: [0.0; 3],
            busy: busy_share(m0, m1),
            background: format!(
                "meanwhile serve {:.0}% of a core, emulator {:.0}%",
                pct_core(self.svc_ticks() - svc0, w.secs),
                pct_core(self.emu_ticks() - emu0, w.secs)
            ),
            wraps: 0,
        }
    }

    fn svc_ticks(&self) -> u64 {
        stat_ticks(&format!("/proc/{}/stat", self.svc.pid())).unwrap_or(0)
    }

    fn emu_ticks(&self) -> u64 {
        stat_ticks(&format!("/proc/{}/stat", self.emu.proc.pid())).unwrap_or(0)
    }

    async fn svc_round(&mut self, shape: Shape, d: Duration) -> (Round, Threads) {
        let n = self.svc_pool_size(d);
        let pool = self.pool("ext", shape, n);
        let s0 = self.svc.snap().await;
        let emu0 = self.emu_ticks();
        let t0 = threads(self.svc.pid());
        let m0 = proc_stat();
        let w = Wrk::start(&self.script, &pool, &self.svc.url(), d)
            .finish()
            .await;
        let m1 = proc_stat();
        let t1 = threads(self.svc.pid());
        let emu1 = self.emu_ticks();
        let s1 = self.svc.snap().await;
        let _ = std::fs::remove_file(&pool);
        let accepted = (s1.received - s0.received) as u64;
        let rate = accepted as f64 / w.secs.max(1e-3);
        self.fastest = self.fastest.max(rate);
        self.svc_fastest = self.svc_fastest.max(rate);
        let g = t0.groups_until(&t1);
        let waited = t0.waited_until(&t1);
        let per = |t: u64| t as f64 / TICKS_PER_S * 1e6 / accepted.max(1) as f64;
        let per_ns = |ns: u64| ns as f64 / 1e3 / accepted.max(1) as f64;
        let rejected: Vec<String> = s1
            .rejected
            .iter()
            .map(|(k, v)| (k, v - s0.rejected.get(k).copied().unwrap_or(0.0)))
            .filter(|(_, v)| *v > 0.0)
            .map(|(k, v)| format!("{k} {v:.0}"))
            .collect();
        let counted_errors = s1.rejected_sum() - s0.rejected_sum();
        let uncounted = (w.status_errors as f64 - counted_errors).max(0.0);
        let round = Round {
            rate,
            statuses: format!(
                "202: {}, 200 (repeated id): {}{}{}{}",
                thousands(accepted),
                thousands((s1.duplicate - s0.duplicate) as u64),
                if rejected.is_empty() {
                    String::new()
                } else {
                    format!(", refused: {}", rejected.join(", "))
                },
                if uncounted > 0.0 {
                    format!(", other >= 400 (e.g. 503): {uncounted:.0}")
                } else {
                    String::new()
                },
                errors(&w)
            ),
            p50_ms: w.p50_ms,
            p99_ms: w.p99_ms,
            wrk_us: w.cpu_us,
            cpu_us: [per(g[0]), per(g[1]), per(g[2])],
            wait_us: [per_ns(waited[0]), per_ns(waited[1]), per_ns(waited[2])],
            busy: busy_share(m0, m1),
            background: format!(
                "emulator {:.0}% of a core; {}",
                pct_core(emu1 - emu0, w.secs),
                s1.pending_line()
            ),
            wraps: w.wraps,
        };
        (round, t1)
    }

    async fn phase(&mut self, name: &str, shape: Shape, idle: bool) -> Phase {
        let mut out = Phase {
            bare: Vec::new(),
            svc: Vec::new(),
            names: String::new(),
            rss_end: 0,
        };
        for r in 1..=self.plan.rounds {
            if idle {
                let s = self.svc.wait_idle(Duration::from_secs(20)).await;
                if s.journal_events.unwrap_or(s.pending_sum()) > 0.0 {
                    println!(
                        "    (the service still held {} unsettled events after 20 s)",
                        thousands(s.outstanding() as u64)
                    );
                }
            }
            let d = self.plan.round;
            let b = self.bare_round(shape, d).await;
            print_round(&format!("{name} {r}"), "bare handler", &b, false);
            let (s, t) = self.svc_round(shape, d).await;
            print_round(&format!("{name} {r}"), "service", &s, true);
            if out.names.is_empty() {
                out.names = t.names();
            }
            out.bare.push(b);
            out.svc.push(s);
        }
        out.rss_end = self.svc.rss();
        let wraps = out.wraps();
        if wraps > 0 {
            println!(
                "    NOTE: a request pool ran out {wraps} time(s): the repeats were answered 200 and are not counted as 202s"
            );
        }
        out
    }
}

fn errors(w: &WrkOut) -> String {
    let mut s = String::new();
    if w.socket_errors > 0 {
        s += &format!(", socket errors: {}", w.socket_errors);
    }
    if w.timeouts > 0 {
        s += &format!(", timeouts (10 s): {}", w.timeouts);
    }
    s
}

fn print_round(phase: &str, who: &str, r: &Round, service: bool) {
    let cpu = if service {
        format!(
            "CPU per 202: journal {:.1} + HTTP {:.1} + pipeline {:.1} = {:.1} us; waited for a core: {:.1} / {:.1} / {:.1} us; machine {:.0}% busy",
            r.cpu_us[0],
            r.cpu_us[1],
            r.cpu_us[2],
            r.server_us(),
            r.wait_us[0],
            r.wait_us[1],
            r.wait_us[2],
            r.busy * 100.0
        )
    } else {
        format!(
            "CPU per 202: bare process {:.1} us; machine {:.0}% busy",
            r.server_us(),
            r.busy * 100.0
        )
    };
    println!(
        "  {phase:10} {who:12} {:>7} 202/s  p50 {:6.2} ms  p99 {:6.2} ms | {cpu}; wrk {:.1} us/request | {} | {}",
        thousands(r.rate as u64),
        r.p50_ms,
        r.p99_ms,
        r.wrk_us,
        r.background,
        r.statuses
    );
}

// ---------------------------------------------------------------- memory at the bound

/// One sample: seconds since the phase started, the service's counters,
/// VmRSS (KiB).
struct MemSample {
    t: f64,
    snap: Snap,
    rss: u64,
}

/// Memory while a backlog beyond the pending bound waits.
///
/// At the time of writing the bound (`max_pending_items`) is taken per
/// event, for all its actions, until the whole event settles, while
/// `chat_janitor_pending_items` counts the actions not yet settled: once an
/// event's unsubscribes are done and its follows wait, the gauge shows less
/// than the bound holds. So the bound
/// counts as reached when either the gauge reaches it or the outstanding
/// events (accepted or consumed, not settled) carry at least that many
/// actions: then, if memory is bounded as designed, the rest waits on disk
/// or in the queue.
struct MemResult {
    samples: Vec<MemSample>,
    per_event: usize,
    /// When the bound was first reached (seconds), if it was.
    reached: Option<f64>,
    hwm: u64,
}

impl MemResult {
    fn max_pending(&self) -> f64 {
        self.samples
            .iter()
            .map(|s| s.snap.pending_sum())
            .fold(0.0, f64::max)
    }

    fn last(&self) -> Option<&MemSample> {
        self.samples.last()
    }

    fn outstanding_line(&self, s: &Snap) -> String {
        format!(
            "outstanding {} events ({} actions)",
            thousands(s.outstanding() as u64),
            thousands(s.outstanding() as u64 * self.per_event as u64)
        )
    }

    fn print(&self, extra: impl Fn(&Snap) -> String) {
        let mut last = -1.0;
        for (i, s) in self.samples.iter().enumerate() {
            let at_bound = self.reached == Some(s.t);
            if s.t - last >= 1.0 || at_bound || i + 1 == self.samples.len() {
                last = s.t;
                println!(
                    "    t {:5.1} s  VmRSS {:>10}  {}; {}{}{}",
                    s.t,
                    mib(s.rss),
                    self.outstanding_line(&s.snap),
                    s.snap.pending_line(),
                    extra(&s.snap),
                    if at_bound { "  <- bound reached" } else { "" }
                );
            }
        }
        let at = self
            .reached
            .and_then(|t| self.samples.iter().find(|s| s.t == t));
        match (at, self.last()) {
            (Some(a), Some(z)) => println!(
                "    VmHWM {} (peak RSS of the process so far); bound reached at t {:.1} s with VmRSS {}; {:.1} s later VmRSS {}, outstanding events {} -> {}",
                mib(self.hwm),
                a.t,
                mib(a.rss),
                z.t - a.t,
                mib(z.rss),
                thousands(a.snap.outstanding() as u64),
                thousands(z.snap.outstanding() as u64)
            ),
            _ => println!(
                "    VmHWM {} (peak RSS of the process so far); bound NOT reached (most pending: {})",
                mib(self.hwm),
                thousands(self.max_pending() as u64)
            ),
        }
    }
}

/// Samples the service every 250 ms until the pending bound has been held
/// for `hold`, or `limit` passes; `wrk`, if given, keeps posting meanwhile
/// and is stopped at the end.
async fn watch_bound(
    svc: &Svc,
    bound: usize,
    per_event: usize,
    hold: Duration,
    limit: Duration,
    wrk: Option<Wrk>,
) -> (MemResult, Option<WrkOut>) {
    let t0 = Instant::now();
    let mut samples = Vec::new();
    let mut reached = None;
    loop {
        let snap = svc.snap().await;
        let t = t0.elapsed().as_secs_f64();
        let at = snap.pending_sum() + per_event as f64 > bound as f64
            || snap.outstanding() * per_event as f64 >= bound as f64;
        if at && reached.is_none() {
            reached = Some(t);
        }
        samples.push(MemSample {
            t,
            snap,
            rss: svc.rss(),
        });
        let held = reached.is_some_and(|r| t - r >= hold.as_secs_f64());
        if held || t0.elapsed() >= limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let out = match wrk {
        Some(w) => {
            w.interrupt();
            Some(w.finish().await)
        }
        None => None,
    };
    (
        MemResult {
            samples,
            per_event,
            reached,
            hwm: svc.hwm(),
        },
        out,
    )
}

// ---------------------------------------------------------------- the section

/// Section 7: prints every round and phase, adds the rows.
pub async fn section(rep: &mut Report) {
    let plan = Plan::from_args();
    let defaults =
        chat_janitor::config::from_toml(chat_janitor::config::EMBEDDED_DEFAULTS).expect("defaults");
    let bound = defaults.dispatch.max_pending_items;
    println!(
        "\n== 7. External ingest (issue 13): wrk -t1 -c{CONNECTIONS} against `{} serve` (embedded defaults, own process; upstream `chat-janitor emulator --rate {VENDOR_RATE}`, own process) and a bare actix-web 4 handler (own process, default workers, 202 to any non-empty POST); {} alternating rounds of {} s per phase{}",
        binary().display(),
        plan.rounds,
        plan.round.as_secs(),
        if plan.quick {
            format!(
                "; QUICK mode (--quick): fill of {} ids, not 1,000,000",
                thousands(plan.fill)
            )
        } else {
            String::new()
        }
    );
    let Some(wrk_version) = ensure_wrk() else {
        println!("  wrk is not installed and apt-get could not install it: section skipped");
        rep.row(
            "7. External ingest",
            "wrk available",
            "no",
            "apt-get install -y wrk failed",
            "",
            "wrk installed",
            Verdict::Missed,
        );
        return;
    };
    println!("  load generator: {wrk_version}; Lua script replaying pre-signed requests (one file per round, signed just before it; fresh webhook-ids)");
    let machine0 = proc_stat();
    let ours0 = self_ticks() + children_ticks();
    let started = Instant::now();

    let dir = tempfile::tempdir().expect("temp dir");
    let (script, emu) = script_and_emulator(dir.path()).await;
    let (bare, bare_url) = start_bare(dir.path());
    let svc_dir = dir.path().join("embedded");
    std::fs::create_dir_all(&svc_dir).expect("service dir");
    let svc = Svc::start(&svc_dir, &emu.url, "serve-embedded", None).await;
    println!(
        "  processes: serve pid {} (journal in {}), emulator pid {} at {}, bare handler pid {} at {}",
        svc.pid(),
        svc_dir.join("journal").display(),
        emu.proc.pid(),
        emu.url,
        bare.pid(),
        bare_url
    );
    let mut b = Bench {
        plan,
        dir,
        script,
        emu,
        bare,
        bare_url,
        svc,
        bare_pools: BTreeMap::new(),
        fastest: 0.0,
        svc_fastest: 0.0,
        pools: 0,
    };

    // Warm-up: connections, caches, the journal file's first pages.
    let warm = b.plan.warm;
    b.bare_round(Shape::Ban, warm).await;
    b.svc_round(Shape::Ban, warm).await;

    println!(
        "\n  A. fresh journal, {}: every round printed (bare, then service; the service idle before each bare round)",
        Shape::Ban.describe()
    );
    let fresh = b.phase("fresh", Shape::Ban, true).await;
    println!("    service threads by group (/proc/<pid>/task/*/stat): {}; threads that exited count as pipeline", fresh.names);
    println!("    serve VmRSS {} after phase A", mib(fresh.rss_end));

    println!(
        "\n  B. fill: wrk until {} ids were accepted (events_received_total{{source=\"webhook\"}}), {}",
        thousands(b.plan.fill),
        Shape::Ban.describe()
    );
    let fill = fill(&mut b).await;

    println!(
        "\n  C. with {} ids accepted and in the dedupe window, {}",
        thousands(fill.total),
        Shape::Ban.describe()
    );
    let filled = b.phase("filled", Shape::Ban, true).await;
    println!("    serve VmRSS {} after phase C", mib(filled.rss_end));

    println!(
        "\n  D. {}: a follow_delete backlog builds (one key per banned user and per follower, 200 calls/s); the service keeps working on it during the bare rounds (its CPU shown)",
        Shape::Mixed.describe()
    );
    let mixed = b.phase("mixed", Shape::Mixed, false).await;
    println!("    serve VmRSS {} after phase D", mib(mixed.rss_end));

    let hold = Duration::from_secs(if b.plan.quick { 5 } else { 15 });
    println!(
        "\n  E. embedded memory: {} until the backlog reaches max_pending_items ({} actions), then {} s more; wrk keeps posting throughout, so the backlog grows",
        Shape::Mixed.describe(),
        thousands(bound as u64),
        hold.as_secs()
    );
    println!(
        "    (the bound may hold all of an event's actions until the whole event settles, as it does at the time of writing, while chat_janitor_pending_items drops per settled action; so the bound counts as reached when the gauge reaches it or the outstanding events, accepted and not settled, carry that many actions)"
    );
    let limit = Duration::from_secs(if b.plan.quick { 30 } else { 60 }) + hold;
    // Enough to take the backlog past the bound, then to post through the
    // hold (if it runs out, repeats are answered 200 and the backlog stops
    // growing: the line after the samples says so).
    let n =
        (bound / Shape::Mixed.actions()) as u64 + b.svc_pool_size(hold + Duration::from_secs(5));
    let pool = b.pool("mem", Shape::Mixed, n);
    print_ids(
        &format!("{}-{}", id_tag(&format!("mem{}", b.pools)), n - 1),
        "fan",
    );
    let hwm_before = b.svc.hwm();
    let w = Wrk::start(
        &b.script,
        &pool,
        &b.svc.url(),
        limit + Duration::from_secs(30),
    );
    let (emb, wout) =
        watch_bound(&b.svc, bound, Shape::Mixed.actions(), hold, limit, Some(w)).await;
    let _ = std::fs::remove_file(&pool);
    emb.print(|_| String::new());
    println!(
        "    (VmHWM before phase E: {}; wrk meanwhile: {} requests, p99 {:.1} ms{})",
        mib(hwm_before),
        thousands(wout.as_ref().map_or(0, |w| w.requests)),
        wout.as_ref().map_or(0.0, |w| w.p99_ms),
        match wout.as_ref().map_or(0, |w| w.wraps) {
            0 => String::new(),
            n => format!("; its pool ran out {n} time(s), repeats answered 200"),
        }
    );

    let plan_round = b.plan.round;
    let cost_rounds = if b.plan.quick { 1 } else { 2 };
    let svc_fastest = b.svc_fastest;
    let Bench {
        dir,
        emu,
        mut bare,
        mut svc,
        script,
        ..
    } = b;
    // Its state is thrown away with the temp dir: no need for the drain
    // SIGTERM would wait for.
    svc.proc.kill9();
    bare.kill9();

    println!(
        "\n  F. broker memory: {} events ({}) published to a RabbitMQ queue, then a broker-mode serve starts (prefetch {}, max_pending_items {}); until the bound is reached, then {} s more",
        thousands(BROKER_EVENTS),
        Shape::Wide.describe(),
        thousands(u64::from(defaults.amqp.prefetch)),
        thousands(bound as u64),
        hold.as_secs()
    );
    let brk = broker(dir.path(), &emu, bound, hold).await;
    if let Some(r) = &brk {
        r.print(|s| format!(", consumed {}", thousands(s.amqp_received as u64)));
    }

    println!(
        "\n  G. the records' cost: fresh embedded services with [records] enabled = false and = true, alternately; each takes {} s of wrk ({}), then settles all of it; the process's CPU from the first request to idle, per accepted event",
        plan_round.as_secs(),
        Shape::Ban.describe()
    );
    let cost = records_cost(
        dir.path(),
        &emu,
        &script,
        plan_round,
        cost_rounds,
        svc_fastest,
    )
    .await;
    drop(emu);
    // Every child has exited and been waited for by now, so its CPU is in
    // this process's children's ticks.
    let machine1 = proc_stat();
    let ours = (self_ticks() + children_ticks() - ours0) as f64;
    let total = (machine1.0 - machine0.0).max(1) as f64;
    let busy = (machine1.1 - machine0.1) as f64;
    println!("  section took {}", secs(started.elapsed()));
    println!(
        "  CPU over the section, share of all cores: machine {:.0}% busy; this section's processes (bench, serve, emulator, bare handler, wrk) {:.0}%; anything else {:.0}% (other work on this machine: figures measured meanwhile are noise)",
        busy / total * 100.0,
        ours / total * 100.0,
        ((busy - ours) / total * 100.0).max(0.0)
    );

    rows(
        rep,
        &fresh,
        &fill,
        &filled,
        &mixed,
        &emb,
        brk.as_ref(),
        bound,
    );
    cost.rows(rep);
}

/// One service's run in phase G.
struct CostRun {
    accepted: u64,
    rate: f64,
    /// The process's CPU from the first request until it was idle, per
    /// accepted event (µs).
    cpu_us: f64,
    settled: bool,
}

/// Phase G: CPU per event, intake to settle, without and with records.
struct RecordsCost {
    off: Vec<CostRun>,
    on: Vec<CostRun>,
}

impl RecordsCost {
    fn cpu(v: &[CostRun]) -> f64 {
        median(v.iter().map(|r| r.cpu_us).collect())
    }

    fn rows(&self, rep: &mut Report) {
        let s = "7f. Records' cost (issue 15): CPU per event, intake to settle";
        let (off, on) = (Self::cpu(&self.off), Self::cpu(&self.on));
        let all = |v: &[CostRun]| {
            v.iter()
                .map(|r| format!("{:.0}", r.cpu_us))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let settled = self.off.iter().chain(&self.on).all(|r| r.settled);
        let ratio = on / off.max(1e-9);
        rep.row(
            s,
            "serve CPU per event, records on vs off (median run)",
            format!("{on:.0} us with records, {off:.0} us without"),
            format!(
                "runs on: {} us ({} events, {} 202/s); off: {} us ({} events, {} 202/s){}",
                all(&self.on),
                thousands(self.on.iter().map(|r| r.accepted).sum::<u64>()),
                thousands(median(self.on.iter().map(|r| r.rate).collect()) as u64),
                all(&self.off),
                thousands(self.off.iter().map(|r| r.accepted).sum::<u64>()),
                thousands(median(self.off.iter().map(|r| r.rate).collect()) as u64),
                if settled {
                    ""
                } else {
                    "; NOT every run settled all it took"
                }
            ),
            format!("{ratio:.3}"),
            "<= 1.10",
            verdict(settled && ratio <= 1.10),
        );
    }
}

/// A `serve` of `bin` on a fresh journal in `parent/name`, with a pool of
/// `n` bans naming 2 channels (ids `{tag}0..n`) written beside it: the
/// service, its directory and the pool.
async fn fresh_service(
    bin: &Path,
    parent: &Path,
    upstream: &str,
    name: &str,
    tag: &str,
    n: u64,
    env: &[(&str, &str)],
) -> (Svc, PathBuf, PathBuf) {
    let svc_dir = parent.join(name);
    std::fs::create_dir_all(&svc_dir).expect("service dir");
    let pool = svc_dir.join("pool.bin");
    write_pool(&pool, tag, Shape::Ban, n);
    let svc = Svc::start_of(bin, &svc_dir, upstream, name, None, env).await;
    (svc, svc_dir, pool)
}

/// Phase G: fresh services, records off and on alternately, each given
/// `d` of wrk, then waited for until every accepted event settled.
async fn records_cost(
    dir: &Path,
    emu: &EmulatorProc,
    script: &Path,
    d: Duration,
    rounds: usize,
    fastest: f64,
) -> RecordsCost {
    let mut out = RecordsCost {
        off: Vec::new(),
        on: Vec::new(),
    };
    let n = (fastest.max(20_000.0) * 2.0 * d.as_secs_f64()).ceil() as u64;
    let mut pools = 0;
    for r in 0..rounds {
        let order = if r % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for on in order {
            pools += 1;
            let name = format!("cost-{}-{r}", if on { "on" } else { "off" });
            let enabled = if on { "true" } else { "false" };
            let (mut svc, svc_dir, pool) = fresh_service(
                &binary(),
                dir,
                &emu.url,
                &name,
                &format!("cost{pools}-"),
                n,
                &[("CHAT_JANITOR__RECORDS__ENABLED", enabled)],
            )
            .await;
            let s0 = svc.snap().await;
            let stat = format!("/proc/{}/stat", svc.pid());
            let perf = Perf::attach(svc.pid(), &name);
            let t0 = stat_ticks(&stat).unwrap_or(0);
            let w = Wrk::start(script, &pool, &svc.url(), d).finish().await;
            let idle = svc.wait_idle(Duration::from_secs(120)).await;
            // The records' writer works behind the settle: a moment for it.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let t1 = stat_ticks(&stat).unwrap_or(0);
            drop(perf);
            let accepted = (idle.received - s0.received) as u64;
            let run = CostRun {
                accepted,
                rate: accepted as f64 / w.secs.max(1e-3),
                cpu_us: (t1 - t0) as f64 / TICKS_PER_S * 1e6 / accepted.max(1) as f64,
                settled: idle.journal_events == Some(0.0),
            };
            println!(
                "    records {}: {} events at {} 202/s, {:.0} us CPU per event to settle{}",
                if on { "on " } else { "off" },
                thousands(run.accepted),
                thousands(run.rate as u64),
                run.cpu_us,
                if run.settled {
                    ""
                } else {
                    " (NOT all settled)"
                }
            );
            svc.proc.kill9();
            let _ = std::fs::remove_dir_all(&svc_dir);
            if on {
                out.on.push(run);
            } else {
                out.off.push(run);
            }
        }
    }
    out
}

/// The replay script and the emulator (its own process, the channels
/// seeded) in `dir`.
async fn script_and_emulator(dir: &Path) -> (PathBuf, EmulatorProc) {
    let script = dir.join("replay.lua");
    std::fs::write(&script, LUA).expect("lua script");
    let emu = EmulatorProc::start(dir);
    emu.seed(&Seed {
        channels: (0..CHANNELS)
            .map(|c| SeedChannel::new(channel("ext", c), Vec::<String>::new()))
            .collect(),
        ..Seed::default()
    })
    .await;
    (script, emu)
}

/// `perf record` of one process, when `CJ_BENCH_PERF` names a directory
/// (a profiling aid: its own CPU is not charged to the process, but it
/// slows it, so figures from such a run are not reported anywhere).
struct Perf(Option<std::process::Child>);

impl Perf {
    fn attach(pid: u32, name: &str) -> Perf {
        let Some(dir) = std::env::var_os("CJ_BENCH_PERF") else {
            return Perf(None);
        };
        let out = Path::new(&dir).join(format!("{name}.data"));
        let child = Command::new("perf")
            .args(["record", "-F", "499", "-g", "-o"])
            .arg(&out)
            .args(["-p", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok();
        println!("    perf record of pid {pid} to {}", out.display());
        // perf needs a moment to attach.
        std::thread::sleep(Duration::from_millis(300));
        Perf(child)
    }
}

impl Drop for Perf {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }
}

/// Phase G alone (`--only records`), three rounds of each: the records'
/// cost without the rest of section 7.
pub async fn records_section(rep: &mut Report) {
    println!(
        "\n== 7f. The records' cost (issue 15) alone: fresh embedded services with [records] enabled = false and = true, alternately, each given 5 s of wrk ({}) then waited for until all settled",
        Shape::Ban.describe()
    );
    if ensure_wrk().is_none() {
        println!("  wrk is not installed and apt-get could not install it: section skipped");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let (script, emu) = script_and_emulator(dir.path()).await;
    let cost = records_cost(
        dir.path(),
        &emu,
        &script,
        Duration::from_secs(5),
        3,
        25_000.0,
    )
    .await;
    drop(emu);
    cost.rows(rep);
}

struct Fill {
    /// Webhook ids accepted by the service in all, at the end.
    total: u64,
    /// Accepted by the fill itself, and how long it took.
    accepted: u64,
    took: Duration,
    statuses: String,
}

/// Phase B: pools of at most about 60 s of requests (so their timestamps
/// stay valid), each run until the target is reached or the service
/// answered all of it.
async fn fill(b: &mut Bench) -> Fill {
    let target = b.plan.fill;
    let start = b.svc.snap().await;
    let t0 = Instant::now();
    let mut last_print = Instant::now();
    let mut wraps = 0;
    loop {
        let s = b.svc.snap().await;
        if s.received >= target as f64 {
            break;
        }
        let remaining = target - s.received as u64;
        let chunk = (b.svc_fastest * 60.0).clamp(20_000.0, 250_000.0) as u64;
        let need = remaining.min(chunk);
        // Two seconds more than needed, so the pool does not run out before
        // wrk is stopped (a few thousand ids over the target).
        let n = need + (b.svc_fastest * 2.0).max(2_000.0) as u64;
        let pool = b.pool("fill", Shape::Ban, n);
        let limit = Duration::from_secs(240);
        let c0 = b.svc.snap().await;
        let mut w = Wrk::start(&b.script, &pool, &b.svc.url(), limit);
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let c = b.svc.snap().await;
            if last_print.elapsed() >= Duration::from_secs(10) {
                last_print = Instant::now();
                let t = t0.elapsed().as_secs_f64();
                println!(
                    "    {:5.0} s: {} accepted ({:.0}/s so far); {}{}; VmRSS {}",
                    t,
                    thousands(c.received as u64),
                    (c.received - start.received) / t,
                    c.pending_line(),
                    c.journal_events
                        .map(|j| format!(", journal unsettled {}", thousands(j as u64)))
                        .unwrap_or_default(),
                    mib(b.svc.rss())
                );
            }
            if c.received >= target as f64 || c.answered_since(&c0) >= need as f64 || !w.running() {
                break;
            }
        }
        w.interrupt();
        let out = w.finish().await;
        wraps += out.wraps;
        let _ = std::fs::remove_file(&pool);
        let got = b.svc.snap().await.received - s.received;
        if got < 1.0 {
            println!("    the service accepted nothing from a pool of {n}: fill stopped");
            break;
        }
    }
    let end = b.svc.snap().await;
    let took = t0.elapsed();
    let accepted = (end.received - start.received) as u64;
    let refused: f64 = end.rejected_sum() - start.rejected_sum();
    let statuses = format!(
        "202: {}, 200 (repeated id): {}, refused: {refused:.0}{}",
        thousands(accepted),
        thousands((end.duplicate - start.duplicate) as u64),
        if wraps > 0 {
            format!(" (a pool ran out {wraps} time(s))")
        } else {
            String::new()
        }
    );
    println!(
        "    fill done: {} accepted in {} ({:.0}/s); {}; {} accepted in all; VmRSS {}, VmHWM {}",
        thousands(accepted),
        secs(took),
        accepted as f64 / took.as_secs_f64(),
        statuses,
        thousands(end.received as u64),
        mib(b.svc.rss()),
        mib(b.svc.hwm())
    );
    let idle = b.svc.wait_idle(Duration::from_secs(30)).await;
    if let Some(j) = idle.journal_events.filter(|j| *j > 0.0) {
        println!(
            "    (still {} unsettled events in the journal 30 s after the fill)",
            thousands(j as u64)
        );
    }
    Fill {
        total: end.received as u64,
        accepted,
        took,
        statuses,
    }
}

/// Phase F; `None` (and a note printed) when RabbitMQ is not there.
async fn broker(dir: &Path, emu: &EmulatorProc, bound: usize, hold: Duration) -> Option<MemResult> {
    if lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
        .await
        .is_err()
    {
        println!("  RabbitMQ is not reachable at {AMQP_URL}: phase F skipped");
        return None;
    }
    let queue = unique_queue("external");
    let sdir = dir.join("broker");
    std::fs::create_dir_all(&sdir).expect("service dir");

    // Once, to declare the topology exactly as the service does.
    {
        let mut s = Svc::start(&sdir, &emu.url, "serve-broker-declare", Some(&queue)).await;
        let q: &str = &queue;
        let ok = wait_async(Duration::from_secs(30), move || async move {
            ready_messages(q).await.is_some()
        })
        .await;
        assert!(ok, "serve never declared {queue}:\n{}", s.proc.log_tail(20));
        s.proc.terminate(30).await;
    }
    let tag = id_tag("ext-brk");
    print_ids(&format!("{tag}-{}", BROKER_EVENTS - 1), "fan39");
    let make: MakeReq = Arc::new(move |k| {
        let id = format!("{tag}-{k}");
        Req {
            body: Shape::Wide.body(&id, k),
            id,
        }
    });
    let publish = publish_backlog(&queue, BROKER_EVENTS, make).await;
    println!(
        "    published in {} ({} messages waiting)",
        secs(publish),
        ready_messages(&queue)
            .await
            .map_or("?".into(), |n| thousands(u64::from(n)))
    );
    let mut svc = Svc::start(&sdir, &emu.url, "serve-broker", Some(&queue)).await;
    let (r, _) = watch_bound(
        &svc,
        bound,
        Shape::Wide.actions(),
        hold,
        Duration::from_secs(60) + hold,
        None,
    )
    .await;
    svc.proc.kill9();
    delete_queue(&queue).await;
    Some(r)
}

async fn wait_async<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[allow(clippy::too_many_arguments)]
fn rows(
    rep: &mut Report,
    fresh: &Phase,
    fill: &Fill,
    filled: &Phase,
    mixed: &Phase,
    emb: &MemResult,
    brk: Option<&MemResult>,
    bound: usize,
) {
    let ingest_rows = |rep: &mut Report, s: &str, p: &Phase, judged: bool| {
        let g = |ok: bool| if judged { verdict(ok) } else { Verdict::Info };
        rep.row(
            s,
            "bare actix-web handler, median round",
            format!(
                "{} req/s ({:.0} us CPU/req)",
                thousands(p.bare_rate() as u64),
                median(p.bare.iter().map(Round::server_us).collect())
            ),
            format!("rounds: {}", Phase::rates(&p.bare)),
            "",
            "",
            Verdict::Info,
        );
        rep.row(
            s,
            "service: signed, durable 202s/s, median round",
            format!("{} 202/s", thousands(p.svc_rate() as u64)),
            format!(
                "bare {} req/s; rounds: {}",
                thousands(p.bare_rate() as u64),
                Phase::rates(&p.svc)
            ),
            format!("{:.3} (median of round pairs)", p.ratio()),
            ">= 0.5",
            g(p.ratio() >= 0.5),
        );
        rep.row(
            s,
            "service latency p50 / p99 at 64 connections, median round",
            format!("{:.2} / {:.2} ms", p.svc_p50(), p.svc_p99()),
            format!(
                "bare {:.2} / {:.2} ms; p99 by round: {}",
                median(p.bare.iter().map(|r| r.p50_ms).collect()),
                median(p.bare.iter().map(|r| r.p99_ms).collect()),
                p.p99s()
            ),
            format!("{:.3} (p99 / 13 ms)", p.svc_p99() / P99_GOAL_MS),
            "p99 <= 13 ms",
            g(p.svc_p99() <= P99_GOAL_MS),
        );
        rep.row(
            s,
            "service CPU per 202: journal / HTTP / pipeline",
            p.cpu_line(),
            format!(
                "wrk {:.1} us/req against it, {:.1} against bare; waited for a core per 202: {}; machine busy {:.0}% (bare rounds {:.0}%)",
                median(p.svc.iter().map(|r| r.wrk_us).collect()),
                median(p.bare.iter().map(|r| r.wrk_us).collect()),
                p.wait_line(),
                median(p.svc.iter().map(|r| r.busy).collect()) * 100.0,
                median(p.bare.iter().map(|r| r.busy).collect()) * 100.0
            ),
            "",
            "",
            Verdict::Info,
        );
    };

    let s = "7a. External ingest, fresh journal (wrk -t1 -c64, own processes)";
    ingest_rows(rep, s, fresh, true);

    let full = fill.total >= FULL_FILL;
    let s = if full {
        "7b. External ingest, 1,000,000 ids in the dedupe window".to_owned()
    } else {
        format!(
            "7b. External ingest, {} ids in the dedupe window (QUICK: goal needs 1,000,000)",
            thousands(fill.total)
        )
    };
    rep.row(
        &s,
        "fill through POST /v1/events by wrk",
        format!(
            "{} in {} ({:.0}/s)",
            thousands(fill.accepted),
            secs(fill.took),
            fill.accepted as f64 / fill.took.as_secs_f64()
        ),
        fill.statuses.clone(),
        "",
        "",
        Verdict::Info,
    );
    ingest_rows(rep, &s, filled, full);
    // Other processes on the machine move both servers' rates between
    // phases; the bare handler's rounds, alternating with the service's,
    // take that out, so the goal is judged on the ratio of ratios.
    let raw = filled.svc_rate() / fresh.svc_rate().max(1.0);
    let kept = filled.ratio() / fresh.ratio().max(1e-9);
    rep.row(
        &s,
        "service 202/s filled vs fresh, each against its bare rounds",
        format!(
            "{:.3} of bare filled vs {:.3} fresh",
            filled.ratio(),
            fresh.ratio()
        ),
        format!(
            "202/s: {} filled, {} fresh (raw ratio {raw:.3})",
            thousands(filled.svc_rate() as u64),
            thousands(fresh.svc_rate() as u64)
        ),
        format!("{kept:.3}"),
        ">= 0.9",
        if full {
            verdict(kept >= 0.9)
        } else {
            Verdict::Info
        },
    );

    let s = "7c. External ingest, mixed events (2 channels, 1 following, 1 follower)";
    ingest_rows(rep, s, mixed, true);

    let mem_row = |rep: &mut Report, s: &str, r: &MemResult, what: &str| {
        let reached = r.reached.is_some();
        let end = r.last().map_or(0.0, |z| z.snap.outstanding());
        rep.row(
            s,
            &format!("peak RSS (VmHWM), backlog beyond the pending bound, {what}"),
            mib(r.hwm),
            format!(
                "bound {} actions {}; at the end {} events ({} actions) outstanding; pending_items gauge at most {}",
                thousands(bound as u64),
                if reached { "reached" } else { "NOT reached" },
                thousands(end as u64),
                thousands(end as u64 * r.per_event as u64),
                thousands(r.max_pending() as u64)
            ),
            format!("{:.3}", r.hwm as f64 / 1024.0 / 100.0),
            "< 100 MiB",
            verdict(reached && r.hwm < 100 * 1024),
        );
    };
    mem_row(
        rep,
        "7d. Memory, embedded (webhooks)",
        emb,
        "mixed backlog incl. follow_delete, after phases A-D",
    );
    match brk {
        Some(r) => mem_row(
            rep,
            "7e. Memory, broker (RabbitMQ backlog)",
            r,
            "120 actions per message, follow_delete included",
        ),
        None => rep.row(
            "7e. Memory, broker (RabbitMQ backlog)",
            "peak RSS (VmHWM), backlog beyond the pending bound",
            "not measured",
            "RabbitMQ not reachable",
            "",
            "< 100 MiB",
            Verdict::Missed,
        ),
    }
}

// ---------------------------------------------------------------- A/B

/// One service's round in an A/B pair.
struct AbRound {
    rate: f64,
    cpu_us: f64,
    waited_us: f64,
    /// Times the pipeline's threads were put on a core, per 202 (context
    /// switches in: what a thread hand-off costs beyond its CPU).
    pipeline_slices: f64,
}

/// `--only ab --against <chat-janitor binary>`: this build's `serve`
/// against another build's, as section 7 runs them (own processes, the
/// same emulator process, wrk -t1 -c64, bans naming 2 channels), in
/// alternating pairs of fresh services, each given one round of wrk. This
/// machine's speed drifts by tens of percent within minutes, so one run of
/// each tells nothing about a change of a few percent; the ratio within
/// each pair (run back to back) and their median do better.
pub async fn ab_section(rep: &mut Report, against: &Path, pairs: usize) {
    let s = "A/B. This build's serve against another build's (wrk -t1 -c64, fresh journals)";
    let d = Duration::from_secs(5);
    println!(
        "\n== {s}: {pairs} alternating pairs of {} s; B = {}",
        d.as_secs(),
        against.display()
    );
    if ensure_wrk().is_none() {
        rep.note(format!("{s}: wrk is not available; not run"));
        return;
    }
    if !against.is_file() {
        rep.note(format!(
            "{s}: --against {}: no such file; not run",
            against.display()
        ));
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (script, emu) = script_and_emulator(dir.path()).await;
    let this = binary();
    let mut ratios = Vec::new();
    let mut runs: [Vec<AbRound>; 2] = [Vec::new(), Vec::new()];
    for i in 0..pairs {
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut pair = [0.0; 2];
        for which in order {
            let name = format!("ab-{}-{i}", ["a", "b"][which]);
            let bin = if which == 0 { this.as_path() } else { against };
            // 60,000/s for the round: no service here comes near it, so the
            // pool never starts over (a repeated id would answer 200).
            let n = 60_000 * d.as_secs();
            let (mut svc, svc_dir, pool) = fresh_service(
                bin,
                dir.path(),
                &emu.url,
                &name,
                &format!("{name}-"),
                n,
                &[],
            )
            .await;
            let s0 = svc.snap().await;
            let t0 = threads(svc.pid());
            let w = Wrk::start(&script, &pool, &svc.url(), d).finish().await;
            let t1 = threads(svc.pid());
            let s1 = svc.snap().await;
            svc.proc.kill9();
            let _ = std::fs::remove_dir_all(&svc_dir);
            let accepted = (s1.received - s0.received).max(1.0);
            let round = AbRound {
                rate: accepted / w.secs.max(1e-3),
                cpu_us: t1.total.saturating_sub(t0.total) as f64 / TICKS_PER_S * 1e6 / accepted,
                waited_us: t0.waited_until(&t1).iter().sum::<u64>() as f64 / 1e3 / accepted,
                pipeline_slices: t0.grown_until(&t1, |t| t.slices)[2] as f64 / accepted,
            };
            println!(
                "  pair {} {}: {} 202/s, p99 {:.2} ms, {:.1} us CPU and {:.1} us waiting for a core per 202, pipeline threads put on a core {:.2} times per 202{}",
                i + 1,
                ["A (this build)", "B (--against)"][which],
                thousands(round.rate as u64),
                w.p99_ms,
                round.cpu_us,
                round.waited_us,
                round.pipeline_slices,
                if w.wraps > 0 { " (the pool started over: repeated ids)" } else { "" }
            );
            pair[which] = round.rate;
            runs[which].push(round);
        }
        ratios.push(pair[0] / pair[1].max(1e-9));
    }
    let med = |v: &[AbRound], f: fn(&AbRound) -> f64| median(v.iter().map(f).collect());
    rep.row(
        s,
        "202/s, this build (A) over --against (B), median of the pairs' ratios",
        format!("{:.3}", median(ratios.clone())),
        format!(
            "pairs: {}; median 202/s A {}, B {}",
            ratios
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(", "),
            thousands(med(&runs[0], |r| r.rate) as u64),
            thousands(med(&runs[1], |r| r.rate) as u64)
        ),
        "",
        "",
        Verdict::Info,
    );
    rep.row(
        s,
        "serve CPU per 202 (A / B), and time waiting for a core",
        format!(
            "{:.1} / {:.1} us",
            med(&runs[0], |r| r.cpu_us),
            med(&runs[1], |r| r.cpu_us)
        ),
        format!(
            "waiting for a core: {:.1} / {:.1} us per 202; pipeline threads put on a core {:.2} / {:.2} times per 202",
            med(&runs[0], |r| r.waited_us),
            med(&runs[1], |r| r.waited_us),
            med(&runs[0], |r| r.pipeline_slices),
            med(&runs[1], |r| r.pipeline_slices)
        ),
        format!(
            "{:.3}",
            med(&runs[0], |r| r.cpu_us) / med(&runs[1], |r| r.cpu_us).max(1e-9)
        ),
        "",
        Verdict::Info,
    );
}
