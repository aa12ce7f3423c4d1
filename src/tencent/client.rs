//! The REST client: one keep-alive connection pool, a cached admin UserSig
//! renewed well before it expires, a fresh `random` per request, and every
//! failure turned into an `ApiError` whose class drives what happens next.

use std::sync::OnceLock;
use std::time::Duration;

use parking_lot::Mutex;
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::api::{Api, MAX_FOLLOW_CHECK, MAX_FOLLOW_GET, MAX_SUBSCRIBER_PAGE};
use super::batch::{FollowBatch, SubscriberBatch};
use super::error::ApiError;
use super::types::*;
use super::usersig;
use crate::domain::clock::unix_now;
use crate::domain::{ChannelId, UserId};

/// Lifetime of the admin UserSig we issue ourselves.
const USERSIG_LIFETIME: u64 = 7 * 24 * 3600;
/// Renew once less than this much lifetime is left: far from the edge, so a
/// skewed clock or a slow call never presents an expired signature.
const USERSIG_RENEW_BEFORE: u64 = 24 * 3600;

/// What the client needs; built from `[tencent]` or directly in tests.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `https://adminapisgp.im.qcloud.com`, or the emulator's URL.
    pub base_url: String,
    pub sdkappid: u64,
    pub secret_key: SecretString,
    pub admin_identifier: String,
    pub timeout: Duration,
}

struct CachedSig {
    sig: String,
    renew_at: u64,
}

/// A Tencent Cloud Chat REST client. Cheap to share behind an `Arc`.
pub struct TencentClient {
    http: reqwest::Client,
    opts: ClientOptions,
    sig: Mutex<Option<CachedSig>>,
    /// Asked just before each request is handed to the connection: `false`
    /// and it is not sent (see [`TencentClient::gate_sends`]).
    gate: OnceLock<SendGate>,
}

/// Whether a request may go out now.
pub type SendGate = Box<dyn Fn() -> bool + Send + Sync>;

impl std::fmt::Debug for TencentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TencentClient")
            .field("base_url", &self.opts.base_url)
            .field("sdkappid", &self.opts.sdkappid)
            .field("admin", &self.opts.admin_identifier)
            .finish_non_exhaustive()
    }
}

/// The outcome of one account in a batch call, in our terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemOutcome {
    /// The change was made.
    Applied,
    /// Nothing to do (not subscribed / already subscribed).
    Noop,
    /// This item failed; retry it.
    Failed,
}

impl ItemOutcome {
    /// From `Result` of `delete_subscriber` / `add_subscriber`.
    pub fn from_subscriber_result(r: i64) -> Self {
        match r {
            item_result::APPLIED => ItemOutcome::Applied,
            item_result::NOOP => ItemOutcome::Noop,
            _ => ItemOutcome::Failed,
        }
    }
}

/// Per-account outcomes of a batch call, in request order. An account the
/// answer does not mention counts as failed, so it is retried, never lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchOutcome {
    pub items: Vec<(UserId, ItemOutcome)>,
}

impl BatchOutcome {
    pub fn count(&self, o: ItemOutcome) -> usize {
        self.items.iter().filter(|(_, x)| *x == o).count()
    }

    pub fn failed(&self) -> impl Iterator<Item = &UserId> {
        self.items
            .iter()
            .filter(|(_, o)| *o == ItemOutcome::Failed)
            .map(|(u, _)| u)
    }
}

fn outcome_in_order(
    requested: &[UserId],
    answered: impl Iterator<Item = (String, ItemOutcome)>,
) -> BatchOutcome {
    let mut by_account: std::collections::HashMap<String, ItemOutcome> = answered.collect();
    BatchOutcome {
        items: requested
            .iter()
            .map(|u| {
                let o = by_account.remove(u.as_str()).unwrap_or(ItemOutcome::Failed);
                (u.clone(), o)
            })
            .collect(),
    }
}

