//! Builds the whole service from settings and runs it until a shutdown
//! signal, then drains it in order: stop intake, flush batches, finish the
//! calls in flight, settle (ack), write the event records, and close the
//! journal or the broker link.

use std::future::Future;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpServer};
use anyhow::Context;
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use crate::config::{CallbackSettings, Settings};
use crate::dispatch::Active;
use crate::domain::clock::unix_now;
use crate::domain::{DeadLetterSink, WebhookKey};
use crate::emulator::{Emulator, EmulatorConfig, RunningEmulator, Seed, SeedChannel, SeedFollow};
use crate::fate::broker::{self as broker_records, BrokerStore, BrokerStoreOptions};
use crate::fate::callbacks::{queue as callback_queue, CallbackOptions, Callbacks};
use crate::fate::disk::{DiskStore, StoreOptions};
use crate::fate::recorder::Recorder;
use crate::fate::{FateStore, RulesBook};
use crate::inbox::broker::{BrokerDeadLetters, BrokerLink};
use crate::inbox::consumer::BrokerInbox;
use crate::inbox::journal::{Journal, DEDUPE_WINDOW_SECS};
use crate::inbox::lease::{LeaderLease, LeaseHandle};
use crate::inbox::sweep_log::SweepLog;
use crate::inbox::Inbox;
use crate::ingest::http::{self, HttpState, NoRecords};
use crate::ingest::signature::Verifier;
use crate::intake;
use crate::pipeline::{Pipeline, PipelineHandles};
use crate::resolve::Planner;
use crate::rules::Rules;
use crate::sweep::{spawn_subscriber_counts, SweepStore, Sweeps, KEEP_FINISHED};
use crate::telemetry::Metrics;
use crate::tencent::TencentClient;

/// How long shutdown waits for in-flight work to settle.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// A built, bound, not yet running service.
pub struct Application {
    port: u16,
    server: actix_web::dev::Server,
    inbox: Arc<dyn Inbox>,
    /// Embedded mode's journal (tests reach its storage through it).
    journal: Option<Journal>,
    /// Broker mode's dispatch lease, released only once everything drained.
    lease: Option<LeaseHandle>,
    handles: PipelineHandles,
    intake_stop: CancellationToken,
    intake_task: tokio::task::JoinHandle<()>,
    sweeps: Arc<Sweeps>,
    /// The event records (embedded mode's files, or broker mode's stream),
    /// and their HTTP callbacks if configured.
    fate: Result<Arc<dyn FateStore>, NoRecords>,
    callbacks: Option<Callbacks>,
    metrics: Metrics,
    emulator: Option<RunningEmulator>,
}

