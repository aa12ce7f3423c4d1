//! HTTP: the vendor's `/v4/{service}/{command}` endpoints with their checks in
//! the vendor's order, and the test-only routes under `/emulator/`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use actix_web::http::{header, Method, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Map, Value};

use super::endpoints::{self, Outcome};
use super::faults::info_for;
use super::meter::ItemCounts;
use super::model::{CallRecord, Faults, Seed};
use super::{now_ms, now_secs, Inner};
use crate::tencent::Api;

/// Largest request body accepted (the vendor's real bodies are a few KiB).
pub(crate) const BODY_LIMIT: usize = 4 * 1024 * 1024;
/// Largest seed accepted by `POST /emulator/seed` (big channels for benchmarks).
pub(crate) const SEED_LIMIT: usize = 512 * 1024 * 1024;

const HTTP_PARSE_ERROR: i64 = 60002;
const BODY_NOT_JSON: i64 = 60003;
const SDKAPPID_INVALID: i64 = 60006;
const RATE_LIMITED: i64 = 60007;
const NOT_ADMIN: i64 = 60010;
const SDKAPPID_MISSING: i64 = 60012;

pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::PayloadConfig::new(BODY_LIMIT))
        .service(web::resource("/v4/{service}/{command}").route(web::route().to(v4)))
        .service(
            web::resource("/emulator/seed")
                .app_data(web::PayloadConfig::new(SEED_LIMIT))
                .route(web::post().to(seed)),
        )
        .service(
            web::resource("/emulator/faults")
                .route(web::put().to(put_faults))
                .route(web::get().to(get_faults))
                .route(web::delete().to(delete_faults)),
        )
        .service(web::resource("/emulator/reset").route(web::post().to(reset)))
        .service(web::resource("/emulator/stats").route(web::get().to(stats)))
        .service(web::resource("/emulator/calls").route(web::get().to(calls)))
        .service(web::resource("/emulator/channels/{tail:.*}").route(web::get().to(channel)))
        .service(web::resource("/emulator/follows/{tail:.*}").route(web::get().to(follows)));
}

// ---- the vendor endpoints

