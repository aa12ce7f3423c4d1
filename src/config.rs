//! Typed settings: the embedded defaults or a TOML file, then
//! `CHAT_JANITOR__SECTION__KEY` environment overrides, validated once at
//! startup. Any problem becomes one `ConfigError` naming the key.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};

use crate::domain::{ChannelId, WebhookKey};
use crate::rules::{default_rules, Rule, RuleChannels};
use crate::tencent::api::{region_domain, REGIONS};
use crate::tencent::ClientOptions;

/// The shipped `config/default.toml`, used when no file is named and none is
/// found at that path, so the binary runs from anywhere.
pub const EMBEDDED_DEFAULTS: &str = include_str!("../config/default.toml");
const DEFAULT_PATH: &str = "config/default.toml";
const ENV_FILE: &str = "CHAT_JANITOR_CONFIG";
const ENV_PREFIX: &str = "CHAT_JANITOR__";

/// An invalid configuration: which key, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {key}: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, problem: impl fmt::Display) -> Self {
        ConfigError {
            key: key.into(),
            problem: problem.to_string(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    pub server: ServerSettings,
    pub webhook: WebhookSettings,
    pub tencent: TencentSettings,
    #[serde(default)]
    pub amqp: AmqpSettings,
    #[serde(default)]
    pub journal: JournalSettings,
    #[serde(default)]
    pub batching: BatchingSettings,
    #[serde(default)]
    pub channels: ChannelSettings,
    #[serde(default)]
    pub emulator: EmbeddedEmulatorSettings,
    /// Event type -> rule. The contract's defaults are added for any of
    /// `user.banned`, `account.deleted`, `tier.downgraded` not given here.
    #[serde(default)]
    pub rules: BTreeMap<String, Rule>,
    #[serde(default)]
    pub dispatch: DispatchSettings,
    #[serde(default)]
    pub admin: AdminSettings,
    #[serde(default)]
    pub records: RecordSettings,
    #[serde(default)]
    pub callbacks: CallbackSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatchSettings {
    /// Upstream requests in flight at once, all APIs together.
    pub max_in_flight: usize,
    /// Actions held in memory (open batches plus batches being sent); the
    /// journal or the broker holds the rest until there is room.
    pub max_pending_items: usize,
    /// Coalescing keys (channel or From_Account per API) open at once.
    pub max_open_keys: usize,
    /// First retry delay; doubles per attempt, with full jitter.
    pub retry_base_ms: u64,
    /// Largest retry delay.
    pub retry_max_ms: u64,
    /// Attempts for one item whose batch keeps failing per item, or whose
    /// error code no table lists, before it is dead-lettered.
    pub max_attempts: u32,
    /// While the circuit is open (credentials rejected), how often one probe
    /// request is let through.
    pub probe_interval_ms: u64,
    /// Longest a transient failure is retried before dead-lettering
    /// (`retries_exhausted`); keep well inside RabbitMQ's consumer_timeout.
    pub give_up_after_seconds: u64,
}

impl Default for DispatchSettings {
    fn default() -> Self {
        DispatchSettings {
            max_in_flight: 64,
            max_pending_items: 200_000,
            max_open_keys: 20_000,
            retry_base_ms: 100,
            retry_max_ms: 10_000,
            max_attempts: 10,
            probe_interval_ms: 5_000,
            give_up_after_seconds: 900,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    /// Bearer token for `/v1/admin/*` (dead letters). Empty: those routes
    /// answer 404.
    #[serde(deserialize_with = "lenient_secret")]
    pub token: SecretString,
}

impl Default for AdminSettings {
    fn default() -> Self {
        AdminSettings {
            token: SecretString::from(""),
        }
    }
}

/// Each event's record (`GET /v1/events/...`): how long and how much is
/// kept, and who may read it besides the admin token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecordSettings {
    /// Keep records at all. Off: no record is written, the routes answer
    /// 501 and no callback is sent (the clean-up itself is unchanged).
    pub enabled: bool,
    /// How long a record is kept after its event settled.
    #[serde(deserialize_with = "duration")]
    pub retention: Duration,
    /// The records' total size on disk; the oldest go first beyond it.
    pub max_bytes: u64,
    /// A second bearer token that may only read records. Empty: none.
    #[serde(deserialize_with = "lenient_secret")]
    pub read_token: SecretString,
}

impl Default for RecordSettings {
    fn default() -> Self {
        RecordSettings {
            enabled: true,
            retention: Duration::from_secs(7 * 86_400),
            max_bytes: 1 << 30,
            read_token: SecretString::from(""),
        }
    }
}

/// Signed completion callbacks: each record POSTed to the app as a
/// Standard Webhooks message.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallbackSettings {
    /// The app's receiver. Empty: no callbacks.
    pub url: String,
    /// The `whsec_` secret callbacks are signed with (decoded).
    #[serde(deserialize_with = "optional_webhook_key")]
    pub secret: Option<WebhookKey>,
    /// How long a callback is retried before it is dead-lettered
    /// (`callback_expired`), counted from when its event settled.
    #[serde(deserialize_with = "duration")]
    pub max_age: Duration,
    /// Longest wait between two attempts of one callback.
    #[serde(deserialize_with = "duration")]
    pub max_backoff: Duration,
    /// Broker mode: a RabbitMQ exchange (topic) every record is also
    /// published to, routing key `event.settled` or `event.dead_lettered`.
    /// Empty: none.
    pub exchange: String,
}

impl CallbackSettings {
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }
}

impl Default for CallbackSettings {
    fn default() -> Self {
        CallbackSettings {
            url: String::new(),
            secret: None,
            max_age: Duration::from_secs(86_400),
            max_backoff: Duration::from_secs(60),
            exchange: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub body_limit_bytes: usize,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            body_limit_bytes: 262_144,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// Never printed: `SecretString`'s Debug redacts it.
    /// Decoded once, here; `WebhookKey`'s Debug redacts it.
    #[serde(deserialize_with = "webhook_keys")]
    pub secrets: Vec<WebhookKey>,
    #[serde(default = "default_tolerance")]
    pub tolerance_seconds: u64,
}

fn default_tolerance() -> u64 {
    300
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TencentSettings {
    #[serde(default = "default_region")]
    pub region: String,
    #[serde(default)]
    pub base_url: String,
    pub sdkappid: u64,
    #[serde(deserialize_with = "lenient_secret")]
    pub secret_key: SecretString,
    #[serde(default = "default_admin")]
    pub admin_identifier: String,
    #[serde(default = "default_rps")]
    pub requests_per_second: u32,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
}

fn default_region() -> String {
    "singapore".into()
}
fn default_admin() -> String {
    "administrator".into()
}
fn default_rps() -> u32 {
    200
}
fn default_timeout() -> u64 {
    5000
}

impl TencentSettings {
    /// What the Tencent client needs of this section.
    pub fn client_options(&self) -> ClientOptions {
        ClientOptions {
            base_url: self.endpoint(),
            sdkappid: self.sdkappid,
            secret_key: self.secret_key.clone(),
            admin_identifier: self.admin_identifier.clone(),
            timeout: std::time::Duration::from_millis(self.timeout_ms),
        }
    }

    /// The URL prefix calls go to: `base_url` if set, else the region's domain.
    pub fn endpoint(&self) -> String {
        if self.base_url.is_empty() {
            format!(
                "https://{}",
                region_domain(&self.region).unwrap_or("adminapisgp.im.qcloud.com")
            )
        } else {
            self.base_url.trim_end_matches('/').to_owned()
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpSettings {
    /// May carry a password, so it is a secret too.
    #[serde(deserialize_with = "lenient_secret")]
    pub url: SecretString,
    pub queue: String,
    pub prefetch: u16,
    /// AMQP heartbeat proposed to the broker: a replica that stops
    /// answering (paused, cut off) loses its connections, and with them the
    /// dispatch lease, within about two intervals.
    pub heartbeat_seconds: u16,
}

impl Default for AmqpSettings {
    fn default() -> Self {
        AmqpSettings {
            url: SecretString::from(""),
            queue: "chat-janitor.events".into(),
            prefetch: 2000,
            heartbeat_seconds: 10,
        }
    }
}

impl AmqpSettings {
    pub fn enabled(&self) -> bool {
        !self.url.expose_secret().is_empty()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalSettings {
    pub path: PathBuf,
    /// Test hook: storage faults injected under the journal file. Never
    /// read from configuration.
    #[doc(hidden)]
    #[serde(skip)]
    pub faults: Option<crate::storage_faults::StorageFaults>,
    /// Test hook: smaller journal files, so rotation and deletion happen
    /// within a test. Never read from configuration.
    #[doc(hidden)]
    #[serde(skip)]
    pub tuning: JournalTuning,
}

/// How big the journal lets its files grow before it moves on. Production
/// uses the defaults; tests shrink them so rotation, deletion, flushes and
/// merges happen within a few hundred events.
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub struct JournalTuning {
    /// A segment takes no new group once it is this big.
    pub segment_bytes: u64,
    /// Ids the dedupe memtable holds before it is written out as a run
    /// (about 2.2 MiB of memory, 0.5 MiB on disk, at the default).
    pub flush_ids_at: usize,
}

impl Default for JournalTuning {
    fn default() -> Self {
        JournalTuning {
            segment_bytes: 16 << 20,
            flush_ids_at: 32_768,
        }
    }
}

impl Default for JournalSettings {
    fn default() -> Self {
        JournalSettings {
            path: PathBuf::from("data"),
            faults: None,
            tuning: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchingSettings {
    pub linger_ms: u64,
    /// Caps accounts per call below the vendor's limits (100 / 20).
    pub max_batch_items: usize,
}

impl Default for BatchingSettings {
    fn default() -> Self {
        BatchingSettings {
            linger_ms: 200,
            max_batch_items: 100,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChannelSettings {
    #[serde(deserialize_with = "channel_list")]
    pub managed: Vec<ChannelId>,
    /// Tier names, lowest first (for `tier.downgraded`).
    #[serde(deserialize_with = "string_list")]
    pub tiers: Vec<String>,
    /// Managed channel -> the tier it requires.
    pub required_tier: BTreeMap<ChannelId, String>,
    /// How often (seconds) to read each managed channel's subscriber count
    /// for `chat_janitor_managed_channel_subscribers`; 0 turns it off.
    pub count_interval_seconds: u64,
}

impl ChannelSettings {
    /// What the rules need of this section.
    pub fn rule_channels(&self) -> RuleChannels {
        RuleChannels {
            managed: self.managed.clone(),
            tiers: self.tiers.clone(),
            required_tier: self.required_tier.clone(),
        }
    }
}

impl Default for ChannelSettings {
    fn default() -> Self {
        ChannelSettings {
            managed: Vec::new(),
            tiers: Vec::new(),
            required_tier: BTreeMap::new(),
            count_interval_seconds: 60,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedEmulatorSettings {
    /// Off unless a file says so: only the shipped demo defaults turn it on.
    pub embedded: bool,
    pub listen: SocketAddr,
    /// What the embedded emulator's paging cursors mean.
    pub cursor: crate::emulator::CursorMode,
}

impl Default for EmbeddedEmulatorSettings {
    fn default() -> Self {
        EmbeddedEmulatorSettings {
            embedded: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            cursor: crate::emulator::CursorMode::default(),
        }
    }
}

/// Accepts a TOML list, or a comma-separated string (how lists arrive from
/// the environment).
fn string_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        Many(Vec<String>),
        One(String),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::Many(v) => v,
        OneOrMany::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

/// A list whose items parse into `T`; a bad item is named by its index
/// (`figment_error` moves the index into the key).
fn parsed_list<'de, D, T, E>(d: D, parse: impl Fn(&str) -> Result<T, E>) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    E: fmt::Display,
{
    string_list(d)?
        .iter()
        .enumerate()
        .map(|(i, s)| {
            parse(s).map_err(|e| serde::de::Error::custom(format!("{INDEX_MARK}{i}]: {e}")))
        })
        .collect()
}

/// How `parsed_list` marks an item's index in an error.
const INDEX_MARK: &str = "item [";

fn webhook_keys<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<WebhookKey>, D::Error> {
    parsed_list(d, WebhookKey::decode)
}

/// An empty string, or a `whsec_` secret decoded (its problem, never its
/// value, in the error).
fn optional_webhook_key<'de, D: Deserializer<'de>>(d: D) -> Result<Option<WebhookKey>, D::Error> {
    let s = lenient_secret(d)?;
    let s = s.expose_secret().trim();
    if s.is_empty() {
        return Ok(None);
    }
    WebhookKey::decode(s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// A duration written for people: "7d", "24h", "90s", "1h 30m".
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(s.trim()).map_err(|e| {
        serde::de::Error::custom(format!(
            "must be a duration such as \"7d\", \"24h\" or \"90s\" ({e})"
        ))
    })
}

fn channel_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ChannelId>, D::Error> {
    parsed_list(d, |s| ChannelId::parse(s))
}

/// A string that the environment provider may have parsed as a number.
fn lenient_secret<'de, D: Deserializer<'de>>(d: D) -> Result<SecretString, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Lenient {
        S(String),
        I(i64),
        U(u64),
        F(f64),
    }
    Ok(SecretString::from(match Lenient::deserialize(d)? {
        Lenient::S(s) => s,
        Lenient::I(i) => i.to_string(),
        Lenient::U(u) => u.to_string(),
        Lenient::F(f) => f.to_string(),
    }))
}

/// Where the settings came from, for the startup log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Embedded,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Embedded => f.write_str("embedded defaults"),
        }
    }
}

/// Loads settings from `--config`, else `$CHAT_JANITOR_CONFIG`, else
/// `config/default.toml`, else the embedded copy of it; then the environment.
pub fn load(explicit: Option<&Path>) -> Result<(Settings, Source), ConfigError> {
    let env_file = std::env::var_os(ENV_FILE).map(PathBuf::from);
    let source = match (explicit, env_file) {
        (Some(p), _) => Source::File(p.to_owned()),
        (None, Some(p)) => Source::File(p),
        (None, None) if Path::new(DEFAULT_PATH).is_file() => Source::File(DEFAULT_PATH.into()),
        (None, None) => Source::Embedded,
    };
    let figment = match &source {
        Source::File(p) => {
            if !p.is_file() {
                return Err(ConfigError::new(
                    "--config",
                    format!("{} is not a readable file", p.display()),
                ));
            }
            Figment::from(Toml::file_exact(p))
        }
        Source::Embedded => Figment::from(Toml::string(EMBEDDED_DEFAULTS)),
    };
    let settings = from_figment(figment.merge(Env::prefixed(ENV_PREFIX).split("__")))?;
    Ok((settings, source))
}

/// Parses settings from a TOML string with no environment (tests, tools).
pub fn from_toml(toml: &str) -> Result<Settings, ConfigError> {
    from_figment(Figment::from(Toml::string(toml)))
}

fn from_figment(figment: Figment) -> Result<Settings, ConfigError> {
    let mut settings: Settings = figment.extract().map_err(figment_error)?;
    for (kind, rule) in default_rules() {
        settings.rules.entry(kind).or_insert(rule);
    }
    settings.validate()?;
    Ok(settings)
}

fn figment_error(e: figment::Error) -> ConfigError {
    use figment::error::Kind;
    let mut path = e.path.clone();
    let problem = match &e.kind {
        Kind::MissingField(f) => {
            path.push(f.to_string());
            "is required but missing".to_owned()
        }
        Kind::UnknownField(f, _) => {
            if path.last() != Some(f) {
                path.push(f.clone());
            }
            "is not a known key".to_owned()
        }
        Kind::Message(m) if m.starts_with(INDEX_MARK) => {
            let rest = &m[INDEX_MARK.len()..];
            let (index, problem) = rest.split_once("]: ").unwrap_or(("?", rest));
            if let Some(last) = path.last_mut() {
                last.push_str(&format!("[{index}]"));
            }
            problem.to_owned()
        }
        other => other.to_string(),
    };
    let key = if path.is_empty() {
        "(file)".to_owned()
    } else {
        path.join(".")
    };
    ConfigError::new(key, problem)
}

impl Settings {
    /// Checks what the types alone do not.
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, problem: &str| Err(ConfigError::new(key, problem));
        if !(1024..=64 * 1024 * 1024).contains(&self.server.body_limit_bytes) {
            return bad(
                "server.body_limit_bytes",
                "must be between 1024 and 67108864",
            );
        }
        if self.webhook.secrets.is_empty() {
            return bad("webhook.secrets", "at least one secret is required");
        }
        if !(1..=86_400).contains(&self.webhook.tolerance_seconds) {
            return bad("webhook.tolerance_seconds", "must be between 1 and 86400");
        }
        let t = &self.tencent;
        if region_domain(&t.region).is_none() {
            return Err(ConfigError::new(
                "tencent.region",
                format!("must be one of {}", REGIONS.join(", ")),
            ));
        }
        if !t.base_url.is_empty() {
            match reqwest::Url::parse(&t.base_url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => return bad("tencent.base_url", "must be empty or an http(s) URL"),
            }
        }
        if t.sdkappid == 0 || t.sdkappid > u64::from(u32::MAX) {
            return bad("tencent.sdkappid", "must be a positive 32-bit SDKAppID");
        }
        if t.secret_key.expose_secret().trim().is_empty() {
            return bad("tencent.secret_key", "must not be empty");
        }
        if t.admin_identifier.trim().is_empty() {
            return bad("tencent.admin_identifier", "must not be empty");
        }
        if !(1..=10_000).contains(&t.requests_per_second) {
            return bad("tencent.requests_per_second", "must be between 1 and 10000");
        }
        if !(3_001..=60_000).contains(&t.timeout_ms) {
            return bad(
                "tencent.timeout_ms",
                "must be between 3001 and 60000 (above the vendor's own 3 s timeout)",
            );
        }
        let url = self.amqp.url.expose_secret();
        if !(url.is_empty() || url.starts_with("amqp://") || url.starts_with("amqps://")) {
            return bad("amqp.url", "must be empty or an amqp:// or amqps:// URL");
        }
        if self.amqp.queue.trim().is_empty() {
            return bad("amqp.queue", "must not be empty");
        }
        if self.amqp.prefetch == 0 {
            return bad("amqp.prefetch", "must be at least 1");
        }
        if !(1..=300).contains(&self.amqp.heartbeat_seconds) {
            return bad("amqp.heartbeat_seconds", "must be between 1 and 300");
        }
        if self.journal.path.as_os_str().is_empty() {
            return bad("journal.path", "must not be empty");
        }
        if self.batching.linger_ms > 60_000 {
            return bad("batching.linger_ms", "must be at most 60000");
        }
        if !(1..=100).contains(&self.batching.max_batch_items) {
            return bad("batching.max_batch_items", "must be between 1 and 100");
        }

        let r = &self.records;
        if !(Duration::from_secs(1)..=Duration::from_secs(3650 * 86_400)).contains(&r.retention) {
            return bad("records.retention", "must be between 1s and 3650d");
        }
        if r.max_bytes < 1 << 20 {
            return bad("records.max_bytes", "must be at least 1048576 (1 MiB)");
        }
        let c = &self.callbacks;
        if c.enabled() && !r.enabled {
            return bad(
                "callbacks.url",
                "callbacks carry the records: leave it empty when records.enabled is false",
            );
        }
        if c.enabled() {
            match reqwest::Url::parse(&c.url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => return bad("callbacks.url", "must be empty or an http(s) URL"),
            }
            if c.secret.is_none() {
                return bad(
                    "callbacks.secret",
                    "a whsec_ secret is required when callbacks.url is set",
                );
            }
            if !(Duration::from_secs(1)..=r.retention).contains(&c.max_age) {
                return bad(
                    "callbacks.max_age",
                    "must be at least 1s and at most records.retention (a record must outlive its callback)",
                );
            }
            if !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&c.max_backoff) {
                return bad("callbacks.max_backoff", "must be between 100ms and 1h");
            }
        }

        if !c.exchange.is_empty() {
            if !self.amqp.enabled() {
                return bad(
                    "callbacks.exchange",
                    "needs broker mode: set amqp.url, or leave it empty",
                );
            }
            if !r.enabled {
                return bad(
                    "callbacks.exchange",
                    "carries the records: leave it empty when records.enabled is false",
                );
            }
            let name_ok = c.exchange.len() <= 255
                && !c.exchange.starts_with("amq.")
                && c.exchange
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
            if !name_ok {
                return bad(
                    "callbacks.exchange",
                    "must be an exchange name of at most 255 letters, digits, '-', '_', '.' or ':', not starting with amq.",
                );
            }
        }

        for (c, tier) in &self.channels.required_tier {
            let key = format!("channels.required_tier.\"{c}\"");
            if !self.channels.managed.contains(c) {
                return Err(ConfigError::new(key, "is not in channels.managed"));
            }
            if !self.channels.tiers.contains(tier) {
                return Err(ConfigError::new(key, "names a tier not in channels.tiers"));
            }
        }
        for kind in self.rules.keys() {
            if kind.trim().is_empty() || kind.len() > 128 {
                return Err(ConfigError::new(
                    format!("rules.\"{kind}\""),
                    "an event type must be 1 to 128 characters",
                ));
            }
        }
        let d = &self.dispatch;
        for (key, value, lo, hi) in [
            ("dispatch.max_in_flight", d.max_in_flight as u64, 1, 10_000),
            (
                "dispatch.max_pending_items",
                d.max_pending_items as u64,
                100,
                10_000_000,
            ),
            (
                "dispatch.max_open_keys",
                d.max_open_keys as u64,
                1,
                1_000_000,
            ),
            ("dispatch.retry_base_ms", d.retry_base_ms, 1, 60_000),
            (
                "dispatch.retry_max_ms",
                d.retry_max_ms,
                d.retry_base_ms,
                600_000,
            ),
            ("dispatch.max_attempts", u64::from(d.max_attempts), 1, 1_000),
            (
                "dispatch.probe_interval_ms",
                d.probe_interval_ms,
                10,
                3_600_000,
            ),
            (
                "dispatch.give_up_after_seconds",
                d.give_up_after_seconds,
                1,
                86_400,
            ),
        ] {
            if !(lo..=hi).contains(&value) {
                return Err(ConfigError::new(
                    key,
                    format!("must be between {lo} and {hi}"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults_are_valid() {
        let s = from_toml(EMBEDDED_DEFAULTS).unwrap();
        assert_eq!(s.server.listen.port(), 8080);
        assert_eq!(s.tencent.requests_per_second, 200);
        assert!(s.emulator.embedded);
        assert!(!s.amqp.enabled());
    }

    #[test]
    fn secrets_do_not_print() {
        let s = from_toml(EMBEDDED_DEFAULTS).unwrap();
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("chat-janitor-emulator-key"), "{dbg}");
        assert!(!dbg.contains("whsec_"), "{dbg}");
    }

    #[test]
    fn errors_name_the_key() {
        let e = from_toml(&EMBEDDED_DEFAULTS.replace("sdkappid = 1400000000", "sdkappid = \"x\""))
            .unwrap_err();
        assert_eq!(e.key, "tencent.sdkappid");
        let e = from_toml(&EMBEDDED_DEFAULTS.replace("timeout_ms = 5000", "timeout_ms = 100"))
            .unwrap_err();
        assert_eq!(e.key, "tencent.timeout_ms");
        let e = from_toml(&EMBEDDED_DEFAULTS.replace("region = \"singapore\"", "region = \"x\""))
            .unwrap_err();
        assert_eq!(e.key, "tencent.region");
        let e = from_toml(&EMBEDDED_DEFAULTS.replace("managed = []", "managed = [\"news\"]"))
            .unwrap_err();
        assert_eq!(e.key, "channels.managed[0]");
        let e = from_toml(&EMBEDDED_DEFAULTS.replace("whsec_Y2", "whsec_!!")).unwrap_err();
        assert_eq!(e.key, "webhook.secrets[0]");
        let e = from_toml(
            &EMBEDDED_DEFAULTS.replace("path = \"data\"", "path = \"data\"\nflavour = 1"),
        )
        .unwrap_err();
        assert_eq!(e.key, "journal.flavour", "{e}");
        let e = from_toml("[webhook]\nsecrets=[]\n").unwrap_err();
        assert_eq!(e.key, "tencent", "{e}");
    }

    #[test]
    fn records_and_callbacks_are_validated_naming_the_key() {
        let s = from_toml(EMBEDDED_DEFAULTS).unwrap();
        assert_eq!(s.records.retention, Duration::from_secs(7 * 86_400));
        assert_eq!(s.records.max_bytes, 1 << 30);
        assert!(!s.callbacks.enabled());
        assert_eq!(s.callbacks.max_age, Duration::from_secs(86_400));
        let with = |extra: &str| {
            from_toml(&format!(
                "[webhook]\nsecrets = [\"whsec_Y2hhdC1qYW5pdG9yLWRlbW8tc2VjcmV0LWtleQ==\"]\n\
                 [tencent]\nsdkappid = 1400000001\nsecret_key = \"k\"\n{extra}"
            ))
        };
        let on = "url = \"http://127.0.0.1:9/hook\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"";
        let s = with(&format!("[callbacks]\n{on}\nmax_age = \"2h\"")).unwrap();
        assert!(s.callbacks.enabled() && s.callbacks.secret.is_some());
        assert_eq!(s.callbacks.max_age, Duration::from_secs(7200));
        let e = with("[callbacks]\nurl = \"http://x/hook\"").unwrap_err();
        assert_eq!(e.key, "callbacks.secret");
        let e = with("[callbacks]\nurl = \"http://x/hook\"\nsecret = \"whsec_!!\"").unwrap_err();
        assert_eq!(e.key, "callbacks.secret");
        assert!(!e.to_string().contains("!!"), "{e}");
        let e = with("[callbacks]\nurl = \"ftp://x\"").unwrap_err();
        assert_eq!(e.key, "callbacks.url");
        let e = with(&format!("[callbacks]\n{on}\nmax_age = \"8d\"")).unwrap_err();
        assert_eq!(e.key, "callbacks.max_age");
        // Off, callbacks.max_age does not bind a short retention.
        let s = with("[records]\nretention = \"12h\"").unwrap();
        assert_eq!(s.records.retention, Duration::from_secs(12 * 3600));
        let e = with(&format!(
            "[records]\nretention = \"12h\"\n[callbacks]\n{on}"
        ))
        .unwrap_err();
        assert_eq!(e.key, "callbacks.max_age");
        let e = with("[records]\nretention = \"a week\"").unwrap_err();
        assert_eq!(e.key, "records.retention");
        let e = with("[records]\nmax_bytes = 1000").unwrap_err();
        assert_eq!(e.key, "records.max_bytes");
        assert!(s.records.enabled);
        let s = with("[records]\nenabled = false").unwrap();
        assert!(!s.records.enabled);
        let e = with(&format!("[records]\nenabled = false\n[callbacks]\n{on}")).unwrap_err();
        assert_eq!(e.key, "callbacks.url");
        let broker = "[amqp]\nurl = \"amqp://127.0.0.1\"\n";
        // Broker mode sends them too (through the callback queue), beside
        // an exchange or without one.
        let s = with(&format!(
            "{broker}[callbacks]\n{on}\nexchange = \"cj.fate\""
        ))
        .unwrap();
        assert!(s.callbacks.enabled() && s.callbacks.exchange == "cj.fate");
        let s = with(&format!("{broker}[callbacks]\nexchange = \"cj.fate\"")).unwrap();
        assert_eq!(s.callbacks.exchange, "cj.fate");
        let e = with("[callbacks]\nexchange = \"cj.fate\"").unwrap_err();
        assert_eq!(e.key, "callbacks.exchange", "refused in embedded mode: {e}");
        let e = with(&format!("{broker}[callbacks]\nexchange = \"amq.topic\"")).unwrap_err();
        assert_eq!(e.key, "callbacks.exchange");
        let e = with(&format!("{broker}[callbacks]\nexchange = \"a b\"")).unwrap_err();
        assert_eq!(e.key, "callbacks.exchange");
        let e = with(&format!(
            "{broker}[records]\nenabled = false\n[callbacks]\nexchange = \"x\""
        ))
        .unwrap_err();
        assert_eq!(e.key, "callbacks.exchange");
    }

    #[test]
    fn missing_keys_are_named() {
        let toml = EMBEDDED_DEFAULTS.replace("secret_key = \"chat-janitor-emulator-key\"", "");
        let e = from_toml(&toml).unwrap_err();
        assert_eq!(e.key, "tencent.secret_key");
        assert!(e.to_string().contains("missing"));
    }

    #[test]
    fn a_production_file_does_not_inherit_the_demo_emulator() {
        let s = from_toml(
            "[webhook]\nsecrets = [\"whsec_Y2hhdC1qYW5pdG9yLWRlbW8tc2VjcmV0LWtleQ==\"]\n\
             [tencent]\nsdkappid = 1400000001\nsecret_key = \"k\"\n",
        )
        .unwrap();
        assert!(!s.emulator.embedded);
        assert_eq!(s.tencent.endpoint(), "https://adminapisgp.im.qcloud.com");
        assert_eq!(s.batching.linger_ms, 200);
    }
}
