//! The one error type of the HTTP API. Every failure becomes
//! `{"error":{"code","message","type","param"}}` with the matching status, the shape of OpenAI's
//! errors, so that its SDKs raise the right exception class and carry the details
//! (docs/API-ERRORS.md lists them); details that could leak internals are never sent: the response carries
//! them in an [`ErrorReport`] extension, which the `observe` middleware logs and removes.
//!
//! Domain modules return their own errors; the `From` impls in this file are the one
//! place where they become statuses and codes.

use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::backend::BackendError;
use crate::conversation::InvalidSessionId;
use crate::history::HistoryError;
use crate::rate_limit::RateLimited;
use crate::turn::TurnError;

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
    #[error(transparent)]
    InvalidSessionId(#[from] InvalidSessionId),
    #[error("model `{0}` is not in the allow-list")]
    ModelNotAllowed(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    NotFound(String),
    /// The client did not send its whole body within `limits.bodyReadTimeoutMs`.
    #[error("{0}")]
    RequestTimeout(String),
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    #[error("too many requests in flight, retry later")]
    Overloaded,
    /// The shutdown grace period ran out mid-turn.
    #[error(
        "the server shut down mid-answer; the partial reply is stored as incomplete, retry on another replica"
    )]
    ShuttingDown,
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
    /// The first request with this `Idempotency-Key` is still running.
    #[error("a request with this Idempotency-Key is still in progress; retry later")]
    IdempotencyInProgress,
    /// The `Idempotency-Key` was used before for a different request.
    #[error("this Idempotency-Key was used for a different request; use a new key")]
    IdempotencyKeyReused,
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
    /// The class of error as OpenAI names them: `invalid_request_error`,
    /// `authentication_error`, `not_found_error`, `rate_limit_error` or `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field (or header) at fault, when one is: `model`, `messages[1].role`, ….
    pub param: Option<String>,
}

impl AppError {
    pub fn status(&self) -> StatusCode {
        match self {
            AppError::InvalidJson(_)
            | AppError::InvalidRequest(_)
            | AppError::InvalidSessionId(_)
            | AppError::ModelNotAllowed(_) => StatusCode::BAD_REQUEST,
            AppError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::NotFound(_) => StatusCode::NOT_FOUND,
            AppError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            AppError::Unauthorized => StatusCode::UNAUTHORIZED,
            AppError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            AppError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            AppError::IdempotencyInProgress => StatusCode::CONFLICT,
            AppError::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            AppError::Overloaded
            | AppError::ShuttingDown
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
            AppError::InvalidSessionId(_) => "invalid_session_id",
            AppError::ModelNotAllowed(_) => "model_not_allowed",
            AppError::PayloadTooLarge(_) => "payload_too_large",
            AppError::NotFound(_) => "not_found",
            AppError::RequestTimeout(_) => "request_timeout",
            AppError::MethodNotAllowed => "method_not_allowed",
            AppError::Overloaded => "overloaded",
            AppError::ShuttingDown => "shutting_down",
            AppError::Unauthorized => "unauthorized",
            AppError::RateLimited { .. } => "rate_limited",
            AppError::StorageUnavailable(_) => "storage_unavailable",
            AppError::BackendUnavailable(_) => "backend_unavailable",
            AppError::BackendTimeout(_) => "backend_timeout",
            AppError::BackendOverloaded { .. } => "backend_overloaded",
            AppError::BackendCircuitOpen { .. } => "backend_circuit_open",
            AppError::GenerationInterrupted(_) => "generation_interrupted",
            AppError::IdempotencyInProgress => "idempotency_in_progress",
            AppError::IdempotencyKeyReused => "idempotency_key_reused",
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
            AppError::IdempotencyInProgress => return Some(RETRY_AFTER_SECONDS),
            _ => {}
        }
        (self.status() == StatusCode::SERVICE_UNAVAILABLE).then_some(RETRY_AFTER_SECONDS)
    }

    /// OpenAI's `error.type` for this status.
    pub fn kind(&self) -> &'static str {
        match self.status().as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        }
    }

    /// The field at fault: client errors name it as the start of their message (`field: why`).
    pub fn param(&self) -> Option<String> {
        match self {
            AppError::ModelNotAllowed(_) => Some("model".into()),
            AppError::InvalidJson(message) | AppError::InvalidRequest(message) => {
                let (field, _) = message.split_once(": ")?;
                let plain = !field.is_empty()
                    && field
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_.[]-".contains(c));
                plain.then(|| field.to_string())
            }
            _ => None,
        }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code().into(),
                message: self.public_message(),
                kind: self.kind().into(),
                param: self.param(),
            },
        }
    }
}