/// The URL parameters every call carries.
struct Params {
    sdkappid: u64,
    identifier: String,
    usersig: String,
    random: u32,
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Step 1: the query parameters (names are case-sensitive).
fn parse_params(query: &str) -> Result<Params, (i64, String)> {
    let pairs = web::Query::<Vec<(String, String)>>::from_query(query)
        .map_err(|e| {
            (
                HTTP_PARSE_ERROR,
                format!("the URL's query string cannot be parsed: {e}"),
            )
        })?
        .into_inner();
    let mut seen = HashSet::new();
    for (k, _) in &pairs {
        if !seen.insert(k.as_str()) {
            return Err((
                HTTP_PARSE_ERROR,
                format!("URL parameter {k} is given more than once"),
            ));
        }
    }
    let get = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let missing = |name: &str| {
        (
            HTTP_PARSE_ERROR,
            format!("URL parameter {name} is missing or empty"),
        )
    };

    let sdkappid = match get("sdkappid") {
        None | Some("") => {
            return Err((
                SDKAPPID_MISSING,
                "REST API requires an SDKAppID: the URL has no sdkappid parameter".into(),
            ))
        }
        Some(s) => match s.parse::<u64>() {
            Ok(n) if all_digits(s) => n,
            _ => {
                return Err((
                    HTTP_PARSE_ERROR,
                    format!("URL parameter sdkappid {s:?} is not an unsigned integer"),
                ))
            }
        },
    };
    let identifier = match get("identifier") {
        None | Some("") => return Err(missing("identifier")),
        Some(s) => s.to_owned(),
    };
    let usersig = match get("usersig") {
        None | Some("") => return Err(missing("usersig")),
        Some(s) => s.to_owned(),
    };
    let random = match get("random") {
        None | Some("") => return Err(missing("random")),
        Some(s) => match s.parse::<u32>() {
            Ok(n) if all_digits(s) => n,
            _ => {
                return Err((
                    HTTP_PARSE_ERROR,
                    format!("URL parameter random {s:?} is not an integer within 0..=4294967295"),
                ))
            }
        },
    };
    match get("contenttype") {
        Some("json") => {}
        None | Some("") => return Err(missing("contenttype")),
        Some(other) => {
            return Err((
                HTTP_PARSE_ERROR,
                format!("URL parameter contenttype must be \"json\", not {other:?}"),
            ))
        }
    }
    Ok(Params {
        sdkappid,
        identifier,
        usersig,
        random,
    })
}

/// The vendor's JSON answer.
fn vendor(api: Api, code: i64, info: &str, fields: Map<String, Value>) -> HttpResponse {
    let mut body = Map::new();
    body.insert(
        "ActionStatus".into(),
        Value::from(if code == 0 { "OK" } else { "FAIL" }),
    );
    body.insert("ErrorCode".into(), Value::from(code));
    body.insert("ErrorInfo".into(), Value::from(info));
    if api.service() == "follow" {
        body.insert("ErrorDisplay".into(), Value::from(""));
    }
    body.extend(fields);
    HttpResponse::Ok()
        .content_type("application/json; charset=utf-8")
        .body(Value::Object(body).to_string())
}

/// What a gateway answers when the service behind it fails.
fn http_fault(status: u16) -> HttpResponse {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    let reason = status.canonical_reason().unwrap_or("Error");
    HttpResponse::build(status)
        .content_type("text/html")
        .body(format!(
            "<html>\r\n<head><title>{code} {reason}</title></head>\r\n<body>\r\n<center><h1>{code} {reason}</h1></center>\r\n</body>\r\n</html>\r\n",
            code = status.as_u16()
        ))
}

/// The field holding the batch's accounts, and the key inside its objects.
fn list_field(api: Api) -> Option<(&'static str, Option<&'static str>)> {
    match api {
        Api::DeleteSubscriber => Some(("SubscriberToDel_Account", None)),
        Api::AddSubscriber => Some(("SubscriberList", Some("Subscriber_Account"))),
        Api::FollowDelete | Api::FollowCheck => Some(("To_Account", None)),
        Api::FollowAdd => Some(("FollowItem", Some("To_Account"))),
        _ => None,
    }
}

/// What the call log keeps of a body, read leniently whatever its validity:
/// the key account, the batch's accounts, the batch's length.
fn log_info(api: Api, body: Option<&Map<String, Value>>) -> (Option<String>, Vec<String>, u64) {
    let Some(body) = body else {
        return (None, Vec::new(), 0);
    };
    let key = [
        "Official_Account",
        "From_Account",
        "Subscriber_Account",
        "Owner_Account",
    ]
    .iter()
    .find_map(|k| body.get(*k).and_then(Value::as_str))
    .map(str::to_owned);
    let Some((field, inner)) = list_field(api) else {
        return (key, Vec::new(), 0);
    };
    let Some(list) = body.get(field).and_then(Value::as_array) else {
        return (key, Vec::new(), 0);
    };
    let accounts = list
        .iter()
        .filter_map(|v| match inner {
            None => v.as_str(),
            Some(k) => v.get(k).and_then(Value::as_str),
        })
        .map(str::to_owned)
        .collect();
    (key, accounts, list.len() as u64)
}

/// Everything needed to record a call once it is answered.
struct Call {
    api: Api,
    at_ms: u64,
    random: u32,
    key: Option<String>,
    accounts: Vec<String>,
    listed: u64,
}

impl Call {
    fn record(self, inner: &Inner, error_code: i64, http_status: Option<u16>, counts: ItemCounts) {
        tracing::debug!(
            api = self.api.name(),
            error_code,
            http_status,
            random = self.random,
            items = self.listed,
            "emulator call"
        );
        let rec = CallRecord {
            api: self.api.name().to_owned(),
            at_ms: self.at_ms,
            error_code,
            http_status,
            key: self.key,
            accounts: self.accounts,
            random: self.random,
        };
        inner.meter.lock().record(
            self.api,
            rec,
            ItemCounts {
                listed: self.listed,
                ..counts
            },
        );
    }
}

async fn v4(req: HttpRequest, body: web::Bytes, inner: web::Data<Inner>) -> HttpResponse {
    let service = req.match_info().get("service").unwrap_or_default();
    let command = req.match_info().get("command").unwrap_or_default();
    let Some(api) = Api::from_path(service, command) else {
        return HttpResponse::NotFound()
            .content_type("text/plain")
            .body(format!("no such API: /v4/{service}/{command}\n"));
    };
    if req.method() != Method::POST {
        return HttpResponse::MethodNotAllowed()
            .insert_header((header::ALLOW, "POST"))
            .content_type("text/plain")
            .body("only POST is allowed\n");
    }
    let arrived = Instant::now();
    let at_ms = now_ms();
    let config = &inner.config;

    // 1. URL parameters.
    let params = match parse_params(req.query_string()) {
        Ok(p) => p,
        Err((code, info)) => {
            inner.meter.lock().refused(api, code);
            return vendor(api, code, &info, Map::new());
        }
    };
    // 2. Our SDKAppID.
    if params.sdkappid != config.sdkappid {
        inner.meter.lock().refused(api, SDKAPPID_INVALID);
        let info = format!(
            "SDKAppID {} is invalid (no such application)",
            params.sdkappid
        );
        return vendor(api, SDKAPPID_INVALID, &info, Map::new());
    }
    // 3. UserSig.
    if let Err(e) = inner.verify_usersig(&params.usersig, &params.identifier, now_secs()) {
        let code = e.error_code();
        inner.meter.lock().refused(api, code);
        return vendor(api, code, &format!("{e}"), Map::new());
    }
    // 4. An app admin.
    if !config.admins.contains(&params.identifier) {
        inner.meter.lock().refused(api, NOT_ADMIN);
        let info = format!(
            "identifier {:?} is not an app admin; this request requires app admin permissions",
            params.identifier
        );
        return vendor(api, NOT_ADMIN, &info, Map::new());
    }

    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let (key, accounts, listed) = log_info(api, parsed.as_ref().and_then(Value::as_object));
    let call = Call {
        api,
        at_ms,
        random: params.random,
        key,
        accounts,
        listed,
    };

    // 5. Call frequency.
    let in_window = inner.meter.lock().arrive(api, arrived);
    if in_window > u64::from(config.rate_per_api) {
        call.record(&inner, RATE_LIMITED, None, ItemCounts::default());
        let info = format!(
            "REST API call frequency exceeds the limit: {in_window} calls of {} within one second, at most {} per second",
            api.name(),
            config.rate_per_api
        );
        return vendor(api, RATE_LIMITED, &info, Map::new());
    }

    // 6. A JSON object body.
    let obj = match parsed {
        Some(Value::Object(obj)) => obj,
        other => {
            let info = if body.iter().all(u8::is_ascii_whitespace) {
                "the request body is empty; it must be a JSON object (at least {})".to_owned()
            } else if let Some(v) = other {
                format!(
                    "the request body must be a JSON object, not {}",
                    endpoints::type_name(&v)
                )
            } else {
                "the request body is not valid JSON".to_owned()
            };
            call.record(&inner, BODY_NOT_JSON, None, ItemCounts::default());
            return vendor(api, BODY_NOT_JSON, &info, Map::new());
        }
    };

    // 7. Injected faults.
    let decision = inner.faults.lock().decide(api);
    if decision.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(decision.latency_ms)).await;
    }
    if !decision.after_apply {
        if let Some(status) = decision.http_status {
            call.record(&inner, 0, Some(status), ItemCounts::default());
            return http_fault(status);
        }
        if let Some(code) = decision.error_code {
            call.record(&inner, code, None, ItemCounts::default());
            return vendor(api, code, info_for(code), Map::new());
        }
    }

    // 8. The endpoint.
    let outcome = match endpoints::parse(api, &obj) {
        Err(refusal) => Outcome::from(refusal),
        Ok(request) => {
            let failed = if decision.fails_items() {
                inner
                    .faults
                    .lock()
                    .item_failures(&decision, request.items())
            } else {
                Vec::new()
            };
            let now = i64::try_from(now_secs()).unwrap_or(i64::MAX);
            endpoints::execute(&mut inner.world.lock(), request, &failed, now)
        }
    };
    if decision.after_apply {
        if let Some(status) = decision.http_status {
            call.record(&inner, 0, Some(status), outcome.counts);
            return http_fault(status);
        }
        if let Some(code) = decision.error_code {
            call.record(&inner, code, None, outcome.counts);
            return vendor(api, code, info_for(code), Map::new());
        }
    }
    call.record(&inner, outcome.code, None, outcome.counts);
    let fields = if outcome.code == 0 {
        outcome.fields
    } else {
        Map::new()
    };
    vendor(api, outcome.code, &outcome.info, fields)
}

