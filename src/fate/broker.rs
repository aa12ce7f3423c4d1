//! Broker mode's record store: the RabbitMQ stream `<queue>.records`, so a
//! record outlives the replica that wrote it and RabbitMQ stays the only
//! stateful dependency.
//!
//! - **Writing.** The replica whose pipeline settles an event publishes its
//!   record to the stream with publisher confirms, in groups: one message
//!   (header [`KIND_HEADER`] = `kept`) carries the snapshot of the rules
//!   that planned them and up to [`PUBLISH_GROUP`] records in their kept
//!   form (`kept`: body and packed outcomes; the record is made on read),
//!   since RabbitMQ's cost and lapin's is per message. `put` never waits: it hands the record to a
//!   bounded buffer ([`MAX_QUEUED`]) drained by a publisher task; a full
//!   buffer drops the record and counts it (`records_dropped_total{reason
//!   ="queue_full"}`), as the disk store does. A publish that fails is
//!   retried with backoff (`records_write_errors_total`) while new records
//!   wait in the buffer. Until its confirm a record is answered from memory
//!   on the replica that wrote it. On shutdown the buffer is published
//!   before the dispatch lease is released (at most [`CLOSE_WAIT`]; what is
//!   left then is dropped and counted as `shutdown`).
//! - **Exchange.** With `[callbacks] exchange`, each record is also
//!   published there (a topic exchange, declared if missing), routing key
//!   `event.settled` or `event.dead_lettered`, its body and `message_id`
//!   those of an HTTP callback (`callbacks::body`, `callbacks::message_id`),
//!   so a consumer dedupes the copies a retry may repeat.
//! - **Reading: a local copy per replica.** Every replica tails the stream
//!   from its first offset with a reader of its own (a dedicated connection;
//!   on loss it reconnects and goes on from the next offset) into a
//!   [`DiskStore`] under `journal.path/records-broker/`, which answers `get`
//!   and `by_user`. The replica that published a group puts it into its
//!   own copy at its confirm, and its reader skips it (header
//!   [`FROM_HEADER`], random per process): reading its own records back
//!   cost the busiest replica a decode of each, and RabbitMQ a delivery. Reusing the embedded store gives the same indexed files,
//!   lookups by id and by user, size accounting and bounds, tested already,
//!   instead of a second index that would hold every record in memory. The
//!   copy is a cache: it is deleted and rebuilt from the stream at start,
//!   so it never holds a record twice and needs no offset of its own.
//!   Its size is what `records_file_bytes` / `records_stored` show, and
//!   `records_written_total` counts records written into it.
//! - **Read your writes.** A reader may lag behind a record another replica
//!   confirmed a moment ago. A lookup that finds nothing locally appends a
//!   `cursor` message with a fresh token and waits (at most [`SYNC_WAIT`])
//!   until the reader passed it: every record confirmed before is in the
//!   copy by then. A replica still rebuilding its copy, or cut off from the
//!   broker, answers 503 rather than a 404 it cannot vouch for.
//! - **Retention.** The stream is declared with `x-max-age` =
//!   `[records] retention` and `x-max-length-bytes` = `[records] max_bytes`,
//!   in segments of a sixteenth of that, so RabbitMQ drops whole old
//!   segments. A segment goes when its newest message is past the age, so a
//!   record answered from the copy is also checked against the retention
//!   (by when it settled): an expired record is never answered. An existing
//!   stream keeps the arguments it was declared with (RabbitMQ refuses new
//!   ones; a policy can change them), which is logged at start.
//! - **Callbacks over HTTP.** With `[callbacks] url`, each record is also
//!   published, as its callback, to the quorum queue `<queue>.callbacks`
//!   (`callbacks::queue`), which every replica consumes and acks once the
//!   callback is delivered or given up; so this store keeps no callback
//!   cursor (`cursor` is always `None`).
//!
//! Deleting the stream forgets every record, as deleting the journal does
//! in embedded mode.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{join_all, BoxFuture};
use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Connection, ExchangeKind};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch, OnceCell};
use tokio_util::sync::CancellationToken;

use super::callbacks::queue::{
    self as callback_queue, callback_queue_name, declare_callback_queue,
};
use super::callbacks::{Callback, Tries};
use super::disk::{DiskStore, StoreOptions};
use super::{
    Absent, CallbackCursor, Durable, EventRecord, FateError, FateStore, Position, RulesBook,
    SettledEvent, Status, StoreStats,
};
use crate::domain::clock::unix_ms;
use crate::domain::RecordDrop;
use crate::inbox::broker::{declare_stream, table, BrokerError, BrokerLink};
use crate::inbox::dead_letters::{header_str, stream_offset};
use crate::telemetry::Metrics;

