//! The leader lease: which replica dispatches in broker mode, decided by
//! RabbitMQ alone (no other coordinator).
//!
//! A lock queue `<queue>.leader` (durable quorum queue,
//! `x-single-active-consumer: true`, no delivery limit) holds one token
//! message. Every replica consumes it on a connection of its own, so the
//! lease lives and dies with that connection. Single active consumer means
//! only one consumer receives anything; the replica holding the token is the
//! leader.
//!
//! Why this design:
//! - **It knows at once.** AMQP 0-9-1 never tells a consumer it became the
//!   single active one, it only starts delivering to it. The token is what
//!   gets delivered, so the new leader learns it the moment it is activated,
//!   even when the work queue is quiet.
//! - **It works on the old work queue.** The election happens on its own
//!   queue, so the `chat-janitor.events` queue that every deployment
//!   declared without single-active-consumer (which cannot be added in
//!   place) is used as it is; the leader is simply the only replica that
//!   consumes it.
//! - **It survives `consumer_timeout`.** The broker closes a channel that
//!   holds a delivery unacked for longer (30 minutes by default). Every
//!   [`LeaseConfig::renew_every`] (60 s by default) the leader renews: it
//!   publishes a fresh token (confirmed) and then acks the one it holds.
//!   Single active consumer delivers the fresh token to the same, still
//!   active, consumer, as a new delivery with a new clock. Renewing by
//!   `basic.reject` with requeue works too on RabbitMQ 3.10 (the tests show
//!   it: the token goes back to the same consumer every time and a queue
//!   without `x-delivery-limit` never drops it), but each requeue raises the
//!   message's delivery count: RabbitMQ 4.0 gives quorum queues a default
//!   delivery limit of 20, and 4.3 counts a `basic.reject` requeue against
//!   it, so a requeued token would be dropped after about 20 renewals there.
//!   A fresh token per renewal has a delivery count of zero on any version.
//! - **Missing and extra tokens heal.** A replica that finds the lock queue
//!   empty when it declares it publishes a token; a replica that has held no
//!   token for [`LeaseConfig::token_grace`] publishes one too. Extra tokens
//!   all reach the one active consumer, which keeps one and acks the rest,
//!   so two replicas starting together still end with one leader and one
//!   token. (The declare reply counts ready messages only, so a replica
//!   joining a live leader adds one extra token, which the leader acks.)
//! - **Failover is the broker's.** A closed connection activates the next
//!   consumer at once; missed heartbeats (interval configurable, 10 s by
//!   default, proposed in the connection's `heartbeat` URI parameter; the
//!   lower of client's and server's wins) after two to three intervals: on
//!   RabbitMQ 3.10.8 with a 2 s heartbeat, a SIGSTOPped holder was replaced
//!   after 5.4 s. The unacked token goes to the next consumer.
//!
//! The holder reports [`Leadership::Follower`] on the first sign that the
//! lease may be gone: any connection or channel error, the consumer stream
//! ending, a `connection.blocked`, or the process itself stalling (a
//! SIGSTOP, a frozen VM) for longer than one heartbeat interval. The lease
//! connection has no automatic recovery: a recovered connection would be a
//! new consumer behind the others, and the broker would already have given
//! the token away, so recovery would only hide the loss. An outer loop
//! reconnects with backoff instead and becomes leader again only when a
//! token is delivered anew.
//!
//! What the lease cannot give: fencing. The broker and the old leader each
//! notice missed heartbeats on their own clock, so during a network
//! partition the old leader may still believe it leads for a moment after
//! the broker has activated another replica. A paused process learns it on
//! resume from its stall check or its dead socket, whichever the runtime
//! polls first, so a dispatcher should read the watch before each upstream
//! call rather than once per batch. Its work connection fails
//! as well, its acks are refused and its deliveries redelivered, and the
//! work is idempotent, so the overlap repeats work but loses none.
//!
//! [`LeaseHandle::release`] gives the token back (closes the lease
//! connection) so the next replica is activated at once; the leader calls it
//! on SIGTERM once its work has drained.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::broker::table;

/// The lock queue of a work queue.
pub fn leader_queue_name(queue: &str) -> String {
    format!("{queue}.leader")
}

