//! A stateful emulator of the Tencent Cloud Chat REST endpoints we call,
//! strict enough that passing against it means passing against the vendor:
//! the same URL scheme and checks in the same order (URL parameters,
//! SDKAppID, UserSig, app admin, per-API call frequency, JSON body), strict
//! field-by-field validation of each body, per-item `Result` / `ResultCode`,
//! and the error codes the vendor documents wherever their condition can
//! arise. It keeps state (channels, subscribers, follows) and has test-only
//! routes under `/emulator/` to seed state, inject faults and read what it saw:
//!
//! | route | does |
//! |---|---|
//! | `POST /emulator/seed` | adds a [`Seed`] |
//! | `PUT /emulator/faults` | replaces the fault set with a [`Faults`] (400 if a rule is invalid) |
//! | `GET /emulator/faults` | the current fault set, `count` = firings left |
//! | `DELETE /emulator/faults` | removes every fault |
//! | `POST /emulator/reset` | drops all state, faults, stats and the call log |
//! | `GET /emulator/stats` | [`Stats`] |
//! | `GET /emulator/calls[?api=NAME]` | the call log, oldest first ([`CallRecord`]s) |
//! | `GET /emulator/channels/{id}/subscribers` | subscribers in subscribe order (id percent-encoded; 404 if no such channel) |
//! | `GET /emulator/follows/{from}` | whom `from` follows, in follow order |
//!
//! The same operations are methods of [`Emulator`] for in-process tests.
//!
//! What the vendor leaves open, the emulator has to guess. The guesses:
//! - paging cursors (`Next`, `StartCursor`) are opaque and tied to their
//!   listing; one the API never returned is a parameter error (6017, 30001);
//! - what a cursor means under changes between pages is unknown ("the
//!   position of the subscriber last pulled"): [`CursorMode`] plays each
//!   reading, `offset` (the default, the pessimistic one: removals shift
//!   members past it), `key` or `stable`. Set it with
//!   [`EmulatorConfig::cursor`], `chat-janitor emulator --cursor`,
//!   `[emulator] cursor` for the demo, or `"cursor"` in a seed;
//! - `get_subscribed_official_account_list`'s numeric `Offset` is an offset
//!   into the current list, whatever the mode;
//! - `SubscriberNum` is the channel's count when each page is read.
//!
//! Tests run under `offset` unless they say otherwise; `tests/api/sweep.rs`
//! runs its sweep under each mode, and `tests/api/emulator.rs` pins each
//! mode's paging (the README lists them).

mod endpoints;
mod faults;
mod meter;
mod model;
mod routes;
mod state;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::dev::ServerHandle;
use actix_web::{web, App, HttpServer};
use parking_lot::Mutex;

pub use model::{
    ApiStats, CallRecord, CursorMode, FaultRule, Faults, Seed, SeedChannel, SeedFollow, Stats,
};

use crate::tencent::usersig::{self, UserSigClaims, UserSigError};
use faults::FaultEngine;
use meter::Meter;
use state::World;

/// How the emulator presents itself.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    pub sdkappid: u64,
    /// The key UserSigs are verified with.
    pub secret_key: String,
    /// App admin identifiers (60010 for any other identifier).
    pub admins: Vec<String>,
    /// Calls per second allowed per API (60007 beyond it).
    pub rate_per_api: u32,
    /// RNG seed for fault injection.
    pub seed: u64,
    /// What paging cursors mean at start (and after a reset); a seed may
    /// change it.
    pub cursor: CursorMode,
}

/// The emulator's default SDKAppID.
pub const DEFAULT_SDKAPPID: u64 = 1_400_000_000;
/// The emulator's default secret key.
pub const DEFAULT_SECRET_KEY: &str = "chat-janitor-emulator-key";
/// The emulator's default admin identifier.
pub const DEFAULT_ADMIN: &str = "administrator";
/// The emulator's default fault-injection seed.
pub const DEFAULT_SEED: u64 = 0x00c0_ffee;

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            sdkappid: DEFAULT_SDKAPPID,
            secret_key: DEFAULT_SECRET_KEY.to_owned(),
            admins: vec![DEFAULT_ADMIN.to_owned()],
            rate_per_api: crate::tencent::api::VENDOR_CALLS_PER_SECOND,
            seed: DEFAULT_SEED,
            cursor: CursorMode::default(),
        }
    }
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Shared by the HTTP workers and the in-process handle. Locks are never
/// held across an await, and never two at once.
pub(crate) struct Inner {
    pub config: EmulatorConfig,
    pub world: Mutex<World>,
    pub faults: Mutex<FaultEngine>,
    pub meter: Mutex<Meter>,
    /// UserSigs already verified, by (usersig, identifier): clients reuse one
    /// for many calls, and only its expiry can change its verdict.
    sig_cache: Mutex<HashMap<(String, String), UserSigClaims>>,
}

