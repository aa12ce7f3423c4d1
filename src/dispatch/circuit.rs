//! The circuit: open while upstream rejects our credentials, so nothing is
//! dispatched (and nothing dead-lettered) because a key was rotated.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::telemetry::Metrics;
use crate::tencent::{ApiError, ErrorClass};

/// Open while upstream rejects our credentials: nothing is dispatched but
/// one probe per interval; the first answer that is not a credentials error
/// closes it.
pub struct Circuit {
    state: Mutex<CircuitState>,
    tx: watch::Sender<Option<String>>,
    probe_interval: Duration,
    metrics: Metrics,
}

struct CircuitState {
    next_probe: Instant,
    probing: bool,
}

/// Whether this attempt is the circuit's probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pass {
    Normal,
    Probe,
}

impl Circuit {
    pub fn new(probe_interval: Duration, metrics: Metrics) -> Arc<Circuit> {
        let (tx, _) = watch::channel(None);
        Arc::new(Circuit {
            state: Mutex::new(CircuitState {
                next_probe: Instant::now(),
                probing: false,
            }),
            tx,
            probe_interval,
            metrics,
        })
    }

    /// Why dispatch is stopped, if it is.
    pub fn open_reason(&self) -> Option<String> {
        self.tx.borrow().clone()
    }

    pub(super) async fn pass(&self, stop: &CancellationToken) -> Option<Pass> {
        let mut rx = self.tx.subscribe();
        loop {
            if rx.borrow_and_update().is_none() {
                return Some(Pass::Normal);
            }
            let wait_until = {
                let mut s = self.state.lock();
                let now = Instant::now();
                if !s.probing && now >= s.next_probe {
                    s.probing = true;
                    return Some(Pass::Probe);
                }
                if s.probing {
                    now + self.probe_interval
                } else {
                    s.next_probe
                }
            };
            tokio::select! {
                _ = rx.changed() => {}
                _ = tokio::time::sleep_until(wait_until) => {}
                _ = stop.cancelled() => return None,
            }
        }
    }

    pub(super) fn success(&self, pass: Pass) {
        if pass == Pass::Probe || self.tx.borrow().is_some() {
            self.state.lock().probing = false;
            if self.tx.borrow().is_some() {
                tracing::info!("upstream accepts our credentials again; dispatch resumes");
            }
            self.tx.send_replace(None);
            self.metrics.set_circuit_open(false);
        }
    }

    /// A failed call: a vendor answer other than a credentials error proves
    /// our credentials pass; a network fault proves nothing, so a probe
    /// that meets one only hands the probe on.
    pub(super) fn answered(&self, pass: Pass, err: &ApiError) {
        match (err.class(), err.vendor_code()) {
            (ErrorClass::Credentials, _) => {}
            (_, Some(_)) => self.success(pass),
            (_, None) if pass == Pass::Probe => {
                let mut s = self.state.lock();
                s.probing = false;
                s.next_probe = Instant::now();
            }
            (_, None) => {}
        }
    }

    pub(super) fn reject(&self, pass: Pass, reason: String) {
        let mut s = self.state.lock();
        if pass == Pass::Probe {
            s.probing = false;
        }
        let was_open = self.tx.borrow().is_some();
        if !was_open || pass == Pass::Probe {
            s.next_probe = Instant::now() + self.probe_interval;
        }
        drop(s);
        if !was_open {
            tracing::error!(%reason, "upstream rejects our credentials; dispatch stopped");
        }
        self.tx.send_replace(Some(reason));
        self.metrics.set_circuit_open(true);
    }
}
