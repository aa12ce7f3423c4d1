//! Planning an event into actions, resolving what it leaves out when its
//! rule asks for it: the user's channels (`get_subscribed_official_account_list`),
//! whom the user follows (`follow_get` type 2) and who follows the user
//! (type 1), paged to the end. These reads go through `dispatch::Upstream`,
//! so they share its limiters, circuit and retries.
//!
//! Neither listing promises anything about changes between pages:
//! `get_subscribed_official_account_list` takes a numeric `Offset`, and
//! `follow_get`'s `StartCursor` is as opaque as `get_subscriber_info`'s
//! `Next`. So a removal made meanwhile by another event (another user's
//! unfollow, a sweep, a tier change) can shift an entry onto a position
//! already passed, and one pass could miss it. A listing that fits in one
//! page is read in one call and is whole. A longer one is read again until
//! a pass adds nothing new, at most [`MAX_PASSES`] passes; a listing still
//! changing after that fails the resolution (a `resolution_failed` dead
//! letter, replayable) rather than plan an event that misses something.

use std::sync::Arc;

use crate::dispatch::{ReadError, Upstream};
use crate::domain::Action;
use crate::domain::{ChannelId, UserId};
use crate::event::{Event, EventData, MAX_LIST};
use crate::rules::{RuleError, Rules};
use crate::tencent::api::{MAX_FOLLOW_GET, MAX_SUBSCRIBER_PAGE};
use crate::tencent::types::FollowType;

/// Why an event could not be planned.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Rule(#[from] RuleError),
    #[error("could not resolve {what}: {source}")]
    Resolution {
        what: &'static str,
        source: ResolveFailure,
    },
    #[error("shutting down")]
    Stopped,
}

/// Why a listing could not be read whole.
#[derive(Debug, thiserror::Error)]
pub enum ResolveFailure {
    #[error(transparent)]
    Api(#[from] crate::tencent::ApiError),
    #[error("the listing was still changing after {0} passes")]
    Unsettled(usize),
    #[error("the upstream answered the cursor it was given; the listing would not end")]
    StuckCursor,
}

/// Most passes over one listing of more than one page.
pub const MAX_PASSES: usize = 4;

fn read_err(what: &'static str) -> impl Fn(ReadError) -> PlanError {
    move |e| match e {
        ReadError::Api(source) => PlanError::Resolution {
            what,
            source: source.into(),
        },
        ReadError::Stopped => PlanError::Stopped,
    }
}

/// Reads a listing with `pass` (one pass: every entry listed and the
/// number of pages) until it is whole: one page, or a later pass that
/// adds nothing new. Entries keep the order they were first listed in.
async fn until_settled<T, F, Fut>(what: &'static str, mut pass: F) -> Result<Vec<T>, PlanError>
where
    T: std::hash::Hash + Eq,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, u64), PlanError>>,
{
    let mut seen = indexmap::IndexSet::new();
    for n in 1..=MAX_PASSES {
        let (items, pages) = pass().await?;
        let before = seen.len();
        seen.extend(items);
        let nothing_new = n > 1 && seen.len() == before;
        if pages <= 1 || nothing_new || seen.len() >= MAX_LIST {
            let mut out: Vec<T> = seen.into_iter().collect();
            out.truncate(MAX_LIST);
            return Ok(out);
        }
        tracing::debug!(
            what,
            pass = n,
            pages,
            "listing read again to confirm it is whole"
        );
    }
    Err(PlanError::Resolution {
        what,
        source: ResolveFailure::Unsettled(MAX_PASSES),
    })
}

/// Rules plus, for rules with `resolve = true`, the upstream to ask.
pub struct Planner {
    rules: Arc<Rules>,
    upstream: Arc<Upstream>,
}

impl Planner {
    pub fn new(rules: Arc<Rules>, upstream: Arc<Upstream>) -> Planner {
        Planner { rules, upstream }
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Whether any rule reads upstream while planning (`resolve = true`).
    pub fn resolves_any(&self) -> bool {
        self.rules
            .types()
            .any(|t| self.rules.rule(t).is_some_and(|r| r.resolve))
    }

    /// The actions for `event`, after resolving what its rule asks for.
    pub async fn plan(&self, mut event: Event) -> Result<(Event, Vec<Action>), PlanError> {
        let rule = self
            .rules
            .rule(&event.kind)
            .ok_or_else(|| RuleError::UnknownType(event.kind.clone()))?;
        if rule.resolve {
            self.resolve(&mut event.data).await?;
        }
        let actions = self.rules.plan(&event)?;
        Ok((event, actions))
    }

    async fn resolve(&self, d: &mut EventData) -> Result<(), PlanError> {
        if d.channels.is_none() {
            d.channels = Some(self.channels_of(&d.user_id).await?);
        }
        if d.following.is_none() {
            d.following = Some(self.follows_of(&d.user_id, FollowType::Following).await?);
        }
        if d.followers.is_none() {
            d.followers = Some(self.follows_of(&d.user_id, FollowType::Followers).await?);
        }
        Ok(())
    }

    async fn channels_of(&self, user: &UserId) -> Result<Vec<ChannelId>, PlanError> {
        until_settled("the user's channels", || self.channels_pass(user)).await
    }

    /// One pass over the user's channels: all listed, and the pages read.
    async fn channels_pass(&self, user: &UserId) -> Result<(Vec<ChannelId>, u64), PlanError> {
        let mut out = Vec::new();
        let mut offset = 0u64;
        let mut pages = 0;
        loop {
            let page = self
                .upstream
                .get_subscribed_official_account_list(user, MAX_SUBSCRIBER_PAGE, offset)
                .await
                .map_err(read_err("the user's channels"))?;
            pages += 1;
            let n = page.channels.len() as u64;
            out.extend(page.channels.into_iter().filter_map(|c| {
                ChannelId::parse(c.official_account)
                    .map_err(
                        |e| tracing::warn!(error = %e, "upstream listed an unusable channel id"),
                    )
                    .ok()
            }));
            offset += n;
            if n == 0 || offset >= page.total || out.len() >= MAX_LIST {
                break;
            }
        }
        Ok((out, pages))
    }

    async fn follows_of(&self, user: &UserId, kind: FollowType) -> Result<Vec<UserId>, PlanError> {
        let what = match kind {
            FollowType::Following => "whom the user follows",
            _ => "the user's followers",
        };
        until_settled(what, || self.follows_pass(user, kind, what)).await
    }

    /// One pass over a follow list: all listed, and the pages read.
    async fn follows_pass(
        &self,
        user: &UserId,
        kind: FollowType,
        what: &'static str,
    ) -> Result<(Vec<UserId>, u64), PlanError> {
        let mut out = Vec::new();
        let mut cursor = String::new();
        let mut pages = 0;
        loop {
            let page = self
                .upstream
                .follow_get(user, kind, &cursor, MAX_FOLLOW_GET)
                .await
                .map_err(read_err(what))?;
            pages += 1;
            out.extend(
                page.items
                    .into_iter()
                    .filter_map(|i| UserId::parse(i.to_account).ok()),
            );
            if page.next_cursor.is_empty() || out.len() >= MAX_LIST {
                break;
            }
            if page.next_cursor == cursor {
                return Err(PlanError::Resolution {
                    what,
                    source: ResolveFailure::StuckCursor,
                });
            }
            cursor = page.next_cursor;
        }
        Ok((out, pages))
    }
}
