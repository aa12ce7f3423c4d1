//! Shared plumbing: the emulator at the vendor's 200 calls/s (in-process or
//! as a process of its own), the service built in-process or run as the
//! real binary, signed webhooks, the in-process load generator, reading
//! /proc and /metrics from outside, and RabbitMQ helpers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chat_janitor::app::Application;
use chat_janitor::config::{self, Settings};
use chat_janitor::emulator::{Emulator, EmulatorConfig, RunningEmulator, Seed};
use chat_janitor::ingest::signature;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use secrecy::SecretString;

pub const SDKAPPID: u64 = 1_400_000_000;
pub const KEY: &str = "bench-secret-key-0123456789abcdef";
pub const ADMIN: &str = "administrator";
/// Webhook secret the bench apps accept.
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The vendor's limit, per API. The emulator enforces exactly this.
pub const VENDOR_RATE: u32 = 200;

pub fn webhook_key() -> Vec<u8> {
    STANDARD
        .decode(SECRET.trim_start_matches("whsec_"))
        .expect("the bench secret is base64")
}

pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub fn unix_secs() -> u64 {
    wall_ms() / 1000
}

/// `@TOA#_bench{c}`.
pub fn channel(prefix: &str, c: usize) -> String {
    format!("@TOA#_{prefix}{c:03}")
}

// ---------------------------------------------------------------- upstream

/// The emulator on a port of its own, limited like the vendor (200/s/API).
pub struct Upstream {
    pub emulator: Emulator,
    pub running: RunningEmulator,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let emulator = Emulator::new(EmulatorConfig {
            sdkappid: SDKAPPID,
            secret_key: KEY.into(),
            admins: vec![ADMIN.into()],
            rate_per_api: VENDOR_RATE,
            ..EmulatorConfig::default()
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
        let running = emulator.serve(listener).await.expect("emulator starts");
        Upstream { emulator, running }
    }

    pub fn url(&self) -> String {
        self.running.base_url()
    }

    pub async fn stop(self) {
        self.running.stop().await;
    }
}

// ---------------------------------------------------------------- the service

/// The embedded defaults, pointed at `upstream`, journal in `dir`, port 0.
pub fn settings(upstream: &str, dir: &Path) -> Settings {
    let mut s = config::from_toml(config::EMBEDDED_DEFAULTS).expect("defaults are valid");
    s.server.listen = "127.0.0.1:0".parse().unwrap();
    s.emulator.embedded = false;
    s.tencent.base_url = upstream.to_owned();
    s.tencent.secret_key = SecretString::from(KEY.to_owned());
    s.tencent.admin_identifier = ADMIN.into();
    s.webhook.secrets =
        vec![chat_janitor::domain::WebhookKey::decode(SECRET).expect("valid secret")];
    s.journal.path = dir.to_owned();
    s
}

/// Broker mode on `queue`.
pub fn broker_settings(upstream: &str, dir: &Path, queue: &str) -> Settings {
    let mut s = settings(upstream, dir);
    s.amqp.url = SecretString::from(AMQP_URL.to_owned());
    s.amqp.queue = queue.to_owned();
    s
}

pub struct RunningApp {
    pub port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl RunningApp {
    pub async fn spawn(settings: Settings) -> RunningApp {
        let app = Application::build(settings).await.expect("app builds");
        let port = app.port();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until_stopped(async move {
            let _ = rx.await;
        }));
        RunningApp {
            port,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Waits for `/readyz` to answer 200 (broker connected).
    pub async fn ready(&self, http: &reqwest::Client, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if let Ok(r) = http.get(self.url("/readyz")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the app did not become ready in {secs} s");
    }

    pub async fn metrics(&self, http: &reqwest::Client) -> String {
        http.get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body")
    }

    /// Graceful stop (as on SIGTERM).
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            match t.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("  (app stopped with an error: {e:#})"),
                Err(e) => eprintln!("  (app task failed: {e})"),
            }
        }
    }
}

// ---------------------------------------------------------------- processes

/// The binary `cargo bench` built beside this bench (the bench profile,
/// `target/release/chat-janitor`).
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_chat-janitor"))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `kB` field of /proc/<pid>/status (`VmRSS:`, `VmHWM:`).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix(field)
            .and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())
    })
}

