//! The endpoints' semantics: strict field-by-field validation of the body
//! ([`parse`]), then the effect on the state ([`execute`]).

use std::collections::HashSet;
use std::ops::Bound;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Map, Value};

use super::meter::ItemCounts;
use super::model::CursorMode;
use super::state::World;
use crate::domain::CHANNEL_PREFIX;
use crate::tencent::api::{
    MAX_FOLLOWS_PER_CALL, MAX_FOLLOW_CHECK, MAX_FOLLOW_GET, MAX_SUBSCRIBERS_PER_CALL,
    MAX_SUBSCRIBER_PAGE,
};
use crate::tencent::Api;

/// Longest UserID the vendor accepts, in bytes.
pub(crate) const MAX_ACCOUNT_BYTES: usize = 32;

/// "Invalid request parameter" of the official channel APIs.
const BAD_PARAM: i64 = 6017;
/// "Request parameter error" of the follow APIs.
const FOLLOW_BAD_PARAM: i64 = 30001;
const CHANNEL_GONE: i64 = 130004;
const CHANNEL_FULL: i64 = 130006;
const NOT_A_CHANNEL_ID: i64 = 130007;
const CHANNEL_ID_IN_USE: i64 = 130008;
const USER_CHANNEL_LIMIT: i64 = 130010;
/// Per-item code of an injected follow failure.
const FOLLOW_ITEM_FAILURE: i64 = 30006;
const FOLLOW_ITEM_FAILURE_INFO: &str = "Server internal error, please try again.";

/// A whole call refused with `code`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub code: i64,
    pub info: String,
}

/// A validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Request {
    DeleteSubscriber {
        channel: String,
        accounts: Vec<String>,
    },
    AddSubscriber {
        channel: String,
        accounts: Vec<String>,
    },
    Destroy {
        channel: String,
    },
    SubscriberInfo {
        channel: String,
        limit: Option<u64>,
        after: Option<Cursor>,
    },
    FollowDelete {
        from: String,
        to: Vec<String>,
    },
    FollowAdd {
        from: String,
        to: Vec<String>,
    },
    FollowGet {
        from: String,
        kind: u8,
        after: Option<Cursor>,
        want: u64,
    },
    FollowCheck {
        from: String,
        to: Vec<String>,
    },
    SubscribedList {
        account: String,
        limit: u64,
        offset: u64,
    },
    Create {
        owner: String,
        id: Option<String>,
        name: String,
        max: Option<u64>,
    },
}

impl Request {
    /// The batch items that may fail one by one.
    pub fn items(&self) -> &[String] {
        match self {
            Request::DeleteSubscriber { accounts, .. }
            | Request::AddSubscriber { accounts, .. } => accounts,
            Request::FollowDelete { to, .. }
            | Request::FollowAdd { to, .. }
            | Request::FollowCheck { to, .. } => to,
            _ => &[],
        }
    }
}

/// The answer to a call that got as far as the endpoint.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub code: i64,
    pub info: String,
    /// Endpoint fields of a successful answer.
    pub fields: Map<String, Value>,
    pub counts: ItemCounts,
}

impl Outcome {
    fn fail(code: i64, info: impl Into<String>) -> Self {
        Outcome {
            code,
            info: info.into(),
            ..Outcome::default()
        }
    }

    fn ok(fields: Value, counts: ItemCounts) -> Self {
        let fields = match fields {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        Outcome {
            fields,
            counts,
            ..Outcome::default()
        }
    }
}

impl From<Refusal> for Outcome {
    fn from(r: Refusal) -> Self {
        Outcome::fail(r.code, r.info)
    }
}

/// Why `account` is not a UserID the vendor accepts, if it is not.
pub(crate) fn account_problem(account: &str) -> Option<&'static str> {
    if account.is_empty() {
        Some("empty")
    } else if account.len() > MAX_ACCOUNT_BYTES {
        Some("longer than 32 bytes")
    } else if account.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("contains whitespace or control characters")
    } else {
        None
    }
}

pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Typed access to the body's fields; every failure is a [`Refusal`] with
/// the API's parameter-error code.
struct Body<'a> {
    obj: &'a Map<String, Value>,
    bad: i64,
}

impl<'a> Body<'a> {
    fn refuse(&self, info: impl Into<String>) -> Refusal {
        Refusal {
            code: self.bad,
            info: info.into(),
        }
    }

    fn required(&self, name: &str) -> Result<&'a Value, Refusal> {
        self.obj
            .get(name)
            .ok_or_else(|| self.refuse(format!("{name} is required")))
    }

    fn string(&self, name: &str) -> Result<&'a str, Refusal> {
        let v = self.required(name)?;
        v.as_str()
            .ok_or_else(|| self.refuse(format!("{name} must be a string, not {}", type_name(v))))
    }

    fn account(&self, name: &str) -> Result<&'a str, Refusal> {
        let s = self.string(name)?;
        match account_problem(s) {
            Some(why) => Err(self.refuse(format!("{name} {s:?} is not a valid UserID: {why}"))),
            None => Ok(s),
        }
    }

    fn integer(&self, name: &str, v: &Value) -> Result<u64, Refusal> {
        v.as_u64().ok_or_else(|| {
            self.refuse(format!(
                "{name} must be a non-negative integer, not {}",
                match v {
                    Value::Number(n) => n.to_string(),
                    other => type_name(other).to_owned(),
                }
            ))
        })
    }

    fn u64_in(&self, name: &str, lo: u64, hi: u64) -> Result<u64, Refusal> {
        let v = self.required(name)?;
        let n = self.integer(name, v)?;
        if n < lo || n > hi {
            return Err(self.refuse(format!("{name} {n} is not within {lo}..={hi}")));
        }
        Ok(n)
    }

    fn opt_u64_in(&self, name: &str, lo: u64, hi: u64) -> Result<Option<u64>, Refusal> {
        if self.obj.contains_key(name) {
            self.u64_in(name, lo, hi).map(Some)
        } else {
            Ok(None)
        }
    }

    /// A list of accounts: strings, or objects carrying the account in `inner`.
    fn accounts(
        &self,
        name: &str,
        inner: Option<&str>,
        max: usize,
    ) -> Result<Vec<String>, Refusal> {
        let v = self.required(name)?;
        let Some(list) = v.as_array() else {
            return Err(self.refuse(format!("{name} must be an array, not {}", type_name(v))));
        };
        if list.is_empty() {
            return Err(self.refuse(format!("{name} is empty; it needs 1 to {max} accounts")));
        }
        if list.len() > max {
            return Err(self.refuse(format!(
                "{name} carries {} accounts; at most {max} per call",
                list.len()
            )));
        }
        let mut out = Vec::with_capacity(list.len());
        let mut seen = HashSet::with_capacity(list.len());
        for (i, item) in list.iter().enumerate() {
            let (account, what) = match inner {
                None => (item.as_str(), format!("{name}[{i}]")),
                Some(key) => {
                    let what = format!("{name}[{i}].{key}");
                    let Some(obj) = item.as_object() else {
                        return Err(self.refuse(format!(
                            "{name}[{i}] must be an object with {key}, not {}",
                            type_name(item)
                        )));
                    };
                    match obj.get(key) {
                        None => return Err(self.refuse(format!("{what} is required"))),
                        Some(v) => match v.as_str() {
                            Some(s) => (Some(s), what),
                            None => {
                                return Err(self.refuse(format!(
                                    "{what} must be a string, not {}",
                                    type_name(v)
                                )))
                            }
                        },
                    }
                }
            };
            let Some(account) = account else {
                return Err(
                    self.refuse(format!("{what} must be a string, not {}", type_name(item)))
                );
            };
            if let Some(why) = account_problem(account) {
                return Err(self.refuse(format!("{what} {account:?} is not a valid UserID: {why}")));
            }
            if !seen.insert(account) {
                return Err(self.refuse(format!(
                    "{what} {account:?} appears more than once in one call"
                )));
            }
            out.push(account.to_owned());
        }
        Ok(out)
    }
}