/// What a failed response tells the log but not the client; see the module docs.
#[derive(Debug, Clone)]
pub struct ErrorReport {
    pub code: &'static str,
    /// The error in full, internals included.
    pub detail: String,
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = (status, axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        // Client errors are the client's to read in the body; ours are worth a log line.
        if status.is_server_error() {
            response.extensions_mut().insert(ErrorReport {
                code: self.code(),
                detail: self.to_string(),
            });
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

impl From<RateLimited> for AppError {
    fn from(refusal: RateLimited) -> Self {
        AppError::RateLimited {
            what: refusal.dimension.as_str(),
            retry_after_seconds: refusal.retry_after_seconds,
        }
    }
}

impl From<HistoryError> for AppError {
    fn from(error: HistoryError) -> Self {
        match error {
            HistoryError::Unavailable(detail) => AppError::StorageUnavailable(detail),
            HistoryError::Inconsistent(detail) => AppError::Internal(detail),
        }
    }
}

/// The back end's domain errors as HTTP errors. A Retry-After is whole seconds, at least one.
impl From<BackendError> for AppError {
    fn from(error: BackendError) -> Self {
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

impl From<TurnError> for AppError {
    fn from(error: TurnError) -> Self {
        match error {
            TurnError::History(e) => e.into(),
            TurnError::Backend(e) => e.into(),
            TurnError::Interrupted(e) => AppError::GenerationInterrupted(e.to_string()),
            e @ TurnError::NoOutcome => AppError::Internal(e.to_string()),
            TurnError::RateLimited(e) => e.into(),
            TurnError::ShuttingDown => AppError::ShuttingDown,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::backend::{EndpointError, Saturation};
    use crate::rate_limit::Dimension;

    /// Every domain error's status, code and Retry-After, as a client sees them.
    #[test]
    fn domain_errors_become_statuses_codes_and_retry_hints() {
        let cases: Vec<(AppError, StatusCode, &str, Option<u64>)> = vec![
            (
                InvalidSessionId.into(),
                StatusCode::BAD_REQUEST,
                "invalid_session_id",
                None,
            ),
            (
                RateLimited {
                    dimension: Dimension::Tokens,
                    retry_after_seconds: 7,
                }
                .into(),
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                Some(7),
            ),
            (
                HistoryError::Unavailable("connection refused".into()).into(),
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_unavailable",
                Some(RETRY_AFTER_SECONDS),
            ),
            (
                HistoryError::Inconsistent("next_seq is a string".into()).into(),
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                None,
            ),
            (
                TurnError::History(HistoryError::Unavailable("down".into())).into(),
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_unavailable",
                Some(RETRY_AFTER_SECONDS),
            ),
            (
                TurnError::Interrupted(EndpointError::Truncated).into(),
                StatusCode::BAD_GATEWAY,
                "generation_interrupted",
                None,
            ),
            (
                TurnError::NoOutcome.into(),
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                None,
            ),
            (
                BackendError::CircuitOpen {
                    retry_after: Duration::from_millis(10),
                }
                .into(),
                StatusCode::SERVICE_UNAVAILABLE,
                "backend_circuit_open",
                Some(1),
            ),
            (
                TurnError::Backend(BackendError::Saturated {
                    reason: Saturation::QueueFull,
                    retry_after: Duration::from_millis(2_500),
                })
                .into(),
                StatusCode::SERVICE_UNAVAILABLE,
                "backend_overloaded",
                Some(3),
            ),
            (
                BackendError::Unavailable("refused".into()).into(),
                StatusCode::SERVICE_UNAVAILABLE,
                "backend_unavailable",
                Some(RETRY_AFTER_SECONDS),
            ),
            (
                BackendError::Timeout("slow".into()).into(),
                StatusCode::GATEWAY_TIMEOUT,
                "backend_timeout",
                None,
            ),
            (
                AppError::Overloaded,
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                Some(1),
            ),
            (
                AppError::Unauthorized,
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                None,
            ),
        ];
        for (error, status, code, retry_after) in cases {
            assert_eq!(error.status(), status, "{error:?}");
            assert_eq!(error.code(), code, "{error:?}");
            assert_eq!(error.retry_after(), retry_after, "{error:?}");
            let response = error.into_response();
            assert_eq!(response.status(), status);
            let header = response
                .headers()
                .get(header::RETRY_AFTER)
                .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
            assert_eq!(header, retry_after, "{code}");
        }
    }

    /// The OpenAI SDKs read `type`, `param` and `code` from the body; the status picks the class.
    #[test]
    fn bodies_have_openai_error_shape() {
        let cases = [
            (
                AppError::InvalidRequest("messages[1].role: `tool` is not supported".into()),
                "invalid_request_error",
                Some("messages[1].role"),
            ),
            (
                AppError::InvalidJson("expected value at line 1 column 1".into()),
                "invalid_request_error",
                None,
            ),
            (
                AppError::ModelNotAllowed("gpt-9".into()),
                "invalid_request_error",
                Some("model"),
            ),
            (AppError::Unauthorized, "authentication_error", None),
            (
                AppError::NotFound("session `x` not found".into()),
                "not_found_error",
                None,
            ),
            (
                AppError::RateLimited {
                    what: "tokens",
                    retry_after_seconds: 1,
                },
                "rate_limit_error",
                None,
            ),
            (AppError::Overloaded, "server_error", None),
        ];
        for (error, kind, param) in cases {
            let body = serde_json::to_value(error.body()).unwrap();
            assert_eq!(body["error"]["type"], kind, "{body}");
            assert_eq!(body["error"]["param"].as_str(), param, "{body}");
            assert_eq!(body["error"]["code"], error.code(), "{body}");
            assert!(body["error"].as_object().unwrap().contains_key("param"));
        }
    }

    #[test]
    fn rate_limit_refusals_say_what_is_spent() {
        let error = AppError::from(RateLimited {
            dimension: Dimension::Requests,
            retry_after_seconds: 3,
        });
        assert_eq!(
            error.public_message(),
            "rate limit exceeded: requests per window; retry after 3 s"
        );
    }

    #[test]
    fn internal_details_go_to_the_report_never_to_the_body() {
        let response =
            AppError::from(HistoryError::Unavailable("mongodb at 10.1.2.3".into())).into_response();
        let report = response.extensions().get::<ErrorReport>().unwrap();
        assert_eq!(report.code, "storage_unavailable");
        assert!(report.detail.contains("10.1.2.3"));
        let body = serde_json::to_string(
            &AppError::from(HistoryError::Unavailable("mongodb at 10.1.2.3".into())).body(),
        )
        .unwrap();
        assert!(!body.contains("10.1.2.3"), "{body}");

        let client_error = AppError::InvalidRequest("limit: too big".into()).into_response();
        assert!(client_error.extensions().get::<ErrorReport>().is_none());
    }
}
