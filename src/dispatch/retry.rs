//! What to do after a failed attempt: the one place an answer's error class
//! becomes a decision, for batches and reads alike, and the backoff between
//! attempts (exponential, full jitter).

use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use crate::config::DispatchSettings;
use crate::domain::DeadLetterReason;
use crate::tencent::{ApiError, ErrorClass};

/// The next step for a unit of work whose attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Upstream rejects our credentials: the circuit opens, and the work
    /// waits at it.
    CredentialsRejected,
    /// Call frequency exceeded (60007-class): the API pauses, and the work
    /// goes through its gate again.
    RateLimited,
    /// Transient: wait this long, then try again.
    Backoff(Duration),
    /// Nothing left to do: the target is gone (130004 on a removal).
    Moot,
    /// The request itself is refused: a batch splits to isolate the cause,
    /// a single item or a read gives up with this reason.
    Refused(DeadLetterReason),
    /// Retrying has gone on long enough.
    GiveUp(DeadLetterReason),
}

/// One unit of work's retryable failures.
#[derive(Debug, Default)]
pub struct Retries {
    attempt: u32,
    /// Failed calls of this batch, whatever the class.
    failed: u32,
    failing_since: Option<Instant>,
}

impl Retries {
    /// Calls of this batch that failed so far (its record's attempts).
    pub fn failed_calls(&self) -> u32 {
        self.failed
    }

    /// Classifies a failed attempt that started at `started`.
    pub fn decide(
        &mut self,
        err: &ApiError,
        started: Instant,
        settings: &DispatchSettings,
    ) -> Decision {
        if let ApiError::NotSent { .. } = err {
            // Nothing was sent, so nothing failed: back through admission,
            // which waits until this replica is active again.
            return Decision::Backoff(Duration::from_millis(settings.retry_base_ms));
        }
        let class = err.class();
        self.failed += 1;
        match class {
            ErrorClass::Credentials => Decision::CredentialsRejected,
            ErrorClass::RateLimited => Decision::RateLimited,
            ErrorClass::Moot => Decision::Moot,
            ErrorClass::BadRequest => Decision::Refused(DeadLetterReason::BadRequest),
            ErrorClass::Limit => Decision::Refused(match err.vendor_code() {
                Some(130006) => DeadLetterReason::ChannelFull,
                Some(130010) => DeadLetterReason::SubscriptionLimit,
                _ => DeadLetterReason::Limit,
            }),
            ErrorClass::Transient | ErrorClass::Unknown => {
                let since = *self.failing_since.get_or_insert(started);
                self.attempt += 1;
                if class == ErrorClass::Unknown && self.attempt >= settings.max_attempts {
                    Decision::GiveUp(DeadLetterReason::UnknownError)
                } else if class == ErrorClass::Transient
                    && since.elapsed() >= Duration::from_secs(settings.give_up_after_seconds)
                {
                    Decision::GiveUp(DeadLetterReason::RetriesExhausted)
                } else {
                    Decision::Backoff(backoff(self.attempt, settings))
                }
            }
        }
    }
}

/// Full jitter: a uniform wait up to `retry_base_ms * 2^attempt`, capped.
fn backoff(attempt: u32, settings: &DispatchSettings) -> Duration {
    let cap = settings
        .retry_base_ms
        .saturating_mul(1u64 << attempt.min(20))
        .min(settings.retry_max_ms);
    Duration::from_millis(rand::rng().random_range(0..=cap))
}
