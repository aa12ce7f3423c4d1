//! Event to actions, driven by `[rules]` in the configuration. Rules are data:
//! a new event type is a new table in the config file, not new code.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::domain::{Action, ChannelId};
use crate::event::{Event, ParseError};

/// Which channels a rule acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelSource {
    /// None.
    None,
    /// `data.channels` only.
    Channels,
    /// `data.channels`, else `[channels].managed`.
    ChannelsOrManaged,
    /// `data.channels`, else by `data.tier`: for `unsubscribe`, the managed
    /// channels whose required tier is above it; for `subscribe`, those
    /// whose required tier it reaches.
    ChannelsOrTier,
}

/// One event type's rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Channels to unsubscribe `user_id` from.
    #[serde(default = "none_source")]
    pub unsubscribe: ChannelSource,
    /// Remove `user_id`'s follows both ways: From=user To=`following`, and
    /// From=each of `followers` To=user.
    #[serde(default)]
    pub unfollow: bool,
    /// Destroy `owned_channels`.
    #[serde(default)]
    pub destroy_owned: bool,
    /// Channels to (re)subscribe `user_id` to (restore).
    #[serde(default = "none_source")]
    pub subscribe: ChannelSource,
    /// When `channels`, `following` or `followers` is absent, ask upstream
    /// (`get_subscribed_official_account_list`, `follow_get`) instead of
    /// falling back to the managed channels or to nothing.
    #[serde(default)]
    pub resolve: bool,
}

fn none_source() -> ChannelSource {
    ChannelSource::None
}

/// The contract's default rules; config tables override them per type.
pub fn default_rules() -> BTreeMap<String, Rule> {
    let banned = Rule {
        unsubscribe: ChannelSource::ChannelsOrManaged,
        unfollow: true,
        destroy_owned: false,
        subscribe: ChannelSource::None,
        resolve: false,
    };
    let restore = Rule {
        unsubscribe: ChannelSource::None,
        unfollow: false,
        destroy_owned: false,
        subscribe: ChannelSource::Channels,
        resolve: false,
    };
    BTreeMap::from([
        ("user.banned".to_owned(), banned.clone()),
        (
            "account.deleted".to_owned(),
            Rule {
                destroy_owned: true,
                ..banned
            },
        ),
        (
            "tier.downgraded".to_owned(),
            Rule {
                unsubscribe: ChannelSource::ChannelsOrTier,
                destroy_owned: true,
                subscribe: ChannelSource::None,
                ..restore.clone()
            },
        ),
        ("user.unbanned".to_owned(), restore.clone()),
        (
            "tier.upgraded".to_owned(),
            Rule {
                subscribe: ChannelSource::ChannelsOrTier,
                ..restore
            },
        ),
    ])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Unsubscribe,
    Subscribe,
}

fn fingerprint_of(snapshot: &[u8]) -> u64 {
    let h = Sha256::digest(snapshot);
    u64::from_le_bytes(h[..8].try_into().expect("8 bytes"))
}

/// Why an event cannot be turned into actions.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("no rule for event type {0:?}")]
    UnknownType(String),
    #[error(transparent)]
    Field(#[from] ParseError),
}

/// The rules and the channel facts they need, built once from settings.
#[derive(Debug, Clone)]
pub struct Rules {
    rules: BTreeMap<String, Rule>,
    managed: Vec<ChannelId>,
    /// Tier names, lowest first.
    tiers: Vec<String>,
    /// Managed channel -> rank of the tier it requires.
    required_rank: BTreeMap<ChannelId, usize>,
    /// Of `snapshot()`: which rules planned an event (its record is planned
    /// again with them on read).
    fingerprint: u64,
}

/// Everything a plan depends on, as kept beside the records it planned.
#[derive(Serialize, Deserialize)]
struct Snapshot {
    rules: BTreeMap<String, Rule>,
    managed: Vec<ChannelId>,
    tiers: Vec<String>,
    required_rank: BTreeMap<ChannelId, usize>,
}

/// The channel facts rules need: `[channels]`, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleChannels {
    /// Channels a user leaves when an event names none.
    pub managed: Vec<ChannelId>,
    /// Tier names, lowest first.
    pub tiers: Vec<String>,
    /// Managed channel -> the tier it requires.
    pub required_tier: BTreeMap<ChannelId, String>,
}

impl Rules {
    pub fn new(rules: BTreeMap<String, Rule>, channels: &RuleChannels) -> Rules {
        let tiers = channels.tiers.clone();
        let required_rank = channels
            .required_tier
            .iter()
            .filter_map(|(c, t)| Some((c.clone(), tiers.iter().position(|x| x == t)?)))
            .collect();
        Rules::from_parts(Snapshot {
            rules,
            managed: channels.managed.clone(),
            tiers,
            required_rank,
        })
    }

