//! Broker mode's `Inbox`: webhooks are published to the work queue with
//! confirms; deliveries come from a consumer on that queue (prefetch from
//! `amqp.prefetch`); a delivery is acked once every action it produced has
//! settled and its dead letters are confirmed, or rejected without requeue
//! (to the dead-letter exchange) when it cannot be turned into actions.
//!
//! The consumer survives broker restarts: lapin recovers the connection and
//! its topology; if recovery gives up, this loop reconnects on its own.
//!
//! With several replicas on one queue only one consumes: the one holding
//! the dispatch lease (`lease`). It consumes only while it holds it, and
//! cancels its consumer the moment it loses it, so its unacked deliveries
//! go to the next leader. The leader also drops a message id it settled
//! recently (the last `SETTLED_IDS`, so a repeat published by another
//! replica or by a producer is not sent again); a failover starts that
//! window empty. Dead letters are listed and replayed from the
//! `<queue>.dead-log` stream (`dead_letters`). A message with the sweep
//! command header is handed on as `Content::Sweep`, and acked once the
//! sweep has finished (`sweep_log`).

use std::collections::{HashSet, VecDeque};
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
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use parking_lot::Mutex;
use tokio::sync::OnceCell;

use super::broker::{BrokerDeadLetters, BrokerError, BrokerLink};
use super::dead_letters::{DeadLog, REPLAY_OF_HEADER};
use super::sweep_log::SWEEP_COMMAND_HEADER;
use super::{Content, Delivery, Inbox, InboxFuture, Settle, Stored};
use crate::domain::{Active, DeadLetter, DeadLetterSink, Durable, HeldEvent, Source};
use crate::telemetry::Metrics;

/// Deliveries handed on ahead of the intake loop.
const HAND_AHEAD: usize = 64;
/// Message ids the leader remembers as settled, to drop repeats.
pub const SETTLED_IDS: usize = 100_000;

/// The most recent ids, bounded.
#[derive(Default)]
struct RecentIds {
    set: HashSet<String>,
    order: VecDeque<String>,
}

