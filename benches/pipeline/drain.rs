//! Drain: a burst of bans posted as signed webhooks (embedded mode, 64
//! connections) and the upstream calls it turns into, read from the
//! emulator's call log: first to last call against the ideal (minimum calls
//! at 200/s), calls against the minimum, batch fill, 60007 refusals.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_janitor::emulator::{Seed, SeedChannel, SeedFollow};
use serde_json::json;

use crate::common::*;

/// The shape of a burst.
#[derive(Clone, Copy)]
pub enum Burst {
    /// `bans` users, each banned from `per_ban` of `channels` channels
    /// (a block of consecutive channels; every channel gets the same count).
    Unsubscribe {
        bans: usize,
        per_ban: usize,
        channels: usize,
    },
    /// `bans` users, each followed by `per_ban` of `fans` accounts: every fan
    /// ends up as the From_Account of `bans * per_ban / fans` unfollows.
    Unfollow {
        bans: usize,
        per_ban: usize,
        fans: usize,
    },
}

impl Burst {
    pub fn api(&self) -> &'static str {
        match self {
            Burst::Unsubscribe { .. } => "delete_subscriber",
            Burst::Unfollow { .. } => "follow_delete",
        }
    }

    /// Accounts per call the vendor allows.
    pub fn capacity(&self) -> usize {
        match self {
            Burst::Unsubscribe { .. } => 100,
            Burst::Unfollow { .. } => 20,
        }
    }

    pub fn items(&self) -> usize {
        match *self {
            Burst::Unsubscribe { bans, per_ban, .. } | Burst::Unfollow { bans, per_ban, .. } => {
                bans * per_ban
            }
        }
    }

    pub fn events(&self) -> usize {
        match *self {
            Burst::Unsubscribe { bans, .. } | Burst::Unfollow { bans, .. } => bans,
        }
    }

    /// Keys (channels or From_Accounts) the items spread over.
    pub fn keys(&self) -> usize {
        match *self {
            Burst::Unsubscribe { channels, .. } => channels,
            Burst::Unfollow { fans, .. } => fans,
        }
    }

    /// Fewest calls that can carry every item: full batches per key.
    pub fn min_calls(&self) -> usize {
        let per_key = self.items() / self.keys();
        self.keys() * per_key.div_ceil(self.capacity())
    }

    pub fn describe(&self) -> String {
        match *self {
            Burst::Unsubscribe {
                bans,
                per_ban,
                channels,
            } => format!(
                "{bans} user.banned events x {per_ban} channels = {} unsubscribes over {channels} channels ({} per channel)",
                self.items(),
                self.items() / channels
            ),
            Burst::Unfollow {
                bans,
                per_ban,
                fans,
            } => format!(
                "{bans} user.banned events x {per_ban} followers = {} unfollows over {fans} From_Accounts ({} targets each)",
                self.items(),
                self.items() / fans
            ),
        }
    }

    fn user(tag: &str, i: usize) -> String {
        format!("{tag}u{i}")
    }

    fn fan(tag: &str, f: usize) -> String {
        format!("{tag}f{f}")
    }

    /// The upstream state the burst removes.
    fn seed(&self, tag: &str) -> Seed {
        match *self {
            Burst::Unsubscribe {
                bans,
                per_ban,
                channels,
            } => {
                let blocks = channels / per_ban;
                let chans = (0..channels)
                    .map(|c| {
                        let block = c / per_ban;
                        let members = (0..bans)
                            .filter(|i| i % blocks == block)
                            .map(|i| Self::user(tag, i));
                        SeedChannel::new(channel(tag, c), members)
                    })
                    .collect();
                Seed {
                    channels: chans,
                    ..Seed::default()
                }
            }
            Burst::Unfollow {
                bans,
                per_ban,
                fans,
            } => {
                let mut targets = vec![Vec::new(); fans];
                for i in 0..bans {
                    for j in 0..per_ban {
                        targets[(i * per_ban + j) % fans].push(Self::user(tag, i));
                    }
                }
                Seed {
                    follows: targets
                        .into_iter()
                        .enumerate()
                        .map(|(f, to)| SeedFollow::new(Self::fan(tag, f), to))
                        .collect(),
                    ..Seed::default()
                }
            }
        }
    }

    /// Request `k` of the burst.
    fn request(&self, tag: &str, k: u64) -> Req {
        let i = k as usize;
        let data = match *self {
            Burst::Unsubscribe {
                per_ban, channels, ..
            } => {
                let blocks = channels / per_ban;
                let block = i % blocks;
                let chans: Vec<String> = (0..per_ban)
                    .map(|j| channel(tag, block * per_ban + j))
                    .collect();
                json!({"user_id": Self::user(tag, i), "channels": chans})
            }
            Burst::Unfollow { per_ban, fans, .. } => {
                let followers: Vec<String> = (0..per_ban)
                    .map(|j| Self::fan(tag, (i * per_ban + j) % fans))
                    .collect();
                json!({"user_id": Self::user(tag, i), "followers": followers})
            }
        };
        let body =
            json!({"type": "user.banned", "timestamp": "2026-11-21T10:00:00Z", "data": data});
        Req {
            id: format!("{tag}-ban-{k}"),
            body: body.to_string(),
        }
    }
}

