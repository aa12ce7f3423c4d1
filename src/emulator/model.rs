//! The serde types shared by the in-process API of the emulator and its
//! test-only HTTP routes under `/emulator/`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// State to add to the emulator (`POST /emulator/seed`, [`super::Emulator::seed`]).
///
/// Seeding is additive: channels are created if missing, subscribers are
/// appended in the order given (each later one with a later subscribe
/// sequence; accounts already subscribed are left where they are), follows
/// are added if missing. Seeding bypasses every vendor limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Seed {
    pub channels: Vec<SeedChannel>,
    pub follows: Vec<SeedFollow>,
    /// Most channels one account may subscribe to through `add_subscriber`
    /// (130010 beyond it). `None` leaves the current setting (unlimited at
    /// start).
    pub user_channel_limit: Option<u64>,
    /// What paging cursors mean from now on (see [`CursorMode`]). `None`
    /// leaves the current mode. Cursors handed out under another mode are
    /// refused afterwards (6017 / 30001), as a cursor the API never returned.
    pub cursor: Option<CursorMode>,
}

/// What `Next` (`get_subscriber_info`) and `StartCursor` (`follow_get`)
/// mean. The vendor describes `Next` only as "the position of the subscriber
/// last pulled" and promises nothing about changes between pages, so the
/// emulator can play each plausible reading:
///
/// - `offset` (the default, the pessimistic reading): the cursor is a
///   position in the list as it is when the next page is read, in subscribe
///   order. A removal before the cursor shifts everyone after it back by
///   one, so the next page skips one member that was never listed.
/// - `key`: the cursor names the last account listed, and the list is kept
///   in account order; the next page starts after that account, wherever
///   it is now. Removals skip no one; an account added that sorts before
///   the cursor is not listed by this pass.
/// - `stable`: the cursor is a position that stays correct under removals
///   (after this subscription, in subscribe order); additions land at the
///   end and are listed.
///
/// `get_subscribed_official_account_list` takes a numeric `Offset`, which
/// has no other reading: it is an offset into the current list in every
/// mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CursorMode {
    #[default]
    Offset,
    Key,
    Stable,
}

impl CursorMode {
    pub const ALL: [CursorMode; 3] = [CursorMode::Offset, CursorMode::Key, CursorMode::Stable];

    pub fn name(self) -> &'static str {
        match self {
            CursorMode::Offset => "offset",
            CursorMode::Key => "key",
            CursorMode::Stable => "stable",
        }
    }
}

impl std::fmt::Display for CursorMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for CursorMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CursorMode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("{s:?} is not a cursor mode (offset, key, stable)"))
    }
}

/// One official channel to create or extend.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SeedChannel {
    /// The `OfficialAccountUserID` (`@TOA#_...`). Not validated, so a test
    /// may seed an id the vendor would never hand out.
    pub id: String,
    /// Set if given (also on an existing channel).
    pub owner: Option<String>,
    /// Set if given (also on an existing channel).
    pub name: Option<String>,
    /// `add_subscriber` answers 130006 beyond it. Set if given.
    pub max_subscribers: Option<u64>,
    /// Appended in order.
    pub subscribers: Vec<String>,
}

impl SeedChannel {
    /// A channel with these subscribers, in this order.
    pub fn new<I, S>(id: impl Into<String>, subscribers: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        SeedChannel {
            id: id.into(),
            subscribers: subscribers.into_iter().map(Into::into).collect(),
            ..SeedChannel::default()
        }
    }
}

/// Directed follows: `from` follows each of `to`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SeedFollow {
    pub from: String,
    pub to: Vec<String>,
}

impl SeedFollow {
    pub fn new<I, S>(from: impl Into<String>, to: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        SeedFollow {
            from: from.into(),
            to: to.into_iter().map(Into::into).collect(),
        }
    }
}

/// The fault set (`PUT /emulator/faults`, [`super::Emulator::set_faults`]).
/// Setting it replaces the previous set and re-seeds the fault RNG, so a
/// given sequence of calls meets the same faults every run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Faults {
    pub rules: Vec<FaultRule>,
    /// RNG seed for this fault set; `None` = the emulator's configured seed.
    pub seed: Option<u64>,
}

impl Faults {
    pub fn new(rules: Vec<FaultRule>) -> Self {
        Faults { rules, seed: None }
    }
}

/// One fault rule. It *matches* a call to its `api` (or any API), and
/// *fires* on a matching call with probability `rate`, at most `count` times.
/// When several rules fire on one call their effects combine: the longest
/// latency, the first HTTP status, the first error code, the highest
/// per-item failure rate and the union of the failing accounts.
///
/// A fired rule acts in this order: `latency_ms` (the call is delayed, then
/// goes on); `http_status` (answered with that status and a non-JSON body);
/// `error_code` (answered `ActionStatus` FAIL with that code); otherwise the
/// call is carried out and `item_failure_rate` / `fail_accounts` fail single
/// items (`Result` 0, or `ResultCode` 30006 for follow APIs) leaving their
/// state unchanged.
///
/// With `after_apply`, the HTTP status or error code is answered *after* the
/// call has been carried out (the state changes but the client sees a
/// failure), which is what a timeout at the vendor's gateway looks like.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FaultRule {
    /// API name (`delete_subscriber`, `follow_delete`, ...); `None` = every API.
    pub api: Option<String>,
    /// Answer this `ErrorCode`.
    pub error_code: Option<i64>,
    /// Answer this HTTP status (e.g. 502) with a non-JSON body.
    pub http_status: Option<u16>,
    /// Probability that the rule fires on a matching call (0.0..=1.0, default 1.0).
    pub rate: f64,
    /// Fire at most this many times, then stay inert; `None` = unlimited.
    pub count: Option<u64>,
    /// Probability that each item of a batch fails on its own (0.0..=1.0).
    pub item_failure_rate: f64,
    /// These accounts fail as items every time the rule fires.
    pub fail_accounts: Vec<String>,
    /// Delay before answering.
    pub latency_ms: u64,
    /// Carry the call out before answering `http_status` / `error_code`.
    pub after_apply: bool,
}