/// A message's kind: `records` (a JSON array of records, one publish
/// group), `record` (one record, as first written) or `cursor`.
const KIND_HEADER: &str = "x-chat-janitor-record";
/// A token a `sync` waits to see come by.
const TOKEN_HEADER: &str = "x-chat-janitor-record-token";
/// The header naming the process that published a group of records: its
/// own reader skips them (they are in its copy since their confirm).
const FROM_HEADER: &str = "x-chat-janitor-record-from";
/// Records handed over and not yet published; beyond this a record is
/// dropped (and counted) rather than waited for.
pub const MAX_QUEUED: usize = 16_384;
/// Records published at once, in one stream message: RabbitMQ's and
/// lapin's cost is per message (a publish, a confirm, a delivery and its
/// ack), and one message per record took as much CPU as the clean-up.
const PUBLISH_GROUP: usize = 256;
/// Longest a lookup waits for the reader to pass its cursor.
pub const SYNC_WAIT: Duration = Duration::from_secs(10);
/// Longest a declaration waits for a connection.
const DECLARE_WAIT: Duration = Duration::from_secs(5);
/// Longest shutdown waits for the buffer to be published.
pub const CLOSE_WAIT: Duration = Duration::from_secs(10);
/// Deliveries in flight while reading (streams require a prefetch).
const PREFETCH: u16 = 1_000;
/// Records put into the local copy between two waits for its writer, so
/// a rebuild never outruns it (its own buffer drops beyond 16,384).
const COPY_SYNC_EVERY: usize = 4_096;
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The record stream of a work queue.
pub fn record_stream_name(queue: &str) -> String {
    format!("{queue}.records")
}

/// The local copy's directory under `journal.path`.
pub const LOCAL_DIR: &str = "records-broker";

/// Where records also go as callbacks, if anywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerStoreOptions {
    pub store: StoreOptions,
    /// `[callbacks] exchange`; empty: none.
    pub exchange: String,
    /// `[callbacks] url` is set: each record is also published to the
    /// callback queue `<queue>.callbacks`, for whichever replica consumes
    /// it to POST.
    pub callback_queue: bool,
}

/// Broker mode's `FateStore`; cheap to clone.
#[derive(Clone)]
pub struct BrokerStore {
    inner: Arc<Inner>,
}

struct Inner {
    link: Arc<BrokerLink>,
    stream: String,
    exchange: Option<String>,
    /// The callback queue, with `[callbacks] url`.
    callback_queue: Option<String>,
    opts: StoreOptions,
    local: DiskStore,
    metrics: Metrics,
    /// The publisher's buffer; `None` once closed.
    tx: Mutex<Option<mpsc::Sender<Arc<SettledEvent>>>>,
    /// Records handed over and not yet confirmed, by event id, so the
    /// replica that settled an event answers for it at once.
    unpublished: Mutex<HashMap<Box<str>, Arc<SettledEvent>, foldhash::fast::RandomState>>,
    /// The rules records are planned again with on read.
    book: Arc<RulesBook>,
    /// The service's rules' snapshot, sent with every group of records.
    rules_snapshot: Vec<u8>,
    /// This process among the replicas (random at each start, so after a
    /// restart its earlier records are read back like anyone's).
    me: String,
    declared: OnceCell<()>,
    /// The reader's state: the next offset, and syncs waiting for tokens.
    reader: Mutex<Reader>,
    publisher: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Shutdown gave up waiting for the publisher.
    give_up: CancellationToken,
    /// Stops the reader.
    stop: CancellationToken,
    closed: AtomicBool,
    /// Records handed to the publisher (counted by `put`) and published
    /// (counted by the publisher), for the inbox's acks.
    durable: Durable,
    published: watch::Sender<u64>,
}

#[derive(Default)]
struct Reader {
    next: Option<u64>,
    waiting: HashMap<String, oneshot::Sender<()>>,
    /// An earlier version's records were seen (and said so, once).
    warned_old: bool,
}

/// The `kind` header of a stream message of kept records.
const KEPT_KIND: &str = "kept";

