//! The public HTTP surface: `POST /v1/events` (Standard Webhooks),
//! `/metrics`, `/healthz`, `/readyz`; the admin routes are mounted from
//! `admin`, the record routes (`GET /v1/events...`) from `records`.

use std::sync::Arc;

use actix_web::http::header::{self, HeaderMap};
use actix_web::http::StatusCode;
use actix_web::middleware::from_fn;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use futures_util::StreamExt;
use secrecy::SecretString;
use serde_json::json;

use super::signature::{SignatureError, Verifier};
use crate::dispatch::Circuit;
use crate::domain::clock::unix_now;
use crate::domain::{RejectReason, Source};
use crate::event::{Event, ParseError};
use crate::fate::{FateStore, InFlight};
use crate::inbox::journal::JournalError;
use crate::inbox::{Inbox, InboxError, Stored};
use crate::rules::{RuleError, Rules};
use crate::sweep::Sweeps;
use crate::telemetry::Metrics;

/// Everything the handlers share.
pub struct HttpState {
    pub verifier: Verifier,
    pub rules: Arc<Rules>,
    pub inbox: Arc<dyn Inbox>,
    pub metrics: Metrics,
    pub circuit: Arc<Circuit>,
    pub body_limit: usize,
    pub admin_token: SecretString,
    pub sweeps: Arc<Sweeps>,
    /// Where settled events' records are, or why there is no store.
    pub fate: Result<Arc<dyn FateStore>, NoRecords>,
    /// Events the pipeline still works on.
    pub in_flight: Arc<dyn InFlight>,
    /// `[records] read_token`: may read records, nothing else.
    pub read_token: SecretString,
}

/// Why the service keeps no event records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoRecords {
    /// Turned off (`records.enabled = false`).
    Disabled,
    /// The store could not be opened (the clean-up runs without it).
    Unavailable(String),
}

/// Mounts every route on an actix `App`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/v1/events")
            .route(web::post().to(post_event))
            .route(
                web::get()
                    .to(super::records::by_user)
                    .wrap(from_fn(super::admin::require_reader)),
            ),
    )
    .route(
        "/v1/events/{id}",
        web::get()
            .to(super::records::by_id)
            .wrap(from_fn(super::admin::require_reader)),
    )
    .route("/metrics", web::get().to(metrics))
    .route("/healthz", web::get().to(healthz))
    .route("/readyz", web::get().to(readyz))
    .service(super::admin::scope());
}

/// An RFC 9457 problem document as an answer.
pub(super) fn problem(
    status: StatusCode,
    title: &str,
    detail: &str,
    field: Option<&str>,
) -> HttpResponse {
    problem_answer(status, &problem_body(status, title, detail, field))
}

/// An RFC 9457 problem document, for routes that add members to it.
pub(super) fn problem_body(
    status: StatusCode,
    title: &str,
    detail: &str,
    field: Option<&str>,
) -> serde_json::Value {
    let mut body = json!({
        "type": "about:blank",
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    if let Some(f) = field {
        body["field"] = json!(f);
    }
    body
}

pub(super) fn problem_answer(status: StatusCode, body: &serde_json::Value) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("application/problem+json")
        .body(body.to_string())
}

/// Why `POST /v1/events` refused an event: each is one status, one
/// problem document, one `reason` label.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("the body must be at most {0} bytes")]
    TooLarge(usize),
    #[error("the request body could not be read")]
    Unreadable,
    #[error("the {0} header is required (Standard Webhooks)")]
    MissingHeader(&'static str),
    #[error(transparent)]
    Signature(SignatureError),
    #[error("webhook-id must be 1 to 256 printable characters")]
    InvalidId,
    #[error("the body must be application/json")]
    NotJson,
    #[error(transparent)]
    Invalid(ParseError),
    #[error("no rule handles event type {0:?}")]
    UnknownType(String),
    #[error("the event could not be stored durably; retry later")]
    Unavailable,
}

impl WebhookError {
    pub fn reason(&self) -> RejectReason {
        match self {
            WebhookError::TooLarge(_) => RejectReason::TooLarge,
            WebhookError::Unreadable | WebhookError::InvalidId | WebhookError::Invalid(_) => {
                RejectReason::Malformed
            }
            WebhookError::MissingHeader(_) => RejectReason::SignatureMissing,
            WebhookError::Signature(e) => e.reason(),
            WebhookError::NotJson => RejectReason::UnsupportedMediaType,
            WebhookError::UnknownType(_) => RejectReason::UnknownType,
            WebhookError::Unavailable => RejectReason::Unavailable,
        }
    }

    fn title(&self) -> &'static str {
        match self {
            WebhookError::TooLarge(_) => "Body too large",
            WebhookError::Unreadable => "Unreadable body",
            WebhookError::MissingHeader(_) => "Missing signature",
            WebhookError::Signature(_) => "Invalid signature",
            WebhookError::InvalidId => "Invalid webhook-id",
            WebhookError::NotJson => "Unsupported media type",
            WebhookError::Invalid(_) => "Invalid event",
            WebhookError::UnknownType(_) => "Unknown event type",
            WebhookError::Unavailable => "Cannot accept now",
        }
    }

    /// The request field the problem names, if one.
    fn field(&self) -> Option<&str> {
        match self {
            WebhookError::MissingHeader(h) => Some(h),
            WebhookError::Signature(SignatureError::NoMatch) => Some("webhook-signature"),
            WebhookError::Signature(_) => Some("webhook-timestamp"),
            WebhookError::InvalidId => Some("webhook-id"),
            WebhookError::NotJson => Some("content-type"),
            WebhookError::Invalid(p) => Some(&p.field),
            WebhookError::UnknownType(_) => Some("type"),
            WebhookError::TooLarge(_) | WebhookError::Unreadable | WebhookError::Unavailable => {
                None
            }
        }
    }
}

