//! The record of one event's fate: what it asked for, what became of each
//! action, and when. `EventRecord` is the document the status routes answer,
//! the store keeps and the callbacks carry; `RecordBuilder` is how the
//! pipeline collects it while the event is in flight, compactly (a few bytes
//! per planned item), and renders it on demand or once it settles.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::domain::{Action, Api, DeadLetterReason, Source, UserId};

/// Accounts listed per action; `accounts_total` counts the rest. The same
/// cap bounds each action's list of dead-lettered accounts (its
/// `counts.dead_lettered` has the total).
pub const MAX_LISTED: usize = 1_000;

/// Whether an event is done, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Some action has not settled yet.
    Pending,
    /// Every action is applied or a noop.
    Settled,
    /// Every action settled, and some were given up (dead-lettered).
    DeadLettered,
}

/// What a pending event waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitingFor {
    /// Behind other events, not yet in the pipeline.
    Queued,
    /// Its batch is open, filling (`batching.linger_ms`).
    Linger,
    /// Its call waits for the API's rate limit.
    Limiter,
    /// Upstream rejects our credentials; dispatch is stopped.
    Circuit,
    /// A failed call waits to be retried.
    RetryBackoff,
}

/// An action's overall result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionResult {
    Applied,
    Noop,
    DeadLettered,
    /// Every item settled, not all the same way.
    Mixed,
    /// Some item has not settled.
    Pending,
}

/// How one planned item settled. A dead letter always has its reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    Applied,
    Noop,
    DeadLettered(DeadLetterReason),
}

/// What became of one planned item, as the dispatcher reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemOutcome {
    pub result: Settled,
    /// The vendor's ErrorCode of the call that settled it (0: success).
    pub error_code: i64,
    /// The vendor's ErrorInfo (or what else went wrong); kept only for dead
    /// letters and for an action's last call.
    pub error_info: Option<String>,
    pub at_unix_ms: u64,
    /// Calls this item took part in.
    pub attempts: u32,
}

/// Items per result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub applied: u64,
    pub noop: u64,
    pub dead_lettered: u64,
    pub pending: u64,
}

/// The last call that settled an item of an action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastCall {
    #[serde(with = "rfc3339_ms")]
    pub at: u64,
    pub error_code: i64,
    pub error_info: Option<String>,
    pub attempts: u32,
}

/// One account given up, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetteredAccount {
    /// The account (or, for a destroy, the channel).
    pub account: String,
    pub reason: DeadLetterReason,
    pub error_code: i64,
    pub error_info: Option<String>,
    #[serde(with = "rfc3339_ms")]
    pub at: u64,
    pub attempts: u32,
}

/// The planned items of one (api, target), and what became of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionRecord {
    #[serde(with = "api_name")]
    pub api: Api,
    /// The channel, or the From_Account of a follow_delete.
    pub target: String,
    /// Up to `MAX_LISTED` accounts, in plan order; none for a destroy.
    pub accounts: Vec<String>,
    pub accounts_total: u64,
    pub result: ActionResult,
    pub counts: Counts,
    pub last_call: Option<LastCall>,
    /// Up to `MAX_LISTED`, in the order they were given up.
    pub dead_lettered: Vec<DeadLetteredAccount>,
}

/// One event's fate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// The `webhook-id` or AMQP `message_id`.
    pub id: String,
    pub source: Source,
    #[serde(rename = "type")]
    pub kind: String,
    pub user_id: String,
    #[serde(rename = "accepted_at", with = "rfc3339_ms")]
    pub accepted_at_ms: u64,
    pub status: Status,
    #[serde(rename = "settled_at", with = "rfc3339_ms_opt")]
    pub settled_at_ms: Option<u64>,
    pub waiting_for: Option<WaitingFor>,
    pub actions: Vec<ActionRecord>,
}

/// Item states as one byte each.
const PENDING: u8 = 0;
const APPLIED: u8 = 1;
const NOOP: u8 = 2;
const DEAD: u8 = 3;

/// Builds an event's record from its plan and the outcomes of its items.
/// Per planned item it holds the plan's `Action` (whose ids are the plan's
/// own strings), one state byte and its group's index; per action group a
/// few counters and its last call; error texts only for dead letters and
/// last calls.
#[derive(Debug, Clone)]
pub struct RecordBuilder {
    id: Box<str>,
    source: Source,
    kind: Box<str>,
    user_id: UserId,
    accepted_at_ms: u64,
    plan: Vec<Action>,
    /// Per item: its state, and the group it belongs to.
    states: Vec<u8>,
    group_of: Vec<u32>,
    groups: Vec<Group>,
}

