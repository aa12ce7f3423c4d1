//! Request and response bodies, field for field as the vendor pages (and the
//! corrections in NOTES.md) describe them.

use serde::{Deserialize, Serialize};

/// The fields every answer carries.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Status {
    #[serde(rename = "ActionStatus", default)]
    pub action_status: String,
    #[serde(rename = "ErrorCode", default)]
    pub error_code: i64,
    #[serde(rename = "ErrorInfo", default)]
    pub error_info: String,
}

/// Access to the common status of any answer.
pub trait HasStatus {
    fn status(&self) -> &Status;
}

macro_rules! has_status {
    ($($t:ty),* $(,)?) => {$(
        impl HasStatus for $t {
            fn status(&self) -> &Status {
                &self.status
            }
        }
    )*};
}

// ---- delete_subscriber / add_subscriber

#[derive(Debug, Clone, Serialize)]
pub struct DeleteSubscriberRequest<'a> {
    #[serde(rename = "Official_Account")]
    pub official_account: &'a str,
    /// A list of strings: the page's sample is right, its field table is not.
    #[serde(rename = "SubscriberToDel_Account")]
    pub accounts: Vec<&'a str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SubscriberRef<'a> {
    #[serde(rename = "Subscriber_Account")]
    pub account: &'a str,
}

#[derive(Debug, Clone, Serialize)]
pub struct AddSubscriberRequest<'a> {
    #[serde(rename = "Official_Account")]
    pub official_account: &'a str,
    #[serde(rename = "SubscriberList")]
    pub subscribers: Vec<SubscriberRef<'a>>,
}

/// One account's outcome in a subscriber batch.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct SubscriberResult {
    #[serde(rename = "Subscriber_Account")]
    pub account: String,
    /// 0 failed, 1 done, 2 nothing to do (not subscribed / already subscribed).
    #[serde(rename = "Result")]
    pub result: i64,
}

/// Per-item outcome of `delete_subscriber` and `add_subscriber`.
pub mod item_result {
    pub const FAILED: i64 = 0;
    pub const APPLIED: i64 = 1;
    pub const NOOP: i64 = 2;
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct SubscriberBatchResponse {
    #[serde(flatten)]
    pub status: Status,
    #[serde(rename = "SubscriberList", default)]
    pub results: Vec<SubscriberResult>,
}

// ---- destroy_official_account

#[derive(Debug, Clone, Serialize)]
pub struct DestroyOfficialAccountRequest<'a> {
    #[serde(rename = "Official_Account")]
    pub official_account: &'a str,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct PlainResponse {
    #[serde(flatten)]
    pub status: Status,
}

// ---- get_subscriber_info

#[derive(Debug, Clone, Serialize)]
pub struct GetSubscriberInfoRequest<'a> {
    #[serde(rename = "Official_Account")]
    pub official_account: &'a str,
    #[serde(rename = "Limit", skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    #[serde(rename = "Next")]
    pub next: &'a str,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct SubscriberInfo {
    #[serde(rename = "Subscriber_Account")]
    pub account: String,
    #[serde(rename = "SubscribeTime", default)]
    pub subscribe_time: i64,
    #[serde(rename = "CustomString", default)]
    pub custom_string: String,
    /// A string (`AcceptAndNotify`, `AcceptNotNotify`, `Discard`).
    #[serde(rename = "MsgFlag", default)]
    pub msg_flag: String,
    #[serde(rename = "LastSendMsgTime", default)]
    pub last_send_msg_time: i64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct GetSubscriberInfoResponse {
    #[serde(flatten)]
    pub status: Status,
    #[serde(rename = "Next", default)]
    pub next: String,
    #[serde(rename = "SubscriberNum", default)]
    pub subscriber_num: u64,
    #[serde(rename = "SubscriberList", default)]
    pub subscribers: Vec<SubscriberInfo>,
}

// ---- follow_delete / follow_add / follow_get / follow_check

#[derive(Debug, Clone, Serialize)]
pub struct FollowDeleteRequest<'a> {
    #[serde(rename = "From_Account")]
    pub from_account: &'a str,
    #[serde(rename = "To_Account")]
    pub to_accounts: Vec<&'a str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FollowItemRef<'a> {
    #[serde(rename = "To_Account")]
    pub to_account: &'a str,
}

