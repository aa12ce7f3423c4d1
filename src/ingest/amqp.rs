//! The RabbitMQ consumer: producers publish the same JSON document as the
//! webhook body, the event id in `message_id`. A delivery is acked only once
//! every action it produced has settled; one that cannot be parsed or maps
//! to no rule is rejected without requeue (to the dead-letter queue). The
//! consumer survives broker restarts: lapin recovers the connection and its
//! topology; if recovery gives up, this loop reconnects on its own.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::{FieldTable, ShortString};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::event::Event;
use crate::inbox::broker::{BrokerDeadLetters, BrokerLink};
use crate::pipeline::Pipeline;
use crate::resolve::{PlanError, Planner};
use crate::rules::{Action, RuleError};
use crate::settle::EventMeta;
use crate::telemetry::Metrics;

/// Deliveries planned ahead of the one entering the pipeline.
const PLAN_AHEAD: usize = 32;

/// A delivery with its id and plan.
struct Prepared {
    delivery: Delivery,
    id: String,
    planned: Result<(Event, Vec<Action>), (&'static str, String)>,
    received: Instant,
}

/// Everything the consumer needs.
pub struct Consumer {
    pub link: Arc<BrokerLink>,
    pub pipeline: Pipeline,
    pub planner: Arc<Planner>,
    pub metrics: Metrics,
    pub dead: Arc<BrokerDeadLetters>,
    /// The ack tasks, so shutdown can wait for them before closing.
    pub acks: tokio_util::task::TaskTracker,
}

impl Consumer {
    /// Consumes until `stop` fires. Deliveries already taken keep settling
    /// (and are acked) while the pipeline drains afterwards.
    pub async fn run(self, stop: CancellationToken) {
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

    /// One connection's worth of consuming: `Ok` when stopped, `Err` when
    /// the connection is gone for good.
    async fn consume_once(&self, stop: &CancellationToken) -> Result<(), lapin::Error> {
        let conn = tokio::select! {
            c = self.link.connection() => c.map_err(|e| match e {
                crate::inbox::broker::BrokerError::Amqp(e) => e,
                other => lapin::Error::from(std::io::Error::other(other.to_string())),
            })?,
            _ = stop.cancelled() => return Ok(()),
        };
        let channel = conn.create_channel().await?;
        channel
            .basic_qos(self.link.prefetch, BasicQosOptions::default())
            .await?;
        let tag = format!("chat-janitor-{}", std::process::id());
        let consumer = channel
            .basic_consume(
                ShortString::from(self.link.queue.as_str()),
                ShortString::from(tag.as_str()),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tracing::info!(queue = %self.link.queue, prefetch = self.link.prefetch, "consuming");
        // Deliveries are planned (and resolved upstream, where a rule asks)
        // a few at a time, and enter the pipeline in delivery order.
        let mut prepared = consumer
            .map(|d| async move {
                match d {
                    Ok(d) => Ok(self.prepare(d).await),
                    Err(e) => Err(e),
                }
            })
            .buffered(PLAN_AHEAD);
        loop {
            let next = tokio::select! {
                n = prepared.next() => n,
                _ = stop.cancelled() => {
                    let _ = channel
                        .basic_cancel(ShortString::from(tag.as_str()), BasicCancelOptions::default())
                        .await;
                    return Ok(());
                }
            };
            match next {
                Some(Ok(p)) => {
                    if !self.handle(p, stop).await {
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

    /// Parses and plans one delivery.
    async fn prepare(&self, delivery: Delivery) -> Prepared {
        let received = Instant::now();
        let id = match delivery.properties.message_id() {
            Some(id) if !id.as_str().is_empty() => id.as_str().to_owned(),
            // No id from the producer: the body's hash, so a redelivery of
            // the same message keeps the same id.
            _ => format!("sha256:{:x}", Sha256::digest(&delivery.data)),
        };
        let planned = match Event::parse(&delivery.data) {
            Err(e) => Err(("malformed", e.to_string())),
            Ok(ev) => match self.planner.plan(ev).await {
                Ok(p) => Ok(p),
                Err(PlanError::Rule(RuleError::UnknownType(t))) => {
                    Err(("unknown_type", format!("no rule for event type {t:?}")))
                }
                Err(PlanError::Rule(RuleError::Field(p))) => Err(("malformed", p.to_string())),
                Err(e @ PlanError::Resolution { .. }) => Err(("resolution_failed", e.to_string())),
                Err(PlanError::Stopped) => Err(("stopped", String::new())),
            },
        };
        Prepared {
            delivery,
            id,
            planned,
            received,
        }
    }

    /// Puts one planned delivery to work; `false` if the pipeline is gone.
    async fn handle(&self, p: Prepared, stop: &CancellationToken) -> bool {
        let m = &self.metrics;
        let Prepared {
            delivery,
            id,
            planned,
            received,
        } = p;
        let (event, actions) = match planned {
            Ok(p) => p,
            // Shutting down mid-resolution: not acked, so redelivered.
            Err(("stopped", _)) => return false,
            Err((reason, problem)) => {
                if reason == "resolution_failed" {
                    m.dead_lettered(reason, 1);
                } else {
                    m.event_rejected("amqp", reason);
                }
                tracing::warn!(message_id = %id, reason, %problem, "message rejected to the dead-letter queue");
                let _ = delivery
                    .acker
                    .reject(BasicRejectOptions { requeue: false })
                    .await;
                return true;
            }
        };
        m.event_received("amqp", &event.kind);
        let meta = EventMeta {
            id,
            kind: event.kind.clone(),
            source: "amqp",
            body: Arc::from(event.to_json()),
        };
        let acker = delivery.acker;
        let dead = self.dead.clone();
        let acks = self.acks.clone();
        let on_settled = move || {
            acks.spawn(async move {
                // Dead letters recorded for this event are confirmed first.
                dead.flushed().await;
                // After a reconnect the old channel's acker is refused
                // (Ok(false)); the broker redelivers, and the repeat is
                // idempotent upstream.
                if let Ok(false) = acker.ack(lapin::options::BasicAckOptions::default()).await {
                    tracing::debug!(
                        "ack on a stale channel skipped; the message will be redelivered"
                    );
                }
            });
        };
        let span = tracing::info_span!("event", id = %meta.id, kind = %meta.kind, source = "amqp");
        let submit = tracing::Instrument::instrument(
            self.pipeline.submit(meta, actions, received, on_settled),
            span,
        );
        tokio::select! {
            r = submit => r.is_ok(),
            _ = stop.cancelled() => false,
        }
    }
}
