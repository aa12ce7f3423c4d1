//! Identifiers and batches that cannot be built wrong: a `ChannelId` always has
//! the `@TOA#_` form, a batch never holds more accounts than one call may carry
//! and never the same account twice.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::api::{MAX_FOLLOWS_PER_CALL, MAX_SUBSCRIBERS_PER_CALL};

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
pub struct UserId(String);

impl UserId {
    pub fn parse(s: impl Into<String>) -> Result<Self, IdError> {
        let s = s.into();
        check_common(&s)?;
        Ok(UserId(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An official channel's `OfficialAccountUserID` (`@TOA#_...`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ChannelId(String);

impl ChannelId {
    pub fn parse(s: impl Into<String>) -> Result<Self, IdError> {
        let s = s.into();
        check_common(&s)?;
        if !s.starts_with(CHANNEL_PREFIX) || s.len() == CHANNEL_PREFIX.len() {
            return Err(IdError::NotAChannel);
        }
        Ok(ChannelId(s))
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
                id.0
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a batch holds at most {capacity} accounts")]
pub struct BatchFull {
    pub capacity: usize,
}

/// Distinct accounts for one call, at most `N`. Insertion order is kept so a
/// batch can be split in halves deterministically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch<const N: usize> {
    items: Vec<UserId>,
}

/// Accounts for one `delete_subscriber` / `add_subscriber`.
pub type SubscriberBatch = Batch<MAX_SUBSCRIBERS_PER_CALL>;
/// Accounts for one `follow_delete` / `follow_add`.
pub type FollowBatch = Batch<MAX_FOLLOWS_PER_CALL>;

impl<const N: usize> Default for Batch<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Batch<N> {
    pub const CAPACITY: usize = N;

    pub fn new() -> Self {
        Batch {
            items: Vec::with_capacity(N),
        }
    }

    /// Adds `id`; `Ok(false)` if it is already there, `Err` if the batch is full.
    pub fn insert(&mut self, id: UserId) -> Result<bool, BatchFull> {
        if self.items.contains(&id) {
            return Ok(false);
        }
        if self.items.len() == N {
            return Err(BatchFull { capacity: N });
        }
        self.items.push(id);
        Ok(true)
    }

    /// Builds a batch from `ids`, dropping repeats; fails if more than `N`
    /// distinct accounts remain.
    pub fn try_from_iter(ids: impl IntoIterator<Item = UserId>) -> Result<Self, BatchFull> {
        let mut b = Self::new();
        for id in ids {
            b.insert(id)?;
        }
        Ok(b)
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.items.len() == N
    }

    pub fn contains(&self, id: &UserId) -> bool {
        self.items.contains(id)
    }

    pub fn iter(&self) -> std::slice::Iter<'_, UserId> {
        self.items.iter()
    }

    pub fn as_slice(&self) -> &[UserId] {
        &self.items
    }

    /// Splits into two non-empty halves (for isolating a bad account), or
    /// `None` for a batch of one.
    pub fn split(self) -> Option<(Self, Self)> {
        if self.items.len() < 2 {
            return None;
        }
        let mut first = self.items;
        let second = first.split_off(first.len() / 2);
        Some((Batch { items: first }, Batch { items: second }))
    }

    pub fn into_vec(self) -> Vec<UserId> {
        self.items
    }
}

impl<'a, const N: usize> IntoIterator for &'a Batch<N> {
    type Item = &'a UserId;
    type IntoIter = std::slice::Iter<'a, UserId>;
    fn into_iter(self) -> Self::IntoIter {
        self.items.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid(i: usize) -> UserId {
        UserId::parse(format!("user{i}")).unwrap()
    }

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
    fn batches_are_bounded_and_distinct() {
        let mut b = FollowBatch::new();
        for i in 0..20 {
            assert_eq!(b.insert(uid(i)), Ok(true));
        }
        assert_eq!(b.insert(uid(3)), Ok(false));
        assert_eq!(b.insert(uid(20)), Err(BatchFull { capacity: 20 }));
        assert!(b.is_full());
        assert!(FollowBatch::try_from_iter((0..21).map(uid)).is_err());
        let dup = SubscriberBatch::try_from_iter((0..150).map(|i| uid(i % 100))).unwrap();
        assert_eq!(dup.len(), 100);
    }

    #[test]
    fn split_halves() {
        let b = SubscriberBatch::try_from_iter((0..5).map(uid)).unwrap();
        let (a, c) = b.split().unwrap();
        assert_eq!((a.len(), c.len()), (2, 3));
        let one = SubscriberBatch::try_from_iter([uid(1)]).unwrap();
        assert!(one.split().is_none());
    }
}
