//! Account and channel identifiers that cannot be built wrong: a `ChannelId`
//! always has the `@TOA#_` form, neither is ever empty, over-long or holds a
//! control character. Both are shared strings: the same account named by
//! many pending actions (a banned user's unsubscribes and unfollows) is held
//! once, and cloning one costs a reference count, not an allocation.

use std::fmt;
use std::sync::Arc;

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
pub struct UserId(Arc<str>);

impl UserId {
    pub fn parse(s: impl Into<String>) -> Result<Self, IdError> {
        let s = s.into();
        check_common(&s)?;
        Ok(UserId(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An official channel's `OfficialAccountUserID` (`@TOA#_...`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ChannelId(Arc<str>);

impl ChannelId {
    pub fn parse(s: impl Into<String>) -> Result<Self, IdError> {
        let s = s.into();
        check_common(&s)?;
        if !s.starts_with(CHANNEL_PREFIX) || s.len() == CHANNEL_PREFIX.len() {
            return Err(IdError::NotAChannel);
        }
        Ok(ChannelId(Arc::from(s)))
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
                String::from(&*id.0)
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
}
