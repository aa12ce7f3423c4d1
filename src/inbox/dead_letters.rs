//! Broker mode's dead-letter log: what the admin routes list and replay.
//!
//! Dead letters reach the fanout exchange `<queue>.dlx` two ways: actions
//! that failed are published there by [`BrokerDeadLetters`] (a JSON
//! [`DeadLetter`] body), and messages the work queue rejected (unparseable,
//! no rule) or redelivered past its delivery limit are dead-lettered there
//! by the broker through `x-dead-letter-exchange` (the producer's raw body,
//! with an `x-death` header). The exchange feeds `<queue>.dead`, a quorum
//! queue that cannot be read without consuming it, so listing it would
//! destroy or reorder what it holds.
//!
//! This module owns a second queue bound to the same exchange:
//! `<queue>.dead-log`, a RabbitMQ stream (3.9 and later). Failed actions
//! reach it through the exchange. Rejected messages do not: on RabbitMQ
//! 3.10.8 a quorum queue's own dead-lettering reaches the classic or quorum
//! `<queue>.dead` but not a stream bound beside it (and an `x-death` header
//! published into a stream does not survive). So the consumer logs a message
//! with [`DeadLog::record_rejected`] (confirmed) before it rejects it; a
//! crash in between redelivers the message, and it is logged twice at
//! worst. Messages dead-lettered for the delivery limit are in
//! `<queue>.dead` only. A stream is an
//! append-only log that a consumer reads from an offset without removing
//! anything, so:
//! - **Listing** reads from the first offset, and every call sees the same
//!   entries in the same order. The stream offset is each entry's id, stable
//!   for the entry's life.
//! - **Replay** publishes the chosen entries back to the work queue (with
//!   publisher confirms, `message_id` kept so the consumer's duplicate
//!   handling and the upstream's idempotence apply) and only then appends a
//!   marker (header [`REPLAYED_HEADER`], body the JSON list of offsets) to the
//!   stream. Listing hides marked entries. Nothing is ever deleted, so a
//!   crash mid-replay loses no dead letter: entries replayed but not yet
//!   marked are replayed again next time, which is an idempotent repeat.
//!   Two replays at once may also repeat some entries, for the same reason
//!   harmlessly.
//! - **The end of the log** is found without guessing at idle timeouts:
//!   each read first appends a cursor message (header [`CURSOR_HEADER`]) and
//!   reads until it comes back, so a read sees everything written before it.
//!
//! `<queue>.dead` stays as it is: existing deployments already have it with
//! their dead letters in it, operators may consume it with their own
//! tools, and a queue's type cannot be changed in place. The stream only
//! sees dead letters from the moment it is declared; older ones stay in
//! `<queue>.dead`. The log keeps at most [`LOG_MAX_BYTES`] (oldest segments
//! go first); a policy can raise that.
//!
//! [`BrokerDeadLetters`]: super::broker::BrokerDeadLetters

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel};
use serde::Serialize;

use super::broker::{declare_stream, dlx_name, table, BrokerError, BrokerLink};
use crate::domain::DeadLetter;

/// Marks a log message as "these offsets were replayed".
pub const REPLAYED_HEADER: &str = "x-chat-janitor-replayed";
/// Marks a log message as a reader's end-of-log cursor.
pub const CURSOR_HEADER: &str = "x-chat-janitor-cursor";
/// Set on a replayed message: the log offset it came from.
pub const REPLAY_OF_HEADER: &str = "x-chat-janitor-replay-of";
/// The header `BrokerDeadLetters` puts the reason in.
const REASON_HEADER: &str = "x-chat-janitor-dead-letter";
/// Set on a rejected message logged by [`DeadLog::record_rejected`]: why.
pub const REJECTED_HEADER: &str = "x-chat-janitor-rejected";
/// Retention of the log, in bytes.
pub const LOG_MAX_BYTES: i64 = 1_000_000_000;
/// Deliveries in flight while reading the log (streams require a prefetch).
const PREFETCH: u16 = 500;
/// Offsets per replay marker.
const MARK_EVERY: usize = 200;
/// Entries replayed per read of the log.
const REPLAY_PASS: usize = 5_000;
/// Longest silence while reading before the read is given up.
const READ_STALL: Duration = Duration::from_secs(30);

/// The stream that logs every dead letter of a queue.
pub fn dead_log_name(queue: &str) -> String {
    format!("{queue}.dead-log")
}

