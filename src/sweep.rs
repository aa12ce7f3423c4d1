//! Sweeps: page through a channel's subscribers (`get_subscriber_info`,
//! `Limit` 200, `Next` until empty) and remove, through the normal pipeline,
//! everyone on a deny list. Also the managed channels' subscriber counts.
//! Reads go through `dispatch::Upstream`, so they share its limits and
//! retries.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::dispatch::{ReadError, Upstream};
use crate::domain::Action;
use crate::domain::{ChannelId, UserId};
use crate::pipeline::Pipeline;
use crate::settle::EventMeta;
use crate::telemetry::Metrics;
use crate::tencent::api::MAX_SUBSCRIBER_PAGE;

/// Most finished sweeps remembered for `GET`.
const KEEP_FINISHED: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SweepState {
    Running,
    Done,
    Failed,
}

/// A sweep's progress and result.
#[derive(Debug, Clone, Serialize)]
pub struct SweepStatus {
    pub id: u64,
    pub channel: String,
    pub dry_run: bool,
    pub state: SweepState,
    /// `get_subscriber_info` pages read.
    pub pages: u64,
    /// Subscribers seen.
    pub scanned: u64,
    /// The channel's `SubscriberNum` on the first page.
    pub subscriber_num: u64,
    /// Subscribers on the deny list.
    pub found: u64,
    /// Removals settled (applied, or already gone); 0 on a dry run.
    pub removed: u64,
    /// Up to 1,000 of the accounts found.
    pub found_sample: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Runs and remembers sweeps.
pub struct Sweeps {
    upstream: Arc<Upstream>,
    pipeline: Mutex<Option<Pipeline>>,
    jobs: DashMap<u64, Arc<Mutex<SweepStatus>>>,
    next_id: AtomicU64,
}

impl Sweeps {
    pub fn new(upstream: Arc<Upstream>, pipeline: Pipeline) -> Arc<Sweeps> {
        Arc::new(Sweeps {
            upstream,
            pipeline: Mutex::new(Some(pipeline)),
            jobs: DashMap::new(),
            next_id: AtomicU64::new(1),
        })
    }

    /// Stops taking sweeps (shutdown): drops the pipeline handle so the
    /// coalescer can drain.
    pub fn close(&self) {
        self.pipeline.lock().take();
    }

    pub fn status(&self, id: u64) -> Option<SweepStatus> {
        self.jobs.get(&id).map(|j| j.lock().clone())
    }

    /// Starts a sweep in the background; returns its id.
    pub fn start(
        self: &Arc<Self>,
        channel: ChannelId,
        deny: HashSet<String>,
        dry_run: bool,
    ) -> Option<u64> {
        let pipeline = self.pipeline.lock().clone()?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let status = Arc::new(Mutex::new(SweepStatus {
            id,
            channel: channel.to_string(),
            dry_run,
            state: SweepState::Running,
            pages: 0,
            scanned: 0,
            subscriber_num: 0,
            found: 0,
            removed: 0,
            found_sample: Vec::new(),
            error: None,
        }));
        self.jobs.insert(id, status.clone());
        if self.jobs.len() > KEEP_FINISHED {
            let old: Vec<u64> = self
                .jobs
                .iter()
                .filter(|j| j.value().lock().state != SweepState::Running)
                .map(|j| *j.key())
                .filter(|k| *k + (KEEP_FINISHED as u64) < id)
                .collect();
            for k in old {
                self.jobs.remove(&k);
            }
        }
        let me = self.clone();
        tokio::spawn(async move {
            let result = me
                .run(id, &channel, &deny, dry_run, &pipeline, &status)
                .await;
            let mut s = status.lock();
            match result {
                Ok(()) => {
                    if s.state == SweepState::Running && (dry_run || s.found == 0) {
                        s.state = SweepState::Done;
                    }
                }
                Err(e) => {
                    s.state = SweepState::Failed;
                    s.error = Some(e);
                }
            }
            tracing::info!(sweep = id, channel = %channel, pages = s.pages, scanned = s.scanned, found = s.found, dry_run, "sweep listed");
        });
        Some(id)
    }

    async fn run(
        &self,
        id: u64,
        channel: &ChannelId,
        deny: &HashSet<String>,
        dry_run: bool,
        pipeline: &Pipeline,
        status: &Arc<Mutex<SweepStatus>>,
    ) -> Result<(), String> {
        let mut next = String::new();
        // Removals are submitted page by page; `pending` counts those not
        // settled, and the last one to settle marks the sweep done.
        let pending = Arc::new(AtomicU64::new(1));
        loop {
            let page = self
                .upstream
                .get_subscriber_info(channel, MAX_SUBSCRIBER_PAGE, &next)
                .await
                .map_err(|e| match e {
                    ReadError::Api(e) => e.to_string(),
                    ReadError::Stopped => "shutting down".to_owned(),
                })?;
            let matched: Vec<UserId> = page
                .subscribers
                .iter()
                .filter(|s| deny.contains(&s.account))
                .filter_map(|s| UserId::parse(s.account.as_str()).ok())
                .collect();
            {
                let mut s = status.lock();
                s.pages += 1;
                s.scanned += page.subscribers.len() as u64;
                if s.pages == 1 {
                    s.subscriber_num = page.subscriber_num;
                }
                s.found += matched.len() as u64;
                for u in matched
                    .iter()
                    .take(1000usize.saturating_sub(s.found_sample.len()))
                {
                    s.found_sample.push(u.to_string());
                }
            }
            if !dry_run && !matched.is_empty() {
                let n = matched.len() as u64;
                pending.fetch_add(n, Ordering::AcqRel);
                let actions = matched
                    .into_iter()
                    .map(|user| Action::Unsubscribe {
                        channel: channel.clone(),
                        user,
                    })
                    .collect();
                let meta = EventMeta {
                    id: format!("sweep-{id}"),
                    kind: "sweep".into(),
                    body: Arc::from(
                        serde_json::to_vec(&serde_json::json!({"sweep": id, "channel": channel}))
                            .unwrap_or_default(),
                    ),
                };
                let (st, pend) = (status.clone(), pending.clone());
                pipeline
                    .submit(meta, actions, Instant::now(), move || {
                        let mut s = st.lock();
                        s.removed += n;
                        if pend.fetch_sub(n, Ordering::AcqRel) == n {
                            s.state = SweepState::Done;
                        }
                    })
                    .await
                    .map_err(|e| e.to_string())?;
            }
            if page.next.is_empty() {
                break;
            }
            next = page.next;
        }
        // The listing's own share of `pending`.
        if pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            status.lock().state = SweepState::Done;
        }
        Ok(())
    }
}

/// Keeps `chat_janitor_managed_channel_subscribers` current: one
/// `get_subscriber_info` with `Limit` 1 per managed channel per interval.
pub fn spawn_subscriber_counts(
    upstream: Arc<Upstream>,
    channels: Vec<ChannelId>,
    every: Duration,
    metrics: Metrics,
    stop: CancellationToken,
) {
    if channels.is_empty() || every.is_zero() {
        return;
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            for c in &channels {
                let r = upstream.get_subscriber_info(c, 1, "").await;
                match r {
                    Ok(page) => metrics.set_channel_subscribers(c.as_str(), page.subscriber_num),
                    Err(ReadError::Stopped) => return,
                    Err(e) => {
                        tracing::debug!(channel = %c, error = %e, "subscriber count not read")
                    }
                }
            }
        }
    });
}