pub struct DrainResult {
    pub burst: Burst,
    /// Every item applied upstream.
    pub complete: bool,
    pub applied: u64,
    pub calls: u64,
    /// Items carried by calls answered ErrorCode 0.
    pub ok_items: u64,
    pub ok_calls: u64,
    /// First to last upstream call, plus one call slot (1/200 s), so that N
    /// calls evenly spaced at 200/s measure exactly N/200 s.
    pub drain: Duration,
    pub refused_60007: u64,
    pub other_errors: String,
    pub peak_cps: u64,
    /// Time to post every webhook (all 202).
    pub post: Duration,
    pub post_statuses: String,
    /// Slowest 202 while posting (a stall at the edge, e.g. a slow fsync,
    /// pauses the feed for that long), ms.
    pub post_max_ms: f64,
    /// First webhook sent to last upstream call.
    pub end_to_end: Duration,
    /// Per second of the drain (from the first call): calls, accounts.
    pub per_second: Vec<(u64, u64)>,
    /// With completion callbacks on: how many were delivered (the
    /// service's own count), and when the last was, after the first call.
    pub callbacks: Option<(u64, Duration)>,
}

impl DrainResult {
    pub fn ideal(&self) -> Duration {
        Duration::from_secs_f64(self.burst.min_calls() as f64 / f64::from(VENDOR_RATE))
    }

    /// Items per second removed upstream over the drain.
    pub fn items_per_s(&self) -> f64 {
        self.applied as f64 / self.drain.as_secs_f64()
    }

    pub fn calls_per_s(&self) -> f64 {
        self.calls as f64 / self.drain.as_secs_f64()
    }

    /// Mean accounts per successful call / the vendor's maximum.
    pub fn fill(&self) -> f64 {
        if self.ok_calls == 0 {
            return 0.0;
        }
        self.ok_items as f64 / (self.ok_calls as f64 * self.burst.capacity() as f64)
    }
}

/// How the burst reaches the service.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Signed webhooks, embedded mode (journal), 64 connections.
    Webhooks,
    /// A backlog already in RabbitMQ when the service (broker mode, default
    /// prefetch) starts.
    Broker,
}

/// Feeds the burst to a fresh app (defaults but `max_batch_items`) against
/// a fresh emulator and measures the drain.
pub async fn run(
    tag: &str,
    burst: Burst,
    max_batch: usize,
    via: Via,
    timeout: Duration,
) -> DrainResult {
    run_with(tag, burst, max_batch, via, timeout, |_| {}, false).await
}

