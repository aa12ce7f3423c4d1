//! One unit of upstream work, as the rules produce it and the coalescer
//! batches it.

use serde::{Deserialize, Serialize};

use super::{Api, ChannelId, UserId};

/// One unit of upstream work.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    Unsubscribe { channel: ChannelId, user: UserId },
    Unfollow { from: UserId, to: UserId },
    Destroy { channel: ChannelId },
    Subscribe { channel: ChannelId, user: UserId },
}

impl Action {
    pub fn api(&self) -> Api {
        match self {
            Action::Unsubscribe { .. } => Api::DeleteSubscriber,
            Action::Unfollow { .. } => Api::FollowDelete,
            Action::Destroy { .. } => Api::DestroyOfficialAccount,
            Action::Subscribe { .. } => Api::AddSubscriber,
        }
    }
}