impl Default for FaultRule {
    fn default() -> Self {
        FaultRule {
            api: None,
            error_code: None,
            http_status: None,
            rate: 1.0,
            count: None,
            item_failure_rate: 0.0,
            fail_accounts: Vec::new(),
            latency_ms: 0,
            after_apply: false,
        }
    }
}

impl FaultRule {
    /// A rule for one API (`None` = every API) that does nothing yet.
    pub fn for_api(api: Option<&str>) -> Self {
        FaultRule {
            api: api.map(str::to_owned),
            ..FaultRule::default()
        }
    }

    /// Answer `code` on every matching call.
    pub fn error_code(api: Option<&str>, code: i64) -> Self {
        FaultRule {
            error_code: Some(code),
            ..FaultRule::for_api(api)
        }
    }

    /// Answer HTTP `status` on every matching call.
    pub fn http_status(api: Option<&str>, status: u16) -> Self {
        FaultRule {
            http_status: Some(status),
            ..FaultRule::for_api(api)
        }
    }

    /// Delay every matching call.
    pub fn latency(api: Option<&str>, ms: u64) -> Self {
        FaultRule {
            latency_ms: ms,
            ..FaultRule::for_api(api)
        }
    }

    /// These accounts fail as items.
    pub fn fail_accounts<I, S>(api: Option<&str>, accounts: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        FaultRule {
            fail_accounts: accounts.into_iter().map(Into::into).collect(),
            ..FaultRule::for_api(api)
        }
    }

    /// Fire at most `n` times.
    pub fn times(mut self, n: u64) -> Self {
        self.count = Some(n);
        self
    }

    /// Fire with probability `p`.
    pub fn with_rate(mut self, p: f64) -> Self {
        self.rate = p;
        self
    }

    /// Checks what the HTTP route refuses: unknown API names, probabilities
    /// outside 0..=1, HTTP statuses that are not errors.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(api) = &self.api {
            if !crate::tencent::Api::ALL.iter().any(|a| a.name() == api) {
                return Err(format!("unknown api {api:?}"));
            }
        }
        if !(0.0..=1.0).contains(&self.rate) {
            return Err(format!("rate {} is not within 0..=1", self.rate));
        }
        if !(0.0..=1.0).contains(&self.item_failure_rate) {
            return Err(format!(
                "item_failure_rate {} is not within 0..=1",
                self.item_failure_rate
            ));
        }
        if let Some(s) = self.http_status {
            if !(400..=599).contains(&s) {
                return Err(format!("http_status {s} is not within 400..=599"));
            }
        }
        if self.error_code == Some(0) {
            return Err("error_code 0 is success, not a fault".into());
        }
        Ok(())
    }
}

/// What the emulator has seen, per API name (every API is present, at zero
/// if never called).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Stats {
    pub apis: BTreeMap<String, ApiStats>,
}

impl Stats {
    /// The stats of one API (zero if absent).
    pub fn api(&self, name: &str) -> ApiStats {
        self.apis.get(name).cloned().unwrap_or_default()
    }

    /// Calls over all APIs.
    pub fn total_calls(&self) -> u64 {
        self.apis.values().map(|a| a.calls).sum()
    }
}

/// Counters of one API. `calls` and everything derived from calls count the
/// requests that passed the parameter and UserSig/admin checks (including
/// those then refused with 60007); requests refused by those checks are
/// counted in `refused` only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ApiStats {
    pub calls: u64,
    /// Sum over calls of the length of the request's item list
    /// (`SubscriberToDel_Account`, `SubscriberList`, `To_Account`,
    /// `FollowItem`) as sent, whatever the answer.
    pub items: u64,
    /// Longest item list sent in one call.
    pub max_items: u64,
    /// Answers by `ErrorCode` (`"0"` success) or HTTP fault (`"http_502"`).
    pub error_codes: BTreeMap<String, u64>,
    /// Most calls that arrived within any sliding 1-second window.
    pub peak_calls_per_second: u64,
    /// Items (or whole calls, for create/destroy) that changed state.
    pub applied: u64,
    /// Items that were already in the requested state (`Result` 2, or a
    /// `follow_delete` of someone not followed).
    pub noop: u64,
    /// Items failed by fault injection.
    pub item_failures: u64,
    /// Requests refused before they counted as calls, by `ErrorCode`
    /// (parameters 60002/60012, 60006, UserSig 700xx, not an admin 60010).
    pub refused: BTreeMap<String, u64>,
}

impl ApiStats {
    /// How many answers carried this code (`"0"`, `"60007"`, `"http_502"`).
    pub fn code(&self, code: &str) -> u64 {
        self.error_codes.get(code).copied().unwrap_or(0)
    }
}

/// One call as the emulator saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CallRecord {
    /// API name (`delete_subscriber`, ...).
    pub api: String,
    /// Arrival, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// `ErrorCode` answered (0 success); 0 when an HTTP fault was answered.
    pub error_code: i64,
    /// The HTTP status of an injected HTTP fault; `None` for a normal answer.
    pub http_status: Option<u16>,
    /// `Official_Account`, `From_Account`, `Subscriber_Account` or
    /// `Owner_Account` of the body, when it carried one as a string.
    pub key: Option<String>,
    /// The accounts of the item list, as sent (strings only).
    pub accounts: Vec<String>,
    /// The request's `random` parameter.
    pub random: u32,
}
