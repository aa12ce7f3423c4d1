//! Broker mode's `Inbox`: webhooks are published to the work queue with
//! confirms; deliveries come from a consumer on that queue (prefetch from
//! `amqp.prefetch`); a delivery is acked once every action it produced has
//! settled and its dead letters are confirmed, or rejected without requeue
//! (to the dead-letter exchange) when it cannot be turned into actions.
//!
//! The consumer survives broker restarts: lapin recovers the connection and
//! its topology; if recovery gives up, this loop reconnects on its own.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::Acker;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::broker::{BrokerDeadLetters, BrokerError, BrokerLink};
use super::{Content, Delivery, Inbox, InboxError, InboxFuture, Settle, Stored};
use crate::domain::{DeadLetter, DeadLetterSink, Source};
use crate::telemetry::Metrics;

/// Deliveries handed on ahead of the intake loop.
const HAND_AHEAD: usize = 64;

/// The broker as an inbox.
pub struct BrokerInbox {
    link: Arc<BrokerLink>,
    dead: Arc<BrokerDeadLetters>,
    /// The ack tasks, so shutdown can wait for them before closing.
    acks: TaskTracker,
}

impl BrokerInbox {
    pub fn new(link: Arc<BrokerLink>) -> Arc<BrokerInbox> {
        let dead = BrokerDeadLetters::start(link.clone());
        Arc::new(BrokerInbox {
            link,
            dead,
            acks: TaskTracker::new(),
        })
    }
}

/// A delivery's settle handle.
struct Receipt {
    acker: Acker,
    dead: Arc<BrokerDeadLetters>,
    acks: TaskTracker,
}

impl Settle for Receipt {
    fn settled(self: Box<Self>) {
        let Receipt { acker, dead, acks } = *self;
        acks.spawn(async move {
            // Dead letters recorded for this event are confirmed first.
            dead.flushed().await;
            // After a reconnect the old channel's acker is refused
            // (Ok(false)); the broker redelivers, and the repeat is
            // idempotent upstream.
            if let Ok(false) = acker.ack(BasicAckOptions::default()).await {
                tracing::debug!("ack on a stale channel skipped; the message will be redelivered");
            }
        });
    }

    fn dead_lettered(self: Box<Self>, dl: DeadLetter) {
        tracing::warn!(message_id = %dl.event_id, reason = %dl.reason, detail = %dl.detail, "message rejected to the dead-letter queue");
        let Receipt { acker, acks, .. } = *self;
        acks.spawn(async move {
            let _ = acker.reject(BasicRejectOptions { requeue: false }).await;
        });
    }
}

impl DeadLetterSink for BrokerInbox {
    fn record(&self, dl: DeadLetter) {
        self.dead.record(dl);
    }
}

impl Inbox for BrokerInbox {
    fn store<'a>(&'a self, id: &'a str, body: Box<RawValue>) -> InboxFuture<'a, Stored> {
        async move {
            Ok(
                if self.link.publish_event(id, body.get().as_bytes()).await? {
                    Stored::New
                } else {
                    Stored::Duplicate
                },
            )
        }
        .boxed()
    }

    fn deliveries(&self, stop: CancellationToken) -> BoxStream<'static, Delivery> {
        let (tx, rx) = mpsc::channel(HAND_AHEAD);
        let consumer = Consumer {
            link: self.link.clone(),
            dead: self.dead.clone(),
            acks: self.acks.clone(),
            tx,
        };
        tokio::spawn(consumer.run(stop));
        futures_util::stream::unfold(rx, |mut rx| async move {
            let d = rx.recv().await?;
            Some((d, rx))
        })
        .boxed()
    }

    fn dead_letters(&self, _limit: usize) -> InboxFuture<'_, Vec<DeadLetter>> {
        async { Err(InboxError::Unsupported(BROKER_DEAD_LETTERS)) }.boxed()
    }

    fn replay(&self, _ids: Option<Vec<u64>>) -> InboxFuture<'_, usize> {
        async { Err(InboxError::Unsupported(BROKER_DEAD_LETTERS)) }.boxed()
    }

    fn not_ready(&self) -> Option<String> {
        (!self.link.is_connected()).then(|| "broker unreachable".to_owned())
    }

    fn observe(&self, metrics: &Metrics) {
        metrics.set_broker_connected(self.link.is_connected());
    }

    fn close_intake(&self) {}

    fn close(&self) -> BoxFuture<'_, ()> {
        async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), self.dead.flushed()).await;
            self.acks.close();
            let _ = tokio::time::timeout(Duration::from_secs(5), self.acks.wait()).await;
            self.link.close().await;
        }
        .boxed()
    }
}

const BROKER_DEAD_LETTERS: &str = "in broker mode dead letters are messages in the queue <amqp.queue>.dead; read or move them with RabbitMQ's tools";

/// The consuming task: one connection at a time, reconnecting with backoff.
struct Consumer {
    link: Arc<BrokerLink>,
    dead: Arc<BrokerDeadLetters>,
    acks: TaskTracker,
    tx: mpsc::Sender<Delivery>,
}

impl Consumer {
    async fn run(self, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.consume_once(&stop).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "broker consumer lost; reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// One connection's worth of consuming: `Ok` when stopped (or the
    /// intake loop is gone), `Err` when the connection is gone for good.
    async fn consume_once(&self, stop: &CancellationToken) -> Result<(), lapin::Error> {
        let conn = tokio::select! {
            c = self.link.connection() => c.map_err(|e| match e {
                BrokerError::Amqp(e) => e,
                other => lapin::Error::from(std::io::Error::other(other.to_string())),
            })?,
            _ = stop.cancelled() => return Ok(()),
        };
        let channel = conn.create_channel().await?;
        channel
            .basic_qos(self.link.prefetch, BasicQosOptions::default())
            .await?;
        let tag = format!("chat-janitor-{}", std::process::id());
        let mut consumer = channel
            .basic_consume(
                ShortString::from(self.link.queue.as_str()),
                ShortString::from(tag.as_str()),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tracing::info!(queue = %self.link.queue, prefetch = self.link.prefetch, "consuming");
        loop {
            let next = tokio::select! {
                n = consumer.next() => n,
                _ = stop.cancelled() => {
                    let _ = channel
                        .basic_cancel(ShortString::from(tag.as_str()), BasicCancelOptions::default())
                        .await;
                    return Ok(());
                }
            };
            match next {
                Some(Ok(d)) => {
                    if self.tx.send(self.delivery(d)).await.is_err() {
                        return Ok(());
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "broker channel error; waiting for recovery");
                    channel.wait_for_recovery(e).await?;
                    tracing::info!("broker connection recovered; consuming again");
                }
                None => {
                    return Err(lapin::Error::from(std::io::Error::other(
                        "the broker cancelled the consumer",
                    )))
                }
            }
        }
    }

    fn delivery(&self, d: AmqpDelivery) -> Delivery {
        let id = match d.properties.message_id() {
            Some(id) if !id.as_str().is_empty() => id.as_str().to_owned(),
            // No id from the producer: the body's hash, so a redelivery of
            // the same message keeps the same id.
            _ => format!("sha256:{:x}", Sha256::digest(&d.data)),
        };
        Delivery {
            id,
            source: Source::Amqp,
            count_received: true,
            accepted_at: Instant::now(),
            content: Content::Event(d.data),
            receipt: Box::new(Receipt {
                acker: d.acker,
                dead: self.dead.clone(),
                acks: self.acks.clone(),
            }),
        }
    }
}
