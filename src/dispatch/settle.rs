//! Settling a batch's items from its call's answer: applied, noop, back to
//! the coalescer for another try, or dead-lettered with the reason (through
//! the item's event, whose inbox keeps the dead letter with the event's id
//! and body).

use std::collections::HashMap;

use tokio::sync::mpsc;

use crate::coalesce::{Batch, BatchKey, Input, Item};
use crate::domain::{Action, Api, DeadLetter, DeadLetterReason, ItemResult, UserId};
use crate::fate::Settled;
use crate::settle::ItemFate;
use crate::telemetry::Metrics;
use crate::tencent::client::{BatchOutcome, ItemOutcome};
use crate::tencent::ApiError;

pub(super) struct Settler {
    pub metrics: Metrics,
    /// Back to the coalescer, for items whose call failed for them alone.
    pub retries: mpsc::UnboundedSender<Input>,
    pub max_attempts: u32,
}

/// How a batch's call went, for its items' records: the vendor's code, and
/// how many calls the batch made (the text of a failure goes with a dead
/// letter, which has it as its detail).
#[derive(Debug, Clone, Copy)]
pub(super) struct Call {
    pub code: i64,
    /// Calls of the batch so far, this one included.
    pub calls: u32,
}

impl Call {
    pub fn ok(calls: u32) -> Call {
        Call { code: 0, calls }
    }

    /// A failed call: the vendor's code if it answered one (0 for a
    /// network fault or an HTTP status, which the dead letter's detail
    /// names).
    pub fn failed(err: &ApiError, calls: u32) -> Call {
        Call {
            code: err.vendor_code().unwrap_or(0),
            calls,
        }
    }
}

impl Settler {
    fn items(
        &self,
        api: Api,
        items: impl IntoIterator<Item = Item>,
        result: ItemResult,
        call: Call,
    ) {
        let settled = match result {
            ItemResult::Applied => Settled::Applied,
            // Dead letters come through `dead_letter_items`, with their
            // reason; nothing else reaches here but noops.
            _ => Settled::Noop,
        };
        let mut n = 0;
        for i in items {
            i.origin.settle(
                i.index,
                ItemFate {
                    settled,
                    code: call.code,
                    info: None,
                    attempts: i.attempts + call.calls,
                },
            );
            n += 1;
        }
        self.metrics.items(api, result, n);
        self.metrics.pending_add(api, -(n as i64));
    }

    /// Unsubscribes that rode on a destroy of their channel.
    fn riders(&self, riders: Vec<(UserId, Item)>, result: ItemResult, call: Call) {
        self.items(
            Api::DeleteSubscriber,
            riders.into_iter().map(|(_, i)| i),
            result,
            call,
        );
    }

    /// The call succeeded: each member as the answer says.
    pub fn outcome(&self, batch: Batch, outcome: BatchOutcome, calls: u32) {
        let api = batch.api();
        let key = batch.key().clone();
        let said: HashMap<UserId, ItemOutcome> = outcome.items.into_iter().collect();
        let parts = batch.into_parts();
        let (mut applied, mut noop) = (Vec::new(), Vec::new());
        for (user, item) in parts.members {
            match said.get(&user) {
                Some(ItemOutcome::Applied) => applied.push(item),
                Some(ItemOutcome::Noop) => noop.push(item),
                // Members the answer did not mention were turned into
                // Failed by the client; be safe anyway.
                Some(ItemOutcome::Failed) | None => self.retry_item(&key, user, item),
            }
        }
        let call = Call::ok(calls);
        self.items(api, applied, ItemResult::Applied, call);
        self.items(api, noop, ItemResult::Noop, call);
        // Whole-target work (destroy) and its riders: the call succeeded.
        self.items(api, parts.whole, ItemResult::Applied, call);
        self.riders(parts.riders, ItemResult::Noop, call);
    }

    /// Everything in the batch settles as `result` (riders as noop).
    pub fn all(&self, batch: Batch, result: ItemResult, call: Call) {
        let api = batch.api();
        let parts = batch.into_parts();
        self.items(api, parts.members.into_iter().map(|(_, i)| i), result, call);
        self.items(api, parts.whole, result, call);
        self.riders(parts.riders, ItemResult::Noop, call);
    }

    fn retry_item(&self, key: &BatchKey, user: UserId, item: Item) {
        let api = key.api();
        let attempts = item.attempts + 1;
        if attempts >= self.max_attempts {
            self.dead_letter_items(
                api,
                &key.member_action(&user),
                vec![item],
                DeadLetterReason::ItemFailed,
                "the upstream reported this item failed on every attempt",
                Call::ok(1),
            );
            return;
        }
        self.metrics.items(api, ItemResult::Retried, 1);
        let input = Input::Retry {
            key: key.clone(),
            member: user,
            item: Item { attempts, ..item },
        };
        if self.retries.send(input).is_err() {
            // Shutting down: the item stays unsettled and is replayed.
            tracing::debug!("coalescer gone; item left for replay");
        }
    }

    pub fn dead_letter_batch(
        &self,
        batch: Batch,
        reason: DeadLetterReason,
        detail: &str,
        call: Call,
    ) {
        let api = batch.api();
        let key = batch.key().clone();
        let parts = batch.into_parts();
        for (user, item) in parts.members {
            self.dead_letter_items(
                api,
                &key.member_action(&user),
                vec![item],
                reason,
                detail,
                call,
            );
        }
        if let BatchKey::Destroy(channel) = &key {
            let destroy = Action::Destroy {
                channel: channel.clone(),
            };
            self.dead_letter_items(api, &destroy, parts.whole, reason, detail, call);
            let detail = format!("the destroy of this channel failed: {detail}");
            for (user, item) in parts.riders {
                let action = Action::Unsubscribe {
                    channel: channel.clone(),
                    user,
                };
                self.dead_letter_items(
                    Api::DeleteSubscriber,
                    &action,
                    vec![item],
                    reason,
                    &detail,
                    call,
                );
            }
        }
    }

    fn dead_letter_items(
        &self,
        api: Api,
        action: &Action,
        items: Vec<Item>,
        reason: DeadLetterReason,
        detail: &str,
        call: Call,
    ) {
        if items.is_empty() {
            return;
        }
        tracing::warn!(api = api.name(), %reason, %detail, "dead-lettered");
        self.metrics.dead_lettered(reason, items.len());
        let n = items.len();
        for i in items {
            i.origin.dead_letter(DeadLetter::unfilled(
                &i.origin.kind(),
                Some(action.clone()),
                reason,
                detail,
            ));
            i.origin.settle(
                i.index,
                ItemFate {
                    settled: Settled::DeadLettered(reason),
                    code: call.code,
                    info: Some(detail),
                    attempts: i.attempts + call.calls,
                },
            );
        }
        self.metrics.items(api, ItemResult::DeadLettered, n);
        self.metrics.pending_add(api, -(n as i64));
    }
}
