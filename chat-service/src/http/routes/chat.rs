//! `POST /v1/chat`: one user turn in a session, answered as JSON or as Server-Sent Events.

use std::convert::Infallible;

use axum::Extension;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::conversation::{
    ContextMessage, EndUser, FinishReason, Principal, Role, Sampling, SessionId, SessionKey, Usage,
};
use crate::http::extract::ApiJson;
use crate::http::idempotent;
use crate::http::validate::{check_message, check_temperature, resolve_model};
use crate::http::{AppError, RequestId};
use crate::rate_limit::Caller;
use crate::state::SharedState;
use crate::turn::{TurnEvent, TurnHistory, TurnInput, TurnOutcome, begin_turn, complete_turn};

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    /// Continue this session; omitted starts a new one. Pattern `^[A-Za-z0-9_-]{1,64}$`. Ids are
    /// the caller's own: the same id under another API key is another session.
    #[serde(default)]
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    pub session_id: Option<String>,
    /// Not blank; at most `limits.maxMessageBytes` bytes (413 beyond).
    #[schema(min_length = 1)]
    pub message: String,
    /// One of `GET /v1/models`; omitted means the default model.
    #[serde(default)]
    pub model: Option<String>,
    /// Answer as Server-Sent Events: `token` events, then one `done` (or `error`) event.
    #[serde(default)]
    pub stream: bool,
    /// Sampling temperature (0 to 2). `0` makes the answer deterministic; with the response
    /// cache enabled, such turns are answered from the cache when the whole context repeats.
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f32>,
    /// The end user the turn is for, inside the caller's namespace: any label of 1 to 256
    /// bytes without control characters (an e-mail address works). The session remembers it,
    /// for `GET /v1/sessions?user=`, the export and `DELETE /v1/users/{user}`.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 256)]
    pub user: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChatResponse {
    pub session_id: String,
    /// The assistant's reply.
    pub message: String,
    pub model: String,
    /// Whether the reply came from the response cache.
    pub cached: bool,
    pub usage: Usage,
    #[schema(value_type = String)]
    pub finish_reason: FinishReason,
    /// Stored messages of the session that were part of the context.
    pub context_messages: usize,
}

/// A `token` event's data when streaming.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenEvent {
    pub content: String,
}

impl ChatResponse {
    fn from_outcome(outcome: TurnOutcome) -> Self {
        Self {
            session_id: outcome.session_id.unwrap_or_default(),
            message: outcome.reply,
            model: outcome.model,
            cached: outcome.cached,
            usage: outcome.usage,
            finish_reason: outcome.finish_reason,
            context_messages: outcome.context_messages,
        }
    }
}

/// Everything of a request that needs no state: the session id it names (if any), the message
/// within `max_message_bytes`, the temperature. Also the entry of the fuzz target.
pub(crate) fn check_request(
    request: &ChatRequest,
    max_message_bytes: usize,
) -> Result<(Option<SessionId>, Option<EndUser>), AppError> {
    let id = request
        .session_id
        .as_deref()
        .map(SessionId::parse)
        .transpose()?;
    check_message(max_message_bytes, &request.message)?;
    check_temperature(request.temperature)?;
    let end_user = request
        .user
        .as_deref()
        .map(EndUser::parse)
        .transpose()
        .map_err(|e| AppError::InvalidRequest(e.to_string()))?;
    Ok((id, end_user))
}

#[utoipa::path(
    post,
    path = "/v1/chat",
    request_body = ChatRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes the turn idempotent: a retry with the same key and body gets the first answer (header `Idempotent-Replayed: true`) and stores nothing again. Not with `stream: true`.")),
    responses(
        (status = 200, description = "The reply (JSON), or `text/event-stream` when `stream` is true", body = ChatResponse),
        (status = 400, description = "Malformed body, bad session id or model not allowed", body = crate::http::ErrorBody),
        (status = 401, description = "Missing or unknown API key (when auth is enabled)", body = crate::http::ErrorBody),
        (status = 408, description = "The body did not arrive within `limits.bodyReadTimeoutMs`", body = crate::http::ErrorBody),
        (status = 409, description = "A request with the same `Idempotency-Key` is still running; see Retry-After", body = crate::http::ErrorBody),
        (status = 413, description = "Message too large", body = crate::http::ErrorBody),
        (status = 422, description = "The `Idempotency-Key` was used for a different request", body = crate::http::ErrorBody),
        (status = 429, description = "Rate limit exceeded; see Retry-After and the RateLimit-* headers", body = crate::http::ErrorBody),
        (status = 502, description = "The back end failed mid-answer; the partial reply is stored as incomplete", body = crate::http::ErrorBody),
        (status = 503, description = "Overloaded, history store or back ends unavailable; see Retry-After", body = crate::http::ErrorBody),
        (status = 504, description = "Back end timed out", body = crate::http::ErrorBody),
    )
)]
pub async fn post_chat(
    State(state): State<SharedState>,
    Extension(request_id): Extension<RequestId>,
    caller: Option<Extension<Caller>>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<ChatRequest>,
) -> Result<Response, AppError> {
    let idempotency_key = idempotent::key_of(&headers)?;
    let fingerprint = idempotency_key
        .as_ref()
        .map(|_| crate::idempotency::fingerprint("/v1/chat", &request));
    let (id, end_user) = check_request(&request, state.config.limits.max_message_bytes)?;
    let (session, history) = match id {
        Some(id) => {
            let session = SessionKey::new(&principal, id);
            (session.clone(), TurnHistory::Session(session))
        }
        None => {
            let session = SessionKey::new(&principal, SessionId::generate());
            (session.clone(), TurnHistory::NewSession(session))
        }
    };
    let model = resolve_model(&state, request.model.as_deref())?;
    let stream = request.stream;
    let input = TurnInput {
        history,
        input: vec![ContextMessage::new(Role::User, request.message)],
        model,
        request_id: request_id.0,
        max_tokens: None,
        temperature: request.temperature,
        sampling: Sampling::default(),
        end_user,
        caller: caller.map(|Extension(caller)| caller),
        principal: principal.clone(),
    };
    if let (Some(key), Some(fingerprint)) = (idempotency_key, fingerprint) {
        if stream {
            return Err(idempotent::refuse_streaming());
        }
        let turn_state = state.clone();
        let turn = async move {
            let outcome = complete_turn(&turn_state, input).await?;
            Ok(serde_json::to_value(ChatResponse::from_outcome(outcome))
                .expect("responses serialise"))
        };
        return idempotent::run_once(&state, principal, key, session, fingerprint, turn).await;
    }
    if !stream {
        let outcome = complete_turn(&state, input).await?;
        return Ok(axum::Json(ChatResponse::from_outcome(outcome)).into_response());
    }
    let mut events = begin_turn(&state, input).await?;
    let stream = async_stream::stream! {
        while let Some(event) = events.recv().await {
            let sse = match event {
                TurnEvent::Token(content) => Event::default()
                    .event("token")
                    .json_data(TokenEvent { content }),
                TurnEvent::Finished(outcome) => Event::default()
                    .event("done")
                    .json_data(ChatResponse::from_outcome(outcome)),
                TurnEvent::Failed(error) => Event::default()
                    .event("error")
                    .json_data(AppError::from(error).body()),
                // This API offers no tools.
                TurnEvent::ToolCalls(_) => continue,
            };
            if let Ok(sse) = sse {
                yield Ok::<_, Infallible>(sse);
            }
        }
    };
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}
