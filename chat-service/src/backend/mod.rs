//! LLM back ends speaking Ollama's protocol or OpenAI's, and the traffic policy towards them.
//!
//! - [`protocol`]: one generation request on one endpoint, its NDJSON / SSE stream parsed into
//!   [`Chunk`]s.
//! - [`pool`]: the [`BackendPool`]: endpoints (static back ends, and one endpoint per address of
//!   a back end's `discoverDns` name), in-flight limits with bounded wait queues, failover with a
//!   retry budget, fallback, status.
//! - [`balance`]: the choice among candidate endpoints (smooth weighted round robin, power of two
//!   random choices, rendezvous hashing with bounded load).
//! - [`health`]: active health checks with thresholds and the passive circuit breaker.
//! - [`budget`]: the retry budget.
//! - [`discovery`]: DNS resolution of `discoverDns`, behind a [`Resolver`] that tests replace.
//!
//! # `GET /v1/backends`
//!
//! Unauthenticated, like `/readyz` and `/metrics` (it shows nothing `/metrics` does not); the
//! operator reads it into the `BackendsReady` condition. The shape is stable; fields may be
//! added, none removed or renamed:
//!
//! ```json
//! {
//!   "ready": 1,                 // endpoints with healthy == true and breaker != "open"
//!   "total": 2,                 // endpoints listed below
//!   "backends": [{
//!     "name": "ollama/10.0.0.7", // endpoint: the back end's name, `/<ip>` when discovered
//!     "backend": "ollama",       // the back end in the config
//!     "url": "http://10.0.0.7:11434",
//!     "protocol": "ollama",      // or "openai"
//!     "models": [],              // models served; empty = any allowed model
//!     "weight": 1,
//!     "fallback": false,         // reserved for routing.fallback, no regular traffic
//!     "healthy": true,           // active health checks (starts true)
//!     "breaker": "closed",       // "closed" | "open" | "halfOpen" (a probe may pass)
//!     "inFlight": 0,
//!     "queued": 0,
//!     "maxInFlight": 8,
//!     "consecutiveFailures": 0,  // failed requests in a row (what opens the breaker)
//!     "lastError": null          // last request or health-check error, if any
//!   }]
//! }
//! ```

mod balance;
mod budget;
mod discovery;
mod health;
mod pool;
mod protocol;

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;

use crate::conversation::ContextMessage;

pub use discovery::{Resolver, StaticResolver, SystemResolver};
pub use health::BreakerState;
pub use pool::{BackendPool, EndpointStatus, PoolStatus};
// Moved to the shared vocabulary; re-exported while callers still name it here.
pub use crate::conversation::Usage;

#[derive(Debug, Clone, PartialEq)]
pub enum Chunk {
    Token(String),
    /// The generation ended; `finish_reason` is `stop` or `length` as OpenAI spells them.
    Done {
        usage: Usage,
        finish_reason: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    #[error("status {status}: {body}")]
    Status { status: u16, body: String },
    #[error("malformed stream: {0}")]
    Malformed(String),
    #[error("no first token within {0:?}")]
    FirstTokenTimeout(Duration),
    #[error("generation exceeded {0:?}")]
    TotalTimeout(Duration),
    #[error("stream ended without a final message")]
    Truncated,
}

impl BackendError {
    /// Whether another endpoint may succeed where this one failed: everything but a 4xx other
    /// than 429 (the request itself is wrong, any endpoint would refuse it).
    pub fn retryable(&self) -> bool {
        match self {
            BackendError::Status { status, .. } => *status >= 500 || *status == 429,
            _ => true,
        }
    }

    /// Whether the failure says something about the endpoint's health (opens its breaker):
    /// not a refusal of the request (4xx) nor a throttle (429).
    pub fn counts_against_endpoint(&self) -> bool {
        match self {
            BackendError::Status { status, .. } => *status >= 500,
            _ => true,
        }
    }

    fn is_timeout(&self) -> bool {
        match self {
            BackendError::FirstTokenTimeout(_) | BackendError::TotalTimeout(_) => true,
            BackendError::Http(e) => e.is_timeout(),
            _ => false,
        }
    }

    /// Label of `chat_backend_requests_total{outcome}`.
    fn outcome(&self) -> &'static str {
        match self {
            BackendError::Status { status: 429, .. } => "throttled",
            BackendError::Status { status, .. } if *status < 500 => "rejected",
            e if e.is_timeout() => "timeout",
            _ => "error",
        }
    }
}

pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<Chunk, BackendError>> + Send>>;

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
    pub request_id: &'a str,
    /// The conversation the turn belongs to: the key of `sessionAffinity`. `None` for stateless
    /// requests, which are then balanced by least in-flight.
    pub session_id: Option<&'a str>,
}
