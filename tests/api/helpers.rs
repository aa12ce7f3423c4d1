//! Shared test plumbing: an emulator on port 0 and a client pointed at it.

use std::time::Duration;

use chat_janitor::domain::{ChannelId, UserId, WebhookKey};
use chat_janitor::emulator::{Emulator, EmulatorConfig, RunningEmulator};
use chat_janitor::tencent::{ClientOptions, TencentClient};
use secrecy::SecretString;

pub const SDKAPPID: u64 = 1_400_000_000;
pub const KEY: &str = "test-secret-key-0123456789abcdef";
pub const ADMIN: &str = "administrator";

pub struct TestUpstream {
    pub emulator: Emulator,
    pub running: RunningEmulator,
}

impl TestUpstream {
    pub async fn start() -> Self {
        Self::start_with(EmulatorConfig {
            sdkappid: SDKAPPID,
            secret_key: KEY.into(),
            admins: vec![ADMIN.into()],
            ..EmulatorConfig::default()
        })
        .await
    }

    pub async fn start_with(config: EmulatorConfig) -> Self {
        let emulator = Emulator::new(config);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
        let running = emulator.serve(listener).await.expect("emulator starts");
        TestUpstream { emulator, running }
    }

    pub fn client(&self) -> TencentClient {
        self.client_with_key(KEY)
    }

    pub fn client_with_key(&self, key: &str) -> TencentClient {
        TencentClient::new(ClientOptions {
            base_url: self.running.base_url(),
            sdkappid: SDKAPPID,
            secret_key: SecretString::from(key.to_owned()),
            admin_identifier: ADMIN.into(),
            timeout: Duration::from_secs(5),
        })
        .expect("client builds")
    }
}

pub fn uid(s: impl AsRef<str>) -> UserId {
    UserId::parse(s).expect("valid user id")
}

pub fn chan(s: &str) -> ChannelId {
    ChannelId::parse(s).expect("valid channel id")
}

