//! The HTTP surface: `POST /v1/events` (Standard Webhooks), `/metrics`,
//! `/healthz`, `/readyz`, and the admin routes for dead letters.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::http::header::{self, HeaderMap};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

use super::signature::{SignatureError, Verifier};
use crate::dispatch::Circuit;
use crate::event::Event;
use crate::inbox::journal::{Appended, JournalError};
use crate::inbox::{Intake, IntakeError};
use crate::rules::{RuleError, Rules};
use crate::sweep::Sweeps;
use crate::telemetry::Metrics;
use crate::tencent::ChannelId;

/// Everything the handlers share.
pub struct HttpState {
    pub verifier: Verifier,
    pub rules: Arc<Rules>,
    pub intake: Intake,
    pub metrics: Metrics,
    pub circuit: Arc<Circuit>,
    pub body_limit: usize,
    pub admin_token: SecretString,
    pub sweeps: Arc<Sweeps>,
}

/// Mounts every route on an actix `App`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/events", web::post().to(post_event))
        .route("/metrics", web::get().to(metrics))
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/v1/admin/dead-letters", web::get().to(list_dead_letters))
        .route(
            "/v1/admin/dead-letters/replay",
            web::post().to(replay_dead_letters),
        )
        .route("/v1/admin/sweeps", web::post().to(start_sweep))
        .route("/v1/admin/sweeps/{id}", web::get().to(sweep_status));
}

