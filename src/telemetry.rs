//! Telemetry: every metric the service exports has its one home here (names,
//! help, labels, and the label values pre-created at zero from the domain's
//! outcome enums), and the tracing setup: JSON lines when stderr is not a
//! terminal (production), human-readable on a terminal, level from
//! `RUST_LOG` (default `info`).

use std::io::IsTerminal;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tracing_subscriber::EnvFilter;

use crate::domain::{
    Api, CallbackResult, DeadLetterReason, ItemResult, RecordDrop, RejectReason, Source,
};

/// Installs the global subscriber once; later calls do nothing.
pub fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if std::io::stderr().is_terminal() {
        builder.try_init()
    } else {
        builder.json().flatten_event(true).try_init()
    };
}

/// APIs the service calls (pre-populated label values).
pub const PIPELINE_APIS: [Api; 7] = [
    Api::DeleteSubscriber,
    Api::FollowDelete,
    Api::DestroyOfficialAccount,
    Api::AddSubscriber,
    Api::GetSubscriberInfo,
    Api::GetSubscribedOfficialAccountList,
    Api::FollowGet,
];

/// Every metric the service exports. Each has one home here; the rest of the
/// code calls the methods below, never the registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    events_received: IntCounterVec,
    events_rejected: IntCounterVec,
    upstream_requests: IntCounterVec,
    upstream_duration: HistogramVec,
    batch_items: HistogramVec,
    items: IntCounterVec,
    pending_items: IntGaugeVec,
    open_keys: IntGauge,
    circuit_open: IntGauge,
    settle_seconds: Histogram,
    dead_letters: IntCounterVec,
    journal_events: IntGauge,
    channel_subscribers: IntGaugeVec,
    events_duplicate: IntCounterVec,
    broker_connected: IntGauge,
    dispatch_active: IntGauge,
    journal_write_errors: IntCounter,
    journal_file_bytes: IntGauge,
    journal_free_bytes: IntGauge,
    records_written: IntCounter,
    records_dropped: IntCounterVec,
    records_write_errors: IntCounter,
    records_file_bytes: IntGauge,
    records_stored: IntGauge,
    callback_deliveries: IntCounterVec,
    callbacks_lost: IntCounter,
    callback_oldest_pending: IntGauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Registers a collector (each is created once, with a valid name).
fn register<C: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    c: Result<C, prometheus::Error>,
) -> C {
    let c = c.expect("valid metric");
    r.register(Box::new(c.clone())).expect("registered once");
    c
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(r, IntCounterVec::new(Opts::new(name, help), labels))
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    register(r, IntGauge::new(name, help))
}

