//! The one intake loop, for both modes: takes deliveries from the inbox in
//! order, plans a few ahead (parsing, rules, and upstream resolution where a
//! rule asks), and submits each event's actions to the pipeline, which
//! applies backpressure. An event that cannot be planned is dead-lettered
//! through its inbox, never dropped. A sweep command (broker mode) goes to
//! the sweeps, which run it on this, the active, replica. When `stop` fires
//! the loop returns, and dropping its pipeline handle lets the coalescer
//! flush.

use std::sync::Arc;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::domain::{Action, DeadLetter, DeadLetterReason, RejectReason};
use crate::event::Event;
use crate::inbox::{Content, Delivery, Inbox};
use crate::pipeline::{Identity, Pipeline};
use crate::resolve::{PlanError, Planner};
use crate::rules::RuleError;
use crate::sweep::Sweeps;
use crate::telemetry::Metrics;

/// How many events are planned (and resolved upstream, where a rule asks)
/// at once; they still enter the pipeline in delivery order.
const PLAN_AHEAD: usize = 32;

/// An event's type and actions.
struct Plan {
    kind: String,
    actions: Vec<Action>,
    /// Whose event it is (for its record), if it says.
    user_id: Option<String>,
    /// The plan cannot be made again from the event (a replayed action, or
    /// one that read upstream): its record needs it kept.
    keep: bool,
}

/// Why an event has no actions.
struct Unplanned {
    kind: String,
    reason: DeadLetterReason,
    detail: String,
}

/// Runs until `stop` fires or the inbox ends.
pub async fn run(
    inbox: Arc<dyn Inbox>,
    pipeline: Pipeline,
    planner: Arc<Planner>,
    sweeps: Arc<Sweeps>,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let planner = &planner;
    let deliveries = inbox.deliveries(stop.clone());
    let planned = |d: Delivery| async move {
        let plan = plan(planner, &d.content).await;
        (d, plan)
    };
    // Planning ahead only pays when plans wait for upstream reads; without
    // any resolving rule each plan is ready at once, and a task per event
    // to run them side by side would be pure overhead.
    let mut prepared: futures_util::stream::BoxStream<'_, _> = if planner.resolves_any() {
        deliveries.map(planned).buffered(PLAN_AHEAD).boxed()
    } else {
        deliveries.then(planned).boxed()
    };
    loop {
        let next = tokio::select! {
            n = prepared.next() => n,
            _ = stop.cancelled() => return,
        };
        let Some((delivery, plan)) = next else {
            return;
        };
        if let Content::Sweep(command) = delivery.content {
            sweeps.accept(delivery.id, command, delivery.receipt);
            continue;
        }
        let plan = match plan {
            Ok(p) => p,
            // Shutting down mid-resolution: not settled, so it comes back.
            Err(None) => return,
            Err(Some(u)) => {
                dead_letter(&metrics, delivery, u);
                continue;
            }
        };
        if delivery.count_received {
            metrics.event_received(delivery.source, &plan.kind);
        }
        // Debug: one span per event is bookkeeping info logs do not use.
        let span = tracing::debug_span!("event", id = %delivery.id, kind = %plan.kind, source = %delivery.source);
        // The id and body stay with the inbox (the journal entry, or the
        // delivery its receipt holds): the pipeline keeps only the type.
        drop(delivery.content);
        let kept = plan.keep.then(|| plan.actions.clone());
        let identity = plan.user_id.as_deref().map(|user_id| Identity {
            id: &delivery.id,
            user_id,
            keep_plan: kept,
        });
        let submit = tracing::Instrument::instrument(
            pipeline.submit(
                &plan.kind,
                plan.actions,
                delivery.accepted_at,
                delivery.receipt,
                identity,
            ),
            span,
        );
        let submitted = tokio::select! {
            r = submit => r.is_ok(),
            _ = stop.cancelled() => false,
        };
        if !submitted {
            return;
        }
    }
}

/// An event that cannot be planned: counted (a producer's malformed or
/// unknown event as rejected at intake, a failed resolution as a dead
/// letter) and kept as a dead letter by its inbox.
fn dead_letter(metrics: &Metrics, delivery: Delivery, u: Unplanned) {
    match u.reason {
        DeadLetterReason::Malformed => {
            metrics.event_rejected(delivery.source, RejectReason::Malformed)
        }
        DeadLetterReason::UnknownType => {
            metrics.event_rejected(delivery.source, RejectReason::UnknownType)
        }
        other => metrics.dead_lettered(other, 1),
    }
    tracing::warn!(id = %delivery.id, reason = %u.reason, detail = %u.detail, "event not turned into actions");
    let body = body_of(delivery.content);
    let dl = DeadLetter::new(&delivery.id, &u.kind, &body, None, u.reason, u.detail);
    delivery.receipt.dead_lettered(dl, body);
}

/// The event document a delivery carries.
fn body_of(content: Content) -> Vec<u8> {
    match content {
        Content::Event(body) | Content::Replay { event: body, .. } | Content::Sweep(body) => body,
    }
}

/// The delivery's plan; `Err(None)` when stopped.
async fn plan(planner: &Planner, content: &Content) -> Result<Plan, Option<Unplanned>> {
    let (kind, body) = match content {
        // A replayed action goes as it was.
        Content::Replay {
            event_type,
            action: Some(a),
            event,
        } => {
            return Ok(Plan {
                kind: event_type.clone(),
                actions: vec![a.clone()],
                user_id: Event::parse(event)
                    .ok()
                    .map(|e| e.data.user_id.as_str().to_owned()),
                keep: true,
            })
        }
        Content::Replay {
            event_type, event, ..
        } => (event_type.as_str(), event),
        Content::Event(body) => ("", body),
        // Not planned: see `run`.
        Content::Sweep(_) => {
            return Ok(Plan {
                kind: String::new(),
                actions: Vec::new(),
                user_id: None,
                keep: false,
            })
        }
    };
    let event = Event::parse(body).map_err(|e| {
        Some(Unplanned {
            kind: kind.to_owned(),
            reason: DeadLetterReason::Malformed,
            detail: e.to_string(),
        })
    })?;
    let kind = event.kind.clone();
    let keep = planner.rules().rule(&kind).is_some_and(|r| r.resolve);
    match planner.plan(event).await {
        Ok((event, actions)) => Ok(Plan {
            kind,
            actions,
            user_id: Some(event.data.user_id.as_str().to_owned()),
            keep,
        }),
        Err(PlanError::Stopped) => Err(None),
        Err(e) => {
            let reason = match &e {
                PlanError::Rule(RuleError::UnknownType(_)) => DeadLetterReason::UnknownType,
                PlanError::Rule(RuleError::Field(_)) => DeadLetterReason::Malformed,
                _ => DeadLetterReason::ResolutionFailed,
            };
            Err(Some(Unplanned {
                kind,
                reason,
                detail: e.to_string(),
            }))
        }
    }
}
