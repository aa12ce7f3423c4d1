//! Fault injection: which rules fire on a call, deterministically given the
//! RNG seed and the order in which calls arrive.

use std::collections::HashSet;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::model::{FaultRule, Faults};
use crate::tencent::Api;

struct RuleState {
    rule: FaultRule,
    remaining: Option<u64>,
}

pub(crate) struct FaultEngine {
    rules: Vec<RuleState>,
    seed: Option<u64>,
    rng: StdRng,
}

/// What the rules that fired on one call ask for.
#[derive(Debug, Default)]
pub(crate) struct Decision {
    pub latency_ms: u64,
    pub http_status: Option<u16>,
    pub error_code: Option<i64>,
    pub after_apply: bool,
    pub item_failure_rate: f64,
    pub fail_accounts: HashSet<String>,
}

impl Decision {
    pub fn fails_items(&self) -> bool {
        self.item_failure_rate > 0.0 || !self.fail_accounts.is_empty()
    }
}

impl FaultEngine {
    pub fn new(seed: u64) -> Self {
        FaultEngine {
            rules: Vec::new(),
            seed: None,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Replaces the rules and re-seeds the RNG (`faults.seed`, else `default_seed`).
    pub fn set(&mut self, faults: Faults, default_seed: u64) {
        self.seed = faults.seed;
        self.rng = StdRng::seed_from_u64(faults.seed.unwrap_or(default_seed));
        self.rules = faults
            .rules
            .into_iter()
            .map(|rule| RuleState {
                remaining: rule.count,
                rule,
            })
            .collect();
    }

    /// The current rules, `count` showing how many firings remain.
    pub fn current(&self) -> Faults {
        Faults {
            rules: self
                .rules
                .iter()
                .map(|r| FaultRule {
                    count: r.remaining,
                    ..r.rule.clone()
                })
                .collect(),
            seed: self.seed,
        }
    }

    /// Rolls every matching rule for one call of `api`.
    pub fn decide(&mut self, api: Api) -> Decision {
        let mut d = Decision::default();
        for r in &mut self.rules {
            if r.rule.api.as_deref().is_some_and(|a| a != api.name()) {
                continue;
            }
            if r.remaining == Some(0) {
                continue;
            }
            let fires = if r.rule.rate >= 1.0 {
                true
            } else if r.rule.rate > 0.0 {
                self.rng.random::<f64>() < r.rule.rate
            } else {
                false
            };
            if !fires {
                continue;
            }
            if let Some(n) = &mut r.remaining {
                *n -= 1;
            }
            d.latency_ms = d.latency_ms.max(r.rule.latency_ms);
            if d.http_status.is_none() && d.error_code.is_none() {
                // The first failing rule decides how the call fails.
                d.http_status = r.rule.http_status;
                d.error_code = r.rule.error_code;
                d.after_apply = r.rule.after_apply;
            }
            d.item_failure_rate = d.item_failure_rate.max(r.rule.item_failure_rate);
            d.fail_accounts.extend(r.rule.fail_accounts.iter().cloned());
        }
        d
    }

    /// Which of `items` fail on their own under `d` (in request order, one
    /// roll per item not already failed by `fail_accounts`).
    pub fn item_failures(&mut self, d: &Decision, items: &[String]) -> Vec<bool> {
        items
            .iter()
            .map(|item| {
                d.fail_accounts.contains(item)
                    || (d.item_failure_rate > 0.0 && self.rng.random::<f64>() < d.item_failure_rate)
            })
            .collect()
    }
}

/// The `ErrorInfo` the vendor gives for codes one might inject.
pub(crate) fn info_for(code: i64) -> &'static str {
    match code {
        10002 | 10004 | 20005 | 30006 => "Internal server error. Please try again.",
        20004 | 30007 => "Network timeout. Please try again.",
        30008 => "Write conflict. Please try again.",
        60007 => "REST API call frequency exceeds the limit. Please reduce the frequency.",
        60011 => "SDKAppID request frequency exceeds the limit. Please reduce the frequency.",
        60018 | 60019 => "Too many requests. Please try again later.",
        70001 => "UserSig has expired.",
        70500 | 70169 => "Internal server error. Please try again.",
        131000 => "This AppId has not been enabled with official channel service.",
        30005 => "This application does not have the fan and follow feature enabled.",
        _ => "Injected fault.",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_apis() {
        let mut e = FaultEngine::new(1);
        e.set(
            Faults::new(vec![
                FaultRule::error_code(Some("delete_subscriber"), 10004).times(2),
                FaultRule::latency(None, 5),
            ]),
            1,
        );
        let d = e.decide(Api::FollowDelete);
        assert_eq!((d.error_code, d.latency_ms), (None, 5));
        for _ in 0..2 {
            assert_eq!(e.decide(Api::DeleteSubscriber).error_code, Some(10004));
        }
        assert_eq!(e.decide(Api::DeleteSubscriber).error_code, None);
        assert_eq!(e.current().rules[0].count, Some(0));
    }

    #[test]
    fn deterministic_given_the_seed() {
        let rule = FaultRule {
            item_failure_rate: 0.5,
            ..FaultRule::error_code(None, 10004).with_rate(0.5)
        };
        let run = || {
            let mut e = FaultEngine::new(0);
            e.set(Faults::new(vec![rule.clone()]), 42);
            let items: Vec<String> = (0..20).map(|i| i.to_string()).collect();
            (0..50)
                .map(|_| {
                    let d = e.decide(Api::AddSubscriber);
                    (d.error_code, e.item_failures(&d, &items))
                })
                .collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        let fired = a.iter().filter(|(c, _)| c.is_some()).count();
        assert!((10..=40).contains(&fired), "{fired}");
    }
}
