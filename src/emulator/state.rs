//! The emulated service's data: official channels with their subscribers,
//! and the follow graph. Every ordered listing is kept in a `BTreeMap` keyed
//! by a sequence number that only grows, so a `stable` cursor can name
//! "after this entry" and stay right when entries are removed between
//! pages; each listing is also indexed by account in account order, for
//! `key` cursors (see [`CursorMode`]).

use std::collections::{BTreeMap, HashMap};

use super::model::{CursorMode, Seed};

/// One subscription as a channel keeps it.
#[derive(Debug, Clone)]
pub(crate) struct Sub {
    pub account: String,
    pub time: i64,
}

#[derive(Debug, Default)]
pub(crate) struct Channel {
    pub owner: Option<String>,
    pub name: String,
    pub max_subscribers: Option<u64>,
    /// seq -> subscriber, in subscribe order.
    pub by_seq: BTreeMap<u64, Sub>,
    /// subscriber -> seq, in account order.
    pub by_account: BTreeMap<String, u64>,
}

impl Channel {
    pub fn len(&self) -> u64 {
        self.by_account.len() as u64
    }
}

/// A set of accounts in the order they were added.
#[derive(Debug, Default)]
pub(crate) struct Edges {
    pub by_seq: BTreeMap<u64, String>,
    /// account -> (seq, time), in account order.
    pub by_account: BTreeMap<String, (u64, i64)>,
}

impl Edges {
    fn insert(&mut self, seq: u64, account: &str, time: i64) -> bool {
        if self.by_account.contains_key(account) {
            return false;
        }
        self.by_account.insert(account.to_owned(), (seq, time));
        self.by_seq.insert(seq, account.to_owned());
        true
    }

    fn remove(&mut self, account: &str) -> bool {
        match self.by_account.remove(account) {
            Some((seq, _)) => {
                self.by_seq.remove(&seq);
                true
            }
            None => false,
        }
    }

    pub fn contains(&self, account: &str) -> bool {
        self.by_account.contains_key(account)
    }

    pub fn time_of(&self, account: &str) -> Option<i64> {
        self.by_account.get(account).map(|&(_, t)| t)
    }

    pub fn ordered(&self) -> Vec<String> {
        self.by_seq.values().cloned().collect()
    }
}

/// Everything the emulated service stores.
#[derive(Debug, Default)]
pub(crate) struct World {
    pub channels: HashMap<String, Channel>,
    /// account -> (seq -> (channel, subscribe time)), in subscribe order.
    pub user_subs: HashMap<String, BTreeMap<u64, (String, i64)>>,
    /// account -> whom it follows.
    pub following: HashMap<String, Edges>,
    /// account -> who follows it.
    pub followers: HashMap<String, Edges>,
    pub user_channel_limit: Option<u64>,
    /// What paging cursors mean.
    pub cursor: CursorMode,
    seq: u64,
    generated: u64,
}

