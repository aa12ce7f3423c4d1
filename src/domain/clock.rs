//! Wall-clock time as the journal, dead letters and signatures record it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    since_epoch().as_secs()
}

/// Unix milliseconds now.
pub fn unix_ms() -> u64 {
    u64::try_from(since_epoch().as_millis()).unwrap_or(u64::MAX)
}

/// The `Instant` at which `unix_ms` was, for latencies measured from a
/// stored wall-clock time (now, if that is in the future).
pub fn instant_of(unix_ms: u64) -> Instant {
    let ago = Duration::from_millis(self::unix_ms().saturating_sub(unix_ms));
    Instant::now().checked_sub(ago).unwrap_or_else(Instant::now)
}

/// `unix` seconds as RFC 3339 (UTC), for people reading a terminal.
pub fn rfc3339(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}
