//! Broker mode: RabbitMQ holds accepted events, so replicas stay stateless.
//! One connection (lapin, automatic recovery on) carries a publishing
//! channel in confirm mode (webhooks are published and confirmed before
//! their 202; action dead letters are published before their delivery is
//! acked) and the consumer's channel.
//!
//! Topology, declared idempotently: a durable quorum queue with an explicit
//! delivery limit and a dead-letter exchange `<queue>.dlx` (fanout) bound to
//! `<queue>.dead`. A queue that already exists with other arguments is used
//! as it is, with a warning.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::Confirmation;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use parking_lot::Mutex;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{mpsc, watch};

use crate::domain::{DeadLetter, DeadLetterSink};

/// Deliveries of one message before the quorum queue dead-letters it.
pub const DELIVERY_LIMIT: i64 = 20;
/// Longest wait for a publisher confirm before answering 503.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a publish waits for a connection before answering 503.
const CONNECT_WAIT: Duration = Duration::from_secs(2);
/// webhook-ids this replica remembers for duplicate answers.
const RECENT_IDS: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("broker did not confirm the publish in time")]
    ConfirmTimeout,
    #[error("broker unreachable")]
    Unavailable,
    #[error("amqp.url: {0}")]
    Uri(String),
    #[error("broker refused the publish ({0})")]
    Refused(&'static str),
}

/// The dead-letter exchange of a queue.
pub fn dlx_name(queue: &str) -> String {
    format!("{queue}.dlx")
}

/// The queue dead letters (rejected messages, failed actions) land in.
pub fn dead_queue_name(queue: &str) -> String {
    format!("{queue}.dead")
}

/// The shared connection and publishing channel, re-established on demand.
pub struct BrokerLink {
    uri: SecretString,
    heartbeat_seconds: u16,
    pub queue: String,
    pub prefetch: u16,
    state: tokio::sync::Mutex<Option<Linked>>,
    recent: Mutex<(HashSet<String>, VecDeque<String>)>,
}

#[derive(Clone)]
struct Linked {
    conn: Arc<Connection>,
    publish: Channel,
}

impl std::fmt::Debug for BrokerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerLink")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

/// A field table (queue arguments, headers) from literal entries.
pub fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(ShortString::from(*k), v.clone());
    }
    t
}