impl RecentIds {
    fn insert(&mut self, id: String) {
        if self.set.insert(id.clone()) {
            self.order.push_back(id);
            if self.order.len() > SETTLED_IDS {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
}

/// The broker as an inbox.
pub struct BrokerInbox {
    link: Arc<BrokerLink>,
    dead: Arc<BrokerDeadLetters>,
    /// The dead-letter log, declared on first use.
    dead_log: Arc<OnceCell<DeadLog>>,
    /// The ack tasks, so shutdown can wait for them before closing.
    acks: TaskTracker,
    /// Whether this replica holds the dispatch lease.
    active: Active,
    settled: Arc<Mutex<RecentIds>>,
    metrics: Metrics,
    /// The consumer's own connection while it consumes.
    consuming: Arc<Mutex<Option<Consuming>>>,
    /// A settled event's message is acked only once its record is
    /// published.
    records: Arc<RecordAcks>,
}

/// Acks that wait for their events' records to be published (the record
/// store's `Durable` count, once the store is open). One task releases
/// them in the order their events settled, with one wait on the count at a
/// time: a wait per event woke every waiting task at every publish, which
/// cost a broker drain a tenth of its rate.
struct RecordAcks {
    durable: Arc<OnceCell<Durable>>,
    tx: mpsc::UnboundedSender<(u64, Acker)>,
    closing: CancellationToken,
    dead: Arc<BrokerDeadLetters>,
    acks: TaskTracker,
}

impl RecordAcks {
    fn start(
        durable: Arc<OnceCell<Durable>>,
        dead: Arc<BrokerDeadLetters>,
        acks: TaskTracker,
    ) -> Arc<RecordAcks> {
        let (tx, mut rx) = mpsc::unbounded_channel::<(u64, Acker)>();
        let closing = CancellationToken::new();
        let (cell, stop, tracker, dead_letters) =
            (durable.clone(), closing.clone(), acks.clone(), dead.clone());
        acks.spawn(async move {
            loop {
                // Once closing, what is queued is still released.
                let item = tokio::select! {
                    biased;
                    i = rx.recv() => i,
                    _ = stop.cancelled() => rx.try_recv().ok(),
                };
                let Some((mark, acker)) = item else { return };
                if let Some(d) = cell.get() {
                    d.reached(mark).await;
                }
                dead_letters.flushed().await;
                tracker.spawn(ack(acker));
            }
        });
        Arc::new(RecordAcks {
            durable,
            tx,
            closing,
            dead,
            acks,
        })
    }

    /// Acks a settled event's message once the dead letters recorded so
    /// far are confirmed and, once the record store is open, every record
    /// handed to it so far (this event's included) is published.
    fn release(&self, acker: Acker) {
        if let Some(d) = self.durable.get() {
            // Refused only once shutdown gave up: then it is redelivered.
            let _ = self.tx.send((d.mark(), acker));
            return;
        }
        let dead = self.dead.clone();
        self.acks.spawn(async move {
            dead.flushed().await;
            ack(acker).await;
        });
    }
}

/// Acks a delivery. After a reconnect the old channel's acker is refused
/// (Ok(false)); the broker redelivers, and the repeat is idempotent
/// upstream.
async fn ack(acker: Acker) {
    if let Ok(false) = acker.ack(BasicAckOptions::default()).await {
        tracing::debug!("ack on a stale channel skipped; the message will be redelivered");
    }
}

impl BrokerInbox {
    pub fn new(
        link: Arc<BrokerLink>,
        active: Active,
        metrics: Metrics,
        records: Arc<OnceCell<Durable>>,
    ) -> Arc<BrokerInbox> {
        let dead = BrokerDeadLetters::start(link.clone());
        let acks = TaskTracker::new();
        Arc::new(BrokerInbox {
            records: RecordAcks::start(records, dead.clone(), acks.clone()),
            link,
            dead,
            dead_log: Arc::new(OnceCell::new()),
            acks,
            active,
            settled: Arc::default(),
            metrics,
            consuming: Arc::default(),
        })
    }

    async fn log(&self) -> Result<&DeadLog, BrokerError> {
        declared_log(&self.dead_log, &self.link).await
    }
}

async fn declared_log<'a>(
    cell: &'a OnceCell<DeadLog>,
    link: &Arc<BrokerLink>,
) -> Result<&'a DeadLog, BrokerError> {
    cell.get_or_try_init(|| DeadLog::declare(link.clone()))
        .await
}

/// A delivery's settle handle. It keeps the message's body (bounded by
/// `amqp.prefetch`) for the dead letters of its actions: the pipeline holds
/// no bodies.
struct Receipt {
    id: String,
    body: Vec<u8>,
    acker: Acker,
    dead: Arc<BrokerDeadLetters>,
    dead_log: Arc<OnceCell<DeadLog>>,
    link: Arc<BrokerLink>,
    acks: TaskTracker,
    settled: Arc<Mutex<RecentIds>>,
    records: Arc<RecordAcks>,
}

impl Settle for Receipt {
    fn event(&self) -> Option<HeldEvent> {
        Some(HeldEvent {
            id: self.id.clone(),
            source: Source::Amqp,
            body: self.body.clone(),
        })
    }

    fn settled(self: Box<Self>) {
        let Receipt {
            id,
            acker,
            settled,
            records,
            ..
        } = *self;
        settled.lock().insert(id);
        // The pipeline handed this event's record over just now.
        records.release(acker);
    }

    fn dead_lettered(self: Box<Self>, dl: DeadLetter, body: Vec<u8>) {
        tracing::warn!(message_id = %dl.event_id, reason = %dl.reason, detail = %dl.detail, "message rejected to the dead-letter queue");
        let Receipt {
            id,
            acker,
            dead_log,
            link,
            acks,
            ..
        } = *self;
        acks.spawn(async move {
            // Listed from the log (the broker's own dead-lettering does not
            // reach it), then rejected to `<queue>.dead` as before. If the
            // log cannot be written, the message is left unacked and comes
            // back: nothing is lost.
            let logged = match declared_log(&dead_log, &link).await {
                Ok(log) => log
                    .record_rejected_raw(Some(&id), &body, dl.reason.as_str())
                    .await,
                Err(e) => Err(e),
            };
            match logged {
                Ok(()) => {
                    let _ = acker.reject(BasicRejectOptions { requeue: false }).await;
                }
                Err(e) => tracing::warn!(error = %e, "dead letter not logged; the message will be redelivered"),
            }
        });
    }

