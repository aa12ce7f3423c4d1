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
//! come from a counter in the journal, so they never repeat.
//!
//! In broker mode any replica takes a sweep, and the active dispatcher runs
//! it, so its reads and removals share the one budget. The replica that
//! takes it writes it to the sweep log (`inbox::sweep_log`, a stream every
//! replica reads; the record's offset is the id), then puts a command with
//! the deny list on the work queue, both confirmed before the `202`. The
//! leader's consumer hands the command to the intake loop, which gives it
//! to [`Sweeps::accept`]; the sweep runs here as in embedded mode, writing
//! the same records to the log instead of the journal (plus its live
//! progress once a second), and the command is acked only once its last
//! record is stored. A leader that stops or loses the lease mid-sweep
//! leaves the command unacked, so the broker hands it to the next leader,
//! which resumes from the last checkpoint in the log exactly as a restart
//! resumes from the journal. `GET` answers from the log on any replica.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::dispatch::{Active, ReadError, Upstream};
use crate::domain::{Action, ChannelId, DeadLetter, DeadLetterReason, DeadLetterSink, UserId};
use crate::inbox::journal::Journal;
use crate::inbox::sweep_log::{Logged, Record, SweepLog};
use crate::inbox::Settle;
use crate::pipeline::Pipeline;
use crate::telemetry::Metrics;
use crate::tencent::api::MAX_SUBSCRIBER_PAGE;
use crate::tencent::types::GetSubscriberInfoResponse;

/// Most finished sweeps remembered for `GET`.
pub const KEEP_FINISHED: usize = 100;
/// Most passes over the channel one sweep makes.
pub const MAX_PASSES: usize = 4;
/// Most accounts kept in `found_sample`.
const SAMPLE: usize = 1000;
/// Broker mode: how often a running sweep's progress goes to the log.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SweepState {
    /// Broker mode: stored, waiting for the active dispatcher to take it.
    Queued,
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
    /// Times the sweep was resumed after a restart (or, in broker mode, by
    /// another leader).
    pub resumed: u64,
    /// Up to 1,000 of the accounts found.
    pub found_sample: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Where a sweep is, as the journal (or the sweep log) keeps it.
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

impl Saved {
    /// A sweep about to make its first pass.
    fn fresh(id: u64, channel: &str, dry_run: bool) -> Saved {
        Saved {
            status: SweepStatus {
                id,
                channel: channel.to_owned(),
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
            },
            phase: Phase::List,
            found: BTreeSet::new(),
        }
    }
}

/// Broker mode: what the work queue carries to the active dispatcher.
#[derive(Debug, Serialize, Deserialize)]
struct Command {
    id: u64,
    channel: String,
    dry_run: bool,
    deny: HashSet<String>,
}

/// Where sweeps are kept.
pub enum SweepStore {
    /// Embedded mode: the journal keeps each sweep's record, its deny list
    /// while it runs, and the id counter.
    Journal(Journal),
    /// Broker mode: the log every replica reads, and the lease that says
    /// whether this replica may write to it.
    Broker { log: Arc<SweepLog>, active: Active },
}

/// Why a sweep could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("no new sweeps while shutting down")]
    Closed,
    #[error("the sweep could not be stored: {0}")]
    Storage(String),
    #[error("the sweep could not be queued on the broker: {0}")]
    Broker(String),
}

/// Why a sweep stopped before it was done.
enum Halt {
    /// Shutdown (or, in broker mode, the lease lost): the journal keeps it
    /// running, to resume on the next start; the broker hands its command
    /// to the next leader.
    Stopped,
    Failed(String),
}