impl TencentClient {
    pub fn new(opts: ClientOptions) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(opts.timeout)
            .connect_timeout(opts.timeout.min(Duration::from_secs(3)))
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .user_agent(concat!("chat-janitor/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(TencentClient {
            http,
            opts,
            sig: Mutex::new(None),
            gate: OnceLock::new(),
        })
    }

    pub fn options(&self) -> &ClientOptions {
        &self.opts
    }

    /// The admin UserSig, generated once and renewed a day before expiry.
    pub fn admin_usersig(&self) -> String {
        let now = unix_now();
        let mut cached = self.sig.lock();
        match &*cached {
            Some(c) if now < c.renew_at => c.sig.clone(),
            _ => {
                let sig = usersig::generate(
                    self.opts.secret_key.expose_secret(),
                    self.opts.sdkappid,
                    &self.opts.admin_identifier,
                    now,
                    USERSIG_LIFETIME,
                );
                *cached = Some(CachedSig {
                    sig: sig.clone(),
                    renew_at: now + USERSIG_LIFETIME - USERSIG_RENEW_BEFORE,
                });
                sig
            }
        }
    }

    /// Asks `gate` before every request from now on (set once; a second
    /// gate is ignored). The dispatcher's: only the active replica sends.
    pub fn gate_sends(&self, gate: SendGate) {
        let _ = self.gate.set(gate);
    }

    /// One call: URL with fresh `random`, JSON body, status classification.
    pub async fn call<Req, Resp>(&self, api: Api, body: &Req) -> Result<Resp, ApiError>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned + HasStatus,
    {
        let random: u32 = rand::random();
        tracing::debug!(api = api.name(), random, "upstream request");
        let sig = self.admin_usersig();
        let sdkappid = self.opts.sdkappid.to_string();
        let random_s = random.to_string();
        let mut url = reqwest::Url::parse(&format!("{}/{}", self.opts.base_url, api.path()))
            .map_err(|e| ApiError::Connect {
                api,
                detail: format!("invalid base URL: {e}"),
            })?;
        url.query_pairs_mut()
            .append_pair("sdkappid", &sdkappid)
            .append_pair("identifier", &self.opts.admin_identifier)
            .append_pair("usersig", &sig)
            .append_pair("random", &random_s)
            .append_pair("contenttype", "json");
        let request = self
            .http
            .post(url)
            .json(body)
            .build()
            .map_err(|e| transport_error(api, e))?;
        // The last check before the bytes go: a replica frozen (SIGSTOP, a
        // paused VM) after its admission and resumed after losing the
        // lease must not send what it had prepared.
        if let Some(gate) = self.gate.get() {
            if !gate() {
                return Err(ApiError::NotSent { api });
            }
        }
        let resp = self
            .http
            .execute(request)
            .await
            .map_err(|e| transport_error(api, e))?;
        let status = resp.status();
        if status != reqwest::StatusCode::OK {
            return Err(ApiError::Http {
                api,
                status: status.as_u16(),
            });
        }
        let bytes = resp.bytes().await.map_err(|e| transport_error(api, e))?;
        let parsed: Resp = serde_json::from_slice(&bytes).map_err(|e| ApiError::Decode {
            api,
            detail: e.to_string(),
        })?;
        let st = parsed.status();
        if st.error_code != 0 {
            tracing::debug!(api = api.name(), random, code = st.error_code, info = %st.error_info, "upstream refused");
            return Err(ApiError::Vendor {
                api,
                code: st.error_code,
                info: st.error_info.clone(),
            });
        }
        Ok(parsed)
    }

    /// Unsubscribes up to 100 accounts from `channel`.
    pub async fn delete_subscriber(
        &self,
        channel: &ChannelId,
        batch: &SubscriberBatch,
    ) -> Result<BatchOutcome, ApiError> {
        let req = DeleteSubscriberRequest {
            official_account: channel.as_str(),
            accounts: batch.iter().map(UserId::as_str).collect(),
        };
        let resp: SubscriberBatchResponse = self.call(Api::DeleteSubscriber, &req).await?;
        Ok(subscriber_outcome(batch, resp))
    }

    /// Subscribes up to 100 accounts to `channel`.
    pub async fn add_subscriber(
        &self,
        channel: &ChannelId,
        batch: &SubscriberBatch,
    ) -> Result<BatchOutcome, ApiError> {
        let req = AddSubscriberRequest {
            official_account: channel.as_str(),
            subscribers: batch
                .iter()
                .map(|u| SubscriberRef {
                    account: u.as_str(),
                })
                .collect(),
        };
        let resp: SubscriberBatchResponse = self.call(Api::AddSubscriber, &req).await?;
        Ok(subscriber_outcome(batch, resp))
    }

    pub async fn destroy_official_account(&self, channel: &ChannelId) -> Result<(), ApiError> {
        let req = DestroyOfficialAccountRequest {
            official_account: channel.as_str(),
        };
        let _: PlainResponse = self.call(Api::DestroyOfficialAccount, &req).await?;
        Ok(())
    }

    /// One page of a channel's subscribers; pass `""` first, then the
    /// returned `next` until it is empty.
    pub async fn get_subscriber_info(
        &self,
        channel: &ChannelId,
        limit: u32,
        next: &str,
    ) -> Result<GetSubscriberInfoResponse, ApiError> {
        let req = GetSubscriberInfoRequest {
            official_account: channel.as_str(),
            limit: Some(limit.clamp(1, MAX_SUBSCRIBER_PAGE)),
            next,
        };
        self.call(Api::GetSubscriberInfo, &req).await
    }

    /// `from` unfollows up to 20 accounts.
    pub async fn follow_delete(
        &self,
        from: &UserId,
        batch: &FollowBatch,
    ) -> Result<BatchOutcome, ApiError> {
        let req = FollowDeleteRequest {
            from_account: from.as_str(),
            to_accounts: batch.iter().map(UserId::as_str).collect(),
        };
        let resp: FollowBatchResponse = self.call(Api::FollowDelete, &req).await?;
        Ok(follow_outcome(batch, resp))
    }

    /// `from` follows up to 20 accounts.
    pub async fn follow_add(
        &self,
        from: &UserId,
        batch: &FollowBatch,
    ) -> Result<BatchOutcome, ApiError> {
        let req = FollowAddRequest {
            from_account: from.as_str(),
            items: batch
                .iter()
                .map(|u| FollowItemRef {
                    to_account: u.as_str(),
                })
                .collect(),
        };
        let resp: FollowBatchResponse = self.call(Api::FollowAdd, &req).await?;
        Ok(follow_outcome(batch, resp))
    }

    /// One page of `from`'s followers, followings or mutual follows.
    pub async fn follow_get(
        &self,
        from: &UserId,
        follow_type: FollowType,
        cursor: &str,
        want: u32,
    ) -> Result<FollowGetResponse, ApiError> {
        let req = FollowGetRequest {
            from_account: from.as_str(),
            follow_type: follow_type as u8,
            start_cursor: cursor,
            want_num: want.clamp(1, MAX_FOLLOW_GET),
        };
        self.call(Api::FollowGet, &req).await
    }

    /// The follow relation between `from` and up to 100 accounts.
    pub async fn follow_check(
        &self,
        from: &UserId,
        to: &[UserId],
    ) -> Result<FollowCheckResponse, ApiError> {
        let req = FollowCheckRequest {
            from_account: from.as_str(),
            to_accounts: to
                .iter()
                .take(MAX_FOLLOW_CHECK)
                .map(UserId::as_str)
                .collect(),
        };
        self.call(Api::FollowCheck, &req).await
    }

    /// One page of the channels `user` subscribes to.
    pub async fn get_subscribed_official_account_list(
        &self,
        user: &UserId,
        limit: u32,
        offset: u64,
    ) -> Result<GetSubscribedListResponse, ApiError> {
        let req = GetSubscribedListRequest {
            subscriber_account: user.as_str(),
            limit: limit.clamp(1, MAX_SUBSCRIBER_PAGE),
            offset,
        };
        self.call(Api::GetSubscribedOfficialAccountList, &req).await
    }

    /// Creates a channel; returns its `OfficialAccountUserID`.
    pub async fn create_official_account(
        &self,
        owner: &UserId,
        id: Option<&ChannelId>,
        name: &str,
    ) -> Result<String, ApiError> {
        let req = CreateOfficialAccountRequest {
            owner_account: owner.as_str(),
            official_account_user_id: id.map(ChannelId::as_str),
            name,
            max_subscriber_num: None,
        };
        let resp: CreateOfficialAccountResponse =
            self.call(Api::CreateOfficialAccount, &req).await?;
        Ok(resp.official_account_user_id)
    }
}