impl ResponseError for WebhookError {
    fn status_code(&self) -> StatusCode {
        match self {
            WebhookError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            WebhookError::Unreadable | WebhookError::InvalidId | WebhookError::Invalid(_) => {
                StatusCode::BAD_REQUEST
            }
            WebhookError::MissingHeader(_) | WebhookError::Signature(_) => StatusCode::UNAUTHORIZED,
            WebhookError::NotJson => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            WebhookError::UnknownType(_) => StatusCode::UNPROCESSABLE_ENTITY,
            WebhookError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut r = problem(
            self.status_code(),
            self.title(),
            &self.to_string(),
            self.field(),
        );
        if matches!(self, WebhookError::Unavailable) {
            // Senders retry 503 and honour Retry-After.
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
        }
        r
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
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

/// Reads at most `limit` bytes.
async fn read_limited(mut payload: web::Payload, limit: usize) -> Result<Vec<u8>, WebhookError> {
    let mut body = Vec::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|_| WebhookError::Unreadable)?;
        if body.len() + chunk.len() > limit {
            return Err(WebhookError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

// Debug level: a span per request at info would cost every 202 a span's
// allocation and bookkeeping for nothing that info logs use.
#[tracing::instrument(level = "debug", skip_all, fields(webhook_id))]
async fn post_event(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<HttpState>,
) -> Result<HttpResponse, WebhookError> {
    let answer = accept(&req, payload, &state).await;
    if let Err(e) = &answer {
        state.metrics.event_rejected(Source::Webhook, e.reason());
    }
    answer
}

/// The answer to a stored event, serialized straight from borrowed fields
/// (the same bytes a `json!` map gave: its keys were sorted).
#[derive(serde::Serialize)]
struct Ack<'a> {
    id: &'a str,
    status: &'static str,
}

async fn accept(
    req: &HttpRequest,
    payload: web::Payload,
    state: &HttpState,
) -> Result<HttpResponse, WebhookError> {
    let declared = header(req.headers(), "content-length").and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > state.body_limit) {
        return Err(WebhookError::TooLarge(state.body_limit));
    }
    let body = read_limited(payload, state.body_limit).await?;

    let headers = req.headers();
    let [id, ts, sig] = ["webhook-id", "webhook-timestamp", "webhook-signature"]
        .map(|name| header(headers, name).ok_or(WebhookError::MissingHeader(name)));
    let (id, ts, sig) = (id?, ts?, sig?);
    tracing::Span::current().record("webhook_id", id);
    let now = i64::try_from(unix_now()).unwrap_or(i64::MAX);
    state
        .verifier
        .verify(id, ts, sig, &body, now)
        .map_err(WebhookError::Signature)?;
    if id.is_empty() || id.len() > 256 || id.chars().any(char::is_control) {
        return Err(WebhookError::InvalidId);
    }
    if !is_json(req) {
        return Err(WebhookError::NotJson);
    }
    let event = Event::parse(&body).map_err(WebhookError::Invalid)?;
    state.rules.validate(&event).map_err(|e| match e {
        RuleError::UnknownType(t) => WebhookError::UnknownType(t),
        RuleError::Field(p) => WebhookError::Invalid(p),
    })?;
    // Stored as received: it parsed, and it is what the sender signed.
    match state.inbox.store(id, body).await {
        Ok(Stored::New) => {
            state.metrics.event_received(Source::Webhook, &event.kind);
            tracing::debug!(kind = %event.kind, "event accepted");
            Ok(HttpResponse::Accepted().json(Ack {
                id,
                status: "accepted",
            }))
        }
        Ok(Stored::Duplicate) => {
            state.metrics.event_duplicate(Source::Webhook);
            Ok(HttpResponse::Ok().json(Ack {
                id,
                status: "duplicate",
            }))
        }
        Err(e) => {
            match e {
                e if e.is_busy() => {}
                // The journal logs when its writes start and stop failing;
                // one line per refused request would fill a full disk more.
                InboxError::Journal(JournalError::Storage(_)) => {
                    tracing::debug!(error = %e, "cannot store an event")
                }
                e => tracing::error!(webhook_id = %id, error = %e, "cannot store an event"),
            }
            Err(WebhookError::Unavailable)
        }
    }
}

async fn metrics(state: web::Data<HttpState>) -> HttpResponse {
    state.inbox.observe(&state.metrics);
    if let Ok(store) = &state.fate {
        let s = store.stats();
        state.metrics.set_records_storage(s.bytes, s.records);
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}

/// Alive unless the journal cannot be reopened: then a restart (or an
/// operator) is needed, so the orchestrator is told.
async fn healthz(state: web::Data<HttpState>) -> HttpResponse {
    match state.inbox.broken() {
        None => HttpResponse::Ok().json(json!({"status": "alive"})),
        Some(reason) => HttpResponse::ServiceUnavailable().json(json!({
            "status": "broken",
            "reason": reason,
        })),
    }
}

async fn readyz(state: web::Data<HttpState>) -> HttpResponse {
    let mut reasons = Vec::new();
    if let Some(r) = state.inbox.not_ready() {
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

/// Maps an inbox failure on an admin route to its answer.
pub(super) fn inbox_problem(e: &InboxError) -> HttpResponse {
    match e {
        InboxError::Unsupported(detail) => problem(
            StatusCode::NOT_IMPLEMENTED,
            "Not available in this mode",
            detail,
            None,
        ),
        other => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "Inbox unavailable",
            &other.to_string(),
            None,
        ),
    }
}
