//! The caller's sessions as records: `GET /v1/sessions` lists them in pages, `GET
//! /v1/sessions/export` streams every stored message as NDJSON, `DELETE /v1/users/{user}` erases
//! one end user's sessions from every store. Each sees only the caller's own namespace (its API
//! key, or the user a trusted proxy names); `user` narrows it to the sessions whose turns named
//! that end user. See [`crate::history`] (`records.rs`, `erasure.rs`) for how.

use std::sync::Arc;

use axum::Extension;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};

use crate::conversation::{EndUser, Principal, SessionId};
use crate::history::{ExportItem, HistoryStore};
use crate::http::{AppError, RequestId};
use crate::state::SharedState;

const DEFAULT_PAGE: i64 = 50;
const MAX_PAGE: i64 = 200;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SessionListQuery {
    /// `next_cursor` of the previous page; omitted starts at the first session.
    #[serde(default)]
    #[param(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    pub cursor: Option<String>,
    /// Sessions per page, 1 to 200 (default 50).
    #[serde(default)]
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<i64>,
    /// Only the sessions of this end user (the `user` their turns named).
    #[serde(default)]
    #[param(min_length = 1, max_length = 256)]
    pub user: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ExportQuery {
    /// Only the sessions of this end user.
    #[serde(default)]
    #[param(min_length = 1, max_length = 256)]
    pub user: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SessionView {
    pub session_id: String,
    /// End users named by the session's turns.
    pub end_users: Vec<String>,
    /// RFC 3339; absent for sessions that never stored a turn.
    pub created_at: Option<String>,
    /// The last turn, RFC 3339.
    pub updated_at: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SessionList {
    /// In session-id order.
    pub sessions: Vec<SessionView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UserErasure {
    pub user: String,
    /// The audit record of this erasure (in the `<collection>_erasures` collection).
    pub erasure_id: String,
    pub erased_sessions: u64,
    pub erased_messages: u64,
    /// Response-cache answers generated for the erased sessions.
    pub erased_cached_answers: u64,
}

fn records(state: &SharedState) -> Result<Arc<HistoryStore>, AppError> {
    state.records.clone().ok_or_else(|| {
        AppError::InvalidRequest("sessions: listing, export and erasure need MongoDB".into())
    })
}

fn end_user(raw: Option<&str>) -> Result<Option<EndUser>, AppError> {
    raw.map(EndUser::parse)
        .transpose()
        .map_err(|e| AppError::InvalidRequest(e.to_string()))
}

fn rfc3339(time: Option<mongodb::bson::DateTime>) -> Option<String> {
    time.and_then(|t| t.try_to_rfc3339_string().ok())
}

#[utoipa::path(
    get,
    path = "/v1/sessions",
    params(SessionListQuery),
    responses(
        (status = 200, body = SessionList),
        (status = 400, description = "Bad cursor, limit or user", body = crate::http::ErrorBody),
        (status = 401, description = "Missing or unknown API key (when auth is enabled)", body = crate::http::ErrorBody),
        (status = 429, description = "Rate limit exceeded; see Retry-After", body = crate::http::ErrorBody),
        (status = 503, description = "Overloaded or history store unavailable; see Retry-After", body = crate::http::ErrorBody),
    )
)]
pub async fn list_sessions(
    State(state): State<SharedState>,
    Extension(principal): Extension<Principal>,
    query: Result<Query<SessionListQuery>, QueryRejection>,
) -> Result<axum::Json<SessionList>, AppError> {
    let Query(query) = query.map_err(|e| AppError::InvalidRequest(e.body_text()))?;
    let after = query
        .cursor
        .as_deref()
        .map(SessionId::parse)
        .transpose()
        .map_err(|_| AppError::InvalidRequest("cursor: not a cursor this API issued".into()))?;
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(AppError::InvalidRequest(format!(
            "limit: must be between 1 and {MAX_PAGE}"
        )));
    }
    let user = end_user(query.user.as_deref())?;
    let sessions = records(&state)?
        .list_sessions(&principal, user.as_ref(), after.as_ref(), limit)
        .await?;
    let next_cursor = (sessions.len() as i64 == limit)
        .then(|| sessions.last().map(|s| s.key.id().to_string()))
        .flatten();
    Ok(axum::Json(SessionList {
        sessions: sessions
            .into_iter()
            .map(|s| SessionView {
                session_id: s.key.id().to_string(),
                end_users: s.end_users,
                created_at: rfc3339(s.created_at),
                updated_at: rfc3339(s.updated_at),
            })
            .collect(),
        next_cursor,
    }))
}

/// One NDJSON line of the export.
fn export_line(item: ExportItem) -> serde_json::Value {
    match item {
        ExportItem::Message { session, message } => {
            let mut line = json!({
            "type": "message",
            "session_id": session.as_str(),
            "seq": message.seq,
            "role": message.role,
            "content": message.content,
            "model": message.model,
            "incomplete": message.incomplete,
            "finish_reason": message.finish_reason,
            "created_at": message.created_at.try_to_rfc3339_string().unwrap_or_default(),
            });
            // A summary of the session (`context.summarisation`) says what it covers.
            if let Some(covers_seq) = message.covers_seq {
                line["summary_covers_seq"] = covers_seq.into();
            }
            // Tool calls and results carry their links; other messages stay as they were.
            if !message.tool_calls.is_empty() {
                line["tool_calls"] = json!(message.tool_calls);
            }
            if let Some(id) = message.tool_call_id {
                line["tool_call_id"] = json!(id);
            }
            line
        }
        ExportItem::End { sessions, messages } => {
            json!({"type": "end", "sessions": sessions, "messages": messages})
        }
    }
}

#[utoipa::path(
    get,
    path = "/v1/sessions/export",
    params(ExportQuery),
    responses(
        (status = 200, description = "`application/x-ndjson`: one `{\"type\":\"message\",...}` line per stored message (session by session, each in order), then `{\"type\":\"end\",\"sessions\":N,\"messages\":M}`. A store failure mid-export ends the stream with `{\"type\":\"error\",\"error\":{...}}` instead of the `end` line.", content_type = "application/x-ndjson", body = String),
        (status = 400, description = "Bad user", body = crate::http::ErrorBody),
        (status = 401, description = "Missing or unknown API key (when auth is enabled)", body = crate::http::ErrorBody),
        (status = 429, description = "Rate limit exceeded; see Retry-After", body = crate::http::ErrorBody),
        (status = 503, description = "Overloaded or history store unavailable; see Retry-After", body = crate::http::ErrorBody),
    )
)]
pub async fn export_sessions(
    State(state): State<SharedState>,
    Extension(principal): Extension<Principal>,
    query: Result<Query<ExportQuery>, QueryRejection>,
) -> Result<Response, AppError> {
    let Query(query) = query.map_err(|e| AppError::InvalidRequest(e.body_text()))?;
    let user = end_user(query.user.as_deref())?;
    let mut items = Box::pin(records(&state)?.export(principal, user));
    // A store that fails before the first line gets a status of its own.
    let first = match items.next().await {
        Some(Err(e)) => return Err(e.into()),
        first => first,
    };
    let lines = futures::stream::iter(first).chain(items).map(|item| {
        let line = match item {
            Ok(item) => export_line(item),
            Err(e) => {
                tracing::warn!(error = %e, "export cut short by the history store");
                json!({"type": "error", "error": AppError::from(e).body()})
            }
        };
        let mut bytes = serde_json::to_vec(&line).expect("JSON values serialise");
        bytes.push(b'\n');
        Ok::<_, std::convert::Infallible>(Bytes::from(bytes))
    });
    let mut response = Body::from_stream(lines).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(response)
}

