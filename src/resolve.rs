//! Planning an event into actions, resolving what it leaves out when its
//! rule asks for it: the user's channels (`get_subscribed_official_account_list`),
//! whom the user follows (`follow_get` type 2) and who follows the user
//! (type 1), paged to the end. These reads go through `dispatch::Upstream`,
//! so they share its limiters, circuit and retries.

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
        source: crate::tencent::ApiError,
    },
    #[error("shutting down")]
    Stopped,
}

fn read_err(what: &'static str) -> impl Fn(ReadError) -> PlanError {
    move |e| match e {
        ReadError::Api(source) => PlanError::Resolution { what, source },
        ReadError::Stopped => PlanError::Stopped,
    }
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
        let mut out = Vec::new();
        let mut offset = 0u64;
        loop {
            let page = self
                .upstream
                .get_subscribed_official_account_list(user, MAX_SUBSCRIBER_PAGE, offset)
                .await
                .map_err(read_err("the user's channels"))?;
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
        out.truncate(MAX_LIST);
        Ok(out)
    }

    async fn follows_of(&self, user: &UserId, kind: FollowType) -> Result<Vec<UserId>, PlanError> {
        let what = match kind {
            FollowType::Following => "whom the user follows",
            _ => "the user's followers",
        };
        let mut out = Vec::new();
        let mut cursor = String::new();
        loop {
            let page = self
                .upstream
                .follow_get(user, kind, &cursor, MAX_FOLLOW_GET)
                .await
                .map_err(read_err(what))?;
            out.extend(
                page.items
                    .into_iter()
                    .filter_map(|i| UserId::parse(i.to_account).ok()),
            );
            if page.next_cursor.is_empty() || out.len() >= MAX_LIST {
                break;
            }
            cursor = page.next_cursor;
        }
        out.truncate(MAX_LIST);
        Ok(out)
    }
}