/// Runs and remembers sweeps.
pub struct Sweeps {
    upstream: Arc<Upstream>,
    pipeline: Mutex<Option<Pipeline>>,
    jobs: DashMap<u64, Arc<Mutex<SweepStatus>>>,
    store: SweepStore,
    /// Broker mode: the deliveries of the commands of the sweeps running
    /// here, acked once the sweep's last record is stored.
    commands: Mutex<HashMap<u64, Vec<Box<dyn Settle>>>>,
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
        store: SweepStore,
        dead: Arc<dyn DeadLetterSink>,
    ) -> Arc<Sweeps> {
        Arc::new(Sweeps {
            upstream,
            pipeline: Mutex::new(Some(pipeline)),
            jobs: DashMap::new(),
            store,
            commands: Mutex::new(HashMap::new()),
            dead,
            stop: CancellationToken::new(),
        })
    }

    fn journal(&self) -> Option<&Journal> {
        match &self.store {
            SweepStore::Journal(j) => Some(j),
            SweepStore::Broker { .. } => None,
        }
    }

    /// Loads the journal's sweeps: finished ones answer `GET`, running ones
    /// resume. Returns how many resumed. (In broker mode the broker hands
    /// running sweeps to the active dispatcher.)
    pub async fn restore(self: &Arc<Self>) -> anyhow::Result<usize> {
        let Some(journal) = self.journal() else {
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
                    if self.launch(channel, deny, saved, None).is_some() {
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
    /// in the journal (in broker mode, their commands go back to the queue).
    pub fn close(&self) {
        self.pipeline.lock().take();
        self.stop.cancel();
    }

    /// A sweep's status: in embedded mode from memory, in broker mode from
    /// the sweep log (read up to now first if the id is not known yet, as
    /// when another replica took the sweep a moment ago). `Err`: the log
    /// cannot be read now.
    pub async fn status(&self, id: u64) -> Result<Option<SweepStatus>, String> {
        let SweepStore::Broker { log, .. } = &self.store else {
            return Ok(self.jobs.get(&id).map(|j| j.lock().clone()));
        };
        let logged = match log.get(id) {
            Some(l) => l,
            None => {
                log.sync().await.map_err(|e| e.to_string())?;
                match log.get(id) {
                    Some(l) => l,
                    None => return Ok(None),
                }
            }
        };
        Ok(logged_status(id, &logged))
    }

    /// Starts a sweep (stored first) and returns its id: in embedded mode
    /// it runs here, in the background; in broker mode it is queued for the
    /// active dispatcher.
    pub async fn start(
        self: &Arc<Self>,
        channel: ChannelId,
        deny: HashSet<String>,
        dry_run: bool,
    ) -> Result<u64, StartError> {
        if self.pipeline.lock().is_none() {
            return Err(StartError::Closed);
        }
        let name = channel.to_string();
        let fresh = move |id| Saved::fresh(id, &name, dry_run);
        let saved = match &self.store {
            SweepStore::Journal(j) => {
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
            SweepStore::Broker { log, .. } => {
                let mut queued = fresh(0);
                queued.status.state = SweepState::Queued;
                return enqueue(log, queued, deny).await;
            }
        };
        let id = saved.status.id;
        let channel = ChannelId::parse(saved.status.channel.clone())
            .map_err(|e| StartError::Storage(e.to_string()))?;
        self.launch(channel, deny, saved, None)
            .ok_or(StartError::Closed)?;
        self.forget_old(id).await;
        Ok(id)
    }

    /// Broker mode: a sweep command the active dispatcher consumed (`id`,
    /// its message id). Runs the sweep here, resuming from the log's last
    /// checkpoint if a leader before this one started it, and settles
    /// `receipt` once the sweep is done or failed; if it stops first
    /// (shutdown, the lease lost), the receipt is dropped unsettled and the
    /// broker hands the command to the next leader. A sweep the log already
    /// shows finished is only acked.
    pub fn accept(self: &Arc<Self>, id: String, command: Vec<u8>, receipt: Box<dyn Settle>) {
        let SweepStore::Broker { active, .. } = &self.store else {
            return;
        };
        let parsed = serde_json::from_slice::<Command>(&command)
            .map_err(|e| e.to_string())
            .and_then(|c| {
                let channel = ChannelId::parse(c.channel.clone()).map_err(|e| e.to_string())?;
                Ok((c, channel))
            });
        let (cmd, channel) = match parsed {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(message_id = %id, error = %e, "malformed sweep command");
                let dl = DeadLetter::new(
                    &id,
                    "sweep",
                    &command,
                    None,
                    DeadLetterReason::Malformed,
                    format!("sweep command: {e}"),
                );
                receipt.dead_lettered(dl, command);
                return;
            }
        };
        {
            let mut commands = self.commands.lock();
            if let Some(held) = commands.get_mut(&cmd.id) {
                // Delivered again while it runs here (the consumer
                // reconnected): settled with the first.
                held.push(receipt);
                return;
            }
            commands.insert(cmd.id, vec![receipt]);
        }
        // Ends the run when this replica stops leading.
        let halt = self.stop.child_token();
        let lost = halt.clone();
        let active = active.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = active.lost() => lost.cancel(),
                _ = lost.cancelled() => {}
            }
        });
        let me = self.clone();
        tokio::spawn(async move { me.take_up(cmd, channel, halt).await });
    }

    /// Broker mode: reads the log up to now, then runs (or resumes, or
    /// only acks) the commanded sweep.
    async fn take_up(self: Arc<Self>, cmd: Command, channel: ChannelId, halt: CancellationToken) {
        let SweepStore::Broker { log, .. } = &self.store else {
            return;
        };
        let id = cmd.id;
        let mut backoff = Duration::from_millis(100);
        loop {
            let synced = tokio::select! {
                r = log.sync() => r,
                _ = halt.cancelled() => return self.hand_back(id),
            };
            match synced {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(sweep = id, error = %e, "sweep log not readable yet; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = halt.cancelled() => return self.hand_back(id),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        let logged = log.get(id).and_then(|l| l.checkpoint).and_then(|(_, b)| {
            let mut s = serde_json::from_slice::<Saved>(&b).ok()?;
            s.status.id = id;
            Some(s)
        });
        let saved = match logged {
            Some(s) if matches!(s.status.state, SweepState::Done | SweepState::Failed) => {
                tracing::info!(sweep = id, "sweep already finished; its command is acked");
                halt.cancel();
                return self.settle_commands(id);
            }
            Some(mut s) if s.status.state == SweepState::Running => {
                s.status.resumed += 1;
                tracing::info!(sweep = id, channel = %channel, pass = s.status.pass, "sweep resumed from the log's last checkpoint");
                s
            }
            Some(mut s) => {
                s.status.state = SweepState::Running;
                s
            }
            // The log lost it (retention, or it was deleted): from the start.
            None => Saved::fresh(id, &cmd.channel, cmd.dry_run),
        };
        if self
            .launch(channel, cmd.deny, saved, Some(halt.clone()))
            .is_none()
        {
            halt.cancel();
            self.hand_back(id);
        }
    }

    /// Broker mode: the sweep stopped here before it finished; its
    /// deliveries are dropped unsettled, so the broker hands the command to
    /// the next leader once this consumer's connection closes.
    fn hand_back(&self, id: u64) {
        self.jobs.remove(&id);
        if self.commands.lock().remove(&id).is_some() {
            tracing::info!(
                sweep = id,
                "sweep stopped here; the next leader resumes it from the log"
            );
        }
    }

    /// Broker mode: acks the sweep's command deliveries.
    fn settle_commands(&self, id: u64) {
        self.jobs.remove(&id);
        for receipt in self.commands.lock().remove(&id).unwrap_or_default() {
            receipt.settled();
        }
    }

    /// Spawns the sweep's task; `None` once closed. `halt` (broker mode)
    /// ends the run when this replica stops leading; the task then also
    /// writes to the log and settles the command.
    fn launch(
        self: &Arc<Self>,
        channel: ChannelId,
        deny: HashSet<String>,
        saved: Saved,
        halt: Option<CancellationToken>,
    ) -> Option<u64> {
        let pipeline = self.pipeline.lock().clone()?;
        let id = saved.status.id;
        let status = Arc::new(Mutex::new(saved.status.clone()));
        self.jobs.insert(id, status.clone());
        let me = self.clone();
        tokio::spawn(async move {
            let mut saved = saved;
            // Broker mode: every replica sees it running, then its progress.
            let progress = match &halt {
                Some(_) => {
                    me.save(&saved).await;
                    Some(me.report_progress(id, status.clone()))
                }
                None => None,
            };
            let run = me.run(&channel, &deny, &mut saved, &pipeline, &status);
            let result = match &halt {
                Some(h) => tokio::select! {
                    r = run => r,
                    _ = h.cancelled() => Err(Halt::Stopped),
                },
                None => run.await,
            };
            drop(progress);
            drop(pipeline);
            match result {
                Ok(()) => {}
                Err(Halt::Stopped) if halt.is_some() => return me.hand_back(id),
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
            if let Some(h) = halt {
                me.conclude(&saved, &h).await;
                // Ends the lease watch.
                h.cancel();
            }
        });
        Some(id)
    }

    /// Broker mode: stores the sweep's last record, retrying until the
    /// broker confirms it, then acks its command; if this replica stops
    /// leading first, the next leader finds it unfinished and runs its last
    /// pass again.
    async fn conclude(&self, saved: &Saved, halt: &CancellationToken) {
        let SweepStore::Broker { log, .. } = &self.store else {
            return;
        };
        let id = saved.status.id;
        let mut last = saved.clone();
        // Not needed to resume any more, and the log keeps it.
        last.found.clear();
        let bytes = serde_json::to_vec(&last).unwrap_or_default();
        let mut backoff = Duration::from_millis(100);
        loop {
            let stored = tokio::select! {
                r = log.save(id, Record::Finished, &bytes) => r,
                _ = halt.cancelled() => return self.hand_back(id),
            };
            match stored {
                Ok(()) => return self.settle_commands(id),
                Err(e) => {
                    tracing::warn!(sweep = id, error = %e, "sweep result not stored yet; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = halt.cancelled() => return self.hand_back(id),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Broker mode: publishes the running sweep's live status (without the
    /// sample, which the checkpoints carry) when it changed, once a
    /// second, until the guard is dropped.
    fn report_progress(self: &Arc<Self>, id: u64, status: Arc<Mutex<SweepStatus>>) -> DropGuard {
        let done = CancellationToken::new();
        let stop = done.clone();
        let me = self.clone();
        tokio::spawn(async move {
            let SweepStore::Broker { log, active } = &me.store else {
                return;
            };
            let mut every = tokio::time::interval(PROGRESS_EVERY);
            let mut last = Vec::new();
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    _ = stop.cancelled() => return,
                }
                let mut s = status.lock().clone();
                s.found_sample = Vec::new();
                let bytes = serde_json::to_vec(&s).unwrap_or_default();
                if bytes == last || !active.is_active() {
                    continue;
                }
                match log.save(id, Record::Progress, &bytes).await {
                    Ok(()) => last = bytes,
                    Err(e) => tracing::debug!(sweep = id, error = %e, "sweep progress not logged"),
                }
            }
        });
        done.drop_guard()
    }

    /// Drops finished sweeps beyond the newest `KEEP_FINISHED`.
    async fn forget_old(&self, newest: u64) {
        if self.jobs.len() <= KEEP_FINISHED {
            return;
        }
        let mut finished: Vec<u64> = self
            .jobs
            .iter()
            .filter(|j| {
                matches!(
                    j.value().lock().state,
                    SweepState::Done | SweepState::Failed
                )
            })
            .map(|j| *j.key())
            .filter(|k| *k != newest)
            .collect();
        finished.sort_unstable();
        let excess = self.jobs.len().saturating_sub(KEEP_FINISHED);
        let old: Vec<u64> = finished.into_iter().take(excess).collect();
        for k in &old {
            self.jobs.remove(k);
        }
        if let Some(j) = self.journal() {
            if let Err(e) = j.sweep_forget(old).await {
                tracing::warn!(error = %e, "old sweeps not dropped from the journal");
            }
        }
    }

    /// Writes the sweep's record to the journal, or in broker mode a
    /// checkpoint to the sweep log (while this replica leads; the last
    /// record is written by `conclude`). A failed write is logged: the
    /// sweep goes on, and a restart resumes it from an earlier record (its
    /// steps are idempotent).
    async fn save(&self, saved: &Saved) {
        let finished = matches!(saved.phase, Phase::Finished);
        if let SweepStore::Broker { active, .. } = &self.store {
            if finished || !active.is_active() {
                return;
            }
        }
        let bytes = match serde_json::to_vec(saved) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(sweep = saved.status.id, error = %e, "sweep record not serialized");
                return;
            }
        };
        let stored = match &self.store {
            SweepStore::Journal(j) => j
                .sweep_save(saved.status.id, bytes, finished)
                .await
                .map_err(|e| e.to_string()),
            SweepStore::Broker { log, .. } => log
                .save(saved.status.id, Record::Checkpoint, &bytes)
                .await
                .map_err(|e| e.to_string()),
        };
        if let Err(e) = stored {
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
            r = pipeline.submit("sweep", actions, Instant::now(), receipt, None) => r.map_err(|_| Halt::Stopped)?,
            _ = self.stop.cancelled() => return Err(Halt::Stopped),
        }
        tokio::select! {
            r = rx => r.map_err(|_| Halt::Stopped),
            _ = self.stop.cancelled() => Err(Halt::Stopped),
        }
    }
}

/// Broker mode: stores a new sweep (`queued`) in the log, which gives its
/// id, then its command on the work queue. If the command cannot be
/// queued, the log says so (best effort) and the caller gets an error.
async fn enqueue(
    log: &Arc<SweepLog>,
    mut queued: Saved,
    deny: HashSet<String>,
) -> Result<u64, StartError> {
    let record = serde_json::to_vec(&queued).unwrap_or_default();
    let id = log
        .create(&record)
        .await
        .map_err(|e| StartError::Broker(e.to_string()))?;
    let command = Command {
        id,
        channel: queued.status.channel.clone(),
        dry_run: queued.status.dry_run,
        deny,
    };
    let bytes = serde_json::to_vec(&command).unwrap_or_default();
    if let Err(e) = log.enqueue(id, &bytes).await {
        queued.status.id = id;
        queued.status.state = SweepState::Failed;
        queued.status.error = Some(format!("it could not be queued ({e}); run it again"));
        queued.phase = Phase::Finished;
        let record = serde_json::to_vec(&queued).unwrap_or_default();
        let _ = log.save(id, Record::Finished, &record).await;
        return Err(StartError::Broker(e.to_string()));
    }
    tracing::info!(sweep = id, channel = %queued.status.channel, "sweep queued for the active dispatcher");
    Ok(id)
}

/// A sweep's status from what the log holds: the latest checkpoint, or
/// the progress published since (with the checkpoint's sample); a finished
/// sweep's last checkpoint wins over any progress.
fn logged_status(id: u64, logged: &Logged) -> Option<SweepStatus> {
    let checkpoint = logged.checkpoint.as_ref().and_then(|(offset, bytes)| {
        let saved = serde_json::from_slice::<Saved>(bytes).ok()?;
        Some((*offset, saved.status))
    });
    let progress = logged.progress.as_ref().and_then(|(offset, bytes)| {
        let status = serde_json::from_slice::<SweepStatus>(bytes).ok()?;
        Some((*offset, status))
    });
    let mut status = match (checkpoint, progress) {
        (Some((c, checkpoint)), Some((p, mut progress))) if p > c && !logged.finished => {
            progress.found_sample = checkpoint.found_sample;
            progress
        }
        (Some((_, checkpoint)), _) => checkpoint,
        (None, Some((_, progress))) => progress,
        (None, None) => return None,
    };
    status.id = id;
    Some(status)
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