fn subscriber_outcome(batch: &SubscriberBatch, resp: SubscriberBatchResponse) -> BatchOutcome {
    outcome_in_order(
        batch.as_slice(),
        resp.results
            .into_iter()
            .map(|r| (r.account, ItemOutcome::from_subscriber_result(r.result))),
    )
}

fn follow_outcome(batch: &FollowBatch, resp: FollowBatchResponse) -> BatchOutcome {
    outcome_in_order(
        batch.as_slice(),
        resp.results.into_iter().map(|r| {
            let o = if r.result_code == 0 {
                ItemOutcome::Applied
            } else {
                ItemOutcome::Failed
            };
            (r.to_account, o)
        }),
    )
}

fn transport_error(api: Api, e: reqwest::Error) -> ApiError {
    // The URL carries the UserSig: never let it into a message or a log.
    let e = e.without_url();
    if e.is_timeout() {
        ApiError::Timeout { api }
    } else if e.is_connect() {
        ApiError::Connect {
            api,
            detail: e.to_string(),
        }
    } else if let Some(status) = e.status() {
        ApiError::Http {
            api,
            status: status.as_u16(),
        }
    } else {
        // Connection reset mid-request, truncated body, ...: all transient.
        ApiError::Connect {
            api,
            detail: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_answers_count_as_failed() {
        let req: Vec<UserId> = ["a", "b", "c"]
            .iter()
            .map(|s| UserId::parse(*s).unwrap())
            .collect();
        let out = outcome_in_order(
            &req,
            [
                ("b".to_owned(), ItemOutcome::Noop),
                ("a".to_owned(), ItemOutcome::Applied),
            ]
            .into_iter(),
        );
        let kinds: Vec<_> = out.items.iter().map(|(_, o)| *o).collect();
        assert_eq!(
            kinds,
            [ItemOutcome::Applied, ItemOutcome::Noop, ItemOutcome::Failed]
        );
    }

    #[test]
    fn usersig_is_cached_and_valid() {
        let c = TencentClient::new(ClientOptions {
            base_url: "http://127.0.0.1:1".into(),
            sdkappid: 1_400_000_000,
            secret_key: SecretString::from("k"),
            admin_identifier: "administrator".into(),
            timeout: Duration::from_secs(5),
        })
        .unwrap();
        let a = c.admin_usersig();
        assert_eq!(a, c.admin_usersig());
        let claims = usersig::verify(&a, "k", 1_400_000_000, "administrator", unix_now()).unwrap();
        assert_eq!(claims.expire, USERSIG_LIFETIME);
    }
}