/// The fields of a /proc `stat` file after the command name (which ends
/// with ')' and may hold spaces): index 0 is the state, 11 utime, 12
/// stime, 13 cutime, 14 cstime (clock ticks).
fn stat_fields(text: &str) -> Vec<u64> {
    let rest = text.rsplit_once(')').map_or("", |(_, r)| r);
    rest.split_whitespace()
        .map(|x| x.parse::<u64>().unwrap_or(0))
        .collect()
}

/// utime + stime of a process (all its threads, the exited ones too) or of
/// one thread (`/proc/<pid>/task/<tid>/stat`), in clock ticks.
pub fn stat_ticks(path: &str) -> Option<u64> {
    ticks_in(&std::fs::read_to_string(path).ok()?)
}

/// utime + stime from the text of a /proc `stat` file.
pub fn ticks_in(stat: &str) -> Option<u64> {
    let f = stat_fields(stat);
    Some(f.get(11)? + f.get(12)?)
}

/// CPU of this process's children that were waited for (cutime + cstime),
/// in clock ticks: what a `wrk` run cost, once it exited.
pub fn children_ticks() -> u64 {
    let f = stat_fields(&std::fs::read_to_string("/proc/self/stat").unwrap_or_default());
    f.get(13).copied().unwrap_or(0) + f.get(14).copied().unwrap_or(0)
}

/// A child process whose stderr goes to a file; killed on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
    pub exited: Option<std::process::ExitStatus>,
}

