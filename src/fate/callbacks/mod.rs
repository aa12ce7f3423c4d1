//! Signed completion callbacks: every record the store writes is POSTed to
//! `[callbacks] url` as a Standard Webhooks message, signed with `[callbacks]
//! secret` the way our own intake verifies (`domain::webhook_key::sign`).
//!
//! - Its `webhook-id` is `fate_<event id>_<settled|dead_lettered>`: the same
//!   for every copy of one outcome (a retry, a repeat after a restart, the
//!   record rewritten when its event is replayed after a crash), so the
//!   receiver dedupes them, and new when a replayed dead letter changes the
//!   outcome. An id that is not plain visible ASCII or would be over 255
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
//! Durability: each callback is held until delivered or given up, by a
//! feed that outlives a restart. Embedded mode reads the record store in
//! write order from a cursor (`cursor`); broker mode consumes the quorum
//! queue `<queue>.callbacks`, which every replica shares (`queue`). Both
//! keep a window of `WINDOW` callbacks (at most `CONCURRENCY` requests in
//! flight), so one slow callback never holds up the others, and never the
//! clean-up, which only hands records to the store (`window`). After a
//! restart or a failover a callback delivered a moment before may be sent
//! once more, with the same `webhook-id`.

mod cursor;
pub mod queue;
mod window;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::record::format_ms;
use super::{CallbackCursor, EventRecord, FateError, FateStore, Status};
use crate::domain::clock::unix_now;
use crate::domain::webhook_key::sign;
use crate::domain::{CallbackResult, DeadLetterSink, WebhookKey};
use crate::inbox::broker::{BrokerDeadLetters, BrokerLink};
use crate::telemetry::Metrics;
pub use window::{Callback, Tries};

/// Callbacks read ahead of the cursor at once.
const WINDOW: usize = 256;
/// Requests in flight at once.
const CONCURRENCY: usize = 16;
/// One attempt's timeout.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// First backoff ceiling; doubles per attempt up to `max_backoff`.
const BACKOFF_BASE: Duration = Duration::from_millis(500);

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
    /// Broker mode: callbacks held `hold` for a retry and published again.
    handed_on: Arc<AtomicU64>,
}

impl Callbacks {
    /// Embedded mode: starts sending the records of `store` written after
    /// its cursor (or, the first time, from now on) to the receiver.
    pub async fn start(
        store: Arc<dyn FateStore>,
        sink: Arc<dyn DeadLetterSink>,
        opts: CallbackOptions,
        metrics: Metrics,
    ) -> Result<Callbacks, FateError> {
        let http = http_client()?;
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
        let (window, results) = window::Window::new(http, opts, sink, metrics);
        let sender = cursor::Sender {
            store,
            window,
            read_to: cursor.after,
            done_to: cursor.after,
            saved: cursor.after,
            last_save: Instant::now(),
        };
        let task = tokio::spawn(sender.run(results, stop.clone()));
        Ok(Callbacks {
            stop,
            task,
            handed_on: Arc::default(),
        })
    }

    /// Broker mode: starts consuming the callback queue of `link`'s work
    /// queue and sending what it holds to the receiver. `hold` is how long
    /// a delivery waits for a retry before it is published again
    /// (`queue::HOLD`; tests shorten it).
    pub fn start_queue(
        link: Arc<BrokerLink>,
        dead: Arc<BrokerDeadLetters>,
        opts: CallbackOptions,
        metrics: Metrics,
        hold: Duration,
    ) -> Result<Callbacks, FateError> {
        let http = http_client()?;
        let queue = queue::callback_queue_name(&link.queue);
        tracing::info!(receiver = %receiver(&opts.url), queue = %queue, "completion callbacks on");
        let stop = CancellationToken::new();
        let sink: Arc<dyn DeadLetterSink> = dead.clone();
        let (window, results) = window::Window::new(http, opts, sink, metrics);
        let handed_on = Arc::new(AtomicU64::new(0));
        let sender = queue::QueueSender {
            link,
            queue,
            dead,
            window,
            hold,
            handed_on: handed_on.clone(),
        };
        let task = tokio::spawn(sender.run(results, stop.clone()));
        Ok(Callbacks {
            stop,
            task,
            handed_on,
        })
    }

    /// Broker mode: how many callbacks were held `hold` waiting for a
    /// retry and published to the queue again (0 in embedded mode).
    pub fn handed_on(&self) -> u64 {
        self.handed_on.load(Ordering::Relaxed)
    }

    /// Stops sending (requests in flight are dropped, and sent again after
    /// a restart) and saves the cursor.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

fn http_client() -> Result<reqwest::Client, FateError> {
    reqwest::Client::builder()
        .timeout(ATTEMPT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("chat-janitor/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| FateError::Storage(format!("building the callbacks' HTTP client: {e}")))
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
    // AMQP's message_id (broker mode) holds at most 255 bytes.
    if plain && id.len() <= 255 {
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

/// What an attempt got.
pub enum Outcome {
    Delivered,
    Failed(CallbackResult, String),
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
    use super::window::backoff;
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
        // 243 bytes of event id make a 256-byte webhook-id: one too many
        // for AMQP's message_id.
        for odd in ["a b", "é", &"x".repeat(243)] {
            let id = message_id(&record(odd, Status::Settled));
            assert!(
                id.starts_with("fate_sha256_") && id.ends_with("_settled"),
                "{id}"
            );
            assert!(id.len() <= 255 && id.bytes().all(|b| b.is_ascii_graphic()));
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