#[derive(Debug, Clone)]
struct Group {
    /// The first item of the group (its api and target).
    first: u32,
    items: u32,
    counts: [u32; 4],
    last: Option<Last>,
    dead: Vec<Dead>,
}

/// Times are kept as milliseconds after `accepted_at` (a u32 spans 49 days).
#[derive(Debug, Clone)]
struct Last {
    at: u32,
    code: i64,
    info: Option<Box<str>>,
    attempts: u32,
}

#[derive(Debug, Clone)]
struct Dead {
    item: u32,
    reason: DeadLetterReason,
    code: i64,
    info: Option<Box<str>>,
    at: u32,
    attempts: u32,
}

/// What groups items into one action of the record.
fn group_key(a: &Action) -> (Api, &str) {
    match a {
        Action::Unsubscribe { channel, .. }
        | Action::Subscribe { channel, .. }
        | Action::Destroy { channel } => (a.api(), channel.as_str()),
        Action::Unfollow { from, .. } => (a.api(), from.as_str()),
    }
}

/// The account an item is about, if any (a destroy has none).
fn account(a: &Action) -> Option<&str> {
    match a {
        Action::Unsubscribe { user, .. } | Action::Subscribe { user, .. } => Some(user.as_str()),
        Action::Unfollow { to, .. } => Some(to.as_str()),
        Action::Destroy { .. } => None,
    }
}

