//! Where accepted events wait until they settle. Embedded mode: the redb
//! journal, fed into the pipeline by `feed`.

pub mod broker;
#[doc(hidden)]
pub mod faults;
pub mod journal;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::dispatch::DeadLetterSink;
use crate::event::Event;
use crate::pipeline::Pipeline;
use crate::resolve::{PlanError, Planner};
use crate::rules::Action;
use crate::settle::EventMeta;
use crate::telemetry::Metrics;
use broker::{BrokerError, BrokerLink};
use journal::{unix_now, DeadLetter, Journal, Record};
use journal::{Appended, JournalError, JournalHealth};

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
    pub async fn accept(
        &self,
        id: &str,
        body: Box<serde_json::value::RawValue>,
    ) -> Result<Appended, IntakeError> {
        match self {
            Intake::Journal(j) => Ok(j.append(id, body).await?),
            Intake::Broker(b) => Ok(if b.publish_event(id, body.get().as_bytes()).await? {
                Appended::New(0)
            } else {
                Appended::Duplicate
            }),
        }
    }

    /// Why events cannot be accepted and dispatched now, if so.
    pub fn not_ready(&self) -> Option<String> {
        match self {
            Intake::Journal(j) => match j.health() {
                JournalHealth::Ok => None,
                JournalHealth::Failing(r) | JournalHealth::Broken(r) => {
                    Some(format!("journal: {r}"))
                }
            },
            Intake::Broker(b) if !b.is_connected() => Some("broker unreachable".to_owned()),
            Intake::Broker(_) => None,
        }
    }

    /// Why the process should be restarted, if so: a journal that cannot be
    /// reopened.
    pub fn broken(&self) -> Option<String> {
        match self {
            Intake::Journal(j) => match j.health() {
                JournalHealth::Broken(r) => Some(format!("journal: {r}")),
                _ => None,
            },
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

/// How many events are planned (and resolved upstream, where a rule asks)
/// at once; they still enter the pipeline in journal order.
const PLAN_AHEAD: usize = 32;

/// Feeds journal entries, oldest first, into the pipeline (which applies
/// backpressure), starting with whatever a previous run left unsettled.
/// Returns when `stop` fires; dropping the pipeline handle then lets the
/// coalescer flush.
pub async fn feed(
    journal: Journal,
    pipeline: Pipeline,
    planner: Arc<Planner>,
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
        if let Some((last, _)) = entries.last() {
            cursor = last + 1;
        }
        let planner = &planner;
        let mut prepared = futures_util::stream::iter(entries)
            .map(|(seq, record)| async move { (seq, prepare(planner, record).await) })
            .buffered(PLAN_AHEAD);
        loop {
            let next = tokio::select! {
                n = prepared.next() => n,
                _ = stop.cancelled() => return,
            };
            let Some((seq, (meta, planned, received))) = next else {
                break;
            };
            let actions = match planned {
                Ok(a) => a,
                Err(PlanError::Stopped) => return,
                Err(problem) => {
                    // Accepted under other rules (the config changed since),
                    // or its targets could not be resolved: kept as a dead
                    // letter, never dropped.
                    let reason = match problem {
                        PlanError::Resolution { .. } => "resolution_failed",
                        _ => "unknown_type",
                    };
                    tracing::warn!(seq, %problem, "journaled event not turned into actions");
                    metrics.dead_lettered(reason, 1);
                    journal.dead_letter(DeadLetter {
                        id: 0,
                        event_id: meta.id.clone(),
                        event_type: meta.kind.clone(),
                        action: None,
                        reason: reason.into(),
                        detail: problem.to_string(),
                        at_unix: unix_now(),
                        event: serde_json::from_slice(&meta.body)
                            .unwrap_or(serde_json::Value::Null),
                    });
                    journal.settle(seq);
                    continue;
                }
            };
            let settle_journal = journal.clone();
            let on_settled = move || settle_journal.settle(seq);
            let span = tracing::info_span!("event", id = %meta.id, kind = %meta.kind, seq);
            if tracing::Instrument::instrument(
                pipeline.submit(meta, actions, instant_of(received), on_settled),
                span,
            )
            .await
            .is_err()
            {
                return;
            }
        }
    }
}

/// The event's meta and actions (or why there are none), and when it was
/// accepted.
async fn prepare(
    planner: &Planner,
    record: Record,
) -> (EventMeta, Result<Vec<Action>, PlanError>, u64) {
    let (id, body, action, received, kind) = match record {
        Record::Event {
            id,
            received_unix_ms,
            body,
        } => (
            id,
            body.get().as_bytes().to_vec(),
            None,
            received_unix_ms,
            String::new(),
        ),
        Record::Replay {
            received_unix_ms,
            dead_letter,
        } => (
            dead_letter.event_id,
            serde_json::to_vec(&dead_letter.event).unwrap_or_default(),
            dead_letter.action,
            received_unix_ms,
            dead_letter.event_type,
        ),
    };
    let (kind, planned) = match action {
        // A replayed action goes as it was.
        Some(a) => (kind, Ok(vec![a])),
        None => match Event::parse(&body) {
            Ok(ev) => {
                let kind = ev.kind.clone();
                (kind, planner.plan(ev).await.map(|(_, a)| a))
            }
            Err(e) => (
                kind,
                Err(PlanError::Rule(crate::rules::RuleError::Field(e))),
            ),
        },
    };
    let meta = EventMeta {
        id,
        kind,
        source: "webhook",
        body: Arc::from(body),
    };
    (meta, planned, received)
}