/// Unacked deliveries the lease channel may hold: one token plus room for
/// extra tokens to reach us, so we can ack them while we keep the first.
const PREFETCH: u16 = 16;
/// The body of a token; only its presence matters.
const TOKEN_BODY: &[u8] = b"chat-janitor leader token";
/// Longest wait for the broker to confirm a token publish.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Whether this replica holds the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leadership {
    /// Another replica may lead; this one must not dispatch.
    Follower,
    /// This replica holds the token (or is getting it back from a renewal).
    Leader,
}

impl Leadership {
    pub fn is_leader(self) -> bool {
        self == Leadership::Leader
    }
}

/// How the lease behaves; [`Default`] is what production uses.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Heartbeat interval proposed to the broker (the lower of the two
    /// proposals wins). A paused or cut-off holder is noticed within about
    /// two intervals.
    pub heartbeat: Duration,
    /// How often the leader swaps its token for a fresh one; must stay well
    /// inside the broker's `consumer_timeout` (30 minutes by default).
    pub renew_every: Duration,
    /// How long a replica waits without a token before publishing one, in
    /// case the token was lost (purged, acked by mistake). An extra token is
    /// harmless, so this only bounds how long a lost token leaves no leader.
    pub token_grace: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            heartbeat: Duration::from_secs(10),
            renew_every: Duration::from_secs(60),
            token_grace: Duration::from_secs(60),
        }
    }
}

impl LeaseConfig {
    /// Defaults with the given heartbeat interval (whole seconds, at least 1).
    pub fn with_heartbeat_secs(heartbeat_secs: u16) -> LeaseConfig {
        LeaseConfig {
            heartbeat: Duration::from_secs(u64::from(heartbeat_secs.max(1))),
            ..LeaseConfig::default()
        }
    }

    /// How long the local clock may jump between two checks before the
    /// holder assumes the broker already counted it dead.
    fn stall_limit(&self) -> Duration {
        self.heartbeat
    }

    /// How often the holder checks its connection, clock and timers.
    fn tick(&self) -> Duration {
        (self.heartbeat / 4).clamp(Duration::from_millis(50), Duration::from_millis(500))
    }

    /// Longest a renewed token may take to come back before the holder
    /// stops trusting its consumer.
    fn return_wait(&self) -> Duration {
        self.heartbeat.max(Duration::from_secs(2))
    }
}

/// Why a lease connection ended.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("lease broker connection: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("invalid broker URI: {0}")]
    Uri(String),
    #[error("the broker cancelled the lease consumer")]
    Cancelled,
    #[error("the broker blocked the lease connection: {0}")]
    Blocked(String),
    #[error("the process stalled for {0:?}; the broker may have counted it dead")]
    Stalled(Duration),
    #[error("the renewed token did not come back")]
    TokenNotReturned,
    #[error("the broker did not confirm a token")]
    Unconfirmed,
}

/// Entry point; see the module docs.
pub struct LeaderLease;

impl LeaderLease {
    /// Starts competing for the lease on `<queue>.leader` with the default
    /// timings and the given heartbeat. Runs until `stop` fires, the handle
    /// is dropped, or [`LeaseHandle::release`] is called.
    pub fn start(
        uri: SecretString,
        queue: &str,
        heartbeat_secs: u16,
        stop: CancellationToken,
    ) -> LeaseHandle {
        Self::start_with(
            uri,
            queue,
            LeaseConfig::with_heartbeat_secs(heartbeat_secs),
            stop,
        )
    }

    /// [`LeaderLease::start`] with every timing given.
    pub fn start_with(
        uri: SecretString,
        queue: &str,
        config: LeaseConfig,
        stop: CancellationToken,
    ) -> LeaseHandle {
        let stop = stop.child_token();
        let (state_tx, state) = watch::channel(Leadership::Follower);
        let (release_tx, release_rx) = oneshot::channel();
        let holder = Holder {
            uri,
            lock_queue: leader_queue_name(queue),
            config,
            state: state_tx,
            stop: stop.clone(),
        };
        let task = tokio::spawn(holder.run(release_rx));
        LeaseHandle {
            state,
            release: Some(release_tx),
            task: Some(task),
            _guard: stop.drop_guard(),
        }
    }
}

/// A running lease. Dropping it stops the lease (and closes its connection).
pub struct LeaseHandle {
    state: watch::Receiver<Leadership>,
    release: Option<oneshot::Sender<oneshot::Sender<()>>>,
    task: Option<JoinHandle<()>>,
    _guard: DropGuard,
}