impl Metrics {
    /// Registers every series, with the label values known in advance at 0.
    pub fn new<'a>(event_types: impl IntoIterator<Item = &'a str>) -> Metrics {
        let r = Registry::new_custom(Some("chat_janitor".into()), None).expect("valid prefix");
        let events_received = counter(
            &r,
            "events_received_total",
            "Events accepted, by source and type.",
            &["source", "type"],
        );
        let events_rejected = counter(
            &r,
            "events_rejected_total",
            "Events refused at the edge, by source and reason.",
            &["source", "reason"],
        );
        let upstream_requests = counter(
            &r,
            "upstream_requests_total",
            "Upstream REST calls by API and outcome: 0 success, else the vendor ErrorCode, http_<status>, timeout, connect or decode.",
            &["api", "error_code"],
        );
        let upstream_duration = register(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    "upstream_request_duration_seconds",
                    "Upstream REST call latency.",
                )
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
                &["api"],
            ),
        );
        let batch_items = register(
            &r,
            HistogramVec::new(
                HistogramOpts::new("batch_items", "Accounts per upstream request.").buckets(vec![
                    1.0, 2.0, 5.0, 10.0, 19.0, 20.0, 50.0, 90.0, 99.0, 100.0,
                ]),
                &["api"],
            ),
        );
        let items = counter(
            &r,
            "items_total",
            "Per-item outcomes: applied, noop (already done), retried, dead_lettered.",
            &["api", "result"],
        );
        let pending_items = register(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "pending_items",
                    "Actions accepted into the pipeline and not yet settled.",
                ),
                &["api"],
            ),
        );
        let open_keys = gauge(&r, "open_batches", "Coalescing keys with an open batch.");
        let circuit_open = gauge(
            &r,
            "circuit_open",
            "1 while upstream rejects our credentials and dispatch is stopped.",
        );
        let settle_seconds = register(
            &r,
            Histogram::with_opts(
                HistogramOpts::new(
                    "event_settle_seconds",
                    "Time from accepting an event to every action it produced settling.",
                )
                .buckets(vec![
                    0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0,
                ]),
            ),
        );
        let dead_letters = counter(
            &r,
            "dead_letters_total",
            "Actions dead-lettered, by reason.",
            &["reason"],
        );
        let journal_events = gauge(
            &r,
            "journal_events",
            "Events in the embedded journal not yet settled.",
        );

        let channel_subscribers = register(
            &r,
            IntGaugeVec::new(
            Opts::new(
                "managed_channel_subscribers",
                "Subscribers of each managed channel (a configured, bounded set), as upstream counts them.",
            ),
            &["channel"],
        ),
        );

        let events_duplicate = counter(
            &r,
            "events_duplicate_total",
            "Events whose id was accepted before (answered 200, nothing done twice), by source.",
            &["source"],
        );
        let broker_connected = gauge(
            &r,
            "broker_connected",
            "1 while the RabbitMQ connection is up (broker mode); 0 otherwise.",
        );

        let journal_write_errors = register(
            &r,
            IntCounter::new(
                "journal_write_errors_total",
                "Journal commits and reopens that failed (no space, I/O errors, ...).",
            ),
        );
        let journal_file_bytes = gauge(
            &r,
            "journal_file_bytes",
            "Size of the embedded journal's file.",
        );
        let journal_free_bytes = gauge(
            &r,
            "journal_filesystem_free_bytes",
            "Space available to the service on the journal's filesystem.",
        );

        let dispatch_active = gauge(
            &r,
            "dispatch_active",
            "1 on the replica that consumes and dispatches (holds the dispatch lease, or runs embedded); 0 on standbys.",
        );

        let records_written = register(
            &r,
            IntCounter::new(
                "records_written_total",
                "Event records written (durably) when their event settled.",
            ),
        );
        let records_dropped = counter(
            &r,
            "records_dropped_total",
            "Event records not kept: queue_full (the writer was behind), storage_error (writes kept failing), shutdown.",
            &["reason"],
        );
        let records_write_errors = register(
            &r,
            IntCounter::new(
                "records_write_errors_total",
                "Event record writes that failed (no space, I/O errors, ...); the records are retried.",
            ),
        );
        let records_file_bytes = gauge(
            &r,
            "records_file_bytes",
            "Bytes the event record store's files take.",
        );
        let records_stored = gauge(&r, "records_stored", "Event records kept.");
        let callback_deliveries = counter(
            &r,
            "callback_deliveries_total",
            "Completion callback attempts: delivered (2xx), rejected (any other answer), unreachable (no answer).",
            &["result"],
        );
        let callbacks_lost = register(
            &r,
            IntCounter::new(
                "callbacks_lost_total",
                "Completion callbacks never sent: records.max_bytes deleted their record first, or (broker mode) the record publisher's buffer was full.",
            ),
        );
        let callback_oldest_pending = gauge(
            &r,
            "callback_oldest_pending_seconds",
            "Age of the oldest completion callback not yet delivered (0 when none waits).",
        );

        let m = Metrics {
            registry: r,
            events_received,
            events_rejected,
            upstream_requests,
            upstream_duration,
            batch_items,
            items,
            pending_items,
            open_keys,
            circuit_open,
            settle_seconds,
            dead_letters,
            journal_events,
            channel_subscribers,
            events_duplicate,
            broker_connected,
            dispatch_active,
            journal_write_errors,
            journal_file_bytes,
            journal_free_bytes,
            records_written,
            records_dropped,
            records_write_errors,
            records_file_bytes,
            records_stored,
            callback_deliveries,
            callbacks_lost,
            callback_oldest_pending,
        };
        let types: Vec<&str> = event_types.into_iter().collect();
        for source in Source::ALL {
            let s = source.as_str();
            for t in &types {
                m.events_received.with_label_values(&[s, t]);
            }
            m.events_duplicate.with_label_values(&[s]);
            for reason in RejectReason::ALL {
                m.events_rejected.with_label_values(&[s, reason.as_str()]);
            }
        }
        for api in PIPELINE_APIS {
            let a = api.name();
            m.upstream_requests.with_label_values(&[a, "0"]);
            m.upstream_duration.with_label_values(&[a]);
            m.batch_items.with_label_values(&[a]);
            m.pending_items.with_label_values(&[a]);
            for result in ItemResult::ALL {
                m.items.with_label_values(&[a, result.as_str()]);
            }
        }
        for reason in DeadLetterReason::ALL {
            m.dead_letters.with_label_values(&[reason.as_str()]);
        }
        for reason in RecordDrop::ALL {
            m.records_dropped.with_label_values(&[reason.as_str()]);
        }
        for result in CallbackResult::ALL {
            m.callback_deliveries.with_label_values(&[result.as_str()]);
        }
        m
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("encoding to a Vec cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }

    pub fn event_received(&self, source: Source, kind: &str) {
        self.events_received
            .with_label_values(&[source.as_str(), kind])
            .inc();
    }

    pub fn event_rejected(&self, source: Source, reason: RejectReason) {
        self.events_rejected
            .with_label_values(&[source.as_str(), reason.as_str()])
            .inc();
    }

    /// One upstream attempt: its outcome label, latency and, for a batch,
    /// its size (reads carry none).
    pub fn upstream_request(&self, api: Api, error_code: &str, seconds: f64, items: Option<usize>) {
        let a = api.name();
        self.upstream_requests
            .with_label_values(&[a, error_code])
            .inc();
        self.upstream_duration
            .with_label_values(&[a])
            .observe(seconds);
        if let Some(n) = items {
            self.batch_items.with_label_values(&[a]).observe(n as f64);
        }
    }

    pub fn items(&self, api: Api, result: ItemResult, n: usize) {
        if n > 0 {
            self.items
                .with_label_values(&[api.name(), result.as_str()])
                .inc_by(n as u64);
        }
    }

    pub fn pending_add(&self, api: Api, delta: i64) {
        self.pending_items
            .with_label_values(&[api.name()])
            .add(delta);
    }

    pub fn set_open_keys(&self, n: usize) {
        self.open_keys.set(n as i64);
    }

    pub fn set_circuit_open(&self, open: bool) {
        self.circuit_open.set(i64::from(open));
    }

    pub fn event_settled(&self, seconds: f64) {
        self.settle_seconds.observe(seconds);
    }

    pub fn dead_lettered(&self, reason: DeadLetterReason, n: usize) {
        self.dead_letters
            .with_label_values(&[reason.as_str()])
            .inc_by(n as u64);
    }

    pub fn event_duplicate(&self, source: Source) {
        self.events_duplicate
            .with_label_values(&[source.as_str()])
            .inc();
    }

    pub fn set_dispatch_active(&self, active: bool) {
        self.dispatch_active.set(i64::from(active));
    }

    pub fn set_broker_connected(&self, up: bool) {
        self.broker_connected.set(i64::from(up));
    }

    /// Only for `[channels] managed` channels: a bounded label set.
    pub fn set_channel_subscribers(&self, channel: &str, n: u64) {
        self.channel_subscribers
            .with_label_values(&[channel])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The journal's storage, as read at scrape time.
    /// `write_errors` is the journal's running count since start.
    pub fn set_journal_storage(&self, write_errors: u64, file_bytes: u64, free_bytes: u64) {
        let seen = self.journal_write_errors.get();
        if write_errors > seen {
            self.journal_write_errors.inc_by(write_errors - seen);
        }
        self.journal_file_bytes
            .set(i64::try_from(file_bytes).unwrap_or(i64::MAX));
        self.journal_free_bytes
            .set(i64::try_from(free_bytes).unwrap_or(i64::MAX));
    }

    pub fn set_journal_events(&self, n: u64) {
        self.journal_events
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn records_written(&self, n: usize) {
        self.records_written.inc_by(n as u64);
    }

    pub fn record_dropped(&self, reason: RecordDrop) {
        self.records_dropped
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    pub fn record_write_error(&self) {
        self.records_write_errors.inc();
    }

    /// The record store's size, as read at scrape time.
    pub fn set_records_storage(&self, file_bytes: u64, records: u64) {
        self.records_file_bytes
            .set(i64::try_from(file_bytes).unwrap_or(i64::MAX));
        self.records_stored
            .set(i64::try_from(records).unwrap_or(i64::MAX));
    }

    pub fn callback_delivery(&self, result: CallbackResult) {
        self.callback_deliveries
            .with_label_values(&[result.as_str()])
            .inc();
    }

    pub fn callbacks_lost(&self, n: u64) {
        self.callbacks_lost.inc_by(n);
    }

    pub fn set_callback_oldest_pending(&self, seconds: u64) {
        self.callback_oldest_pending
            .set(i64::try_from(seconds).unwrap_or(i64::MAX));
    }
}
