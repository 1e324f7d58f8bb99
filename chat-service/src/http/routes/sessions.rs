//! Reading and erasing a session's stored history. A session of another principal is looked up
//! under the caller's own namespace, where it does not exist, so it answers the same 404 as an
//! id nobody used, after the same store round trips.

use axum::Extension;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::conversation::{FinishReason, InvalidSessionId, Principal, Role, SessionId, SessionKey};
use crate::http::AppError;
use crate::state::SharedState;
use crate::tools::ToolCall;

const DEFAULT_PAGE: i64 = 50;
const MAX_PAGE: i64 = 200;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// `next_cursor` of the previous page; omitted starts at the first message.
    #[serde(default)]
    #[param(pattern = "^[0-9]+$")]
    pub cursor: Option<String>,
    /// Messages per page, 1 to 200 (default 50).
    #[serde(default)]
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MessageView {
    pub seq: i64,
    pub role: Role,
    pub content: String,
    /// Assistant messages: the tools the model called.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// Tool messages: the call this is the result of.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    pub model: String,
    /// Only part of the reply was generated: the client left (`finish_reason: cancelled`) or
    /// the back end failed mid-answer (`finish_reason: error`).
    pub incomplete: bool,
    /// Assistant messages only: `stop`, `length`, `error` or `cancelled`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub finish_reason: Option<FinishReason>,
    /// RFC 3339.
    pub created_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MessagePage {
    pub session_id: String,
    pub messages: Vec<MessageView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeletedSession {
    pub session_id: String,
    pub deleted_messages: u64,
    /// False when Redis was unreachable; its copy is then never read again by this replica
    /// (the next turn reads MongoDB and replaces it) and expires with its TTL.
    pub cache_erased: bool,
}

/// The id in the path; one that does not decode (`%FF`: not UTF-8) is as invalid as `../x`,
/// instead of axum's plain-text rejection.
fn session_id(path: Result<Path<String>, PathRejection>) -> Result<SessionId, AppError> {
    let Path(raw) = path.map_err(|_| InvalidSessionId)?;
    Ok(SessionId::parse(&raw)?)
}

#[utoipa::path(
    get,
    path = "/v1/sessions/{id}/messages",
    params(("id" = String, Path, pattern = "^[A-Za-z0-9_-]{1,64}$", description = "Session id"), PageQuery),
    responses(
        (status = 200, body = MessagePage),
        (status = 400, description = "Bad session id, cursor or limit", body = crate::http::ErrorBody),
        (status = 401, description = "Missing or unknown API key (when auth is enabled)", body = crate::http::ErrorBody),
        (status = 404, description = "No such session for this caller", body = crate::http::ErrorBody),
        (status = 429, description = "Rate limit exceeded; see Retry-After", body = crate::http::ErrorBody),
        (status = 503, description = "Overloaded or history store unavailable; see Retry-After", body = crate::http::ErrorBody),
    )
)]
pub async fn list_messages(
    State(state): State<SharedState>,
    Extension(principal): Extension<Principal>,
    id: Result<Path<String>, PathRejection>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<axum::Json<MessagePage>, AppError> {
    let session = SessionKey::new(&principal, session_id(id)?);
    let Query(query) = query.map_err(|e| AppError::InvalidRequest(e.body_text()))?;
    let after = match query.cursor.as_deref() {
        None => 0,
        Some(cursor) => cursor
            .parse::<i64>()
            .ok()
            .filter(|c| *c >= 0)
            .ok_or_else(|| {
                AppError::InvalidRequest("cursor: not a cursor this API issued".into())
            })?,
    };
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(AppError::InvalidRequest(format!(
            "limit: must be between 1 and {MAX_PAGE}"
        )));
    }
    let messages = state.history.page(&session, after, limit).await?;
    if messages.is_empty() && after == 0 && !state.history.session_exists(&session).await? {
        return Err(AppError::NotFound(format!("session `{session}` not found")));
    }
    let next_cursor = (messages.len() as i64 == limit)
        .then(|| messages.last().map(|m| m.seq.to_string()))
        .flatten();
    Ok(axum::Json(MessagePage {
        session_id: session.to_string(),
        messages: messages
            .into_iter()
            .map(|m| MessageView {
                seq: m.seq,
                role: m.role,
                content: m.content,
                tool_calls: m.tool_calls,
                tool_call_id: m.tool_call_id,
                model: m.model,
                incomplete: m.incomplete,
                finish_reason: m.finish_reason,
                created_at: m.created_at.try_to_rfc3339_string().unwrap_or_default(),
            })
            .collect(),
        next_cursor,
    }))
}

#[utoipa::path(
    delete,
    path = "/v1/sessions/{id}",
    params(("id" = String, Path, pattern = "^[A-Za-z0-9_-]{1,64}$", description = "Session id")),
    responses(
        (status = 200, body = DeletedSession),
        (status = 400, description = "Bad session id", body = crate::http::ErrorBody),
        (status = 401, description = "Missing or unknown API key (when auth is enabled)", body = crate::http::ErrorBody),
        (status = 404, description = "No such session for this caller", body = crate::http::ErrorBody),
        (status = 429, description = "Rate limit exceeded; see Retry-After", body = crate::http::ErrorBody),
        (status = 503, description = "Overloaded or history store unavailable; see Retry-After", body = crate::http::ErrorBody),
    )
)]
pub async fn delete_session(
    State(state): State<SharedState>,
    Extension(principal): Extension<Principal>,
    id: Result<Path<String>, PathRejection>,
) -> Result<axum::Json<DeletedSession>, AppError> {
    let session = SessionKey::new(&principal, session_id(id)?);
    let existed = state.history.session_exists(&session).await?;
    let erased = state.history.delete(&session).await?;
    if !existed && erased.messages == 0 {
        return Err(AppError::NotFound(format!("session `{session}` not found")));
    }
    Ok(axum::Json(DeletedSession {
        session_id: session.to_string(),
        deleted_messages: erased.messages,
        cache_erased: erased.cache_erased,
    }))
}
