//! Per-key batching. Actions for the same API and target (a channel for
//! `delete_subscriber` and `destroy_official_account`, a From_Account for
//! `follow_delete`) meet in one open batch, a set keyed by account, which is
//! sent when full or `linger` after it opened. A destroy takes the pending
//! unsubscribes of its channel along (they are moot once it is gone).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indexmap::IndexMap;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::domain::Action;
use crate::domain::{Api, ChannelId, ItemResult, UserId};
use crate::settle::Origin;
use crate::telemetry::Metrics;
use crate::tencent::{FollowBatch, SubscriberBatch};

/// One action of one event, waiting for its call.
#[derive(Debug, Clone)]
pub struct Item {
    pub origin: Origin,
    /// Calls this item was in that failed for it alone.
    pub attempts: u32,
}

/// What a batch is for: one kind of action on one target. Each kind names
/// its target's type, so a key for a call that does not exist (a follow
/// removal addressed to a channel) cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BatchKey {
    /// `delete_subscriber` on a channel; members are the subscribers.
    Unsubscribe(ChannelId),
    /// `add_subscriber` on a channel; members are the subscribers.
    Subscribe(ChannelId),
    /// `follow_delete` from one account; members are the `To_Account`s.
    Unfollow(UserId),
    /// `destroy_official_account`; no members, the channel as a whole.
    Destroy(ChannelId),
}

impl std::fmt::Display for BatchKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchKey::Unsubscribe(c) | BatchKey::Subscribe(c) | BatchKey::Destroy(c) => {
                write!(f, "{c}")
            }
            BatchKey::Unfollow(u) => write!(f, "from:{u}"),
        }
    }
}

impl BatchKey {
    /// Splits an action into its batch key and member (None: the action is
    /// on the target as a whole).
    pub fn of(action: Action) -> (BatchKey, Option<UserId>) {
        match action {
            Action::Unsubscribe { channel, user } => (BatchKey::Unsubscribe(channel), Some(user)),
            Action::Subscribe { channel, user } => (BatchKey::Subscribe(channel), Some(user)),
            Action::Unfollow { from, to } => (BatchKey::Unfollow(from), Some(to)),
            Action::Destroy { channel } => (BatchKey::Destroy(channel), None),
        }
    }

    pub fn api(&self) -> Api {
        match self {
            BatchKey::Unsubscribe(_) => Api::DeleteSubscriber,
            BatchKey::Subscribe(_) => Api::AddSubscriber,
            BatchKey::Unfollow(_) => Api::FollowDelete,
            BatchKey::Destroy(_) => Api::DestroyOfficialAccount,
        }
    }

    /// Most accounts one call for this key may carry.
    pub fn capacity(&self) -> usize {
        match self {
            BatchKey::Unsubscribe(_) | BatchKey::Subscribe(_) => SubscriberBatch::CAPACITY,
            BatchKey::Unfollow(_) => FollowBatch::CAPACITY,
            BatchKey::Destroy(_) => 1,
        }
    }

    /// The action one member of this batch stands for.
    pub fn member_action(&self, member: &UserId) -> Action {
        match self {
            BatchKey::Unsubscribe(c) => Action::Unsubscribe {
                channel: c.clone(),
                user: member.clone(),
            },
            BatchKey::Subscribe(c) => Action::Subscribe {
                channel: c.clone(),
                user: member.clone(),
            },
            BatchKey::Unfollow(f) => Action::Unfollow {
                from: f.clone(),
                to: member.clone(),
            },
            // A destroy has no members: its only action is itself.
            BatchKey::Destroy(c) => Action::Destroy { channel: c.clone() },
        }
    }

    /// The key whose pending work a new action on this key cancels: an
    /// addition and a removal of the same account on the same channel.
    fn opposite(&self) -> Option<BatchKey> {
        match self {
            BatchKey::Unsubscribe(c) => Some(BatchKey::Subscribe(c.clone())),
            BatchKey::Subscribe(c) => Some(BatchKey::Unsubscribe(c.clone())),
            _ => None,
        }
    }
}

