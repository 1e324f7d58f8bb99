//! The one error type of the HTTP API. Every failure becomes `{"error":{"code","message"}}` with
//! the matching status; details that could leak internals are logged, never sent.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Seconds a client is told to wait before retrying a 503.
pub const RETRY_AFTER_SECONDS: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The body is not JSON or does not match the request type; the message names the field.
    #[error("{0}")]
    InvalidJson(String),
    /// A field has a value the API does not accept.
    #[error("{0}")]
    InvalidRequest(String),
    #[error("session id must match ^[A-Za-z0-9_-]{{1,64}}$")]
    InvalidSessionId,
    #[error("model `{0}` is not in the allow-list")]
    ModelNotAllowed(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    #[error("too many requests in flight, retry later")]
    Overloaded,
    /// No valid API key; the message is the same whatever was wrong with the key.
    #[error("a valid API key is required")]
    Unauthorized,
    /// The caller's request or token budget is spent for now.
    #[error("rate limit exceeded: {what} per window; retry after {retry_after_seconds} s")]
    RateLimited {
        /// `requests` or `tokens`.
        what: &'static str,
        retry_after_seconds: u64,
    },
    /// MongoDB (the durable store) cannot be reached; the detail is only logged.
    #[error("history store unavailable: {0}")]
    StorageUnavailable(String),
    #[error("no LLM back end answered: {0}")]
    BackendUnavailable(String),
    #[error("LLM back end timed out: {0}")]
    BackendTimeout(String),
    /// Every endpoint for the model is at its in-flight limit with a full queue, or the
    /// request waited in a queue for `routing.queueTimeoutMs`.
    #[error("LLM back ends saturated: {detail}")]
    BackendOverloaded {
        detail: String,
        retry_after_seconds: u64,
    },
    /// Every endpoint for the model has its circuit breaker open.
    #[error("every LLM back end has its circuit breaker open")]
    BackendCircuitOpen { retry_after_seconds: u64 },
    /// The back end failed after the first token; the partial reply is stored as incomplete.
    #[error("LLM back end failed mid-answer: {0}")]
    GenerationInterrupted(String),
    #[error("internal error: {0}")]
    Internal(String),
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable label, e.g. `invalid_json`, `storage_unavailable`.
    pub code: String,
    pub message: String,
}

impl AppError {
    pub fn status(&self) -> StatusCode {
        match self {
            AppError::InvalidJson(_)
            | AppError::InvalidRequest(_)
            | AppError::InvalidSessionId
            | AppError::ModelNotAllowed(_) => StatusCode::BAD_REQUEST,
            AppError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::NotFound(_) => StatusCode::NOT_FOUND,
            AppError::Unauthorized => StatusCode::UNAUTHORIZED,
            AppError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            AppError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            AppError::Overloaded
            | AppError::StorageUnavailable(_)
            | AppError::BackendUnavailable(_)
            | AppError::BackendOverloaded { .. }
            | AppError::BackendCircuitOpen { .. } => StatusCode::SERVICE_UNAVAILABLE,
            AppError::GenerationInterrupted(_) => StatusCode::BAD_GATEWAY,
            AppError::BackendTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            AppError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Short label used in responses, metrics and WebSocket close reasons.
    pub fn code(&self) -> &'static str {
        match self {
            AppError::InvalidJson(_) => "invalid_json",
            AppError::InvalidRequest(_) => "invalid_request",
            AppError::InvalidSessionId => "invalid_session_id",
            AppError::ModelNotAllowed(_) => "model_not_allowed",
            AppError::PayloadTooLarge(_) => "payload_too_large",
            AppError::NotFound(_) => "not_found",
            AppError::MethodNotAllowed => "method_not_allowed",
            AppError::Overloaded => "overloaded",
            AppError::Unauthorized => "unauthorized",
            AppError::RateLimited { .. } => "rate_limited",
            AppError::StorageUnavailable(_) => "storage_unavailable",
            AppError::BackendUnavailable(_) => "backend_unavailable",
            AppError::BackendTimeout(_) => "backend_timeout",
            AppError::BackendOverloaded { .. } => "backend_overloaded",
            AppError::BackendCircuitOpen { .. } => "backend_circuit_open",
            AppError::GenerationInterrupted(_) => "generation_interrupted",
            AppError::Internal(_) => "internal",
        }
    }

    /// What the client sees: its own mistakes in full, our failures without internals.
    pub fn public_message(&self) -> String {
        match self {
            AppError::StorageUnavailable(_) => {
                "the conversation history store is unavailable; nothing was stored, retry later"
                    .into()
            }
            AppError::BackendUnavailable(_) => "no language-model back end is available".into(),
            AppError::BackendTimeout(_) => "the language-model back end timed out".into(),
            AppError::BackendOverloaded { .. } => {
                "every language-model back end is at its limit of requests in flight; retry later"
                    .into()
            }
            AppError::BackendCircuitOpen { .. } => {
                "every language-model back end is failing and temporarily taken out of service; retry later"
                    .into()
            }
            AppError::GenerationInterrupted(_) => {
                "the language-model back end failed mid-answer; the partial reply is stored as incomplete"
                    .into()
            }
            AppError::Internal(_) => "internal error".into(),
            other => other.to_string(),
        }
    }

    pub fn retry_after(&self) -> Option<u64> {
        match self {
            AppError::RateLimited {
                retry_after_seconds,
                ..
            }
            | AppError::BackendOverloaded {
                retry_after_seconds,
                ..
            }
            | AppError::BackendCircuitOpen {
                retry_after_seconds,
            } => return Some((*retry_after_seconds).max(1)),
            _ => {}
        }
        (self.status() == StatusCode::SERVICE_UNAVAILABLE).then_some(RETRY_AFTER_SECONDS)
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code().into(),
                message: self.public_message(),
            },
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(code = self.code(), detail = %self, "request failed");
        }
        let mut response = (status, axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<JsonRejection> for AppError {
    fn from(rejection: JsonRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return AppError::PayloadTooLarge("request body exceeds the size limit".into());
        }
        // axum reports the JSON path of the offending field (serde_path_to_error), e.g.
        // "message: invalid type: integer `5`, expected a string"; keep that, drop the preamble.
        let text = rejection.body_text();
        let detail = text
            .split_once("target type: ")
            .map(|(_, rest)| rest.to_string())
            .unwrap_or(text);
        AppError::InvalidJson(detail)
    }
}

/// `axum::Json` whose rejections are [`AppError`]s, so malformed bodies get the API's error shape.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let axum::Json(value) = axum::Json::<T>::from_request(req, state).await?;
        Ok(ApiJson(value))
    }
}

/// The back end's domain errors as HTTP errors. A Retry-After is whole seconds, at least one.
impl From<crate::backend::BackendError> for AppError {
    fn from(error: crate::backend::BackendError) -> Self {
        use crate::backend::BackendError;
        let seconds = |wait: std::time::Duration| wait.as_secs_f64().ceil().max(1.0) as u64;
        match error {
            BackendError::Unavailable(detail) => AppError::BackendUnavailable(detail),
            BackendError::Timeout(detail) => AppError::BackendTimeout(detail),
            BackendError::Saturated {
                reason,
                retry_after,
            } => AppError::BackendOverloaded {
                detail: reason.to_string(),
                retry_after_seconds: seconds(retry_after),
            },
            BackendError::CircuitOpen { retry_after } => AppError::BackendCircuitOpen {
                retry_after_seconds: seconds(retry_after),
            },
        }
    }
}