/// An RFC 9457 problem document.
fn problem(status: StatusCode, title: &str, detail: &str, field: Option<&str>) -> HttpResponse {
    let mut body = json!({
        "type": "about:blank",
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    if let Some(f) = field {
        body["field"] = json!(f);
    }
    HttpResponse::build(status)
        .content_type("application/problem+json")
        .body(body.to_string())
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn is_json(req: &HttpRequest) -> bool {
    let Some(ct) = header(req.headers(), "content-type") else {
        return false;
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Reads at most `limit` bytes; `None` if the body is larger.
async fn read_limited(mut payload: web::Payload, limit: usize) -> Result<Option<Vec<u8>>, ()> {
    let mut body = Vec::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|_| ())?;
        if body.len() + chunk.len() > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

#[tracing::instrument(skip_all, fields(webhook_id))]
async fn post_event(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<HttpState>,
) -> HttpResponse {
    let m = &state.metrics;
    let reject = |reason: &str| m.event_rejected("webhook", reason);
    let too_large = || {
        reject("too_large");
        problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Body too large",
            &format!("the body must be at most {} bytes", state.body_limit),
            None,
        )
    };
    let declared = header(req.headers(), "content-length").and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > state.body_limit) {
        return too_large();
    }
    let body = match read_limited(payload, state.body_limit).await {
        Ok(Some(b)) => b,
        Ok(None) => return too_large(),
        Err(()) => {
            reject("malformed");
            return problem(
                StatusCode::BAD_REQUEST,
                "Unreadable body",
                "the request body could not be read",
                None,
            );
        }
    };

    let headers = req.headers();
    let (Some(id), Some(ts), Some(sig)) = (
        header(headers, "webhook-id"),
        header(headers, "webhook-timestamp"),
        header(headers, "webhook-signature"),
    ) else {
        let missing = ["webhook-id", "webhook-timestamp", "webhook-signature"]
            .into_iter()
            .find(|h| header(headers, h).is_none())
            .unwrap_or("webhook-signature");
        reject(SignatureError::MissingHeader("").reason());
        return problem(
            StatusCode::UNAUTHORIZED,
            "Missing signature",
            &format!("the {missing} header is required (Standard Webhooks)"),
            Some(missing),
        );
    };
    tracing::Span::current().record("webhook_id", id);
    if let Err(e) = state.verifier.verify(id, ts, sig, &body, unix_now()) {
        reject(e.reason());
        let field = match e {
            SignatureError::NoMatch => "webhook-signature",
            _ => "webhook-timestamp",
        };
        return problem(
            StatusCode::UNAUTHORIZED,
            "Invalid signature",
            &e.to_string(),
            Some(field),
        );
    }
    if id.is_empty() || id.len() > 256 || id.chars().any(char::is_control) {
        reject("malformed");
        return problem(
            StatusCode::BAD_REQUEST,
            "Invalid webhook-id",
            "webhook-id must be 1 to 256 printable characters",
            Some("webhook-id"),
        );
    }
    if !is_json(&req) {
        reject("unsupported_media_type");
        return problem(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Unsupported media type",
            "the body must be application/json",
            Some("content-type"),
        );
    }
    let event = match Event::parse(&body) {
        Ok(e) => e,
        Err(e) => {
            reject("malformed");
            return problem(
                StatusCode::BAD_REQUEST,
                "Invalid event",
                &e.to_string(),
                Some(&e.field),
            );
        }
    };
    if let Err(e) = state.rules.validate(&event) {
        return match e {
            RuleError::UnknownType(t) => {
                reject("unknown_type");
                problem(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Unknown event type",
                    &format!("no rule handles event type {t:?}"),
                    Some("type"),
                )
            }
            RuleError::Field(p) => {
                reject("malformed");
                problem(
                    StatusCode::BAD_REQUEST,
                    "Invalid event",
                    &p.to_string(),
                    Some(&p.field),
                )
            }
        };
    }
    let compact = serde_json::value::to_raw_value(&event).expect("an Event always serializes");
    match state.intake.accept(id, compact).await {
        Ok(Appended::New(_)) => {
            m.event_received("webhook", &event.kind);
            tracing::debug!(kind = %event.kind, "event accepted");
            HttpResponse::Accepted().json(json!({"status": "accepted", "id": id}))
        }
        Ok(Appended::Duplicate) => {
            m.event_duplicate("webhook");
            HttpResponse::Ok().json(json!({"status": "duplicate", "id": id}))
        }
        Err(e) => {
            reject("unavailable");
            match e {
                IntakeError::Journal(JournalError::Busy) => {}
                // The journal logs when its writes start and stop failing;
                // one line per refused request would fill a full disk more.
                IntakeError::Journal(JournalError::Storage(_)) => {
                    tracing::debug!(error = %e, "cannot store an event")
                }
                _ => tracing::error!(error = %e, "cannot store an event"),
            }
            let mut r = problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "Cannot accept now",
                "the event could not be stored durably; retry later",
                None,
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
            r
        }
    }
}

async fn metrics(state: web::Data<HttpState>) -> HttpResponse {
    match &state.intake {
        Intake::Journal(j) => {
            state.metrics.set_journal_events(j.pending());
            state.metrics.set_journal_storage(&j.stats());
        }
        Intake::Broker(b) => state.metrics.set_broker_connected(b.is_connected()),
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}

/// Alive unless the journal cannot be reopened: then a restart (or an
/// operator) is needed, so the orchestrator is told.
async fn healthz(state: web::Data<HttpState>) -> HttpResponse {
    match state.intake.broken() {
        None => HttpResponse::Ok().json(json!({"status": "alive"})),
        Some(reason) => HttpResponse::ServiceUnavailable().json(json!({
            "status": "broken",
            "reason": reason,
        })),
    }
}

async fn readyz(state: web::Data<HttpState>) -> HttpResponse {
    let mut reasons = Vec::new();
    if let Some(r) = state.intake.not_ready() {
        reasons.push(r);
    }
    if let Some(r) = state.circuit.open_reason() {
        reasons.push(format!("upstream credentials rejected: {r}"));
    }
    if reasons.is_empty() {
        HttpResponse::Ok().json(json!({"status": "ready"}))
    } else {
        HttpResponse::ServiceUnavailable().json(json!({
            "status": "not ready",
            "reason": reasons.join("; "),
        }))
    }
}

/// An admin route's JSON body, or the 400 problem naming what is wrong
/// (returned at once as the answer, so its size does not matter).
#[allow(clippy::result_large_err)]
fn json_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
    title: &str,
    field: Option<&str>,
) -> Result<T, HttpResponse> {
    serde_json::from_slice(body)
        .map_err(|e| problem(StatusCode::BAD_REQUEST, title, &e.to_string(), field))
}

/// `Some(response)` when the request may not use the admin routes.
fn admin_denied(req: &HttpRequest, token: &SecretString) -> Option<HttpResponse> {
    let want = token.expose_secret();
    if want.is_empty() {
        return Some(problem(
            StatusCode::NOT_FOUND,
            "Not found",
            "admin routes are off ([admin] token is empty)",
            None,
        ));
    }
    let given = header(req.headers(), "authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(want.as_bytes())) {
        None
    } else {
        Some(problem(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "a valid bearer token is required",
            Some("authorization"),
        ))
    }
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    limit: Option<usize>,
}

async fn list_dead_letters(
    req: HttpRequest,
    q: web::Query<ListQuery>,
    state: web::Data<HttpState>,
) -> HttpResponse {
    if let Some(denied) = admin_denied(&req, &state.admin_token) {
        return denied;
    }
    let Some(journal) = state.intake.journal() else {
        return broker_dead_letters();
    };
    match journal
        .dead_letters(q.limit.unwrap_or(1000).min(100_000))
        .await
    {
        Ok(list) => HttpResponse::Ok().json(json!({"dead_letters": list})),
        Err(e) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "Journal unavailable",
            &e.to_string(),
            None,
        ),
    }
}

#[derive(Debug, Default, Deserialize)]
struct ReplayBody {
    ids: Option<Vec<u64>>,
}

async fn replay_dead_letters(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<HttpState>,
) -> HttpResponse {
    if let Some(denied) = admin_denied(&req, &state.admin_token) {
        return denied;
    }
    let parsed: ReplayBody = if body.is_empty() {
        ReplayBody::default()
    } else {
        match json_body(&body, "Invalid body", Some("ids")) {
            Ok(b) => b,
            Err(r) => return r,
        }
    };
    let Some(journal) = state.intake.journal() else {
        return broker_dead_letters();
    };
    match journal.replay_dead_letters(parsed.ids).await {
        Ok(n) => HttpResponse::Accepted().json(json!({"replayed": n})),
        Err(e) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "Journal unavailable",
            &e.to_string(),
            None,
        ),
    }
}

/// In broker mode dead letters are messages in `<queue>.dead`.
fn broker_dead_letters() -> HttpResponse {
    problem(
        StatusCode::NOT_IMPLEMENTED,
        "Dead letters are on the broker",
        "in broker mode dead letters are messages in the queue <amqp.queue>.dead; read or move them with RabbitMQ's tools",
        None,
    )
}

#[derive(Debug, Deserialize)]
struct SweepRequest {
    channel: String,
    #[serde(default)]
    deny: Vec<String>,
    #[serde(default)]
    dry_run: bool,
}

async fn start_sweep(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<HttpState>,
) -> HttpResponse {
    if let Some(denied) = admin_denied(&req, &state.admin_token) {
        return denied;
    }
    let r: SweepRequest = match json_body(&body, "Invalid sweep", None) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let channel = match ChannelId::parse(r.channel) {
        Ok(c) => c,
        Err(e) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "Invalid sweep",
                &format!("channel: {e}"),
                Some("channel"),
            );
        }
    };
    let deny = r
        .deny
        .into_iter()
        .map(|d| d.trim().to_owned())
        .filter(|d| !d.is_empty())
        .collect();
    match state.sweeps.start(channel, deny, r.dry_run) {
        Some(id) => HttpResponse::Accepted().json(json!({
            "id": id,
            "status": format!("/v1/admin/sweeps/{id}"),
        })),
        None => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "Shutting down",
            "no new sweeps while shutting down",
            None,
        ),
    }
}

async fn sweep_status(
    req: HttpRequest,
    id: web::Path<u64>,
    state: web::Data<HttpState>,
) -> HttpResponse {
    if let Some(denied) = admin_denied(&req, &state.admin_token) {
        return denied;
    }
    match state.sweeps.status(id.into_inner()) {
        Some(s) => HttpResponse::Ok().json(s),
        None => problem(
            StatusCode::NOT_FOUND,
            "No such sweep",
            "unknown sweep id (finished sweeps are kept for a while)",
            None,
        ),
    }
}