#[utoipa::path(
    delete,
    path = "/v1/users/{user}",
    params(("user" = String, Path, min_length = 1, max_length = 256, description = "The end user (the `user` their turns named), URL-encoded")),
    responses(
        (status = 200, description = "Erased (counts of 0 when the end user has nothing stored, e.g. a second erasure)", body = UserErasure),
        (status = 400, description = "Bad user", body = crate::http::ErrorBody),
        (status = 401, description = "Missing or unknown API key (when auth is enabled)", body = crate::http::ErrorBody),
        (status = 429, description = "Rate limit exceeded; see Retry-After", body = crate::http::ErrorBody),
        (status = 503, description = "A store is unavailable: the erasure is recorded and finishes once it is back; see Retry-After", body = crate::http::ErrorBody),
    )
)]
pub async fn erase_user(
    State(state): State<SharedState>,
    Extension(principal): Extension<Principal>,
    Extension(request_id): Extension<RequestId>,
    user: Result<Path<String>, PathRejection>,
) -> Result<axum::Json<UserErasure>, AppError> {
    let Path(raw) = user.map_err(|_| AppError::InvalidRequest("user: not valid UTF-8".into()))?;
    let user = EndUser::parse(&raw).map_err(|e| AppError::InvalidRequest(e.to_string()))?;
    let report = records(&state)?
        .erase_end_user(&principal, &user, &request_id.0)
        .await?;
    tracing::info!(
        erasure = %report.id,
        sessions = report.sessions,
        messages = report.messages,
        "end user erased"
    );
    Ok(axum::Json(UserErasure {
        user: user.to_string(),
        erasure_id: report.id,
        erased_sessions: report.sessions,
        erased_messages: report.messages,
        erased_cached_answers: report.cached_answers,
    }))
}
