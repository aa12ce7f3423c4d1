//! Broker mode's sweep log: the RabbitMQ stream `<queue>.sweeps`, where
//! every replica reads what became of a sweep, whichever replica took it
//! and whatever restarted since. RabbitMQ stays the only stateful
//! dependency.
//!
//! - **Records.** Each message is a record about one sweep, its kind in the
//!   header [`RECORD_HEADER`] and its body opaque bytes the sweep module
//!   writes: `created` (a new sweep, queued), `checkpoint` (where it stands,
//!   enough to resume it), `finished` (the last checkpoint) and `progress`
//!   (live counts between checkpoints). A `cursor` record carries nothing
//!   but a token (see `sync`).
//! - **Ids are offsets.** A sweep's id is the stream offset of its
//!   `created` record, plus one. RabbitMQ hands out a stream's offsets in
//!   order and never hands one out twice (retention drops old segments, the
//!   numbering goes on), so ids never repeat across restarts and replicas
//!   for the life of the stream, with no counter of ours to keep. The
//!   replica that publishes the record learns its offset from its own
//!   reader, which sees it come by (matched on a token header).
//! - **Every replica reads the whole log**, from the first time it is asked
//!   about a sweep. A reader of its own (a connection without automatic
//!   recovery; on loss it reconnects and carries on from the next offset)
//!   folds the records into the latest checkpoint and progress of each
//!   sweep: the running ones and the newest finished ones. So `GET`
//!   answers from memory, on any replica, and after a restart (the reader
//!   starts from the first offset).
//! - **Read your own writes.** A reader may lag behind a record another
//!   replica confirmed a moment ago. [`SweepLog::sync`] appends a cursor
//!   and waits until the reader passed it: everything published before is
//!   folded by then. A `GET` for an unknown id, and the active dispatcher
//!   before it runs a sweep, sync first.
//! - **Retention.** At most [`LOG_MAX_BYTES`], in segments of
//!   [`SEGMENT_BYTES`] (so whole old segments go, not the log). Deny lists
//!   are not in the log (they travel in the sweep command on the work
//!   queue); a record is a status with up to 1,000 accounts found, or a
//!   checkpoint with the accounts found so far.
//!
//! Deleting the stream starts offsets, and so sweep ids, from 0 again: like
//! deleting the embedded journal, it forgets every sweep.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, LongString, ShortString};
use lapin::{BasicProperties, Connection};
use parking_lot::Mutex;
use tokio::sync::{oneshot, OnceCell};
use tokio_util::sync::CancellationToken;

use super::broker::{declare_stream, table, BrokerError, BrokerLink};
use super::dead_letters::{header, header_str, stream_offset};

/// Set on a work-queue message that is a sweep command: the sweep's id.
pub const SWEEP_COMMAND_HEADER: &str = "x-chat-janitor-sweep";
/// A record's kind.
const RECORD_HEADER: &str = "x-chat-janitor-sweep-record";
/// The sweep a record is about (all but `created` and `cursor`).
const ID_HEADER: &str = "x-chat-janitor-sweep-id";
/// A token the publisher waits to see come by.
const TOKEN_HEADER: &str = "x-chat-janitor-sweep-token";
/// Retention of the log, in bytes.
pub const LOG_MAX_BYTES: i64 = 100_000_000;
/// Segment size: retention drops whole segments.
pub const SEGMENT_BYTES: i64 = 8_000_000;
/// Deliveries in flight while reading (streams require a prefetch).
const PREFETCH: u16 = 500;
/// Longest a publisher waits for the reader to see its record.
const SEEN_WAIT: Duration = Duration::from_secs(10);
/// Most sweeps kept that never finished (their replica died before it
/// queued the command, or the command was dead-lettered).
const MAX_UNFINISHED: usize = 10_000;
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The sweep log of a work queue.
pub fn sweep_log_name(queue: &str) -> String {
    format!("{queue}.sweeps")
}

/// What a record about a known sweep says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// Where the sweep stands, enough to resume it.
    Checkpoint,
    /// Its last checkpoint: done or failed.
    Finished,
    /// Live counts between checkpoints.
    Progress,
}

impl Record {
    fn as_str(self) -> &'static str {
        match self {
            Record::Checkpoint => "checkpoint",
            Record::Finished => "finished",
            Record::Progress => "progress",
        }
    }
}

