//! Per-key batching. Actions for the same API and target (a channel for
//! `delete_subscriber` and `destroy_official_account`, a From_Account for
//! `follow_delete`) meet in one open batch, a set keyed by account, which is
//! sent when full or `linger` after it opened. A destroy takes the pending
//! unsubscribes of its channel along (they are moot once it is gone).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::domain::Action;
use crate::domain::{Api, ChannelId, ItemResult, UserId};
use crate::settle::{ItemFate, Origin};
use crate::telemetry::Metrics;
use crate::tencent::{FollowBatch, SubscriberBatch};

/// One action of one event, waiting for its call.
#[derive(Debug, Clone)]
pub struct Item {
    pub origin: Origin,
    /// Calls this item was in that failed for it alone.
    pub attempts: u32,
    /// Its place in its event's plan (for the event's record).
    pub index: u32,
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
    /// Every API a batch may be for.
    pub const APIS: [Api; 4] = [
        Api::DeleteSubscriber,
        Api::AddSubscriber,
        Api::FollowDelete,
        Api::DestroyOfficialAccount,
    ];

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
    /// One entry per item: the account it is for.
    pub members: Vec<(UserId, Item)>,
    /// Items on the target as a whole (destroy).
    pub whole: Vec<Item>,
    /// Unsubscribes from a channel this batch destroys: they settle with it.
    pub riders: Vec<(UserId, Item)>,
}

/// A destroy's own items, and the unsubscribes riding on it.
#[derive(Debug, Default)]
struct Whole {
    items: Vec<Item>,
    riders: Vec<(UserId, Item)>,
}

/// The items one account carries in a batch, one per event that asked:
/// almost always one, held inline (more are boxed, so this stays the size
/// of one item).
#[derive(Debug)]
enum Items {
    One(Item),
    // Boxed on purpose: a `Vec` here would make every account's entry a
    // word wider, for the rare account that several events ask for.
    #[allow(clippy::box_collection)]
    Many(Box<Vec<Item>>),
}

impl Items {
    fn push(&mut self, item: Item) {
        match self {
            Items::Many(v) => v.push(item),
            Items::One(first) => *self = Items::Many(Box::new(vec![first.clone(), item])),
        }
    }

    fn len(&self) -> usize {
        match self {
            Items::One(_) => 1,
            Items::Many(v) => v.len(),
        }
    }

    fn for_each(&self, f: impl FnMut(&Item)) {
        match self {
            Items::One(i) => std::iter::once(i).for_each(f),
            Items::Many(v) => v.iter().for_each(f),
        }
    }

    fn into_vec(self) -> Vec<Item> {
        match self {
            Items::One(i) => vec![i],
            Items::Many(v) => *v,
        }
    }
}

/// A batch's accounts, each with its items: one inline, more in a list, so
/// a batch of one account (a backlog of single-account keys is made of
/// them) needs no allocation of its own. At most the batch's capacity, so
/// finding an account is a short scan.
#[derive(Debug)]
enum Members {
    One((UserId, Items)),
    /// Also the empty set (an empty `Vec` allocates nothing).
    Many(Vec<(UserId, Items)>),
}

impl Default for Members {
    fn default() -> Self {
        Members::Many(Vec::new())
    }
}

impl Members {
    fn as_slice(&self) -> &[(UserId, Items)] {
        match self {
            Members::One(e) => std::slice::from_ref(e),
            Members::Many(v) => v,
        }
    }

    fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// Adds one item for `member` (a repeat of an account adds its item, not
    /// the account).
    fn push(&mut self, member: UserId, item: Item) {
        let found = match self {
            Members::One((m, items)) if *m == member => Some(items),
            Members::One(_) => None,
            Members::Many(v) => v.iter_mut().find(|(m, _)| *m == member).map(|(_, i)| i),
        };
        if let Some(items) = found {
            items.push(item);
            return;
        }
        let entry = (member, Items::One(item));
        *self = match std::mem::take(self) {
            Members::Many(v) if v.is_empty() => Members::One(entry),
            Members::Many(mut v) => {
                v.push(entry);
                Members::Many(v)
            }
            Members::One(first) => Members::Many(vec![first, entry]),
        };
    }

