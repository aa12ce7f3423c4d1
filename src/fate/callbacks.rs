//! Signed completion callbacks: every record the store writes is POSTed to
//! `[callbacks] url` as a Standard Webhooks message, signed with `[callbacks]
//! secret` the way our own intake verifies (`domain::webhook_key::sign`).
//!
//! - Its `webhook-id` is `fate_<event id>_<settled|dead_lettered>`: the same
//!   for every copy of one outcome (a retry, a repeat after a restart, the
//!   record rewritten when its event is replayed after a crash), so the
//!   receiver dedupes them, and new when a replayed dead letter changes the
//!   outcome. An id that is not plain visible ASCII or would be over 256
//!   bytes is replaced by a hash of it.
//! - The body is `{"type": "event.settled" | "event.dead_lettered",
//!   "timestamp": <settled_at>, "data": <the record>}`, identical on every
//!   attempt; `webhook-timestamp` is the attempt's.
//! - Any 2xx is delivered; anything else (410 Gone included: a receiver that
//!   is being redeployed or misrouted must not lose proofs of deletion) and
//!   no answer are retried with exponential backoff and full jitter, up to
//!   `max_backoff` between attempts. The first delivery after failures
//!   wakes every waiting callback, so a receiver that comes back gets the
//!   backlog at once.
//! - A callback still not delivered `max_age` after its event settled is
//!   given up: a dead letter (`callback_expired`, with the record), counted
//!   and alerted on.
//!
//! Durability: the sender reads the store in write order into a window of
//! `WINDOW` callbacks (at most `CONCURRENCY` requests in flight), so one
//! slow callback never holds up the others, and never the clean-up, which
//! only hands records to the store. The store keeps a cursor: every record
//! up to it was delivered or given up. It is saved at most once a second
//! and at shutdown; after a restart the window is read again from it, so a
//! callback delivered after the cursor was last saved is sent once more,
//! with the same `webhook-id`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::record::format_ms;
use super::{CallbackCursor, EventRecord, FateError, FateStore, Position, Status};
use crate::domain::clock::{unix_ms, unix_now};
use crate::domain::webhook_key::sign;
use crate::domain::{CallbackResult, DeadLetter, DeadLetterReason, DeadLetterSink, WebhookKey};
use crate::telemetry::Metrics;

/// Callbacks read ahead of the cursor at once.
const WINDOW: usize = 256;
/// Requests in flight at once.
const CONCURRENCY: usize = 16;
/// One attempt's timeout.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// First backoff ceiling; doubles per attempt up to `max_backoff`.
const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// The cursor is saved at most this often while callbacks flow.
const SAVE_EVERY: Duration = Duration::from_secs(1);
/// Wait before reading the store again after it failed.
const READ_RETRY: Duration = Duration::from_secs(1);

/// Where and how callbacks are sent.
#[derive(Debug, Clone)]
pub struct CallbackOptions {
    pub url: String,
    pub key: WebhookKey,
    pub max_age: Duration,
    pub max_backoff: Duration,
}

