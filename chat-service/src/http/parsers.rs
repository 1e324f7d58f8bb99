//! The parsers of what clients send, one entry point per route or frame, as functions of the
//! raw bytes: what the handler makes of a body before any store, limit or back end is involved
//! (the same `axum::Json` parsing and the same checks the handlers call). They exist for the fuzz
//! targets in `chat-service/fuzz`, which check that no input panics and that every refusal is a
//! client error (4xx) with the API's error body. The back ends' stream parser is
//! [`crate::backend::StreamDecoder`].

use super::AppError;
use super::routes::{chat, openai, websocket};

/// A `POST /v1/chat` body, as the handler checks it before it touches a store.
pub fn chat_request(body: &[u8], max_message_bytes: usize) -> Result<(), AppError> {
    let axum::Json(request) = axum::Json::<chat::ChatRequest>::from_bytes(body)?;
    chat::check_request(&request, max_message_bytes).map(drop)
}

/// A `POST /v1/chat/completions` body and its `x-session-id` header, as the handler checks them
/// (the model's allow-list aside).
pub fn completion_request(
    body: &[u8],
    session_header: Option<&[u8]>,
    max_message_bytes: usize,
) -> Result<(), AppError> {
    let axum::Json(mut request) = axum::Json::<openai::CompletionRequest>::from_bytes(body)?;
    openai::check_request(&mut request, session_header, max_message_bytes).map(drop)
}

/// A text frame a client sends on `/ws/chat`.
pub fn websocket_frame(text: &str, max_message_bytes: usize) -> Result<(), AppError> {
    websocket::parse_frame(text, max_message_bytes).map(drop)
}
