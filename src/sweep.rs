//! Sweeps: remove, through the normal pipeline, every subscriber of a
//! channel who is on a deny list. Also the managed channels' subscriber
//! counts. Reads go through `dispatch::Upstream`, so they share its limits
//! and retries.
//!
//! The vendor says of `get_subscriber_info`'s `Next` only that it is "the
//! position of the subscriber last pulled": it may be an offset into the
//! list as it is now, so a removal made between two pages (ours or anyone
//! else's) shifts members onto positions the cursor has passed. A sweep
//! therefore never removes while it pages:
//!
//! 1. a pass pages the whole channel (`Limit` 200, `Next` until empty) and
//!    collects the deny-listed members it lists;
//! 2. it removes them all at once, so the coalescer sends full batches
//!    (100 per `delete_subscriber`), and waits until they settle;
//! 3. another pass confirms: it must list no deny-listed member, and every
//!    page must report the same `SubscriberNum` (otherwise others changed
//!    the channel while it paged, and it may have missed someone). A pass
//!    that finds members goes back to 2.
//!
//! At most [`MAX_PASSES`] passes; the report lists each (pages, listed,
//! found). A member added after the confirming pass is the next sweep's
//! work.
//!
//! In embedded mode a sweep's record lives in the journal: written before
//! the `202`, after each pass and each removal round. On start, a sweep
//! that was running resumes: a pass cut short starts over, a removal round
//! is sent again (removing someone already gone is a no-op upstream). Ids
//! come from a counter in the journal, so they never repeat. Without a
//! journal (broker mode) sweeps live in memory and ids start from the
//! clock in milliseconds.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::dispatch::{ReadError, Upstream};
use crate::domain::{Action, ChannelId, DeadLetter, DeadLetterSink, Settle, UserId};
use crate::inbox::journal::Journal;
use crate::pipeline::Pipeline;
use crate::telemetry::Metrics;
use crate::tencent::api::MAX_SUBSCRIBER_PAGE;
use crate::tencent::types::GetSubscriberInfoResponse;

/// Most finished sweeps remembered for `GET`.
const KEEP_FINISHED: usize = 100;
/// Most passes over the channel one sweep makes.
pub const MAX_PASSES: usize = 4;
/// Most accounts kept in `found_sample`.
const SAMPLE: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SweepState {
    Running,
    Done,
    Failed,
}

/// One pass over the channel.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassReport {
    /// `get_subscriber_info` pages read.
    pub pages: u64,
    /// Subscribers listed.
    pub listed: u64,
    /// Deny-listed subscribers listed.
    pub found: u64,
    /// Every page reported the same `SubscriberNum`.
    pub steady: bool,
}

/// A sweep's progress and result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepStatus {
    pub id: u64,
    pub channel: String,
    pub dry_run: bool,
    pub state: SweepState,
    /// The pass running now, or the last one (1-based).
    pub pass: u64,
    /// The passes completed, in order.
    pub passes: Vec<PassReport>,
    /// `get_subscriber_info` pages read in all, also by passes a restart
    /// cut short.
    pub pages: u64,
    /// Subscribers listed so far by the pass running now (by the last
    /// pass once done).
    pub scanned: u64,
    /// The channel's `SubscriberNum` on the latest page.
    pub subscriber_num: u64,
    /// Distinct deny-listed subscribers found by all passes.
    pub found: u64,
    /// Of those, how many the sweep removed (found and not left).
    pub removed: u64,
    /// Deny-listed subscribers the last pass still listed (0 once a pass
    /// confirms; on a dry run, everyone found).
    pub left: u64,
    /// A pass listed no deny-listed subscriber while the channel held
    /// still.
    pub confirmed: bool,
    /// Times the sweep was resumed after a restart.
    pub resumed: u64,
    /// Up to 1,000 of the accounts found.
    pub found_sample: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Where a sweep is, as the journal keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Phase {
    /// Listing: the pass `status.pass` (re)starts from the first page.
    List,
    /// Removing these accounts, then the next pass.
    Remove(Vec<String>),
    Finished,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Saved {
    status: SweepStatus,
    phase: Phase,
    /// Every deny-listed account found so far.
    found: BTreeSet<String>,
}

/// Why a sweep could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("no new sweeps while shutting down")]
    Closed,
    #[error("the sweep could not be stored: {0}")]
    Storage(String),
}

/// Why a sweep stopped before it was done.
enum Halt {
    /// Shutdown: the journal keeps it running, to resume on the next start.
    Stopped,
    Failed(String),
}