/// `run`, with the service's settings changed by `tweak` first.
pub async fn run_with(
    tag: &str,
    burst: Burst,
    max_batch: usize,
    via: Via,
    timeout: Duration,
    tweak: impl FnOnce(&mut chat_janitor::config::Settings),
    wait_callbacks: bool,
) -> DrainResult {
    let up = Upstream::start().await;
    up.emulator.seed(burst.seed(tag));
    let dir = tempfile::tempdir().expect("temp dir");
    let http = http_client(64);
    let make: MakeReq = {
        let tag = tag.to_owned();
        Arc::new(move |k| burst.request(&tag, k))
    };
    let queue = unique_queue(tag);
    let mut s = match via {
        Via::Webhooks => settings(&up.url(), dir.path()),
        Via::Broker => broker_settings(&up.url(), dir.path(), &queue),
    };
    s.batching.max_batch_items = max_batch;
    tweak(&mut s);
    let (app, started_ms, post, post_statuses, post_max_ms) = match via {
        Via::Webhooks => {
            let app = RunningApp::spawn(s).await;
            let load = Load {
                url: app.url("/v1/events"),
                concurrency: 64,
                until: Until::Count(burst.events() as u64),
                pace: None,
                record: false,
            };
            let started_ms = wall_ms();
            let out = run_load(&http, &load, make).await;
            let max_ms = out.latencies_us.iter().max().copied().unwrap_or(0) as f64 / 1000.0;
            (app, started_ms, out.elapsed, out.statuses_line(), max_ms)
        }
        Via::Broker => {
            // Once, to declare the topology as the service does.
            let first = RunningApp::spawn(s.clone()).await;
            first.ready(&http, 20).await;
            first.stop().await;
            let post = publish_backlog(&queue, burst.events() as u64, make).await;
            let started_ms = wall_ms();
            let app = RunningApp::spawn(s).await;
            let what = format!("{} published, confirmed", burst.events());
            (app, started_ms, post, what, f64::NAN)
        }
    };
    let api = burst.api();
    let want = burst.items() as u64;
    let t = Instant::now();
    let complete = wait_for(timeout, || {
        let s = up.emulator.stats().api(api);
        s.applied + s.noop >= want
    })
    .await;
    if !complete {
        eprintln!(
            "  drain {tag}: not complete after {:?} ({} of {want})",
            t.elapsed(),
            up.emulator.stats().api(api).applied
        );
    }
    let stats = up.emulator.stats().api(api);
    let calls: Vec<_> = up
        .emulator
        .calls()
        .into_iter()
        .filter(|c| c.api == api)
        .collect();
    let first = calls.iter().map(|c| c.at_ms).min().unwrap_or(0);
    let last = calls.iter().map(|c| c.at_ms).max().unwrap_or(0);
    let ok: Vec<_> = calls
        .iter()
        .filter(|c| c.error_code == 0 && c.http_status.is_none())
        .collect();
    let slot_ms = 1000.0 / f64::from(VENDOR_RATE);
    let mut per_second = vec![(0u64, 0u64); ((last - first) / 1000 + 1) as usize];
    for c in &calls {
        let e = &mut per_second[((c.at_ms - first) / 1000) as usize];
        e.0 += 1;
        e.1 += c.accounts.len() as u64;
    }
    let other_errors = stats
        .error_codes
        .iter()
        .filter(|(k, _)| k.as_str() != "0" && k.as_str() != "60007")
        .map(|(k, v)| format!("{k}:{v}"))
        .collect::<Vec<_>>()
        .join(" ");
    let res = DrainResult {
        burst,
        complete,
        applied: stats.applied,
        calls: stats.calls,
        ok_items: ok.iter().map(|c| c.accounts.len() as u64).sum(),
        ok_calls: ok.len() as u64,
        drain: Duration::from_secs_f64(((last - first) as f64 + slot_ms) / 1000.0),
        refused_60007: stats.code("60007"),
        other_errors: if other_errors.is_empty() {
            "none".into()
        } else {
            other_errors
        },
        peak_cps: stats.peak_calls_per_second,
        post,
        post_statuses,
        post_max_ms,
        end_to_end: Duration::from_millis(last.saturating_sub(started_ms)),
        per_second,
        callbacks: None,
    };
    let mut res = res;
    if wait_callbacks {
        // Every settled event's callback, delivered before the app stops.
        let want = burst.events() as u64;
        let delivered = || async {
            let text = app.metrics(&http).await;
            text.lines()
                .find_map(|l| {
                    l.strip_prefix("chat_janitor_callback_deliveries_total{result=\"delivered\"} ")
                })
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0) as u64
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut n = delivered().await;
        while n < want && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            n = delivered().await;
        }
        let done = Duration::from_millis(wall_ms().saturating_sub(first));
        res.callbacks = Some((n, done));
    }
    app.stop().await;
    if via == Via::Broker {
        delete_queue(&queue).await;
    }
    up.stop().await;
    res
}