    /// Takes `member` out, with its items.
    fn remove(&mut self, member: &UserId) -> Option<Items> {
        let mut all = std::mem::take(self).into_vec();
        let taken = all
            .iter()
            .position(|(m, _)| m == member)
            .map(|i| all.remove(i).1);
        *self = Members::Many(all);
        self.shrink();
        taken
    }

    fn into_vec(self) -> Vec<(UserId, Items)> {
        match self {
            Members::One(e) => vec![e],
            Members::Many(v) => v,
        }
    }

    /// Gives back the room a growing list reserved.
    fn shrink(&mut self) {
        if let Members::Many(v) = self {
            if v.len() == 1 {
                if let Some(e) = v.pop() {
                    *self = Members::One(e);
                }
            } else {
                v.shrink_to_fit();
            }
        }
    }
}

/// A set of distinct accounts for one call, each with the items (one per
/// event that asked) it settles.
///
/// Kept small, because a backlog of single-account batches (one per
/// `follow_delete` From_Account) may hold most of `max_pending_items` in the
/// dispatcher's queue: the accounts in a short list (one inline), each with
/// its items (one inline), and the destroy-only parts boxed away. What only
/// an open batch needs is in [`Open`].
#[derive(Debug)]
pub struct Batch {
    key: BatchKey,
    members: Members,
    whole: Option<Box<Whole>>,
}

/// A batch still open in the coalescer, stored under its key (so the key is
/// held once): its accounts, which of its key's batches it is (the deadline
/// queues' entries name it), and how many accounts make it full. A destroy
/// is never open: it goes at once.
#[derive(Debug)]
struct Open {
    members: Members,
    generation: u32,
    cap: u16,
}

impl Open {
    fn new(key: &BatchKey, generation: u32, max_batch: usize) -> Open {
        let cap = key
            .capacity()
            .min(max_batch)
            .clamp(1, usize::from(u16::MAX));
        Open {
            members: Members::default(),
            generation,
            cap: cap as u16,
        }
    }

    fn is_full(&self) -> bool {
        self.members.len() >= usize::from(self.cap)
    }

    /// Takes every item of `member` out of the batch.
    fn remove_member(&mut self, member: &UserId) -> Vec<Item> {
        self.members
            .remove(member)
            .map(Items::into_vec)
            .unwrap_or_default()
    }

    fn into_batch(self, key: BatchKey) -> Batch {
        Batch {
            key,
            members: self.members,
            whole: None,
        }
    }
}

impl Batch {
    pub fn key(&self) -> &BatchKey {
        &self.key
    }

    pub fn api(&self) -> Api {
        self.key.api()
    }

    /// Gives back the room a growing batch reserved: it now waits as it is.
    fn seal(&mut self) {
        self.members.shrink();
    }