/// Runs and remembers sweeps.
pub struct Sweeps {
    upstream: Arc<Upstream>,
    pipeline: Mutex<Option<Pipeline>>,
    jobs: DashMap<u64, Arc<Mutex<SweepStatus>>>,
    /// Ids without a journal.
    next_id: AtomicU64,
    journal: Option<Journal>,
    /// Where a removal that fails is kept (the inbox's).
    dead: Arc<dyn DeadLetterSink>,
    stop: CancellationToken,
}

/// A removal round's receipt: its dead letters carry the sweep (there is no
/// event), and settling wakes the sweep.
struct RoundReceipt {
    done: tokio::sync::oneshot::Sender<()>,
    /// Stands for the event id in its dead letters.
    id: String,
    sweep: serde_json::Value,
    dead: Arc<dyn DeadLetterSink>,
}

impl Settle for RoundReceipt {
    fn settled(self: Box<Self>) {
        let _ = self.done.send(());
    }

    fn dead_lettered(self: Box<Self>, dl: DeadLetter, _body: Vec<u8>) {
        // A round is submitted already planned; kept all the same.
        self.dead.record(dl);
        let _ = self.done.send(());
    }

    fn action_dead_lettered(&self, mut dl: DeadLetter) {
        dl.event_id = self.id.clone();
        dl.event = self.sweep.clone();
        self.dead.record(dl);
    }
}

impl Sweeps {
    pub fn new(
        upstream: Arc<Upstream>,
        pipeline: Pipeline,
        journal: Option<Journal>,
        dead: Arc<dyn DeadLetterSink>,
    ) -> Arc<Sweeps> {
        let clock_ms = crate::domain::clock::unix_ms().max(1);
        Arc::new(Sweeps {
            upstream,
            pipeline: Mutex::new(Some(pipeline)),
            jobs: DashMap::new(),
            next_id: AtomicU64::new(clock_ms),
            journal,
            dead,
            stop: CancellationToken::new(),
        })
    }