/// One entry of the log, as the admin route shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BrokerDeadLetter {
    /// The stream offset: stable, and what `replay` takes.
    pub id: u64,
    /// The message's `message_id` (the event id), if it had one.
    pub message_id: Option<String>,
    /// Why it was dead-lettered: the action's reason, the consumer's for a
    /// rejected message (`malformed`, `unknown_type`, ...), else the
    /// broker's from `x-death`.
    pub reason: String,
    /// A failed action, with the event it came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<DeadLetter>,
    /// A message the work queue rejected: its body as text when it is
    /// UTF-8, else in `raw_body_base64`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_body: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raw_body_base64: Option<String>,
    /// The broker's `x-death` header, where the log has one (a message
    /// dead-lettered into the log by a broker that delivers it there).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x_death: Option<serde_json::Value>,
}

/// The dead-letter log of one work queue.
pub struct DeadLog {
    link: Arc<BrokerLink>,
    log: String,
}

impl DeadLog {
    /// Declares the log (a stream bound to `<queue>.dlx`) on the link's
    /// connection. An existing log with other arguments is used as it is.
    pub async fn declare(link: Arc<BrokerLink>) -> Result<DeadLog, BrokerError> {
        let conn = link.connection().await?;
        let log = dead_log_name(&link.queue);
        let args = [("x-max-length-bytes", AMQPValue::LongLongInt(LOG_MAX_BYTES))];
        let ch = declare_stream(&conn, &log, &args, "dead-letter log", "").await?;
        ch.queue_bind(
            ShortString::from(log.as_str()),
            ShortString::from(dlx_name(&link.queue).as_str()),
            ShortString::from(""),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let _ = ch.close(200, ShortString::from("done")).await;
        Ok(DeadLog { link, log })
    }

    /// Logs a work-queue delivery the consumer is about to reject (its body,
    /// `message_id` and content type as they came, and `reason`). Call it
    /// before the reject; the broker's own dead-lettering does not reach
    /// the stream (see the module docs).
    pub async fn record_rejected(&self, d: &Delivery, reason: &str) -> Result<(), BrokerError> {
        let id = message_id(d);
        self.record_rejected_raw(id.as_deref(), &d.data, reason)
            .await
    }

    /// `record_rejected` from what a consumer kept of the message: its id
    /// and body.
    pub async fn record_rejected_raw(
        &self,
        message_id: Option<&str>,
        body: &[u8],
        reason: &str,
    ) -> Result<(), BrokerError> {
        let mut props = BasicProperties::default().with_headers(table(&[(
            REJECTED_HEADER,
            AMQPValue::LongString(LongString::from(reason)),
        )]));
        if let Some(id) = message_id {
            props = props.with_message_id(ShortString::from(id));
        }
        self.link.publish("", &self.log, body, props).await
    }

    /// The first `limit` dead letters not replayed yet, oldest first.
    /// Reading removes nothing: every call sees the same entries.
    pub async fn list(&self, limit: usize) -> Result<Vec<BrokerDeadLetter>, BrokerError> {
        let (end, replayed) = self.snapshot().await?;
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        self.scan(end, |offset, d| {
            if is_entry(d) && !replayed.contains(&offset) {
                out.push(describe(offset, d));
            }
            out.len() < limit
        })
        .await?;
        Ok(out)
    }

    /// Replays every dead letter not replayed yet (`None`), or the chosen
    /// ids, to the work queue in log order; then marks them replayed.
    /// Returns how many were replayed. Unknown or already replayed ids are
    /// skipped.
    pub async fn replay(&self, ids: Option<Vec<u64>>) -> Result<usize, BrokerError> {
        let wanted: Option<HashSet<u64>> = ids.map(|v| v.into_iter().collect());
        if wanted.as_ref().is_some_and(HashSet::is_empty) {
            return Ok(0);
        }
        let (end, mut replayed) = self.snapshot().await?;
        let mut done = 0;
        // A bounded pass at a time: collected first, published after, so the
        // read is not tied to the work queue's pace and memory stays bounded.
        loop {
            let mut todo: Vec<(u64, Vec<u8>, BasicProperties)> = Vec::new();
            self.scan(end, |offset, d| {
                let chosen = wanted.as_ref().is_none_or(|w| w.contains(&offset));
                if chosen && is_entry(d) && !replayed.contains(&offset) {
                    let (body, props) = replay_message(offset, d);
                    todo.push((offset, body, props));
                }
                todo.len() < REPLAY_PASS
            })
            .await?;
            for chunk in todo.chunks(MARK_EVERY) {
                let mut offsets = Vec::with_capacity(chunk.len());
                for (offset, body, props) in chunk {
                    self.link
                        .publish("", &self.link.queue, body, props.clone())
                        .await?;
                    offsets.push(*offset);
                }
                // Only once every replay in the chunk is confirmed: a crash
                // before this line replays them again, never loses them.
                self.mark_replayed(&offsets).await?;
                done += offsets.len();
                replayed.extend(offsets);
            }
            if todo.len() < REPLAY_PASS {
                break;
            }
        }
        if done > 0 {
            tracing::info!(log = %self.log, replayed = done, "dead letters replayed to the work queue");
        }
        Ok(done)
    }

    async fn mark_replayed(&self, offsets: &[u64]) -> Result<(), BrokerError> {
        let body = serde_json::to_vec(offsets).unwrap_or_default();
        let props = BasicProperties::default()
            .with_content_type(ShortString::from("application/json"))
            .with_headers(table(&[(
                REPLAYED_HEADER,
                AMQPValue::LongLongInt(i64::try_from(offsets.len()).unwrap_or(i64::MAX)),
            )]));
        self.link.publish("", &self.log, &body, props).await
    }

    /// Appends a cursor and reads up to it: the log's end for this read
    /// (the cursor's offset) and the offsets marked replayed before it.
    async fn snapshot(&self) -> Result<(u64, HashSet<u64>), BrokerError> {
        let token = format!("{:032x}", rand::random::<u128>());
        let props = BasicProperties::default().with_headers(table(&[(
            CURSOR_HEADER,
            AMQPValue::LongString(LongString::from(token.as_str())),
        )]));
        self.link.publish("", &self.log, b"", props).await?;
        let mut end = None;
        let mut replayed = HashSet::new();
        self.scan(u64::MAX, |offset, d| {
            if header_str(d, CURSOR_HEADER).as_deref() == Some(token.as_str()) {
                end = Some(offset);
                return false;
            }
            if header(d, REPLAYED_HEADER).is_some() {
                if let Ok(v) = serde_json::from_slice::<Vec<u64>>(&d.data) {
                    replayed.extend(v);
                }
            }
            true
        })
        .await?;
        let end = end.ok_or(BrokerError::Refused("the log ended before its cursor"))?;
        Ok((end, replayed))
    }

    /// Reads the log from its first offset, calling `f` for each message
    /// before `end` until it returns `false`.
    async fn scan(
        &self,
        end: u64,
        mut f: impl FnMut(u64, &Delivery) -> bool,
    ) -> Result<(), BrokerError> {
        let conn = self.link.connection().await?;
        let ch = conn.create_channel().await?;
        let result = read(&ch, &self.log, end, &mut f).await;
        let _ = ch.close(200, ShortString::from("read")).await;
        result
    }
}

async fn read(
    ch: &Channel,
    log: &str,
    end: u64,
    f: &mut impl FnMut(u64, &Delivery) -> bool,
) -> Result<(), BrokerError> {
    ch.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            ShortString::from(log),
            ShortString::from(""),
            BasicConsumeOptions::default(),
            table(&[(
                "x-stream-offset",
                AMQPValue::LongString(LongString::from("first")),
            )]),
        )
        .await?;
    loop {
        let next = tokio::time::timeout(READ_STALL, consumer.next())
            .await
            .map_err(|_| BrokerError::Refused("the dead-letter log stopped delivering"))?;
        let d = match next {
            Some(d) => d?,
            None => return Err(BrokerError::Refused("the broker cancelled the log reader")),
        };
        // Acks only return credit; a stream removes nothing.
        d.acker.ack(BasicAckOptions::default()).await?;
        let Some(offset) = stream_offset(&d) else {
            continue;
        };
        if offset >= end || !f(offset, &d) {
            return Ok(());
        }
    }
}