    fn action_dead_lettered(&self, mut dl: DeadLetter) {
        dl.event_id = self.id.clone();
        dl.fill_event(&self.body);
        // Enqueued now, so the ack in `settled` waits for its confirm.
        self.dead.record(dl);
    }
}

impl DeadLetterSink for BrokerInbox {
    fn record(&self, dl: DeadLetter) {
        self.dead.record(dl);
    }
}

impl Inbox for BrokerInbox {
    fn store<'a>(&'a self, id: &'a str, body: Vec<u8>) -> InboxFuture<'a, Stored> {
        async move {
            Ok(if self.link.publish_event(id, &body).await? {
                Stored::New
            } else {
                Stored::Duplicate
            })
        }
        .boxed()
    }

    fn deliveries(&self, stop: CancellationToken) -> BoxStream<'static, Delivery> {
        let (tx, rx) = mpsc::channel(HAND_AHEAD);
        let consumer = Consumer {
            link: self.link.clone(),
            dead: self.dead.clone(),
            dead_log: self.dead_log.clone(),
            acks: self.acks.clone(),
            active: self.active.clone(),
            settled: self.settled.clone(),
            metrics: self.metrics.clone(),
            tx,
            consuming: self.consuming.clone(),
            records: self.records.clone(),
        };
        tokio::spawn(consumer.run(stop));
        futures_util::stream::unfold(rx, |mut rx| async move {
            let d = rx.recv().await?;
            Some((d, rx))
        })
        .boxed()
    }

    fn dead_letters(&self, limit: usize) -> InboxFuture<'_, Vec<serde_json::Value>> {
        async move {
            let list = self.log().await?.list(limit).await?;
            Ok(list
                .into_iter()
                .map(|d| serde_json::to_value(d).unwrap_or_default())
                .collect())
        }
        .boxed()
    }

    fn replay(&self, ids: Option<Vec<u64>>) -> InboxFuture<'_, usize> {
        async move { Ok(self.log().await?.replay(ids).await?) }.boxed()
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
            self.records.closing.cancel();
            self.acks.close();
            let _ = tokio::time::timeout(Duration::from_secs(5), self.acks.wait()).await;
            let consuming = self.consuming.lock().take();
            if let Some(c) = consuming {
                close_quickly(&c.conn, "shutdown").await;
            }
            self.link.close().await;
        }
        .boxed()
    }
}

/// The consumer's connection and channel while it consumes, kept after it
/// stops until shutdown has acked what settled (acks wait for records).
struct Consuming {
    conn: Arc<lapin::Connection>,
    channel: Option<lapin::Channel>,
}

/// The consuming task: one connection at a time, reconnecting with backoff.
struct Consumer {
    link: Arc<BrokerLink>,
    dead: Arc<BrokerDeadLetters>,
    dead_log: Arc<OnceCell<DeadLog>>,
    acks: TaskTracker,
    active: Active,
    settled: Arc<Mutex<RecentIds>>,
    metrics: Metrics,
    tx: mpsc::Sender<Delivery>,
    consuming: Arc<Mutex<Option<Consuming>>>,
    records: Arc<RecordAcks>,
}

/// Closes a connection, not waiting long for a broker that is gone.
async fn close_quickly(conn: &lapin::Connection, why: &str) {
    let close = conn.close(200, ShortString::from(why));
    let _ = tokio::time::timeout(Duration::from_secs(2), close).await;
}

/// Why one connection's worth of consuming ended.
enum Ended {
    /// Stopped, or the intake loop is gone.
    Stopped,
    /// The dispatch lease went to another replica.
    LeaseLost,
}