/// A stream message of kept records: the snapshot of the rules that
/// planned them (every replica can then plan them again, whatever its own
/// rules), then each record's payload (`SettledEvent::encode`); each part
/// a u32 length (little-endian) and its bytes.
fn stream_message(rules: &[u8], records: &[Arc<SettledEvent>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rules.len() + records.len() * 256);
    out.extend_from_slice(&(rules.len() as u32).to_le_bytes());
    out.extend_from_slice(rules);
    let mut payload = Vec::with_capacity(512);
    for r in records {
        payload.clear();
        r.encode(&mut payload);
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&payload);
    }
    out
}

/// `stream_message`'s records back, their rules now known to `book`;
/// `None` if the bytes are not such a message.
fn read_stream_message(mut b: &[u8], book: &RulesBook) -> Option<Vec<SettledEvent>> {
    let mut part = || -> Option<Option<&[u8]>> {
        if b.is_empty() {
            return Some(None);
        }
        let n = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
        let p = b.get(4..4 + n)?;
        b = &b[4 + n..];
        Some(Some(p))
    };
    book.remember(part()??)?;
    let mut out = Vec::new();
    while let Some(p) = part()? {
        out.push(SettledEvent::decode(p)?);
    }
    Some(out)
}

/// One message to publish: records to the stream, or one record as a
/// callback (to the exchange, the callback queue or both).
enum Out {
    Stream(Vec<Arc<SettledEvent>>),
    Callback(Arc<SettledEvent>),
}

