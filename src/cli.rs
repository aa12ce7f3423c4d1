//! The command line: `serve`, `emulator`, `send`, `usersig`, `sweep`,
//! `status`. Each command returns an exit code: 0 ok, 2 bad arguments or
//! configuration, 1 otherwise.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, ConfigError};
use crate::domain::clock::{rfc3339, unix_now};
use crate::domain::WebhookKey;
use crate::emulator::{self, CursorMode, EmulatorConfig};
use crate::ingest::signature;
use crate::tencent::usersig;

/// The demo secret of `config/default.toml`, so `send` works against a
/// default `serve` with no flags.
pub const DEMO_WEBHOOK_SECRET: &str = "whsec_Y2hhdC1qYW5pdG9yLWRlbW8tc2VjcmV0LWtleQ==";

#[derive(Debug, Parser)]
#[command(
    name = "chat-janitor",
    version,
    about = "Turns user-lifecycle events into coalesced clean-up calls on Tencent Cloud Chat"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the processor (the default with no subcommand).
    Serve {
        /// TOML file; else $CHAT_JANITOR_CONFIG, else config/default.toml.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run a stateful emulator of the Tencent Cloud Chat REST endpoints.
    Emulator {
        /// Address to listen on (port 0: any free port, printed at start).
        #[arg(long, default_value = "127.0.0.1:9700")]
        listen: SocketAddr,
        /// The SDKAppID it answers for (70014 for any other).
        #[arg(long, default_value_t = 1_400_000_000)]
        sdkappid: u64,
        /// The secret key UserSigs are verified with.
        #[arg(
            long,
            default_value = "chat-janitor-emulator-key",
            env = "EMULATOR_SECRET_KEY",
            hide_env_values = true
        )]
        secret_key: String,
        /// App admin identifiers (repeat for several).
        #[arg(long = "admin", default_value = "administrator")]
        admins: Vec<String>,
        /// Calls per second allowed per API before 60007.
        #[arg(long, default_value_t = 200)]
        rate: u32,
        /// What paging cursors (`Next`, `StartCursor`) mean: `offset` (a
        /// position in the current list; removals between pages shift
        /// members past it), `key` (the last account listed, lists in
        /// account order) or `stable` (a position that stays right under
        /// removals). A seed may change it later.
        #[arg(long, default_value = "offset", value_parser = parse_cursor_mode)]
        cursor: CursorMode,
    },
    /// Sign one event (Standard Webhooks) and post it; print the response.
    Send {
        /// Event type, e.g. user.banned.
        #[arg(value_name = "TYPE")]
        event_type: String,
        /// The event's data.user_id.
        #[arg(long)]
        user: String,
        /// Channels to leave (repeat).
        #[arg(long = "channel")]
        channels: Vec<String>,
        /// Accounts the user follows (repeat).
        #[arg(long = "following")]
        following: Vec<String>,
        /// Accounts following the user (repeat).
        #[arg(long = "follower")]
        followers: Vec<String>,
        /// Channels the user owns (repeat).
        #[arg(long = "owned-channel")]
        owned_channels: Vec<String>,
        /// The user's tier now (data.tier, for tier.* events).
        #[arg(long)]
        tier: Option<String>,
        /// Where to post the event.
        #[arg(long, default_value = "http://127.0.0.1:8080/v1/events")]
        url: String,
        /// Standard Webhooks secret to sign with (`whsec_...`); default: the
        /// demo secret of config/default.toml.
        #[arg(long, default_value = DEMO_WEBHOOK_SECRET, env = "CHAT_JANITOR_SEND_SECRET", hide_env_values = true)]
        secret: String,
        /// webhook-id (default: a fresh random one).
        #[arg(long)]
        id: Option<String>,
    },
    /// Remove every subscriber of a channel who is on a deny list, through a
    /// running service (admin route), and report what was found and removed.
    Sweep {
        /// The channel to sweep (`@TOA#_...`).
        #[arg(long)]
        channel: String,
        /// File of user ids, one per line (`#` comments and blank lines
        /// ignored). Without it the sweep only counts.
        #[arg(long)]
        deny: Option<PathBuf>,
        /// Find, but remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// The running service.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// The service's [admin] token.
        #[arg(long, env = "CHAT_JANITOR__ADMIN__TOKEN", hide_env_values = true)]
        token: String,
        /// Print the final report as one JSON object on stdout, and progress
        /// as JSON lines on stderr.
        #[arg(long)]
        json: bool,
    },
    /// Print what became of one event (its record, from a running service):
    /// each action's api, target, accounts, result, call time and the
    /// vendor's code.
    Status {
        /// The event's webhook-id (or AMQP message_id).
        #[arg(value_name = "ID")]
        id: String,
        /// The running service.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// The service's [admin] token, or its [records] read_token.
        #[arg(long, env = "CHAT_JANITOR__ADMIN__TOKEN", hide_env_values = true)]
        token: String,
        /// Print the record as the service answers it (JSON) instead.
        #[arg(long)]
        json: bool,
    },
    /// Print a UserSig (version 2).
    Usersig {
        /// The application's SDKAppID.
        #[arg(long)]
        sdkappid: u64,
        /// The application's secret key.
        #[arg(long)]
        secret_key: String,
        /// The account the UserSig is for (the app admin, for REST calls).
        #[arg(long)]
        identifier: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 86_400 * 180)]
        expire: u64,
    },
}