impl Proc {
    pub fn new(name: &str, child: Child, log: PathBuf) -> Proc {
        Proc {
            name: name.to_owned(),
            child,
            log,
            exited: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn running(&mut self) -> bool {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited.is_none()
    }

    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        self.exited = self.child.wait().ok();
    }

    /// SIGTERM, then wait up to `secs` (SIGKILL after); whether it exited 0.
    pub async fn terminate(&mut self, secs: u64) -> bool {
        if !self.running() {
            return self.exited.is_some_and(|s| s.success());
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(secs);
        while self.running() {
            if Instant::now() >= deadline {
                eprintln!(
                    "  {} did not exit {secs} s after SIGTERM; killing it",
                    self.name
                );
                self.kill9();
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let ok = self.exited.is_some_and(|s| s.success());
        if !ok {
            eprintln!(
                "  {} exited {:?} on SIGTERM:\n{}",
                self.name,
                self.exited,
                self.log_tail(20)
            );
        }
        ok
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `chat-janitor emulator --rate 200` as a process of its own (so its CPU is
/// not charged to the service), on a free port.
pub struct EmulatorProc {
    pub proc: Proc,
    pub url: String,
    pub http: reqwest::Client,
}

impl EmulatorProc {
    pub fn start(dir: &Path) -> EmulatorProc {
        use std::io::BufRead;
        let log = dir.join("emulator.log");
        let mut child = Command::new(binary())
            .args(["emulator", "--listen", "127.0.0.1:0", "--rate"])
            .arg(VENDOR_RATE.to_string())
            .args(["--secret-key", KEY, "--admin", ADMIN])
            .arg("--sdkappid")
            .arg(SDKAPPID.to_string())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("emulator log"))
            .spawn()
            .expect("chat-janitor emulator starts");
        let mut line = String::new();
        let out = child.stdout.take().expect("stdout");
        std::io::BufReader::new(out)
            .read_line(&mut line)
            .expect("the emulator prints its address");
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .trim_end_matches('/')
            .to_owned();
        EmulatorProc {
            proc: Proc::new("emulator", child, log),
            url,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        }
    }

    pub async fn seed(&self, seed: &Seed) {
        let r = self
            .http
            .post(format!("{}/emulator/seed", self.url))
            .json(seed)
            .send()
            .await
            .expect("seed");
        assert!(r.status().is_success(), "seed: {}", r.status());
    }
}

/// `chat-janitor serve` configured like a deployment pointed at `upstream`
/// (the embedded emulator off, the bench's credentials and webhook secret),
/// its journal under `dir`, which is also its working directory. Callers add
/// the listen address, the mode and where stderr goes.
pub fn serve_command(dir: &Path, upstream: &str) -> Command {
    serve_command_of(&binary(), dir, upstream)
}

/// `serve_command`, of another build's binary.
pub fn serve_command_of(bin: &Path, dir: &Path, upstream: &str) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .current_dir(dir)
        .env("CHAT_JANITOR__EMULATOR__EMBEDDED", "false")
        .env("CHAT_JANITOR__TENCENT__BASE_URL", upstream)
        .env("CHAT_JANITOR__TENCENT__SECRET_KEY", KEY)
        .env("CHAT_JANITOR__TENCENT__ADMIN_IDENTIFIER", ADMIN)
        .env("CHAT_JANITOR__JOURNAL__PATH", dir.join("journal"))
        .env("CHAT_JANITOR__WEBHOOK__SECRETS", SECRET)
        .stdout(Stdio::null());
    cmd
}

/// Waits (up to `limit`) for a `serve` process started with port 0 to log
/// "chat-janitor serving" (JSON, at info) and returns the port.
pub async fn serving_port(proc: &mut Proc, limit: Duration) -> u16 {
    let deadline = Instant::now() + limit;
    loop {
        let text = std::fs::read_to_string(&proc.log).unwrap_or_default();
        let port = text
            .lines()
            .filter(|l| l.contains("chat-janitor serving"))
            .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .and_then(|v| v["port"].as_u64());
        if let Some(p) = port {
            return p as u16;
        }
        if !proc.running() || Instant::now() >= deadline {
            panic!(
                "{} never logged its port ({:?}):\n{}",
                proc.name,
                proc.exited,
                proc.log_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The sum of the samples of metric `name` (Prometheus text) whose labels
/// contain `labels` (`""`: all of them); `None` if there is none.
pub fn metric_sum(text: &str, name: &str, labels: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let value = if let Some(r) = rest.strip_prefix('{') {
            r.split_once('}')
                .filter(|(l, _)| l.contains(labels))
                .map(|(_, v)| v)
        } else if rest.starts_with(' ') && labels.is_empty() {
            Some(rest)
        } else {
            None
        };
        if let Some(v) = value.and_then(|v| v.trim().parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// The samples of metric `name` whose labels contain `labels`, summed by
/// the value of label `key`.
pub fn metric_by_label(text: &str, name: &str, labels: &str, key: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let prefix = format!("{key}=\"");
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((l, v)) = line
            .strip_prefix(name)
            .and_then(|r| r.strip_prefix('{'))
            .and_then(|r| r.split_once('}'))
        else {
            continue;
        };
        if !l.contains(labels) {
            continue;
        }
        let Some(k) = l
            .split(',')
            .find_map(|kv| kv.strip_prefix(prefix.as_str()))
            .map(|k| k.trim_end_matches('"'))
        else {
            continue;
        };
        if let Ok(v) = v.trim().parse::<f64>() {
            *out.entry(k.to_owned()).or_default() += v;
        }
    }
    out
}

// ---------------------------------------------------------------- load generator

/// One webhook to send: its id and body.
pub struct Req {
    pub id: String,
    pub body: String,
}

pub type MakeReq = Arc<dyn Fn(u64) -> Req + Send + Sync>;

#[derive(Clone, Copy)]
pub enum Until {
    /// Exactly this many requests.
    Count(u64),
    /// Start requests until this much time has passed.
    For(Duration),
}

#[derive(Clone)]
pub struct Load {
    pub url: String,
    pub concurrency: usize,
    pub until: Until,
    /// Requests per second, spread evenly (request k is due at k / rate);
    /// `None` sends as fast as answers come back.
    pub pace: Option<f64>,
    /// Keep the wall-clock time of each 2xx answer (by request number).
    pub record: bool,
}

#[derive(Default)]
pub struct LoadOutcome {
    /// Requests answered 202.
    pub accepted: u64,
    /// Answers by status (and `error` for transport failures).
    pub statuses: BTreeMap<String, u64>,
    pub elapsed: Duration,
    /// (request number, wall ms of its 202), when recorded.
    pub accepted_at: Vec<(u64, u64)>,
    /// Request latencies (send to answer) in microseconds.
    pub latencies_us: Vec<u32>,
    /// Worst lateness of a paced request's start behind its due time.
    pub max_behind: Duration,
}

impl LoadOutcome {
    pub fn rate(&self) -> f64 {
        self.accepted as f64 / self.elapsed.as_secs_f64()
    }

    pub fn statuses_line(&self) -> String {
        self.statuses
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

pub fn http_client(concurrency: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency * 2)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client")
}

/// Sends signed webhooks from `concurrency` tasks, each one request at a
/// time on its own keep-alive connection, signing each just before it goes.
pub async fn run_load(client: &reqwest::Client, load: &Load, make: MakeReq) -> LoadOutcome {
    let key = Arc::new(webhook_key());
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut workers = Vec::with_capacity(load.concurrency);
    for _ in 0..load.concurrency {
        let client = client.clone();
        let load = load.clone();
        let make = make.clone();
        let key = key.clone();
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            let mut out = LoadOutcome::default();
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                match load.until {
                    Until::Count(n) if k >= n => break,
                    Until::For(d) if start.elapsed() >= d => break,
                    _ => {}
                }
                if let Some(rate) = load.pace {
                    let due = start + Duration::from_secs_f64(k as f64 / rate);
                    let now = Instant::now();
                    if due > now {
                        tokio::time::sleep_until(due.into()).await;
                    } else {
                        out.max_behind = out.max_behind.max(now - due);
                    }
                }
                let req = make(k);
                let ts = unix_secs().to_string();
                let sig = signature::sign(&key, &req.id, &ts, req.body.as_bytes());
                let sent = Instant::now();
                let res = client
                    .post(&load.url)
                    .header("content-type", "application/json")
                    .header("webhook-id", req.id)
                    .header("webhook-timestamp", ts)
                    .header("webhook-signature", sig)
                    .body(req.body)
                    .send()
                    .await;
                let label = match res {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        // Read the (small) body so the connection is reused.
                        let _ = r.bytes().await;
                        if status == 202 {
                            out.accepted += 1;
                            if load.record {
                                out.accepted_at.push((k, wall_ms()));
                            }
                        }
                        status.to_string()
                    }
                    Err(e) => {
                        if !out.statuses.contains_key("error") {
                            eprintln!("  load: request failed: {e}");
                        }
                        "error".to_owned()
                    }
                };
                out.latencies_us
                    .push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
                *out.statuses.entry(label).or_default() += 1;
            }
            out
        }));
    }
    let mut total = LoadOutcome::default();
    for w in workers {
        let o = w.await.expect("load worker");
        total.accepted += o.accepted;
        for (k, v) in o.statuses {
            *total.statuses.entry(k).or_default() += v;
        }
        total.accepted_at.extend(o.accepted_at);
        total.latencies_us.extend(o.latencies_us);
        total.max_behind = total.max_behind.max(o.max_behind);
    }
    total.elapsed = start.elapsed();
    total
}

/// The value at quantile `q` (0..=1) of sorted `v`.
pub fn quantile<T: Copy>(sorted: &[T], q: f64) -> T {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

// ---------------------------------------------------------------- broker

/// A queue name no one else uses.
pub fn unique_queue(what: &str) -> String {
    format!(
        "cj-bench-{what}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// Deletes what the service declares for `queue`: the work queue, its lock
/// queue, dead letters, the dead-letter log, the sweep log, the record
/// stream and the exchange (a fresh channel each: a failed delete closes
/// its channel). Streams left behind keep their data for days and load
/// RabbitMQ for every later run.
pub async fn delete_queue(queue: &str) {
    let Ok(conn) = Connection::connect(AMQP_URL, ConnectionProperties::default()).await else {
        eprintln!("  (could not connect to delete {queue})");
        return;
    };
    for q in [
        queue.to_owned(),
        format!("{queue}.leader"),
        format!("{queue}.dead"),
        format!("{queue}.dead-log"),
        format!("{queue}.sweeps"),
        format!("{queue}.records"),
        format!("{queue}.callbacks"),
    ] {
        let Ok(ch) = conn.create_channel().await else {
            continue;
        };
        if let Err(e) = ch
            .queue_delete(ShortString::from(q.as_str()), QueueDeleteOptions::default())
            .await
        {
            eprintln!("  (deleting queue {q}: {e})");
        }
        let _ = ch.close(200, ShortString::from("done")).await;
    }
    if let Ok(ch) = conn.create_channel().await {
        if let Err(e) = ch
            .exchange_delete(
                ShortString::from(format!("{queue}.dlx").as_str()),
                Default::default(),
            )
            .await
        {
            eprintln!("  (deleting exchange {queue}.dlx: {e})");
        }
    }
    let _ = conn.close(200, ShortString::from("bench done")).await;
}

/// Ready messages in `queue` (a passive declare); `None` if it does not
/// exist or the broker cannot be reached.
pub async fn ready_messages(queue: &str) -> Option<u32> {
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .ok()?;
    let ch = conn.create_channel().await.ok()?;
    let n = ch
        .queue_declare(
            ShortString::from(queue),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .ok()
        .map(|q| q.message_count());
    let _ = conn.close(200, ShortString::from("bye")).await;
    n
}

/// Publishes requests `0..n` (body as the message, id as `message_id`,
/// persistent) to `queue` with publisher confirms: two connections in
/// parallel, each with up to 5,000 unconfirmed publishes at a time.
pub async fn publish_backlog(queue: &str, n: u64, make: MakeReq) -> Duration {
    const LANES: u64 = 2;
    const WINDOW: usize = 5_000;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for lane in 0..LANES {
        let queue = queue.to_owned();
        let make = make.clone();
        tasks.push(tokio::spawn(async move {
            let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
                .await
                .expect("the broker at 127.0.0.1:5672 is running");
            let ch = conn.create_channel().await.unwrap();
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            let mut pending = Vec::with_capacity(WINDOW);
            let mut nacked = 0u64;
            let mut k = lane;
            while k < n {
                let req = make(k);
                let confirm = ch
                    .basic_publish(
                        ShortString::from(""),
                        ShortString::from(queue.as_str()),
                        BasicPublishOptions::default(),
                        req.body.as_bytes(),
                        BasicProperties::default()
                            .with_message_id(ShortString::from(req.id))
                            .with_content_type(ShortString::from("application/json"))
                            .with_delivery_mode(2),
                    )
                    .await
                    .expect("publish");
                pending.push(confirm);
                if pending.len() >= WINDOW {
                    for c in pending.drain(..) {
                        if !matches!(c.await, Ok(Confirmation::Ack(_))) {
                            nacked += 1;
                        }
                    }
                }
                k += LANES;
            }
            for c in pending.drain(..) {
                if !matches!(c.await, Ok(Confirmation::Ack(_))) {
                    nacked += 1;
                }
            }
            let _ = conn.close(200, ShortString::from("published")).await;
            nacked
        }));
    }
    let mut nacked = 0;
    for t in tasks {
        nacked += t.await.expect("publisher");
    }
    assert_eq!(nacked, 0, "the broker refused {nacked} publishes");
    start.elapsed()
}

// ---------------------------------------------------------------- polling

/// Polls `check` every 20 ms until it holds or `limit` passes; whether it held.
pub async fn wait_for<F>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> bool,
{
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- machine

/// CPU use over a section: the whole machine's busy share and this
/// process's, from /proc/stat and /proc/self/stat (clock ticks).
pub struct CpuMeter {
    total: u64,
    busy: u64,
    me: u64,
}

/// The machine's CPU ticks, all cores: (total, busy).
pub fn proc_stat() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total, total - idle)
}

pub fn self_ticks() -> u64 {
    stat_ticks("/proc/self/stat").unwrap_or(0)
}

impl CpuMeter {
    pub fn start() -> CpuMeter {
        let (total, busy) = proc_stat();
        CpuMeter {
            total,
            busy,
            me: self_ticks(),
        }
    }

    /// "machine 93% busy (this process 71%, others 22%)" of all cores.
    pub fn report(&self) -> String {
        let (total, busy) = proc_stat();
        let dt = (total - self.total).max(1) as f64;
        let busy = (busy - self.busy) as f64 / dt * 100.0;
        let me = ((self_ticks() - self.me) as f64 / dt * 100.0).min(busy);
        format!(
            "CPU over this section, share of all cores: machine {busy:.0}% busy, bench process {me:.0}%, other processes {:.0}%",
            busy - me
        )
    }
}

pub fn machine() -> (usize, String, String) {
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_owned()))
        .and_then(|v| v.trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or("?".into(), |kib| {
            format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0)
        });
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        })
        .unwrap_or_else(|| "?".into());
    (cores, mem, cpu)
}

/// Output of a small command, trimmed; empty on failure.
pub fn sh(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// CPU ticks used so far by the RabbitMQ node (beam.smp), if found.
pub fn beam_ticks() -> Option<u64> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "beam.smp" {
            return stat_ticks(&format!("/proc/{pid}/stat"));
        }
    }
    None
}

/// Clock ticks per second (USER_HZ); 100 on Linux.
pub const TICKS_PER_S: f64 = 100.0;