/// The running sender.
pub struct Callbacks {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Callbacks {
    /// Starts sending the records of `store` written after its cursor (or,
    /// the first time, from now on) to the receiver.
    pub async fn start(
        store: Arc<dyn FateStore>,
        sink: Arc<dyn DeadLetterSink>,
        opts: CallbackOptions,
        metrics: Metrics,
    ) -> Result<Callbacks, FateError> {
        let http = reqwest::Client::builder()
            .timeout(ATTEMPT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("chat-janitor/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| FateError::Storage(format!("building the callbacks' HTTP client: {e}")))?;
        let cursor = match store.cursor() {
            Some(c) => c,
            None => {
                let c = CallbackCursor {
                    after: *store.written().borrow(),
                };
                if let Err(e) = store.save_cursor(Some(c)).await {
                    tracing::error!(error = %e, "cannot store the callbacks' cursor; after a restart callbacks start with the records written from then on");
                }
                c
            }
        };
        tracing::info!(receiver = %receiver(&opts.url), "completion callbacks on");
        let stop = CancellationToken::new();
        let sender = Sender {
            store,
            sink,
            http,
            opts,
            metrics,
            window: VecDeque::new(),
            read_to: cursor.after,
            done_to: cursor.after,
            saved: cursor.after,
            last_save: Instant::now(),
            in_flight: 0,
            failing: false,
        };
        let task = tokio::spawn(sender.run(stop.clone()));
        Ok(Callbacks { stop, task })
    }

    /// Stops sending (requests in flight are dropped, and sent again after
    /// a restart) and saves the cursor.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// The receiver's scheme, host and port, for logs (never its path or
/// credentials).
fn receiver(url: &str) -> String {
    reqwest::Url::parse(url)
        .map(|u| {
            format!(
                "{}://{}{}",
                u.scheme(),
                u.host_str().unwrap_or(""),
                u.port().map(|p| format!(":{p}")).unwrap_or_default()
            )
        })
        .unwrap_or_default()
}

/// The callback's `webhook-id`.
pub fn message_id(record: &EventRecord) -> String {
    let outcome = match record.status {
        Status::DeadLettered => "dead_lettered",
        Status::Settled | Status::Pending => "settled",
    };
    let plain = record.id.bytes().all(|b| b.is_ascii_graphic());
    let id = format!("fate_{}_{outcome}", record.id);
    if plain && id.len() <= 256 {
        return id;
    }
    let h = Sha256::digest(record.id.as_bytes());
    let hex: String = h[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("fate_sha256_{hex}_{outcome}")
}

/// The callback's body: the same bytes on every attempt.
pub fn body(record: &EventRecord) -> Vec<u8> {
    let kind = match record.status {
        Status::DeadLettered => "event.dead_lettered",
        Status::Settled | Status::Pending => "event.settled",
    };
    let at = record.settled_at_ms.unwrap_or(record.accepted_at_ms);
    serde_json::to_vec(&json!({
        "type": kind,
        "timestamp": format_ms(at),
        "data": record,
    }))
    .expect("records serialize")
}

/// The Standard Webhooks headers of one attempt.
pub fn signed_headers(
    key: &WebhookKey,
    msg_id: &str,
    timestamp: &str,
    body: &[u8],
) -> [(&'static str, String); 3] {
    [
        ("webhook-id", msg_id.to_owned()),
        ("webhook-timestamp", timestamp.to_owned()),
        (
            "webhook-signature",
            sign(key.as_bytes(), msg_id, timestamp, body),
        ),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Sending,
    Done,
}

/// One callback in the window.
struct Slot {
    pos: Position,
    msg_id: String,
    event_id: String,
    event_type: String,
    body: Vec<u8>,
    /// When its event settled (unix ms): `max_age` counts from here.
    settled_ms: u64,
    attempts: u32,
    next_at: Instant,
    state: State,
    /// What the last attempt got, for the dead letter.
    last: String,
}

enum Outcome {
    Delivered,
    Failed(CallbackResult, String),
}

struct Sender {
    store: Arc<dyn FateStore>,
    sink: Arc<dyn DeadLetterSink>,
    http: reqwest::Client,
    opts: CallbackOptions,
    metrics: Metrics,
    window: VecDeque<Slot>,
    /// The newest record read into the window.
    read_to: Option<Position>,
    /// Every record up to here is delivered or given up (the cursor).
    done_to: Option<Position>,
    saved: Option<Position>,
    last_save: Instant,
    in_flight: usize,
    /// Attempts are failing (logged once when that starts and ends).
    failing: bool,
}

impl Sender {
    async fn run(mut self, stop: CancellationToken) {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Position, Outcome)>();
        let mut written = self.store.written();
        let mut store_open = true;
        // There may be records beyond `read_to`.
        let mut more = true;
        let mut read_again_at: Option<Instant> = None;
        loop {
            if read_again_at.is_some_and(|t| Instant::now() >= t) {
                read_again_at = None;
                more = true;
            }
            if more && self.window.len() < WINDOW {
                let want = WINDOW - self.window.len();
                match self.store.read_after(self.read_to, want).await {
                    Ok(batch) => {
                        more = batch.len() == want;
                        for (pos, record) in batch {
                            self.read_to = Some(pos);
                            self.window.push_back(slot(pos, &record));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read event records for callbacks; trying again");
                        more = false;
                        read_again_at = Some(Instant::now() + READ_RETRY);
                    }
                }
            }
            self.expire_and_send(&tx);
            self.advance().await;
            let wake = self
                .window
                .iter()
                .filter(|s| s.state == State::Waiting)
                .map(|s| s.next_at.min(self.expiry(s)))
                .chain(read_again_at)
                .min();
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                Some((pos, outcome)) = rx.recv() => self.settle(pos, outcome),
                changed = written.changed(), if store_open && !more => {
                    store_open = changed.is_ok();
                    more = true;
                }
                _ = sleep_until(wake) => {}
            }
        }
        self.save().await;
    }

    /// When a waiting callback's `max_age` is up.
    fn expiry(&self, s: &Slot) -> Instant {
        let age = Duration::from_millis(unix_ms().saturating_sub(s.settled_ms));
        Instant::now() + self.opts.max_age.saturating_sub(age)
    }

    /// Gives up the waiting callbacks past `max_age`, and starts attempts
    /// for those due, up to `CONCURRENCY` in flight.
    fn expire_and_send(&mut self, tx: &mpsc::UnboundedSender<(Position, Outcome)>) {
        let now = Instant::now();
        let now_ms = unix_ms();
        let max_age_ms = u64::try_from(self.opts.max_age.as_millis()).unwrap_or(u64::MAX);
        for i in 0..self.window.len() {
            let s = &self.window[i];
            if s.state != State::Waiting {
                continue;
            }
            if now_ms.saturating_sub(s.settled_ms) >= max_age_ms {
                self.give_up(i);
                continue;
            }
            if s.next_at > now || self.in_flight >= CONCURRENCY {
                continue;
            }
            let s = &mut self.window[i];
            s.state = State::Sending;
            s.attempts += 1;
            self.in_flight += 1;
            let (http, url, key) = (
                self.http.clone(),
                self.opts.url.clone(),
                self.opts.key.clone(),
            );
            let (pos, msg_id, body) = (s.pos, s.msg_id.clone(), s.body.clone());
            let tx = tx.clone();
            tokio::spawn(async move {
                let outcome = attempt(&http, &url, &key, &msg_id, body).await;
                let _ = tx.send((pos, outcome));
            });
        }
        let oldest = self
            .window
            .iter()
            .find(|s| s.state != State::Done)
            .map_or(0, |s| now_ms.saturating_sub(s.settled_ms) / 1000);
        self.metrics.set_callback_oldest_pending(oldest);
    }

    fn give_up(&mut self, i: usize) {
        let s = &mut self.window[i];
        s.state = State::Done;
        let data = serde_json::from_slice::<serde_json::Value>(&s.body)
            .map(|mut v| v["data"].take())
            .unwrap_or(serde_json::Value::Null);
        let detail = format!(
            "callback {} not delivered within {} after the event settled ({} attempts; last: {})",
            s.msg_id,
            humantime::format_duration(self.opts.max_age),
            s.attempts,
            if s.last.is_empty() { "none" } else { &s.last }
        );
        tracing::warn!(event_id = %s.event_id, attempts = s.attempts, "completion callback given up (callback_expired)");
        self.sink.record(DeadLetter {
            id: 0,
            event_id: s.event_id.clone(),
            event_type: s.event_type.clone(),
            action: None,
            reason: DeadLetterReason::CallbackExpired,
            detail,
            at_unix: unix_now(),
            event: data,
        });
        self.metrics
            .dead_lettered(DeadLetterReason::CallbackExpired, 1);
    }

    fn settle(&mut self, pos: Position, outcome: Outcome) {
        self.in_flight = self.in_flight.saturating_sub(1);
        let now = Instant::now();
        let Some(i) = self.window.iter().position(|s| s.pos == pos) else {
            return;
        };
        match outcome {
            Outcome::Delivered => {
                self.metrics.callback_delivery(CallbackResult::Delivered);
                self.window[i].state = State::Done;
                if self.failing {
                    tracing::info!("completion callbacks are delivered again");
                    self.failing = false;
                }
                // The receiver answers again: nothing waits out its backoff.
                for s in self.window.iter_mut().filter(|s| s.state == State::Waiting) {
                    s.next_at = s.next_at.min(now);
                }
            }
            Outcome::Failed(result, detail) => {
                self.metrics.callback_delivery(result);
                if !self.failing {
                    tracing::warn!(receiver = %receiver(&self.opts.url), answer = %detail, "completion callbacks fail; retrying with backoff");
                    self.failing = true;
                }
                let s = &mut self.window[i];
                s.state = State::Waiting;
                s.next_at = now + backoff(s.attempts, self.opts.max_backoff);
                s.last = detail;
            }
        }
    }

    /// Moves the cursor over the callbacks done at the front of the
    /// window, and saves it when due.
    async fn advance(&mut self) {
        while self.window.front().is_some_and(|s| s.state == State::Done) {
            if let Some(s) = self.window.pop_front() {
                self.done_to = Some(s.pos);
            }
        }
        if self.done_to != self.saved && self.last_save.elapsed() >= SAVE_EVERY {
            self.save().await;
        }
    }

    async fn save(&mut self) {
        self.last_save = Instant::now();
        if self.done_to == self.saved {
            return;
        }
        let cursor = CallbackCursor {
            after: self.done_to,
        };
        match self.store.save_cursor(Some(cursor)).await {
            Ok(()) => self.saved = self.done_to,
            Err(e) => {
                tracing::warn!(error = %e, "cannot store the callbacks' cursor; delivered callbacks may be sent again after a restart")
            }
        }
    }
}

fn slot(pos: Position, record: &EventRecord) -> Slot {
    Slot {
        pos,
        msg_id: message_id(record),
        event_id: record.id.clone(),
        event_type: record.kind.clone(),
        body: body(record),
        settled_ms: record.settled_at_ms.unwrap_or(record.accepted_at_ms),
        attempts: 0,
        next_at: Instant::now(),
        state: State::Waiting,
        last: String::new(),
    }
}

/// Full jitter: anywhere up to the attempt's ceiling, which doubles from
/// `BACKOFF_BASE` up to `max`.
fn backoff(attempts: u32, max: Duration) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(1u32 << attempts.saturating_sub(1).min(20))
        .min(max);
    let ms = u64::try_from(ceiling.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    Duration::from_millis(rand::rng().random_range(0..=ms))
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

async fn attempt(
    http: &reqwest::Client,
    url: &str,
    key: &WebhookKey,
    msg_id: &str,
    body: Vec<u8>,
) -> Outcome {
    let ts = unix_now().to_string();
    let mut req = http.post(url).header("content-type", "application/json");
    for (name, value) in signed_headers(key, msg_id, &ts, &body) {
        req = req.header(name, value);
    }
    match req.body(body).send().await {
        Ok(r) if r.status().is_success() => Outcome::Delivered,
        Ok(r) => Outcome::Failed(
            CallbackResult::Rejected,
            format!("HTTP {}", r.status().as_u16()),
        ),
        Err(e) => Outcome::Failed(
            CallbackResult::Unreachable,
            if e.is_timeout() {
                "no answer within 10 s".to_owned()
            } else if e.is_connect() {
                "cannot connect".to_owned()
            } else {
                "the request failed".to_owned()
            },
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Source, UserId};
    use crate::fate::RecordBuilder;

    #[test]
    fn callbacks_sign_like_the_standard_webhooks_libraries() {
        // The second known-answer vector of the Go, JS, Java and C#
        // libraries' tests (note the space in the body).
        let key = WebhookKey::decode("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let [id, ts, sig] = signed_headers(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265330",
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(id, ("webhook-id", "msg_p5jXN8AQM9LWM0D4loKWxJek".into()));
        assert_eq!(ts, ("webhook-timestamp", "1614265330".into()));
        assert_eq!(
            sig,
            (
                "webhook-signature",
                "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=".into()
            )
        );
    }

    fn record(id: &str, status: Status) -> EventRecord {
        RecordBuilder::new(
            id,
            Source::Webhook,
            "user.banned",
            UserId::parse("u1").unwrap(),
            1_795_000_000_000,
            Vec::new(),
        )
        .build(status, Some(1_795_000_000_500), None)
    }

    #[test]
    fn message_ids_are_per_outcome_and_always_header_safe() {
        assert_eq!(
            message_id(&record("msg_1", Status::Settled)),
            "fate_msg_1_settled"
        );
        assert_eq!(
            message_id(&record("msg_1", Status::DeadLettered)),
            "fate_msg_1_dead_lettered"
        );
        for odd in ["a b", "é", &"x".repeat(256)] {
            let id = message_id(&record(odd, Status::Settled));
            assert!(
                id.starts_with("fate_sha256_") && id.ends_with("_settled"),
                "{id}"
            );
            assert!(id.len() <= 256 && id.bytes().all(|b| b.is_ascii_graphic()));
            assert_eq!(id, message_id(&record(odd, Status::Settled)));
        }
    }

    #[test]
    fn the_body_carries_the_type_the_settle_time_and_the_record() {
        let r = record("e", Status::DeadLettered);
        let v: serde_json::Value = serde_json::from_slice(&body(&r)).unwrap();
        assert_eq!(v["type"], "event.dead_lettered");
        assert_eq!(v["timestamp"], "2026-11-18T11:06:40.500Z");
        assert_eq!(
            serde_json::from_value::<EventRecord>(v["data"].clone()).unwrap(),
            r
        );
        let v: serde_json::Value =
            serde_json::from_slice(&body(&record("e", Status::Settled))).unwrap();
        assert_eq!(v["type"], "event.settled");
    }

    #[test]
    fn backoff_stays_under_its_ceiling() {
        let max = Duration::from_secs(60);
        for attempts in 0u32..40 {
            let ceiling = BACKOFF_BASE
                .saturating_mul(1u32 << attempts.saturating_sub(1).min(20))
                .min(max);
            assert!(backoff(attempts, max) <= ceiling);
        }
        assert!(backoff(1, max) <= BACKOFF_BASE);
    }
}