    fn from_parts(s: Snapshot) -> Rules {
        let mut rules = Rules {
            rules: s.rules,
            managed: s.managed,
            tiers: s.tiers,
            required_rank: s.required_rank,
            fingerprint: 0,
        };
        rules.fingerprint = fingerprint_of(&rules.snapshot());
        rules
    }

    /// The rules as JSON (map keys sorted): equal rules, equal bytes.
    pub fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(&Snapshot {
            rules: self.rules.clone(),
            managed: self.managed.clone(),
            tiers: self.tiers.clone(),
            required_rank: self.required_rank.clone(),
        })
        .expect("rules serialize")
    }

    /// Rules back from `snapshot()`'s bytes.
    pub fn from_snapshot(bytes: &[u8]) -> Result<Rules, serde_json::Error> {
        serde_json::from_slice(bytes).map(Rules::from_parts)
    }

    /// Which rules these are: the first 8 bytes of the SHA-256 of their
    /// snapshot (stable across builds and replicas).
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// Event types some rule knows (the `type` label values).
    pub fn types(&self) -> impl Iterator<Item = &str> {
        self.rules.keys().map(String::as_str)
    }

    pub fn knows(&self, kind: &str) -> bool {
        self.rules.contains_key(kind)
    }

    /// `[channels] managed`.
    pub fn managed(&self) -> &[ChannelId] {
        &self.managed
    }

    /// The rule for an event type.
    pub fn rule(&self, kind: &str) -> Option<&Rule> {
        self.rules.get(kind)
    }

    /// Whether `plan` would accept `event`, without building its actions
    /// (the webhook edge checks every event this way).
    pub fn validate(&self, event: &Event) -> Result<(), RuleError> {
        let rule = self
            .rules
            .get(&event.kind)
            .ok_or_else(|| RuleError::UnknownType(event.kind.clone()))?;
        let by_tier = [rule.unsubscribe, rule.subscribe].contains(&ChannelSource::ChannelsOrTier);
        if by_tier && event.data.channels.is_none() {
            self.channels_for(ChannelSource::ChannelsOrTier, event, Direction::Subscribe)?;
        }
        Ok(())
    }

    /// The actions `event` calls for, without repeats.
    pub fn plan(&self, event: &Event) -> Result<Vec<Action>, RuleError> {
        let rule = self
            .rules
            .get(&event.kind)
            .ok_or_else(|| RuleError::UnknownType(event.kind.clone()))?;
        let d = &event.data;
        let user = &d.user_id;
        let mut actions = Vec::new();
        let mut seen = HashSet::new();
        let mut push = |a: Action, actions: &mut Vec<Action>| {
            if seen.insert(a.clone()) {
                actions.push(a);
            }
        };
        let destroyed: Vec<&ChannelId> = if rule.destroy_owned {
            d.owned_channels.iter().flatten().collect()
        } else {
            Vec::new()
        };
        for channel in self.channels_for(rule.unsubscribe, event, Direction::Unsubscribe)? {
            // Leaving a channel that this very event destroys is moot.
            if !destroyed.contains(&&channel) {
                push(
                    Action::Unsubscribe {
                        channel,
                        user: user.clone(),
                    },
                    &mut actions,
                );
            }
        }
        if rule.unfollow {
            for to in d.following.iter().flatten().filter(|t| *t != user) {
                push(
                    Action::Unfollow {
                        from: user.clone(),
                        to: to.clone(),
                    },
                    &mut actions,
                );
            }
            for from in d.followers.iter().flatten().filter(|f| *f != user) {
                push(
                    Action::Unfollow {
                        from: from.clone(),
                        to: user.clone(),
                    },
                    &mut actions,
                );
            }
        }
        for channel in self.channels_for(rule.subscribe, event, Direction::Subscribe)? {
            push(
                Action::Subscribe {
                    channel,
                    user: user.clone(),
                },
                &mut actions,
            );
        }
        for channel in destroyed {
            push(
                Action::Destroy {
                    channel: channel.clone(),
                },
                &mut actions,
            );
        }
        Ok(actions)
    }

    fn channels_for(
        &self,
        source: ChannelSource,
        event: &Event,
        direction: Direction,
    ) -> Result<Vec<ChannelId>, RuleError> {
        let named = event.data.channels.clone();
        Ok(match (source, named) {
            (ChannelSource::None, _) => Vec::new(),
            (_, Some(channels)) => channels,
            (ChannelSource::Channels, None) => Vec::new(),
            (ChannelSource::ChannelsOrManaged, None) => self.managed.clone(),
            (ChannelSource::ChannelsOrTier, None) => {
                let tier = event.data.tier.as_deref().ok_or_else(|| ParseError {
                    field: "data.tier".into(),
                    problem: "is required when data.channels is absent".into(),
                })?;
                let rank = self
                    .tiers
                    .iter()
                    .position(|t| t == tier)
                    .ok_or_else(|| ParseError {
                        field: "data.tier".into(),
                        problem: format!("must be one of {:?}", self.tiers),
                    })?;
                self.managed
                    .iter()
                    .filter(|c| {
                        self.required_rank.get(*c).is_some_and(|r| match direction {
                            Direction::Unsubscribe => *r > rank,
                            Direction::Subscribe => *r <= rank,
                        })
                    })
                    .cloned()
                    .collect()
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use crate::domain::UserId;

    fn rules(extra: &str) -> Rules {
        let s = config::from_toml(&format!("{}\n{extra}", config::EMBEDDED_DEFAULTS)).unwrap();
        Rules::new(s.rules.clone(), &s.channels.rule_channels())
    }

    fn ev(json: &str) -> Event {
        Event::parse(json.as_bytes()).unwrap()
    }

    #[test]
    fn banned_unsubscribes_and_unfollows_both_ways() {
        let r = rules("");
        let a = r
            .plan(&ev(
                r#"{"type":"user.banned","data":{"user_id":"u","channels":["@TOA#_a"],
                "following":["f1"],"followers":["g1","g2"],"owned_channels":["@TOA#_o"]}}"#,
            ))
            .unwrap();
        let c = |s: &str| ChannelId::parse(s).unwrap();
        let u = |s: &str| UserId::parse(s).unwrap();
        assert_eq!(
            a,
            vec![
                Action::Unsubscribe {
                    channel: c("@TOA#_a"),
                    user: u("u")
                },
                Action::Unfollow {
                    from: u("u"),
                    to: u("f1")
                },
                Action::Unfollow {
                    from: u("g1"),
                    to: u("u")
                },
                Action::Unfollow {
                    from: u("g2"),
                    to: u("u")
                },
            ]
        );
    }

    #[test]
    fn managed_channels_are_the_fallback() {
        let s = config::from_toml(
            &config::EMBEDDED_DEFAULTS
                .replace("managed = []", "managed = [\"@TOA#_m1\", \"@TOA#_m2\"]"),
        )
        .unwrap();
        let r = Rules::new(s.rules.clone(), &s.channels.rule_channels());
        let a = r
            .plan(&ev(r#"{"type":"user.banned","data":{"user_id":"u"}}"#))
            .unwrap();
        assert_eq!(a.len(), 2);
        // An explicit empty list means "none", not "managed".
        let a = r
            .plan(&ev(
                r#"{"type":"user.banned","data":{"user_id":"u","channels":[]}}"#,
            ))
            .unwrap();
        assert!(a.is_empty());
    }

    #[test]
    fn deleted_destroys_owned_and_skips_leaving_them() {
        let r = rules("");
        let a = r
            .plan(&ev(r#"{"type":"account.deleted","data":{"user_id":"u",
                "channels":["@TOA#_a","@TOA#_o"],"owned_channels":["@TOA#_o"]}}"#))
            .unwrap();
        assert_eq!(a.len(), 2);
        assert!(matches!(&a[1], Action::Destroy { channel } if channel.as_str() == "@TOA#_o"));
    }

    #[test]
    fn tier_downgrade_uses_required_tiers() {
        let s = config::from_toml(
            &config::EMBEDDED_DEFAULTS
                .replace(
                    "managed = []",
                    "managed = [\"@TOA#_free\", \"@TOA#_plus\", \"@TOA#_pro\"]",
                )
                .replace("tiers = []", "tiers = [\"free\", \"plus\", \"pro\"]")
                .replace(
                    "required_tier = {}",
                    "required_tier = { \"@TOA#_plus\" = \"plus\", \"@TOA#_pro\" = \"pro\" }",
                ),
        )
        .unwrap();
        let r = Rules::new(s.rules.clone(), &s.channels.rule_channels());
        let a = r
            .plan(&ev(
                r#"{"type":"tier.downgraded","data":{"user_id":"u","tier":"plus"}}"#,
            ))
            .unwrap();
        assert_eq!(
            a,
            vec![Action::Unsubscribe {
                channel: ChannelId::parse("@TOA#_pro").unwrap(),
                user: UserId::parse("u").unwrap()
            }]
        );
        let e = r
            .plan(&ev(
                r#"{"type":"tier.downgraded","data":{"user_id":"u","tier":"gold"}}"#,
            ))
            .unwrap_err();
        assert!(matches!(e, RuleError::Field(p) if p.field == "data.tier"));
    }

    #[test]
    fn unknown_types_and_config_rules() {
        let r = rules("[rules.\"user.muted\"]\nunsubscribe = \"channels\"\n");
        assert!(matches!(
            r.plan(&ev(r#"{"type":"user.nope","data":{"user_id":"u"}}"#)),
            Err(RuleError::UnknownType(_))
        ));
        let a = r
            .plan(&ev(
                r#"{"type":"user.muted","data":{"user_id":"u","channels":["@TOA#_x"]}}"#,
            ))
            .unwrap();
        assert_eq!(a.len(), 1);
        // The defaults are still there next to the new type.
        assert!(r.knows("user.banned"));
    }
}