impl Application {
    /// Opens the journal (or the broker link), starts the pipeline and binds
    /// the HTTP listener (port 0 picks a free port; see `port`).
    pub async fn build(settings: Settings) -> anyhow::Result<Application> {
        let rules = Arc::new(Rules::new(
            settings.rules.clone(),
            &settings.channels.rule_channels(),
        ));
        let metrics = Metrics::new(rules.types());

        let mut client_opts = settings.tencent.client_options();
        let emulator = if settings.emulator.embedded {
            let running = start_demo_emulator(&settings).await?;
            tracing::warn!(
                url = %running.base_url(),
                "upstream is the built-in emulator (demo mode: emulator.embedded = true)"
            );
            client_opts.base_url = running.base_url();
            Some(running)
        } else {
            None
        };
        let client = Arc::new(TencentClient::new(client_opts).context("building the HTTP client")?);

        let intake_stop = CancellationToken::new();
        let mut lease = None;
        let mut active = Active::always();
        metrics.set_dispatch_active(true);
        // Where sweeps are kept: the journal, or the broker's sweep log.
        let store;
        let mut broker_link = None;
        // Broker mode: the record store's progress, for the inbox's acks.
        let records_durable = Arc::new(tokio::sync::OnceCell::new());
        let (inbox, journal): (Arc<dyn Inbox>, Option<Journal>) = if settings.amqp.enabled() {
            let link = BrokerLink::new(
                settings.amqp.url.clone(),
                settings.amqp.queue.clone(),
                settings.amqp.prefetch,
                settings.amqp.heartbeat_seconds,
            );
            let handle = LeaderLease::start(
                settings.amqp.url.clone(),
                &settings.amqp.queue,
                settings.amqp.heartbeat_seconds,
                CancellationToken::new(),
            );
            active = follow_lease(
                &handle,
                Duration::from_secs(u64::from(settings.amqp.heartbeat_seconds)),
                metrics.clone(),
            );
            lease = Some(handle);
            broker_link = Some(link.clone());
            store = SweepStore::Broker {
                log: SweepLog::new(link.clone(), KEEP_FINISHED, intake_stop.clone()),
                active: active.clone(),
            };
            (
                BrokerInbox::new(
                    link,
                    active.clone(),
                    metrics.clone(),
                    records_durable.clone(),
                ),
                None,
            )
        } else {
            // Its error is one line naming the file and what to do.
            let journal = Journal::open_tuned(
                &settings.journal.path,
                settings.journal.faults.clone(),
                settings.journal.tuning,
            )?;
            spawn_id_pruning(journal.clone(), intake_stop.clone());
            store = SweepStore::Journal(journal.clone());
            (Arc::new(journal.clone()), Some(journal))
        };
        let (fate, callbacks) = match (&journal, broker_link) {
            _ if !settings.records.enabled => (Err(NoRecords::Disabled), None),
            (Some(j), _) => open_records(&settings, j, &metrics, &rules).await,
            (None, link) => open_broker_records(&settings, link, &metrics, &rules),
        };
        // The inbox forgets a settled event only once its record is
        // durable: the journal applies the settle, or the broker's
        // message is acked.
        if let Some(d) = fate.as_ref().ok().and_then(|s| s.durable()) {
            match &journal {
                Some(j) => j.settle_after_records(d),
                None => {
                    let _ = records_durable.set(d);
                }
            }
        }
        let (pipeline, handles) = Pipeline::start(
            &settings.batching,
            &settings.dispatch,
            settings.tencent.requests_per_second,
            active.clone(),
            client,
            metrics.clone(),
            fate.as_ref()
                .ok()
                .map(|store| Arc::new(Recorder::new(rules.clone(), store.clone()))),
        );
        let upstream = handles.upstream.clone();
        let sweeps = Sweeps::new(upstream.clone(), pipeline.clone(), store, inbox.clone());
        let resumed = sweeps
            .restore()
            .await
            .context("reading the journal's sweeps")?;
        if resumed > 0 {
            tracing::info!(sweeps = resumed, "sweeps resumed");
        }
        let intake_task = tokio::spawn(intake::run(
            inbox.clone(),
            pipeline,
            Arc::new(Planner::new(rules.clone(), upstream.clone())),
            sweeps.clone(),
            metrics.clone(),
            intake_stop.clone(),
        ));

        let state = web::Data::new(HttpState {
            verifier: Verifier::new(
                settings.webhook.secrets.clone(),
                settings.webhook.tolerance_seconds,
            ),
            rules: rules.clone(),
            inbox: inbox.clone(),
            metrics: metrics.clone(),
            circuit: upstream.circuit().clone(),
            body_limit: settings.server.body_limit_bytes,
            admin_token: settings.admin.token.clone(),
            sweeps: sweeps.clone(),
            fate: fate.clone(),
            in_flight: handles.records_in_flight(),
            read_token: settings.records.read_token.clone(),
        });
        spawn_subscriber_counts(
            upstream,
            rules.managed().to_vec(),
            Duration::from_secs(settings.channels.count_interval_seconds),
            metrics.clone(),
            intake_stop.clone(),
        );
        let listener = TcpListener::bind(settings.server.listen)
            .with_context(|| format!("binding server.listen {}", settings.server.listen))?;
        let port = listener.local_addr()?.port();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                // Admin bodies (a sweep's deny list) may be large; webhooks
                // read their body themselves under server.body_limit_bytes.
                .app_data(web::PayloadConfig::new(64 * 1024 * 1024))
                .configure(http::configure)
        })
        .listen(listener)?
        .disable_signals()
        .shutdown_timeout(5)
        .run();
        let mode = if settings.amqp.enabled() {
            "broker"
        } else {
            "embedded"
        };
        tracing::info!(port, mode, "chat-janitor serving");
        Ok(Application {
            port,
            server,
            inbox,
            journal,
            lease,
            handles,
            intake_stop,
            intake_task,
            sweeps,
            fate,
            callbacks,
            metrics,
            emulator,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The journal, in embedded mode (tests use it to simulate storage
    /// refusing appends).
    pub fn journal(&self) -> Option<Journal> {
        self.journal.clone()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The event record store (tests put records through it).
    pub fn fate(&self) -> Option<Arc<dyn FateStore>> {
        self.fate.as_ref().ok().cloned()
    }

    /// The embedded emulator's URL, in demo mode.
    pub fn emulator_url(&self) -> Option<String> {
        self.emulator.as_ref().map(RunningEmulator::base_url)
    }

    /// Serves until `shutdown` resolves, then drains.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let handle = self.server.handle();
        let server = tokio::spawn(self.server);
        shutdown.await;
        tracing::info!("shutting down: intake stops");
        handle.stop(true).await;
        let _ = server.await;
        self.inbox.close_intake();
        // The intake loop (and the sweeps) drop their pipeline handles, so
        // the coalescer sends every open batch.
        self.sweeps.close();
        self.intake_stop.cancel();
        let _ = self.intake_task.await;
        self.handles.drain(SHUTDOWN_GRACE).await;
        // Records are written before the inbox makes the last settles
        // durable, so a settled event's record is never the one missing.
        if let Some(c) = self.callbacks {
            c.stop().await;
        }
        if let Ok(store) = &self.fate {
            store.close().await;
        }
        self.inbox.close().await;
        // Only now may another replica dispatch: nothing of ours is left.
        if let Some(lease) = self.lease {
            let _ = tokio::time::timeout(Duration::from_secs(5), lease.release()).await;
        }
        if let Some(e) = self.emulator {
            e.stop().await;
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Opens embedded mode's record store under `journal.path/records/`, and
/// starts the callbacks if `[callbacks] url` is set. A store that cannot be
/// opened leaves the service running without records: they are an account
/// of the clean-up, never a reason to stop it.
async fn open_records(
    settings: &Settings,
    journal: &Journal,
    metrics: &Metrics,
    rules: &Arc<Rules>,
) -> (Result<Arc<dyn FateStore>, NoRecords>, Option<Callbacks>) {
    let dir = settings.journal.path.join("records");
    let opts = StoreOptions {
        retention: settings.records.retention,
        max_bytes: settings.records.max_bytes,
    };
    let book = RulesBook::new(rules.clone());
    let store: Arc<dyn FateStore> = match DiskStore::open(&dir, opts, metrics.clone(), book) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            tracing::error!(error = %e, "cannot open the event record store; running without records");
            return (Err(NoRecords::Unavailable(e.to_string())), None);
        }
    };
    let c = &settings.callbacks;
    let callbacks = match (&c.secret, c.enabled()) {
        (Some(key), true) => {
            let sink: Arc<dyn DeadLetterSink> = Arc::new(journal.clone());
            let opts = callback_options(c, key);
            match Callbacks::start(store.clone(), sink, opts, metrics.clone()).await {
                Ok(cb) => Some(cb),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the completion callbacks");
                    None
                }
            }
        }
        _ => {
            // Turned off: when they are turned on again they start with the
            // records written from then on, not with a backlog to expire.
            if store.cursor().is_some() {
                if let Err(e) = store.save_cursor(None).await {
                    tracing::warn!(error = %e, "cannot forget the callbacks' cursor");
                }
            }
            None
        }
    };
    (Ok(store), callbacks)
}

/// Opens broker mode's record store: the stream `<queue>.records`, read
/// back into a local copy under `journal.path/records-broker/`, and starts
/// the callbacks (consuming `<queue>.callbacks`) if `[callbacks] url` is
/// set. A copy that cannot be opened leaves the service running without
/// records.
fn open_broker_records(
    settings: &Settings,
    link: Option<Arc<BrokerLink>>,
    metrics: &Metrics,
    rules: &Arc<Rules>,
) -> (Result<Arc<dyn FateStore>, NoRecords>, Option<Callbacks>) {
    let Some(link) = link else {
        return (Err(NoRecords::Unavailable("no broker link".into())), None);
    };
    let c = &settings.callbacks;
    let dir = settings.journal.path.join(broker_records::LOCAL_DIR);
    let opts = BrokerStoreOptions {
        store: StoreOptions {
            retention: settings.records.retention,
            max_bytes: settings.records.max_bytes,
        },
        exchange: c.exchange.clone(),
        callback_queue: c.enabled(),
    };
    let book = RulesBook::new(rules.clone());
    let store: Arc<dyn FateStore> = match BrokerStore::open(
        link.clone(),
        &dir,
        opts,
        metrics.clone(),
        book,
    ) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            tracing::error!(error = %e, "cannot open the local copy of the event records; running without records");
            return (Err(NoRecords::Unavailable(e.to_string())), None);
        }
    };
    let callbacks = match (&c.secret, c.enabled()) {
        (Some(key), true) => {
            let opts = callback_options(c, key);
            let dead = BrokerDeadLetters::start(link.clone());
            match Callbacks::start_queue(link, dead, opts, metrics.clone(), callback_queue::HOLD) {
                Ok(cb) => Some(cb),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the completion callbacks");
                    None
                }
            }
        }
        _ => None,
    };
    (Ok(store), callbacks)
}

