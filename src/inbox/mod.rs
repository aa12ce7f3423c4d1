//! Where accepted events wait until they settle. Embedded mode: the redb
//! journal, fed into the pipeline by `feed`.

pub mod broker;
pub mod journal;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::dispatch::DeadLetterSink;
use crate::event::Event;
use crate::pipeline::Pipeline;
use crate::rules::Rules;
use crate::settle::EventMeta;
use crate::telemetry::Metrics;
use broker::{BrokerError, BrokerLink};
use journal::{unix_now, DeadLetter, Journal, Record};
use journal::{Appended, JournalError};

/// Where the webhook endpoint puts an accepted event.
#[derive(Clone)]
pub enum Intake {
    /// Embedded mode: fsynced to the local journal.
    Journal(Journal),
    /// Broker mode: published to RabbitMQ and confirmed.
    Broker(Arc<BrokerLink>),
}

/// Why an event could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

impl Intake {
    /// Stores an event durably; `Duplicate` if its id was accepted before.
    pub async fn accept(&self, id: &str, body: String) -> Result<Appended, IntakeError> {
        match self {
            Intake::Journal(j) => Ok(j.append(id, body).await?),
            Intake::Broker(b) => Ok(if b.publish_event(id, body.as_bytes()).await? {
                Appended::New(0)
            } else {
                Appended::Duplicate
            }),
        }
    }

    /// Why events cannot be accepted and dispatched now, if so.
    pub fn not_ready(&self) -> Option<String> {
        match self {
            Intake::Journal(_) => None,
            Intake::Broker(b) if !b.is_connected() => Some("broker unreachable".to_owned()),
            Intake::Broker(_) => None,
        }
    }

    pub fn journal(&self) -> Option<&Journal> {
        match self {
            Intake::Journal(j) => Some(j),
            Intake::Broker(_) => None,
        }
    }
}

impl DeadLetterSink for Journal {
    fn record(&self, dl: DeadLetter) {
        self.dead_letter(dl);
    }
}

/// How long ago `unix_ms` was, as an `Instant` (for settle latency).
fn instant_of(unix_ms: u64) -> Instant {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let ago = Duration::from_millis(now_ms.saturating_sub(unix_ms));
    Instant::now().checked_sub(ago).unwrap_or_else(Instant::now)
}

/// Feeds journal entries, oldest first, into the pipeline (which applies
/// backpressure), starting with whatever a previous run left unsettled.
/// Returns when `stop` fires; dropping the pipeline handle then lets the
/// coalescer flush.
pub async fn feed(
    journal: Journal,
    pipeline: Pipeline,
    rules: Arc<Rules>,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let mut cursor = 0u64;
    loop {
        metrics.set_journal_events(journal.pending());
        let entries = tokio::select! {
            r = journal.read_from(cursor, 256) => r,
            _ = stop.cancelled() => return,
        };
        let entries = match entries {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the journal; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stop.cancelled() => return,
                }
            }
        };
        if entries.is_empty() {
            tokio::select! {
                _ = journal.committed() => continue,
                _ = stop.cancelled() => return,
            }
        }
        for (seq, record) in entries {
            cursor = seq + 1;
            let settle_journal = journal.clone();
            let on_settled = move || settle_journal.settle(seq);
            let (meta, planned, received) = match record {
                Record::Event {
                    id,
                    received_unix_ms,
                    body,
                } => {
                    let planned = plan(&rules, &body);
                    let kind = planned.as_ref().map(|(k, _)| k.clone()).unwrap_or_default();
                    let meta = EventMeta {
                        id,
                        kind,
                        source: "webhook",
                        body: Arc::from(body.into_bytes()),
                    };
                    (meta, planned.map(|(_, a)| a), received_unix_ms)
                }
                Record::Replay {
                    received_unix_ms,
                    dead_letter,
                } => {
                    let body = serde_json::to_vec(&dead_letter.event).unwrap_or_default();
                    let planned = match dead_letter.action {
                        Some(a) => Ok(vec![a]),
                        None => plan(&rules, &String::from_utf8_lossy(&body)).map(|(_, a)| a),
                    };
                    let meta = EventMeta {
                        id: dead_letter.event_id,
                        kind: dead_letter.event_type,
                        source: "webhook",
                        body: Arc::from(body),
                    };
                    (meta, planned, received_unix_ms)
                }
            };
            let actions = match planned {
                Ok(a) => a,
                Err(problem) => {
                    // Accepted under other rules (the config changed since):
                    // kept as a dead letter, never dropped.
                    tracing::warn!(seq, %problem, "journaled event no longer maps to actions");
                    metrics.dead_lettered("unknown_type", 1);
                    journal.dead_letter(DeadLetter {
                        id: 0,
                        event_id: meta.id.clone(),
                        event_type: meta.kind.clone(),
                        action: None,
                        reason: "unknown_type".into(),
                        detail: problem,
                        at_unix: unix_now(),
                        event: serde_json::from_slice(&meta.body)
                            .unwrap_or(serde_json::Value::Null),
                    });
                    journal.settle(seq);
                    continue;
                }
            };
            if pipeline
                .submit(meta, actions, instant_of(received), on_settled)
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

/// The event type and actions for a stored body.
fn plan(rules: &Rules, body: &str) -> Result<(String, Vec<crate::rules::Action>), String> {
    let ev = Event::parse(body.as_bytes()).map_err(|e| e.to_string())?;
    let actions = rules.plan(&ev).map_err(|e| e.to_string())?;
    Ok((ev.kind, actions))
}
