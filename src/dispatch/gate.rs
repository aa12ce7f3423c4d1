//! The per-API gate every attempt passes, retries too: a GCRA limiter that
//! never lets a one-second window hold more than `requests_per_second`
//! calls, a cap on calls in flight, and a pause after a 60007-class answer.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a 60007-class answer pauses its API.
const RATE_LIMIT_PAUSE: Duration = Duration::from_secs(1);

/// The per-API gate every attempt passes.
pub(super) struct Gate {
    limiter: DefaultDirectRateLimiter,
    in_flight: Arc<Semaphore>,
    paused_until: Mutex<Instant>,
}

impl Gate {
    pub(super) fn new(rps: u32, max_in_flight: usize) -> Gate {
        // A small burst, and the rest spread evenly, so that no 1-second
        // window of sending holds more than `rps - margin` calls. The
        // margin (2%) is for the upstream's window, which counts arrivals:
        // calls held up by a busy CPU or network arrive bunched, and with
        // no margin a window there saw 202 (the replicas benchmark).
        let burst = (rps / 50).max(1);
        let margin = rps / 50;
        let steady = rps.saturating_sub(burst + margin).max(1);
        let period = Duration::from_secs_f64(1.0 / f64::from(steady));
        let quota = Quota::with_period(period)
            .expect("non-zero period")
            .allow_burst(NonZeroU32::new(burst).expect("burst >= 1"));
        Gate {
            limiter: RateLimiter::direct(quota),
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            paused_until: Mutex::new(Instant::now()),
        }
    }

    /// Waits for an in-flight slot (held until the permit drops), the end
    /// of a pause, and the limiter; `None` if `stop` fires first.
    pub(super) async fn enter(&self, stop: &CancellationToken) -> Option<OwnedSemaphorePermit> {
        let permit = tokio::select! {
            p = self.in_flight.clone().acquire_owned() => p.ok()?,
            _ = stop.cancelled() => return None,
        };
        loop {
            let until = *self.paused_until.lock();
            if until <= Instant::now() {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(until) => {}
                _ = stop.cancelled() => return None,
            }
        }
        tokio::select! {
            _ = self.limiter.until_ready() => Some(permit),
            _ = stop.cancelled() => None,
        }
    }

    pub(super) fn pause(&self) {
        let mut p = self.paused_until.lock();
        *p = (*p).max(Instant::now() + RATE_LIMIT_PAUSE);
    }
}
