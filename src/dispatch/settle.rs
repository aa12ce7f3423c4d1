//! Settling a batch's items from its call's answer: applied, noop, back to
//! the coalescer for another try, or dead-lettered with the reason (through
//! the item's event, whose inbox keeps the dead letter with the event's id
//! and body).

use tokio::sync::mpsc;

use crate::coalesce::{Batch, BatchKey, Input, Item};
use crate::domain::{Action, Api, DeadLetter, DeadLetterReason, ItemResult, UserId};
use crate::telemetry::Metrics;
use crate::tencent::client::{BatchOutcome, ItemOutcome};

pub(super) struct Settler {
    pub metrics: Metrics,
    /// Back to the coalescer, for items whose call failed for them alone.
    pub retries: mpsc::UnboundedSender<Input>,
    pub max_attempts: u32,
}

impl Settler {
    fn items(&self, api: Api, items: Vec<Item>, result: ItemResult) {
        self.metrics.items(api, result, items.len());
        self.metrics.pending_add(api, -(items.len() as i64));
        for i in items {
            i.origin.settle_one();
        }
    }

    /// Unsubscribes that rode on a destroy of their channel.
    fn riders(&self, riders: Vec<(UserId, Item)>, result: ItemResult) {
        let items = riders.into_iter().map(|(_, i)| i).collect();
        self.items(Api::DeleteSubscriber, items, result);
    }

    /// The call succeeded: each member as the answer says.
    pub fn outcome(&self, mut batch: Batch, outcome: BatchOutcome) {
        let api = batch.api();
        for (user, o) in outcome.items {
            let Some(items) = batch.take_member(&user) else {
                continue;
            };
            match o {
                ItemOutcome::Applied => self.items(api, items, ItemResult::Applied),
                ItemOutcome::Noop => self.items(api, items, ItemResult::Noop),
                ItemOutcome::Failed => self.retry_member(batch.key(), user, items),
            }
        }
        let key = batch.key().clone();
        let rest = batch.into_parts();
        // Whole-target work (destroy) and its riders: the call succeeded.
        self.items(api, rest.whole, ItemResult::Applied);
        self.riders(rest.riders, ItemResult::Noop);
        // Members the answer did not mention were turned into Failed by the
        // client, so nothing is left here; be safe anyway.
        for (user, items) in rest.members {
            self.retry_member(&key, user, items);
        }
    }

    /// Everything in the batch settles as `result` (riders as noop).
    pub fn all(&self, batch: Batch, result: ItemResult) {
        let api = batch.api();
        let parts = batch.into_parts();
        let members = parts.members.into_iter().flat_map(|(_, v)| v).collect();
        self.items(api, members, result);
        self.items(api, parts.whole, result);
        self.riders(parts.riders, ItemResult::Noop);
    }

    fn retry_member(&self, key: &BatchKey, user: UserId, items: Vec<Item>) {
        let api = key.api();
        let attempts = items.iter().map(|i| i.attempts).max().unwrap_or(0) + 1;
        if attempts >= self.max_attempts {
            self.dead_letter_items(
                api,
                &key.member_action(&user),
                items,
                DeadLetterReason::ItemFailed,
                "the upstream reported this item failed on every attempt",
            );
            return;
        }
        self.metrics.items(api, ItemResult::Retried, items.len());
        let items = items.into_iter().map(|i| Item { attempts, ..i }).collect();
        let input = Input::Retry {
            key: key.clone(),
            member: user,
            items,
        };
        if self.retries.send(input).is_err() {
            // Shutting down: the items stay unsettled and are replayed.
            tracing::debug!("coalescer gone; item left for replay");
        }
    }

    pub fn dead_letter_batch(&self, batch: Batch, reason: DeadLetterReason, detail: &str) {
        let api = batch.api();
        let key = batch.key().clone();
        let parts = batch.into_parts();
        for (user, items) in parts.members {
            self.dead_letter_items(api, &key.member_action(&user), items, reason, detail);
        }
        if let BatchKey::Destroy(channel) = &key {
            let destroy = Action::Destroy {
                channel: channel.clone(),
            };
            self.dead_letter_items(api, &destroy, parts.whole, reason, detail);
            let detail = format!("the destroy of this channel failed: {detail}");
            for (user, item) in parts.riders {
                let action = Action::Unsubscribe {
                    channel: channel.clone(),
                    user,
                };
                self.dead_letter_items(Api::DeleteSubscriber, &action, vec![item], reason, &detail);
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
    ) {
        if items.is_empty() {
            return;
        }
        tracing::warn!(api = api.name(), %reason, %detail, "dead-lettered");
        self.metrics.dead_lettered(reason, items.len());
        for i in &items {
            i.origin.dead_letter(DeadLetter::unfilled(
                i.origin.kind(),
                Some(action.clone()),
                reason,
                detail,
            ));
        }
        self.items(api, items, ItemResult::DeadLettered);
    }
}