fn channel_id(id: &str) -> Result<(), Refusal> {
    if id.len() > CHANNEL_PREFIX.len() && id.starts_with(CHANNEL_PREFIX) {
        Ok(())
    } else {
        Err(Refusal {
            code: NOT_A_CHANNEL_ID,
            info: format!(
                "Official_Account {id:?} is not an official channel user ID (\"{CHANNEL_PREFIX}...\")"
            ),
        })
    }
}

// ---- cursors

/// 32-bit FNV-1a, to tie a cursor to what it lists.
fn fnv32(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// What a cursor holds, by [`CursorMode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Cursor {
    /// `offset`: skip this many entries of the list as it is now.
    Offset(u64),
    /// `key`: after this account, in account order.
    Key(String),
    /// `stable`: after the entry with this sequence number.
    Seq(u64),
}

impl Cursor {
    fn mode(&self) -> CursorMode {
        match self {
            Cursor::Offset(_) => CursorMode::Offset,
            Cursor::Key(_) => CursorMode::Key,
            Cursor::Seq(_) => CursorMode::Stable,
        }
    }
}

/// An opaque cursor for the listing `scope`: a tag byte, the payload and a
/// checksum of the scope, base64.
pub(crate) fn encode_cursor(scope: &str, cursor: &Cursor) -> String {
    let mut bytes = Vec::with_capacity(16);
    match cursor {
        Cursor::Offset(n) => {
            bytes.push(b'o');
            bytes.extend_from_slice(&n.to_be_bytes());
        }
        Cursor::Seq(n) => {
            bytes.push(b's');
            bytes.extend_from_slice(&n.to_be_bytes());
        }
        Cursor::Key(k) => {
            bytes.push(b'k');
            bytes.extend_from_slice(k.as_bytes());
        }
    }
    bytes.extend_from_slice(&fnv32(scope).to_be_bytes());
    STANDARD.encode(bytes)
}

pub(crate) fn decode_cursor(scope: &str, cursor: &str) -> Option<Cursor> {
    let bytes = STANDARD.decode(cursor).ok()?;
    let (body, check) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
    if check != fnv32(scope).to_be_bytes() {
        return None;
    }
    let (&tag, payload) = body.split_first()?;
    let number = || payload.try_into().ok().map(u64::from_be_bytes);
    match tag {
        b'o' => number().map(Cursor::Offset),
        b's' => number().map(Cursor::Seq),
        b'k' => {
            let k = std::str::from_utf8(payload).ok()?;
            (account_problem(k).is_none()).then(|| Cursor::Key(k.to_owned()))
        }
        _ => None,
    }
}