impl World {
    pub fn new(cursor: CursorMode) -> World {
        World {
            cursor,
            ..World::default()
        }
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// A fresh `@TOA#_...` id not in use.
    pub fn generate_channel_id(&mut self) -> String {
        loop {
            self.generated += 1;
            let id = format!("{}emu{:06}", crate::domain::CHANNEL_PREFIX, self.generated);
            if !self.channels.contains_key(&id) {
                return id;
            }
        }
    }

    pub fn create_channel(
        &mut self,
        id: &str,
        owner: Option<String>,
        name: String,
        max_subscribers: Option<u64>,
    ) -> bool {
        if self.channels.contains_key(id) {
            return false;
        }
        self.channels.insert(
            id.to_owned(),
            Channel {
                owner,
                name,
                max_subscribers,
                ..Channel::default()
            },
        );
        true
    }

    /// Subscribes `account`; false if it already was (or no such channel).
    pub fn subscribe(&mut self, channel: &str, account: &str, time: i64) -> bool {
        let seq = self.next_seq();
        let Some(ch) = self.channels.get_mut(channel) else {
            return false;
        };
        if ch.by_account.contains_key(account) {
            return false;
        }
        ch.by_account.insert(account.to_owned(), seq);
        ch.by_seq.insert(
            seq,
            Sub {
                account: account.to_owned(),
                time,
            },
        );
        self.user_subs
            .entry(account.to_owned())
            .or_default()
            .insert(seq, (channel.to_owned(), time));
        true
    }

    /// Unsubscribes `account`; false if it was not subscribed.
    pub fn unsubscribe(&mut self, channel: &str, account: &str) -> bool {
        let Some(ch) = self.channels.get_mut(channel) else {
            return false;
        };
        let Some(seq) = ch.by_account.remove(account) else {
            return false;
        };
        ch.by_seq.remove(&seq);
        self.forget_user_sub(account, seq);
        true
    }

    fn forget_user_sub(&mut self, account: &str, seq: u64) {
        if let Some(subs) = self.user_subs.get_mut(account) {
            subs.remove(&seq);
            if subs.is_empty() {
                self.user_subs.remove(account);
            }
        }
    }

    /// Removes the channel and every subscription to it.
    pub fn destroy(&mut self, channel: &str) -> bool {
        let Some(ch) = self.channels.remove(channel) else {
            return false;
        };
        for (seq, sub) in ch.by_seq {
            self.forget_user_sub(&sub.account, seq);
        }
        true
    }

    /// How many channels `account` subscribes to.
    pub fn channel_count(&self, account: &str) -> u64 {
        self.user_subs.get(account).map_or(0, |s| s.len() as u64)
    }

    /// `from` follows `to`; false if it already did.
    pub fn follow(&mut self, from: &str, to: &str, time: i64) -> bool {
        if self.is_following(from, to) {
            return false;
        }
        let seq = self.next_seq();
        self.following
            .entry(from.to_owned())
            .or_default()
            .insert(seq, to, time);
        self.followers
            .entry(to.to_owned())
            .or_default()
            .insert(seq, from, time);
        true
    }

    /// `from` stops following `to`; false if it did not follow.
    pub fn unfollow(&mut self, from: &str, to: &str) -> bool {
        let removed = remove_edge(&mut self.following, from, to);
        if removed {
            remove_edge(&mut self.followers, to, from);
        }
        removed
    }

    pub fn is_following(&self, from: &str, to: &str) -> bool {
        self.following.get(from).is_some_and(|e| e.contains(to))
    }

    /// Applies a seed (see [`Seed`]).
    pub fn seed(&mut self, seed: &Seed, now: i64) {
        if let Some(mode) = seed.cursor {
            self.cursor = mode;
        }
        if let Some(limit) = seed.user_channel_limit {
            self.user_channel_limit = Some(limit);
        }
        for c in &seed.channels {
            let ch = self.channels.entry(c.id.clone()).or_default();
            if c.owner.is_some() {
                ch.owner.clone_from(&c.owner);
            }
            if let Some(name) = &c.name {
                ch.name.clone_from(name);
            }
            if c.max_subscribers.is_some() {
                ch.max_subscribers = c.max_subscribers;
            }
            for account in &c.subscribers {
                self.subscribe(&c.id, account, now);
            }
        }
        for f in &seed.follows {
            for to in &f.to {
                if *to != f.from {
                    self.follow(&f.from, to, now);
                }
            }
        }
    }
}

fn remove_edge(map: &mut HashMap<String, Edges>, a: &str, b: &str) -> bool {
    let Some(edges) = map.get_mut(a) else {
        return false;
    };
    let removed = edges.remove(b);
    if edges.by_account.is_empty() {
        map.remove(a);
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::model::{SeedChannel, SeedFollow};

    #[test]
    fn subscriptions_are_indexed_both_ways() {
        let mut w = World::default();
        w.seed(
            &Seed {
                channels: vec![SeedChannel::new("@TOA#_a", ["u1", "u2", "u1"])],
                ..Seed::default()
            },
            10,
        );
        assert_eq!(w.channels["@TOA#_a"].len(), 2);
        assert_eq!(w.channel_count("u1"), 1);
        assert!(w.unsubscribe("@TOA#_a", "u1"));
        assert!(!w.unsubscribe("@TOA#_a", "u1"));
        assert_eq!(w.channel_count("u1"), 0);
        assert!(!w.user_subs.contains_key("u1"));
        assert!(w.destroy("@TOA#_a"));
        assert_eq!(w.channel_count("u2"), 0);
        assert!(!w.destroy("@TOA#_a"));
    }

    #[test]
    fn follows_are_directed() {
        let mut w = World::default();
        w.seed(
            &Seed {
                follows: vec![SeedFollow::new("a", ["b", "c", "a"])],
                ..Seed::default()
            },
            10,
        );
        assert!(w.is_following("a", "b"));
        assert!(!w.is_following("b", "a"));
        assert!(!w.is_following("a", "a"));
        assert_eq!(w.following["a"].ordered(), ["b", "c"]);
        assert!(w.unfollow("a", "b"));
        assert!(!w.unfollow("a", "b"));
        assert!(!w.followers.contains_key("b"));
    }
}