pub fn header<'a>(d: &'a Delivery, key: &str) -> Option<&'a AMQPValue> {
    d.properties.headers().as_ref()?.inner().get(key)
}

pub fn header_str(d: &Delivery, key: &str) -> Option<String> {
    match header(d, key)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

pub fn stream_offset(d: &Delivery) -> Option<u64> {
    header_u64(d, "x-stream-offset")
}

/// A header holding a non-negative integer, whichever integer type.
pub fn header_u64(d: &Delivery, key: &str) -> Option<u64> {
    match header(d, key)? {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        _ => None,
    }
}

/// A dead letter rather than one of this module's own markers.
fn is_entry(d: &Delivery) -> bool {
    header(d, REPLAYED_HEADER).is_none() && header(d, CURSOR_HEADER).is_none()
}

fn message_id(d: &Delivery) -> Option<String> {
    d.properties
        .message_id()
        .as_ref()
        .map(|s| s.as_str().to_owned())
        .filter(|s| !s.is_empty())
}

/// The first `x-death` entry's reason, as the broker wrote it.
fn death_reason(d: &Delivery) -> Option<String> {
    if let Some(r) = header_str(d, "x-first-death-reason") {
        return Some(r);
    }
    let AMQPValue::FieldArray(deaths) = header(d, "x-death")? else {
        return None;
    };
    match deaths.as_slice().first()? {
        AMQPValue::FieldTable(t) => match t.inner().get("reason")? {
            AMQPValue::LongString(s) => Some(s.to_string()),
            _ => None,
        },
        _ => None,
    }
}

fn describe(offset: u64, d: &Delivery) -> BrokerDeadLetter {
    let dead_letter =
        header(d, REASON_HEADER).and_then(|_| serde_json::from_slice::<DeadLetter>(&d.data).ok());
    let (raw_body, raw_body_base64) = match &dead_letter {
        Some(_) => (None, None),
        None => match std::str::from_utf8(&d.data) {
            Ok(s) => (Some(s.to_owned()), None),
            Err(_) => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(&d.data)),
            ),
        },
    };
    let reason = match &dead_letter {
        Some(dl) => dl.reason.as_str().to_owned(),
        None => header_str(d, REJECTED_HEADER)
            .or_else(|| death_reason(d))
            .unwrap_or_else(|| "unknown".to_owned()),
    };
    BrokerDeadLetter {
        id: offset,
        message_id: message_id(d),
        reason,
        x_death: header(d, "x-death").map(to_json),
        dead_letter,
        raw_body,
        raw_body_base64,
    }
}

