//! Whether this process may call upstream. In embedded mode it always may.
//! In broker mode only the replica holding the dispatch lease may, so that
//! however many replicas run, together they stay within one
//! `requests_per_second` budget; and a newly active replica waits one
//! second first, assuming the one before it spent the current window's
//! budget (an empty bucket), so the windows of two leaders never overlap.
//!
//! A process that was frozen (SIGSTOP, a paused VM) may have lost the lease
//! without knowing yet: on resume, whichever of its tasks runs first could
//! call upstream before the lease task notices. So a ticker watches for
//! gaps in its own running; after one, nothing is sent until the lease is
//! won anew, or until it has stayed held long enough after the gap that
//! its connection evidently survived.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a newly active replica waits before its first call.
pub const HANDOVER_PAUSE: Duration = Duration::from_secs(1);
/// How often the ticker runs.
const TICK: Duration = Duration::from_millis(100);

/// Gaps in this process's running.
#[derive(Debug)]
struct Freeze {
    last_tick: Mutex<Instant>,
    /// A gap in running this long counts as a freeze: half the heartbeat,
    /// after which the broker may have dropped our connections.
    gap: Duration,
    /// When the last gap was seen, until it is cleared.
    frozen_at: Mutex<Option<Instant>>,
    /// How long the lease must stay held after a gap to trust it again
    /// (longer than the lease task needs to notice a lost connection).
    trust_after: Duration,
}

impl Freeze {
    /// Notes a gap since the last tick, if there was one.
    fn check(&self, now: Instant) {
        let mut last = self.last_tick.lock();
        if now.saturating_duration_since(*last) > self.gap {
            *self.frozen_at.lock() = Some(now);
        }
        *last = now;
    }

    /// Whether the lease gained at `since` can be trusted now.
    fn trusts(&self, since: Instant, now: Instant) -> bool {
        self.check_only(now);
        let mut frozen = self.frozen_at.lock();
        match *frozen {
            None => true,
            // Won anew after the gap, or held long enough since.
            Some(t) if since > t || now.saturating_duration_since(t) >= self.trust_after => {
                *frozen = None;
                true
            }
            Some(_) => false,
        }
    }

    /// `check` without moving the tick (callers other than the ticker).
    fn check_only(&self, now: Instant) {
        let last = *self.last_tick.lock();
        if now.saturating_duration_since(last) > self.gap {
            *self.frozen_at.lock() = Some(now);
        }
    }
}

/// `Some(since)` while active.
#[derive(Debug, Clone)]
pub struct Active {
    rx: watch::Receiver<Option<Instant>>,
    freeze: Option<Arc<Freeze>>,
    /// Embedded mode's sender, kept so the value is never seen as closed.
    _fixed: Option<Arc<watch::Sender<Option<Instant>>>>,
}

impl Active {
    /// Always active (embedded mode), since process start.
    pub fn always() -> Active {
        let since = Instant::now()
            .checked_sub(HANDOVER_PAUSE)
            .unwrap_or_else(Instant::now);
        let (tx, rx) = watch::channel(Some(since));
        Active {
            rx,
            freeze: None,
            _fixed: Some(Arc::new(tx)),
        }
    }

    /// Follows a lease: `Some(since)` while it is held. `heartbeat` is the
    /// lease connection's: a gap of half of it counts as a freeze, and
    /// after one the lease is trusted again once it stayed held for a
    /// heartbeat and a second (the lease task notices a stall of a
    /// heartbeat, and checks several times a heartbeat). Spawns the ticker.
    pub fn following(rx: watch::Receiver<Option<Instant>>, heartbeat: Duration) -> Active {
        let freeze = Arc::new(Freeze {
            last_tick: Mutex::new(Instant::now()),
            gap: (heartbeat / 2).max(Duration::from_millis(750)),
            frozen_at: Mutex::new(None),
            trust_after: heartbeat + Duration::from_secs(1),
        });
        let ticker = Arc::downgrade(&freeze);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(TICK);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let Some(f) = ticker.upgrade() else { return };
                f.check(Instant::now());
            }
        });
        Active {
            rx,
            freeze: Some(freeze),
            _fixed: None,
        }
    }

    /// Whether this replica holds the lease right now (and was not frozen
    /// since without the lease being confirmed).
    pub fn is_active(&self) -> bool {
        let since = *self.rx.borrow();
        match (since, &self.freeze) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(s), Some(f)) => f.trusts(s, Instant::now()),
        }
    }

    /// Resolves once this replica holds the lease (without the handover
    /// pause: for consuming, which sends nothing upstream).
    pub async fn held(&self, stop: &CancellationToken) -> bool {
        let mut rx = self.rx.clone();
        tokio::select! {
            r = rx.wait_for(Option::is_some) => r.is_ok(),
            _ = stop.cancelled() => false,
        }
    }

    /// Resolves once this replica no longer holds the lease.
    pub async fn lost(&self) {
        let mut rx = self.rx.clone();
        let _ = rx.wait_for(Option::is_none).await;
    }

    /// Waits until this replica holds the lease, its handover pause is over
    /// and it is trusted; `false` if `stop` fires first.
    pub async fn ready(&self, stop: &CancellationToken) -> bool {
        let mut rx = self.rx.clone();
        loop {
            let since = *rx.borrow_and_update();
            let wait = match since {
                Some(t) if t + HANDOVER_PAUSE > Instant::now() => t + HANDOVER_PAUSE,
                Some(_) if self.is_active() => return true,
                // Held, but not trusted since a freeze: look again soon.
                Some(_) => Instant::now() + TICK,
                None => {
                    tokio::select! {
                        r = rx.changed() => if r.is_err() { return false },
                        _ = stop.cancelled() => return false,
                    }
                    continue;
                }
            };
            tokio::select! {
                _ = tokio::time::sleep_until(wait) => {}
                _ = rx.changed() => {}
                _ = stop.cancelled() => return false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gap_in_running_distrusts_the_lease_until_won_anew_or_held_long_enough() {
        let start = Instant::now();
        let f = Freeze {
            last_tick: Mutex::new(start),
            gap: Duration::from_secs(1),
            frozen_at: Mutex::new(None),
            trust_after: Duration::from_secs(4),
        };
        let since = start;
        assert!(f.trusts(since, start + Duration::from_millis(100)));
        // Frozen for 3 s: whoever looks first sees the gap.
        let resumed = start + Duration::from_secs(3);
        assert!(!f.trusts(since, resumed));
        f.check(resumed);
        assert!(!f.trusts(since, resumed + Duration::from_millis(100)));
        // Won anew after the gap: trusted.
        assert!(f.trusts(
            resumed + Duration::from_millis(50),
            resumed + Duration::from_millis(200)
        ));
        // Another gap, then the lease simply stays held long enough.
        let resumed = resumed + Duration::from_secs(2);
        assert!(!f.trusts(since, resumed));
        let mut now = resumed;
        while now < resumed + Duration::from_secs(4) {
            f.check(now);
            assert!(!f.trusts(since, now), "not trusted yet at {now:?}");
            now += Duration::from_millis(100);
        }
        f.check(now);
        assert!(f.trusts(since, now));
    }
}
