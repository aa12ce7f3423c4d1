//! The emulator is strict where the vendor is: these tests pin the checks,
//! their order and codes, the per-item results, cursors, call frequency and
//! fault injection, over real HTTP.

use std::io::Write as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use chat_janitor::emulator::{
    CallRecord, CursorMode, Emulator, EmulatorConfig, FaultRule, Faults, RunningEmulator, Seed,
    SeedChannel, SeedFollow, Stats,
};
use chat_janitor::tencent::usersig::generate;
use chat_janitor::tencent::Api;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

const KEY: &str = "emulator-test-secret-key";
const APP: u64 = 1_400_000_123;
const ADMIN: &str = "administrator";
const CH: &str = "@TOA#_news";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn config() -> EmulatorConfig {
    EmulatorConfig {
        sdkappid: APP,
        secret_key: KEY.into(),
        admins: vec![ADMIN.into()],
        ..EmulatorConfig::default()
    }
}

fn admin_sig() -> String {
    generate(KEY, APP, ADMIN, now(), 3600)
}

/// Percent-encodes everything but unreserved characters.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

struct Env {
    emu: Emulator,
    server: RunningEmulator,
    http: reqwest::Client,
    base: String,
}

impl Env {
    async fn start() -> Env {
        Env::with(config()).await
    }

    async fn with(config: EmulatorConfig) -> Env {
        let emu = Emulator::new(config);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let server = emu.serve(listener).await.expect("serve");
        let base = server.base_url();
        Env {
            emu,
            server,
            http: reqwest::Client::new(),
            base,
        }
    }

    fn url_with(
        &self,
        api: Api,
        sdkappid: &str,
        identifier: &str,
        sig: &str,
        random: &str,
    ) -> String {
        format!(
            "{}/{}?sdkappid={sdkappid}&identifier={identifier}&usersig={sig}&random={random}&contenttype=json",
            self.base,
            api.path()
        )
    }

    fn url(&self, api: Api) -> String {
        self.url_with(api, &APP.to_string(), ADMIN, &admin_sig(), "12345")
    }

    async fn post(&self, url: String, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let resp = self.http.post(url).body(body).send().await.expect("send");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// A properly authenticated call; asserts HTTP 200 and a JSON body.
    async fn call(&self, api: Api, body: Value) -> Value {
        let (status, v) = self.post(self.url(api), body.to_string()).await;
        assert_eq!(status, 200, "{api}: {v}");
        assert!(v.is_object(), "{api}: {v}");
        v
    }

    /// The ErrorCode of a call, checking ActionStatus agrees with it.
    async fn code(&self, api: Api, body: Value) -> i64 {
        let v = self.call(api, body).await;
        code_of(&v)
    }

    async fn stop(self) {
        self.server.stop().await;
    }
}

fn code_of(v: &Value) -> i64 {
    let code = v["ErrorCode"].as_i64().expect("ErrorCode");
    let expected = if code == 0 { "OK" } else { "FAIL" };
    assert_eq!(v["ActionStatus"], expected, "{v}");
    assert!(v["ErrorInfo"].is_string(), "{v}");
    if code != 0 {
        assert!(
            !v["ErrorInfo"].as_str().unwrap_or("").is_empty(),
            "helpful ErrorInfo: {v}"
        );
    }
    code
}

fn results(v: &Value) -> Vec<(String, i64)> {
    v["SubscriberList"]
        .as_array()
        .expect("SubscriberList")
        .iter()
        .map(|r| {
            (
                r["Subscriber_Account"]
                    .as_str()
                    .expect("account")
                    .to_owned(),
                r["Result"].as_i64().expect("Result"),
            )
        })
        .collect()
}

fn users(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("user{i:04}")).collect()
}

fn del(channel: &str, accounts: &[&str]) -> Value {
    json!({"Official_Account": channel, "SubscriberToDel_Account": accounts})
}

// ---- authentication and parameters

