//! What a generation is to the rest of the service: the request, the chunks it streams and
//! the token counts it reports.

use std::pin::Pin;

use super::error::EndpointError;
use futures::Stream;
// Usage moved to the shared vocabulary; re-exported while callers still name it here.
pub use crate::conversation::Usage;
use crate::conversation::{ContextMessage, Sampling};
use crate::tools::ToolCall;

#[derive(Debug, Clone, PartialEq)]
pub enum Chunk {
    Token(String),
    /// The tools the model called, whole, once per answer and just before [`Chunk::Done`]
    /// (whose finish reason is then `tool_calls`).
    ToolCalls(Vec<ToolCall>),
    /// The generation ended; `finish_reason` is `stop` or `length` as OpenAI spells them.
    Done {
        usage: Usage,
        finish_reason: String,
    },
}

/// The chunks after the first; an error ends the stream (the endpoint failed mid-answer).
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<Chunk, EndpointError>> + Send>>;

/// A generation that has produced its first chunk; the rest follows from `rest`.
pub struct Generation {
    /// The endpoint that answers.
    pub backend: String,
    /// The model generating: the requested one, or `routing.fallback.model`.
    pub model: String,
    /// Served by `routing.fallback` because the regular endpoints were saturated or open.
    pub fallback: bool,
    pub first: Chunk,
    pub rest: ChunkStream,
}

pub struct GenerationRequest<'a> {
    pub model: &'a str,
    pub messages: &'a [ContextMessage],
    pub max_tokens: u32,
    /// Sampling temperature; the back end's default when `None`.
    pub temperature: Option<f32>,
    /// `top_p`, `seed`, `stop`, the output format and the tools; the back end's defaults where
    /// unset.
    pub sampling: &'a Sampling,
    pub request_id: &'a str,
    /// Ask the back end to stream. Off when nobody consumes the answer token by token: a whole
    /// answer costs one read and one parse instead of one per token (on both sides). The price
    /// is that no first token can be timed: such an attempt is bounded by `totalTimeoutMs`
    /// alone (see `BackendPool::start`).
    pub stream: bool,
    /// The conversation the turn belongs to: the key of `sessionAffinity`. `None` for stateless
    /// requests, which are then balanced by least in-flight.
    pub session_id: Option<&'a str>,
}