/// Declares the durable queue `name` with `args`. If RabbitMQ refuses
/// (406: it exists with other arguments, which it never changes; a policy
/// can), checks that it exists and returns the refusal beside the channel,
/// for the caller to say what that means for it.
async fn declare_or_existing(
    conn: &Connection,
    name: &str,
    args: FieldTable,
) -> Result<(Channel, Option<lapin::Error>), BrokerError> {
    let ch = conn.create_channel().await?;
    let declared = ch
        .queue_declare(
            ShortString::from(name),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await;
    let Err(refused) = declared else {
        return Ok((ch, None));
    };
    // The refusal closed that channel.
    let ch = conn.create_channel().await?;
    ch.queue_declare(
        ShortString::from(name),
        QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await?;
    Ok((ch, Some(refused)))
}

/// Declares the durable stream `name` with `args` (besides its type) and
/// returns the channel it was declared on. A stream declared before with
/// other arguments is used as it is, which is logged as `what` (and `hint`,
/// what may have changed) rather than stopping the service.
pub async fn declare_stream(
    conn: &Connection,
    name: &str,
    args: &[(&str, AMQPValue)],
    what: &str,
    hint: &str,
) -> Result<Channel, BrokerError> {
    declare_typed(conn, name, "stream", args, what, hint).await
}

/// Declares the durable quorum queue `name` with `args` (besides its type)
/// and returns the channel it was declared on; one declared before with
/// other arguments is used as it is, which is logged as `what`.
pub async fn declare_quorum_queue(
    conn: &Connection,
    name: &str,
    args: &[(&str, AMQPValue)],
    what: &str,
) -> Result<Channel, BrokerError> {
    declare_typed(conn, name, "quorum", args, what, "").await
}

async fn declare_typed(
    conn: &Connection,
    name: &str,
    kind: &str,
    args: &[(&str, AMQPValue)],
    what: &str,
    hint: &str,
) -> Result<Channel, BrokerError> {
    let mut all = vec![(
        "x-queue-type",
        AMQPValue::LongString(LongString::from(kind)),
    )];
    all.extend(args.iter().cloned());
    let (ch, refused) = declare_or_existing(conn, name, table(&all)).await?;
    if let Some(e) = refused {
        tracing::warn!(error = %e, queue = name, "{what} declared before with other arguments{hint}; using it as it is");
    }
    Ok(ch)
}

impl BrokerLink {
    pub fn new(
        uri: SecretString,
        queue: String,
        prefetch: u16,
        heartbeat_seconds: u16,
    ) -> Arc<BrokerLink> {
        Arc::new(BrokerLink {
            uri,
            heartbeat_seconds,
            queue,
            prefetch,
            state: tokio::sync::Mutex::new(None),
            recent: Mutex::new((HashSet::new(), VecDeque::new())),
        })
    }

    /// The live connection, connecting (and declaring the topology) if
    /// there is none or the last one is gone for good.
    pub async fn connection(&self) -> Result<Arc<Connection>, BrokerError> {
        Ok(self.linked().await?.conn)
    }

    async fn linked(&self) -> Result<Linked, BrokerError> {
        let mut state = self.state.lock().await;
        if let Some(l) = state.as_ref() {
            let s = l.conn.status();
            if s.connected() || s.reconnecting() || s.connecting() {
                return Ok(l.clone());
            }
        }
        let props = ConnectionProperties::default()
            .with_connection_name(LongString::from(format!(
                "chat-janitor {}",
                std::process::id()
            )))
            .enable_auto_recover();
        let conn = Connection::connect_uri(self.uri()?, props).await?;
        declare_topology(&conn, &self.queue).await?;
        let publish = conn.create_channel().await?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        tracing::info!(queue = %self.queue, "connected to the broker");
        let linked = Linked {
            conn: Arc::new(conn),
            publish,
        };
        *state = Some(linked.clone());
        Ok(linked)
    }

    fn uri(&self) -> Result<lapin::uri::AMQPUri, BrokerError> {
        let mut uri: lapin::uri::AMQPUri = self
            .uri
            .expose_secret()
            .parse()
            .map_err(|e: String| BrokerError::Uri(e))?;
        uri.query.heartbeat = Some(self.heartbeat_seconds);
        Ok(uri)
    }

    /// A connection of its own for consuming the work queue, without
    /// automatic recovery: when it is lost its consumer is gone for good
    /// (the broker requeues what it held), never brought back behind our
    /// back on a recovered connection where nothing reads it.
    pub async fn consumer_connection(&self) -> Result<Connection, BrokerError> {
        self.dedicated_connection("consumer").await
    }

    /// A connection of its own, without automatic recovery, for a reader
    /// that reconnects by itself (`purpose` names it in the management UI).
    pub async fn dedicated_connection(&self, purpose: &str) -> Result<Connection, BrokerError> {
        // The shared connection declares the topology first.
        self.linked().await?;
        let props = ConnectionProperties::default().with_connection_name(LongString::from(
            format!("chat-janitor {purpose} {}", std::process::id()),
        ));
        Ok(Connection::connect_uri(self.uri()?, props).await?)
    }

    /// Whether the broker connection is up right now.
    pub fn is_connected(&self) -> bool {
        match self.state.try_lock() {
            Ok(s) => s.as_ref().is_some_and(|l| l.conn.status().connected()),
            // Someone is (re)connecting right now.
            Err(_) => false,
        }
    }

    /// Publishes one persistent message to `exchange`/`routing_key` and
    /// waits for the broker's confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), BrokerError> {
        // While the broker is away a connect can take long (lapin retries
        // with backoff); a webhook sender is better served by a quick 503.
        let linked = tokio::time::timeout(CONNECT_WAIT, self.linked())
            .await
            .map_err(|_| BrokerError::Unavailable)??;
        let confirm = linked
            .publish
            .basic_publish(
                ShortString::from(exchange),
                ShortString::from(routing_key),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                props.with_delivery_mode(2),
            )
            .await?;
        match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
            Err(_) => Err(BrokerError::ConfirmTimeout),
            Ok(Err(e)) => Err(e.into()),
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(_)))) => Err(BrokerError::Refused("unroutable")),
            Ok(Ok(Confirmation::Nack(_))) => Err(BrokerError::Refused("nack")),
            Ok(Ok(Confirmation::NotRequested)) => Err(BrokerError::Refused("no confirm")),
        }
    }

    /// Publishes an accepted webhook to the queue. `false`: this replica saw
    /// the id already (best effort: the broker has no dedupe of its own).
    pub async fn publish_event(&self, id: &str, body: &[u8]) -> Result<bool, BrokerError> {
        if self.recent.lock().0.contains(id) {
            return Ok(false);
        }
        let props = BasicProperties::default()
            .with_message_id(ShortString::from(id))
            .with_content_type(ShortString::from("application/json"));
        self.publish("", &self.queue, body, props).await?;
        let mut recent = self.recent.lock();
        if recent.0.insert(id.to_owned()) {
            recent.1.push_back(id.to_owned());
            if recent.1.len() > RECENT_IDS {
                if let Some(old) = recent.1.pop_front() {
                    recent.0.remove(&old);
                }
            }
        }
        Ok(true)
    }

    /// Closes the connection (unacked deliveries return to the queue).
    pub async fn close(&self) {
        // Not waited for long: a broker that is gone cannot answer.
        let taken = tokio::time::timeout(Duration::from_secs(2), self.state.lock()).await;
        if let Some(l) = taken.ok().and_then(|mut s| s.take()) {
            let close = l.conn.close(200, ShortString::from("shutdown"));
            let _ = tokio::time::timeout(Duration::from_secs(2), close).await;
        }
    }
}