/// What the log holds about one sweep: the latest of each kind of record,
/// with its offset (a later offset is newer).
#[derive(Debug, Clone, Default)]
pub struct Logged {
    /// The latest checkpoint (at first the `created` record).
    pub checkpoint: Option<(u64, Arc<[u8]>)>,
    pub progress: Option<(u64, Arc<[u8]>)>,
    pub finished: bool,
}

/// The records read so far, folded per sweep.
#[derive(Default)]
struct Folded {
    sweeps: BTreeMap<u64, Logged>,
    /// How many of `sweeps` are finished.
    finished: usize,
    keep_finished: usize,
    /// The next offset to read.
    next: Option<u64>,
    /// Publishers waiting for their record's offset, by token.
    waiting: HashMap<String, oneshot::Sender<u64>>,
}

impl Folded {
    fn fold(
        &mut self,
        offset: u64,
        kind: Option<&str>,
        id: Option<u64>,
        token: Option<String>,
        body: Vec<u8>,
    ) {
        if self.next.is_some_and(|n| offset < n) {
            return; // read before a reconnect
        }
        self.next = Some(offset + 1);
        let body: Arc<[u8]> = body.into();
        match (kind, id) {
            (Some("created"), _) => {
                self.sweeps.entry(offset + 1).or_default().checkpoint = Some((offset, body));
            }
            (Some(k @ ("checkpoint" | "finished")), Some(id)) => {
                let e = self.sweeps.entry(id).or_default();
                e.checkpoint = Some((offset, body));
                if k == "finished" && !e.finished {
                    e.finished = true;
                    self.finished += 1;
                }
            }
            (Some("progress"), Some(id)) => {
                self.sweeps.entry(id).or_default().progress = Some((offset, body));
            }
            // A cursor, or a record this version does not know.
            _ => {}
        }
        if let Some(tx) = token.and_then(|t| self.waiting.remove(&t)) {
            let _ = tx.send(offset);
        }
        self.evict();
    }

    /// Keeps the newest `keep_finished` finished sweeps and the newest
    /// `MAX_UNFINISHED` others.
    fn evict(&mut self) {
        while self.finished > self.keep_finished {
            let Some(id) = self.oldest(true) else { break };
            self.sweeps.remove(&id);
            self.finished -= 1;
        }
        while self.sweeps.len() - self.finished > MAX_UNFINISHED {
            let Some(id) = self.oldest(false) else { break };
            self.sweeps.remove(&id);
        }
    }

    fn oldest(&self, finished: bool) -> Option<u64> {
        self.sweeps
            .iter()
            .find(|(_, l)| l.finished == finished)
            .map(|(id, _)| *id)
    }
}

/// The sweep log: publishes records and commands, and reads the log back.
pub struct SweepLog {
    link: Arc<BrokerLink>,
    name: String,
    declared: OnceCell<()>,
    folded: Mutex<Folded>,
    /// Set once the reader runs.
    reading: OnceLock<()>,
    stop: CancellationToken,
}

impl SweepLog {
    /// The log of the link's queue, keeping the newest `keep_finished`
    /// finished sweeps. Nothing is declared or read until a sweep is first
    /// asked about (a replica that never sees one costs the broker
    /// nothing); the reader then runs until `stop` fires.
    pub fn new(
        link: Arc<BrokerLink>,
        keep_finished: usize,
        stop: CancellationToken,
    ) -> Arc<SweepLog> {
        Arc::new(SweepLog {
            name: sweep_log_name(&link.queue),
            link,
            declared: OnceCell::new(),
            folded: Mutex::new(Folded {
                keep_finished,
                ..Folded::default()
            }),
            reading: OnceLock::new(),
            stop,
        })
    }

    /// Starts the reader, once.
    fn read_on(self: &Arc<Self>) {
        self.reading.get_or_init(|| {
            tokio::spawn(self.clone().read(self.stop.clone()));
        });
    }

    /// What the log says about sweep `id`, as far as it was read.
    pub fn get(self: &Arc<Self>, id: u64) -> Option<Logged> {
        self.read_on();
        self.folded.lock().sweeps.get(&id).cloned()
    }

    /// Publishes a new sweep's first record (confirmed); its id.
    pub async fn create(self: &Arc<Self>, record: &[u8]) -> Result<u64, BrokerError> {
        Ok(self.publish_seen("created", record).await? + 1)
    }

