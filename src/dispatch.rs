//! Sending batches: a GCRA limiter per API that every attempt passes
//! (retries too), a cap on requests in flight per API, a circuit that stops
//! everything while upstream rejects our credentials, and the classification
//! of every answer into applied, noop, retry, split or dead letter.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use parking_lot::Mutex;
use rand::Rng;
use tokio::sync::{mpsc, watch, Semaphore, SemaphorePermit};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::coalesce::{Backlog, Batch, Input, Item, Target};
use crate::config::DispatchSettings;
use crate::inbox::journal::{unix_now, DeadLetter};
use crate::telemetry::Metrics;
use crate::tencent::client::{BatchOutcome, ItemOutcome};
use crate::tencent::{
    Api, ApiError, ErrorClass, FollowBatch, SubscriberBatch, TencentClient, UserId,
};

/// Where dead letters go (the journal in embedded mode).
pub trait DeadLetterSink: Send + Sync {
    fn record(&self, dl: DeadLetter);
}

/// Why a read gave up.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("shutting down")]
    Stopped,
}

/// How long a 60007-class answer pauses its API.
const RATE_LIMIT_PAUSE: Duration = Duration::from_secs(1);

/// The per-API gate every attempt passes.
struct Gate {
    limiter: DefaultDirectRateLimiter,
    in_flight: Semaphore,
    paused_until: Mutex<Instant>,
}

impl Gate {
    fn new(rps: u32, max_in_flight: usize) -> Gate {
        // A small burst, and the rest spread evenly, so that no 1-second
        // window ever holds more than `rps` calls: burst + (rps - burst).
        let burst = (rps / 50).max(1);
        let steady = rps.saturating_sub(burst).max(1);
        let period = Duration::from_secs_f64(1.0 / f64::from(steady));
        let quota = Quota::with_period(period)
            .expect("non-zero period")
            .allow_burst(NonZeroU32::new(burst).expect("burst >= 1"));
        Gate {
            limiter: RateLimiter::direct(quota),
            in_flight: Semaphore::new(max_in_flight),
            paused_until: Mutex::new(Instant::now()),
        }
    }

    async fn enter(&self, stop: &CancellationToken) -> Option<SemaphorePermit<'_>> {
        let permit = tokio::select! {
            p = self.in_flight.acquire() => p.ok()?,
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

    fn pause(&self) {
        let mut p = self.paused_until.lock();
        *p = (*p).max(Instant::now() + RATE_LIMIT_PAUSE);
    }
}

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
enum Pass {
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

