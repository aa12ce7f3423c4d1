//! The event document (Standard Webhooks payload shape) and its strict
//! parsing. Every refusal names the offending field, so a sender can fix it.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::domain::IdError;
use crate::domain::{ChannelId, UserId};

/// Most entries one list of an event may carry: bounded work per event.
pub const MAX_LIST: usize = 10_000;

/// A parsed, valid event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    pub data: EventData,
}

/// `data`: whose account, and what the event knows of its relationships.
/// `None` means the event did not say (rules may then fall back to config or
/// resolution); `Some(vec![])` means "none".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventData {
    pub user_id: UserId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<Vec<ChannelId>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub following: Option<Vec<UserId>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub followers: Option<Vec<UserId>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owned_channels: Option<Vec<ChannelId>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
}

/// Why a document is not a valid event: the JSON path of the field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct ParseError {
    pub field: String,
    pub problem: String,
}

fn err(field: impl Into<String>, problem: impl Into<String>) -> ParseError {
    ParseError {
        field: field.into(),
        problem: problem.into(),
    }
}

impl Event {
    /// Parses the exact bytes received.
    pub fn parse(bytes: &[u8]) -> Result<Event, ParseError> {
        // Most events are well-formed: read them straight into typed fields.
        // Anything the fast path refuses is parsed again the slow way, which
        // names the offending field (and is the authority on the answer).
        match fast::parse(bytes) {
            Some(e) => Ok(e),
            None => Self::parse_checked(bytes),
        }
    }

    /// Field-by-field parsing with precise errors.
    pub fn parse_checked(bytes: &[u8]) -> Result<Event, ParseError> {
        let doc: Value = serde_json::from_slice(bytes)
            .map_err(|e| err("(body)", format!("is not valid JSON: {e}")))?;
        let Value::Object(root) = doc else {
            return Err(err("(body)", "must be a JSON object"));
        };
        let kind = match root.get("type") {
            Some(Value::String(s)) if !s.trim().is_empty() && s.len() <= 128 => s.clone(),
            Some(Value::String(_)) => return Err(err("type", "must be 1 to 128 characters")),
            Some(_) => return Err(err("type", "must be a string")),
            None => return Err(err("type", "is required")),
        };
        let timestamp = match root.get("timestamp") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(err("timestamp", "must be a string")),
        };
        let data = match root.get("data") {
            Some(Value::Object(d)) => d,
            Some(_) => return Err(err("data", "must be an object")),
            None => return Err(err("data", "is required")),
        };
        let user_id = match data.get("user_id") {
            Some(Value::String(s)) => {
                UserId::parse(s.as_str()).map_err(|e| id_err("data.user_id", e))?
            }
            Some(_) => return Err(err("data.user_id", "must be a string")),
            None => return Err(err("data.user_id", "is required")),
        };
        let tier = match data.get("tier") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(err("data.tier", "must be a string")),
        };
        Ok(Event {
            kind,
            timestamp,
            data: EventData {
                user_id,
                channels: list(data, "channels", |s| ChannelId::parse(s))?,
                following: list(data, "following", |s| UserId::parse(s))?,
                followers: list(data, "followers", |s| UserId::parse(s))?,
                owned_channels: list(data, "owned_channels", |s| ChannelId::parse(s))?,
                tier,
            },
        })
    }

    /// Compact JSON of the parsed event.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an Event always serializes")
    }
}

fn id_err(field: &str, e: IdError) -> ParseError {
    err(field, e.to_string())
}

fn list<T>(
    data: &Map<String, Value>,
    name: &str,
    parse: fn(&str) -> Result<T, IdError>,
) -> Result<Option<Vec<T>>, ParseError> {
    match data.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => {
            if items.len() > MAX_LIST {
                return Err(err(
                    format!("data.{name}"),
                    format!("must have at most {MAX_LIST} entries"),
                ));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => {
                        parse(s).map_err(|e| id_err(&format!("data.{name}[{i}]"), e))
                    }
                    _ => Err(err(format!("data.{name}[{i}]"), "must be a string")),
                })
                .collect::<Result<Vec<T>, _>>()
                .map(Some)
        }
        Some(_) => Err(err(format!("data.{name}"), "must be an array of strings")),
    }
}

/// The typed fast path: `None` whenever anything is off.
mod fast {
    use std::borrow::Cow;

    use serde::Deserialize;

    use super::{Event, EventData, MAX_LIST};
    use crate::domain::{ChannelId, UserId};