// ---- test-only routes

fn bad_request(msg: impl Into<String>) -> HttpResponse {
    HttpResponse::BadRequest().json(json!({ "error": msg.into() }))
}

fn ok() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "ok": true }))
}

async fn seed(body: web::Bytes, inner: web::Data<Inner>) -> HttpResponse {
    match serde_json::from_slice::<Seed>(&body) {
        Ok(s) => {
            inner.seed(&s);
            ok()
        }
        Err(e) => bad_request(format!("not a seed: {e}")),
    }
}

async fn put_faults(body: web::Bytes, inner: web::Data<Inner>) -> HttpResponse {
    let faults = match serde_json::from_slice::<Faults>(&body) {
        Ok(f) => f,
        Err(e) => return bad_request(format!("not a fault set: {e}")),
    };
    for (i, rule) in faults.rules.iter().enumerate() {
        if let Err(e) = rule.validate() {
            return bad_request(format!("rules[{i}]: {e}"));
        }
    }
    inner.set_faults(faults);
    ok()
}

async fn get_faults(inner: web::Data<Inner>) -> HttpResponse {
    HttpResponse::Ok().json(inner.faults.lock().current())
}

async fn delete_faults(inner: web::Data<Inner>) -> HttpResponse {
    inner.set_faults(Faults::default());
    ok()
}