/// Declares the dead-letter exchange and queue, then the work queue as a
/// quorum queue. If the work queue exists with other arguments, the broker
/// refuses (and closes the channel); we then check it exists and use it.
async fn declare_topology(conn: &Connection, queue: &str) -> Result<(), BrokerError> {
    let ch = conn.create_channel().await?;
    let dlx = dlx_name(queue);
    let dead = dead_queue_name(queue);
    ch.exchange_declare(
        ShortString::from(dlx.as_str()),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.queue_declare(
        ShortString::from(dead.as_str()),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        table(&[(
            "x-queue-type",
            AMQPValue::LongString(LongString::from("quorum")),
        )]),
    )
    .await?;
    ch.queue_bind(
        ShortString::from(dead.as_str()),
        ShortString::from(dlx.as_str()),
        ShortString::from(""),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let args = table(&[
        (
            "x-queue-type",
            AMQPValue::LongString(LongString::from("quorum")),
        ),
        ("x-delivery-limit", AMQPValue::LongLongInt(DELIVERY_LIMIT)),
        (
            "x-dead-letter-exchange",
            AMQPValue::LongString(LongString::from(dlx.as_str())),
        ),
    ]);
    let _ = ch.close(200, ShortString::from("done")).await;
    let (ch, refused) = declare_or_existing(conn, queue, args).await?;
    if let Some(e) = refused {
        tracing::debug!(error = %e, "queue declare refused; using the existing queue");
        tracing::warn!(
            queue,
            missing = "x-queue-type=quorum, x-delivery-limit, x-dead-letter-exchange",
            "the queue exists with other arguments; using it as it is. Without a delivery limit and a dead-letter exchange, a message that keeps failing is redelivered forever and rejected messages are dropped"
        );
    }
    let _ = ch.close(200, ShortString::from("done")).await;
    Ok(())
}

/// Broker mode's dead-letter sink: each record is published (confirmed) to
/// the dead-letter exchange. `settled_after` lets an ack wait until the
/// dead letters recorded before it are confirmed, so none is lost between
/// the ack and a crash.
pub struct BrokerDeadLetters {
    tx: mpsc::UnboundedSender<DeadLetter>,
    enqueued: AtomicU64,
    confirmed: watch::Receiver<u64>,
}

impl BrokerDeadLetters {
    pub fn start(link: Arc<BrokerLink>) -> Arc<BrokerDeadLetters> {
        let (tx, mut rx) = mpsc::unbounded_channel::<DeadLetter>();
        let (confirmed_tx, confirmed) = watch::channel(0u64);
        tokio::spawn(async move {
            let exchange = dlx_name(&link.queue);
            let mut done = 0u64;
            while let Some(dl) = rx.recv().await {
                let body = serde_json::to_vec(&dl).expect("dead letters serialize");
                let props = BasicProperties::default()
                    .with_message_id(ShortString::from(dl.event_id.as_str()))
                    .with_content_type(ShortString::from("application/json"))
                    .with_headers(table(&[(
                        "x-chat-janitor-dead-letter",
                        AMQPValue::LongString(LongString::from(dl.reason.as_str())),
                    )]));
                let mut backoff = Duration::from_millis(100);
                while let Err(e) = link
                    .publish(&exchange, "action", &body, props.clone())
                    .await
                {
                    tracing::warn!(error = %e, "cannot publish a dead letter yet; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                done += 1;
                confirmed_tx.send_replace(done);
            }
        });
        Arc::new(BrokerDeadLetters {
            tx,
            enqueued: AtomicU64::new(0),
            confirmed,
        })
    }

    /// Waits until every dead letter recorded so far is confirmed.
    pub async fn flushed(&self) {
        let target = self.enqueued.load(Ordering::Acquire);
        let mut rx = self.confirmed.clone();
        let _ = rx.wait_for(|n| *n >= target).await;
    }
}

impl DeadLetterSink for BrokerDeadLetters {
    fn record(&self, dl: DeadLetter) {
        self.enqueued.fetch_add(1, Ordering::AcqRel);
        let _ = self.tx.send(dl);
    }
}