/// Most verified UserSigs remembered.
const SIG_CACHE_CAPACITY: usize = 1024;

impl Inner {
    /// `usersig::verify` against our SDKAppID and key, remembering successes.
    pub(crate) fn verify_usersig(
        &self,
        sig: &str,
        identifier: &str,
        now: u64,
    ) -> Result<UserSigClaims, UserSigError> {
        let key = (sig.to_owned(), identifier.to_owned());
        if let Some(claims) = self.sig_cache.lock().get(&key) {
            if now > claims.expires_at() {
                return Err(UserSigError::Expired);
            }
            return Ok(claims.clone());
        }
        let claims = usersig::verify(
            sig,
            &self.config.secret_key,
            self.config.sdkappid,
            identifier,
            now,
        )?;
        let mut cache = self.sig_cache.lock();
        if cache.len() >= SIG_CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(key, claims.clone());
        Ok(claims)
    }

    fn seed(&self, seed: &Seed) {
        let now = i64::try_from(now_secs()).unwrap_or(i64::MAX);
        self.world.lock().seed(seed, now);
    }

    fn set_faults(&self, faults: Faults) {
        self.faults.lock().set(faults, self.config.seed);
    }

    fn reset(&self) {
        *self.world.lock() = World::new(self.config.cursor);
        *self.faults.lock() = FaultEngine::new(self.config.seed);
        *self.meter.lock() = Meter::default();
    }

    fn subscribers(&self, channel: &str) -> Option<Vec<String>> {
        self.world
            .lock()
            .channels
            .get(channel)
            .map(|c| c.by_seq.values().map(|s| s.account.clone()).collect())
    }

    fn following(&self, from: &str) -> Vec<String> {
        self.world
            .lock()
            .following
            .get(from)
            .map(|e| e.ordered())
            .unwrap_or_default()
    }
}

/// The emulator: state, faults and statistics behind an `Arc`; cheap to clone.
#[derive(Clone)]
pub struct Emulator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("sdkappid", &self.inner.config.sdkappid)
            .field("admins", &self.inner.config.admins)
            .finish_non_exhaustive()
    }
}