impl Consumer {
    async fn run(self, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(200);
        loop {
            // Every replica connects (and declares the topology), so a
            // standby publishes webhooks and is ready; only the replica
            // holding the dispatch lease consumes.
            let connected = tokio::select! {
                c = self.link.connection() => c.map(|_| ()),
                _ = stop.cancelled() => return,
            };
            if let Err(e) = connected {
                tracing::warn!(error = %e, "broker unreachable; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            if !self.active.held(&stop).await {
                return;
            }
            match self.consume_once(&stop).await {
                Ok(Ended::Stopped) => return,
                Ok(Ended::LeaseLost) => {
                    tracing::warn!("dispatch lease lost; consuming stops, unacked deliveries go to the next leader");
                    backoff = Duration::from_millis(200);
                }
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
    /// intake loop is gone) or the lease is lost, `Err` when the
    /// connection is gone for good.
    async fn consume_once(&self, stop: &CancellationToken) -> Result<Ended, lapin::Error> {
        let conn = tokio::select! {
            c = self.link.consumer_connection() => c.map_err(|e| match e {
                BrokerError::Amqp(e) => e,
                other => lapin::Error::from(std::io::Error::other(other.to_string())),
            })?,
            _ = stop.cancelled() => return Ok(Ended::Stopped),
        };
        let conn = Arc::new(conn);
        // Kept until shutdown has acked what settled (see `close`), or
        // dropped with the lease.
        let old = self.consuming.lock().replace(Consuming {
            conn: conn.clone(),
            channel: None,
        });
        if let Some(old) = old {
            close_quickly(&old.conn, "replaced").await;
        }
        let channel = conn.create_channel().await?;
        // Held with the connection: the channel must outlive this function
        // (stopped, it returns) until shutdown has acked what settled, and
        // a dropped channel closes.
        if let Some(c) = self.consuming.lock().as_mut() {
            c.channel = Some(channel.clone());
        }
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
                    return Ok(Ended::Stopped);
                }
                _ = self.active.lost() => {
                    // Closing the consumer's connection returns its unacked
                    // deliveries to the queue, for the replica that leads
                    // now; nothing recovers it.
                    self.consuming.lock().take();
                    close_quickly(&conn, "dispatch lease lost").await;
                    return Ok(Ended::LeaseLost);
                }
            };
            match next {
                Some(Ok(d)) => {
                    let Some(delivery) = self.delivery(d) else {
                        continue;
                    };
                    if self.tx.send(delivery).await.is_err() {
                        return Ok(Ended::Stopped);
                    }
                }
                Some(Err(e)) => {
                    self.consuming.lock().take();
                    close_quickly(&conn, "consumer error").await;
                    return Err(e);
                }
                None => {
                    return Err(lapin::Error::from(std::io::Error::other(
                        "the broker cancelled the consumer",
                    )))
                }
            }
        }
    }

    /// The delivery for the intake loop; `None` for a repeat of a message
    /// settled recently, which is acked at once.
    fn delivery(&self, d: AmqpDelivery) -> Option<Delivery> {
        let id = match d.properties.message_id() {
            Some(id) if !id.as_str().is_empty() => id.as_str().to_owned(),
            // No id from the producer: the body's hash, so a redelivery of
            // the same message keeps the same id.
            _ => format!("sha256:{:x}", Sha256::digest(&d.data)),
        };
        let replayed = d
            .properties
            .headers()
            .as_ref()
            .is_some_and(|h| h.inner().contains_key(REPLAY_OF_HEADER));
        if !replayed && self.settled.lock().set.contains(&id) {
            self.metrics.event_duplicate(Source::Amqp);
            tracing::debug!(message_id = %id, "repeat of a settled message dropped");
            // Its first copy's record may not be published yet (that ack
            // waited, and a reconnect returned the message): this ack
            // waits as long.
            self.records.release(d.acker);
            return None;
        }
        let sweep = d
            .properties
            .headers()
            .as_ref()
            .is_some_and(|h| h.inner().contains_key(SWEEP_COMMAND_HEADER));
        Some(Delivery {
            id: id.clone(),
            source: Source::Amqp,
            // A sweep command is not an event.
            count_received: !sweep,
            accepted_at: Instant::now(),
            content: if sweep {
                Content::Sweep(d.data.clone())
            } else {
                Content::Event(d.data.clone())
            },
            receipt: Box::new(Receipt {
                id,
                body: d.data,
                acker: d.acker,
                dead: self.dead.clone(),
                dead_log: self.dead_log.clone(),
                link: self.link.clone(),
                acks: self.acks.clone(),
                settled: self.settled.clone(),
                records: self.records.clone(),
            }),
        })
    }
}
