//! The upstream operations, by name. The vendor rate-limits each of them
//! separately, so `Api` is also the key of our limiters and the `api` label
//! of our metrics. Their URLs and limits live in `tencent::api`.

use std::fmt;

/// One Tencent Cloud Chat REST endpoint. The vendor rate-limits each of these
/// separately (200 calls/s), so this is also the key of our limiters and the
/// `api` label of our metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Api {
    DeleteSubscriber,
    AddSubscriber,
    DestroyOfficialAccount,
    GetSubscriberInfo,
    FollowDelete,
    FollowAdd,
    FollowGet,
    FollowCheck,
    GetSubscribedOfficialAccountList,
    CreateOfficialAccount,
}

impl Api {
    pub const ALL: [Api; 10] = [
        Api::DeleteSubscriber,
        Api::AddSubscriber,
        Api::DestroyOfficialAccount,
        Api::GetSubscriberInfo,
        Api::FollowDelete,
        Api::FollowAdd,
        Api::FollowGet,
        Api::FollowCheck,
        Api::GetSubscribedOfficialAccountList,
        Api::CreateOfficialAccount,
    ];

    /// Its place in `ALL`, for tables with a slot per API.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The command segment of the URL; also the metric label.
    pub fn name(self) -> &'static str {
        match self {
            Api::DeleteSubscriber => "delete_subscriber",
            Api::AddSubscriber => "add_subscriber",
            Api::DestroyOfficialAccount => "destroy_official_account",
            Api::GetSubscriberInfo => "get_subscriber_info",
            Api::FollowDelete => "follow_delete",
            Api::FollowAdd => "follow_add",
            Api::FollowGet => "follow_get",
            Api::FollowCheck => "follow_check",
            Api::GetSubscribedOfficialAccountList => "get_subscribed_official_account_list",
            Api::CreateOfficialAccount => "create_official_account",
        }
    }
}

impl fmt::Display for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::Api;

    #[test]
    fn index_is_the_place_in_all() {
        for (i, api) in Api::ALL.iter().enumerate() {
            assert_eq!(api.index(), i, "{api}");
        }
    }
}
