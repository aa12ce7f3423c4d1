//! Broker mode's feed: the quorum queue `<queue>.callbacks`.
//!
//! The replica that settles an event publishes its callback there (with
//! publisher confirms, beside its record on the stream `<queue>.records`),
//! and every replica consumes it, a window of [`WINDOW`] deliveries at a
//! time. A delivery is acked only once its callback was delivered, or given
//! up and its dead letter confirmed; a replica that dies or loses its
//! connection leaves its deliveries unacked, and RabbitMQ hands them to
//! another replica. So the callbacks outlive any one replica and need no
//! cursor and no leader: the queue is the durable work list, as the work
//! queue is for events.
//!
//! RabbitMQ closes a channel that holds a delivery unacked for longer than
//! its `consumer_timeout` (30 minutes by default). A callback still waiting
//! for a retry after `hold` (10 minutes) is therefore published again, with
//! its attempts so far and when its next attempt is due in headers, and
//! the delivery acked once that copy is confirmed.
//!
//! Messages carry the callback as sent (`message_id` = its `webhook-id`,
//! the body), and headers for the consumer: the event's id and type and
//! when it settled (`max_age` counts from there).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::Acker;
use lapin::{BasicProperties, Connection};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::window::{sleep_until, Callback, Results, State, Tries, Window};
use super::WINDOW;
use crate::domain::clock::unix_ms;
use crate::inbox::broker::{
    declare_quorum_queue, table, BrokerDeadLetters, BrokerError, BrokerLink,
};
use crate::inbox::dead_letters::{header_str, header_u64};

/// How long a delivery is held waiting for a retry before it is published
/// again (well under RabbitMQ's default `consumer_timeout` of 30 minutes).
pub const HOLD: Duration = Duration::from_secs(600);
const EVENT_ID_HEADER: &str = "x-chat-janitor-event-id";
const EVENT_TYPE_HEADER: &str = "x-chat-janitor-event-type";
const SETTLED_HEADER: &str = "x-chat-janitor-settled-ms";
const ATTEMPTS_HEADER: &str = "x-chat-janitor-attempts";
const NEXT_HEADER: &str = "x-chat-janitor-next-ms";
const LAST_HEADER: &str = "x-chat-janitor-last";
/// Quorum queues of RabbitMQ 4 drop a message returned 20 times unless
/// told otherwise; a callback is never dropped for being returned (a
/// replica restarting while the receiver is down returns its window).
const DELIVERY_LIMIT: i64 = 1_000_000_000;
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The callback queue of a work queue.
pub fn callback_queue_name(queue: &str) -> String {
    format!("{queue}.callbacks")
}

/// Declares the callback queue (durable, quorum).
pub async fn declare_callback_queue(conn: &Connection, name: &str) -> Result<(), BrokerError> {
    let ch = declare_quorum_queue(
        conn,
        name,
        &[("x-delivery-limit", AMQPValue::LongLongInt(DELIVERY_LIMIT))],
        "the callback queue",
    )
    .await?;
    let _ = ch.close(200, ShortString::from("done")).await;
    Ok(())
}

/// The properties a callback is published to the queue with: `message_id`
/// its `webhook-id`, the headers the consumer reads (and, when it is
/// handed on, its attempts so far and its next attempt's time).
pub fn properties(c: &Callback, tries: &Tries, next_ms: Option<u64>) -> BasicProperties {
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    let int = |n: u64| AMQPValue::LongLongInt(i64::try_from(n).unwrap_or(i64::MAX));
    let mut headers = vec![
        (EVENT_ID_HEADER, text(&c.event_id)),
        (EVENT_TYPE_HEADER, text(&c.event_type)),
        (SETTLED_HEADER, int(c.settled_ms)),
    ];
    if tries.attempts > 0 {
        headers.push((ATTEMPTS_HEADER, int(u64::from(tries.attempts))));
        headers.push((LAST_HEADER, text(&tries.last)));
    }
    if let Some(at) = next_ms {
        headers.push((NEXT_HEADER, int(at)));
    }
    BasicProperties::default()
        .with_message_id(ShortString::from(c.msg_id.as_str()))
        .with_content_type(ShortString::from("application/json"))
        .with_headers(table(&headers))
}

/// A delivery's callback and what became of it so far; `None` if it is
/// not one this service published.
fn read(d: &Delivery) -> Option<(Callback, Tries, Option<u64>)> {
    let callback = Callback {
        msg_id: d.properties.message_id().as_ref()?.as_str().to_owned(),
        event_id: header_str(d, EVENT_ID_HEADER)?,
        event_type: header_str(d, EVENT_TYPE_HEADER)?,
        body: d.data.clone(),
        settled_ms: header_u64(d, SETTLED_HEADER)?,
    };
    let tries = Tries {
        attempts: header_u64(d, ATTEMPTS_HEADER)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0),
        last: header_str(d, LAST_HEADER).unwrap_or_default(),
    };
    Some((callback, tries, header_u64(d, NEXT_HEADER)))
}

