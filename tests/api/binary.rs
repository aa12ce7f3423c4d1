//! The real binary: crash safety under SIGKILL, configuration errors, the
//! `usersig`, `emulator` and `send` commands.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use chat_janitor::emulator::{Seed, SeedChannel};
use chat_janitor::tencent::usersig;
use serde_json::json;

use crate::helpers::*;

const BIN: &str = env!("CARGO_BIN_EXE_chat-janitor");

/// Starts `serve` in `dir` (so no config/default.toml is found) with the
/// settings given as environment overrides; returns it and its port.
fn start_serve(dir: &Path, upstream: &str, linger_ms: u64) -> (Child, u16) {
    start_serve_with(dir, upstream, linger_ms, &[])
}

/// `start_serve` with more environment overrides.
fn start_serve_with(
    dir: &Path,
    upstream: &str,
    linger_ms: u64,
    env: &[(&str, &str)],
) -> (Child, u16) {
    start_serve_full(dir, upstream, linger_ms, &dir.join("journal"), env)
}

fn start_serve_at(dir: &Path, upstream: &str, linger_ms: u64, journal: &Path) -> (Child, u16) {
    start_serve_full(dir, upstream, linger_ms, journal, &[])
}

fn start_serve_full(
    dir: &Path,
    upstream: &str,
    linger_ms: u64,
    journal: &Path,
    env: &[(&str, &str)],
) -> (Child, u16) {
    let mut child = Command::new(BIN)
        .arg("serve")
        // As users run it, whatever the test runner's environment has.
        .env_remove("_RJEM_MALLOC_CONF")
        .envs(env.iter().copied())
        .current_dir(dir)
        .env("RUST_LOG", "info")
        .env("CHAT_JANITOR__SERVER__LISTEN", "127.0.0.1:0")
        .env("CHAT_JANITOR__EMULATOR__EMBEDDED", "false")
        .env("CHAT_JANITOR__TENCENT__BASE_URL", upstream)
        .env("CHAT_JANITOR__TENCENT__SECRET_KEY", KEY)
        .env("CHAT_JANITOR__JOURNAL__PATH", journal)
        .env(
            "CHAT_JANITOR__WEBHOOK__SECRETS",
            format!("{SECRET},{ROTATED_SECRET}"),
        )
        .env("CHAT_JANITOR__BATCHING__LINGER_MS", linger_ms.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary starts");
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let port = loop {
        let line = lines
            .next()
            .expect("serve logs before exiting")
            .expect("log line");
        if line.contains("chat-janitor serving") {
            let v: serde_json::Value =
                serde_json::from_str(&line).expect("JSON logs off a terminal");
            break v["port"].as_u64().expect("port logged") as u16;
        }
    };
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, port)
}

