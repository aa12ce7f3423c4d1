//! Per-API call frequency (the vendor's 60007), statistics and the call log.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::model::{ApiStats, CallRecord, Stats};
use crate::tencent::Api;

/// Calls kept in the log; older ones are dropped first.
pub(crate) const CALL_LOG_CAPACITY: usize = 200_000;
/// Accounts kept over all calls in the log (bounds its memory when every
/// call carries a full batch); older calls are dropped first.
pub(crate) const CALL_LOG_ACCOUNTS: usize = 4_000_000;

const WINDOW: Duration = Duration::from_secs(1);

fn index(api: Api) -> usize {
    api as usize
}

pub(crate) struct Meter {
    windows: Vec<VecDeque<Instant>>,
    stats: Vec<ApiStats>,
    log: VecDeque<CallRecord>,
    log_accounts: usize,
}

impl Default for Meter {
    fn default() -> Self {
        Meter {
            windows: vec![VecDeque::new(); Api::ALL.len()],
            stats: vec![ApiStats::default(); Api::ALL.len()],
            log: VecDeque::new(),
            log_accounts: 0,
        }
    }
}

impl Meter {
    /// Counts an arrival of `api` at `now` in its sliding 1-second window and
    /// returns how many calls the window now holds (this one included).
    pub fn arrive(&mut self, api: Api, now: Instant) -> u64 {
        let w = &mut self.windows[index(api)];
        while let Some(&front) = w.front() {
            if now.saturating_duration_since(front) >= WINDOW {
                w.pop_front();
            } else {
                break;
            }
        }
        w.push_back(now);
        let in_window = w.len() as u64;
        let s = &mut self.stats[index(api)];
        s.peak_calls_per_second = s.peak_calls_per_second.max(in_window);
        in_window
    }

    /// A request refused by the parameter / UserSig / admin checks.
    pub fn refused(&mut self, api: Api, code: i64) {
        *self.stats[index(api)]
            .refused
            .entry(code.to_string())
            .or_default() += 1;
    }

    /// Records one finished call.
    pub fn record(&mut self, api: Api, rec: CallRecord, counts: ItemCounts) {
        let s = &mut self.stats[index(api)];
        s.calls += 1;
        let n = rec.accounts.len() as u64;
        let n = n.max(counts.listed);
        s.items += n;
        s.max_items = s.max_items.max(n);
        let label = match rec.http_status {
            Some(status) => format!("http_{status}"),
            None => rec.error_code.to_string(),
        };
        *s.error_codes.entry(label).or_default() += 1;
        s.applied += counts.applied;
        s.noop += counts.noop;
        s.item_failures += counts.item_failures;
        self.log_accounts += rec.accounts.len();
        self.log.push_back(rec);
        while self.log.len() > CALL_LOG_CAPACITY || self.log_accounts > CALL_LOG_ACCOUNTS {
            match self.log.pop_front() {
                Some(old) => self.log_accounts -= old.accounts.len(),
                None => break,
            }
        }
    }

    pub fn stats(&self) -> Stats {
        Stats {
            apis: Api::ALL
                .iter()
                .map(|&api| (api.name().to_owned(), self.stats[index(api)].clone()))
                .collect(),
        }
    }

    pub fn calls(&self) -> Vec<CallRecord> {
        self.log.iter().cloned().collect()
    }
}

/// Per-item outcomes of one call, for the stats.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ItemCounts {
    /// Length of the item list when it held non-strings (which the call
    /// record's `accounts` leaves out).
    pub listed: u64,
    pub applied: u64,
    pub noop: u64,
    pub item_failures: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_follows_all() {
        for (i, api) in Api::ALL.iter().enumerate() {
            assert_eq!(index(*api), i);
        }
    }

    #[test]
    fn call_log_is_bounded() {
        let mut m = Meter::default();
        for i in 0..CALL_LOG_CAPACITY + 5 {
            let rec = CallRecord {
                random: i as u32,
                ..CallRecord::default()
            };
            m.record(Api::FollowAdd, rec, ItemCounts::default());
        }
        let calls = m.calls();
        assert_eq!(calls.len(), CALL_LOG_CAPACITY);
        assert_eq!(calls[0].random, 5);
        assert_eq!(
            m.stats().api("follow_add").calls,
            CALL_LOG_CAPACITY as u64 + 5
        );
    }

    #[test]
    fn sliding_window_peak() {
        let mut m = Meter::default();
        let t0 = Instant::now();
        for i in 0..10 {
            m.arrive(Api::FollowGet, t0 + Duration::from_millis(i * 150));
        }
        // Arrivals at 0,150,...,1350 ms: at most 7 within any second.
        assert_eq!(m.stats().api("follow_get").peak_calls_per_second, 7);
        assert_eq!(
            m.arrive(Api::FollowGet, t0 + Duration::from_millis(10_000)),
            1
        );
    }
}