#[tokio::test]
async fn checks_parameters_and_usersig_in_the_vendor_order() {
    let env = Env::start().await;
    env.emu.seed(Seed {
        channels: vec![SeedChannel::new(CH, ["u1"])],
        ..Seed::default()
    });
    let api = Api::DeleteSubscriber;
    let body = del(CH, &["u1"]).to_string();
    let app = APP.to_string();
    let sig = admin_sig();
    let cases: Vec<(String, i64, &str)> = vec![
        (
            env.url_with(api, &app, ADMIN, &sig, "abc"),
            60002,
            "random not a number",
        ),
        (
            env.url_with(api, &app, ADMIN, &sig, "4294967296"),
            60002,
            "random over u32",
        ),
        (
            env.url_with(api, &app, ADMIN, &sig, "-1"),
            60002,
            "negative random",
        ),
        (
            env.url_with(api, &app, ADMIN, &sig, ""),
            60002,
            "empty random",
        ),
        (
            env.url_with(api, "", ADMIN, &sig, "1"),
            60012,
            "no sdkappid",
        ),
        (
            env.url_with(api, "14x", ADMIN, &sig, "1"),
            60002,
            "sdkappid not a number",
        ),
        (
            env.url_with(api, "1400000999", ADMIN, &sig, "1"),
            60006,
            "not our sdkappid",
        ),
        (
            env.url_with(api, &app, ADMIN, "garbage!", "1"),
            70003,
            "malformed usersig",
        ),
        (
            env.url_with(
                api,
                &app,
                ADMIN,
                &generate("other-key", APP, ADMIN, now(), 3600),
                "1",
            ),
            70009,
            "bad HMAC",
        ),
        (
            env.url_with(
                api,
                &app,
                ADMIN,
                &generate(KEY, APP, ADMIN, now() - 7200, 3600),
                "1",
            ),
            70001,
            "expired",
        ),
        (
            env.url_with(api, &app, "someone", &sig, "1"),
            70013,
            "identifier mismatch",
        ),
        (
            env.url_with(
                api,
                &app,
                ADMIN,
                &generate(KEY, APP + 1, ADMIN, now(), 3600),
                "1",
            ),
            70014,
            "sig for another sdkappid",
        ),
        (
            env.url_with(
                api,
                &app,
                "bob",
                &generate(KEY, APP, "bob", now(), 3600),
                "1",
            ),
            60010,
            "not an admin",
        ),
        (
            // 4294967295 is the largest valid random: everything is right.
            env.url_with(api, &app, ADMIN, &sig, "4294967295"),
            0,
            "valid",
        ),
    ];
    for (url, want, what) in cases {
        let (status, v) = env.post(url, body.clone()).await;
        assert_eq!(status, 200, "{what}: {v}");
        assert_eq!(code_of(&v), want, "{what}: {v}");
    }

    // Parameter names are case-sensitive; contenttype must be json.
    let base = format!("{}/{}", env.base, api.path());
    let q = |s: &str| format!("{base}?{s}");
    for (url, want) in [
        (
            q(&format!(
                "SdkAppId={APP}&identifier={ADMIN}&usersig={sig}&random=1&contenttype=json"
            )),
            60012,
        ),
        (
            q(&format!(
                "sdkappid={APP}&Identifier={ADMIN}&usersig={sig}&random=1&contenttype=json"
            )),
            60002,
        ),
        (
            q(&format!(
                "sdkappid={APP}&identifier={ADMIN}&usersig={sig}&random=1"
            )),
            60002,
        ),
        (
            q(&format!(
                "sdkappid={APP}&identifier={ADMIN}&usersig={sig}&random=1&contenttype=xml"
            )),
            60002,
        ),
    ] {
        let (_, v) = env.post(url.clone(), body.clone()).await;
        assert_eq!(code_of(&v), want, "{url}: {v}");
    }

    // Refused requests are not calls; they are counted apart.
    let s = env.emu.stats().api("delete_subscriber");
    assert_eq!(s.calls, 1);
    assert_eq!(s.refused.get("70009"), Some(&1));
    assert_eq!(s.refused.get("60002").copied(), Some(8));
    env.stop().await;
}

#[tokio::test]
async fn body_must_be_a_json_object() {
    let env = Env::start().await;
    for (body, what) in [
        ("", "empty"),
        ("  \n", "blank"),
        ("not json", "not JSON"),
        ("[1,2]", "array"),
        ("\"x\"", "string"),
        ("{\"Official_Account\":", "truncated"),
    ] {
        let (status, v) = env.post(env.url(Api::DeleteSubscriber), body).await;
        assert_eq!(status, 200);
        assert_eq!(code_of(&v), 60003, "{what}: {v}");
    }
    env.stop().await;
}

#[tokio::test]
async fn unknown_paths_are_404_and_other_methods_405() {
    let env = Env::start().await;
    let (status, _) = env
        .post(
            format!("{}/v4/official_account_open_http_svc/nope?x=1", env.base),
            "{}",
        )
        .await;
    assert_eq!(status, 404);
    let (status, _) = env.post(format!("{}/v4/follow", env.base), "{}").await;
    assert_eq!(status, 404);
    let resp = env
        .http
        .get(env.url(Api::DeleteSubscriber))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 405);
    env.stop().await;
}

