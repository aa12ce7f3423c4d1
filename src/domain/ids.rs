//! Account and channel identifiers that cannot be built wrong: a `ChannelId`
//! always has the `@TOA#_` form, neither is ever empty, over-long or holds a
//! control character. Both are 16 bytes: an id of up to 15 bytes (most
//! UserIDs: numbers, short handles) is held inline, with no allocation of
//! its own; a longer one is a shared string, so the same account named by
//! many pending actions (a banned user's unsubscribes and unfollows) is held
//! once. Cloning either costs at most a reference count. A backlog of
//! `follow_delete` items holds two ids an item: with an allocation per id,
//! ids were 8.4 of the heap's 65.7 MiB at section 7d's peak (heaptrack, one
//! `--quick` run).

use std::fmt;

use ecow::EcoString;

use serde::{Deserialize, Serialize};

/// The prefix of every official channel's `OfficialAccountUserID`.
pub const CHANNEL_PREFIX: &str = "@TOA#_";
/// Longest identifier we accept at our edge. The vendor's own limits are
/// stricter (the emulator enforces them); we leave the verdict to it so a bad
/// account is isolated and dead-lettered with the vendor's reason.
pub const MAX_ID_BYTES: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {MAX_ID_BYTES} bytes")]
    TooLong,
    #[error("must not contain control characters")]
    Control,
    #[error("must start with \"{CHANNEL_PREFIX}\"")]
    NotAChannel,
}

fn check_common(s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        Err(IdError::Empty)
    } else if s.len() > MAX_ID_BYTES {
        Err(IdError::TooLong)
    } else if s.chars().any(char::is_control) {
        Err(IdError::Control)
    } else {
        Ok(())
    }
}

/// A Tencent Chat UserID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserId(EcoString);

impl UserId {
    /// Copies `s` (an id of up to 15 bytes into the value itself).
    pub fn parse(s: impl AsRef<str>) -> Result<Self, IdError> {
        let s = s.as_ref();
        check_common(s)?;
        Ok(UserId(EcoString::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An official channel's `OfficialAccountUserID` (`@TOA#_...`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ChannelId(EcoString);

impl ChannelId {
    /// Copies `s` (an id of up to 15 bytes into the value itself).
    pub fn parse(s: impl AsRef<str>) -> Result<Self, IdError> {
        let s = s.as_ref();
        check_common(s)?;
        if !s.starts_with(CHANNEL_PREFIX) || s.len() == CHANNEL_PREFIX.len() {
            return Err(IdError::NotAChannel);
        }
        Ok(ChannelId(EcoString::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! id_conversions {
    ($t:ty) => {
        impl TryFrom<String> for $t {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                <$t>::parse(s)
            }
        }
        impl From<$t> for String {
            fn from(id: $t) -> String {
                String::from(id.0.as_str())
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}
id_conversions!(UserId);
id_conversions!(ChannelId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse() {
        assert!(ChannelId::parse("@TOA#_news").is_ok());
        assert_eq!(ChannelId::parse("news"), Err(IdError::NotAChannel));
        assert_eq!(ChannelId::parse("@TOA#_"), Err(IdError::NotAChannel));
        assert_eq!(UserId::parse(""), Err(IdError::Empty));
        assert_eq!(UserId::parse("a\nb"), Err(IdError::Control));
        assert_eq!(UserId::parse("x".repeat(257)), Err(IdError::TooLong));
    }

    #[test]
    fn ids_are_two_words_and_keep_their_text() {
        assert_eq!(std::mem::size_of::<UserId>(), 16);
        assert_eq!(std::mem::size_of::<ChannelId>(), 16);
        for s in [
            "u1",
            "fifteen-bytes-!",
            "sixteen-bytes-!!",
            &"y".repeat(256),
        ] {
            let u = UserId::parse(s).unwrap();
            assert_eq!(u.as_str(), s);
            assert_eq!(u.clone(), u);
            assert_eq!(String::from(u), s);
        }
        let c = ChannelId::parse("@TOA#_a-rather-long-channel-name").unwrap();
        assert_eq!(c.to_string(), "@TOA#_a-rather-long-channel-name");
    }
}