    /// The accounts, in the order they joined.
    fn accounts(&self) -> impl Iterator<Item = UserId> + '_ {
        self.members.as_slice().iter().map(|(m, _)| m.clone())
    }

    /// The vendor request for this batch. Members never exceed the key's
    /// capacity (the coalescer sends a batch once it is full, and halves
    /// only shrink), so the typed batch always fits.
    pub fn request(&self) -> Request<'_> {
        const FITS: &str = "a batch never holds more members than its key's capacity";
        match &self.key {
            BatchKey::Unsubscribe(c) => Request::DeleteSubscriber(
                c,
                SubscriberBatch::try_from_iter(self.accounts()).expect(FITS),
            ),
            BatchKey::Subscribe(c) => Request::AddSubscriber(
                c,
                SubscriberBatch::try_from_iter(self.accounts()).expect(FITS),
            ),
            BatchKey::Unfollow(f) => {
                Request::FollowDelete(f, FollowBatch::try_from_iter(self.accounts()).expect(FITS))
            }
            BatchKey::Destroy(c) => Request::Destroy(c),
        }
    }

    /// Everything still in the batch.
    pub fn into_parts(self) -> BatchParts {
        let whole = self.whole.map(|w| *w).unwrap_or_default();
        BatchParts {
            members: self
                .members
                .into_vec()
                .into_iter()
                .flat_map(|(m, items)| items.into_vec().into_iter().map(move |i| (m.clone(), i)))
                .collect(),
            whole: whole.items,
            riders: whole.riders,
        }
    }

    /// Accounts (or 1 for a whole-target call) the call will carry.
    pub fn size(&self) -> usize {
        self.members.len().max(usize::from(self.whole.is_some()))
    }

    /// Two halves, for isolating a bad account (every item of an account
    /// stays on one side); the batch itself back when it has a single
    /// account.
    #[allow(clippy::result_large_err)]
    pub fn split(mut self) -> Result<(Batch, Batch), Batch> {
        if self.members.len() < 2 || self.whole.is_some() {
            return Err(self);
        }
        let mut first = std::mem::take(&mut self.members).into_vec();
        let mut second = Members::Many(first.split_off(first.len() / 2));
        second.shrink();
        self.members = Members::Many(first);
        self.members.shrink();
        let other = Batch {
            key: self.key.clone(),
            members: second,
            whole: None,
        };
        Ok((self, other))
    }

    /// Tells each item's event what the item now waits for (its record
    /// shows it while the event is pending).
    pub fn mark(&self, w: crate::fate::WaitingFor) {
        for (_, items) in self.members.as_slice() {
            items.for_each(|i| i.origin.stage(w));
        }
        if let Some(whole) = &self.whole {
            for i in whole
                .items
                .iter()
                .chain(whole.riders.iter().map(|(_, i)| i))
            {
                i.origin.stage(w);
            }
        }
    }

    /// Every item in the batch, for settling or dead-lettering them all.
    pub fn item_count(&self) -> usize {
        self.members
            .as_slice()
            .iter()
            .map(|(_, items)| items.len())
            .sum::<usize>()
            + self
                .whole
                .as_ref()
                .map_or(0, |w| w.items.len() + w.riders.len())
    }
}