/// Where and how callbacks go, from `[callbacks]`.
fn callback_options(c: &CallbackSettings, key: &WebhookKey) -> CallbackOptions {
    CallbackOptions {
        url: c.url.clone(),
        key: key.clone(),
        max_age: c.max_age,
        max_backoff: c.max_backoff,
    }
}

fn spawn_id_pruning(journal: Journal, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(600));
        loop {
            tokio::select! {
                _ = every.tick() => journal.prune_ids(unix_now().saturating_sub(DEDUPE_WINDOW_SECS)),
                _ = stop.cancelled() => return,
            }
        }
    });
}

/// Demo mode: an in-process emulator with the configured credentials and a
/// few channels and follows to clean up.
async fn start_demo_emulator(settings: &Settings) -> anyhow::Result<RunningEmulator> {
    let t = &settings.tencent;
    let emulator = Emulator::new(EmulatorConfig {
        sdkappid: t.sdkappid,
        secret_key: t.secret_key.expose_secret().to_owned(),
        admins: vec![t.admin_identifier.clone()],
        rate_per_api: 200,
        cursor: settings.emulator.cursor,
        ..EmulatorConfig::default()
    });
    let users: Vec<String> = (0..10)
        .map(|i| format!("user{i}"))
        .chain(["107867".to_owned()])
        .collect();
    emulator.seed(Seed {
        channels: vec![
            SeedChannel::new("@TOA#_news", users.clone()),
            SeedChannel::new("@TOA#_deals", users.clone()),
        ],
        follows: vec![
            SeedFollow::new("107867", ["user1", "user2"]),
            SeedFollow::new("user3", ["107867"]),
        ],
        ..Seed::default()
    });
    let listener = TcpListener::bind(settings.emulator.listen)
        .with_context(|| format!("binding emulator.listen {}", settings.emulator.listen))?;
    Ok(emulator.serve(listener).await?)
}

/// Follows the dispatch lease: `Active` for the pipeline (from when it was
/// gained), and the `dispatch_active` gauge.
fn follow_lease(lease: &LeaseHandle, heartbeat: Duration, metrics: Metrics) -> Active {
    let (tx, rx) = tokio::sync::watch::channel(None);
    let mut leadership = lease.watch();
    tokio::spawn(async move {
        loop {
            let leader = leadership.borrow_and_update().is_leader();
            let changed = tx.send_if_modified(|since| match (leader, since.is_some()) {
                (true, false) => {
                    *since = Some(tokio::time::Instant::now());
                    true
                }
                (false, true) => {
                    *since = None;
                    true
                }
                _ => false,
            });
            metrics.set_dispatch_active(leader);
            if changed {
                if leader {
                    tracing::info!(
                        "this replica holds the dispatch lease: it consumes and dispatches"
                    );
                } else {
                    tracing::warn!("this replica no longer holds the dispatch lease: standing by");
                }
            }
            if leadership.changed().await.is_err() {
                tx.send_replace(None);
                metrics.set_dispatch_active(false);
                return;
            }
        }
    });
    Active::following(rx, heartbeat)
}
