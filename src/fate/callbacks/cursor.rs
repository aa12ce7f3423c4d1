//! Embedded mode's feed: the record store read in write order from its
//! callback cursor. Every record up to the cursor was delivered or given
//! up; it is saved at most once a second and at shutdown, so after a
//! restart the window is read again from it and a callback delivered after
//! the last save is sent once more, with the same `webhook-id`.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::window::{sleep_until, Callback, Results, Tries, Window};
use super::WINDOW;
use crate::fate::{CallbackCursor, FateStore, Position};

/// The cursor is saved at most this often while callbacks flow.
const SAVE_EVERY: Duration = Duration::from_secs(1);
/// Wait before reading the store again after it failed.
const READ_RETRY: Duration = Duration::from_secs(1);

pub struct Sender {
    pub store: Arc<dyn FateStore>,
    pub window: Window<Position>,
    /// The newest record read into the window.
    pub read_to: Option<Position>,
    /// Every record up to here is delivered or given up (the cursor).
    pub done_to: Option<Position>,
    pub saved: Option<Position>,
    pub last_save: Instant,
}

impl Sender {
    pub async fn run(mut self, mut results: Results, stop: CancellationToken) {
        let mut written = self.store.written();
        let mut store_open = true;
        // There may be records beyond `read_to`.
        let mut more = true;
        let mut read_again_at: Option<Instant> = None;
        loop {
            if read_again_at.is_some_and(|t| Instant::now() >= t) {
                read_again_at = None;
                more = true;
            }
            if more && self.window.len() < WINDOW {
                let want = WINDOW - self.window.len();
                match self.store.read_after(self.read_to, want).await {
                    Ok(batch) => {
                        more = batch.len() == want;
                        for (pos, record) in batch {
                            self.read_to = Some(pos);
                            self.window.push(
                                pos,
                                Callback::of(&record),
                                Tries::default(),
                                Instant::now(),
                            );
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read event records for callbacks; trying again");
                        more = false;
                        read_again_at = Some(Instant::now() + READ_RETRY);
                    }
                }
            }
            self.window.pump();
            self.advance().await;
            let wake = self
                .window
                .wake(|_| None)
                .into_iter()
                .chain(read_again_at)
                .min();
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                Some((seq, outcome)) = results.recv() => self.window.settle(seq, outcome),
                changed = written.changed(), if store_open && !more => {
                    store_open = changed.is_ok();
                    more = true;
                }
                _ = sleep_until(wake) => {}
            }
        }
        self.save().await;
    }

    /// Moves the cursor over the callbacks done at the front of the
    /// window, and saves it when due.
    async fn advance(&mut self) {
        while let Some(s) = self.window.pop_done_front() {
            self.done_to = Some(s.at);
        }
        if self.done_to != self.saved && self.last_save.elapsed() >= SAVE_EVERY {
            self.save().await;
        }
    }

    async fn save(&mut self) {
        self.last_save = Instant::now();
        if self.done_to == self.saved {
            return;
        }
        let cursor = CallbackCursor {
            after: self.done_to,
        };
        match self.store.save_cursor(Some(cursor)).await {
            Ok(()) => self.saved = self.done_to,
            Err(e) => {
                tracing::warn!(error = %e, "cannot store the callbacks' cursor; delivered callbacks may be sent again after a restart")
            }
        }
    }
}