/// A UserSig built straight from the documented steps, independently of our
/// generator: other key order, other spacing, another zlib level.
#[tokio::test]
async fn accepts_a_usersig_made_from_the_documented_steps() {
    let env = Env::start().await;
    let time = now();
    let expire = 600u64;
    let content = format!(
        "TLS.identifier:{ADMIN}\nTLS.sdkappid:{APP}\nTLS.time:{time}\nTLS.expire:{expire}\n"
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(KEY.as_bytes()).unwrap();
    mac.update(content.as_bytes());
    let sig = STANDARD.encode(mac.finalize().into_bytes());
    let doc = format!(
        "{{ \"TLS.sig\" : \"{sig}\",\n  \"TLS.time\" : {time}, \"TLS.expire\" : {expire},\n  \"TLS.sdkappid\" : {APP}, \"TLS.identifier\" : \"{ADMIN}\", \"TLS.ver\" : \"2.0\" }}"
    );
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(doc.as_bytes()).unwrap();
    let usersig: String = STANDARD
        .encode(z.finish().unwrap())
        .chars()
        .map(|c| match c {
            '+' => '*',
            '/' => '-',
            '=' => '_',
            c => c,
        })
        .collect();
    let url = env.url_with(Api::FollowCheck, &APP.to_string(), ADMIN, &usersig, "7");
    let (status, v) = env
        .post(
            url,
            json!({"From_Account": "a", "To_Account": ["b"]}).to_string(),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(code_of(&v), 0, "{v}");
    assert_eq!(v["ResultItem"][0]["FollowType"], 0);
    env.stop().await;
}

// ---- delete_subscriber / add_subscriber

#[tokio::test]
async fn delete_subscriber_validates_strictly() {
    let env = Env::start().await;
    env.emu.seed(Seed {
        channels: vec![SeedChannel::new(CH, ["u1", "u2"])],
        ..Seed::default()
    });
    let api = Api::DeleteSubscriber;
    let many = users(0..101);
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let long = "x".repeat(33);
    let cases = [
        (del(CH, &many), 6017, "101 accounts"),
        (del(CH, &[]), 6017, "no account"),
        (del(CH, &["u1", "u3", "u1"]), 6017, "an account twice"),
        (del(CH, &["u1", ""]), 6017, "empty account"),
        (del(CH, &["u1", &long]), 6017, "33-byte account"),
        (del(CH, &["u 1"]), 6017, "whitespace"),
        (del(CH, &["u\u{7}1"]), 6017, "control character"),
        (json!({"Official_Account": CH}), 6017, "no list"),
        (
            json!({"Official_Account": CH, "SubscriberToDel_Account": "u1"}),
            6017,
            "list is a string",
        ),
        (
            json!({"Official_Account": CH, "SubscriberToDel_Account": ["u1", 7]}),
            6017,
            "number in the list",
        ),
        (
            // The page's field table (copied from add_subscriber) is wrong.
            json!({"Official_Account": CH, "SubscriberList": [{"Subscriber_Account": "u1"}]}),
            6017,
            "the field table's shape",
        ),
        (
            json!({"SubscriberToDel_Account": ["u1"]}),
            6017,
            "no channel",
        ),
        (
            json!({"Official_Account": 5, "SubscriberToDel_Account": ["u1"]}),
            6017,
            "channel is a number",
        ),
        (del("news", &["u1"]), 130007, "no @TOA#_ prefix"),
        (del("@TOA#_", &["u1"]), 130007, "prefix only"),
        (del("@TOA#_gone", &["u1"]), 130004, "unknown channel"),
    ];
    for (body, want, what) in cases {
        let v = env.call(api, body).await;
        assert_eq!(code_of(&v), want, "{what}: {v}");
        assert!(v.get("SubscriberList").is_none(), "{what}: {v}");
    }
    // 100 distinct accounts are fine.
    let hundred = users(0..100);
    let hundred: Vec<&str> = hundred.iter().map(String::as_str).collect();
    assert_eq!(env.code(api, del(CH, &hundred)).await, 0);
    let s = env.emu.stats().api("delete_subscriber");
    assert_eq!(s.max_items, 101);
    assert_eq!(s.code("6017"), 13);
    env.stop().await;
}

#[tokio::test]
async fn subscriber_results_per_item() {
    let env = Env::start().await;
    env.emu.seed(Seed {
        channels: vec![SeedChannel::new(CH, ["u1", "u2", "u3"])],
        ..Seed::default()
    });
    let v = env
        .call(Api::DeleteSubscriber, del(CH, &["u2", "nobody", "u1"]))
        .await;
    assert_eq!(code_of(&v), 0);
    assert_eq!(
        results(&v),
        [("u2".into(), 1), ("nobody".into(), 2), ("u1".into(), 1)]
    );
    assert_eq!(env.emu.subscribers(CH), Some(vec!["u3".to_owned()]));

    let add = json!({"Official_Account": CH, "SubscriberList": [
        {"Subscriber_Account": "u3"}, {"Subscriber_Account": "u9"}]});
    let v = env.call(Api::AddSubscriber, add).await;
    assert_eq!(results(&v), [("u3".into(), 2), ("u9".into(), 1)]);
    assert_eq!(env.emu.subscribers(CH).unwrap(), ["u3", "u9"]);

    let s = env.emu.stats();
    let d = s.api("delete_subscriber");
    assert_eq!((d.applied, d.noop, d.items), (2, 1, 3));
    let a = s.api("add_subscriber");
    assert_eq!((a.applied, a.noop), (1, 1));
    env.stop().await;
}

#[tokio::test]
async fn add_subscriber_limits() {
    let env = Env::start().await;
    env.emu.seed(Seed {
        channels: vec![
            SeedChannel {
                max_subscribers: Some(3),
                ..SeedChannel::new("@TOA#_small", ["a", "b"])
            },
            SeedChannel::new("@TOA#_x", ["busy"]),
            SeedChannel::new("@TOA#_y", ["busy"]),
            SeedChannel::new("@TOA#_z", Vec::<String>::new()),
        ],
        user_channel_limit: Some(2),
        ..Seed::default()
    });
    let add = |ch: &str, accounts: &[&str]| {
        json!({"Official_Account": ch, "SubscriberList":
            accounts.iter().map(|a| json!({"Subscriber_Account": a})).collect::<Vec<_>>()})
    };
    // Two new subscribers would make 4 > 3: the whole call is refused.
    assert_eq!(
        env.code(Api::AddSubscriber, add("@TOA#_small", &["c", "d"]))
            .await,
        130006
    );
    assert_eq!(env.emu.subscribers("@TOA#_small").unwrap(), ["a", "b"]);
    // An already-subscribed account does not count against the limit.
    assert_eq!(
        env.code(Api::AddSubscriber, add("@TOA#_small", &["a", "c"]))
            .await,
        0
    );
    // "busy" is at its 2-channel limit.
    assert_eq!(
        env.code(Api::AddSubscriber, add("@TOA#_z", &["ok", "busy"]))
            .await,
        130010
    );
    assert_eq!(
        env.emu.subscribers("@TOA#_z").unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(
        env.code(Api::AddSubscriber, add("@TOA#_z", &["ok"])).await,
        0
    );
    // Strict list checks on add too.
    assert_eq!(
        env.code(Api::AddSubscriber, add("@TOA#_z", &["p", "p"]))
            .await,
        6017
    );
    assert_eq!(
        env.code(
            Api::AddSubscriber,
            json!({"Official_Account": "@TOA#_z", "SubscriberList": ["p"]})
        )
        .await,
        6017
    );
    assert_eq!(
        env.code(Api::AddSubscriber, add("@TOA#_nope", &["p"]))
            .await,
        130004
    );
    assert_eq!(
        env.code(Api::AddSubscriber, add("nope", &["p"])).await,
        130007
    );
    env.stop().await;
}

// ---- get_subscriber_info

async fn page(env: &Env, channel: &str, limit: u64, next: &str) -> (Vec<String>, String, u64) {
    let v = env
        .call(
            Api::GetSubscriberInfo,
            json!({"Official_Account": channel, "Limit": limit, "Next": next}),
        )
        .await;
    assert_eq!(code_of(&v), 0, "{v}");
    let list = v["SubscriberList"].as_array().expect("SubscriberList");
    for entry in list {
        assert!(entry["SubscribeTime"].as_i64().unwrap() > 1_600_000_000);
        assert_eq!(entry["CustomString"], "");
        assert_eq!(entry["MsgFlag"], "AcceptAndNotify");
        assert_eq!(entry["LastSendMsgTime"], 0);
    }
    (
        list.iter()
            .map(|e| e["Subscriber_Account"].as_str().unwrap().to_owned())
            .collect(),
        v["Next"].as_str().expect("Next").to_owned(),
        v["SubscriberNum"].as_u64().expect("SubscriberNum"),
    )
}

#[tokio::test]
async fn get_subscriber_info_pages_with_opaque_cursors() {
    let env = Env::start().await;
    let all = users(0..450);
    env.emu.seed(Seed {
        channels: vec![SeedChannel::new(CH, all.clone())],
        ..Seed::default()
    });
    let mut seen = Vec::new();
    let mut next = String::new();
    let mut pages = 0;
    loop {
        let (list, n, total) = page(&env, CH, 200, &next).await;
        assert_eq!(total, 450);
        pages += 1;
        seen.extend(list);
        if n.is_empty() {
            break;
        }
        assert!(n.parse::<u64>().is_err(), "cursor {n:?} is a plain number");
        assert_ne!(n, seen.len().to_string());
        next = n;
        assert!(pages < 10);
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, all, "every subscriber once, in subscribe order");

    // No Limit: everything at once.
    let v = env
        .call(
            Api::GetSubscriberInfo,
            json!({"Official_Account": CH, "Next": ""}),
        )
        .await;
    assert_eq!(v["SubscriberList"].as_array().unwrap().len(), 450);
    assert_eq!(v["Next"], "");
    env.stop().await;
}

#[tokio::test]
async fn removal_between_pages_skips_no_one_under_stable_cursors() {
    let env = Env::with(EmulatorConfig {
        cursor: CursorMode::Stable,
        ..config()
    })
    .await;
    let all = users(0..450);
    env.emu.seed(Seed {
        channels: vec![SeedChannel::new(CH, all.clone())],
        ..Seed::default()
    });
    let (first, next, _) = page(&env, CH, 200, "").await;
    assert_eq!(first, all[..200]);
    // Remove two already listed (an offset cursor would now skip two) and
    // one not yet listed.
    let v = env
        .call(
            Api::DeleteSubscriber,
            del(CH, &["user0000", "user0199", "user0300"]),
        )
        .await;
    assert_eq!(code_of(&v), 0);
    let mut rest = Vec::new();
    let mut next = next;
    while !next.is_empty() {
        let (list, n, total) = page(&env, CH, 200, &next).await;
        assert_eq!(total, 447);
        rest.extend(list);
        next = n;
    }
    let expected: Vec<String> = all[200..]
        .iter()
        .filter(|u| *u != "user0300")
        .cloned()
        .collect();
    assert_eq!(rest, expected);
    env.stop().await;
}

/// Lists the whole channel, removing `remove` right after the first page.
async fn list_removing_after_first_page(env: &Env, remove: &[&str]) -> Vec<String> {
    let (mut seen, mut next, _) = page(env, CH, 200, "").await;
    let v = env.call(Api::DeleteSubscriber, del(CH, remove)).await;
    assert_eq!(code_of(&v), 0);
    while !next.is_empty() {
        let (list, n, _) = page(env, CH, 200, &next).await;
        seen.extend(list);
        next = n;
    }
    seen
}

#[tokio::test]
async fn offset_cursors_skip_members_shifted_by_a_removal() {
    let env = Env::start().await;
    assert_eq!(env.emu.cursor_mode(), CursorMode::Offset, "the default");
    let all = users(0..450);
    env.emu.seed(Seed {
        channels: vec![SeedChannel::new(CH, all.clone())],
        ..Seed::default()
    });
    let seen = list_removing_after_first_page(&env, &["user0000", "user0199", "user0300"]).await;
    // Two removed before the cursor shift user0200 and user0201 onto
    // positions already passed: the listing never shows them.
    let mut expected: Vec<String> = all.clone();
    expected.retain(|u| !["user0200", "user0201", "user0300"].contains(&u.as_str()));
    assert_eq!(seen, expected);
    env.stop().await;
}

#[tokio::test]
async fn key_cursors_list_in_account_order_after_the_last_account() {
    let env = Env::with(EmulatorConfig {
        cursor: CursorMode::Key,
        ..config()
    })
    .await;
    // Subscribed in reverse order; listed in account order.
    let mut all = users(0..450);
    all.reverse();
    env.emu.seed(Seed {
        channels: vec![SeedChannel::new(CH, all.clone())],
        ..Seed::default()
    });
    all.reverse();
    let seen = list_removing_after_first_page(&env, &["user0000", "user0199", "user0300"]).await;
    let expected: Vec<String> = all.iter().filter(|u| *u != "user0300").cloned().collect();
    assert_eq!(seen, expected, "a removal skips no one");
    // An account added before the cursor is not listed by that pass.
    let (_, next, _) = page(&env, CH, 200, "").await;
    env.emu.seed(Seed {
        channels: vec![SeedChannel::new(CH, ["user0000a"])],
        ..Seed::default()
    });
    let (rest, _, total) = page(&env, CH, 200, &next).await;
    assert_eq!(total, 448);
    assert_eq!(rest.first().map(String::as_str), Some("user0202"));
    assert!(!rest.iter().any(|u| u == "user0000a"));
    env.stop().await;
}

#[tokio::test]
async fn a_seed_switches_the_cursor_mode_and_old_cursors_are_refused() {
    let env = Env::start().await;
    env.emu.seed(Seed {
        channels: vec![SeedChannel::new(CH, users(0..5))],
        follows: vec![SeedFollow::new("me", ["a", "b", "c"])],
        ..Seed::default()
    });
    let (_, offset_next, _) = page(&env, CH, 2, "").await;
    let follow_page =
        json!({"From_Account": "me", "FollowType": 2, "StartCursor": "", "WantNum": 1});
    let v = env.call(Api::FollowGet, follow_page.clone()).await;
    let follow_next = v["NextCursor"].as_str().unwrap().to_owned();
    assert!(!follow_next.is_empty());
    // Over HTTP, as a test outside the process would.
    let r = env
        .http
        .post(format!("{}/emulator/seed", env.base))
        .json(&json!({"cursor": "stable"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    assert_eq!(env.emu.cursor_mode(), CursorMode::Stable);
    assert_eq!(
        env.code(
            Api::GetSubscriberInfo,
            json!({"Official_Account": CH, "Limit": 2, "Next": offset_next})
        )
        .await,
        6017
    );
    assert_eq!(
        env.code(
            Api::FollowGet,
            json!({"From_Account": "me", "FollowType": 2, "StartCursor": follow_next, "WantNum": 1})
        )
        .await,
        30001
    );
    let r = env
        .http
        .post(format!("{}/emulator/seed", env.base))
        .json(&json!({"cursor": "sideways"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "an unknown mode is refused");
    // A reset goes back to the configured mode.
    env.emu.reset();
    assert_eq!(env.emu.cursor_mode(), CursorMode::Offset);
    env.stop().await;
}

#[tokio::test]
async fn follow_get_offset_cursors_shift_on_removal() {
    let env = Env::start().await;
    env.emu.seed(Seed {
        follows: vec![SeedFollow::new("me", ["a", "b", "c", "d"])],
        ..Seed::default()
    });
    let get = |cursor: String| json!({"From_Account": "me", "FollowType": 2, "StartCursor": cursor, "WantNum": 2});
    let v = env.call(Api::FollowGet, get(String::new())).await;
    assert_eq!(v["FollowItem"][1]["To_Account"], "b");
    let next = v["NextCursor"].as_str().unwrap().to_owned();
    let d = env
        .call(
            Api::FollowDelete,
            json!({"From_Account": "me", "To_Account": ["a"]}),
        )
        .await;
    assert_eq!(code_of(&d), 0);
    let v = env.call(Api::FollowGet, get(next)).await;
    let rest: Vec<&str> = v["FollowItem"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["To_Account"].as_str().unwrap())
        .collect();
    assert_eq!(rest, ["d"], "c shifted onto a position already listed");
    assert_eq!(v["NextCursor"], "");
    env.stop().await;
}

#[tokio::test]
async fn get_subscriber_info_validates() {
    let env = Env::start().await;
    env.emu.seed(Seed {
        channels: vec![
            SeedChannel::new(CH, users(0..5)),
            SeedChannel::new("@TOA#_other", users(0..5)),
        ],
        ..Seed::default()
    });
    let (_, other_next, _) = page(&env, "@TOA#_other", 2, "").await;
    let api = Api::GetSubscriberInfo;
    for (body, want, what) in [
        (
            json!({"Official_Account": CH, "Limit": 201, "Next": ""}),
            6017,
            "Limit 201",
        ),
        (
            json!({"Official_Account": CH, "Limit": 0, "Next": ""}),
            6017,
            "Limit 0",
        ),
        (
            json!({"Official_Account": CH, "Limit": "50", "Next": ""}),
            6017,
            "Limit string",
        ),
        (
            json!({"Official_Account": CH, "Limit": 2.5, "Next": ""}),
            6017,
            "Limit float",
        ),
        (json!({"Official_Account": CH, "Limit": 2}), 6017, "no Next"),
        (
            json!({"Official_Account": CH, "Next": 0}),
            6017,
            "Next a number",
        ),
        (
            json!({"Official_Account": CH, "Next": "200"}),
            6017,
            "offset cursor",
        ),
        (
            json!({"Official_Account": CH, "Next": "TGSOTk="}),
            6017,
            "foreign cursor",
        ),
        (
            json!({"Official_Account": CH, "Next": other_next}),
            6017,
            "another channel's cursor",
        ),
        (
            json!({"Official_Account": "news", "Next": ""}),
            130007,
            "no prefix",
        ),
        (
            json!({"Official_Account": "@TOA#_gone", "Next": ""}),
            130004,
            "unknown",
        ),
    ] {
        assert_eq!(env.code(api, body).await, want, "{what}");
    }
    env.stop().await;
}

// ---- follows

#[tokio::test]
async fn follow_apis() {
    let env = Env::start().await;
    env.emu.seed(Seed {
        follows: vec![
            SeedFollow::new("me", ["a", "b"]),
            SeedFollow::new("b", ["me"]),
        ],
        ..Seed::default()
    });
    // follow_add: ResultCode 0 for new and existing follows.
    let v = env
        .call(
            Api::FollowAdd,
            json!({"From_Account": "me", "FollowItem": [{"To_Account": "a"}, {"To_Account": "c"}]}),
        )
        .await;
    assert_eq!(code_of(&v), 0);
    assert_eq!(v["ErrorDisplay"], "");
    assert_eq!(
        v["ResultItem"][1],
        json!({"To_Account": "c", "ResultCode": 0, "ResultInfo": ""})
    );
    assert_eq!(env.emu.following("me"), ["a", "b", "c"]);

    // follow_check: 0 none, 1 they follow me, 2 I follow them, 3 mutual.
    env.emu.seed(Seed {
        follows: vec![SeedFollow::new("z", ["me"])],
        ..Seed::default()
    });
    let v = env
        .call(
            Api::FollowCheck,
            json!({"From_Account": "me", "To_Account": ["a", "b", "z", "q"]}),
        )
        .await;
    let types: Vec<i64> = v["ResultItem"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["FollowType"].as_i64().unwrap())
        .collect();
    assert_eq!(types, [2, 3, 1, 0]);

    // follow_get pages with an opaque cursor; mutual lists only "b".
    let mut got = Vec::new();
    let mut cursor = String::new();
    loop {
        let v = env
            .call(
                Api::FollowGet,
                json!({"From_Account": "me", "FollowType": 2, "StartCursor": cursor, "WantNum": 2}),
            )
            .await;
        assert_eq!(code_of(&v), 0, "{v}");
        for item in v["FollowItem"].as_array().unwrap() {
            got.push(item["To_Account"].as_str().unwrap().to_owned());
            assert!(item["FollowTime"].as_i64().unwrap() > 0);
        }
        cursor = v["NextCursor"].as_str().unwrap().to_owned();
        if cursor.is_empty() {
            break;
        }
    }
    assert_eq!(got, ["a", "b", "c"]);
    let v = env
        .call(
            Api::FollowGet,
            json!({"From_Account": "me", "FollowType": 3, "StartCursor": "", "WantNum": 100}),
        )
        .await;
    assert_eq!(v["FollowItem"].as_array().unwrap().len(), 1);
    assert_eq!(v["FollowItem"][0]["To_Account"], "b");
    let v = env
        .call(
            Api::FollowGet,
            json!({"From_Account": "me", "FollowType": 1, "StartCursor": "", "WantNum": 100}),
        )
        .await;
    let followers: Vec<&str> = v["FollowItem"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["To_Account"].as_str().unwrap())
        .collect();
    assert_eq!(followers, ["b", "z"]);
    for bad in [
        json!({"From_Account": "me", "FollowType": 4, "StartCursor": "", "WantNum": 1}),
        json!({"From_Account": "me", "FollowType": 2, "StartCursor": "", "WantNum": 1001}),
        json!({"From_Account": "me", "FollowType": 2, "StartCursor": "xyz", "WantNum": 1}),
        json!({"From_Account": "me", "FollowType": 2, "WantNum": 1}),
    ] {
        assert_eq!(env.code(Api::FollowGet, bad).await, 30001);
    }

    // follow_delete is idempotent: removed and not-following both answer 0.
    let v = env
        .call(
            Api::FollowDelete,
            json!({"From_Account": "me", "To_Account": ["a", "nobody"]}),
        )
        .await;
    assert_eq!(code_of(&v), 0);
    assert_eq!(
        v["ResultItem"],
        json!([
            {"To_Account": "a", "ResultCode": 0, "ResultInfo": ""},
            {"To_Account": "nobody", "ResultCode": 0, "ResultInfo": ""}
        ])
    );
    assert_eq!(env.emu.following("me"), ["b", "c"]);
    let s = env.emu.stats().api("follow_delete");
    assert_eq!((s.applied, s.noop), (1, 1));
    env.stop().await;
}

#[tokio::test]
async fn follow_delete_validates_strictly() {
    let env = Env::start().await;
    let many = users(0..21);
    let twenty = users(0..20);
    let api = Api::FollowDelete;
    for (body, what) in [
        (
            json!({"From_Account": "me", "To_Account": many}),
            "21 accounts",
        ),
        (json!({"From_Account": "me", "To_Account": []}), "none"),
        (
            json!({"From_Account": "me", "To_Account": ["a", "a"]}),
            "twice",
        ),
        (
            json!({"From_Account": "me", "To_Account": ["a", "me"]}),
            "itself",
        ),
        (
            json!({"From_Account": "me", "To_Account": ["a b"]}),
            "malformed",
        ),
        (
            json!({"From_Account": "", "To_Account": ["a"]}),
            "empty From",
        ),
        (json!({"To_Account": ["a"]}), "no From"),
        (
            json!({"From_Account": "me", "To_Account": "a"}),
            "not a list",
        ),
    ] {
        let v = env.call(api, body).await;
        assert_eq!(code_of(&v), 30001, "{what}: {v}");
    }
    assert_eq!(
        env.code(api, json!({"From_Account": "me", "To_Account": twenty}))
            .await,
        0
    );
    env.stop().await;
}

// ---- create / destroy / subscribed list

#[tokio::test]
async fn channels_are_created_and_destroyed() {
    let env = Env::start().await;
    let v = env
        .call(
            Api::CreateOfficialAccount,
            json!({"Owner_Account": "owner", "Name": "News", "OfficialAccountUserID": CH}),
        )
        .await;
    assert_eq!(code_of(&v), 0);
    assert_eq!(v["OfficialAccountUserID"], CH);
    let v = env
        .call(
            Api::CreateOfficialAccount,
            json!({"Owner_Account": "owner", "Name": "Gen"}),
        )
        .await;
    let generated = v["OfficialAccountUserID"].as_str().unwrap().to_owned();
    assert!(generated.starts_with("@TOA#_") && generated.len() > 6);
    for (body, want) in [
        (
            json!({"Owner_Account": "o", "Name": "N", "OfficialAccountUserID": CH}),
            130008,
        ),
        (
            json!({"Owner_Account": "o", "Name": "N", "OfficialAccountUserID": "news"}),
            130007,
        ),
        (json!({"Owner_Account": "o"}), 6017),
    ] {
        assert_eq!(env.code(Api::CreateOfficialAccount, body).await, want);
    }

    let add = json!({"Official_Account": CH, "SubscriberList": [{"Subscriber_Account": "u1"}]});
    assert_eq!(env.code(Api::AddSubscriber, add).await, 0);
    let add =
        json!({"Official_Account": generated, "SubscriberList": [{"Subscriber_Account": "u1"}]});
    assert_eq!(env.code(Api::AddSubscriber, add).await, 0);
    let list = json!({"Subscriber_Account": "u1", "Limit": 10, "Offset": 0});
    let v = env
        .call(Api::GetSubscribedOfficialAccountList, list.clone())
        .await;
    assert_eq!(v["TotalNum"], 2);
    assert_eq!(v["OfficialAccountList"][0]["Official_Account"], CH);

    let destroy = json!({"Official_Account": CH});
    assert_eq!(
        env.code(Api::DestroyOfficialAccount, destroy.clone()).await,
        0
    );
    assert!(!env.emu.channel_exists(CH));
    assert_eq!(env.emu.subscribers(CH), None);
    let v = env.call(Api::GetSubscribedOfficialAccountList, list).await;
    assert_eq!(v["TotalNum"], 1);
    assert_eq!(env.code(Api::DestroyOfficialAccount, destroy).await, 130004);
    assert_eq!(
        env.code(
            Api::DestroyOfficialAccount,
            json!({"Official_Account": "x"})
        )
        .await,
        130007
    );
    assert_eq!(
        env.code(Api::DeleteSubscriber, del(CH, &["u1"])).await,
        130004
    );
    env.stop().await;
}

// ---- call frequency

#[tokio::test]
async fn call_frequency_over_the_limit_is_60007() {
    let env = Env::start().await;
    let url = env.url(Api::FollowCheck);
    let body = json!({"From_Account": "a", "To_Account": ["b"]}).to_string();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..250 {
        let (http, url, body) = (env.http.clone(), url.clone(), body.clone());
        tasks.spawn(async move {
            let v: Value = http
                .post(url)
                .body(body)
                .send()
                .await
                .expect("send")
                .json()
                .await
                .expect("json");
            v["ErrorCode"].as_i64().expect("ErrorCode")
        });
    }
    let mut ok = 0;
    let mut limited = 0;
    while let Some(code) = tasks.join_next().await {
        match code.unwrap() {
            0 => ok += 1,
            60007 => limited += 1,
            other => panic!("unexpected ErrorCode {other}"),
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(ok + limited, 250);
    let s = env.emu.stats().api("follow_check");
    assert_eq!(s.calls, 250);
    assert_eq!(s.code("60007"), limited);
    // A call is refused exactly when its window holds more than the limit.
    assert_eq!(limited > 0, s.peak_calls_per_second > 200, "{s:?}");
    if elapsed < Duration::from_millis(900) {
        assert_eq!((ok, limited), (200, 50), "all arrived within {elapsed:?}");
        assert_eq!(s.peak_calls_per_second, 250);
    }
    env.stop().await;
}

// ---- fault injection

#[tokio::test]
async fn injected_error_codes_and_http_faults() {
    let env = Env::start().await;
    env.emu.seed(Seed {
        channels: vec![SeedChannel::new(CH, users(0..10))],
        ..Seed::default()
    });
    env.emu.set_faults(Faults::new(vec![FaultRule::error_code(
        Some("delete_subscriber"),
        10004,
    )
    .times(2)]));
    for _ in 0..2 {
        assert_eq!(
            env.code(Api::DeleteSubscriber, del(CH, &["user0000"]))
                .await,
            10004
        );
    }
    assert_eq!(
        env.emu.subscribers(CH).unwrap().len(),
        10,
        "a refused call changes nothing"
    );
    assert_eq!(
        env.code(Api::DeleteSubscriber, del(CH, &["user0000"]))
            .await,
        0
    );
    // Other APIs were never affected.
    assert_eq!(
        env.code(
            Api::FollowDelete,
            json!({"From_Account": "a", "To_Account": ["b"]})
        )
        .await,
        0
    );

    env.emu.set_faults(Faults::new(
        vec![FaultRule::http_status(None, 502).times(1)],
    ));
    let (status, body) = env
        .post(
            env.url(Api::DeleteSubscriber),
            del(CH, &["user0001"]).to_string(),
        )
        .await;
    assert_eq!(status, 502);
    assert!(body.is_string(), "not JSON: {body}");
    assert_eq!(
        env.code(Api::DeleteSubscriber, del(CH, &["user0001"]))
            .await,
        0
    );

    // after_apply: the call is carried out, the client sees a failure.
    env.emu.set_faults(Faults::new(vec![FaultRule {
        after_apply: true,
        ..FaultRule::http_status(Some("delete_subscriber"), 504)
    }]));
    let (status, _) = env
        .post(
            env.url(Api::DeleteSubscriber),
            del(CH, &["user0002"]).to_string(),
        )
        .await;
    assert_eq!(status, 504);
    assert!(!env
        .emu
        .subscribers(CH)
        .unwrap()
        .contains(&"user0002".to_owned()));
    env.emu.clear_faults();

    let s = env.emu.stats().api("delete_subscriber");
    assert_eq!(s.code("10004"), 2);
    assert_eq!(s.code("http_502"), 1);
    assert_eq!(s.code("http_504"), 1);
    assert_eq!(s.code("0"), 2);
    assert_eq!(s.applied, 3);
    let calls: Vec<CallRecord> = env.emu.calls();
    let last = calls.last().unwrap();
    assert_eq!((last.error_code, last.http_status), (0, Some(504)));
    env.stop().await;
}

#[tokio::test]
async fn injected_item_failures_and_latency() {
    let env = Env::start().await;
    env.emu.seed(Seed {
        channels: vec![SeedChannel::new(CH, ["a", "b", "c"])],
        follows: vec![SeedFollow::new("me", ["a", "b"])],
        ..Seed::default()
    });
    env.emu.set_faults(Faults::new(vec![
        FaultRule::fail_accounts(Some("delete_subscriber"), ["b"]),
        FaultRule::fail_accounts(Some("follow_delete"), ["a"]),
        FaultRule::latency(Some("follow_check"), 300),
    ]));
    let v = env
        .call(Api::DeleteSubscriber, del(CH, &["a", "b", "zz"]))
        .await;
    assert_eq!(code_of(&v), 0);
    assert_eq!(
        results(&v),
        [("a".into(), 1), ("b".into(), 0), ("zz".into(), 2)]
    );
    assert_eq!(
        env.emu.subscribers(CH).unwrap(),
        ["b", "c"],
        "a failed item is not applied"
    );

    let v = env
        .call(
            Api::FollowDelete,
            json!({"From_Account": "me", "To_Account": ["a", "b"]}),
        )
        .await;
    assert_eq!(code_of(&v), 0);
    assert_eq!(v["ResultItem"][0]["ResultCode"], 30006);
    assert!(!v["ResultItem"][0]["ResultInfo"]
        .as_str()
        .unwrap()
        .is_empty());
    assert_eq!(v["ResultItem"][1]["ResultCode"], 0);
    assert_eq!(env.emu.following("me"), ["a"]);

    let started = Instant::now();
    let check = json!({"From_Account": "me", "To_Account": ["a"]});
    assert_eq!(env.code(Api::FollowCheck, check).await, 0);
    assert!(started.elapsed() >= Duration::from_millis(300));

    let s = env.emu.stats();
    assert_eq!(s.api("delete_subscriber").item_failures, 1);
    assert_eq!(s.api("follow_delete").item_failures, 1);
    assert_eq!(s.api("follow_delete").applied, 1);
    env.stop().await;
}

#[tokio::test]
async fn item_failure_rate_is_deterministic_given_the_seed() {
    let env = Env::start().await;
    let accounts = users(0..100);
    let run = || async {
        env.emu.reset();
        env.emu.seed(Seed {
            channels: vec![SeedChannel::new(CH, accounts.clone())],
            ..Seed::default()
        });
        env.emu.set_faults(Faults {
            rules: vec![FaultRule {
                item_failure_rate: 0.3,
                ..FaultRule::for_api(Some("delete_subscriber"))
            }],
            seed: Some(7),
        });
        let list: Vec<&str> = accounts.iter().map(String::as_str).collect();
        results(&env.call(Api::DeleteSubscriber, del(CH, &list)).await)
    };
    let first = run().await;
    assert_eq!(first, run().await);
    let failed = first.iter().filter(|(_, r)| *r == 0).count();
    assert!(
        (10..=50).contains(&failed),
        "{failed} of 100 failed at rate 0.3"
    );
    env.stop().await;
}

// ---- the test-only HTTP routes

#[tokio::test]
async fn test_routes_over_http() {
    let env = Env::start().await;
    let http = &env.http;
    let base = &env.base;
    let channel = "@TOA#_a b/c+d";
    let seed = json!({
        "channels": [{"id": channel, "subscribers": ["u1", "u2"], "max_subscribers": 10}],
        "follows": [{"from": "me", "to": ["x", "y"]}],
    });
    let r = http
        .post(format!("{base}/emulator/seed"))
        .json(&seed)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = http
        .get(format!(
            "{base}/emulator/channels/{}/subscribers",
            encode(channel)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.json::<Vec<String>>().await.unwrap(), ["u1", "u2"]);
    let r = http
        .get(format!(
            "{base}/emulator/channels/{}/subscribers",
            encode("@TOA#_none")
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let r = http
        .get(format!("{base}/emulator/follows/me"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Vec<String>>().await.unwrap(), ["x", "y"]);

    // Faults: invalid rules are refused; a valid set applies.
    let r = http
        .put(format!("{base}/emulator/faults"))
        .json(&json!({"rules": [{"api": "no_such_api", "error_code": 10004}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let r = http
        .put(format!("{base}/emulator/faults"))
        .json(&json!({"rules": [{"api": "delete_subscriber", "error_code": 20005, "count": 1}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let url = env.url_with(
        Api::DeleteSubscriber,
        &APP.to_string(),
        ADMIN,
        &admin_sig(),
        "424242",
    );
    let (_, v) = env
        .post(url.clone(), del(channel, &["u1"]).to_string())
        .await;
    assert_eq!(code_of(&v), 20005);
    let r = http
        .delete(format!("{base}/emulator/faults"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let (_, v) = env.post(url, del(channel, &["u1"]).to_string()).await;
    assert_eq!(code_of(&v), 0);

    let stats: Stats = http
        .get(format!("{base}/emulator/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let d = stats.api("delete_subscriber");
    assert_eq!(
        (d.calls, d.code("20005"), d.code("0"), d.applied),
        (2, 1, 1, 1)
    );
    assert_eq!(stats.apis.len(), Api::ALL.len());
    let calls: Vec<CallRecord> = http
        .get(format!("{base}/emulator/calls?api=delete_subscriber"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].key.as_deref(), Some(channel));
    assert_eq!(calls[0].accounts, ["u1"]);
    assert_eq!(calls[0].random, 424242);
    assert_eq!(calls[0].error_code, 20005);
    assert!(calls[0].at_ms <= calls[1].at_ms);

    let r = http
        .post(format!("{base}/emulator/reset"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(!env.emu.channel_exists(channel));
    assert_eq!(env.emu.stats().total_calls(), 0);
    assert!(env.emu.calls().is_empty());
    env.stop().await;
}