impl RecordBuilder {
    pub fn new(
        id: &str,
        source: Source,
        kind: &str,
        user_id: UserId,
        accepted_at_ms: u64,
        plan: Vec<Action>,
    ) -> RecordBuilder {
        let mut index: HashMap<(Api, &str), u32> = HashMap::new();
        let mut groups: Vec<Group> = Vec::new();
        let mut group_of = Vec::with_capacity(plan.len());
        for (i, a) in plan.iter().enumerate() {
            let next = groups.len() as u32;
            let g = *index.entry(group_key(a)).or_insert(next);
            if g == next {
                groups.push(Group {
                    first: i as u32,
                    items: 0,
                    counts: [0; 4],
                    last: None,
                    dead: Vec::new(),
                });
            }
            let group = &mut groups[g as usize];
            group.items += 1;
            group.counts[PENDING as usize] += 1;
            group_of.push(g);
        }
        drop(index);
        RecordBuilder {
            id: id.into(),
            source,
            kind: kind.into(),
            user_id,
            accepted_at_ms,
            states: vec![PENDING; plan.len()],
            plan,
            group_of,
            groups,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn user_id(&self) -> &UserId {
        &self.user_id
    }

    pub fn accepted_at_ms(&self) -> u64 {
        self.accepted_at_ms
    }

    /// Records how item `item` (its index in the plan) settled. A later
    /// outcome for the same item replaces the earlier one; an index outside
    /// the plan is ignored.
    pub fn outcome(&mut self, item: usize, o: ItemOutcome) {
        let (Some(&state), Some(&g)) = (self.states.get(item), self.group_of.get(item)) else {
            tracing::debug!(item, "outcome for an item outside the plan ignored");
            return;
        };
        let at =
            u32::try_from(o.at_unix_ms.saturating_sub(self.accepted_at_ms)).unwrap_or(u32::MAX);
        let new = match o.result {
            Settled::Applied => APPLIED,
            Settled::Noop => NOOP,
            Settled::DeadLettered(_) => DEAD,
        };
        self.states[item] = new;
        let group = &mut self.groups[g as usize];
        group.counts[state as usize] -= 1;
        group.counts[new as usize] += 1;
        if state == DEAD {
            group.dead.retain(|d| d.item != item as u32);
        }
        let info: Option<Box<str>> = o.error_info.map(Into::into);
        if let Settled::DeadLettered(reason) = o.result {
            if group.dead.len() < MAX_LISTED {
                group.dead.push(Dead {
                    item: item as u32,
                    reason,
                    code: o.error_code,
                    info: info.clone(),
                    at,
                    attempts: o.attempts,
                });
            }
        }
        if group.last.as_ref().is_none_or(|l| at >= l.at) {
            group.last = Some(Last {
                at,
                code: o.error_code,
                info,
                attempts: o.attempts,
            });
        }
    }

    /// Every item has settled.
    pub fn is_settled(&self) -> bool {
        self.groups.iter().all(|g| g.counts[PENDING as usize] == 0)
    }

    /// Some item was given up.
    pub fn any_dead_lettered(&self) -> bool {
        self.groups.iter().any(|g| g.counts[DEAD as usize] > 0)
    }

    /// The record as it stands.
    pub fn build(
        &self,
        status: Status,
        settled_at_ms: Option<u64>,
        waiting_for: Option<WaitingFor>,
    ) -> EventRecord {
        let mut listed: Vec<Vec<String>> = self
            .groups
            .iter()
            .map(|g| Vec::with_capacity((g.items as usize).min(MAX_LISTED)))
            .collect();
        for (a, &g) in self.plan.iter().zip(&self.group_of) {
            let list = &mut listed[g as usize];
            if let (Some(acc), true) = (account(a), list.len() < MAX_LISTED) {
                list.push(acc.to_owned());
            }
        }
        let at = |offset: u32| self.accepted_at_ms.saturating_add(u64::from(offset));
        let actions = self
            .groups
            .iter()
            .zip(listed)
            .map(|(g, accounts)| {
                let first = &self.plan[g.first as usize];
                let (api, target) = group_key(first);
                let c = |s: u8| u64::from(g.counts[s as usize]);
                let counts = Counts {
                    applied: c(APPLIED),
                    noop: c(NOOP),
                    dead_lettered: c(DEAD),
                    pending: c(PENDING),
                };
                let settled_kinds = [counts.applied, counts.noop, counts.dead_lettered]
                    .iter()
                    .filter(|n| **n > 0)
                    .count();
                let result = if counts.pending > 0 {
                    ActionResult::Pending
                } else if settled_kinds > 1 {
                    ActionResult::Mixed
                } else if counts.dead_lettered > 0 {
                    ActionResult::DeadLettered
                } else if counts.noop > 0 {
                    ActionResult::Noop
                } else {
                    ActionResult::Applied
                };
                let accounts_total = if account(first).is_some() {
                    u64::from(g.items)
                } else {
                    0
                };
                ActionRecord {
                    api,
                    target: target.to_owned(),
                    accounts,
                    accounts_total,
                    result,
                    counts,
                    last_call: g.last.as_ref().map(|l| LastCall {
                        at: at(l.at),
                        error_code: l.code,
                        error_info: l.info.as_deref().map(str::to_owned),
                        attempts: l.attempts,
                    }),
                    dead_lettered: g
                        .dead
                        .iter()
                        .map(|d| {
                            let item = &self.plan[d.item as usize];
                            DeadLetteredAccount {
                                account: account(item)
                                    .unwrap_or_else(|| group_key(item).1)
                                    .to_owned(),
                                reason: d.reason,
                                error_code: d.code,
                                error_info: d.info.as_deref().map(str::to_owned),
                                at: at(d.at),
                                attempts: d.attempts,
                            }
                        })
                        .collect(),
                }
            })
            .collect();
        EventRecord {
            id: self.id.to_string(),
            source: self.source,
            kind: self.kind.to_string(),
            user_id: self.user_id.to_string(),
            accepted_at_ms: self.accepted_at_ms,
            status,
            settled_at_ms,
            waiting_for,
            actions,
        }
    }
}

/// RFC 3339 with milliseconds, UTC, for unix milliseconds.
pub fn format_ms(unix_ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms);
    humantime::format_rfc3339_millis(t).to_string()
}

fn parse_ms(s: &str) -> Option<u64> {
    let t = humantime::parse_rfc3339(s).ok()?;
    let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    u64::try_from(d.as_millis()).ok()
}

mod rfc3339_ms {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(ms: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_ms(*ms))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        super::parse_ms(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("not an RFC 3339 time: {s:?}")))
    }
}

