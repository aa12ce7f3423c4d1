//! Ingest: signed webhooks per second answered 202 (stored durably), by the
//! same load generator against (a) a bare actix-web POST handler that does
//! nothing, (b) the service in embedded mode (journal fsynced before 202),
//! (c) the service in broker mode (published to RabbitMQ, confirmed, before
//! 202). The service keeps processing what it accepts meanwhile (each event
//! is one unsubscribe from one of 10 channels, at the real 200 calls/s).
//!
//! Client and servers share the machine's cores, and on 2 cores the bare
//! handler's rate swings between runs (thread placement), so the bare
//! handler and the embedded service are measured in alternating rounds and
//! each keeps its best round.

use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use chat_janitor::emulator::{Seed, SeedChannel};
use serde_json::json;

use crate::common::*;

pub const CONCURRENCY: usize = 64;
const CHANNELS: usize = 10;

pub struct Round {
    pub rate: f64,
    pub accepted: u64,
    pub elapsed: Duration,
    pub statuses: String,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// CPU of this process (client, server, pipeline, emulator) per 202, µs.
    pub cpu_us: f64,
    /// RabbitMQ's CPU over the round, % of one core.
    pub beam_cpu: Option<f64>,
}

fn make(tag: String) -> MakeReq {
    Arc::new(move |k| {
        let body = json!({
            "type": "user.banned",
            "timestamp": "2026-11-21T10:00:00Z",
            "data": {"user_id": format!("{tag}-{k}"), "channels": [channel("ing", k as usize % CHANNELS)]}
        });
        Req {
            id: format!("{tag}-{k}"),
            body: body.to_string(),
        }
    })
}

/// One timed round of `dur` against `url` with fresh webhook ids (`tag`).
async fn round(http: &reqwest::Client, url: &str, tag: String, dur: Duration) -> Round {
    let load = Load {
        url: url.to_owned(),
        concurrency: CONCURRENCY,
        until: Until::For(dur),
        pace: None,
        record: false,
    };
    let beam0 = beam_ticks();
    let cpu0 = self_ticks();
    let out = run_load(http, &load, make(tag)).await;
    let cpu = (self_ticks() - cpu0) as f64 / TICKS_PER_S;
    let beam_cpu = beam0
        .zip(beam_ticks())
        .map(|(a, b)| (b - a) as f64 / TICKS_PER_S / out.elapsed.as_secs_f64() * 100.0);
    let mut lat = out.latencies_us.clone();
    lat.sort_unstable();
    Round {
        rate: out.rate(),
        accepted: out.accepted,
        elapsed: out.elapsed,
        statuses: out.statuses_line(),
        p50_ms: quantile(&lat, 0.5) as f64 / 1000.0,
        p99_ms: quantile(&lat, 0.99) as f64 / 1000.0,
        cpu_us: cpu * 1e6 / out.accepted.max(1) as f64,
        beam_cpu,
    }
}

/// Takes the body (so the connection stays keep-alive, as for the service)
/// and answers 202.
async fn bare_handler(_body: web::Bytes) -> HttpResponse {
    HttpResponse::Accepted().finish()
}

fn seed_channels(up: &Upstream) {
    up.emulator.seed(Seed {
        channels: (0..CHANNELS)
            .map(|c| SeedChannel::new(channel("ing", c), Vec::<String>::new()))
            .collect(),
        ..Seed::default()
    });
}

/// Waits (up to 20 s) until the service's journal holds no unsettled event.
async fn idle(app: &RunningApp, http: &reqwest::Client) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        let text = app.metrics(http).await;
        let pending = text
            .lines()
            .find_map(|l| l.strip_prefix("chat_janitor_journal_events "))
            .and_then(|v| v.trim().parse::<f64>().ok());
        if pending == Some(0.0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("  (the service still had unsettled events after 20 s)");
}

pub struct IngestResult {
    /// Rounds against the bare handler and the embedded service, in order.
    pub bare: Vec<Round>,
    pub embedded: Vec<Round>,
    pub broker: Round,
}

impl IngestResult {
    pub fn best(rounds: &[Round]) -> &Round {
        rounds
            .iter()
            .max_by(|a, b| a.rate.total_cmp(&b.rate))
            .expect("at least one round")
    }
}

/// `rounds` alternating rounds of `dur` against the bare handler and the
/// embedded service (after a warm-up of `warm` each), then one round against
/// the service in broker mode.
pub async fn run(rounds: usize, warm: Duration, dur: Duration) -> IngestResult {
    let http = http_client(CONCURRENCY);

    // The bare handler: same actix-web, same default worker count as the
    // service's server, a POST route that does nothing.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = HttpServer::new(|| App::new().route("/v1/events", web::post().to(bare_handler)))
        .listen(listener)
        .unwrap()
        .disable_signals()
        .run();
    let bare_handle = server.handle();
    let bare_task = tokio::spawn(server);
    let bare_url = format!("http://127.0.0.1:{port}/v1/events");

    // The service, embedded mode.
    let up = Upstream::start().await;
    seed_channels(&up);
    let dir = tempfile::tempdir().expect("temp dir");
    let app = RunningApp::spawn(settings(&up.url(), dir.path())).await;
    let emb_url = app.url("/v1/events");

    round(&http, &bare_url, "bare-w".into(), warm).await;
    round(&http, &emb_url, "emb-w".into(), warm).await;
    let mut bare = Vec::new();
    let mut embedded = Vec::new();
    for r in 0..rounds {
        // The service finishes what it accepted before the bare round, so
        // its background work does not slow the bare handler down.
        idle(&app, &http).await;
        bare.push(round(&http, &bare_url, format!("bare-{r}"), dur).await);
        embedded.push(round(&http, &emb_url, format!("emb-{r}"), dur).await);
    }
    bare_handle.stop(true).await;
    let _ = bare_task.await;
    app.stop().await;
    up.stop().await;

    // The service, broker mode.
    let up = Upstream::start().await;
    seed_channels(&up);
    let dir = tempfile::tempdir().expect("temp dir");
    let queue = unique_queue("ingest");
    let app = RunningApp::spawn(broker_settings(&up.url(), dir.path(), &queue)).await;
    app.ready(&http, 20).await;
    let url = app.url("/v1/events");
    round(&http, &url, "brk-w".into(), warm).await;
    let broker = round(&http, &url, "brk".into(), dur).await;
    app.stop().await;
    delete_queue(&queue).await;
    up.stop().await;

    IngestResult {
        bare,
        embedded,
        broker,
    }
}