    /// Loads the journal's sweeps: finished ones answer `GET`, running ones
    /// resume. Returns how many resumed.
    pub async fn restore(self: &Arc<Self>) -> anyhow::Result<usize> {
        let Some(journal) = &self.journal else {
            return Ok(0);
        };
        let mut resumed = 0;
        for (id, record, deny) in journal.sweeps().await? {
            let mut saved: Saved = match serde_json::from_slice(&record) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(sweep = id, error = %e, "unreadable sweep record skipped");
                    continue;
                }
            };
            let running = saved.status.state == SweepState::Running;
            let deny: Option<HashSet<String>> = deny.and_then(|d| serde_json::from_slice(&d).ok());
            let channel = ChannelId::parse(saved.status.channel.clone());
            match (running, deny, channel) {
                (true, Some(deny), Ok(channel)) => {
                    saved.status.resumed += 1;
                    tracing::info!(sweep = id, channel = %channel, pass = saved.status.pass, "sweep resumed");
                    if self.launch(channel, deny, saved).is_some() {
                        resumed += 1;
                    }
                }
                (true, _, _) => {
                    saved.status.state = SweepState::Failed;
                    saved.status.error = Some("its deny list was not kept; run it again".into());
                    saved.phase = Phase::Finished;
                    self.jobs
                        .insert(id, Arc::new(Mutex::new(saved.status.clone())));
                    self.save(&saved).await;
                }
                (false, _, _) => {
                    self.jobs.insert(id, Arc::new(Mutex::new(saved.status)));
                }
            }
        }
        Ok(resumed)
    }

    /// Stops taking sweeps and stops those running (shutdown): they drop
    /// their pipeline handles so the coalescer can drain, and stay running
    /// in the journal.
    /// Whether sweeps can run here: this replica is the active dispatcher
    /// (always, in embedded mode).
    pub fn can_run(&self) -> bool {
        self.upstream.is_active()
    }

    pub fn close(&self) {
        self.pipeline.lock().take();
        self.stop.cancel();
    }

    pub fn status(&self, id: u64) -> Option<SweepStatus> {
        self.jobs.get(&id).map(|j| j.lock().clone())
    }

    /// Starts a sweep in the background (stored first, with a journal);
    /// returns its id.
    pub async fn start(
        self: &Arc<Self>,
        channel: ChannelId,
        deny: HashSet<String>,
        dry_run: bool,
    ) -> Result<u64, StartError> {
        if self.pipeline.lock().is_none() {
            return Err(StartError::Closed);
        }
        let status = move |id| SweepStatus {
            id,
            channel: channel.to_string(),
            dry_run,
            state: SweepState::Running,
            pass: 1,
            passes: Vec::new(),
            pages: 0,
            scanned: 0,
            subscriber_num: 0,
            found: 0,
            removed: 0,
            left: 0,
            confirmed: false,
            resumed: 0,
            found_sample: Vec::new(),
            error: None,
        };
        let fresh = move |id| Saved {
            status: status(id),
            phase: Phase::List,
            found: BTreeSet::new(),
        };
        let saved = match &self.journal {
            Some(j) => {
                let deny_bytes = serde_json::to_vec(&deny).unwrap_or_default();
                let f = fresh.clone();
                let id = j
                    .sweep_create(
                        move |id| serde_json::to_vec(&f(id)).unwrap_or_default(),
                        deny_bytes,
                    )
                    .await
                    .map_err(|e| StartError::Storage(e.to_string()))?;
                fresh(id)
            }
            None => fresh(self.next_id.fetch_add(1, Ordering::Relaxed)),
        };
        let id = saved.status.id;
        let channel = ChannelId::parse(saved.status.channel.clone())
            .map_err(|e| StartError::Storage(e.to_string()))?;
        self.launch(channel, deny, saved)
            .ok_or(StartError::Closed)?;
        self.forget_old(id).await;
        Ok(id)
    }

    /// Spawns the sweep's task; `None` once closed.
    fn launch(
        self: &Arc<Self>,
        channel: ChannelId,
        deny: HashSet<String>,
        saved: Saved,
    ) -> Option<u64> {
        let pipeline = self.pipeline.lock().clone()?;
        let id = saved.status.id;
        let status = Arc::new(Mutex::new(saved.status.clone()));
        self.jobs.insert(id, status.clone());
        let me = self.clone();
        tokio::spawn(async move {
            let mut saved = saved;
            let result = me
                .run(&channel, &deny, &mut saved, &pipeline, &status)
                .await;
            drop(pipeline);
            match result {
                Ok(()) => {}
                Err(Halt::Stopped) => {
                    tracing::info!(
                        sweep = id,
                        "sweep paused by shutdown; it resumes on the next start"
                    );
                    return;
                }
                Err(Halt::Failed(e)) => {
                    tracing::warn!(sweep = id, error = %e, "sweep failed");
                    saved.status.state = SweepState::Failed;
                    saved.status.error = Some(e);
                    saved.phase = Phase::Finished;
                    *status.lock() = saved.status.clone();
                    me.save(&saved).await;
                }
            }
            let s = &saved.status;
            tracing::info!(sweep = id, channel = %channel, passes = s.passes.len(), pages = s.pages, found = s.found, removed = s.removed, left = s.left, dry_run = s.dry_run, "sweep finished");
        });
        Some(id)
    }

    /// Drops finished sweeps beyond the newest `KEEP_FINISHED`.
    async fn forget_old(&self, newest: u64) {
        if self.jobs.len() <= KEEP_FINISHED {
            return;
        }
        let mut finished: Vec<u64> = self
            .jobs
            .iter()
            .filter(|j| j.value().lock().state != SweepState::Running)
            .map(|j| *j.key())
            .filter(|k| *k != newest)
            .collect();
        finished.sort_unstable();
        let excess = self.jobs.len().saturating_sub(KEEP_FINISHED);
        let old: Vec<u64> = finished.into_iter().take(excess).collect();
        for k in &old {
            self.jobs.remove(k);
        }
        if let Some(j) = &self.journal {
            if let Err(e) = j.sweep_forget(old).await {
                tracing::warn!(error = %e, "old sweeps not dropped from the journal");
            }
        }
    }

    /// Writes the sweep's record to the journal, if there is one. A failed
    /// write is logged: the sweep goes on, and a restart resumes it from
    /// an earlier record (its steps are idempotent).
    async fn save(&self, saved: &Saved) {
        let Some(j) = &self.journal else { return };
        let bytes = match serde_json::to_vec(saved) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(sweep = saved.status.id, error = %e, "sweep record not serialized");
                return;
            }
        };
        let finished = matches!(saved.phase, Phase::Finished);
        if let Err(e) = j.sweep_save(saved.status.id, bytes, finished).await {
            tracing::warn!(sweep = saved.status.id, error = %e, "sweep progress not stored");
        }
    }

    async fn run(
        &self,
        channel: &ChannelId,
        deny: &HashSet<String>,
        saved: &mut Saved,
        pipeline: &Pipeline,
        status: &Mutex<SweepStatus>,
    ) -> Result<(), Halt> {
        loop {
            match std::mem::replace(&mut saved.phase, Phase::Finished) {
                Phase::Finished => return Ok(()),
                Phase::List => {
                    status.lock().scanned = 0;
                    let (report, hits) = self.pass(channel, deny, status).await?;
                    let s = &mut saved.status;
                    let n = s.passes.len() + 1;
                    s.passes.push(report.clone());
                    for h in &hits {
                        if saved.found.insert(h.clone()) && s.found_sample.len() < SAMPLE {
                            s.found_sample.push(h.clone());
                        }
                    }
                    s.found = saved.found.len() as u64;
                    {
                        let live = status.lock();
                        s.pages = live.pages;
                        s.scanned = live.scanned;
                        s.subscriber_num = live.subscriber_num;
                    }
                    let last = s.dry_run || n >= MAX_PASSES;
                    saved.phase = if hits.is_empty() && (report.steady || n >= MAX_PASSES) {
                        s.confirmed = report.steady;
                        s.left = 0;
                        Phase::Finished
                    } else if last {
                        s.left = hits.len() as u64;
                        Phase::Finished
                    } else {
                        s.pass += 1;
                        if hits.is_empty() {
                            Phase::List
                        } else {
                            Phase::Remove(hits)
                        }
                    };
                    if matches!(saved.phase, Phase::Finished) {
                        s.removed = if s.dry_run {
                            0
                        } else {
                            s.found.saturating_sub(s.left)
                        };
                        s.state = SweepState::Done;
                    }
                    *status.lock() = s.clone();
                    self.save(saved).await;
                }
                Phase::Remove(accounts) => {
                    saved.phase = Phase::Remove(accounts.clone());
                    self.remove(channel, &accounts, saved.status.id, pipeline)
                        .await?;
                    saved.phase = Phase::List;
                    self.save(saved).await;
                }
            }
        }
    }

    /// One pass: pages the whole channel; the deny-listed members listed,
    /// in account order.
    async fn pass(
        &self,
        channel: &ChannelId,
        deny: &HashSet<String>,
        status: &Mutex<SweepStatus>,
    ) -> Result<(PassReport, Vec<String>), Halt> {
        let mut report = PassReport {
            steady: true,
            ..PassReport::default()
        };
        let mut hits = BTreeSet::new();
        let mut next = String::new();
        let mut first_num = None;
        loop {
            let page = tokio::select! {
                p = self.read_page(channel, &next) => p?,
                _ = self.stop.cancelled() => return Err(Halt::Stopped),
            };
            report.pages += 1;
            report.listed += page.subscribers.len() as u64;
            if *first_num.get_or_insert(page.subscriber_num) != page.subscriber_num {
                report.steady = false;
            }
            for s in &page.subscribers {
                if deny.contains(&s.account) && UserId::parse(s.account.as_str()).is_ok() {
                    hits.insert(s.account.clone());
                }
            }
            {
                let mut s = status.lock();
                s.pages += 1;
                s.scanned = report.listed;
                s.subscriber_num = page.subscriber_num;
            }
            if page.next.is_empty() {
                break;
            }
            if page.next == next {
                return Err(Halt::Failed(
                    "get_subscriber_info answered the cursor it was given; the listing would not end"
                        .into(),
                ));
            }
            next = page.next;
        }
        report.found = hits.len() as u64;
        Ok((report, hits.into_iter().collect()))
    }

    async fn read_page(
        &self,
        channel: &ChannelId,
        next: &str,
    ) -> Result<GetSubscriberInfoResponse, Halt> {
        self.upstream
            .get_subscriber_info(channel, MAX_SUBSCRIBER_PAGE, next)
            .await
            .map_err(|e| match e {
                ReadError::Api(e) => Halt::Failed(e.to_string()),
                ReadError::Stopped => Halt::Stopped,
            })
    }

    /// Removes `accounts` through the pipeline, all submitted at once so
    /// they fill whole batches, and waits until every one has settled.
    async fn remove(
        &self,
        channel: &ChannelId,
        accounts: &[String],
        id: u64,
        pipeline: &Pipeline,
    ) -> Result<(), Halt> {
        let actions: Vec<Action> = accounts
            .iter()
            .filter_map(|a| UserId::parse(a.as_str()).ok())
            .map(|user| Action::Unsubscribe {
                channel: channel.clone(),
                user,
            })
            .collect();
        if actions.is_empty() {
            return Ok(());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let receipt = Box::new(RoundReceipt {
            done: tx,
            id: format!("sweep-{id}"),
            sweep: serde_json::json!({"sweep": id, "channel": channel}),
            dead: self.dead.clone(),
        });
        tokio::select! {
            r = pipeline.submit("sweep", actions, Instant::now(), receipt) => r.map_err(|_| Halt::Stopped)?,
            _ = self.stop.cancelled() => return Err(Halt::Stopped),
        }
        tokio::select! {
            r = rx => r.map_err(|_| Halt::Stopped),
            _ = self.stop.cancelled() => Err(Halt::Stopped),
        }
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
