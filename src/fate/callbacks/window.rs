//! The callbacks in hand, whichever feed they came from (the record
//! store's cursor in embedded mode, the callback queue in broker mode):
//! attempts up to `CONCURRENCY` at once, backoff with full jitter, the
//! wake-up of every waiting callback when the receiver answers again, and
//! the dead letter of a callback past `max_age`. What a feed does with a
//! finished callback (move its cursor, ack its delivery) is its own.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{attempt, receiver, CallbackOptions, Outcome, BACKOFF_BASE, CONCURRENCY};
use crate::domain::clock::{unix_ms, unix_now};
use crate::domain::{CallbackResult, DeadLetter, DeadLetterReason, DeadLetterSink};
use crate::fate::EventRecord;
use crate::telemetry::Metrics;

/// One callback, as sent on every attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Callback {
    /// Its `webhook-id`.
    pub msg_id: String,
    pub event_id: String,
    pub event_type: String,
    /// The body, the same bytes on every attempt.
    pub body: Vec<u8>,
    /// When its event settled (unix ms): `max_age` counts from here.
    pub settled_ms: u64,
}

impl Callback {
    pub fn of(record: &EventRecord) -> Callback {
        Callback {
            msg_id: super::message_id(record),
            event_id: record.id.clone(),
            event_type: record.kind.clone(),
            body: super::body(record),
            settled_ms: record.settled_at_ms.unwrap_or(record.accepted_at_ms),
        }
    }
}

/// What became of the attempts so far, carried over when a callback is
/// handed on (broker mode's long-held callbacks are published again).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tries {
    pub attempts: u32,
    /// What the last attempt got, for the dead letter.
    pub last: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Waiting,
    Sending,
    Delivered,
    /// Given up (`max_age`): its dead letter is recorded.
    Expired,
}

impl State {
    pub fn is_done(self) -> bool {
        matches!(self, State::Delivered | State::Expired)
    }
}

/// One callback in the window; `at` is where its feed has it.
pub struct Slot<K> {
    seq: u64,
    pub at: K,
    pub callback: Callback,
    pub tries: Tries,
    pub next_at: Instant,
    pub state: State,
}

/// The results of attempts, by slot.
pub type Results = mpsc::UnboundedReceiver<(u64, Outcome)>;

pub struct Window<K> {
    slots: VecDeque<Slot<K>>,
    next_seq: u64,
    in_flight: usize,
    /// Attempts are failing (logged once when that starts and ends).
    failing: bool,
    http: reqwest::Client,
    opts: CallbackOptions,
    sink: Arc<dyn DeadLetterSink>,
    metrics: Metrics,
    tx: mpsc::UnboundedSender<(u64, Outcome)>,
}

impl<K> Window<K> {
    pub fn new(
        http: reqwest::Client,
        opts: CallbackOptions,
        sink: Arc<dyn DeadLetterSink>,
        metrics: Metrics,
    ) -> (Window<K>, Results) {
        let (tx, rx) = mpsc::unbounded_channel();
        let w = Window {
            slots: VecDeque::new(),
            next_seq: 0,
            in_flight: 0,
            failing: false,
            http,
            opts,
            sink,
            metrics,
            tx,
        };
        (w, rx)
    }

    pub fn opts(&self) -> &CallbackOptions {
        &self.opts
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Takes in a callback, first attempted at `next_at`.
    pub fn push(&mut self, at: K, callback: Callback, tries: Tries, next_at: Instant) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.slots.push_back(Slot {
            seq,
            at,
            callback,
            tries,
            next_at,
            state: State::Waiting,
        });
    }