/// The rest of a listing from `after` on, as (sequence, account) pairs:
/// `in_order` walks it in subscribe (follow) order from a sequence number,
/// `keyed` in account order after an account. The offset of an `offset`
/// cursor is applied by [`take_page`], after any filter.
fn rest_of<'a>(
    after: Option<&Cursor>,
    mode: CursorMode,
    in_order: impl FnOnce(u64) -> Box<dyn Iterator<Item = (u64, &'a str)> + 'a>,
    keyed: impl FnOnce(Option<&str>) -> Box<dyn Iterator<Item = (u64, &'a str)> + 'a>,
) -> Box<dyn Iterator<Item = (u64, &'a str)> + 'a> {
    match (mode, after) {
        (CursorMode::Key, Some(Cursor::Key(k))) => keyed(Some(k)),
        (CursorMode::Key, _) => keyed(None),
        (CursorMode::Stable, Some(Cursor::Seq(s))) => in_order(s.saturating_add(1)),
        _ => in_order(0),
    }
}

/// Takes one page of `rest` and the cursor for the next one (`None` when
/// nothing follows).
fn take_page<'a>(
    rest: impl Iterator<Item = (u64, &'a str)>,
    after: Option<&Cursor>,
    mode: CursorMode,
    limit: usize,
) -> (Vec<(u64, &'a str)>, Option<Cursor>) {
    let skip = match after {
        Some(Cursor::Offset(n)) => *n,
        _ => 0,
    };
    let mut rest = rest.skip(usize::try_from(skip).unwrap_or(usize::MAX));
    let page: Vec<(u64, &str)> = rest.by_ref().take(limit).collect();
    let next = match (rest.next(), page.last()) {
        (Some(_), Some(&(seq, account))) => Some(match mode {
            CursorMode::Offset => Cursor::Offset(skip.saturating_add(page.len() as u64)),
            CursorMode::Key => Cursor::Key(account.to_owned()),
            CursorMode::Stable => Cursor::Seq(seq),
        }),
        _ => None,
    };
    (page, next)
}

/// 6017 / 30001 for a cursor handed out under another mode.
fn wrong_mode(code: i64, field: &str, mode: CursorMode) -> Outcome {
    Outcome::fail(
        code,
        format!("{field} is not a cursor this API returned (cursors are now {mode} cursors)"),
    )
}

fn subscribers_scope(channel: &str) -> String {
    format!("subscribers\n{channel}")
}

fn follow_scope(from: &str, kind: u8) -> String {
    format!("follow_get\n{kind}\n{from}")
}

// ---- parse

/// Validates `body` for `api`, field by field.
pub(crate) fn parse(api: Api, body: &Map<String, Value>) -> Result<Request, Refusal> {
    let b = Body {
        obj: body,
        bad: if api.service() == "follow" {
            FOLLOW_BAD_PARAM
        } else {
            BAD_PARAM
        },
    };
    let max_subs = MAX_SUBSCRIBERS_PER_CALL;
    Ok(match api {
        Api::DeleteSubscriber => {
            let channel = b.string("Official_Account")?;
            let accounts = b.accounts("SubscriberToDel_Account", None, max_subs)?;
            channel_id(channel)?;
            Request::DeleteSubscriber {
                channel: channel.to_owned(),
                accounts,
            }
        }
        Api::AddSubscriber => {
            let channel = b.string("Official_Account")?;
            let accounts = b.accounts("SubscriberList", Some("Subscriber_Account"), max_subs)?;
            channel_id(channel)?;
            Request::AddSubscriber {
                channel: channel.to_owned(),
                accounts,
            }
        }
        Api::DestroyOfficialAccount => {
            let channel = b.string("Official_Account")?;
            channel_id(channel)?;
            Request::Destroy {
                channel: channel.to_owned(),
            }
        }
        Api::GetSubscriberInfo => {
            let channel = b.string("Official_Account")?;
            let limit = b.opt_u64_in("Limit", 1, u64::from(MAX_SUBSCRIBER_PAGE))?;
            let next = b.string("Next")?;
            channel_id(channel)?;
            let after = if next.is_empty() {
                None
            } else {
                Some(
                    decode_cursor(&subscribers_scope(channel), next).ok_or_else(|| {
                        b.refuse(format!(
                            "Next {next:?} is not a cursor this API returned for {channel:?}"
                        ))
                    })?,
                )
            };
            Request::SubscriberInfo {
                channel: channel.to_owned(),
                limit,
                after,
            }
        }
        Api::FollowDelete | Api::FollowAdd | Api::FollowCheck => {
            let from = b.account("From_Account")?;
            let to = match api {
                Api::FollowDelete => b.accounts("To_Account", None, MAX_FOLLOWS_PER_CALL)?,
                Api::FollowAdd => {
                    b.accounts("FollowItem", Some("To_Account"), MAX_FOLLOWS_PER_CALL)?
                }
                _ => b.accounts("To_Account", None, MAX_FOLLOW_CHECK)?,
            };
            if to.iter().any(|t| t == from) {
                return Err(b.refuse(format!(
                    "From_Account {from:?} is also a To_Account; an account cannot follow itself"
                )));
            }
            let from = from.to_owned();
            match api {
                Api::FollowDelete => Request::FollowDelete { from, to },
                Api::FollowAdd => Request::FollowAdd { from, to },
                _ => Request::FollowCheck { from, to },
            }
        }
        Api::FollowGet => {
            let from = b.account("From_Account")?;
            let kind = b.u64_in("FollowType", 1, 3)? as u8;
            let start = b.string("StartCursor")?;
            let want = b.u64_in("WantNum", 1, u64::from(MAX_FOLLOW_GET))?;
            let after = if start.is_empty() {
                None
            } else {
                Some(decode_cursor(&follow_scope(from, kind), start).ok_or_else(|| {
                    b.refuse(format!(
                        "StartCursor {start:?} is not a cursor this API returned for this From_Account and FollowType"
                    ))
                })?)
            };
            Request::FollowGet {
                from: from.to_owned(),
                kind,
                after,
                want,
            }
        }
        Api::GetSubscribedOfficialAccountList => {
            let account = b.account("Subscriber_Account")?;
            let limit = b.u64_in("Limit", 1, u64::from(MAX_SUBSCRIBER_PAGE))?;
            let offset = b.u64_in("Offset", 0, u64::MAX)?;
            Request::SubscribedList {
                account: account.to_owned(),
                limit,
                offset,
            }
        }
        Api::CreateOfficialAccount => {
            let owner = b.account("Owner_Account")?;
            let name = b.string("Name")?;
            if name.is_empty() {
                return Err(b.refuse("Name must not be empty"));
            }
            let id = if b.obj.contains_key("OfficialAccountUserID") {
                Some(b.string("OfficialAccountUserID")?)
            } else {
                None
            };
            let max = b.opt_u64_in("MaxSubscriberNum", 1, u64::MAX)?;
            if let Some(id) = id {
                channel_id(id).map_err(|r| Refusal {
                    info: r.info.replace("Official_Account", "OfficialAccountUserID"),
                    ..r
                })?;
            }
            Request::Create {
                owner: owner.to_owned(),
                id: id.map(str::to_owned),
                name: name.to_owned(),
                max,
            }
        }
    })
}

// ---- execute

fn no_channel(channel: &str) -> Outcome {
    Outcome::fail(
        CHANNEL_GONE,
        format!("Official_Account {channel:?} does not exist or has been terminated"),
    )
}

/// Carries out `req`; `failed[i]` marks `req.items()[i]` as failed by fault
/// injection (its state is left unchanged).
pub(crate) fn execute(world: &mut World, req: Request, failed: &[bool], now: i64) -> Outcome {
    let failed_at = |i: usize| failed.get(i).copied().unwrap_or(false);
    let mut counts = ItemCounts::default();
    match req {
        Request::DeleteSubscriber { channel, accounts } => {
            if !world.channels.contains_key(&channel) {
                return no_channel(&channel);
            }
            let mut list = Vec::with_capacity(accounts.len());
            for (i, account) in accounts.into_iter().enumerate() {
                let result = if failed_at(i) {
                    counts.item_failures += 1;
                    0
                } else if world.unsubscribe(&channel, &account) {
                    counts.applied += 1;
                    1
                } else {
                    counts.noop += 1;
                    2
                };
                list.push(json!({"Subscriber_Account": account, "Result": result}));
            }
            Outcome::ok(json!({ "SubscriberList": list }), counts)
        }
        Request::AddSubscriber { channel, accounts } => {
            let Some(ch) = world.channels.get(&channel) else {
                return no_channel(&channel);
            };
            let new: Vec<&String> = accounts
                .iter()
                .enumerate()
                .filter(|&(i, a)| !failed_at(i) && !ch.by_account.contains_key(a))
                .map(|(_, a)| a)
                .collect();
            if let Some(max) = ch.max_subscribers {
                let total = ch.len().saturating_add(new.len() as u64);
                if total > max {
                    return Outcome::fail(
                        CHANNEL_FULL,
                        format!(
                            "Official_Account {channel:?} has {} subscribers of at most {max}; adding {} would exceed it",
                            ch.len(),
                            new.len()
                        ),
                    );
                }
            }
            if let Some(limit) = world.user_channel_limit {
                for account in &new {
                    let n = world.channel_count(account);
                    if n >= limit {
                        return Outcome::fail(
                            USER_CHANNEL_LIMIT,
                            format!(
                                "Subscriber_Account {account:?} already subscribes to {n} official channels, the most allowed"
                            ),
                        );
                    }
                }
            }
            let mut list = Vec::with_capacity(accounts.len());
            for (i, account) in accounts.into_iter().enumerate() {
                let result = if failed_at(i) {
                    counts.item_failures += 1;
                    0
                } else if world.subscribe(&channel, &account, now) {
                    counts.applied += 1;
                    1
                } else {
                    counts.noop += 1;
                    2
                };
                list.push(json!({"Subscriber_Account": account, "Result": result}));
            }
            Outcome::ok(json!({ "SubscriberList": list }), counts)
        }
        Request::Destroy { channel } => {
            if !world.destroy(&channel) {
                return no_channel(&channel);
            }
            counts.applied = 1;
            Outcome::ok(json!({}), counts)
        }
        Request::SubscriberInfo {
            channel,
            limit,
            after,
        } => {
            let Some(ch) = world.channels.get(&channel) else {
                return no_channel(&channel);
            };
            let mode = world.cursor;
            if after.as_ref().is_some_and(|c| c.mode() != mode) {
                return wrong_mode(BAD_PARAM, "Next", mode);
            }
            let limit = limit.map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
            let rest = rest_of(
                after.as_ref(),
                mode,
                |from| {
                    Box::new(
                        ch.by_seq
                            .range(from..)
                            .map(|(&seq, sub)| (seq, sub.account.as_str())),
                    )
                },
                |key| match key {
                    Some(k) => Box::new(
                        ch.by_account
                            .range::<str, _>((Bound::Excluded(k), Bound::Unbounded))
                            .map(|(a, &seq)| (seq, a.as_str())),
                    ),
                    None => Box::new(ch.by_account.iter().map(|(a, &seq)| (seq, a.as_str()))),
                },
            );
            let (page, next) = take_page(rest, after.as_ref(), mode, limit);
            let list: Vec<Value> = page
                .iter()
                .map(|&(seq, account)| {
                    json!({
                        "Subscriber_Account": account,
                        "SubscribeTime": ch.by_seq.get(&seq).map_or(0, |s| s.time),
                        "CustomString": "",
                        "MsgFlag": "AcceptAndNotify",
                        "LastSendMsgTime": 0,
                    })
                })
                .collect();
            let next = next.map_or_else(String::new, |c| {
                encode_cursor(&subscribers_scope(&channel), &c)
            });
            Outcome::ok(
                json!({
                    "Next": next,
                    "SubscriberNum": ch.len(),
                    "SubscriberList": list,
                }),
                counts,
            )
        }
        Request::FollowDelete { from, to } => {
            follow_batch(world, to, failed, |w, t| w.unfollow(&from, t))
        }
        Request::FollowAdd { from, to } => {
            follow_batch(world, to, failed, |w, t| w.follow(&from, t, now))
        }
        Request::FollowGet {
            from,
            kind,
            after,
            want,
        } => {
            let empty = super::state::Edges::default();
            let edges = match kind {
                1 => world.followers.get(&from),
                _ => world.following.get(&from),
            }
            .unwrap_or(&empty);
            let followers = world.followers.get(&from);
            let mode = world.cursor;
            if after.as_ref().is_some_and(|c| c.mode() != mode) {
                return wrong_mode(FOLLOW_BAD_PARAM, "StartCursor", mode);
            }
            let want = usize::try_from(want).unwrap_or(usize::MAX);
            let rest = rest_of(
                after.as_ref(),
                mode,
                |from| {
                    Box::new(
                        edges
                            .by_seq
                            .range(from..)
                            .map(|(&seq, a)| (seq, a.as_str())),
                    )
                },
                |key| match key {
                    Some(k) => Box::new(
                        edges
                            .by_account
                            .range::<str, _>((Bound::Excluded(k), Bound::Unbounded))
                            .map(|(a, &(seq, _))| (seq, a.as_str())),
                    ),
                    None => Box::new(
                        edges
                            .by_account
                            .iter()
                            .map(|(a, &(seq, _))| (seq, a.as_str())),
                    ),
                },
            )
            .filter(|(_, account)| kind != 3 || followers.is_some_and(|f| f.contains(account)));
            let (page, next) = take_page(rest, after.as_ref(), mode, want);
            let items: Vec<Value> = page
                .iter()
                .map(|&(_, account)| {
                    json!({
                        "To_Account": account,
                        "FollowTime": edges.time_of(account).unwrap_or(0),
                    })
                })
                .collect();
            let next = next.map_or_else(String::new, |c| {
                encode_cursor(&follow_scope(&from, kind), &c)
            });
            Outcome::ok(json!({ "FollowItem": items, "NextCursor": next }), counts)
        }
        Request::FollowCheck { from, to } => {
            let mut items = Vec::with_capacity(to.len());
            for (i, account) in to.into_iter().enumerate() {
                if failed_at(i) {
                    counts.item_failures += 1;
                    items.push(json!({
                        "To_Account": account,
                        "FollowType": 0,
                        "ResultCode": FOLLOW_ITEM_FAILURE,
                        "ResultInfo": FOLLOW_ITEM_FAILURE_INFO,
                    }));
                    continue;
                }
                let they_follow_me = world.is_following(&account, &from);
                let i_follow_them = world.is_following(&from, &account);
                let kind = u8::from(they_follow_me) | (u8::from(i_follow_them) << 1);
                items.push(json!({
                    "To_Account": account,
                    "FollowType": kind,
                    "ResultCode": 0,
                    "ResultInfo": "",
                }));
            }
            Outcome::ok(json!({ "ResultItem": items }), counts)
        }
        Request::SubscribedList {
            account,
            limit,
            offset,
        } => {
            let subs = world.user_subs.get(&account);
            let total = subs.map_or(0, |s| s.len() as u64);
            let offset = usize::try_from(offset).unwrap_or(usize::MAX);
            let limit = usize::try_from(limit).unwrap_or(usize::MAX);
            let list: Vec<Value> = subs
                .into_iter()
                .flat_map(|s| s.values())
                .skip(offset)
                .take(limit)
                .map(|(channel, time)| json!({"Official_Account": channel, "SubscribeTime": time}))
                .collect();
            Outcome::ok(
                json!({ "OfficialAccountList": list, "TotalNum": total }),
                counts,
            )
        }
        Request::Create {
            owner,
            id,
            name,
            max,
        } => {
            let id = match id {
                Some(id) => {
                    if world.channels.contains_key(&id) {
                        return Outcome::fail(
                            CHANNEL_ID_IN_USE,
                            format!("OfficialAccountUserID {id:?} is already in use"),
                        );
                    }
                    id
                }
                None => world.generate_channel_id(),
            };
            world.create_channel(&id, Some(owner), name, max);
            counts.applied = 1;
            Outcome::ok(json!({ "OfficialAccountUserID": id }), counts)
        }
    }
}

/// `follow_delete` / `follow_add`: `change` returns whether the state changed
/// (applied) or was already as asked (noop, still `ResultCode` 0).
fn follow_batch(
    world: &mut World,
    to: Vec<String>,
    failed: &[bool],
    mut change: impl FnMut(&mut World, &str) -> bool,
) -> Outcome {
    let mut counts = ItemCounts::default();
    let mut items = Vec::with_capacity(to.len());
    for (i, account) in to.into_iter().enumerate() {
        if failed.get(i).copied().unwrap_or(false) {
            counts.item_failures += 1;
            items.push(json!({
                "To_Account": account,
                "ResultCode": FOLLOW_ITEM_FAILURE,
                "ResultInfo": FOLLOW_ITEM_FAILURE_INFO,
            }));
            continue;
        }
        if change(world, &account) {
            counts.applied += 1;
        } else {
            counts.noop += 1;
        }
        items.push(json!({"To_Account": account, "ResultCode": 0, "ResultInfo": ""}));
    }
    Outcome::ok(json!({ "ResultItem": items }), counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn cursors_are_opaque_and_scoped() {
        let c = encode_cursor("a", &Cursor::Seq(42));
        assert!(c.parse::<u64>().is_err());
        assert_eq!(decode_cursor("a", &c), Some(Cursor::Seq(42)));
        for cur in [Cursor::Offset(7), Cursor::Key("u1".into())] {
            assert_eq!(decode_cursor("a", &encode_cursor("a", &cur)), Some(cur));
        }
        assert_eq!(decode_cursor("b", &c), None);
        assert_eq!(decode_cursor("a", "42"), None);
        assert_eq!(decode_cursor("a", ""), None);
        assert_eq!(decode_cursor("a", "%%%"), None);
    }

    #[test]
    fn accounts() {
        assert_eq!(account_problem("u1"), None);
        assert_eq!(account_problem(&"x".repeat(32)), None);
        assert!(account_problem(&"x".repeat(33)).is_some());
        assert!(account_problem("").is_some());
        assert!(account_problem("a\tb").is_some());
        assert!(account_problem("a\u{a0}b").is_some());
    }

    #[test]
    fn parse_codes_by_service() {
        let code = |api, v| parse(api, &obj(v)).err().map(|r| r.code);
        assert_eq!(code(Api::DeleteSubscriber, json!({})), Some(6017));
        assert_eq!(code(Api::FollowDelete, json!({})), Some(30001));
        assert_eq!(
            code(
                Api::DeleteSubscriber,
                json!({"Official_Account": "x", "SubscriberToDel_Account": ["a"]})
            ),
            Some(130007)
        );
        assert_eq!(
            code(
                Api::FollowCheck,
                json!({"From_Account": "a", "To_Account": vec!["b"; 1]})
            ),
            None
        );
        let many: Vec<String> = (0..101).map(|i| format!("u{i}")).collect();
        assert_eq!(
            code(
                Api::FollowCheck,
                json!({"From_Account": "a", "To_Account": many})
            ),
            Some(30001)
        );
        assert_eq!(
            code(
                Api::GetSubscribedOfficialAccountList,
                json!({"Subscriber_Account": "a", "Limit": 201, "Offset": 0})
            ),
            Some(6017)
        );
    }

    #[test]
    fn subscriber_info_without_limit_lists_everything() {
        let mut w = World::default();
        w.create_channel("@TOA#_c", None, String::new(), None);
        for i in 0..5 {
            w.subscribe("@TOA#_c", &format!("u{i}"), 1);
        }
        let req = parse(
            Api::GetSubscriberInfo,
            &obj(json!({"Official_Account": "@TOA#_c", "Next": ""})),
        )
        .unwrap();
        let out = execute(&mut w, req, &[], 1);
        assert_eq!(out.code, 0);
        assert_eq!(out.fields["SubscriberList"].as_array().unwrap().len(), 5);
        assert_eq!(out.fields["Next"], "");
        assert_eq!(out.fields["SubscriberNum"], 5);
    }
}
