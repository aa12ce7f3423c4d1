//! The record routes: `GET /v1/events/{id}` (one event's fate) and `GET
//! /v1/events?user_id=U[&limit=N]` (a user's events, newest first), behind
//! the admin token or `[records] read_token`. An event still in flight is
//! answered from the pipeline (`InFlight`), a settled one from the store.

use std::collections::HashSet;

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use super::http::{problem, problem_answer, problem_body, HttpState, NoRecords};
use crate::fate::{EventRecord, FateError};

/// Most records `GET /v1/events?user_id=` lists.
pub const MAX_LIMIT: usize = 1_000;
const DEFAULT_LIMIT: usize = 100;

/// `GET /v1/events/{id}`.
pub async fn by_id(id: web::Path<String>, state: web::Data<HttpState>) -> HttpResponse {
    let id = id.into_inner();
    if let Some(r) = state.in_flight.pending(&id) {
        return HttpResponse::Ok().json(r);
    }
    let store = match &state.fate {
        Ok(s) => s,
        Err(why) => return no_records(why),
    };
    match store.get(&id).await {
        Ok(Some(r)) => HttpResponse::Ok().json(r),
        Ok(None) => {
            let absent = store.absent();
            let mut body =
                problem_body(StatusCode::NOT_FOUND, "No such event", &absent.detail, None);
            body["id"] = json!(id);
            body["retention"] = json!(absent.retention);
            body["may_have_expired"] = json!(true);
            // Accepted events not yet taken into the pipeline have no record
            // and are not in flight: while the inbox holds unsettled ones,
            // this id may be among them.
            body["may_be_queued"] = json!(absent.may_be_queued || state.inbox.holds_unsettled());
            problem_answer(StatusCode::NOT_FOUND, &body)
        }
        Err(e) => unavailable(&e),
    }
}

#[derive(Debug, Deserialize)]
pub struct UserQuery {
    user_id: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/events?user_id=U[&limit=N]`: the user's events, newest
/// accepted first, in flight or settled.
pub async fn by_user(q: web::Query<UserQuery>, state: web::Data<HttpState>) -> HttpResponse {
    let Some(user) = q.user_id.as_deref().filter(|u| !u.is_empty()) else {
        return problem(
            StatusCode::BAD_REQUEST,
            "Missing user_id",
            "GET /v1/events lists one user's events: ?user_id=U",
            Some("user_id"),
        );
    };
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let mut events = state.in_flight.pending_for_user(user, limit);
    match &state.fate {
        Ok(store) => match store.by_user(user, limit).await {
            Ok(stored) => {
                let pending: HashSet<String> = events.iter().map(|r| r.id.clone()).collect();
                events.extend(stored.into_iter().filter(|r| !pending.contains(&r.id)));
            }
            Err(e) => return unavailable(&e),
        },
        Err(why) if events.is_empty() => return no_records(why),
        Err(_) => {}
    }
    sort_newest_first(&mut events);
    events.truncate(limit);
    HttpResponse::Ok().json(json!({"user_id": user, "events": events}))
}

fn sort_newest_first(events: &mut [EventRecord]) {
    events.sort_by_key(|r| std::cmp::Reverse((r.accepted_at_ms, r.settled_at_ms)));
}

fn unavailable(e: &FateError) -> HttpResponse {
    problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "Records unavailable",
        &e.to_string(),
        None,
    )
}

/// No store to ask: turned off (501), or not available (503).
fn no_records(why: &NoRecords) -> HttpResponse {
    match why {
        NoRecords::Disabled => problem(
            StatusCode::NOT_IMPLEMENTED,
            "Records turned off",
            "records.enabled is false in this service's configuration: no record is kept",
            None,
        ),
        NoRecords::Unavailable(reason) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "Records unavailable",
            &format!("the record store could not be opened: {reason}"),
            None,
        ),
    }
}