    /// Publishes a record about sweep `id` (confirmed).
    pub async fn save(&self, id: u64, kind: Record, record: &[u8]) -> Result<(), BrokerError> {
        self.ensure_declared().await?;
        let props = BasicProperties::default()
            .with_content_type(ShortString::from("application/json"))
            .with_headers(table(&[
                (
                    RECORD_HEADER,
                    AMQPValue::LongString(LongString::from(kind.as_str())),
                ),
                (
                    ID_HEADER,
                    AMQPValue::LongLongInt(i64::try_from(id).unwrap_or(i64::MAX)),
                ),
            ]));
        self.link.publish("", &self.name, record, props).await
    }

    /// Returns once everything published to the log before the call has
    /// been read.
    pub async fn sync(self: &Arc<Self>) -> Result<(), BrokerError> {
        self.publish_seen("cursor", b"").await.map(|_| ())
    }

    /// Puts sweep `id`'s command on the work queue (confirmed), for the
    /// active dispatcher's consumer.
    pub async fn enqueue(&self, id: u64, command: &[u8]) -> Result<(), BrokerError> {
        let props = BasicProperties::default()
            .with_message_id(ShortString::from(format!("sweep-{id}")))
            .with_content_type(ShortString::from("application/json"))
            .with_headers(table(&[(
                SWEEP_COMMAND_HEADER,
                AMQPValue::LongLongInt(i64::try_from(id).unwrap_or(i64::MAX)),
            )]));
        self.link
            .publish("", &self.link.queue, command, props)
            .await
    }

    /// Publishes a record of `kind` with a fresh token and waits until the
    /// reader sees it; its offset.
    async fn publish_seen(self: &Arc<Self>, kind: &str, body: &[u8]) -> Result<u64, BrokerError> {
        self.read_on();
        self.ensure_declared().await?;
        let token = format!("{:032x}", rand::random::<u128>());
        let (tx, rx) = oneshot::channel();
        self.folded.lock().waiting.insert(token.clone(), tx);
        let props = BasicProperties::default().with_headers(table(&[
            (RECORD_HEADER, AMQPValue::LongString(LongString::from(kind))),
            (
                TOKEN_HEADER,
                AMQPValue::LongString(LongString::from(token.as_str())),
            ),
        ]));
        let seen = match self.link.publish("", &self.name, body, props).await {
            Ok(()) => tokio::time::timeout(SEEN_WAIT, rx)
                .await
                .ok()
                .and_then(Result::ok),
            Err(e) => {
                self.folded.lock().waiting.remove(&token);
                return Err(e);
            }
        };
        self.folded.lock().waiting.remove(&token);
        seen.ok_or(BrokerError::Refused(
            "the sweep log was not read back in time",
        ))
    }

    async fn ensure_declared(&self) -> Result<(), BrokerError> {
        self.declared
            .get_or_try_init(|| async {
                let conn = self.link.connection().await?;
                declare(&conn, &self.name).await
            })
            .await
            .map(|_| ())
    }