impl BrokerStore {
    /// Deletes the local copy under `dir`, opens it empty, and starts the
    /// publisher and the reader (which rebuilds the copy from the stream).
    /// Nothing waits for the broker here: a broker that is away is retried
    /// in the background.
    pub fn open(
        link: Arc<BrokerLink>,
        dir: &Path,
        opts: BrokerStoreOptions,
        metrics: Metrics,
        book: Arc<RulesBook>,
    ) -> Result<BrokerStore, FateError> {
        match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(FateError::Storage(format!("{}: {e}", dir.display())));
            }
            _ => {}
        }
        let local = DiskStore::open(dir, opts.store, metrics.clone(), book.clone())?;
        let (tx, rx) = mpsc::channel(MAX_QUEUED);
        let (durable, published) = Durable::new();
        let store = BrokerStore {
            inner: Arc::new(Inner {
                stream: record_stream_name(&link.queue),
                callback_queue: opts
                    .callback_queue
                    .then(|| callback_queue_name(&link.queue)),
                link,
                exchange: Some(opts.exchange).filter(|e| !e.is_empty()),
                opts: opts.store,
                local,
                metrics,
                tx: Mutex::new(Some(tx)),
                unpublished: Mutex::new(HashMap::default()),
                rules_snapshot: book.current().snapshot(),
                me: format!("{:032x}", rand::random::<u128>()),
                book,
                declared: OnceCell::new(),
                reader: Mutex::new(Reader::default()),
                publisher: Mutex::new(None),
                give_up: CancellationToken::new(),
                stop: CancellationToken::new(),
                closed: AtomicBool::new(false),
                durable,
                published,
            }),
        };
        let publisher = tokio::spawn(store.clone().publish_loop(rx));
        *store.inner.publisher.lock() = Some(publisher);
        tokio::spawn(store.clone().read(store.inner.stop.clone()));
        Ok(store)
    }

    /// Whether `record` is still within the retention (by when it settled).
    fn fresh(&self, record: &EventRecord) -> bool {
        self.fresh_at(record.settled_at_ms.unwrap_or(record.accepted_at_ms))
    }

    /// Whether a record of an event settled at `at` (unix ms) is kept.
    fn fresh_at(&self, at: u64) -> bool {
        at.saturating_add(self.inner.opts.retention_ms()) >= unix_ms()
    }

    async fn declare(&self) -> Result<(), BrokerError> {
        self.inner
            .declared
            .get_or_try_init(|| async {
                // Bounded: lapin may retry a first connection for long.
                let conn = tokio::time::timeout(DECLARE_WAIT, self.inner.link.connection())
                    .await
                    .map_err(|_| BrokerError::Unavailable)??;
                declare_record_stream(&conn, &self.inner.stream, &self.inner.opts).await?;
                if let Some(x) = &self.inner.exchange {
                    declare_exchange(&conn, x).await?;
                }
                if let Some(q) = &self.inner.callback_queue {
                    declare_callback_queue(&conn, q).await?;
                }
                Ok::<(), BrokerError>(())
            })
            .await
            .map(|_| ())
    }

    /// Returns once every record confirmed on the stream before the call
    /// is in the local copy (or fails after [`SYNC_WAIT`]).
    pub async fn sync(&self) -> Result<(), FateError> {
        let unreadable = |why: String| {
            FateError::Storage(format!(
                "the record log {} cannot be read back now ({why}); try again",
                self.inner.stream
            ))
        };
        self.declare()
            .await
            .map_err(|e| unreadable(e.to_string()))?;
        let token = format!("{:032x}", rand::random::<u128>());
        let (tx, rx) = oneshot::channel();
        self.inner.reader.lock().waiting.insert(token.clone(), tx);
        let props = BasicProperties::default().with_headers(table(&[
            (
                KIND_HEADER,
                AMQPValue::LongString(LongString::from("cursor")),
            ),
            (
                TOKEN_HEADER,
                AMQPValue::LongString(LongString::from(token.as_str())),
            ),
        ]));
        let published = self
            .inner
            .link
            .publish("", &self.inner.stream, b"", props)
            .await;
        let seen = match published {
            Ok(()) => tokio::time::timeout(SYNC_WAIT, rx)
                .await
                .ok()
                .and_then(Result::ok),
            Err(e) => {
                self.inner.reader.lock().waiting.remove(&token);
                return Err(unreadable(e.to_string()));
            }
        };
        self.inner.reader.lock().waiting.remove(&token);
        seen.ok_or_else(|| unreadable("the reader is behind".into()))
    }

    /// Event `id`'s record in the local copy or not yet confirmed, if fresh.
    async fn local_get(&self, id: &str) -> Result<Option<EventRecord>, FateError> {
        let unpublished = self.inner.unpublished.lock().get(id).cloned();
        if let Some(r) = unpublished {
            return Ok(r.record(&self.inner.book));
        }
        Ok(self.inner.local.get(id).await?.filter(|r| self.fresh(r)))
    }

    /// Publishes what the buffer holds, a group at a time, until it is
    /// closed and empty.
    async fn publish_loop(self, mut rx: mpsc::Receiver<Arc<SettledEvent>>) {
        let mut taken = Vec::with_capacity(PUBLISH_GROUP);
        let mut failing = false;
        let mut published = 0u64;
        loop {
            taken.clear();
            if rx.recv_many(&mut taken, PUBLISH_GROUP).await == 0 {
                return;
            }
            let n = taken.len() as u64;
            let mut group: Vec<Out> = Vec::with_capacity(taken.len() + 1);
            if self.inner.exchange.is_some() || self.inner.callback_queue.is_some() {
                group.extend(taken.iter().cloned().map(Out::Callback));
            }
            group.push(Out::Stream(std::mem::take(&mut taken)));
            let mut backoff = BACKOFF_MIN;
            loop {
                let failed = tokio::select! {
                    f = self.publish_group(&mut group) => f,
                    _ = self.inner.give_up.cancelled() => {
                        self.drop_all(group, &mut rx);
                        return;
                    }
                };
                let Some(e) = failed else {
                    if std::mem::take(&mut failing) {
                        tracing::info!(log = %self.inner.stream, "event records are published again");
                    }
                    // Records and callbacks alike: their events may be acked.
                    published += n;
                    self.inner.published.send_replace(published);
                    break;
                };
                self.inner.metrics.record_write_error();
                if !std::mem::replace(&mut failing, true) {
                    tracing::error!(error = %e, log = %self.inner.stream, "cannot publish event records; they are held and retried (the clean-up goes on)");
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = self.inner.give_up.cancelled() => {
                        self.drop_all(group, &mut rx);
                        return;
                    }
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }

    /// Publishes `group` concurrently, leaving in it what failed; the last
    /// error, if any. (Cancelled, it leaves the whole group.)
    async fn publish_group(&self, group: &mut Vec<Out>) -> Option<BrokerError> {
        if let Err(e) = self.declare().await {
            return Some(e);
        }
        let results = join_all(group.iter().map(|o| self.publish_one(o))).await;
        let mut last = None;
        let mut results = results.into_iter();
        group.retain(|o| match results.next() {
            Some(Ok(())) => {
                if let Out::Stream(records) = o {
                    for r in records {
                        // Into the copy now, not when the reader comes
                        // by: it skips what this process published.
                        self.inner.local.put_shared(r.clone());
                        self.confirmed(r);
                    }
                }
                false
            }
            Some(Err(e)) => {
                last = Some(e);
                true
            }
            None => true,
        });
        last
    }

    async fn publish_one(&self, out: &Out) -> Result<(), BrokerError> {
        let link = &self.inner.link;
        match out {
            Out::Callback(kept) => {
                let Some(r) = kept.record(&self.inner.book) else {
                    // Its body no longer makes an event: it has no record.
                    return Ok(());
                };
                let callback = Callback::of(&r);
                let props = callback_queue::properties(&callback, &Tries::default(), None);
                if let Some(exchange) = &self.inner.exchange {
                    let key = match r.status {
                        Status::DeadLettered => "event.dead_lettered",
                        Status::Settled | Status::Pending => "event.settled",
                    };
                    match link
                        .publish(exchange, key, &callback.body, props.clone())
                        .await
                    {
                        // Nobody bound a queue yet: nothing to deliver to.
                        Err(BrokerError::Refused("unroutable")) | Ok(()) => {}
                        Err(e) => return Err(e),
                    }
                }
                if let Some(queue) = &self.inner.callback_queue {
                    link.publish("", queue, &callback.body, props).await?;
                }
                Ok(())
            }
            Out::Stream(records) => {
                let body = stream_message(&self.inner.rules_snapshot, records);
                let props = BasicProperties::default()
                    .with_content_type(ShortString::from("application/octet-stream"))
                    .with_headers(table(&[
                        (
                            KIND_HEADER,
                            AMQPValue::LongString(LongString::from(KEPT_KIND)),
                        ),
                        (
                            FROM_HEADER,
                            AMQPValue::LongString(LongString::from(self.inner.me.as_str())),
                        ),
                    ]));
                link.publish("", &self.inner.stream, &body, props).await
            }
        }
    }

    /// The record is on the stream: the reader answers for it from now on.
    fn confirmed(&self, record: &Arc<SettledEvent>) {
        let mut u = self.inner.unpublished.lock();
        if u.get(record.id.as_str())
            .is_some_and(|r| Arc::ptr_eq(r, record))
        {
            u.remove(record.id.as_str());
        }
    }

    /// Shutdown gave up: everything held is dropped and counted.
    fn drop_all(&self, group: Vec<Out>, rx: &mut mpsc::Receiver<Arc<SettledEvent>>) {
        let mut n: usize = group
            .iter()
            .map(|o| match o {
                Out::Stream(records) => records.len(),
                Out::Callback(_) => 0,
            })
            .sum();
        // Their events' messages are not acked (the inbox waits for
        // `durable`): the broker delivers them again, and the replica that
        // settles them publishes their records and callbacks.
        while rx.try_recv().is_ok() {
            n += 1;
        }
        for _ in 0..n {
            self.inner.metrics.record_dropped(RecordDrop::Shutdown);
        }
        self.inner.unpublished.lock().clear();
        if n > 0 {
            tracing::error!(records = n, log = %self.inner.stream, "event records not published before shutdown; their events were not acked and are delivered again");
        }
    }

    /// The reader: one connection at a time, reconnecting with backoff.
    async fn read(self, stop: CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let r = tokio::select! {
                r = self.read_once(&mut backoff) => r,
                _ = stop.cancelled() => return,
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, log = %self.inner.stream, "event record reader lost; reconnecting");
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Reads from the next offset (the first, at start) into the local copy
    /// until the connection is lost.
    async fn read_once(&self, backoff: &mut Duration) -> Result<(), BrokerError> {
        let conn = self.inner.link.dedicated_connection("record log").await?;
        declare_record_stream(&conn, &self.inner.stream, &self.inner.opts).await?;
        let ch = conn.create_channel().await?;
        ch.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
        let next = self.inner.reader.lock().next;
        let from = match next {
            Some(n) => AMQPValue::LongLongInt(i64::try_from(n).unwrap_or(i64::MAX)),
            None => AMQPValue::LongString(LongString::from("first")),
        };
        let mut consumer = ch
            .basic_consume(
                ShortString::from(self.inner.stream.as_str()),
                ShortString::from(""),
                BasicConsumeOptions::default(),
                table(&[("x-stream-offset", from)]),
            )
            .await?;
        *backoff = BACKOFF_MIN;
        let mut copied = 0usize;
        let mut first = true;
        while let Some(d) = consumer.next().await {
            let d = d?;
            // Acks only return credit; a stream removes nothing.
            d.acker.ack(BasicAckOptions::default()).await?;
            let Some(offset) = stream_offset(&d) else {
                continue;
            };
            {
                let mut r = self.inner.reader.lock();
                let behind = r.next.is_some_and(|n| offset < n);
                if behind && !std::mem::take(&mut first) {
                    continue; // read before a reconnect
                }
                if behind {
                    // Asked for `n` and given less: the stream was deleted
                    // and declared anew (its records are read from its
                    // start; the copy keeps the old ones until they
                    // expire), or the broker started at the head of the
                    // chunk holding `n`. Either way the records are put
                    // again: a record twice in the copy is harmless (a
                    // lookup answers the newest, one per event id).
                    tracing::info!(log = %self.inner.stream, offset, "the event record reader goes on from an earlier offset than asked");
                }
                first = false;
                r.next = Some(offset + 1);
            }
            // Anything else is a cursor, or a message this version does not
            // know.
            let mine = header_str(&d, FROM_HEADER).as_deref() == Some(self.inner.me.as_str());
            let records = match header_str(&d, KIND_HEADER).as_deref() {
                Some(KEPT_KIND) if mine => Some(Vec::new()),
                Some(KEPT_KIND) => read_stream_message(&d.data, &self.inner.book),
                Some("records" | "record") => {
                    if !std::mem::replace(&mut self.inner.reader.lock().warned_old, true) {
                        tracing::warn!(log = %self.inner.stream, "event records an earlier version wrote on the stream (whole JSON records) are not read by this one; they are not answered");
                    }
                    Some(Vec::new())
                }
                _ => Some(Vec::new()),
            };
            match records {
                Some(records) => {
                    for record in records
                        .into_iter()
                        .filter(|r| self.fresh_at(r.settled_at_ms))
                    {
                        self.inner.local.put(record);
                        copied += 1;
                        if copied.is_multiple_of(COPY_SYNC_EVERY) {
                            self.inner.local.sync().await;
                        }
                    }
                }
                None => {
                    tracing::warn!(offset, "unreadable event records on the stream skipped");
                }
            }
            if let Some(token) = header_str(&d, TOKEN_HEADER) {
                if let Some(tx) = self.inner.reader.lock().waiting.remove(&token) {
                    let _ = tx.send(());
                }
            }
        }
        Err(BrokerError::Refused(
            "the broker cancelled the event record reader",
        ))
    }
}

impl FateStore for BrokerStore {
    fn put(&self, record: SettledEvent) {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            inner.metrics.record_dropped(RecordDrop::Shutdown);
            return;
        }
        let record = Arc::new(record);
        let tx = inner.tx.lock();
        let Some(tx) = tx.as_ref() else {
            inner.metrics.record_dropped(RecordDrop::Shutdown);
            return;
        };
        // Listed before it is sent, so the publisher's confirm finds it.
        inner
            .unpublished
            .lock()
            .insert(record.id.as_str().into(), record.clone());
        match tx.try_send(record.clone()) {
            // Counted under the buffer's lock, in the order sent.
            Ok(()) => inner.durable.handed_one(),
            Err(e) => {
                self.confirmed(&record);
                if inner.callback_queue.is_some() {
                    inner.metrics.callbacks_lost(1);
                }
                inner.metrics.record_dropped(match e {
                    mpsc::error::TrySendError::Full(_) => RecordDrop::QueueFull,
                    mpsc::error::TrySendError::Closed(_) => RecordDrop::Shutdown,
                });
            }
        }
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<EventRecord>, FateError>> {
        async move {
            if let Some(r) = self.local_get(id).await? {
                return Ok(Some(r));
            }
            self.sync().await?;
            self.local_get(id).await
        }
        .boxed()
    }

    fn by_user<'a>(
        &'a self,
        user_id: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<EventRecord>, FateError>> {
        async move {
            self.sync().await?;
            let unpublished: Vec<Arc<SettledEvent>> =
                self.inner.unpublished.lock().values().cloned().collect();
            let mut out: Vec<EventRecord> = unpublished
                .iter()
                .filter(|r| r.user_id().as_deref() == Some(user_id))
                .filter_map(|r| r.record(&self.inner.book))
                .collect();
            let stored = self.inner.local.by_user(user_id, limit).await?;
            let pending: HashSet<String> = out.iter().map(|r| r.id.clone()).collect();
            out.extend(
                stored
                    .into_iter()
                    .filter(|r| self.fresh(r) && !pending.contains(&r.id)),
            );
            out.sort_by_key(|r| std::cmp::Reverse(r.settled_at_ms));
            out.truncate(limit);
            Ok(out)
        }
        .boxed()
    }

    fn stats(&self) -> StoreStats {
        self.inner.local.stats()
    }

    fn absent(&self) -> Absent {
        let o = &self.inner.opts;
        let retention = humantime::format_duration(o.retention).to_string();
        Absent {
            detail: format!(
                "no record of this event id: it was not accepted, it may still be waiting in \
                 the queue or being processed (a record is written when the event settles), \
                 or its record expired (records are kept for {retention} after the event \
                 settles, and the oldest go first beyond {} bytes)",
                o.max_bytes
            ),
            retention,
            may_be_queued: true,
        }
    }

    fn read_after(
        &self,
        after: Option<Position>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<(Position, EventRecord)>, FateError>> {
        // Positions in the local copy: no callbacks run in broker mode.
        self.inner.local.read_after(after, limit)
    }

    fn written(&self) -> watch::Receiver<Option<Position>> {
        self.inner.local.written()
    }

    fn cursor(&self) -> Option<CallbackCursor> {
        None
    }

    fn save_cursor(&self, _cursor: Option<CallbackCursor>) -> BoxFuture<'_, Result<(), FateError>> {
        async { Ok(()) }.boxed()
    }

    fn durable(&self) -> Option<Durable> {
        Some(self.inner.durable.clone())
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        async move {
            let inner = &self.inner;
            inner.closed.store(true, Ordering::Release);
            // Dropping the sender ends the publisher once it drained.
            inner.tx.lock().take();
            let publisher = inner.publisher.lock().take();
            if let Some(mut p) = publisher {
                if tokio::time::timeout(CLOSE_WAIT, &mut p).await.is_err() {
                    inner.give_up.cancel();
                    let _ = p.await;
                }
            }
            inner.stop.cancel();
            inner.local.close().await;
        }
        .boxed()
    }
}

/// Declares the stream with the retention. An existing one with other
/// arguments is used as it is (and that is logged).
async fn declare_record_stream(
    conn: &Connection,
    name: &str,
    opts: &StoreOptions,
) -> Result<(), BrokerError> {
    let max_bytes = i64::try_from(opts.max_bytes).unwrap_or(i64::MAX);
    let segment = (max_bytes / 16).clamp(64 << 10, 500_000_000);
    let args = [
        (
            "x-max-age",
            AMQPValue::LongString(LongString::from(format!(
                "{}s",
                opts.retention.as_secs().max(1)
            ))),
        ),
        ("x-max-length-bytes", AMQPValue::LongLongInt(max_bytes)),
        (
            "x-stream-max-segment-size-bytes",
            AMQPValue::LongLongInt(segment),
        ),
    ];
    let ch = declare_stream(
        conn,
        name,
        &args,
        "the event record stream",
        " (records.retention or records.max_bytes changed?)",
    )
    .await?;
    let _ = ch.close(200, ShortString::from("done")).await;
    Ok(())
}

/// Declares `[callbacks] exchange` (topic, durable). An existing one of
/// another kind is used as it is.
async fn declare_exchange(conn: &Connection, name: &str) -> Result<(), BrokerError> {
    let ch = conn.create_channel().await?;
    let declared = ch
        .exchange_declare(
            ShortString::from(name),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    let ch = match declared {
        Ok(()) => ch,
        Err(e) => {
            tracing::warn!(error = %e, exchange = name, "callbacks.exchange exists with other arguments; using it as it is");
            let ch = conn.create_channel().await?;
            ch.exchange_declare(
                ShortString::from(name),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    passive: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
            ch
        }
    };
    let _ = ch.close(200, ShortString::from("done")).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use secrecy::SecretString;

    use super::*;
    use crate::domain::Source;
    use crate::fate::{ItemOutcome, Settled};
    use crate::rules::{default_rules, RuleChannels, Rules};

    fn book() -> Arc<RulesBook> {
        RulesBook::new(Arc::new(Rules::new(
            default_rules(),
            &RuleChannels::default(),
        )))
    }

    /// A ban out of one channel, applied at `settled_ms`.
    fn record(id: &str, user: &str, settled_ms: u64) -> SettledEvent {
        SettledEvent {
            id: id.into(),
            source: Source::Amqp,
            kind: "user.banned".into(),
            accepted_at_ms: settled_ms,
            settled_at_ms: settled_ms,
            dead_lettered: false,
            rules: book().current().fingerprint(),
            body: format!(
                r#"{{"type":"user.banned","data":{{"user_id":"{user}","channels":["@TOA#_c"]}}}}"#
            )
            .into_bytes(),
            plan: None,
            outcomes: vec![(
                0,
                ItemOutcome {
                    result: Settled::Applied,
                    error_code: 0,
                    error_info: None,
                    at_unix_ms: settled_ms,
                    attempts: 1,
                },
            )],
        }
    }

    #[test]
    fn a_stream_message_carries_its_rules_and_records() {
        let mut no_follows = default_rules();
        no_follows.get_mut("user.banned").unwrap().unfollow = false;
        let theirs = Rules::new(no_follows, &RuleChannels::default());
        let records: Vec<Arc<SettledEvent>> = (0..3)
            .map(|i| {
                let mut r = record(&format!("e{i}"), "alice", 1_000 + i);
                r.rules = theirs.fingerprint();
                Arc::new(r)
            })
            .collect();
        let msg = stream_message(&theirs.snapshot(), &records);
        // A replica with other rules learns theirs from the message.
        let mine = book();
        assert!(mine.get(theirs.fingerprint()).is_none());
        let back = read_stream_message(&msg, &mine).unwrap();
        assert_eq!(
            back,
            records.iter().map(|r| (**r).clone()).collect::<Vec<_>>()
        );
        assert!(mine.get(theirs.fingerprint()).is_some());
        assert_eq!(back[2].record(&mine).unwrap().actions.len(), 1);
        assert!(read_stream_message(&msg[..msg.len() - 1], &mine).is_none());
        assert!(read_stream_message(b"", &mine).is_none());
    }

    fn dropped(metrics: &Metrics, reason: &str) -> u64 {
        let series = format!("chat_janitor_records_dropped_total{{reason=\"{reason}\"}} ");
        metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in the metrics"))
    }

    /// A store whose broker never answers (nothing listens on port 1).
    fn unreachable(dir: &Path, retention: Duration) -> (BrokerStore, Metrics) {
        let metrics = Metrics::new(["user.banned"]);
        let link = BrokerLink::new(
            SecretString::from("amqp://guest:guest@127.0.0.1:1/%2f"),
            "cj-unit".into(),
            10,
            10,
        );
        let opts = BrokerStoreOptions {
            store: StoreOptions {
                retention,
                max_bytes: 1 << 30,
            },
            exchange: String::new(),
            callback_queue: false,
        };
        let store =
            BrokerStore::open(link, &dir.join(LOCAL_DIR), opts, metrics.clone(), book()).unwrap();
        (store, metrics)
    }

    #[tokio::test]
    async fn with_the_broker_away_put_drops_beyond_the_buffer_and_close_gives_up_in_time() {
        let dir = tempfile::tempdir().unwrap();
        // A copy left by an earlier run is a cache: deleted at start.
        std::fs::create_dir_all(dir.path().join(LOCAL_DIR)).unwrap();
        std::fs::write(dir.path().join(LOCAL_DIR).join("stale"), b"x").unwrap();
        let (store, metrics) = unreachable(dir.path(), Duration::from_secs(3600));
        assert!(!dir.path().join(LOCAL_DIR).join("stale").exists());
        let now = unix_ms();
        let n = MAX_QUEUED + PUBLISH_GROUP + 100;
        for i in 0..n {
            store.put(record(&format!("e{i}"), "alice", now));
        }
        let full = dropped(&metrics, "queue_full");
        assert!(
            (100..=(PUBLISH_GROUP + 100) as u64).contains(&full),
            "{full} dropped for a full buffer"
        );
        // Not published yet, yet answered by the replica that settled it,
        // without asking the broker.
        assert_eq!(
            store.get("e0").await.unwrap().map(|r| r.id),
            Some("e0".to_owned())
        );
        assert!(store.absent().may_be_queued);
        // The broker never comes: shutdown gives up after CLOSE_WAIT and
        // counts every record it could not publish.
        tokio::time::timeout(CLOSE_WAIT + Duration::from_secs(20), store.close())
            .await
            .expect("close gives up on a broker that is away");
        assert_eq!(dropped(&metrics, "shutdown") + full, n as u64);
        store.put(record("late", "alice", now));
        assert_eq!(dropped(&metrics, "shutdown") + full, n as u64 + 1);
    }

    #[tokio::test]
    async fn a_record_past_the_retention_is_never_answered() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = unreachable(dir.path(), Duration::from_secs(60));
        let now = unix_ms();
        assert!(store.fresh_at(record("new", "u", now - 59_000).settled_at_ms));
        assert!(!store.fresh_at(record("old", "u", now - 61_000).settled_at_ms));
        store.inner.stop.cancel();
    }
}
