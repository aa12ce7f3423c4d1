//! Vendor batches that cannot be built wrong: a batch never holds more
//! accounts than one call may carry and never the same account twice.

use super::api::{MAX_FOLLOWS_PER_CALL, MAX_SUBSCRIBERS_PER_CALL};
use crate::domain::UserId;

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