    async fn pass(&self, stop: &CancellationToken) -> Option<Pass> {
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

    fn success(&self, pass: Pass) {
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
    fn answered(&self, pass: Pass, err: &ApiError) {
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

    fn reject(&self, pass: Pass, reason: String) {
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

/// One unit of work's retryable failures.
#[derive(Default)]
struct Retries {
    attempt: u32,
    failing_since: Option<Instant>,
}

impl Retries {
    /// Counts a transient or unknown failure of an attempt that started at
    /// `started`; the dead-letter reason once it is time to give up.
    fn failed(
        &mut self,
        class: ErrorClass,
        started: Instant,
        settings: &DispatchSettings,
    ) -> Option<&'static str> {
        let since = *self.failing_since.get_or_insert(started);
        self.attempt += 1;
        if class == ErrorClass::Unknown {
            (self.attempt >= settings.max_attempts).then_some("unknown_error")
        } else {
            (since.elapsed() >= Duration::from_secs(settings.give_up_after_seconds))
                .then_some("retries_exhausted")
        }
    }
}

/// Sends batches and settles their items.
pub struct Dispatcher {
    client: Arc<TencentClient>,
    gates: HashMap<Api, Gate>,
    circuit: Arc<Circuit>,
    backlog: Arc<Backlog>,
    retries: mpsc::UnboundedSender<Input>,
    dead: Arc<dyn DeadLetterSink>,
    metrics: Metrics,
    settings: DispatchSettings,
    stop: CancellationToken,
}

impl Dispatcher {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Arc<TencentClient>,
        requests_per_second: u32,
        settings: DispatchSettings,
        circuit: Arc<Circuit>,
        backlog: Arc<Backlog>,
        retries: mpsc::UnboundedSender<Input>,
        dead: Arc<dyn DeadLetterSink>,
        metrics: Metrics,
        stop: CancellationToken,
    ) -> Arc<Dispatcher> {
        let gates = Api::ALL
            .into_iter()
            .map(|a| (a, Gate::new(requests_per_second, settings.max_in_flight)))
            .collect();
        Arc::new(Dispatcher {
            client,
            gates,
            circuit,
            backlog,
            retries,
            dead,
            metrics,
            settings,
            stop,
        })
    }

    /// Takes batches until the coalescer closes or `stop` fires; each batch
    /// runs as its own task on `tasks`.
    pub async fn run(self: Arc<Self>, mut batches: mpsc::Receiver<Batch>, tasks: TaskTracker) {
        loop {
            tokio::select! {
                b = batches.recv() => match b {
                    Some(b) => {
                        let me = self.clone();
                        let span = tracing::info_span!(
                            "batch",
                            api = b.key.api.name(),
                            target = %b.key.target,
                            items = b.size(),
                        );
                        tasks.spawn(tracing::Instrument::instrument(
                            async move { me.run_batch(b).await },
                            span,
                        ));
                    }
                    None => break,
                },
                _ = self.stop.cancelled() => break,
            }
        }
    }

    async fn run_batch(&self, batch: Batch) {
        let api = batch.key.api;
        let mut fresh = true;
        let mut work = vec![batch];
        while let Some(b) = work.pop() {
            let started = std::mem::take(&mut fresh).then_some(api);
            if let Some((a, b)) = self.drive(b, started).await {
                work.push(b);
                work.push(a);
            }
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let cap = self
            .settings
            .retry_base_ms
            .saturating_mul(1u64 << attempt.min(20))
            .min(self.settings.retry_max_ms);
        Duration::from_millis(rand::rng().random_range(0..=cap))
    }

    async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = self.stop.cancelled() => false,
        }
    }

    /// Sends one batch until it settles. Returns two halves when the batch
    /// must be split to isolate a bad account. Returns `None` also when
    /// stopped: unsettled items stay in the journal / on the broker.
    /// `from_coalescer`: this is the batch's first attempt, counted in the
    /// coalescer's backlog until it passes the gate.
    async fn drive(&self, batch: Batch, mut from_coalescer: Option<Api>) -> Option<(Batch, Batch)> {
        let api = batch.key.api;
        let mut retries = Retries::default();
        loop {
            let (pass, started, result) = self
                .attempt(api, Some(batch.size()), from_coalescer.take(), || {
                    self.call(&batch)
                })
                .await?;
            let err = match result {
                Ok(outcome) => {
                    self.circuit.success(pass);
                    self.settle_outcome(batch, outcome);
                    return None;
                }
                Err(e) => e,
            };
            let class = err.class();
            self.circuit.answered(pass, &err);
            tracing::debug!(api = api.name(), error = %err, class = class.as_str(), "upstream call failed");
            match class {
                ErrorClass::Credentials => {
                    self.circuit.reject(pass, err.to_string());
                }
                ErrorClass::RateLimited => {
                    self.gates[&api].pause();
                    self.metrics.items(api, "retried", batch.item_count());
                }
                ErrorClass::Transient | ErrorClass::Unknown => {
                    if let Some(reason) = retries.failed(class, started, &self.settings) {
                        self.dead_letter_batch(batch, reason, &err.to_string());
                        return None;
                    }
                    self.metrics.items(api, "retried", batch.item_count());
                    if !self.sleep(self.backoff(retries.attempt)).await {
                        return None;
                    }
                }
                ErrorClass::Moot => {
                    self.settle_all(batch, "noop");
                    return None;
                }
                ErrorClass::BadRequest | ErrorClass::Limit => {
                    return match batch.split() {
                        Ok(halves) => {
                            tracing::info!(api = api.name(), code = %err.metric_code(), "batch refused as a whole; splitting to isolate the cause");
                            Some(halves)
                        }
                        Err(single) => {
                            let reason = match (class, err.vendor_code()) {
                                (ErrorClass::Limit, Some(130006)) => "channel_full",
                                (ErrorClass::Limit, Some(130010)) => "subscription_limit",
                                (ErrorClass::Limit, _) => "limit",
                                _ => "bad_request",
                            };
                            self.dead_letter_batch(single, reason, &err.to_string());
                            None
                        }
                    };
                }
            }
        }
    }

    /// A read (or any single call) under the same rules as the batches: the
    /// circuit, the API's limiter and in-flight cap, retries with backoff
    /// for transient answers, a pause on 60007-class ones. Returns the
    /// first answer that retrying cannot change.
    pub async fn read<T, F, Fut>(&self, api: Api, call: F) -> Result<T, ReadError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, ApiError>>,
    {
        let mut retries = Retries::default();
        loop {
            let (pass, started, result) = self
                .attempt(api, None, None, &call)
                .await
                .ok_or(ReadError::Stopped)?;
            let err = match result {
                Ok(v) => {
                    self.circuit.success(pass);
                    return Ok(v);
                }
                Err(e) => e,
            };
            let class = err.class();
            self.circuit.answered(pass, &err);
            match class {
                ErrorClass::Credentials => self.circuit.reject(pass, err.to_string()),
                ErrorClass::RateLimited => self.gates[&api].pause(),
                ErrorClass::Transient | ErrorClass::Unknown => {
                    if retries.failed(class, started, &self.settings).is_some()
                        || !self.sleep(self.backoff(retries.attempt)).await
                    {
                        return Err(ReadError::Api(err));
                    }
                }
                _ => return Err(ReadError::Api(err)),
            }
        }
    }

    /// One attempt, as every attempt goes: through the circuit, the API's
    /// in-flight cap and limiter, counted. `None` when stopped.
    async fn attempt<T, F, Fut>(
        &self,
        api: Api,
        items: Option<usize>,
        leaves_backlog: Option<Api>,
        call: F,
    ) -> Option<(Pass, Instant, Result<T, ApiError>)>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, ApiError>>,
    {
        let pass = self.circuit.pass(&self.stop).await?;
        let permit = self.gates[&api].enter(&self.stop).await?;
        if let Some(api) = leaves_backlog {
            self.backlog.started(api);
        }
        let started = Instant::now();
        let result = call().await;
        drop(permit);
        let code = match &result {
            Ok(_) => "0".to_owned(),
            Err(e) => e.metric_code(),
        };
        self.metrics
            .upstream_request(api, &code, started.elapsed().as_secs_f64(), items);
        Some((pass, started, result))
    }

    /// The client, for building read calls.
    pub fn client(&self) -> &TencentClient {
        &self.client
    }

    async fn call(&self, batch: &Batch) -> Result<BatchOutcome, ApiError> {
        let members = || batch.members.keys().cloned();
        match (&batch.key.api, &batch.key.target) {
            (Api::DeleteSubscriber, Target::Channel(c)) => {
                let b = SubscriberBatch::try_from_iter(members())
                    .expect("the coalescer keeps batches within capacity");
                self.client.delete_subscriber(c, &b).await
            }
            (Api::FollowDelete, Target::From(f)) => {
                let b = FollowBatch::try_from_iter(members())
                    .expect("the coalescer keeps batches within capacity");
                self.client.follow_delete(f, &b).await
            }
            (Api::AddSubscriber, Target::Channel(c)) => {
                let b = SubscriberBatch::try_from_iter(members())
                    .expect("the coalescer keeps batches within capacity");
                self.client.add_subscriber(c, &b).await
            }
            (Api::DestroyOfficialAccount, Target::Channel(c)) => self
                .client
                .destroy_official_account(c)
                .await
                .map(|()| BatchOutcome { items: Vec::new() }),
            (api, _) => Err(ApiError::Decode {
                api: *api,
                detail: "no dispatch route for this API".into(),
            }),
        }
    }

    fn settle_items(&self, api: Api, items: Vec<Item>, result: &str) {
        self.metrics.items(api, result, items.len());
        self.metrics.pending_add(api, -(items.len() as i64));
        for i in items {
            i.origin.settle_one();
        }
    }

    fn settle_outcome(&self, mut batch: Batch, outcome: BatchOutcome) {
        let api = batch.key.api;
        for (user, o) in outcome.items {
            let Some(items) = batch.members.shift_remove(&user) else {
                continue;
            };
            match o {
                ItemOutcome::Applied => self.settle_items(api, items, "applied"),
                ItemOutcome::Noop => self.settle_items(api, items, "noop"),
                ItemOutcome::Failed => self.retry_member(&batch, user, items),
            }
        }
        // Whole-target work (destroy) and its riders: the call succeeded.
        let whole = std::mem::take(&mut batch.whole);
        self.settle_items(api, whole, "applied");
        self.settle_riders(std::mem::take(&mut batch.riders), "noop");
        // Members the answer did not mention were turned into Failed by the
        // client, so nothing is left here; be safe anyway.
        let rest: Vec<(UserId, Vec<Item>)> = batch.members.drain(..).collect();
        for (user, items) in rest {
            self.retry_member(&batch, user, items);
        }
    }

    fn settle_riders(&self, riders: Vec<(UserId, Item)>, result: &str) {
        let items: Vec<Item> = riders.into_iter().map(|(_, i)| i).collect();
        self.settle_items(Api::DeleteSubscriber, items, result);
    }

    fn settle_all(&self, mut batch: Batch, result: &str) {
        let api = batch.key.api;
        let members: Vec<Item> = batch.members.drain(..).flat_map(|(_, v)| v).collect();
        self.settle_items(api, members, result);
        self.settle_items(api, std::mem::take(&mut batch.whole), result);
        self.settle_riders(std::mem::take(&mut batch.riders), "noop");
    }

    fn retry_member(&self, batch: &Batch, user: UserId, items: Vec<Item>) {
        let api = batch.key.api;
        let attempts = items.iter().map(|i| i.attempts).max().unwrap_or(0) + 1;
        if attempts >= self.settings.max_attempts {
            let action = batch.key.action(Some(&user));
            self.dead_letter_items(
                api,
                &action,
                items,
                "item_failed",
                "the upstream reported this item failed on every attempt",
            );
            return;
        }
        self.metrics.items(api, "retried", items.len());
        let items = items.into_iter().map(|i| Item { attempts, ..i }).collect();
        let input = Input::Retry {
            key: batch.key.clone(),
            member: user,
            items,
        };
        if self.retries.send(input).is_err() {
            // Shutting down: the items stay unsettled and are replayed.
            tracing::debug!("coalescer gone; item left for replay");
        }
    }

    fn dead_letter_batch(&self, mut batch: Batch, reason: &str, detail: &str) {
        let api = batch.key.api;
        let key = batch.key.clone();
        for (user, items) in batch.members.drain(..) {
            self.dead_letter_items(api, &key.action(Some(&user)), items, reason, detail);
        }
        let whole = std::mem::take(&mut batch.whole);
        self.dead_letter_items(api, &key.action(None), whole, reason, detail);
        for (user, item) in std::mem::take(&mut batch.riders) {
            let Target::Channel(c) = &key.target else {
                continue;
            };
            let action = crate::rules::Action::Unsubscribe {
                channel: c.clone(),
                user,
            };
            self.dead_letter_items(
                Api::DeleteSubscriber,
                &action,
                vec![item],
                reason,
                &format!("the destroy of this channel failed: {detail}"),
            );
        }
    }

    fn dead_letter_items(
        &self,
        api: Api,
        action: &crate::rules::Action,
        items: Vec<Item>,
        reason: &str,
        detail: &str,
    ) {
        if items.is_empty() {
            return;
        }
        tracing::warn!(api = api.name(), reason, %detail, "dead-lettered");
        self.metrics.dead_lettered(reason, items.len());
        for i in &items {
            let meta = i.origin.meta();
            self.dead.record(DeadLetter {
                id: 0,
                event_id: meta.id.clone(),
                event_type: meta.kind.clone(),
                action: Some(action.clone()),
                reason: reason.to_owned(),
                detail: detail.to_owned(),
                at_unix: unix_now(),
                event: serde_json::from_slice(&meta.body).unwrap_or(serde_json::Value::Null),
            });
        }
        self.settle_items(api, items, "dead_lettered");
    }
}