async fn post(port: u16, id: &str, body: &serde_json::Value) -> u16 {
    let ts = unix_now().to_string();
    let body = body.to_string();
    let sig = chat_janitor::ingest::signature::sign(&webhook_key(SECRET), id, &ts, body.as_bytes());
    reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/v1/events"))
        .header("content-type", "application/json")
        .header("webhook-id", id)
        .header("webhook-timestamp", ts)
        .header("webhook-signature", sig)
        .body(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn sigkill_with_batches_pending_loses_nothing_accepted() {
    let up = TestUpstream::start().await;
    // Under 100 per channel, so no batch fills and, with the long linger,
    // every one of them is still open when the process is killed.
    let members = users("s", 99);
    up.emulator.seed(Seed {
        channels: vec![
            SeedChannel::new("@TOA#_k1", members.clone()),
            SeedChannel::new("@TOA#_k2", members.clone()),
        ],
        ..Seed::default()
    });
    let dir = temp_dir();
    // A linger far longer than the test: batches are still open when killed.
    let (mut child, port) = start_serve(dir.path(), &up.running.base_url(), 60_000);
    for u in &members {
        let ev = json!({"type": "user.banned", "data": {"user_id": u, "channels": ["@TOA#_k1", "@TOA#_k2"]}});
        assert_eq!(post(port, &format!("kill-{u}"), &ev).await, 202);
    }
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
    assert_eq!(
        up.emulator.stats().api("delete_subscriber").calls,
        0,
        "nothing was sent before the kill"
    );
    assert_eq!(up.emulator.subscribers("@TOA#_k1").unwrap().len(), 99);

    let (mut child, port) = start_serve(dir.path(), &up.running.base_url(), 50);
    eventually(20, "every accepted event applied after restart", || async {
        up.emulator.subscribers("@TOA#_k1").unwrap().is_empty()
            && up.emulator.subscribers("@TOA#_k2").unwrap().is_empty()
    })
    .await;
    // The ids are remembered across the crash: a sender's retry is a 200.
    let ev = json!({"type": "user.banned", "data": {"user_id": "s0", "channels": ["@TOA#_k1"]}});
    assert_eq!(post(port, "kill-s0", &ev).await, 200);
    // SIGTERM drains and exits 0.
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// How a test stops the service mid-sweep.
#[derive(Clone, Copy, Debug)]
enum Interrupt {
    /// SIGTERM while the first pass pages.
    TermWhileListing,
    /// SIGKILL while the first removal round is in flight.
    KillWhileRemoving,
}

async fn sweep_resumes_after(how: Interrupt) {
    use crate::sweep::*;
    let up = TestUpstream::start().await;
    let case = case();
    seed_case(&up, &case);
    let (api, latency, wait_for) = match how {
        Interrupt::TermWhileListing => ("get_subscriber_info", 300, 3),
        Interrupt::KillWhileRemoving => ("delete_subscriber", 1500, 1),
    };
    up.emulator
        .set_faults(chat_janitor::emulator::Faults::new(vec![
            chat_janitor::emulator::FaultRule::latency(Some(api), latency),
        ]));
    let dir = temp_dir();
    let env = [("CHAT_JANITOR__ADMIN__TOKEN", ADMIN_TOKEN)];
    let (mut child, port) = start_serve_with(dir.path(), &up.running.base_url(), 50, &env);
    let base = format!("http://127.0.0.1:{port}");
    let id = start_sweep(&base, &case.deny, false).await;
    eventually(30, "the sweep under way", || async {
        up.emulator.stats().api(api).calls >= wait_for
    })
    .await;
    match how {
        Interrupt::TermWhileListing => {
            Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status()
                .unwrap();
            let status = child.wait().unwrap();
            assert!(status.success(), "{status:?}");
        }
        Interrupt::KillWhileRemoving => {
            child.kill().expect("SIGKILL");
            child.wait().unwrap();
        }
    }
    up.emulator.clear_faults();

    let (mut child, port) = start_serve_with(dir.path(), &up.running.base_url(), 50, &env);
    let base = format!("http://127.0.0.1:{port}");
    let (code, s) = sweep_status(&base, id).await;
    assert_eq!(code, 200, "the sweep is known after the restart: {s}");
    assert_eq!(s["resumed"], 1, "{s}");
    let s = finished_sweep(&base, id).await;
    // The same result as a sweep nobody interrupted.
    assert_clean_result(&s);
    assert_eq!(passes(&s), [(5, 1000, 137), (5, 863, 0)], "{how:?}: {s}");
    let denied: std::collections::HashSet<String> = case.denied.iter().cloned().collect();
    let sent: std::collections::HashSet<String> = removals_sent(&up).into_iter().collect();
    assert_eq!(sent, denied, "{how:?}");
    let expected: std::collections::HashSet<String> = case
        .members
        .iter()
        .filter(|m| !denied.contains(*m))
        .cloned()
        .collect();
    assert_eq!(remaining(&up), expected);
    // Ids never repeat across restarts.
    let next = start_sweep(&base, &[], true).await;
    assert!(next > id, "{next} after {id}");
    let _ = finished_sweep(&base, next).await;
    let stop = |child: &Child| {
        Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap()
    };
    stop(&child);
    assert!(child.wait().unwrap().success());
    // A finished sweep still answers after another restart, unchanged.
    let (mut child, port) = start_serve_with(dir.path(), &up.running.base_url(), 50, &env);
    let (code, again) = sweep_status(&format!("http://127.0.0.1:{port}"), id).await;
    assert_eq!(code, 200);
    assert_eq!(again, s);
    stop(&child);
    assert!(child.wait().unwrap().success());
}

#[tokio::test]
async fn a_sweep_stopped_by_sigterm_resumes_after_a_restart() {
    sweep_resumes_after(Interrupt::TermWhileListing).await;
}

#[tokio::test]
async fn a_sweep_killed_mid_removal_resumes_after_a_restart() {
    sweep_resumes_after(Interrupt::KillWhileRemoving).await;
}

#[test]
fn invalid_configuration_exits_2_naming_the_key() {
    let dir = temp_dir();
    let out = Command::new(BIN)
        .arg("serve")
        .current_dir(dir.path())
        .env("CHAT_JANITOR__TENCENT__REQUESTS_PER_SECOND", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("tencent.requests_per_second"), "{err}");

    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        config_with("timeout_ms = 5000", "timeout_ms = \"soon\""),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("tencent.timeout_ms"), "{err}");

    let out = Command::new(BIN)
        .args(["serve", "--config", "/nonexistent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));

    let out = Command::new(BIN)
        .args(["usersig", "--sdkappid", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

fn config_with(from: &str, to: &str) -> String {
    chat_janitor::config::EMBEDDED_DEFAULTS.replace(from, to)
}

#[test]
fn the_usersig_command_prints_a_valid_usersig() {
    let out = Command::new(BIN)
        .args([
            "usersig",
            "--sdkappid",
            "1400000000",
            "--secret-key",
            KEY,
            "--identifier",
            "administrator",
            "--expire",
            "3600",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let sig = String::from_utf8(out.stdout).unwrap();
    let claims = usersig::verify(
        sig.trim(),
        KEY,
        1_400_000_000,
        "administrator",
        unix_now() as u64,
    )
    .unwrap();
    assert_eq!(claims.expire, 3600);
}

#[tokio::test]
async fn the_emulator_command_serves_vendor_shaped_answers() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child = Command::new(BIN)
        .args([
            "emulator",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--secret-key",
            KEY,
            "--rate",
            "50",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("emulator listening"), "{first}");
    let sig = usersig::generate(KEY, 1_400_000_000, "administrator", unix_now() as u64, 3600);
    let url = format!(
        "http://127.0.0.1:{port}/v4/official_account_open_http_svc/destroy_official_account?sdkappid=1400000000&identifier=administrator&usersig={sig}&random=42&contenttype=json"
    );
    let v: serde_json::Value = reqwest::Client::new()
        .post(&url)
        .body(r#"{"Official_Account":"@TOA#_nope"}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["ActionStatus"], "FAIL");
    assert_eq!(v["ErrorCode"], 130004);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn send_signs_and_posts_an_event() {
    let up = TestUpstream::start().await;
    up.emulator.seed(Seed {
        channels: vec![SeedChannel::new("@TOA#_snd", ["sender1"])],
        ..Seed::default()
    });
    let dir = temp_dir();
    let app = TestApp::spawn(test_settings(&up.running.base_url(), dir.path())).await;
    let out = tokio::process::Command::new(BIN)
        .args([
            "send",
            "user.banned",
            "--user",
            "sender1",
            "--channel",
            "@TOA#_snd",
            "--url",
            &app.url("/v1/events"),
            "--secret",
            SECRET,
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8(out.stdout).unwrap().starts_with("202"));
    eventually(5, "applied", || async {
        up.emulator.subscribers("@TOA#_snd").unwrap().is_empty()
    })
    .await;
    app.stop().await;
}

/// Runs `serve` with its journal in `journal`, expecting it to exit at
/// start; returns its exit code and stderr.
fn serve_exits(dir: &Path, journal: &Path) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .arg("serve")
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .env("CHAT_JANITOR__SERVER__LISTEN", "127.0.0.1:0")
        .env("CHAT_JANITOR__EMULATOR__EMBEDDED", "false")
        .env("CHAT_JANITOR__TENCENT__SECRET_KEY", KEY)
        .env("CHAT_JANITOR__JOURNAL__PATH", journal)
        .env("CHAT_JANITOR__WEBHOOK__SECRETS", SECRET)
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8(out.stderr).unwrap())
}

#[test]
fn a_corrupt_journal_exits_1_with_one_line_naming_it() {
    let dir = temp_dir();
    let journal = dir.path().join("journal");
    std::fs::create_dir_all(&journal).unwrap();
    let file = journal.join("journal.redb");
    std::fs::write(&file, vec![0xA5u8; 64 * 1024]).unwrap();
    let (code, err) = serve_exits(dir.path(), &journal);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert!(err.contains("move it aside"), "{err}");
}

/// Mounts a tmpfs at `at` (CI runs as root); `false` where not permitted.
fn mount_tmpfs(at: &Path, options: &str) -> bool {
    std::fs::create_dir_all(at).unwrap();
    Command::new("mount")
        .args(["-t", "tmpfs", "-o", options, "tmpfs"])
        .arg(at)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn umount(at: &Path) {
    let _ = Command::new("umount").arg(at).status();
}

#[test]
fn an_unwritable_journal_directory_exits_1_with_one_line_naming_it() {
    let dir = temp_dir();
    let ro = dir.path().join("ro");
    // Root ignores permission bits: a read-only filesystem is what refuses
    // root too.
    if !mount_tmpfs(&ro, "size=1m,ro") {
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    }
    let journal = ro.join("journal");
    let (code, err) = serve_exits(dir.path(), &journal);
    umount(&ro);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&journal.display().to_string()), "{err}");
}

#[tokio::test]
async fn sigkill_while_the_disk_is_full_loses_nothing_that_got_202() {
    let dir = temp_dir();
    let disk = dir.path().join("disk");
    if !mount_tmpfs(&disk, "size=4m") {
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    }
    let up = TestUpstream::start().await;
    let members = users("full", 400);
    up.emulator.seed(Seed {
        channels: vec![SeedChannel::new("@TOA#_full", members.clone())],
        ..Seed::default()
    });
    let mut child = start_serve_with_journal(dir.path(), &disk.join("journal"), &up, 60_000);
    let port = child.1;
    let mut accepted = Vec::new();
    let mut refused = 0;
    // Fill the filesystem, leaving the journal no room to grow.
    let filler = disk.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    for u in &members {
        let ev = json!({"type": "user.banned", "data": {"user_id": u, "channels": ["@TOA#_full"]}});
        match post(port, &format!("full-{u}"), &ev).await {
            202 => accepted.push(u.clone()),
            503 => refused += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert!(
        refused > 0,
        "the disk never filled ({} accepted)",
        accepted.len()
    );
    child.0.kill().expect("SIGKILL");
    child.0.wait().unwrap();

    // Started on the still full disk: it serves, and drains what it holds.
    let (mut child, port) = start_serve_with_journal(dir.path(), &disk.join("journal"), &up, 50);
    let health = reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let check = accepted.clone();
    eventually(
        30,
        "every 202'd event applied after the restart",
        || async {
            let left = up.emulator.subscribers("@TOA#_full").unwrap();
            check.iter().all(|u| !left.contains(u))
        },
    )
    .await;
    std::fs::remove_file(&filler).unwrap();
    let ev =
        json!({"type": "user.banned", "data": {"user_id": "late", "channels": ["@TOA#_full"]}});
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while post(port, "full-late", &ev).await != 202 {
        assert!(
            std::time::Instant::now() < deadline,
            "no 202 within 5 s of space returning"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    umount(&disk);
}

fn start_serve_with_journal(
    dir: &Path,
    journal: &Path,
    up: &TestUpstream,
    linger_ms: u64,
) -> (Child, u16) {
    start_serve_at(dir, &up.running.base_url(), linger_ms, journal)
}

#[tokio::test]
async fn a_settled_events_record_survives_kill_9() {
    let up = TestUpstream::start().await;
    up.emulator.seed(Seed {
        channels: vec![SeedChannel::new("@TOA#_rk", ["rk1", "rk2"])],
        ..Seed::default()
    });
    let dir = temp_dir();
    let token = [("CHAT_JANITOR__ADMIN__TOKEN", ADMIN_TOKEN)];
    let journal = dir.path().join("journal");
    let (mut child, port) =
        start_serve_full(dir.path(), &up.running.base_url(), 20, &journal, &token);
    let ev =
        json!({"type": "account.deleted", "data": {"user_id": "rk1", "channels": ["@TOA#_rk"]}});
    assert_eq!(post(port, "rk-del-1", &ev).await, 202);
    let get = |port: u16| async move {
        let r = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{port}/v1/events/rk-del-1"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        r.json::<serde_json::Value>()
            .await
            .unwrap_or(serde_json::Value::Null)
    };
    eventually(10, "the record written", || async {
        get(port).await["status"] == "settled"
    })
    .await;
    let before = get(port).await;
    // Past the settle's checkpoint (at most a second later): the event is
    // not replayed, so what answers after the restart is the record as it
    // was written, not one written anew.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let calls = up.emulator.calls().len();
    child.kill().expect("SIGKILL");
    child.wait().unwrap();

    let (mut child, port) =
        start_serve_full(dir.path(), &up.running.base_url(), 20, &journal, &token);
    let after = get(port).await;
    assert_eq!(after["status"], "settled", "{after:#}");
    assert_eq!(after["actions"], before["actions"], "the same record");
    assert_eq!(after["settled_at"], before["settled_at"]);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(up.emulator.calls().len(), calls, "not replayed");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn a_kill_9_before_a_settled_events_record_is_durable_replays_the_event() {
    let dir = temp_dir();
    let journal = dir.path().join("journal");
    // The record store's own filesystem, filled once the service runs: its
    // records cannot be written, the journal's are.
    let records = journal.join("records");
    if !mount_tmpfs(&records, "size=1m") {
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    }
    let up = TestUpstream::start().await;
    up.emulator.seed(Seed {
        channels: vec![SeedChannel::new("@TOA#_rw", ["rw1", "rw2"])],
        ..Seed::default()
    });
    let token = [("CHAT_JANITOR__ADMIN__TOKEN", ADMIN_TOKEN)];
    let (mut child, port) =
        start_serve_full(dir.path(), &up.running.base_url(), 20, &journal, &token);
    {
        use std::io::Write;
        let mut f = std::fs::File::create(records.join("filler")).unwrap();
        let chunk = vec![0u8; 16 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    let ev =
        json!({"type": "account.deleted", "data": {"user_id": "rw1", "channels": ["@TOA#_rw"]}});
    assert_eq!(post(port, "rw-del-1", &ev).await, 202);
    eventually(10, "the removal made upstream", || async {
        !up.emulator
            .subscribers("@TOA#_rw")
            .unwrap()
            .contains(&"rw1".to_owned())
    })
    .await;
    // Past the settle's checkpoint (at most a second after the settle),
    // had the settle not waited for the record.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let calls = up.emulator.calls().len();
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
    // Room again (the store's files go with the tmpfs).
    umount(&records);

    let (mut child, port) =
        start_serve_full(dir.path(), &up.running.base_url(), 20, &journal, &token);
    let get = || async move {
        reqwest::Client::new()
            .get(format!("http://127.0.0.1:{port}/v1/events/rw-del-1"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap_or(serde_json::Value::Null)
    };
    eventually(30, "the replayed event's record written", || async {
        get().await["status"] == "settled"
    })
    .await;
    assert!(
        up.emulator.calls().len() > calls,
        "the event was replayed (its settle was never applied)"
    );
    let r = get().await;
    assert_eq!(r["user_id"], "rw1", "{r:#}");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The allocator's settings, as jemalloc itself prints them at exit
/// (`stats_print`), for `chat-janitor --version` with `conf` added at run
/// time.
fn allocator_settings(conf: &str) -> String {
    let out = Command::new(BIN)
        .arg("--version")
        .env("_RJEM_MALLOC_CONF", conf)
        .output()
        .expect("the binary runs");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.trim_start().starts_with("opt."))
        .map(|l| format!("{}\n", l.trim()))
        .collect()
}

#[test]
fn the_binary_runs_on_jemalloc_with_its_settings_built_in() {
    // The settings come from .cargo/config.toml at build time: a build
    // without them would keep freed pages for seconds (jemalloc's decay)
    // and use four arenas a core.
    let seen = allocator_settings("stats_print:true");
    for want in [
        "opt.narenas: 2\n",
        "opt.dirty_decay_ms: 0 ",
        "opt.muzzy_decay_ms: 0 ",
    ] {
        assert!(seen.contains(want), "{want:?} not in:\n{seen}");
    }
    // An operator's `_RJEM_MALLOC_CONF` overrides them.
    let seen = allocator_settings("stats_print:true,dirty_decay_ms:5000");
    assert!(seen.contains("opt.dirty_decay_ms: 5000 "), "{seen}");
    assert!(seen.contains("opt.narenas: 2\n"), "{seen}");
}