    /// The reader: one connection at a time, reconnecting with backoff.
    async fn read(self: Arc<Self>, stop: CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let r = tokio::select! {
                r = self.read_once(&mut backoff) => r,
                _ = stop.cancelled() => return,
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, log = %self.name, "sweep log reader lost; reconnecting");
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Reads from the next offset (the first, at start) until the
    /// connection is lost.
    async fn read_once(&self, backoff: &mut Duration) -> Result<(), BrokerError> {
        let conn = self.link.dedicated_connection("sweep log").await?;
        declare(&conn, &self.name).await?;
        let ch = conn.create_channel().await?;
        ch.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
        let next = self.folded.lock().next;
        let from = match next {
            Some(n) => AMQPValue::LongLongInt(i64::try_from(n).unwrap_or(i64::MAX)),
            None => AMQPValue::LongString(LongString::from("first")),
        };
        let mut consumer = ch
            .basic_consume(
                ShortString::from(self.name.as_str()),
                ShortString::from(""),
                BasicConsumeOptions::default(),
                table(&[("x-stream-offset", from)]),
            )
            .await?;
        *backoff = BACKOFF_MIN;
        let mut first = true;
        while let Some(d) = consumer.next().await {
            let d = d?;
            // Acks only return credit; a stream removes nothing.
            d.acker.ack(BasicAckOptions::default()).await?;
            let Some(offset) = stream_offset(&d) else {
                continue;
            };
            if std::mem::take(&mut first) && next.is_some_and(|n| offset < n) {
                // Asked for `n` and given less: the log was deleted and
                // declared anew. Read it again from its start.
                tracing::warn!(log = %self.name, "the sweep log starts over; reading it again");
                let mut f = self.folded.lock();
                let waiting = std::mem::take(&mut f.waiting);
                *f = Folded {
                    keep_finished: f.keep_finished,
                    waiting,
                    ..Folded::default()
                };
                return Err(BrokerError::Refused("the sweep log was declared anew"));
            }
            let kind = header_str(&d, RECORD_HEADER);
            let id = match header(&d, ID_HEADER) {
                Some(AMQPValue::LongLongInt(n)) => u64::try_from(*n).ok(),
                Some(AMQPValue::LongInt(n)) => u64::try_from(*n).ok(),
                Some(AMQPValue::LongUInt(n)) => Some(u64::from(*n)),
                _ => None,
            };
            let token = header_str(&d, TOKEN_HEADER);
            self.folded
                .lock()
                .fold(offset, kind.as_deref(), id, token, d.data);
        }
        Err(BrokerError::Refused(
            "the broker cancelled the sweep log reader",
        ))
    }
}

/// Declares the log (a stream). An existing one with other arguments is
/// used as it is.
async fn declare(conn: &Connection, name: &str) -> Result<(), BrokerError> {
    let args = [
        ("x-max-length-bytes", AMQPValue::LongLongInt(LOG_MAX_BYTES)),
        (
            "x-stream-max-segment-size-bytes",
            AMQPValue::LongLongInt(SEGMENT_BYTES),
        ),
    ];
    let ch = declare_stream(conn, name, &args, "sweep log", "").await?;
    let _ = ch.close(200, ShortString::from("done")).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folded(keep: usize) -> Folded {
        Folded {
            keep_finished: keep,
            ..Folded::default()
        }
    }

    fn body(l: &Option<(u64, Arc<[u8]>)>) -> Option<(u64, &[u8])> {
        l.as_ref().map(|(o, b)| (*o, &b[..]))
    }

    #[test]
    fn records_fold_into_the_latest_of_each_kind_per_sweep() {
        let mut f = folded(10);
        f.fold(0, Some("cursor"), None, None, vec![]);
        f.fold(1, Some("created"), None, None, b"q".to_vec());
        f.fold(2, Some("created"), None, None, b"q2".to_vec());
        f.fold(3, Some("checkpoint"), Some(2), None, b"c1".to_vec());
        f.fold(4, Some("progress"), Some(2), None, b"p1".to_vec());
        f.fold(5, Some("progress"), Some(2), None, b"p2".to_vec());
        let s = &f.sweeps[&2];
        assert_eq!(body(&s.checkpoint), Some((3, &b"c1"[..])));
        assert_eq!(body(&s.progress), Some((5, &b"p2"[..])));
        assert!(!s.finished);
        // Sweep 3 was created at offset 2 and has no other record yet.
        assert_eq!(body(&f.sweeps[&3].checkpoint), Some((2, &b"q2"[..])));
        f.fold(6, Some("finished"), Some(2), None, b"done".to_vec());
        assert!(f.sweeps[&2].finished);
        assert_eq!(f.finished, 1);
        // Read again after a reconnect: ignored.
        f.fold(3, Some("checkpoint"), Some(2), None, b"c1".to_vec());
        assert_eq!(body(&f.sweeps[&2].checkpoint), Some((6, &b"done"[..])));
        assert_eq!(f.next, Some(7));
    }

    #[test]
    fn a_token_tells_its_publisher_the_offset() {
        let mut f = folded(10);
        let (tx, mut rx) = oneshot::channel();
        f.waiting.insert("t".into(), tx);
        f.fold(41, Some("created"), None, Some("other".into()), vec![]);
        assert!(rx.try_recv().is_err());
        f.fold(42, Some("created"), None, Some("t".into()), vec![]);
        assert_eq!(rx.try_recv().unwrap(), 42);
        assert!(f.waiting.is_empty());
    }

    #[test]
    fn only_the_newest_finished_sweeps_are_kept() {
        let mut f = folded(2);
        for i in 0..5u64 {
            f.fold(2 * i, Some("created"), None, None, vec![]);
        }
        // Sweeps 1, 3, 5, 7, 9; all but 5 finish.
        for (n, id) in [1u64, 3, 7, 9].into_iter().enumerate() {
            f.fold(10 + n as u64, Some("finished"), Some(id), None, vec![]);
        }
        let kept: Vec<u64> = f.sweeps.keys().copied().collect();
        assert_eq!(
            kept,
            [5, 7, 9],
            "the running one and the newest two finished"
        );
        assert_eq!(f.finished, 2);
    }
}
