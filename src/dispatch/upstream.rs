//! The upstream service that batches and reads both call: every attempt goes
//! through the circuit, its API's gate, and is counted; every failure goes
//! through the one classification in `retry`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::circuit::{Circuit, Pass};
use super::gate::Gate;
use super::retry::{Decision, Retries};
use crate::coalesce::Request;
use crate::config::DispatchSettings;
use crate::domain::Active;
use crate::domain::{Api, ChannelId, UserId};
use crate::telemetry::Metrics;
use crate::tencent::client::BatchOutcome;
use crate::tencent::types::{
    FollowGetResponse, FollowType, GetSubscribedListResponse, GetSubscriberInfoResponse,
};
use crate::tencent::{ApiError, TencentClient};

/// Why a read gave up.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("shutting down")]
    Stopped,
}

/// One finished attempt.
pub(super) struct Attempt<T> {
    pub pass: Pass,
    pub started: Instant,
    pub result: Result<T, ApiError>,
}

/// Leave to make one call now: this replica is the active dispatcher, the
/// circuit let it pass, and its API's gate admitted it. It holds one of the
/// API's in-flight slots until the call it is spent on ends.
pub(super) struct Admission {
    pass: Pass,
    slot: OwnedSemaphorePermit,
}

/// The Tencent REST API under our limits.
pub struct Upstream {
    client: Arc<TencentClient>,
    gates: HashMap<Api, Gate>,
    circuit: Arc<Circuit>,
    active: Active,
    metrics: Metrics,
    settings: DispatchSettings,
    stop: CancellationToken,
}

impl Upstream {
    /// `stop` abandons every wait (gate, circuit, backoff).
    pub fn new(
        client: Arc<TencentClient>,
        requests_per_second: u32,
        settings: DispatchSettings,
        active: Active,
        metrics: Metrics,
        stop: CancellationToken,
    ) -> Arc<Upstream> {
        let gates = Api::ALL
            .into_iter()
            .map(|a| (a, Gate::new(requests_per_second, settings.max_in_flight)))
            .collect();
        let circuit = Circuit::new(
            Duration::from_millis(settings.probe_interval_ms),
            metrics.clone(),
        );
        let gate = active.clone();
        client.gate_sends(Box::new(move || gate.is_active()));
        Arc::new(Upstream {
            client,
            gates,
            circuit,
            active,
            metrics,
            settings,
            stop,
        })
    }

    pub fn circuit(&self) -> &Arc<Circuit> {
        &self.circuit
    }

    pub(super) fn settings(&self) -> &DispatchSettings {
        &self.settings
    }

    /// Whether this replica may call upstream now (it holds the dispatch
    /// lease, or runs embedded).
    pub fn is_active(&self) -> bool {
        self.active.is_active()
    }

    /// Waits until one call on `api` may go, as every call goes: only while
    /// this replica is the active dispatcher, through the circuit, the
    /// API's in-flight cap and limiter. `None` when stopped.
    pub(super) async fn admit(&self, api: Api) -> Option<Admission> {
        loop {
            if !self.active.ready(&self.stop).await {
                return None;
            }
            let pass = self.circuit.pass(&self.stop).await?;
            let slot = self.gates[&api].enter(&self.stop).await?;
            // The lease may have gone while this waited for the limiter.
            if self.active.is_active() {
                return Some(Admission { pass, slot });
            }
        }
    }

    /// Makes the call `admission` was given for, counted.
    pub(super) async fn call<T>(
        &self,
        api: Api,
        admission: Admission,
        items: Option<usize>,
        call: impl Future<Output = Result<T, ApiError>>,
    ) -> Attempt<T> {
        let Admission { pass, slot } = admission;
        let started = Instant::now();
        let result = call.await;
        drop(slot);
        let code = match &result {
            Ok(_) => "0".to_owned(),
            // Not a request: nothing went upstream.
            Err(ApiError::NotSent { .. }) => String::new(),
            Err(e) => e.metric_code(),
        };
        if !code.is_empty() {
            self.metrics
                .upstream_request(api, &code, started.elapsed().as_secs_f64(), items);
        }
        Attempt {
            pass,
            started,
            result,
        }
    }

