//! Embedded mode's `Inbox`: the journal. Deliveries are its live records
//! read in log order (woken by each commit); settling marks a record
//! settled; a dead letter is stored in the journal with the event, which
//! the writer reads from the record itself (the pipeline holds no bodies).

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

use super::journal::{Appended, Entry as LogEntry, Journal, JournalHealth, Loc, LogReader, Record};
use super::{Content, Delivery, Inbox, InboxFuture, Settle, Stored};
use crate::domain::clock::instant_of;
use crate::domain::{DeadLetter, DeadLetterSink, HeldEvent, Source};
use crate::telemetry::Metrics;

/// Entries read from the journal at a time.
const READ_AHEAD: usize = 256;

impl DeadLetterSink for Journal {
    fn record(&self, dl: DeadLetter) {
        self.dead_letter(dl);
    }
}

/// A journal record's settle handle.
struct Entry {
    journal: Journal,
    at: Loc,
}

impl Settle for Entry {
    fn settled(self: Box<Self>) {
        self.journal.settle(self.at.seq);
    }

    fn dead_lettered(self: Box<Self>, mut dl: DeadLetter, _body: Vec<u8>) {
        // Ordered before the settle by the journal's single writer; the
        // event is filled in from the record.
        dl.event = serde_json::Value::Null;
        self.journal.dead_letter_for(self.at, dl);
        self.journal.settle(self.at.seq);
    }

    fn event(&self) -> Option<HeldEvent> {
        let (id, body) = self.journal.read_event(self.at)?;
        Some(HeldEvent {
            id,
            source: Source::Webhook,
            body,
        })
    }

    fn action_dead_lettered(&self, dl: DeadLetter) {
        // The event is read from this very entry, which stays until the
        // settle that the writer orders after this.
        self.journal.dead_letter_for(self.at, dl);
    }
}

fn delivery(journal: &Journal, entry: LogEntry) -> Delivery {
    let LogEntry { loc, record } = entry;
    let (id, received, content) = match record {
        Record::Event {
            id,
            received_unix_ms,
            body,
        } => (id, received_unix_ms, Content::Event(body)),
        Record::Replay {
            received_unix_ms,
            dead_letter,
        } => (
            dead_letter.event_id,
            received_unix_ms,
            Content::Replay {
                event_type: dead_letter.event_type,
                event: serde_json::to_vec(&dead_letter.event).unwrap_or_default(),
                action: dead_letter.action,
            },
        ),
    };
    Delivery {
        id,
        source: Source::Webhook,
        count_received: false,
        accepted_at: instant_of(received),
        content,
        receipt: Box::new(Entry {
            journal: journal.clone(),
            at: loc,
        }),
    }
}

/// Where the reader is, and records read but not yet handed on.
struct Reader {
    journal: Journal,
    log: LogReader,
    buffer: VecDeque<LogEntry>,
    stop: CancellationToken,
}

impl Reader {
    async fn next(&mut self) -> Option<Delivery> {
        loop {
            if let Some(entry) = self.buffer.pop_front() {
                return Some(delivery(&self.journal, entry));
            }
            let read = tokio::select! {
                r = self.log.next_batch(READ_AHEAD) => r,
                _ = self.stop.cancelled() => return None,
            };
            match read {
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the journal; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = self.stop.cancelled() => return None,
                    }
                }
                Ok(entries) if entries.is_empty() => {
                    tokio::select! {
                        _ = self.journal.committed() => {}
                        _ = self.stop.cancelled() => return None,
                    }
                }
                Ok(entries) => self.buffer.extend(entries),
            }
        }
    }
}

impl Inbox for Journal {
    fn store<'a>(&'a self, id: &'a str, body: Vec<u8>) -> InboxFuture<'a, Stored> {
        async move {
            Ok(match self.append(id, body).await? {
                Appended::New(_) => Stored::New,
                Appended::Duplicate => Stored::Duplicate,
            })
        }
        .boxed()
    }

    fn deliveries(&self, stop: CancellationToken) -> BoxStream<'static, Delivery> {
        let reader = Reader {
            journal: self.clone(),
            log: self.reader(),
            buffer: VecDeque::new(),
            stop,
        };
        futures_util::stream::unfold(reader, |mut r| async move {
            let d = r.next().await?;
            Some((d, r))
        })
        .boxed()
    }

    fn dead_letters(&self, limit: usize) -> InboxFuture<'_, Vec<serde_json::Value>> {
        async move {
            let list = Journal::dead_letters(self, limit).await?;
            Ok(list
                .into_iter()
                .map(|d| serde_json::to_value(d).unwrap_or_default())
                .collect())
        }
        .boxed()
    }

    fn replay(&self, ids: Option<Vec<u64>>) -> InboxFuture<'_, usize> {
        async move { Ok(self.replay_dead_letters(ids).await?) }.boxed()
    }

    fn not_ready(&self) -> Option<String> {
        match self.health() {
            JournalHealth::Ok => None,
            JournalHealth::Failing(r) | JournalHealth::Broken(r) => Some(format!("journal: {r}")),
        }
    }

    fn broken(&self) -> Option<String> {
        match self.health() {
            JournalHealth::Broken(r) => Some(format!("journal: {r}")),
            _ => None,
        }
    }

    fn holds_unsettled(&self) -> bool {
        self.pending() > 0
    }

    fn observe(&self, metrics: &Metrics) {
        metrics.set_journal_events(self.pending());
        let s = self.stats();
        metrics.set_journal_storage(s.write_errors, s.file_bytes, s.free_bytes);
    }

    fn close_intake(&self) {
        Journal::close_intake(self);
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        async move {
            if let Err(e) = self.sync().await {
                tracing::warn!(error = %e, "journal not synced at shutdown; its last settles replay on start");
            }
            self.shutdown().await;
        }
        .boxed()
    }
}