impl Emulator {
    pub fn new(config: EmulatorConfig) -> Emulator {
        let seed = config.seed;
        let cursor = config.cursor;
        Emulator {
            inner: Arc::new(Inner {
                config,
                world: Mutex::new(World::new(cursor)),
                faults: Mutex::new(FaultEngine::new(seed)),
                meter: Mutex::new(Meter::default()),
                sig_cache: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn config(&self) -> &EmulatorConfig {
        &self.inner.config
    }

    /// Serves on an already-bound listener; returns once the server is
    /// started (connections are accepted from then on).
    pub async fn serve(&self, listener: std::net::TcpListener) -> std::io::Result<RunningEmulator> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let data = web::Data::from(Arc::clone(&self.inner));
        let workers = std::thread::available_parallelism()
            .map_or(2, usize::from)
            .clamp(1, 4);
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .configure(routes::configure)
        })
        .workers(workers)
        .backlog(1024)
        .disable_signals()
        .shutdown_timeout(2)
        .listen(listener)?
        .run();
        let handle = server.handle();
        let join = tokio::spawn(server);
        Ok(RunningEmulator {
            addr,
            handle,
            join: Some(join),
        })
    }

    /// Adds state (see [`Seed`]); same as `POST /emulator/seed`.
    pub fn seed(&self, seed: Seed) {
        self.inner.seed(&seed);
    }

    /// Replaces the fault set and re-seeds the fault RNG. Unlike
    /// `PUT /emulator/faults` it does not validate the rules: a rule naming
    /// an unknown API never matches, probabilities are effectively clamped
    /// to 0..=1, and a status outside 100..=999 is answered as 502.
    pub fn set_faults(&self, faults: Faults) {
        self.inner.set_faults(faults);
    }

    pub fn clear_faults(&self) {
        self.inner.set_faults(Faults::default());
    }

    /// The current fault set, `count` showing the firings left.
    pub fn faults(&self) -> Faults {
        self.inner.faults.lock().current()
    }

    /// Drops all state, faults, statistics, call frequency windows and the
    /// call log.
    pub fn reset(&self) {
        self.inner.reset();
    }

    /// The channel's subscribers in subscribe order; `None` if no such channel.
    pub fn subscribers(&self, channel: &str) -> Option<Vec<String>> {
        self.inner.subscribers(channel)
    }

    /// What paging cursors mean now.
    pub fn cursor_mode(&self) -> CursorMode {
        self.inner.world.lock().cursor
    }

    pub fn channel_exists(&self, channel: &str) -> bool {
        self.inner.world.lock().channels.contains_key(channel)
    }

    /// Whom `from` follows, in follow order.
    pub fn following(&self, from: &str) -> Vec<String> {
        self.inner.following(from)
    }

    /// Who follows `to`, in follow order.
    pub fn followers(&self, to: &str) -> Vec<String> {
        self.inner
            .world
            .lock()
            .followers
            .get(to)
            .map(|e| e.ordered())
            .unwrap_or_default()
    }

    /// The channels `account` subscribes to, in subscribe order.
    pub fn subscriptions(&self, account: &str) -> Vec<String> {
        self.inner
            .world
            .lock()
            .user_subs
            .get(account)
            .map(|s| s.values().map(|(c, _)| c.clone()).collect())
            .unwrap_or_default()
    }

    pub fn stats(&self) -> Stats {
        self.inner.meter.lock().stats()
    }

    /// The calls seen, oldest first: the last 200,000, or fewer once they
    /// carry more than 4,000,000 accounts in all.
    pub fn calls(&self) -> Vec<CallRecord> {
        self.inner.meter.lock().calls()
    }
}

/// A serving emulator. Dropping it stops the server without waiting.
pub struct RunningEmulator {
    pub addr: SocketAddr,
    handle: ServerHandle,
    join: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl std::fmt::Debug for RunningEmulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningEmulator")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl RunningEmulator {
    /// `http://127.0.0.1:PORT` (the bound address).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, lets requests in flight finish (up to 2 s), and waits
    /// for the server to exit.
    pub async fn stop(mut self) {
        self.handle.stop(true).await;
        if let Some(join) = self.join.take() {
            let _ = join.await;
        }
    }

    /// Waits until the server exits by itself (it only does on an error).
    async fn wait(&mut self) -> anyhow::Result<()> {
        match self.join.as_mut() {
            Some(join) => {
                let res = join.await;
                self.join = None;
                res??;
                Ok(())
            }
            None => std::future::pending().await,
        }
    }
}

impl Drop for RunningEmulator {
    fn drop(&mut self) {
        if self.join.is_some() {
            // Sends the stop command at once; nobody waits for it.
            drop(self.handle.stop(false));
        }
    }
}

/// `chat-janitor emulator`: binds `listen`, prints one line
/// `emulator listening on http://ADDR (sdkappid N, admin X)` to stdout and
/// serves until ctrl-c or SIGTERM.
pub async fn run(config: EmulatorConfig, listen: SocketAddr) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::io::Write as _;

    let socket = if listen.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .context("creating the emulator's socket")?;
    socket.set_reuseaddr(true)?;
    socket
        .bind(listen)
        .with_context(|| format!("binding the emulator to {listen}"))?;
    let listener = socket.listen(1024)?.into_std()?;
    let admin = config
        .admins
        .first()
        .cloned()
        .unwrap_or_else(|| "(none)".into());
    let sdkappid = config.sdkappid;
    let emulator = Emulator::new(config);
    let mut running = emulator.serve(listener).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "emulator listening on {} (sdkappid {sdkappid}, admin {admin})",
            running.base_url()
        )?;
        out.flush()?;
    }
    tokio::select! {
        r = shutdown_signal() => r?,
        r = running.wait() => return r.context("the emulator stopped"),
    }
    tracing::info!("emulator stopping");
    running.stop().await;
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await?;
    Ok(())
}