fn parse_cursor_mode(s: &str) -> Result<CursorMode, String> {
    s.parse()
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    let command = cli.command.unwrap_or(Command::Serve { config: None });
    match command {
        Command::Usersig {
            sdkappid,
            secret_key,
            identifier,
            expire,
        } => {
            println!(
                "{}",
                usersig::generate(&secret_key, sdkappid, &identifier, unix_now(), expire)
            );
            ExitCode::SUCCESS
        }
        Command::Emulator {
            listen,
            sdkappid,
            secret_key,
            admins,
            rate,
            cursor,
        } => {
            if rate == 0 {
                return usage_error("--rate: must be at least 1");
            }
            crate::telemetry::init_tracing();
            let config = EmulatorConfig {
                sdkappid,
                secret_key,
                admins,
                rate_per_api: rate,
                cursor,
                ..EmulatorConfig::default()
            };
            block_on(emulator::run(config, listen))
        }
        Command::Send {
            event_type,
            user,
            channels,
            following,
            followers,
            owned_channels,
            tier,
            url,
            secret,
            id,
        } => {
            let key = match WebhookKey::decode(&secret) {
                Ok(k) => k,
                Err(problem) => return usage_error(&format!("--secret: {problem}")),
            };
            let mut data = serde_json::Map::new();
            data.insert("user_id".into(), user.into());
            for (name, list) in [
                ("channels", channels),
                ("following", following),
                ("followers", followers),
                ("owned_channels", owned_channels),
            ] {
                if !list.is_empty() {
                    data.insert(name.into(), list.into());
                }
            }
            if let Some(t) = tier {
                data.insert("tier".into(), t.into());
            }
            let body = serde_json::json!({
                "type": event_type,
                "timestamp": rfc3339(unix_now()),
                "data": data,
            })
            .to_string();
            let id = id.unwrap_or_else(|| format!("msg_{:032x}", rand::random::<u128>()));
            block_on(send(url, key, id, body))
        }
        Command::Sweep {
            channel,
            deny,
            dry_run,
            url,
            token,
            json,
        } => {
            let deny_list = match deny {
                None => Vec::new(),
                Some(path) => match std::fs::read_to_string(&path) {
                    Ok(text) => parse_deny_list(&text),
                    Err(e) => return usage_error(&format!("--deny: {}: {e}", path.display())),
                },
            };
            block_on(sweep(url, token, channel, deny_list, dry_run, json))
        }
        Command::Status {
            id,
            url,
            token,
            json,
        } => block_on(status(url, token, id, json)),
        Command::Serve { config } => match config::load(config.as_deref()) {
            Err(e) => config_error(&e),
            Ok((settings, source)) => {
                crate::telemetry::init_tracing();
                tracing::info!(config = %source, "configuration loaded");
                block_on_with(serve_workers(), async move {
                    let workers = tokio::runtime::Handle::current().metrics().num_workers();
                    tracing::info!(workers, "pipeline runtime started");
                    let app = crate::app::Application::build(settings).await?;
                    app.run_until_stopped(shutdown_signal()).await
                })
            }
        },
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn send(url: String, key: WebhookKey, id: String, body: String) -> anyhow::Result<()> {
    let ts = unix_now().to_string();
    let sig = signature::sign(key.as_bytes(), &id, &ts, body.as_bytes());
    let resp = reqwest::Client::new()
        .post(&url)
        .header("content-type", "application/json")
        .header("webhook-id", &id)
        .header("webhook-timestamp", &ts)
        .header("webhook-signature", sig)
        .body(body)
        .send()
        .await?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    println!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    if !text.is_empty() {
        println!("{text}");
    }
    if status.is_success() {
        Ok(())
    } else {
        anyhow::bail!("the server answered {status}")
    }
}

/// User ids from a deny-list file: one per line, `#` comments and blank
/// lines ignored.
pub fn parse_deny_list(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// How long `sweep` keeps asking a service that does not answer (it may
/// be restarting; the sweep resumes there).
const SWEEP_UNREACHABLE_FOR: std::time::Duration = std::time::Duration::from_secs(120);

async fn sweep(
    url: String,
    token: String,
    channel: String,
    deny: Vec<String>,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<()> {
    use std::io::{IsTerminal, Write};
    let http = reqwest::Client::new();
    let base = url.trim_end_matches('/');
    let resp = http
        .post(format!("{base}/v1/admin/sweeps"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"channel": channel, "deny": deny, "dry_run": dry_run}))
        .send()
        .await?;
    if !resp.status().is_success() {
        let status = resp.status();
        anyhow::bail!(
            "the service refused the sweep: {status} {}",
            resp.text().await.unwrap_or_default()
        );
    }
    let started: serde_json::Value = resp.json().await?;
    let id = started["id"].as_u64().unwrap_or(0);
    let tty = std::io::stderr().is_terminal();
    let mut unreachable_since = None;
    let mut last_progress = String::new();
    let status = loop {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let answer = async {
            http.get(format!("{base}/v1/admin/sweeps/{id}"))
                .bearer_auth(&token)
                .send()
                .await?
                .error_for_status()?
                .json::<serde_json::Value>()
                .await
        }
        .await;
        let s = match answer {
            Ok(s) => {
                unreachable_since = None;
                s
            }
            // Unreachable (restarting), or it cannot read its sweeps now.
            Err(e)
                if e.is_connect()
                    || e.is_timeout()
                    || e.is_request()
                    || e.status() == Some(reqwest::StatusCode::SERVICE_UNAVAILABLE) =>
            {
                let since = *unreachable_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > SWEEP_UNREACHABLE_FOR {
                    anyhow::bail!("the service stopped answering about sweep {id}: {e}");
                }
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let progress = if json {
            serde_json::json!({
                "id": id, "state": s["state"], "pass": s["pass"], "pages": s["pages"],
                "scanned": s["scanned"], "subscriber_num": s["subscriber_num"],
                "found": s["found"], "removed": s["removed"],
            })
            .to_string()
        } else if s["state"] == "queued" {
            format!("sweep {id}: queued for the active dispatcher")
        } else {
            format!(
                "sweep {id}: pass {}, {} pages, {}/{} subscribers listed, {} found",
                s["pass"], s["pages"], s["scanned"], s["subscriber_num"], s["found"]
            )
        };
        if progress != last_progress {
            let mut err = std::io::stderr();
            if json {
                let _ = writeln!(err, "{progress}");
            } else if tty {
                let _ = write!(err, "\r{progress}   ");
            }
            let _ = err.flush();
            last_progress = progress;
        }
        // Broker mode: `queued` until the active dispatcher takes it.
        if s["state"] != "running" && s["state"] != "queued" {
            if tty && !json {
                eprintln!();
            }
            break s;
        }
    };
    if json {
        println!("{status}");
    } else {
        print!("{}", sweep_report(&status));
    }
    if status["state"] == "failed" {
        anyhow::bail!(
            "sweep failed: {}",
            status["error"].as_str().unwrap_or("unknown error")
        );
    }
    Ok(())
}

/// A finished sweep's status (`GET /v1/admin/sweeps/{id}`) for a terminal.
pub fn sweep_report(s: &serde_json::Value) -> String {
    use std::fmt::Write;
    let n = |k: &str| s[k].as_u64().unwrap_or(0);
    let dry_run = s["dry_run"].as_bool().unwrap_or(false);
    let passes = s["passes"].as_array().cloned().unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "channel {}: {} on the deny list; {} removed{}; {} left",
        s["channel"].as_str().unwrap_or(""),
        n("found"),
        n("removed"),
        if dry_run { " (dry run)" } else { "" },
        n("left"),
    );
    for (i, p) in passes.iter().enumerate() {
        let _ = writeln!(
            out,
            "  pass {}: {} subscribers listed in {} pages, {} on the deny list{}",
            i + 1,
            p["listed"],
            p["pages"],
            p["found"],
            if p["steady"].as_bool().unwrap_or(true) {
                ""
            } else {
                " (the channel changed while it paged)"
            }
        );
    }
    let verdict = if s["state"] == "failed" {
        "failed".to_owned()
    } else if dry_run {
        "dry run: nothing removed".to_owned()
    } else if s["confirmed"].as_bool().unwrap_or(false) {
        "confirmed: the last pass listed no one on the deny list".to_owned()
    } else if n("left") > 0 {
        format!(
            "not confirmed after {} passes: the channel kept changing; run the sweep again",
            passes.len()
        )
    } else {
        "not confirmed: the channel changed during the last pass; run the sweep again to be sure"
            .to_owned()
    };
    let _ = writeln!(
        out,
        "  {verdict}{}",
        if n("resumed") > 0 {
            format!(" (resumed {} times after a restart)", n("resumed"))
        } else {
            String::new()
        }
    );
    let sample = s["found_sample"].as_array().cloned().unwrap_or_default();
    if !sample.is_empty() {
        let _ = writeln!(out, "  found:");
        for account in &sample {
            let _ = writeln!(out, "    {}", account.as_str().unwrap_or(""));
        }
    }
    out
}

async fn status(url: String, token: String, id: String, json: bool) -> anyhow::Result<()> {
    let mut u = reqwest::Url::parse(url.trim_end_matches('/'))
        .map_err(|e| anyhow::anyhow!("--url {url}: {e}"))?;
    u.path_segments_mut()
        .map_err(|()| anyhow::anyhow!("--url {url}: not a base URL"))?
        .extend(["v1", "events", id.as_str()]);
    let resp = reqwest::Client::new()
        .get(u)
        .bearer_auth(&token)
        .send()
        .await?;
    let code = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap_or(serde_json::Value::Null);
    if !code.is_success() {
        let detail = body["detail"].as_str().unwrap_or("");
        if code == reqwest::StatusCode::NOT_FOUND && body["title"] == "No such event" {
            anyhow::bail!("no record of event {id}: {detail}");
        }
        anyhow::bail!("the service answered {code}: {detail}");
    }
    if json {
        println!("{body}");
    } else {
        print!("{}", status_report(&body));
    }
    Ok(())
}

/// An event's record (`GET /v1/events/{id}`) for a terminal.
pub fn status_report(r: &serde_json::Value) -> String {
    use std::fmt::Write;
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_owned();
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "event {}: {} from {}, user {}",
        s(&r["id"]),
        s(&r["type"]),
        s(&r["source"]),
        s(&r["user_id"])
    );
    let _ = writeln!(out, "  accepted  {}", s(&r["accepted_at"]));
    let status = s(&r["status"]);
    match status.as_str() {
        "pending" => {
            let _ = writeln!(
                out,
                "  pending   waiting for {}",
                r["waiting_for"].as_str().unwrap_or("its actions")
            );
        }
        "dead_lettered" => {
            let _ = writeln!(
                out,
                "  settled   {}: some actions were given up (dead-lettered)",
                s(&r["settled_at"])
            );
        }
        _ => {
            let _ = writeln!(
                out,
                "  settled   {}: every action applied or already done",
                s(&r["settled_at"])
            );
        }
    }
    let actions = r["actions"].as_array().cloned().unwrap_or_default();
    if actions.is_empty() {
        let _ = writeln!(out, "  no actions");
    }
    for a in &actions {
        let c = &a["counts"];
        let parts: Vec<String> = [
            ("applied", "applied"),
            ("noop", "noop"),
            ("dead_lettered", "dead-lettered"),
            ("pending", "pending"),
        ]
        .iter()
        .filter(|(k, _)| n(&c[*k]) > 0)
        .map(|(k, label)| format!("{} {label}", n(&c[*k])))
        .collect();
        let _ = writeln!(
            out,
            "  {} {}: {} ({})",
            s(&a["api"]),
            s(&a["target"]),
            s(&a["result"]),
            parts.join(", ")
        );
        let listed: Vec<String> = a["accounts"]
            .as_array()
            .map(|v| v.iter().map(s).collect())
            .unwrap_or_default();
        let total = n(&a["accounts_total"]);
        if total > 0 {
            const SHOWN: usize = 10;
            let more = if total as usize > SHOWN.min(listed.len()) {
                format!(" and {} more", total - SHOWN.min(listed.len()) as u64)
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "      accounts: {}{more}",
                listed
                    .iter()
                    .take(SHOWN)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let call = &a["last_call"];
        if !call.is_null() {
            let _ = writeln!(
                out,
                "      last call {}, ErrorCode {}{}, {} attempt{}",
                s(&call["at"]),
                call["error_code"],
                call["error_info"]
                    .as_str()
                    .map(|i| format!(" ({i})"))
                    .unwrap_or_default(),
                n(&call["attempts"]),
                if n(&call["attempts"]) == 1 { "" } else { "s" }
            );
        }
        for d in a["dead_lettered"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "      dead-lettered {}: {}, ErrorCode {}{}, at {}, {} attempts",
                s(&d["account"]),
                s(&d["reason"]),
                d["error_code"],
                d["error_info"]
                    .as_str()
                    .map(|i| format!(" ({i})"))
                    .unwrap_or_default(),
                s(&d["at"]),
                n(&d["attempts"])
            );
        }
    }
    out
}

fn block_on(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    block_on_with(None, fut)
}

/// Worker threads for `serve`'s runtime (the pipeline, the intake loop and
/// the broker's client; HTTP workers and the journal writer have threads of
/// their own): half the cores, at least one, unless `TOKIO_WORKER_THREADS`
/// says otherwise. On 2 cores one thread answered 1.04-1.10 times the 202s
/// per second of two, at 0.91-1.00 of the CPU per 202 (`--only ab` on two
/// machines, README): a second thread mostly adds wake-ups and hand-offs
/// between threads beside the HTTP workers that already take the other
/// core.
fn serve_workers() -> Option<usize> {
    workers_for(
        std::thread::available_parallelism().map_or(1, usize::from),
        std::env::var_os("TOKIO_WORKER_THREADS").is_some(),
    )
}

/// `serve_workers` for `cores` cores, `TOKIO_WORKER_THREADS` set or not
/// (set, tokio reads it itself).
fn workers_for(cores: usize, env_set: bool) -> Option<usize> {
    (!env_set).then_some((cores / 2).max(1))
}

/// Runs `fut` on a multi-thread runtime with `workers` worker threads
/// (tokio's default when `None`).
fn block_on_with(
    workers: Option<usize>,
    fut: impl std::future::Future<Output = anyhow::Result<()>>,
) -> ExitCode {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        builder.worker_threads(n);
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chat-janitor: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(fut);
    // The process exits next. lapin's IO thread may still be sleeping in a
    // reconnect backoff on this runtime's timer (a broker that never came
    // back); shutting the runtime down under it panics that thread, so the
    // runtime is left to the process exit instead.
    std::mem::forget(rt);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(c) = e.downcast_ref::<ConfigError>() {
                return config_error(c);
            }
            eprintln!("chat-janitor: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn config_error(e: &ConfigError) -> ExitCode {
    eprintln!("chat-janitor: {e}");
    ExitCode::from(2)
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("chat-janitor: {msg}");
    ExitCode::from(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_runs_its_runtime_on_half_the_cores_unless_told() {
        assert_eq!(workers_for(1, false), Some(1));
        assert_eq!(workers_for(2, false), Some(1));
        assert_eq!(workers_for(3, false), Some(1));
        assert_eq!(workers_for(8, false), Some(4));
        // TOKIO_WORKER_THREADS set: tokio's own reading of it stands.
        assert_eq!(workers_for(8, true), None);
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn every_option_of_every_subcommand_has_help() {
        use clap::CommandFactory;
        let cli = Cli::command();
        for sub in cli.get_subcommands() {
            assert!(sub.get_about().is_some(), "{} has no about", sub.get_name());
            for arg in sub.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                assert!(
                    arg.get_help().is_some(),
                    "{} --{id} has no help text",
                    sub.get_name()
                );
            }
        }
    }

    #[test]
    fn the_status_report_reads_on_a_terminal() {
        let r = serde_json::json!({
            "id": "msg_1", "source": "webhook", "type": "user.banned", "user_id": "107867",
            "accepted_at": "2026-11-21T10:00:00.120Z", "status": "dead_lettered",
            "settled_at": "2026-11-21T10:00:00.410Z", "waiting_for": null,
            "actions": [
                {"api": "delete_subscriber", "target": "@TOA#_news", "accounts": ["107867"],
                 "accounts_total": 1, "result": "applied",
                 "counts": {"applied": 1, "noop": 0, "dead_lettered": 0, "pending": 0},
                 "last_call": {"at": "2026-11-21T10:00:00.400Z", "error_code": 0, "error_info": null, "attempts": 1},
                 "dead_lettered": []},
                {"api": "follow_delete", "target": "107867", "accounts": ["a", "b"],
                 "accounts_total": 2, "result": "mixed",
                 "counts": {"applied": 1, "noop": 0, "dead_lettered": 1, "pending": 0},
                 "last_call": {"at": "2026-11-21T10:00:00.405Z", "error_code": 20001, "error_info": "bad To_Account", "attempts": 3},
                 "dead_lettered": [{"account": "b", "reason": "bad_request", "error_code": 20001,
                    "error_info": "bad To_Account", "at": "2026-11-21T10:00:00.405Z", "attempts": 3}]},
                {"api": "destroy_official_account", "target": "@TOA#_mine", "accounts": [],
                 "accounts_total": 0, "result": "noop",
                 "counts": {"applied": 0, "noop": 1, "dead_lettered": 0, "pending": 0},
                 "last_call": {"at": "2026-11-21T10:00:00.300Z", "error_code": 130004, "error_info": null, "attempts": 1},
                 "dead_lettered": []}
            ]
        });
        let text = status_report(&r);
        let expected = "\
event msg_1: user.banned from webhook, user 107867
  accepted  2026-11-21T10:00:00.120Z
  settled   2026-11-21T10:00:00.410Z: some actions were given up (dead-lettered)
  delete_subscriber @TOA#_news: applied (1 applied)
      accounts: 107867
      last call 2026-11-21T10:00:00.400Z, ErrorCode 0, 1 attempt
  follow_delete 107867: mixed (1 applied, 1 dead-lettered)
      accounts: a, b
      last call 2026-11-21T10:00:00.405Z, ErrorCode 20001 (bad To_Account), 3 attempts
      dead-lettered b: bad_request, ErrorCode 20001 (bad To_Account), at 2026-11-21T10:00:00.405Z, 3 attempts
  destroy_official_account @TOA#_mine: noop (1 noop)
      last call 2026-11-21T10:00:00.300Z, ErrorCode 130004, 1 attempt
";
        assert_eq!(text, expected);
        let many: Vec<String> = (0..1000).map(|i| format!("u{i}")).collect();
        let pending = serde_json::json!({
            "id": "e", "source": "amqp", "type": "t", "user_id": "u", "accepted_at": "x",
            "status": "pending", "settled_at": null, "waiting_for": "limiter",
            "actions": [{"api": "follow_delete", "target": "u", "accounts": many,
                "accounts_total": 2500, "result": "pending",
                "counts": {"applied": 0, "noop": 0, "dead_lettered": 0, "pending": 2500},
                "last_call": null, "dead_lettered": []}]
        });
        let text = status_report(&pending);
        assert!(text.contains("  pending   waiting for limiter\n"), "{text}");
        assert!(
            text.contains("      accounts: u0, u1, u2, u3, u4, u5, u6, u7, u8, u9 and 2490 more\n"),
            "{text}"
        );
    }

    #[test]
    fn the_sweep_report_reads_on_a_terminal() {
        let s = serde_json::json!({
            "channel": "@TOA#_c", "dry_run": false, "state": "done",
            "found": 137, "removed": 137, "left": 0, "confirmed": true, "resumed": 1,
            "passes": [
                {"pages": 5, "listed": 1000, "found": 137, "steady": true},
                {"pages": 5, "listed": 863, "found": 0, "steady": true}
            ],
            "found_sample": ["u1"],
        });
        let text = sweep_report(&s);
        assert!(
            text.starts_with("channel @TOA#_c: 137 on the deny list; 137 removed; 0 left\n"),
            "{text}"
        );
        assert!(
            text.contains("  pass 2: 863 subscribers listed in 5 pages, 0 on the deny list\n"),
            "{text}"
        );
        assert!(text.contains("confirmed: the last pass listed no one on the deny list (resumed 1 times after a restart)"), "{text}");
        assert!(text.contains("    u1\n"), "{text}");
    }
}