    /// A string borrowed from the body unless it holds escapes, so an id
    /// goes straight into its 16 bytes (or one allocation if longer), not
    /// through a `String` of its own first. (A bare `Cow` in a list is
    /// always owned: serde borrows only a field's own `Cow`.)
    #[derive(Deserialize)]
    #[serde(transparent)]
    struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

    #[derive(Deserialize)]
    struct Doc<'a> {
        #[serde(rename = "type")]
        kind: String,
        #[serde(default)]
        timestamp: Option<String>,
        #[serde(borrow)]
        data: Data<'a>,
    }

    #[derive(Deserialize)]
    struct Data<'a> {
        #[serde(borrow)]
        user_id: Cow<'a, str>,
        #[serde(default, borrow)]
        channels: Option<Vec<Text<'a>>>,
        #[serde(default, borrow)]
        following: Option<Vec<Text<'a>>>,
        #[serde(default, borrow)]
        followers: Option<Vec<Text<'a>>>,
        #[serde(default, borrow)]
        owned_channels: Option<Vec<Text<'a>>>,
        #[serde(default)]
        tier: Option<String>,
    }

    fn ids<T>(
        list: Option<Vec<Text<'_>>>,
        parse: fn(&str) -> Result<T, crate::domain::IdError>,
    ) -> Option<Option<Vec<T>>> {
        match list {
            None => Some(None),
            Some(v) if v.len() > MAX_LIST => None,
            Some(v) => v
                .iter()
                .map(|s| parse(&s.0).ok())
                .collect::<Option<Vec<T>>>()
                .map(Some),
        }
    }

    pub(super) fn parse(bytes: &[u8]) -> Option<Event> {
        let doc: Doc = serde_json::from_slice(bytes).ok()?;
        if doc.kind.trim().is_empty() || doc.kind.len() > 128 {
            return None;
        }
        let d = doc.data;
        Some(Event {
            kind: doc.kind,
            timestamp: doc.timestamp,
            data: EventData {
                user_id: UserId::parse(&d.user_id).ok()?,
                channels: ids(d.channels, |s| ChannelId::parse(s))?,
                following: ids(d.following, |s| UserId::parse(s))?,
                followers: ids(d.followers, |s| UserId::parse(s))?,
                owned_channels: ids(d.owned_channels, |s| ChannelId::parse(s))?,
                tier: d.tier,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_path_takes_escaped_ids_too() {
        // Borrowed where it can be, owned where an escape must be undone.
        let e = fast::parse(
            br#"{"type":"user.banned","data":{"user_id":"a\u0062c","channels":["@TOA#_x","@TOA#_\u0079"],"followers":["f\"1"]}}"#,
        )
        .expect("the fast path parses it");
        assert_eq!(e.data.user_id.as_str(), "abc");
        let channels: Vec<&str> = e
            .data
            .channels
            .iter()
            .flatten()
            .map(|c| c.as_str())
            .collect();
        assert_eq!(channels, ["@TOA#_x", "@TOA#_y"]);
        assert_eq!(e.data.followers.unwrap()[0].as_str(), "f\"1");
    }

    #[test]
    fn the_contract_example_parses() {
        let e = Event::parse(
            br#"{"type":"user.banned","timestamp":"2026-11-21T10:00:00Z","data":{
              "user_id":"107867","channels":["@TOA#_news"],"following":["UserID_002"],
              "followers":["UserID_009"],"owned_channels":["@TOA#_mine"],"tier":"free"}}"#,
        )
        .unwrap();
        assert_eq!(e.kind, "user.banned");
        assert_eq!(e.data.user_id.as_str(), "107867");
        assert_eq!(e.data.channels.as_ref().unwrap()[0].as_str(), "@TOA#_news");
        let again = Event::parse(&e.to_json()).unwrap();
        assert_eq!(again, e);
    }

    #[test]
    fn errors_name_the_field() {
        let cases: &[(&[u8], &str)] = &[
            (b"nope", "(body)"),
            (b"[]", "(body)"),
            (br#"{"data":{"user_id":"1"}}"#, "type"),
            (br#"{"type":1,"data":{"user_id":"1"}}"#, "type"),
            (br#"{"type":"t"}"#, "data"),
            (br#"{"type":"t","data":{}}"#, "data.user_id"),
            (br#"{"type":"t","data":{"user_id":7}}"#, "data.user_id"),
            (br#"{"type":"t","data":{"user_id":""}}"#, "data.user_id"),
            (
                br#"{"type":"t","data":{"user_id":"1","channels":"x"}}"#,
                "data.channels",
            ),
            (
                br#"{"type":"t","data":{"user_id":"1","channels":["@TOA#_a",3]}}"#,
                "data.channels[1]",
            ),
            (
                br#"{"type":"t","data":{"user_id":"1","channels":["news"]}}"#,
                "data.channels[0]",
            ),
            (
                br#"{"type":"t","data":{"user_id":"1","followers":[""]}}"#,
                "data.followers[0]",
            ),
            (
                br#"{"type":"t","data":{"user_id":"1","tier":5}}"#,
                "data.tier",
            ),
            (
                br#"{"type":"t","timestamp":5,"data":{"user_id":"1"}}"#,
                "timestamp",
            ),
        ];
        for (body, field) in cases {
            let e = Event::parse(body).unwrap_err();
            assert_eq!(&e.field, field, "{}", String::from_utf8_lossy(body));
        }
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Arbitrary JSON, biased towards the event's own keys so that deep
    /// paths of the parser are reached.
    fn arb_json() -> impl Strategy<Value = Value> {
        let key = prop_oneof![
            Just("type".to_owned()),
            Just("data".to_owned()),
            Just("user_id".to_owned()),
            Just("channels".to_owned()),
            Just("following".to_owned()),
            Just("followers".to_owned()),
            Just("owned_channels".to_owned()),
            Just("tier".to_owned()),
            Just("timestamp".to_owned()),
            ".{0,8}",
        ];
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            prop_oneof![
                Just("@TOA#_x".to_owned()),
                Just("user.banned".to_owned()),
                ".{0,300}"
            ]
            .prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                proptest::collection::btree_map(key.clone(), inner, 0..8)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Documents shaped like events, each field sometimes wrong, so both
    /// parsers see mostly valid and nearly valid events.
    fn arb_event_like() -> impl Strategy<Value = Value> {
        let id = prop_oneof![
            4 => "[a-z0-9_]{1,12}".prop_map(Value::String),
            1 => Just(Value::String(String::new())),
            1 => Just(Value::String("bad\nid".into())),
            1 => Just(Value::Null),
            1 => any::<i64>().prop_map(Value::from),
        ];
        let channel = prop_oneof![
            4 => "[a-z0-9]{1,8}".prop_map(|s| Value::String(format!("@TOA#_{s}"))),
            1 => "[a-z0-9]{1,8}".prop_map(Value::String),
            1 => Just(Value::Null),
        ];
        let list = |item: BoxedStrategy<Value>| {
            prop_oneof![
                3 => proptest::collection::vec(item, 0..4).prop_map(Value::Array),
                1 => Just(Value::Null),
                1 => Just(Value::String("x".into())),
            ]
            .boxed()
        };
        let kind = prop_oneof![
            4 => Just(Value::String("user.banned".into())),
            1 => Just(Value::String("  ".into())),
            1 => Just(Value::Null),
            1 => Just(Value::from(3)),
        ];
        (
            kind,
            id.clone(),
            list(channel.clone().boxed()),
            list(id.clone().boxed()),
            list(id.boxed()),
            list(channel.boxed()),
            proptest::option::of(prop_oneof![Just(Value::from("pro")), Just(Value::from(1))]),
            any::<bool>(),
        )
            .prop_map(
                |(kind, user, channels, following, followers, owned, tier, with_data)| {
                    let mut data = serde_json::Map::new();
                    data.insert("user_id".into(), user);
                    data.insert("channels".into(), channels);
                    data.insert("following".into(), following);
                    data.insert("followers".into(), followers);
                    data.insert("owned_channels".into(), owned);
                    if let Some(t) = tier {
                        data.insert("tier".into(), t);
                    }
                    let mut root = serde_json::Map::new();
                    root.insert("type".into(), kind);
                    if with_data {
                        root.insert("data".into(), Value::Object(data));
                    }
                    Value::Object(root)
                },
            )
    }

    proptest! {
        #[test]
        fn event_like_documents_parse_the_same_both_ways(doc in arb_event_like()) {
            let bytes = doc.to_string().into_bytes();
            prop_assert_eq!(Event::parse(&bytes), Event::parse_checked(&bytes));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = Event::parse(&bytes);
        }

        #[test]
        fn arbitrary_json_never_panics_and_valid_events_round_trip(doc in arb_json()) {
            if let Ok(e) = Event::parse(doc.to_string().as_bytes()) {
                prop_assert_eq!(Event::parse(&e.to_json()).unwrap(), e);
            }
        }

        #[test]
        fn the_fast_path_agrees_with_the_checked_one(doc in arb_json()) {
            let bytes = doc.to_string().into_bytes();
            prop_assert_eq!(Event::parse(&bytes), Event::parse_checked(&bytes));
        }
    }
}