/// One call's request, typed by the vendor's batch limits.
#[derive(Debug)]
pub enum Request<'a> {
    DeleteSubscriber(&'a ChannelId, SubscriberBatch),
    AddSubscriber(&'a ChannelId, SubscriberBatch),
    FollowDelete(&'a UserId, FollowBatch),
    Destroy(&'a ChannelId),
}

/// A batch taken apart, for settling or dead-lettering everything in it.
#[derive(Debug, Default)]
pub struct BatchParts {
    pub members: Vec<(UserId, Vec<Item>)>,
    /// Items on the target as a whole (destroy).
    pub whole: Vec<Item>,
    /// Unsubscribes from a channel this batch destroys: they settle with it.
    pub riders: Vec<(UserId, Item)>,
}

/// A set of distinct accounts for one call, each with the items (one per
/// event that asked) it settles.
#[derive(Debug)]
pub struct Batch {
    key: BatchKey,
    members: IndexMap<UserId, Vec<Item>>,
    /// Items on the target as a whole (destroy).
    whole: Vec<Item>,
    /// Unsubscribes from a channel this batch destroys: they settle with it.
    riders: Vec<(UserId, Item)>,
    opened: Instant,
    /// Accounts that make this batch full.
    cap: usize,
}

impl Batch {
    fn new(key: BatchKey, now: Instant, max_batch: usize) -> Self {
        let cap = key.capacity().min(max_batch).max(1);
        Batch {
            key,
            members: IndexMap::new(),
            whole: Vec::new(),
            riders: Vec::new(),
            opened: now,
            cap,
        }
    }

    pub fn key(&self) -> &BatchKey {
        &self.key
    }

    pub fn api(&self) -> Api {
        self.key.api()
    }

    /// The vendor request for this batch. Members never exceed the key's
    /// capacity (the coalescer sends a batch once it is full, and halves
    /// only shrink), so the typed batch always fits.
    pub fn request(&self) -> Request<'_> {
        const FITS: &str = "a batch never holds more members than its key's capacity";
        let members = || self.members.keys().cloned();
        match &self.key {
            BatchKey::Unsubscribe(c) => {
                Request::DeleteSubscriber(c, SubscriberBatch::try_from_iter(members()).expect(FITS))
            }
            BatchKey::Subscribe(c) => {
                Request::AddSubscriber(c, SubscriberBatch::try_from_iter(members()).expect(FITS))
            }
            BatchKey::Unfollow(f) => {
                Request::FollowDelete(f, FollowBatch::try_from_iter(members()).expect(FITS))
            }
            BatchKey::Destroy(c) => Request::Destroy(c),
        }
    }

    /// The items of one member, taken out of the batch.
    pub fn take_member(&mut self, member: &UserId) -> Option<Vec<Item>> {
        self.members.shift_remove(member)
    }

    /// Everything still in the batch.
    pub fn into_parts(self) -> BatchParts {
        BatchParts {
            members: self.members.into_iter().collect(),
            whole: self.whole,
            riders: self.riders,
        }
    }

    pub fn is_full(&self) -> bool {
        if self.key.capacity() == 1 {
            !self.whole.is_empty()
        } else {
            self.members.len() >= self.cap
        }
    }

    /// Accounts (or 1 for a whole-target call) the call will carry.
    pub fn size(&self) -> usize {
        self.members.len().max(usize::from(!self.whole.is_empty()))
    }

    /// Two halves, for isolating a bad account; the batch itself back when
    /// it has a single member.
    #[allow(clippy::result_large_err)]
    pub fn split(mut self) -> Result<(Batch, Batch), Batch> {
        if self.members.len() < 2 {
            return Err(self);
        }
        let second = self.members.split_off(self.members.len() / 2);
        let other = Batch {
            key: self.key.clone(),
            members: second,
            whole: Vec::new(),
            riders: Vec::new(),
            opened: self.opened,
            cap: self.cap,
        };
        Ok((self, other))
    }

    /// Every item in the batch, for settling or dead-lettering them all.
    pub fn item_count(&self) -> usize {
        self.members.values().map(Vec::len).sum::<usize>() + self.whole.len() + self.riders.len()
    }
}

/// Input to the coalescer.
#[derive(Debug)]
pub enum Input {
    /// A new action.
    Action(Action, Item),
    /// Items of one member to try again (their call failed for them alone).
    Retry {
        key: BatchKey,
        member: UserId,
        items: Vec<Item>,
    },
}

/// Batches handed to the dispatcher that have not yet started their first
/// attempt, per API: while some wait for the limiter, sending another
/// partly full batch gains nothing, so the coalescer keeps it open longer.
#[derive(Debug, Default)]
pub struct Backlog {
    waiting: [AtomicUsize; Api::ALL.len()],
}

impl Backlog {
    fn slot(&self, api: Api) -> &AtomicUsize {
        let i = Api::ALL.iter().position(|a| *a == api).unwrap_or(0);
        &self.waiting[i]
    }

    pub fn queued(&self, api: Api) {
        self.slot(api).fetch_add(1, Ordering::Relaxed);
    }

    pub fn started(&self, api: Api) {
        let _ = self
            .slot(api)
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    pub fn waiting(&self, api: Api) -> usize {
        self.slot(api).load(Ordering::Relaxed)
    }
}

/// How often a batch kept open past its linger (the API is saturated) is
/// looked at again.
const RECHECK: Duration = Duration::from_millis(10);
/// A batch kept open past its linger goes anyway after this many lingers
/// (and at least `MIN_HOLD`), so a small key is not starved behind a long
/// wave on the same API.
const MAX_LINGERS: u32 = 25;
const MIN_HOLD: Duration = Duration::from_secs(5);

/// A batch's place in a deadline queue; `opened` tells a stale entry (that
/// batch went out full and the key reopened) from a current one.
type Due = (Instant, BatchKey, Instant);

/// The coalescer task's state.
pub struct Coalescer {
    open: HashMap<BatchKey, Batch>,
    /// Open order; deadlines are monotonic because linger is constant.
    order: VecDeque<Due>,
    /// Batches past their linger kept open while their API is saturated;
    /// monotonic too (always now + RECHECK).
    postponed: VecDeque<Due>,
    backlog: Arc<Backlog>,
    linger: Duration,
    max_open_keys: usize,
    max_batch: usize,
    out: mpsc::Sender<Batch>,
    metrics: Metrics,
    draining: bool,
}

impl Coalescer {
    /// `max_batch` caps accounts per call below the vendor's limit (1 gives
    /// the one-call-per-account baseline the benchmark compares against).
    pub fn new(
        linger: Duration,
        max_open_keys: usize,
        max_batch: usize,
        backlog: Arc<Backlog>,
        out: mpsc::Sender<Batch>,
        metrics: Metrics,
    ) -> Self {
        Coalescer {
            open: HashMap::new(),
            order: VecDeque::new(),
            postponed: VecDeque::new(),
            backlog,
            linger,
            max_open_keys: max_open_keys.max(1),
            max_batch: max_batch.max(1),
            out,
            metrics,
            draining: false,
        }
    }

    /// Runs until `input` closes and `stop` fires. After `input` closes it
    /// flushes everything and sends retries straight on (drain mode).
    pub async fn run(
        mut self,
        mut input: mpsc::Receiver<Input>,
        mut retries: mpsc::UnboundedReceiver<Input>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut input_open = true;
        loop {
            let deadline = [self.order.front(), self.postponed.front()]
                .into_iter()
                .flatten()
                .map(|(d, _, _)| *d)
                .min();
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                Some(i) = retries.recv() => {
                    if self.add(i).await.is_err() { break }
                }
                i = input.recv(), if input_open => match i {
                    Some(i) => if self.add(i).await.is_err() { break },
                    None => {
                        input_open = false;
                        self.draining = true;
                        if self.flush_all().await.is_err() { break }
                    }
                },
                _ = sleep_until_opt(deadline) => {
                    if self.flush_due().await.is_err() { break }
                }
            }
        }
    }

    async fn add(&mut self, input: Input) -> Result<(), Closed> {
        let now = Instant::now();
        match input {
            Input::Action(action, item) => {
                let (key, member) = BatchKey::of(action);
                if let BatchKey::Destroy(channel) = key {
                    self.add_destroy(channel, item, now).await
                } else if let Some(member) = member {
                    self.supersede(&key, &member);
                    self.add_member(key, member, vec![item], now).await
                } else {
                    Ok(())
                }
            }
            Input::Retry { key, member, items } => self.add_member(key, member, items, now).await,
        }
    }

    async fn open_batch(&mut self, key: &BatchKey, now: Instant) -> Result<(), Closed> {
        if self.open.contains_key(key) {
            return Ok(());
        }
        if self.open.len() >= self.max_open_keys {
            // Bounded memory: the oldest open batch goes now, not full.
            if let Some((_, oldest, _)) = self.order.pop_front() {
                if let Some(b) = self.open.remove(&oldest) {
                    self.send(b).await?;
                }
            }
        }
        self.open
            .insert(key.clone(), Batch::new(key.clone(), now, self.max_batch));
        self.order.push_back((now + self.linger, key.clone(), now));
        self.metrics.set_open_keys(self.open.len());
        Ok(())
    }

    async fn add_member(
        &mut self,
        key: BatchKey,
        member: UserId,
        items: Vec<Item>,
        now: Instant,
    ) -> Result<(), Closed> {
        self.open_batch(&key, now).await?;
        let batch = self.open.get_mut(&key).expect("just opened");
        batch.members.entry(member).or_default().extend(items);
        if batch.is_full() || self.draining || self.linger.is_zero() {
            let b = self.open.remove(&key).expect("present");
            self.metrics.set_open_keys(self.open.len());
            self.send(b).await?;
        }
        Ok(())
    }

    /// A later action wins over a pending opposite one for the same account
    /// and channel: the earlier one is never sent and settles as a noop.
    fn supersede(&mut self, key: &BatchKey, member: &UserId) {
        let Some(other) = key.opposite() else { return };
        let Some(batch) = self.open.get_mut(&other) else {
            return;
        };
        let Some(items) = batch.members.shift_remove(member) else {
            return;
        };
        let n = items.len();
        self.metrics.items(other.api(), ItemResult::Noop, n);
        self.metrics.pending_add(other.api(), -(n as i64));
        for i in items {
            i.origin.settle_one();
        }
        if batch.members.is_empty() && batch.whole.is_empty() {
            self.open.remove(&other);
            self.metrics.set_open_keys(self.open.len());
        }
    }

    async fn add_destroy(
        &mut self,
        channel: ChannelId,
        item: Item,
        now: Instant,
    ) -> Result<(), Closed> {
        let unsub_key = BatchKey::Unsubscribe(channel.clone());
        let key = BatchKey::Destroy(channel);
        self.open_batch(&key, now).await?;
        let mut batch = self.open.remove(&key).expect("just opened");
        batch.whole.push(item);
        if let Some(unsubs) = self.open.remove(&unsub_key) {
            for (user, items) in unsubs.members {
                batch
                    .riders
                    .extend(items.into_iter().map(|i| (user.clone(), i)));
            }
        }
        self.metrics.set_open_keys(self.open.len());
        // A destroy cannot grow: send it now.
        self.send(batch).await
    }

    async fn flush_due(&mut self) -> Result<(), Closed> {
        let now = Instant::now();
        let mut due = Vec::new();
        for queue in [&mut self.order, &mut self.postponed] {
            while queue.front().is_some_and(|(d, _, _)| *d <= now) {
                let (_, key, opened) = queue.pop_front().expect("front exists");
                due.push((key, opened));
            }
        }
        for (key, opened) in due {
            if self.open.get(&key).is_none_or(|b| b.opened != opened) {
                continue;
            }
            // While batches of this API wait for the limiter, a partly full
            // one would only queue behind them: keep filling it.
            let saturated = self.backlog.waiting(key.api()) > 0;
            let hold = (self.linger * MAX_LINGERS).max(MIN_HOLD);
            if saturated && !self.draining && now < opened + hold {
                self.postponed.push_back((now + RECHECK, key, opened));
                continue;
            }
            let b = self.open.remove(&key).expect("present");
            self.send(b).await?;
        }
        self.metrics.set_open_keys(self.open.len());
        Ok(())
    }

    async fn flush_all(&mut self) -> Result<(), Closed> {
        self.order.clear();
        self.postponed.clear();
        let batches: Vec<Batch> = self.open.drain().map(|(_, b)| b).collect();
        self.metrics.set_open_keys(0);
        for b in batches {
            self.send(b).await?;
        }
        Ok(())
    }

    async fn send(&mut self, b: Batch) -> Result<(), Closed> {
        let api = b.api();
        self.backlog.queued(api);
        // Waiting here is the backpressure: the dispatcher is saturated.
        if self.out.send(b).await.is_err() {
            self.backlog.started(api);
            return Err(Closed);
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Closed;

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
