//! Whether this process may call upstream. In embedded mode it always may.
//! In broker mode only the replica holding the dispatch lease may, so that
//! however many replicas run, together they stay within one
//! `requests_per_second` budget; and a newly active replica waits one
//! second first, assuming the one before it spent the current window's
//! budget (an empty bucket), so the windows of two leaders never overlap.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a newly active replica waits before its first call.
pub const HANDOVER_PAUSE: Duration = Duration::from_secs(1);

/// `Some(since)` while active.
#[derive(Debug, Clone)]
pub struct Active {
    rx: watch::Receiver<Option<Instant>>,
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
            _fixed: Some(Arc::new(tx)),
        }
    }

    /// Follows a lease: `Some(since)` while it is held.
    pub fn following(rx: watch::Receiver<Option<Instant>>) -> Active {
        Active { rx, _fixed: None }
    }

    /// Whether this replica holds the lease right now.
    pub fn is_active(&self) -> bool {
        self.rx.borrow().is_some()
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

    /// Waits until this replica holds the lease and its handover pause is
    /// over; `false` if `stop` fires first.
    pub async fn ready(&self, stop: &CancellationToken) -> bool {
        let mut rx = self.rx.clone();
        loop {
            let since = *rx.borrow_and_update();
            match since {
                Some(t) if t + HANDOVER_PAUSE <= Instant::now() => return true,
                Some(t) => tokio::select! {
                    _ = tokio::time::sleep_until(t + HANDOVER_PAUSE) => {}
                    _ = rx.changed() => {}
                    _ = stop.cancelled() => return false,
                },
                None => tokio::select! {
                    r = rx.changed() => if r.is_err() { return false },
                    _ = stop.cancelled() => return false,
                },
            }
        }
    }
}
