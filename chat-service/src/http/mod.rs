//! The HTTP edge of the service: the router, its middleware, the handlers, the one error type
//! every failure becomes, and the OpenAPI document generated from the handlers. Domain modules
//! never import this one; it converts their errors (see [`error`]).

pub mod error;
pub mod extract;
pub mod idempotent;
pub mod middleware;
pub mod parsers;
mod routes;
pub mod validate;

#[cfg(test)]
mod tests;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post};
use tower::ServiceBuilder;
use utoipa::OpenApi;

pub use error::{AppError, ErrorBody, ErrorDetail};
pub use middleware::request_id::{REQUEST_ID_HEADER, RequestId};
// The handler modules by their short names: utoipa tags each operation with the module path as
// written in `paths(...)`, and the published document says `chat`, `openai`, ….
use routes::{chat, openai, operations, records, sessions, websocket};

use crate::state::SharedState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "chat-service",
        description = "Conversation API with durable history: REST, Server-Sent Events, WebSocket and an OpenAI-compatible endpoint."
    ),
    paths(
        chat::post_chat,
        openai::post_chat_completions,
        websocket::chat_socket,
        sessions::list_messages,
        sessions::delete_session,
        records::list_sessions,
        records::export_sessions,
        records::erase_user,
        operations::list_models,
        operations::healthz,
        operations::readyz,
        operations::metrics,
        operations::backends,
    ),
    components(schemas(
        crate::http::error::ErrorBody,
        crate::http::error::ErrorDetail,
        crate::conversation::Usage,
        crate::backend::PoolStatus,
        crate::backend::EndpointStatus,
        crate::backend::BreakerState
    ))
)]
pub struct ApiDoc;

/// Bodies larger than this never reach a handler; the per-message limit (413 with its own
/// message) is checked after parsing, so leave room for JSON framing and OpenAI histories.
pub fn body_limit(config: &crate::config::Config) -> usize {
    config.limits.max_message_bytes.saturating_mul(4) + 64 * 1024
}

/// The whole service as an axum router; the binary only adds a listener.
pub fn router(state: SharedState) -> Router {
    let body_limit = body_limit(&state.config);
    let api = Router::new()
        .route("/v1/chat", post(chat::post_chat))
        .route("/v1/chat/completions", post(openai::post_chat_completions))
        .route("/ws/chat", get(websocket::chat_socket))
        .route("/v1/sessions", get(records::list_sessions))
        .route("/v1/sessions/export", get(records::export_sessions))
        .route("/v1/users/{user}", delete(records::erase_user))
        .route("/v1/sessions/{id}/messages", get(sessions::list_messages))
        .route("/v1/sessions/{id}", delete(sessions::delete_session))
        .route("/v1/models", get(operations::list_models))
        // Outermost first: authentication, then rate limits, then admission control, so that
        // bad keys and over-budget callers never hold an admission permit. One layer of three:
        // axum boxes each layer it is given and clones the boxed chain below it on every
        // request, so three layers would be three boxes and their clones per request.
        .route_layer(
            ServiceBuilder::new()
                .layer(axum::middleware::from_fn_with_state(
                    state.clone(),
                    middleware::auth::authenticate,
                ))
                .layer(axum::middleware::from_fn_with_state(
                    state.clone(),
                    middleware::rate_limit::limit,
                ))
                .layer(axum::middleware::from_fn_with_state(
                    state.clone(),
                    middleware::admission::admit,
                )),
        );
    let operations = Router::new()
        .route("/healthz", get(operations::healthz))
        .route("/readyz", get(operations::readyz))
        .route("/metrics", get(operations::metrics))
        .route("/v1/backends", get(operations::backends))
        .route("/openapi.json", get(operations::openapi_json))
        .route("/docs", get(operations::docs_page));
    api.merge(operations)
        .fallback(|| async { AppError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async { AppError::MethodNotAllowed })
        // Outermost first, as one layer (see above): the request id, so that `observe`'s span
        // carries it and every response gets it; then `observe`; then the body limit.
        .layer(
            ServiceBuilder::new()
                .layer(axum::middleware::from_fn(middleware::request_id::assign))
                .layer(axum::middleware::from_fn_with_state(
                    state.clone(),
                    middleware::observe::observe,
                ))
                .layer(DefaultBodyLimit::max(body_limit)),
        )
        .with_state(state)
}