/// A delivery in hand.
pub struct Held {
    acker: Acker,
    since: Instant,
}

pub struct QueueSender {
    pub link: Arc<BrokerLink>,
    pub queue: String,
    pub dead: Arc<BrokerDeadLetters>,
    pub window: Window<Held>,
    pub hold: Duration,
    pub handed_on: Arc<AtomicU64>,
}

impl QueueSender {
    pub async fn run(mut self, mut results: Results, stop: CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let r = tokio::select! {
                r = self.consume(&mut results, &stop, &mut backoff) => r,
                _ = stop.cancelled() => Ok(()),
            };
            // What was in hand returns to the queue with the connection.
            self.window.clear();
            match r {
                Ok(()) if stop.is_cancelled() => return,
                Ok(()) => {
                    tracing::warn!(queue = %self.queue, "the callback queue's consumer was cancelled; consuming again")
                }
                Err(e) => {
                    tracing::warn!(error = %e, queue = %self.queue, "callback queue consumer lost; reconnecting")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Consumes until the connection is lost or `stop`.
    async fn consume(
        &mut self,
        results: &mut Results,
        stop: &CancellationToken,
        backoff: &mut Duration,
    ) -> Result<(), BrokerError> {
        let conn = self.link.dedicated_connection("callbacks").await?;
        declare_callback_queue(&conn, &self.queue).await?;
        let ch = conn.create_channel().await?;
        ch.basic_qos(WINDOW as u16, BasicQosOptions::default())
            .await?;
        let mut consumer = ch
            .basic_consume(
                ShortString::from(self.queue.as_str()),
                ShortString::from(""),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        *backoff = BACKOFF_MIN;
        let ended = loop {
            self.window.pump();
            self.finish();
            let hold = self.hold;
            let wake = self.window.wake(|s| Some(s.at.since + hold));
            tokio::select! {
                biased;
                _ = stop.cancelled() => break Ok(()),
                Some((seq, outcome)) = results.recv() => self.window.settle(seq, outcome),
                d = consumer.next() => match d {
                    None => break Ok(()),
                    Some(Err(e)) => break Err(e.into()),
                    Some(Ok(d)) => self.take_in(d).await,
                },
                _ = sleep_until(wake) => {}
            }
        };
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            conn.close(200, ShortString::from("shutdown")),
        )
        .await;
        ended
    }

    async fn take_in(&mut self, d: Delivery) {
        let Some((callback, tries, next_ms)) = read(&d) else {
            tracing::warn!(queue = %self.queue, "a message on the callback queue is not a callback this service published; dropped");
            let _ = d
                .acker
                .nack(BasicNackOptions {
                    requeue: false,
                    ..BasicNackOptions::default()
                })
                .await;
            return;
        };
        let now = Instant::now();
        let next_at = next_ms.map_or(now, |at| {
            now + Duration::from_millis(at.saturating_sub(unix_ms()))
        });
        let held = Held {
            acker: d.acker,
            since: now,
        };
        self.window.push(held, callback, tries, next_at);
    }

    /// Acks what is finished (a given-up callback once its dead letter is
    /// confirmed), and hands on what waited too long for a retry.
    fn finish(&mut self) {
        let hold = self.hold;
        let taken = self.window.take(|s| {
            s.state.is_done() || (s.state == State::Waiting && s.at.since.elapsed() >= hold)
        });
        for s in taken {
            let acker = s.at.acker;
            match s.state {
                State::Delivered => {
                    tokio::spawn(async move {
                        let _ = acker.ack(BasicAckOptions::default()).await;
                    });
                }
                State::Expired => {
                    let dead = self.dead.clone();
                    tokio::spawn(async move {
                        dead.flushed().await;
                        let _ = acker.ack(BasicAckOptions::default()).await;
                    });
                }
                State::Waiting | State::Sending => {
                    let wait = s.next_at.saturating_duration_since(Instant::now());
                    let next_ms = unix_ms() + u64::try_from(wait.as_millis()).unwrap_or(0);
                    let props = properties(&s.callback, &s.tries, Some(next_ms));
                    let (link, queue) = (self.link.clone(), self.queue.clone());
                    let handed_on = self.handed_on.clone();
                    tokio::spawn(async move {
                        match link.publish("", &queue, &s.callback.body, props).await {
                            Ok(()) => {
                                // If the ack fails (the channel is gone),
                                // the original comes back too: a repeat,
                                // under the same webhook-id.
                                if let Ok(true) = acker.ack(BasicAckOptions::default()).await {
                                    handed_on.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot hand on a long-held callback; it returns to the queue");
                                let _ = acker
                                    .nack(BasicNackOptions {
                                        requeue: true,
                                        ..BasicNackOptions::default()
                                    })
                                    .await;
                            }
                        }
                    });
                }
            }
        }
    }
}
