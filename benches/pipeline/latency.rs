//! Latency: accept (the webhook's 202) to settled (the upstream call that
//! removed the account, by its arrival `at_ms` in the emulator's call log)
//! at half the upstream ceiling: 10,000 unsubscribes/s offered, spread
//! evenly over time, against `linger_ms`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chat_janitor::emulator::{Seed, SeedChannel};
use serde_json::json;

use crate::common::*;

/// Half the ceiling: 200 calls/s x 100 accounts / 2.
pub const OFFERED_ITEMS_PER_S: f64 = 10_000.0;

#[derive(Clone, Copy)]
pub struct LatencySpec {
    pub linger_ms: u64,
    /// Channels the load spreads over. At 10,000/s a channel gets
    /// 10,000 / channels per second, so a batch fills in channels x 10 ms: with
    /// channels = linger_ms / 10 it fills just as the linger ends (the
    /// slowest case that still needs only 100 calls/s, half the ceiling).
    pub channels: usize,
    /// Channels each event names (events/s = 10,000 / per_event).
    pub per_event: usize,
    pub seconds: u64,
    pub concurrency: usize,
    /// Channels in strict rotation (event k -> block k mod blocks) instead
    /// of pseudo-random: every channel fills at the same instant, so all
    /// their batches come due together (a stress case).
    pub lockstep: bool,
}

pub struct LatencyResult {
    pub events: u64,
    pub accepted: u64,
    pub statuses: String,
    /// Events whose every account was seen removed upstream.
    pub settled: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub calls: u64,
    pub refused_60007: u64,
    pub fill: f64,
    /// Worst lateness of the load generator behind its schedule.
    pub max_behind: Duration,
    pub offered_events_per_s: f64,
    /// `chat_janitor_event_settle_seconds` from /metrics, bucket bounds:
    /// the smallest bucket holding 99% of the events.
    pub metrics_p99_le: String,
}

/// SplitMix64: a fixed, well-mixed hash of `k`.
pub fn splitmix64(k: u64) -> u64 {
    let mut z = k.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn user(k: u64) -> String {
    format!("l{k}")
}

pub async fn run(spec: LatencySpec) -> LatencyResult {
    let tag = format!(
        "lat{}{}x",
        spec.linger_ms,
        if spec.lockstep { "r" } else { "" }
    );
    let events_per_s = OFFERED_ITEMS_PER_S / spec.per_event as f64;
    let events = (events_per_s * spec.seconds as f64) as u64;
    let blocks = spec.channels / spec.per_event;
    // Event k's block of channels: pseudo-random (a fixed hash of k), so
    // channels fill independently, as real traffic does, not in lockstep.
    let chans_of = move |k: u64| -> Vec<usize> {
        let b = if spec.lockstep {
            k as usize % blocks
        } else {
            (splitmix64(k) % blocks as u64) as usize
        };
        (0..spec.per_event)
            .map(|j| b * spec.per_event + j)
            .collect()
    };

    let up = Upstream::start().await;
    let mut members = vec![Vec::new(); spec.channels];
    for k in 0..events {
        for c in chans_of(k) {
            members[c].push(user(k));
        }
    }
    up.emulator.seed(Seed {
        channels: members
            .into_iter()
            .enumerate()
            .map(|(c, m)| SeedChannel::new(channel(&tag, c), m))
            .collect(),
        ..Seed::default()
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let mut s = settings(&up.url(), dir.path());
    s.batching.linger_ms = spec.linger_ms;
    let app = RunningApp::spawn(s).await;
    let http = http_client(spec.concurrency);

    let make: MakeReq = {
        let tag = tag.clone();
        Arc::new(move |k| {
            let chans: Vec<String> = chans_of(k).into_iter().map(|c| channel(&tag, c)).collect();
            let body = json!({
                "type": "user.banned",
                "timestamp": "2026-11-21T10:00:00Z",
                "data": {"user_id": user(k), "channels": chans}
            });
            Req {
                id: format!("{tag}-{k}"),
                body: body.to_string(),
            }
        })
    };
    let load = Load {
        url: app.url("/v1/events"),
        concurrency: spec.concurrency,
        until: Until::Count(events),
        pace: Some(events_per_s),
        record: true,
    };
    let out = run_load(&http, &load, make).await;
    let want = out.accepted * spec.per_event as u64;
    wait_for(Duration::from_secs(30), || {
        let s = up.emulator.stats().api("delete_subscriber");
        s.applied + s.noop >= want
    })
    .await;
    // Let the settle bookkeeping catch up with the last answers.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let metrics = app.metrics(&http).await;

    // account -> (latest removal at_ms, channels it was removed from)
    let mut removed: HashMap<String, (u64, usize)> = HashMap::new();
    let calls: Vec<_> = up
        .emulator
        .calls()
        .into_iter()
        .filter(|c| c.api == "delete_subscriber")
        .collect();
    for c in calls
        .iter()
        .filter(|c| c.error_code == 0 && c.http_status.is_none())
    {
        for a in &c.accounts {
            let e = removed.entry(a.clone()).or_insert((0, 0));
            e.0 = e.0.max(c.at_ms);
            e.1 += 1;
        }
    }
    let mut lat_ms: Vec<u64> = Vec::with_capacity(out.accepted_at.len());
    for (k, acc_ms) in &out.accepted_at {
        if let Some((at, n)) = removed.get(&user(*k)) {
            if *n >= spec.per_event {
                // The call can reach upstream a hair before the client has
                // read its 202; that counts as 0.
                lat_ms.push(at.saturating_sub(*acc_ms));
            }
        }
    }
    lat_ms.sort_unstable();
    let stats = up.emulator.stats().api("delete_subscriber");
    let ok_calls = stats.code("0");
    let q = |p: f64| {
        if lat_ms.is_empty() {
            f64::NAN
        } else {
            quantile(&lat_ms, p) as f64
        }
    };
    let res = LatencyResult {
        events,
        accepted: out.accepted,
        statuses: out.statuses_line(),
        settled: lat_ms.len() as u64,
        p50_ms: q(0.5),
        p99_ms: q(0.99),
        p999_ms: q(0.999),
        max_ms: lat_ms.last().map_or(f64::NAN, |&m| m as f64),
        calls: stats.calls,
        refused_60007: stats.code("60007"),
        fill: if ok_calls == 0 {
            0.0
        } else {
            stats.applied as f64 / (ok_calls as f64 * 100.0)
        },
        max_behind: out.max_behind,
        offered_events_per_s: events_per_s,
        metrics_p99_le: histogram_quantile_le(&metrics, "chat_janitor_event_settle_seconds", 0.99),
    };
    app.stop().await;
    up.stop().await;
    res
}

/// The upper bound of the first bucket of `name` that holds `q` of the count.
fn histogram_quantile_le(text: &str, name: &str, q: f64) -> String {
    let bucket = format!("{name}_bucket{{le=\"");
    let mut buckets: Vec<(String, f64)> = Vec::new();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix(&bucket) {
            if let Some((le, v)) = rest.split_once("\"}") {
                if let Ok(v) = v.trim().parse::<f64>() {
                    buckets.push((le.to_owned(), v));
                }
            }
        }
    }
    let Some(total) = buckets.last().map(|b| b.1) else {
        return "n/a".into();
    };
    if total == 0.0 {
        return "n/a".into();
    }
    buckets
        .iter()
        .find(|b| b.1 >= q * total)
        .map_or("n/a".into(), |b| format!("<= {} s", b.0))
}