async fn reset(inner: web::Data<Inner>) -> HttpResponse {
    inner.reset();
    ok()
}

async fn stats(inner: web::Data<Inner>) -> HttpResponse {
    HttpResponse::Ok().json(inner.meter.lock().stats())
}

#[derive(serde::Deserialize)]
struct CallsQuery {
    api: Option<String>,
}

async fn calls(req: HttpRequest, inner: web::Data<Inner>) -> HttpResponse {
    let q = match web::Query::<CallsQuery>::from_query(req.query_string()) {
        Ok(q) => q.into_inner(),
        Err(e) => return bad_request(format!("bad query: {e}")),
    };
    let mut calls = inner.meter.lock().calls();
    if let Some(api) = q.api {
        calls.retain(|c| c.api == api);
    }
    HttpResponse::Ok().json(calls)
}

/// Decodes `%XX` escapes (and nothing else: `+` stays `+` in a path).
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `GET /emulator/channels/{id}/subscribers`, the id percent-encoded.
async fn channel(req: HttpRequest, inner: web::Data<Inner>) -> HttpResponse {
    let raw = req.uri().path();
    let Some(rest) = raw.strip_prefix("/emulator/channels/") else {
        return HttpResponse::NotFound().finish();
    };
    let Some(encoded) = rest.strip_suffix("/subscribers") else {
        return HttpResponse::NotFound()
            .json(json!({ "error": "try /emulator/channels/{id}/subscribers" }));
    };
    let Some(id) = percent_decode(encoded) else {
        return bad_request("the channel id is not valid percent-encoded UTF-8");
    };
    match inner.subscribers(&id) {
        Some(list) => HttpResponse::Ok().json(list),
        None => HttpResponse::NotFound().json(json!({ "error": format!("no channel {id:?}") })),
    }
}

/// `GET /emulator/follows/{from}`: whom `from` follows, in follow order.
async fn follows(req: HttpRequest, inner: web::Data<Inner>) -> HttpResponse {
    let raw = req.uri().path();
    let Some(encoded) = raw.strip_prefix("/emulator/follows/") else {
        return HttpResponse::NotFound().finish();
    };
    let Some(from) = percent_decode(encoded) else {
        return bad_request("the account is not valid percent-encoded UTF-8");
    };
    HttpResponse::Ok().json(inner.following(&from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_are_strict() {
        let ok = "sdkappid=1&identifier=admin&usersig=abc&random=4294967295&contenttype=json";
        let p = parse_params(ok).map_err(|e| e.0).unwrap();
        assert_eq!((p.sdkappid, p.random), (1, u32::MAX));
        let code = |q: &str| parse_params(q).err().map(|e| e.0);
        assert_eq!(
            code("identifier=a&usersig=b&random=1&contenttype=json"),
            Some(60012)
        );
        assert_eq!(
            code("SDKAppID=1&identifier=a&usersig=b&random=1&contenttype=json"),
            Some(60012)
        );
        assert_eq!(
            code("sdkappid=x&identifier=a&usersig=b&random=1&contenttype=json"),
            Some(60002)
        );
        assert_eq!(
            code("sdkappid=1&identifier=a&usersig=b&random=4294967296&contenttype=json"),
            Some(60002)
        );
        assert_eq!(
            code("sdkappid=1&identifier=a&usersig=b&random=-1&contenttype=json"),
            Some(60002)
        );
        assert_eq!(
            code("sdkappid=1&identifier=a&usersig=b&random=+1&contenttype=json"),
            Some(60002)
        );
        assert_eq!(
            code("sdkappid=1&identifier=a&usersig=b&contenttype=json"),
            Some(60002)
        );
        assert_eq!(
            code("sdkappid=1&identifier=a&usersig=b&random=1&contenttype=JSON"),
            Some(60002)
        );
        assert_eq!(
            code("sdkappid=1&identifier=a&usersig=b&random=1"),
            Some(60002)
        );
        assert_eq!(
            code("sdkappid=1&identifier=&usersig=b&random=1&contenttype=json"),
            Some(60002)
        );
        assert_eq!(code(&format!("{ok}&random=2")), Some(60002));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("%40TOA%23_a+b").as_deref(),
            Some("@TOA#_a+b")
        );
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%ff"), None);
    }
}