/// What goes back to the work queue for one entry: the event as accepted
/// for a failed action (the consumer plans it again; what was applied
/// already is an idempotent repeat upstream), the producer's own bytes and
/// properties for a rejected message.
fn replay_message(offset: u64, d: &Delivery) -> (Vec<u8>, BasicProperties) {
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from(REPLAY_OF_HEADER),
        AMQPValue::LongLongInt(i64::try_from(offset).unwrap_or(i64::MAX)),
    );
    let dead_letter =
        header(d, REASON_HEADER).and_then(|_| serde_json::from_slice::<DeadLetter>(&d.data).ok());
    match dead_letter {
        Some(dl) => (
            serde_json::to_vec(&dl.event).unwrap_or_default(),
            BasicProperties::default()
                .with_message_id(ShortString::from(dl.event_id.as_str()))
                .with_content_type(ShortString::from("application/json"))
                .with_headers(headers),
        ),
        None => {
            let mut props = BasicProperties::default().with_headers(headers);
            if let Some(id) = message_id(d) {
                props = props.with_message_id(ShortString::from(id.as_str()));
            }
            if let Some(ct) = d.properties.content_type() {
                props = props.with_content_type(ct.clone());
            }
            (d.data.clone(), props)
        }
    }
}

/// A header value as JSON, for display.
fn to_json(v: &AMQPValue) -> serde_json::Value {
    use serde_json::Value;
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Float(n) => Value::from(*n),
        AMQPValue::Double(n) => Value::from(*n),
        AMQPValue::DecimalValue(d) => Value::String(format!("{d:?}")),
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => Value::String(s.to_string()),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(to_json).collect()),
        AMQPValue::Timestamp(t) => Value::from(*t),
        AMQPValue::FieldTable(t) => Value::Object(
            t.inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), to_json(v)))
                .collect(),
        ),
        AMQPValue::ByteArray(b) => {
            Value::String(base64::engine::general_purpose::STANDARD.encode(b.as_slice()))
        }
        AMQPValue::Void => Value::Null,
    }
}