    /// An attempt that got an answer we can use.
    pub(super) fn succeeded(&self, pass: Pass) {
        self.circuit.success(pass);
    }

    /// An attempt that failed: the circuit and the gate learn of it, and
    /// the decision says what the work does next.
    pub(super) fn failed(
        &self,
        api: Api,
        pass: Pass,
        started: Instant,
        err: &ApiError,
        retries: &mut Retries,
    ) -> Decision {
        self.circuit.answered(pass, err);
        let decision = retries.decide(err, started, &self.settings);
        match decision {
            Decision::CredentialsRejected => self.circuit.reject(pass, err.to_string()),
            Decision::RateLimited => self.gates[&api].pause(),
            _ => {}
        }
        tracing::debug!(api = api.name(), error = %err, ?decision, "upstream call failed");
        decision
    }

    /// Sleeps `d`; `false` if stopped meanwhile.
    pub(super) async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = self.stop.cancelled() => false,
        }
    }

    /// A batch's call (its attempt is the caller's).
    pub(super) async fn send(&self, request: Request<'_>) -> Result<BatchOutcome, ApiError> {
        match request {
            Request::DeleteSubscriber(c, b) => self.client.delete_subscriber(c, &b).await,
            Request::AddSubscriber(c, b) => self.client.add_subscriber(c, &b).await,
            Request::FollowDelete(f, b) => self.client.follow_delete(f, &b).await,
            Request::Destroy(c) => self
                .client
                .destroy_official_account(c)
                .await
                .map(|()| BatchOutcome { items: Vec::new() }),
        }
    }

    /// A read under the same rules as the batches. Returns the first answer
    /// that retrying cannot change.
    async fn read<T, F, Fut>(&self, api: Api, call: F) -> Result<T, ReadError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, ApiError>>,
    {
        let mut retries = Retries::default();
        loop {
            let admission = self.admit(api).await.ok_or(ReadError::Stopped)?;
            let a = self.call(api, admission, None, call()).await;
            let err = match a.result {
                Ok(v) => {
                    self.succeeded(a.pass);
                    return Ok(v);
                }
                Err(e) => e,
            };
            match self.failed(api, a.pass, a.started, &err, &mut retries) {
                Decision::CredentialsRejected | Decision::RateLimited => {}
                Decision::Backoff(d) => {
                    if !self.sleep(d).await {
                        return Err(ReadError::Api(err));
                    }
                }
                Decision::Moot | Decision::Refused(_) | Decision::GiveUp(_) => {
                    return Err(ReadError::Api(err))
                }
            }
        }
    }

    /// One page of a channel's subscribers.
    pub async fn get_subscriber_info(
        &self,
        channel: &ChannelId,
        limit: u32,
        next: &str,
    ) -> Result<GetSubscriberInfoResponse, ReadError> {
        self.read(Api::GetSubscriberInfo, || {
            self.client.get_subscriber_info(channel, limit, next)
        })
        .await
    }

    /// One page of the channels a user is subscribed to.
    pub async fn get_subscribed_official_account_list(
        &self,
        user: &UserId,
        limit: u32,
        offset: u64,
    ) -> Result<GetSubscribedListResponse, ReadError> {
        self.read(Api::GetSubscribedOfficialAccountList, || {
            self.client
                .get_subscribed_official_account_list(user, limit, offset)
        })
        .await
    }

    /// One page of a user's follows (`kind` says which way).
    pub async fn follow_get(
        &self,
        user: &UserId,
        kind: FollowType,
        cursor: &str,
        want: u32,
    ) -> Result<FollowGetResponse, ReadError> {
        self.read(Api::FollowGet, || {
            self.client.follow_get(user, kind, cursor, want)
        })
        .await
    }
}