/// Input to the coalescer.
#[derive(Debug)]
pub enum Input {
    /// A new action.
    Action(Action, Item),
    /// An item to try again (its call failed for it alone).
    Retry {
        key: BatchKey,
        member: UserId,
        item: Item,
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
        &self.waiting[api.index()]
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

/// How often the batches kept open past their linger (their API is
/// saturated) are looked at again: only the oldest of each API, so this
/// costs the same with one such batch or a hundred thousand.
const RECHECK: Duration = Duration::from_millis(10);
/// A batch kept open past its linger goes anyway after this many lingers
/// (and at least `MIN_HOLD`), so a small key is not starved behind a long
/// wave on the same API.
const MAX_LINGERS: u32 = 25;
const MIN_HOLD: Duration = Duration::from_secs(5);

/// A batch's place in a deadline queue: it is due `linger` after it opened
/// in the open order, and `hold` after it opened once postponed.
#[derive(Debug)]
struct Due {
    opened: Instant,
    key: BatchKey,
    /// Tells a stale entry (that batch went out and the key reopened) from
    /// a current one.
    generation: u32,
}

/// The coalescer task's state.
pub struct Coalescer {
    open: HashMap<BatchKey, Open>,
    /// Open order; deadlines are monotonic because linger is constant.
    order: VecDeque<Due>,
    /// Batches past their linger kept open while their API is saturated,
    /// one queue per API (`Api::index`), in the order they opened; `at` is
    /// when each goes whatever the API's state (`opened + hold`).
    postponed: [VecDeque<Due>; Api::ALL.len()],
    /// When the postponed batches are next looked at, while there are any.
    recheck: Option<Instant>,
    backlog: Arc<Backlog>,
    linger: Duration,
    max_open_keys: usize,
    max_batch: usize,
    out: mpsc::Sender<Batch>,
    metrics: Metrics,
    draining: bool,
    /// The next batch's generation.
    generation: u32,
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
            postponed: Default::default(),
            recheck: None,
            backlog,
            linger,
            max_open_keys: max_open_keys.max(1),
            max_batch: max_batch.max(1),
            out,
            metrics,
            draining: false,
            generation: 0,
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
        let hold = self.hold();
        loop {
            let deadline = self
                .postponed
                .iter()
                .filter_map(|q| q.front().map(|d| d.opened + hold))
                .chain(self.order.front().map(|d| d.opened + self.linger))
                .chain(self.recheck)
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
                    self.add_destroy(channel, item).await
                } else if let Some(member) = member {
                    self.supersede(&key, &member);
                    self.add_member(key, member, item, now).await
                } else {
                    Ok(())
                }
            }
            Input::Retry { key, member, item } => self.add_member(key, member, item, now).await,
        }
    }

    /// How long past its linger a batch may be kept open while its API is
    /// saturated.
    fn hold(&self) -> Duration {
        (self.linger * MAX_LINGERS).max(MIN_HOLD)
    }

    /// Takes the open batch of `key` out of the map, as a batch to send.
    fn take(&mut self, key: &BatchKey) -> Option<Batch> {
        self.open.remove_entry(key).map(|(k, o)| o.into_batch(k))
    }

    async fn open_batch(&mut self, key: &BatchKey, now: Instant) -> Result<(), Closed> {
        if self.open.contains_key(key) {
            return Ok(());
        }
        if self.open.len() >= self.max_open_keys {
            // Bounded memory: the oldest open batch goes now, not full,
            // whether it lingers or is held past its linger.
            if let Some(oldest) = self.pop_oldest() {
                let b = self.take(&oldest.key).expect("current");
                self.send(b).await?;
            }
        }
        let generation = self.generation;
        self.generation = self.generation.wrapping_add(1);
        self.open
            .insert(key.clone(), Open::new(key, generation, self.max_batch));
        self.order.push_back(Due {
            opened: now,
            key: key.clone(),
            generation,
        });
        self.metrics.set_open_keys(self.open.len());
        Ok(())
    }

    /// Takes the entry of the batch that opened first out of its queue;
    /// entries of batches already gone are dropped on the way.
    fn pop_oldest(&mut self) -> Option<Due> {
        let queues = self.postponed.iter_mut().chain([&mut self.order]);
        let mut oldest: Option<&mut VecDeque<Due>> = None;
        for q in queues {
            while q.front().is_some_and(|d| !current(&self.open, d)) {
                q.pop_front();
            }
            let Some(front) = q.front() else { continue };
            let older = match oldest.as_ref().and_then(|o| o.front()) {
                Some(o) => front.opened < o.opened,
                None => true,
            };
            if older {
                oldest = Some(q);
            }
        }
        oldest.and_then(VecDeque::pop_front)
    }

    fn is_current(&self, due: &Due) -> bool {
        current(&self.open, due)
    }

    async fn add_member(
        &mut self,
        key: BatchKey,
        member: UserId,
        item: Item,
        now: Instant,
    ) -> Result<(), Closed> {
        self.open_batch(&key, now).await?;
        let batch = self.open.get_mut(&key).expect("just opened");
        batch.members.push(member, item);
        if batch.is_full() || self.draining || self.linger.is_zero() {
            let b = self.take(&key).expect("present");
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
        let items = batch.remove_member(member);
        if items.is_empty() {
            return;
        }
        let n = items.len();
        self.metrics.items(other.api(), ItemResult::Noop, n);
        self.metrics.pending_add(other.api(), -(n as i64));
        for i in items {
            i.origin.settle(i.index, ItemFate::noop(0, i.attempts));
        }
        if batch.members.len() == 0 {
            self.open.remove(&other);
            self.metrics.set_open_keys(self.open.len());
        }
    }

    async fn add_destroy(&mut self, channel: ChannelId, item: Item) -> Result<(), Closed> {
        let unsub_key = BatchKey::Unsubscribe(channel.clone());
        // Never open: it goes at once.
        let mut whole = Whole {
            items: vec![item],
            riders: Vec::new(),
        };
        if let Some(unsubs) = self.take(&unsub_key) {
            whole.riders = unsubs.into_parts().members;
            self.metrics.set_open_keys(self.open.len());
        }
        let batch = Batch {
            key: BatchKey::Destroy(channel),
            members: Members::default(),
            whole: Some(Box::new(whole)),
        };
        // A destroy cannot grow: send it now.
        self.send(batch).await
    }

    async fn flush_due(&mut self) -> Result<(), Closed> {
        let now = Instant::now();
        let hold = self.hold();
        // Those held past their linger first: they are older. Each API's
        // queue is looked at from its front only, and stops at the first
        // batch still to be held.
        for i in 0..self.postponed.len() {
            while let Some(d) = self.postponed[i].front() {
                if self.is_current(d)
                    && now < d.opened + hold
                    && !self.draining
                    && self.backlog.waiting(d.key.api()) > 0
                {
                    break;
                }
                let d = self.postponed[i].pop_front().expect("front exists");
                if self.is_current(&d) {
                    let b = self.take(&d.key).expect("present");
                    self.send(b).await?;
                }
            }
        }
        while self
            .order
            .front()
            .is_some_and(|d| d.opened + self.linger <= now)
        {
            let d = self.order.pop_front().expect("front exists");
            if !self.is_current(&d) {
                continue;
            }
            // While batches of this API wait for the limiter, a partly full
            // one would only queue behind them: keep filling it.
            let api = d.key.api();
            if self.backlog.waiting(api) > 0 && !self.draining && now < d.opened + hold {
                self.postponed[api.index()].push_back(d);
                continue;
            }
            let b = self.take(&d.key).expect("present");
            self.send(b).await?;
        }
        self.recheck = self
            .postponed
            .iter()
            .any(|q| !q.is_empty())
            .then(|| now + RECHECK);
        self.metrics.set_open_keys(self.open.len());
        self.give_back_room();
        Ok(())
    }

    /// A wave opens thousands of keys at once, and the map and queues keep
    /// the room they grew to after the batches went to the dispatcher,
    /// where the same work is then held a second time: mostly empty, they
    /// shrink (large tables are mapped memory, so this returns it).
    fn give_back_room(&mut self) {
        const SMALL: usize = 4096;
        if self.open.capacity() > SMALL && self.open.len() < self.open.capacity() / 4 {
            self.open.shrink_to(self.open.len() * 2);
        }
        for q in self.postponed.iter_mut().chain([&mut self.order]) {
            if q.capacity() > SMALL && q.len() < q.capacity() / 4 {
                q.shrink_to(q.len() * 2);
            }
        }
    }

    async fn flush_all(&mut self) -> Result<(), Closed> {
        self.order.clear();
        self.postponed.iter_mut().for_each(VecDeque::clear);
        self.recheck = None;
        let batches: Vec<Batch> = self.open.drain().map(|(k, o)| o.into_batch(k)).collect();
        self.metrics.set_open_keys(0);
        for b in batches {
            self.send(b).await?;
        }
        Ok(())
    }

    async fn send(&mut self, mut b: Batch) -> Result<(), Closed> {
        b.seal();
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

/// Whether `due` is the entry of the batch open now for its key (the
/// deadline queues keep entries of batches that went or reopened).
fn current(open: &HashMap<BatchKey, Open>, due: &Due) -> bool {
    open.get(&due.key)
        .is_some_and(|b| b.generation == due.generation)
}

#[derive(Debug)]
struct Closed;

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{DeadLetter, Settle};
    use crate::settle::Pending;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn a_batch_of_one_account_is_no_bigger_than_a_few_words() {
        // A backlog of single-account keys holds one of these per item.
        // (An id has no spare bit pattern, so `Members` needs a word for
        // its tag.)
        assert!(std::mem::size_of::<Items>() <= 16);
        assert!(std::mem::size_of::<Members>() <= 40);
        assert!(std::mem::size_of::<Batch>() <= 72);
        // One open key: its key and this, in the map; its deadline entry.
        assert!(std::mem::size_of::<Open>() <= 48);
        assert!(std::mem::size_of::<Due>() <= 48);
    }

    /// Counts the events that settled.
    struct Count(Arc<AtomicUsize>);
    impl Settle for Count {
        fn settled(self: Box<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn dead_lettered(self: Box<Self>, _: DeadLetter, _: Vec<u8>) {}
        fn action_dead_lettered(&self, _: DeadLetter) {}
    }

    fn user(u: &str) -> UserId {
        UserId::parse(u).unwrap()
    }

    fn chan(c: &str) -> ChannelId {
        ChannelId::parse(format!("@TOA#_{c}")).unwrap()
    }

    struct Harness {
        c: Coalescer,
        out: mpsc::Receiver<Batch>,
        settled: Arc<AtomicUsize>,
        pending: Arc<Pending>,
    }

    impl Harness {
        fn new(max_open_keys: usize) -> Harness {
            let (tx, out) = mpsc::channel(1000);
            let metrics = Metrics::new([]);
            Harness {
                c: Coalescer::new(
                    Duration::from_secs(60),
                    max_open_keys,
                    100,
                    Arc::new(Backlog::default()),
                    tx,
                    metrics.clone(),
                ),
                out,
                settled: Arc::default(),
                pending: Pending::new(1000, metrics),
            }
        }

        /// One event with one action.
        async fn act(&mut self, action: Action) {
            let origin = Origin::new(
                "user.banned",
                1,
                std::time::Instant::now(),
                self.pending.clone(),
                0,
                Box::new(Count(self.settled.clone())),
                None,
            );
            let item = Item {
                origin,
                attempts: 0,
                index: 0,
            };
            self.c.add(Input::Action(action, item)).await.unwrap();
        }

        fn sent(&mut self) -> Vec<Batch> {
            std::iter::from_fn(|| self.out.try_recv().ok()).collect()
        }
    }

    fn unsub(c: &str, u: &str) -> Action {
        Action::Unsubscribe {
            channel: chan(c),
            user: user(u),
        }
    }

    fn accounts(b: &Batch) -> Vec<String> {
        b.accounts().map(String::from).collect()
    }

    #[tokio::test]
    async fn an_account_asked_for_twice_is_one_account_with_two_items() {
        let mut h = Harness::new(100);
        h.act(unsub("a", "u1")).await;
        h.act(unsub("a", "u2")).await;
        h.act(unsub("a", "u1")).await;
        h.c.flush_all().await.unwrap();
        let b = h.sent().pop().expect("one batch");
        assert_eq!(accounts(&b), ["u1", "u2"]);
        assert_eq!((b.size(), b.item_count()), (2, 3));
        match b.request() {
            Request::DeleteSubscriber(c, accounts) => {
                assert_eq!(c, &chan("a"));
                assert_eq!(accounts.len(), 2);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn many_events_for_one_account_stay_one_account() {
        // Each item joins its account's entry, found among at most the
        // batch's capacity of accounts, however many items there are.
        let mut h = Harness::new(100);
        for _ in 0..5_000 {
            h.act(unsub("a", "same")).await;
        }
        h.act(unsub("a", "other")).await;
        h.c.flush_all().await.unwrap();
        let b = h.sent().pop().expect("one batch");
        assert_eq!(accounts(&b), ["same", "other"]);
        assert_eq!((b.size(), b.item_count()), (2, 5_001));
    }

    #[tokio::test(start_paused = true)]
    async fn past_their_linger_batches_are_held_while_their_api_is_saturated() {
        let mut h = Harness::new(3);
        let api = Api::DeleteSubscriber;
        h.c.backlog.queued(api);
        for c in ["a", "b", "c"] {
            h.act(unsub(c, "u1")).await;
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        tokio::time::advance(Duration::from_secs(60)).await;
        h.c.flush_due().await.unwrap();
        assert!(h.sent().is_empty(), "saturated: all three are held");
        assert!(h.c.recheck.is_some());
        // Held batches keep filling.
        h.act(unsub("b", "u2")).await;
        // The open-key bound counts held batches too: the oldest goes.
        h.act(unsub("d", "u1")).await;
        let sent = h.sent();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].key(), &BatchKey::Unsubscribe(chan("a")));
        // The API frees up: one held batch goes per look, oldest first.
        h.c.backlog.started(api);
        h.c.backlog.started(api);
        h.c.flush_due().await.unwrap();
        let sent = h.sent();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].key(), &BatchKey::Unsubscribe(chan("b")));
        assert_eq!(accounts(&sent[0]), ["u1", "u2"]);
        // Still saturated by that one: the rest go when their hold ends.
        tokio::time::advance(MAX_LINGERS * Duration::from_secs(60)).await;
        h.c.flush_due().await.unwrap();
        let keys: Vec<BatchKey> = h.sent().iter().map(|b| b.key().clone()).collect();
        assert_eq!(
            keys,
            [
                BatchKey::Unsubscribe(chan("c")),
                BatchKey::Unsubscribe(chan("d"))
            ]
        );
        assert!(h.c.recheck.is_none(), "nothing held");
    }

    #[tokio::test]
    async fn a_full_batch_goes_at_once_and_the_key_opens_anew() {
        let mut h = Harness::new(100);
        for i in 0..21 {
            h.act(Action::Unfollow {
                from: user("fan"),
                to: user(&format!("t{i}")),
            })
            .await;
        }
        let sent = h.sent();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].size(), 20, "follow_delete carries 20");
        assert_eq!(h.c.open.len(), 1, "the 21st waits in a new batch");
    }

    #[tokio::test]
    async fn a_destroy_takes_the_pending_unsubscribes_of_its_channel_along() {
        let mut h = Harness::new(100);
        h.act(unsub("gone", "u1")).await;
        h.act(unsub("gone", "u2")).await;
        h.act(unsub("stays", "u3")).await;
        h.act(Action::Destroy {
            channel: chan("gone"),
        })
        .await;
        let sent = h.sent();
        assert_eq!(sent.len(), 1, "the destroy goes at once");
        assert_eq!(sent[0].key(), &BatchKey::Destroy(chan("gone")));
        assert_eq!(sent[0].item_count(), 3);
        let parts = sent.into_iter().next().unwrap().into_parts();
        assert_eq!(parts.whole.len(), 1);
        let riders: Vec<&str> = parts.riders.iter().map(|(u, _)| u.as_str()).collect();
        assert_eq!(riders, ["u1", "u2"]);
        assert!(!h.c.open.contains_key(&BatchKey::Unsubscribe(chan("gone"))));
        assert!(h.c.open.contains_key(&BatchKey::Unsubscribe(chan("stays"))));
    }

    #[tokio::test]
    async fn a_later_opposite_action_supersedes_the_pending_one() {
        let mut h = Harness::new(100);
        h.act(unsub("c", "u1")).await;
        h.act(unsub("c", "u2")).await;
        h.act(Action::Subscribe {
            channel: chan("c"),
            user: user("u1"),
        })
        .await;
        // The removal of u1 settled as a noop, never to be sent.
        assert_eq!(h.settled.load(Ordering::SeqCst), 1);
        h.c.flush_all().await.unwrap();
        let mut sent = h.sent();
        sent.sort_by_key(|b| b.api().name());
        let (add, del) = (&sent[0], &sent[1]);
        assert_eq!(add.key(), &BatchKey::Subscribe(chan("c")));
        assert_eq!(accounts(add), ["u1"]);
        assert_eq!(accounts(del), ["u2"]);
    }

    #[tokio::test]
    async fn a_refused_batch_splits_with_each_accounts_items_on_one_side() {
        let mut h = Harness::new(100);
        for u in ["u1", "u2", "u1", "u3", "u4", "u1"] {
            h.act(unsub("c", u)).await;
        }
        h.c.flush_all().await.unwrap();
        let b = h.sent().pop().unwrap();
        let (a, c) = b.split().expect("four accounts split");
        assert_eq!(accounts(&a), ["u1", "u2"]);
        assert_eq!(accounts(&c), ["u3", "u4"]);
        assert_eq!((a.size(), a.item_count()), (2, 4));
        assert_eq!((c.size(), c.item_count()), (2, 2));
        let (one, _) = a.split().unwrap();
        assert_eq!(one.item_count(), 3, "u1's three items stay together");
        assert!(one.split().is_err(), "one account does not split");
    }

    #[tokio::test]
    async fn past_max_open_keys_the_oldest_open_batch_goes_early() {
        let mut h = Harness::new(2);
        for fan in ["f1", "f2", "f3"] {
            h.act(Action::Unfollow {
                from: user(fan),
                to: user("banned"),
            })
            .await;
        }
        let sent = h.sent();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].key(), &BatchKey::Unfollow(user("f1")));
        assert_eq!(h.c.open.len(), 2);
    }
}