impl LeaseHandle {
    /// A receiver that sees every change of leadership as it happens.
    pub fn watch(&self) -> watch::Receiver<Leadership> {
        self.state.clone()
    }

    /// Whether this replica leads right now.
    pub fn is_leader(&self) -> bool {
        self.state.borrow().is_leader()
    }

    /// Gives the lease up for good: reports follower, then closes the lease
    /// connection so the broker activates the next replica and hands it the
    /// token at once. Call it after the leader has drained its work.
    pub async fn release(mut self) {
        if let Some(tx) = self.release.take() {
            let (done_tx, done_rx) = oneshot::channel();
            if tx.send(done_tx).is_ok() {
                let _ = done_rx.await;
            }
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Waits until the lease has stopped (after `stop` fired).
    pub async fn stopped(mut self) {
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// How one lease connection ended when nothing went wrong.
enum End {
    Stopped,
    Released(oneshot::Sender<()>),
}

struct Holder {
    uri: SecretString,
    lock_queue: String,
    config: LeaseConfig,
    state: watch::Sender<Leadership>,
    stop: CancellationToken,
}

impl Holder {
    fn set(&self, to: Leadership) {
        let was = self.state.send_replace(to);
        if was != to {
            match to {
                Leadership::Leader => {
                    tracing::info!(lock_queue = %self.lock_queue, "leader lease acquired")
                }
                Leadership::Follower => {
                    tracing::info!(lock_queue = %self.lock_queue, "leader lease lost or given up")
                }
            }
        }
    }

    async fn run(self, mut release: oneshot::Receiver<oneshot::Sender<()>>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            match self.session(&mut release).await {
                Ok(End::Stopped) => return,
                Ok(End::Released(done)) => {
                    let _ = done.send(());
                    return;
                }
                Err(e) => {
                    self.set(Leadership::Follower);
                    tracing::warn!(error = %e, lock_queue = %self.lock_queue, "lease connection lost; reconnecting");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.stop.cancelled() => return,
                r = &mut release => {
                    if let Ok(done) = r {
                        let _ = done.send(());
                    }
                    return;
                }
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn connect(&self) -> Result<Connection, LeaseError> {
        let mut uri: AMQPUri = self
            .uri
            .expose_secret()
            .parse()
            .map_err(|e: String| LeaseError::Uri(e))?;
        let secs = self
            .config
            .heartbeat
            .as_secs()
            .clamp(1, u64::from(u16::MAX));
        uri.query.heartbeat = Some(u16::try_from(secs).unwrap_or(u16::MAX));
        // No automatic recovery: see the module docs.
        let props = ConnectionProperties::default().with_connection_name(LongString::from(
            format!("chat-janitor lease {}", std::process::id()),
        ));
        Ok(Connection::connect_uri(uri, props).await?)
    }

    /// One lease connection: `Ok` when stopped or released, `Err` as soon as
    /// the lease may be lost.
    async fn session(
        &self,
        release: &mut oneshot::Receiver<oneshot::Sender<()>>,
    ) -> Result<End, LeaseError> {
        let conn = tokio::select! {
            c = self.connect() => c?,
            _ = self.stop.cancelled() => return Ok(End::Stopped),
        };
        let result = self.hold(&conn, release).await;
        // Whatever happened, this connection no longer backs a lease.
        self.set(Leadership::Follower);
        if conn.status().connected() {
            let _ = conn.close(200, ShortString::from("lease over")).await;
        }
        result
    }

    async fn hold(
        &self,
        conn: &Connection,
        release: &mut oneshot::Receiver<oneshot::Sender<()>>,
    ) -> Result<End, LeaseError> {
        let mut events = conn.events_listener();
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let declared = declare_lock_queue(&channel, &self.lock_queue).await?;
        if declared.message_count() == 0 {
            // No ready token. Either it is lost or a leader holds it; an
            // extra token is harmless, a missing one leaves no leader.
            publish_token(&channel, &self.lock_queue).await?;
        }
        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await?;
        let tag = format!("chat-janitor-lease-{}", std::process::id());
        let mut consumer = channel
            .basic_consume(
                ShortString::from(self.lock_queue.as_str()),
                ShortString::from(tag.as_str()),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;

        let cfg = &self.config;
        let mut tick = tokio::time::interval(cfg.tick());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_tick = Instant::now();
        // The token we hold, and when to renew it.
        let mut held: Option<(lapin::Acker, Instant)> = None;
        // Set while a renewed token is on its way back to us.
        let mut returning: Option<Instant> = None;
        // When we last held a token or published one.
        let mut last_token = Instant::now();

        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return Ok(End::Stopped),
                r = &mut *release => {
                    self.set(Leadership::Follower);
                    // Closing the channel requeues the token; the broker
                    // activates the next consumer and delivers it there.
                    let _ = channel.close(200, ShortString::from("lease released")).await;
                    return match r {
                        Ok(done) => Ok(End::Released(done)),
                        Err(_) => Ok(End::Stopped),
                    };
                }
                d = consumer.next() => match d {
                    Some(Ok(d)) => {
                        if held.is_none() {
                            held = Some((d.acker, Instant::now() + cfg.renew_every));
                            returning = None;
                            last_token = Instant::now();
                            self.set(Leadership::Leader);
                        } else {
                            tracing::debug!(lock_queue = %self.lock_queue, "extra leader token acked");
                            d.acker.ack(BasicAckOptions::default()).await?;
                        }
                    }
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err(LeaseError::Cancelled),
                },
                ev = events.next() => match ev {
                    Some(lapin::Event::Error(e)) => return Err(e.into()),
                    Some(lapin::Event::ConnectionBlocked(why)) => return Err(LeaseError::Blocked(why)),
                    Some(_) => {}
                    None => return Err(LeaseError::Cancelled),
                },
                _ = tick.tick() => {
                    let now = Instant::now();
                    let gap = now.duration_since(last_tick);
                    last_tick = now;
                    if gap > cfg.stall_limit() {
                        return Err(LeaseError::Stalled(gap));
                    }
                    if !conn.status().connected() || !channel.status().connected() {
                        return Err(lapin::Error::from(std::io::Error::other(
                            "lease connection closed",
                        ))
                        .into());
                    }
                    if let Some((acker, renew_at)) = &held {
                        if now >= *renew_at {
                            // A fresh token first, then the old one acked:
                            // the fresh one comes to us, the single active
                            // consumer, as a new delivery. There is a token
                            // in the queue at every moment, and no delivery
                            // count grows (see the module docs).
                            publish_token(&channel, &self.lock_queue).await?;
                            acker.ack(BasicAckOptions::default()).await?;
                            held = None;
                            returning = Some(now);
                            last_tick = Instant::now();
                        }
                    } else if let Some(since) = returning {
                        if now.duration_since(since) > cfg.return_wait() {
                            return Err(LeaseError::TokenNotReturned);
                        }
                    } else if now.duration_since(last_token) >= cfg.token_grace {
                        tracing::info!(lock_queue = %self.lock_queue, "no leader token seen for a while; publishing one");
                        publish_token(&channel, &self.lock_queue).await?;
                        last_token = now;
                        // The confirm's wait is not a stall.
                        last_tick = Instant::now();
                    }
                }
            }
        }
    }
}

/// Declares the lock queue: durable quorum, single active consumer, and no
/// delivery limit (3.x quorum queues have none unless one is set). A token
/// is requeued only when its holder's connection goes (each failover adds
/// one to its delivery count); on a 4.x broker, whose default limit is 20,
/// a token past it is dropped and [`LeaseConfig::token_grace`] re-creates
/// one.
pub async fn declare_lock_queue(
    channel: &Channel,
    lock_queue: &str,
) -> Result<lapin::Queue, lapin::Error> {
    channel
        .queue_declare(
            ShortString::from(lock_queue),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            lock_queue_arguments(),
        )
        .await
}

/// The lock queue's arguments.
pub fn lock_queue_arguments() -> FieldTable {
    table(&[
        (
            "x-queue-type",
            AMQPValue::LongString(LongString::from("quorum")),
        ),
        ("x-single-active-consumer", AMQPValue::Boolean(true)),
    ])
}

async fn publish_token(channel: &Channel, lock_queue: &str) -> Result<(), LeaseError> {
    let confirm = channel
        .basic_publish(
            ShortString::from(""),
            ShortString::from(lock_queue),
            BasicPublishOptions::default(),
            TOKEN_BODY,
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(ShortString::from("chat-janitor-leader-token")),
        )
        .await?;
    match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
        Ok(Ok(Confirmation::Ack(_))) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        _ => Err(LeaseError::Unconfirmed),
    }
}