    /// Gives up the waiting callbacks past `max_age`, starts attempts for
    /// those due (up to `CONCURRENCY` in flight), and sets the oldest
    /// pending gauge.
    pub fn pump(&mut self) {
        let now = Instant::now();
        let now_ms = unix_ms();
        let max_age_ms = u64::try_from(self.opts.max_age.as_millis()).unwrap_or(u64::MAX);
        for i in 0..self.slots.len() {
            let s = &self.slots[i];
            if s.state != State::Waiting {
                continue;
            }
            if now_ms.saturating_sub(s.callback.settled_ms) >= max_age_ms {
                self.give_up(i);
                continue;
            }
            if s.next_at > now || self.in_flight >= CONCURRENCY {
                continue;
            }
            let s = &mut self.slots[i];
            s.state = State::Sending;
            s.tries.attempts += 1;
            self.in_flight += 1;
            let (http, url, key) = (
                self.http.clone(),
                self.opts.url.clone(),
                self.opts.key.clone(),
            );
            let (seq, msg_id, body) = (s.seq, s.callback.msg_id.clone(), s.callback.body.clone());
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let outcome = attempt(&http, &url, &key, &msg_id, body).await;
                let _ = tx.send((seq, outcome));
            });
        }
        let oldest = self
            .slots
            .iter()
            .find(|s| !s.state.is_done())
            .map_or(0, |s| now_ms.saturating_sub(s.callback.settled_ms) / 1000);
        self.metrics.set_callback_oldest_pending(oldest);
    }

    fn give_up(&mut self, i: usize) {
        let s = &mut self.slots[i];
        s.state = State::Expired;
        let c = &s.callback;
        let data = serde_json::from_slice::<serde_json::Value>(&c.body)
            .map(|mut v| v["data"].take())
            .unwrap_or(serde_json::Value::Null);
        let detail = format!(
            "callback {} not delivered within {} after the event settled ({} attempts; last: {})",
            c.msg_id,
            humantime::format_duration(self.opts.max_age),
            s.tries.attempts,
            if s.tries.last.is_empty() {
                "none"
            } else {
                &s.tries.last
            }
        );
        tracing::warn!(event_id = %c.event_id, attempts = s.tries.attempts, "completion callback given up (callback_expired)");
        self.sink.record(DeadLetter {
            id: 0,
            event_id: c.event_id.clone(),
            event_type: c.event_type.clone(),
            action: None,
            reason: DeadLetterReason::CallbackExpired,
            detail,
            at_unix: unix_now(),
            event: data,
        });
        self.metrics
            .dead_lettered(DeadLetterReason::CallbackExpired, 1);
    }

    /// Takes in the result of an attempt.
    pub fn settle(&mut self, seq: u64, outcome: Outcome) {
        self.in_flight = self.in_flight.saturating_sub(1);
        let now = Instant::now();
        let Some(i) = self.slots.iter().position(|s| s.seq == seq) else {
            // Its slot was forgotten (broker mode: the connection was lost).
            return;
        };
        match outcome {
            Outcome::Delivered => {
                self.metrics.callback_delivery(CallbackResult::Delivered);
                self.slots[i].state = State::Delivered;
                if self.failing {
                    tracing::info!("completion callbacks are delivered again");
                    self.failing = false;
                }
                // The receiver answers again: nothing waits out its backoff.
                for s in self.slots.iter_mut().filter(|s| s.state == State::Waiting) {
                    s.next_at = s.next_at.min(now);
                }
            }
            Outcome::Failed(result, detail) => {
                self.metrics.callback_delivery(result);
                if !self.failing {
                    tracing::warn!(receiver = %receiver(&self.opts.url), answer = %detail, "completion callbacks fail; retrying with backoff");
                    self.failing = true;
                }
                let s = &mut self.slots[i];
                s.state = State::Waiting;
                s.next_at = now + backoff(s.tries.attempts, self.opts.max_backoff);
                s.tries.last = detail;
            }
        }
    }

    /// When something is next due: an attempt (unless `CONCURRENCY`
    /// attempts are in flight already: then the end of one wakes the
    /// sender), a waiting callback's `max_age`, or what `also` says of a
    /// waiting callback (broker mode: the end of its hold).
    pub fn wake(&self, also: impl Fn(&Slot<K>) -> Option<Instant>) -> Option<Instant> {
        let can_send = self.in_flight < CONCURRENCY;
        self.slots
            .iter()
            .filter(|s| s.state == State::Waiting)
            .map(|s| {
                let due = if can_send {
                    s.next_at.min(self.expiry(s))
                } else {
                    self.expiry(s)
                };
                also(s).map_or(due, |t| t.min(due))
            })
            .min()
    }

    /// When a waiting callback's `max_age` is up.
    fn expiry(&self, s: &Slot<K>) -> Instant {
        let age = Duration::from_millis(unix_ms().saturating_sub(s.callback.settled_ms));
        Instant::now() + self.opts.max_age.saturating_sub(age)
    }

    /// The finished callback at the front, in the order they came in.
    pub fn pop_done_front(&mut self) -> Option<Slot<K>> {
        if self.slots.front()?.state.is_done() {
            self.slots.pop_front()
        } else {
            None
        }
    }

    /// Takes out every slot `pick` chooses (finished ones, or waiting ones
    /// to hand on), wherever they are.
    pub fn take(&mut self, mut pick: impl FnMut(&Slot<K>) -> bool) -> Vec<Slot<K>> {
        // Called at every turn of the sender's loop: most find nothing.
        if !self.slots.iter().any(&mut pick) {
            return Vec::new();
        }
        let mut taken = Vec::new();
        let mut kept = VecDeque::with_capacity(self.slots.len());
        for s in self.slots.drain(..) {
            if pick(&s) {
                taken.push(s);
            } else {
                kept.push_back(s);
            }
        }
        self.slots = kept;
        taken
    }

    /// Forgets every slot (their attempts still in flight are ignored when
    /// they end).
    pub fn clear(&mut self) {
        self.slots.clear();
        self.metrics.set_callback_oldest_pending(0);
    }
}

/// Full jitter: anywhere up to the attempt's ceiling, which doubles from
/// `BACKOFF_BASE` up to `max`.
pub fn backoff(attempts: u32, max: Duration) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(1u32 << attempts.saturating_sub(1).min(20))
        .min(max);
    let ms = u64::try_from(ceiling.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    Duration::from_millis(rand::rng().random_range(0..=ms))
}

pub async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