#[derive(Debug, Clone, Serialize)]
pub struct FollowAddRequest<'a> {
    #[serde(rename = "From_Account")]
    pub from_account: &'a str,
    #[serde(rename = "FollowItem")]
    pub items: Vec<FollowItemRef<'a>>,
}

/// One `To_Account`'s outcome in a follow batch: `ResultCode` 0 is success.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct FollowResult {
    #[serde(rename = "To_Account")]
    pub to_account: String,
    #[serde(rename = "ResultCode")]
    pub result_code: i64,
    #[serde(rename = "ResultInfo", default)]
    pub result_info: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct FollowBatchResponse {
    #[serde(flatten)]
    pub status: Status,
    #[serde(rename = "ResultItem", default)]
    pub results: Vec<FollowResult>,
}

/// `FollowType` of `follow_get`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FollowType {
    Followers = 1,
    Following = 2,
    Mutual = 3,
}

#[derive(Debug, Clone, Serialize)]
pub struct FollowGetRequest<'a> {
    #[serde(rename = "From_Account")]
    pub from_account: &'a str,
    #[serde(rename = "FollowType")]
    pub follow_type: u8,
    #[serde(rename = "StartCursor")]
    pub start_cursor: &'a str,
    #[serde(rename = "WantNum")]
    pub want_num: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct FollowItem {
    #[serde(rename = "To_Account")]
    pub to_account: String,
    #[serde(rename = "FollowTime", default)]
    pub follow_time: i64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct FollowGetResponse {
    #[serde(flatten)]
    pub status: Status,
    #[serde(rename = "FollowItem", default)]
    pub items: Vec<FollowItem>,
    #[serde(rename = "NextCursor", default)]
    pub next_cursor: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct FollowCheckRequest<'a> {
    #[serde(rename = "From_Account")]
    pub from_account: &'a str,
    #[serde(rename = "To_Account")]
    pub to_accounts: Vec<&'a str>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct FollowCheckItem {
    #[serde(rename = "To_Account")]
    pub to_account: String,
    /// 0 none, 1 they follow me, 2 I follow them, 3 mutual.
    #[serde(rename = "FollowType", default)]
    pub follow_type: u8,
    #[serde(rename = "ResultCode", default)]
    pub result_code: i64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct FollowCheckResponse {
    #[serde(flatten)]
    pub status: Status,
    #[serde(rename = "ResultItem", default)]
    pub results: Vec<FollowCheckItem>,
}

// ---- get_subscribed_official_account_list / create_official_account

#[derive(Debug, Clone, Serialize)]
pub struct GetSubscribedListRequest<'a> {
    #[serde(rename = "Subscriber_Account")]
    pub subscriber_account: &'a str,
    #[serde(rename = "Limit")]
    pub limit: u32,
    #[serde(rename = "Offset")]
    pub offset: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct SubscribedChannel {
    #[serde(rename = "Official_Account")]
    pub official_account: String,
    #[serde(rename = "SubscribeTime", default)]
    pub subscribe_time: i64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct GetSubscribedListResponse {
    #[serde(flatten)]
    pub status: Status,
    #[serde(rename = "OfficialAccountList", default)]
    pub channels: Vec<SubscribedChannel>,
    #[serde(rename = "TotalNum", default)]
    pub total: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CreateOfficialAccountRequest<'a> {
    #[serde(rename = "Owner_Account")]
    pub owner_account: &'a str,
    #[serde(
        rename = "OfficialAccountUserID",
        skip_serializing_if = "Option::is_none"
    )]
    pub official_account_user_id: Option<&'a str>,
    #[serde(rename = "Name")]
    pub name: &'a str,
    #[serde(rename = "MaxSubscriberNum", skip_serializing_if = "Option::is_none")]
    pub max_subscriber_num: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct CreateOfficialAccountResponse {
    #[serde(flatten)]
    pub status: Status,
    #[serde(rename = "OfficialAccountUserID", default)]
    pub official_account_user_id: String,
}

has_status!(
    SubscriberBatchResponse,
    PlainResponse,
    GetSubscriberInfoResponse,
    FollowBatchResponse,
    FollowGetResponse,
    FollowCheckResponse,
    GetSubscribedListResponse,
    CreateOfficialAccountResponse,
);