mod rfc3339_ms_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(ms: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match ms {
            Some(ms) => s.serialize_str(&super::format_ms(*ms)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        match Option::<std::borrow::Cow<str>>::deserialize(d)? {
            None => Ok(None),
            Some(s) => super::parse_ms(&s)
                .map(Some)
                .ok_or_else(|| serde::de::Error::custom(format!("not an RFC 3339 time: {s:?}"))),
        }
    }
}

mod api_name {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::domain::Api;

    pub fn serialize<S: Serializer>(api: &Api, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(api.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Api, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        Api::ALL
            .iter()
            .copied()
            .find(|a| a.name() == s)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown api {s:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ChannelId;

    fn uid(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    fn chan(s: &str) -> ChannelId {
        ChannelId::parse(s).unwrap()
    }

    const T0: u64 = 1_795_000_000_000;

    /// A ban: two channels, two follows, one follower.
    fn ban() -> Vec<Action> {
        vec![
            Action::Unsubscribe {
                channel: chan("@TOA#_news"),
                user: uid("u1"),
            },
            Action::Unsubscribe {
                channel: chan("@TOA#_deals"),
                user: uid("u1"),
            },
            Action::Unfollow {
                from: uid("u1"),
                to: uid("a"),
            },
            Action::Unfollow {
                from: uid("u1"),
                to: uid("b"),
            },
            Action::Unfollow {
                from: uid("f9"),
                to: uid("u1"),
            },
            Action::Destroy {
                channel: chan("@TOA#_mine"),
            },
        ]
    }

    fn ok(at: u64) -> ItemOutcome {
        ItemOutcome {
            result: Settled::Applied,
            error_code: 0,
            error_info: None,
            at_unix_ms: at,
            attempts: 1,
        }
    }

    #[test]
    fn items_group_by_api_and_target_in_plan_order() {
        let b = RecordBuilder::new("e1", Source::Webhook, "user.banned", uid("u1"), T0, ban());
        let r = b.build(Status::Pending, None, Some(WaitingFor::Linger));
        let keys: Vec<(&str, &str, Vec<&str>, u64)> = r
            .actions
            .iter()
            .map(|a| {
                (
                    a.api.name(),
                    a.target.as_str(),
                    a.accounts.iter().map(String::as_str).collect(),
                    a.accounts_total,
                )
            })
            .collect();
        assert_eq!(
            keys,
            [
                ("delete_subscriber", "@TOA#_news", vec!["u1"], 1),
                ("delete_subscriber", "@TOA#_deals", vec!["u1"], 1),
                ("follow_delete", "u1", vec!["a", "b"], 2),
                ("follow_delete", "f9", vec!["u1"], 1),
                ("destroy_official_account", "@TOA#_mine", vec![], 0),
            ]
        );
        assert!(r.actions.iter().all(|a| a.result == ActionResult::Pending));
        assert_eq!(r.actions[2].counts.pending, 2);
        assert_eq!(r.actions[4].counts.pending, 1, "a destroy is one item");
        assert_eq!(r.waiting_for, Some(WaitingFor::Linger));
        assert!(!b.is_settled());
    }

    #[test]
    fn outcomes_make_results_counts_last_calls_and_dead_letters() {
        let mut b = RecordBuilder::new("e1", Source::Amqp, "user.banned", uid("u1"), T0, ban());
        b.outcome(0, ok(T0 + 200));
        b.outcome(
            1,
            ItemOutcome {
                result: Settled::Noop,
                error_code: 0,
                error_info: None,
                at_unix_ms: T0 + 210,
                attempts: 2,
            },
        );
        b.outcome(2, ok(T0 + 220));
        b.outcome(
            3,
            ItemOutcome {
                result: Settled::DeadLettered(DeadLetterReason::BadRequest),
                error_code: 20001,
                error_info: Some("invalid To_Account".into()),
                at_unix_ms: T0 + 230,
                attempts: 3,
            },
        );
        b.outcome(4, ok(T0 + 240));
        assert!(!b.is_settled());
        b.outcome(5, ok(T0 + 250));
        assert!(b.is_settled() && b.any_dead_lettered());
        let r = b.build(Status::DeadLettered, Some(T0 + 260), None);
        let results: Vec<ActionResult> = r.actions.iter().map(|a| a.result).collect();
        assert_eq!(
            results,
            [
                ActionResult::Applied,
                ActionResult::Noop,
                ActionResult::Mixed,
                ActionResult::Applied,
                ActionResult::Applied,
            ]
        );
        let follows = &r.actions[2];
        assert_eq!(
            follows.counts,
            Counts {
                applied: 1,
                noop: 0,
                dead_lettered: 1,
                pending: 0
            }
        );
        assert_eq!(
            follows.last_call,
            Some(LastCall {
                at: T0 + 230,
                error_code: 20001,
                error_info: Some("invalid To_Account".into()),
                attempts: 3,
            })
        );
        assert_eq!(
            follows.dead_lettered,
            [DeadLetteredAccount {
                account: "b".into(),
                reason: DeadLetterReason::BadRequest,
                error_code: 20001,
                error_info: Some("invalid To_Account".into()),
                at: T0 + 230,
                attempts: 3,
            }]
        );
        assert_eq!(r.actions[1].last_call.as_ref().unwrap().attempts, 2);
        // The JSON shape the routes and callbacks carry.
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["type"], "user.banned");
        assert_eq!(v["source"], "amqp");
        assert_eq!(v["status"], "dead_lettered");
        assert_eq!(v["accepted_at"], format_ms(T0));
        assert!(v["accepted_at"].as_str().unwrap().ends_with(".000Z"));
        assert_eq!(v["settled_at"], format_ms(T0 + 260));
        assert_eq!(v["waiting_for"], serde_json::Value::Null);
        assert_eq!(v["actions"][2]["api"], "follow_delete");
        assert_eq!(v["actions"][2]["result"], "mixed");
        assert_eq!(v["actions"][2]["dead_lettered"][0]["reason"], "bad_request");
        assert_eq!(
            v["actions"][0]["last_call"]["error_info"],
            serde_json::Value::Null
        );
        let back: EventRecord = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn a_later_outcome_replaces_an_earlier_one() {
        let mut b = RecordBuilder::new("e", Source::Webhook, "t", uid("u1"), T0, ban());
        b.outcome(
            0,
            ItemOutcome {
                result: Settled::DeadLettered(DeadLetterReason::RetriesExhausted),
                error_code: -1,
                error_info: Some("timeout".into()),
                at_unix_ms: T0 + 5,
                attempts: 9,
            },
        );
        b.outcome(0, ok(T0 + 10));
        b.outcome(99, ok(T0)); // outside the plan: ignored
        let r = b.build(Status::Pending, None, Some(WaitingFor::RetryBackoff));
        assert_eq!(r.actions[0].result, ActionResult::Applied);
        assert!(r.actions[0].dead_lettered.is_empty());
        assert_eq!(r.actions[0].counts.dead_lettered, 0);
        assert_eq!(r.actions[0].last_call.as_ref().unwrap().at, T0 + 10);
        // An outcome stamped before acceptance (clock skew) is clamped.
        b.outcome(1, ok(T0 - 1_000));
        let r = b.build(Status::Pending, None, None);
        assert_eq!(r.actions[1].last_call.as_ref().unwrap().at, T0);
    }

    #[test]
    fn at_most_1000_accounts_are_listed_per_action_with_the_total() {
        let plan: Vec<Action> = (0..2_500)
            .map(|i| Action::Unfollow {
                from: uid("u1"),
                to: uid(&format!("f{i}")),
            })
            .collect();
        let mut b = RecordBuilder::new("e", Source::Webhook, "user.banned", uid("u1"), T0, plan);
        for i in 0..2_500 {
            b.outcome(
                i,
                ItemOutcome {
                    result: Settled::DeadLettered(DeadLetterReason::ItemFailed),
                    error_code: 0,
                    error_info: None,
                    at_unix_ms: T0 + i as u64,
                    attempts: 10,
                },
            );
        }
        let r = b.build(Status::DeadLettered, Some(T0 + 3_000), None);
        assert_eq!(r.actions.len(), 1);
        let a = &r.actions[0];
        assert_eq!(a.accounts.len(), MAX_LISTED);
        assert_eq!(a.accounts_total, 2_500);
        assert_eq!(a.accounts[0], "f0");
        assert_eq!(a.accounts[999], "f999");
        assert_eq!(a.counts.dead_lettered, 2_500);
        assert_eq!(a.dead_lettered.len(), MAX_LISTED);
        assert_eq!(a.result, ActionResult::DeadLettered);
    }

    #[test]
    fn bad_times_in_stored_json_are_refused() {
        let b = RecordBuilder::new("e", Source::Webhook, "t", uid("u1"), T0, Vec::new());
        let mut v = serde_json::to_value(b.build(Status::Settled, Some(T0), None)).unwrap();
        v["accepted_at"] = "yesterday".into();
        assert!(serde_json::from_value::<EventRecord>(v).is_err());
    }
}