pub fn users(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

// ---- the app on port 0

use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chat_janitor::app::Application;
use chat_janitor::config::{self, Settings};
use chat_janitor::ingest::signature;
use tempfile::TempDir;

/// The webhook secret test apps accept (plus `ROTATED_SECRET`).
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
pub const ROTATED_SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// Settings for a test app: port 0, the given upstream, a journal in `dir`,
/// fast retries.
pub fn test_settings(upstream_url: &str, dir: &Path) -> Settings {
    let mut s = config::from_toml(config::EMBEDDED_DEFAULTS).expect("defaults are valid");
    s.server.listen = "127.0.0.1:0".parse().unwrap();
    s.emulator.embedded = false;
    s.tencent.base_url = upstream_url.to_owned();
    s.tencent.secret_key = SecretString::from(KEY.to_owned());
    s.tencent.admin_identifier = ADMIN.into();
    s.webhook.secrets = vec![
        WebhookKey::decode(SECRET).expect("valid secret"),
        WebhookKey::decode(ROTATED_SECRET).expect("valid secret"),
    ];
    s.journal.path = dir.to_owned();
    s.dispatch.retry_base_ms = 5;
    s.dispatch.retry_max_ms = 100;
    s.dispatch.probe_interval_ms = 50;
    s.admin.token = SecretString::from(ADMIN_TOKEN.to_owned());
    s
}

pub struct TestApp {
    pub port: u16,
    pub http: reqwest::Client,
    /// The journal, in embedded mode.
    pub journal: Option<chat_janitor::inbox::journal::Journal>,
    /// The event record store, in embedded mode.
    pub fate: Option<std::sync::Arc<dyn chat_janitor::fate::FateStore>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

pub fn webhook_key(secret: &str) -> Vec<u8> {
    STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .expect("test secrets are base64")
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

impl TestApp {
    pub async fn spawn(settings: Settings) -> TestApp {
        if std::env::var_os("TEST_LOG").is_some() {
            chat_janitor::telemetry::init_tracing();
        }
        let app = Application::build(settings).await.expect("app builds");
        let port = app.port();
        let journal = app.journal();
        let fate = app.fate();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until_stopped(async move {
            let _ = rx.await;
        }));
        TestApp {
            port,
            http: reqwest::Client::new(),
            journal,
            fate,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Posts `body` signed with `secret` at `ts`, under `id`.
    pub async fn post_signed(
        &self,
        id: &str,
        ts: i64,
        secret: &str,
        body: &str,
    ) -> reqwest::Response {
        let ts = ts.to_string();
        let sig = signature::sign(&webhook_key(secret), id, &ts, body.as_bytes());
        self.http
            .post(self.url("/v1/events"))
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", ts)
            .header("webhook-signature", sig)
            .body(body.to_owned())
            .send()
            .await
            .expect("request sent")
    }

    /// Posts an event of `kind` with `data`, signed now with `SECRET`.
    pub async fn post_event(
        &self,
        id: &str,
        kind: &str,
        data: serde_json::Value,
    ) -> reqwest::Response {
        let body =
            serde_json::json!({"type": kind, "timestamp": "2026-11-21T10:00:00Z", "data": data});
        self.post_signed(id, unix_now(), SECRET, &body.to_string())
            .await
    }

    /// `GET /readyz`: its status and body.
    pub async fn readyz(&self) -> (u16, String) {
        let r = self.http.get(self.url("/readyz")).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// Waits until `/readyz` answers 200 (broker mode connects first).
    pub async fn wait_ready(&self) {
        eventually(10, "ready", || async { self.readyz().await.0 == 200 }).await;
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of one sample line of `/metrics`, e.g.
    /// `chat_janitor_dead_letters_total{reason="bad_request"}`.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no series {series}"))
    }

    pub async fn dead_letters(&self) -> Vec<serde_json::Value> {
        let v: serde_json::Value = self
            .http
            .get(self.url("/v1/admin/dead-letters"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["dead_letters"].as_array().cloned().unwrap_or_default()
    }

    /// Graceful stop (as on SIGTERM).
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("app task").expect("app stops cleanly");
        }
    }
}

/// Polls `check` every 20 ms until it holds or `secs` pass.
pub async fn eventually<F, Fut>(secs: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

pub fn temp_dir() -> TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// Tests that use the shared RabbitMQ take it for reading; the one test
/// that restarts the broker takes it for writing, so no other broker test
/// runs while the broker is away.
pub static BROKER: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// The test broker (guest/guest on the default vhost).
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Ready messages in `queue` (unacked ones of closed consumers are ready
/// again, so 0 after every consumer stopped means nothing was left unacked).
pub async fn message_count(queue: &str) -> u32 {
    use lapin::options::QueueDeclareOptions;
    let conn = lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default())
        .await
        .expect("the broker at 127.0.0.1:5672 is running");
    let ch = conn.create_channel().await.unwrap();
    let n = ch
        .queue_declare(
            lapin::types::ShortString::from(queue),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count();
    let _ = conn
        .close(200, lapin::types::ShortString::from("bye"))
        .await;
    n
}

/// Deletes everything the service declares for `queue`: the work queue,
/// `.dead`, `.leader`, `.dead-log`, `.sweeps`, `.records`, `.callbacks` and the `.dlx`
/// exchange.
pub async fn delete_queues(queue: &str) {
    let Ok(conn) =
        lapin::Connection::connect(AMQP_URL, lapin::ConnectionProperties::default()).await
    else {
        return;
    };
    for q in [
        queue.to_owned(),
        format!("{queue}.dead"),
        format!("{queue}.leader"),
        format!("{queue}.dead-log"),
        format!("{queue}.sweeps"),
        format!("{queue}.records"),
        format!("{queue}.callbacks"),
    ] {
        // A failed command closes the channel: one channel each.
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .queue_delete(
                    lapin::types::ShortString::from(q.as_str()),
                    lapin::options::QueueDeleteOptions::default(),
                )
                .await;
        }
    }
    if let Ok(ch) = conn.create_channel().await {
        let _ = ch
            .exchange_delete(
                lapin::types::ShortString::from(format!("{queue}.dlx").as_str()),
                Default::default(),
            )
            .await;
    }
    let _ = conn
        .close(200, lapin::types::ShortString::from("bye"))
        .await;
}
