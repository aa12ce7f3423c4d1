//! The admin routes, under one scope behind the bearer token (`[admin]
//! token`; the routes answer 404 while it is empty): dead letters (list,
//! replay) and sweeps (start, status). The same guard, which also takes
//! `[records] read_token`, stands before the record routes (`records`).

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, HttpResponse, Scope};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

use super::http::{inbox_problem, problem, HttpState};
use crate::domain::ChannelId;
use crate::sweep::StartError;

/// The `/v1/admin` scope, guarded.
pub fn scope() -> Scope<
    impl actix_web::dev::ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<BoxBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    web::scope("/v1/admin")
        .wrap(from_fn(require_token))
        .route("/dead-letters", web::get().to(list_dead_letters))
        .route("/dead-letters/replay", web::post().to(replay_dead_letters))
        .route("/sweeps", web::post().to(start_sweep))
        .route("/sweeps/{id}", web::get().to(sweep_status))
}

/// Who a guarded route lets in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// The admin token (`[admin] token`).
    Admin,
    /// The admin token or the records' read token (`[records] read_token`).
    Records,
}

/// Lets a request through only with the admin bearer token (compared in
/// constant time).
async fn require_token(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    guard(req, next, Access::Admin).await
}

/// The record routes' guard: the admin token, or the read token.
pub(super) async fn require_reader(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    guard(req, next, Access::Records).await
}

async fn guard(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
    access: Access,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let denied = {
        let tokens: Vec<String> = req
            .app_data::<web::Data<HttpState>>()
            .map(|s| {
                let mut t = vec![s.admin_token.expose_secret().to_owned()];
                if access == Access::Records {
                    t.push(s.read_token.expose_secret().to_owned());
                }
                t
            })
            .unwrap_or_default()
            .into_iter()
            .filter(|t| !t.is_empty())
            .collect();
        if tokens.is_empty() {
            Some(problem(
                StatusCode::NOT_FOUND,
                "Not found",
                match access {
                    Access::Admin => "admin routes are off ([admin] token is empty)",
                    Access::Records => {
                        "record routes are off ([admin] token and [records] read_token are empty)"
                    }
                },
                None,
            ))
        } else {
            let given = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            // Every token is compared, so the time taken does not say which
            // one came close.
            let matched = tokens.iter().fold(false, |ok, want| {
                ok | bool::from(given.as_bytes().ct_eq(want.as_bytes()))
            });
            (!matched).then(|| {
                problem(
                    StatusCode::UNAUTHORIZED,
                    "Unauthorized",
                    "a valid bearer token is required",
                    Some("authorization"),
                )
            })
        }
    };
    match denied {
        Some(answer) => Ok(req.into_response(answer)),
        None => Ok(next.call(req).await?.map_into_boxed_body()),
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

#[derive(Debug, Deserialize)]
struct ListQuery {
    limit: Option<usize>,
}

async fn list_dead_letters(q: web::Query<ListQuery>, state: web::Data<HttpState>) -> HttpResponse {
    let limit = q.limit.unwrap_or(1000).min(100_000);
    match state.inbox.dead_letters(limit).await {
        Ok(list) => HttpResponse::Ok().json(json!({"dead_letters": list})),
        Err(e) => inbox_problem(&e),
    }
}

#[derive(Debug, Default, Deserialize)]
struct ReplayBody {
    ids: Option<Vec<u64>>,
}

async fn replay_dead_letters(body: web::Bytes, state: web::Data<HttpState>) -> HttpResponse {
    let parsed: ReplayBody = if body.is_empty() {
        ReplayBody::default()
    } else {
        match json_body(&body, "Invalid body", Some("ids")) {
            Ok(b) => b,
            Err(r) => return r,
        }
    };
    match state.inbox.replay(parsed.ids).await {
        Ok(n) => HttpResponse::Accepted().json(json!({"replayed": n})),
        Err(e) => inbox_problem(&e),
    }
}

#[derive(Debug, Deserialize)]
struct SweepRequest {
    channel: String,
    #[serde(default)]
    deny: Vec<String>,
    #[serde(default)]
    dry_run: bool,
}

async fn start_sweep(body: web::Bytes, state: web::Data<HttpState>) -> HttpResponse {
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
    match state.sweeps.start(channel, deny, r.dry_run).await {
        Ok(id) => HttpResponse::Accepted().json(json!({
            "id": id,
            "status": format!("/v1/admin/sweeps/{id}"),
        })),
        Err(e @ StartError::Closed) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "Shutting down",
            &e.to_string(),
            None,
        ),
        Err(e @ StartError::Storage(_)) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "Journal unavailable",
            &e.to_string(),
            None,
        ),
        Err(e @ StartError::Broker(_)) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "Broker unavailable",
            &e.to_string(),
            None,
        ),
    }
}

async fn sweep_status(id: web::Path<u64>, state: web::Data<HttpState>) -> HttpResponse {
    match state.sweeps.status(id.into_inner()).await {
        Ok(Some(s)) => HttpResponse::Ok().json(s),
        Ok(None) => problem(
            StatusCode::NOT_FOUND,
            "No such sweep",
            "unknown sweep id (finished sweeps are kept for a while)",
            None,
        ),
        Err(e) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "Broker unavailable",
            &format!("the sweep log cannot be read now: {e}"),
            None,
        ),
    }
}
