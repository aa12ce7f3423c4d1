//! Memory: a backlog of events waits in RabbitMQ; the real binary
//! (`chat-janitor serve`, broker mode, default prefetch and pending cap)
//! starts and drains it against the emulator in this process, while its
//! VmRSS / VmHWM are sampled from /proc every 100 ms.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_janitor::emulator::{Seed, SeedChannel};
use parking_lot::Mutex;
use serde_json::json;

use crate::common::*;

/// Channels the backlog's unsubscribes spread over: few enough that the
/// default prefetch (2,000 deliveries) holds full batches (200 per channel).
pub const CHANNELS: usize = 10;

pub struct MemoryResult {
    pub backlog: u64,
    pub publish: Duration,
    pub drain: Duration,
    pub complete: bool,
    /// (seconds since start, fraction drained, VmRSS KiB)
    pub samples: Vec<(f64, f64, u64)>,
    pub hwm_kib: u64,
    pub calls: u64,
    pub refused_60007: u64,
    pub fill: f64,
    pub prefetch: u16,
    pub max_pending: usize,
}

impl MemoryResult {
    pub fn drain_rate(&self) -> f64 {
        self.backlog as f64 / self.drain.as_secs_f64()
    }

    /// The largest VmRSS sampled while the drained fraction was within `lo..hi`.
    /// VmRSS at the first sample with at least `p` of the backlog drained.
    pub fn rss_at(&self, p: f64) -> u64 {
        self.samples.iter().find(|s| s.1 >= p).map_or(0, |s| s.2)
    }

    /// The longest time the drain made no progress (between 1% and 99%).
    pub fn longest_stall(&self) -> f64 {
        let mut longest = 0.0f64;
        let mut since: Option<(f64, f64)> = None;
        for &(t, f, _) in self.samples.iter().filter(|s| s.1 > 0.01 && s.1 < 0.99) {
            match since {
                Some((t0, f0)) if f == f0 => longest = longest.max(t - t0),
                _ => since = Some((t, f)),
            }
        }
        longest
    }

    pub fn rss_max(&self) -> u64 {
        self.samples.iter().map(|s| s.2).max().unwrap_or(0)
    }
}

struct Service {
    child: tokio::process::Child,
    port: u16,
    log: PathBuf,
}

impl Service {
    fn start(dir: &Path, upstream: &str, queue: &str, records: bool) -> Service {
        let port = free_port();
        let log = dir.join(format!("serve-{port}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        let child = tokio::process::Command::from(serve_command(dir, upstream))
            .env("CHAT_JANITOR__AMQP__URL", AMQP_URL)
            .env("CHAT_JANITOR__AMQP__QUEUE", queue)
            .env("CHAT_JANITOR__SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "warn")
            .env(
                "CHAT_JANITOR__RECORDS__ENABLED",
                if records { "true" } else { "false" },
            )
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .expect("chat-janitor serve starts");
        Service { child, port, log }
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    async fn ready(&mut self, http: &reqwest::Client) {
        let url = format!("http://127.0.0.1:{}/readyz", self.port);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("serve exited early ({st}); log:\n{}", self.log_tail());
            }
            if let Ok(r) = http.get(&url).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("serve not ready in 30 s; log:\n{}", self.log_tail());
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// SIGTERM, then wait (SIGKILL after 30 s).
    async fn stop(mut self) {
        let pid = self.pid();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(Ok(st)) if st.success() => {}
            Ok(Ok(st)) => eprintln!("  serve exited with {st}; log:\n{}", self.log_tail()),
            _ => {
                eprintln!("  serve did not stop in 30 s; killing it");
                let _ = self.child.kill().await;
            }
        }
    }
}

/// A backlog of `n` events (one unsubscribe each) published to a fresh
/// queue, then drained by a fresh `serve` process.
/// Drains a backlog of `n` events; `records`: `[records] enabled`.
pub async fn run(n: u64, timeout: Duration, records: bool) -> MemoryResult {
    let up = Upstream::start().await;
    up.emulator.seed(Seed {
        channels: (0..CHANNELS)
            .map(|c| SeedChannel::new(channel("mem", c), Vec::<String>::new()))
            .collect(),
        ..Seed::default()
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let queue = unique_queue("memory");
    let http = http_client(1);

    // Once, to declare the topology exactly as the service does.
    let mut svc = Service::start(dir.path(), &up.url(), &queue, records);
    svc.ready(&http).await;
    svc.stop().await;

    let make: MakeReq = Arc::new(|k| {
        Req {
        id: format!("mem-{k}"),
        body: json!({
            "type": "user.banned",
            "timestamp": "2026-11-21T10:00:00Z",
            "data": {"user_id": format!("m{k}"), "channels": [channel("mem", k as usize % CHANNELS)]}
        })
        .to_string(),
    }
    });
    let publish = publish_backlog(&queue, n, make).await;

    let mut svc = Service::start(dir.path(), &up.url(), &queue, records);
    let pid = svc.pid();
    let t0 = Instant::now();
    let samples = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let samples = samples.clone();
        let done = done.clone();
        let emu = up.emulator.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(100));
            while !done.load(Ordering::Relaxed) {
                every.tick().await;
                let s = emu.stats().api("delete_subscriber");
                let frac = (s.applied + s.noop) as f64 / n as f64;
                if let Some(rss) = status_kib(pid, "VmRSS:") {
                    samples.lock().push((t0.elapsed().as_secs_f64(), frac, rss));
                }
            }
        })
    };
    svc.ready(&http).await;
    let complete = wait_for(timeout, || {
        let s = up.emulator.stats().api("delete_subscriber");
        s.applied + s.noop >= n
    })
    .await;
    let drain = t0.elapsed();
    done.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    let hwm = status_kib(pid, "VmHWM:").unwrap_or(0);
    let samples = std::mem::take(&mut *samples.lock());
    let stats = up.emulator.stats().api("delete_subscriber");
    let ok_calls = stats.code("0");
    let fill = if ok_calls == 0 {
        0.0
    } else {
        (stats.applied + stats.noop) as f64 / (ok_calls as f64 * 100.0)
    };
    svc.stop().await;
    delete_queue(&queue).await;
    up.stop().await;
    let defaults =
        chat_janitor::config::from_toml(chat_janitor::config::EMBEDDED_DEFAULTS).expect("defaults");
    MemoryResult {
        backlog: n,
        publish,
        drain,
        complete,
        samples,
        hwm_kib: hwm,
        calls: stats.calls,
        refused_60007: stats.code("60007"),
        fill,
        prefetch: defaults.amqp.prefetch,
        max_pending: defaults.dispatch.max_pending_items,
    }
}
