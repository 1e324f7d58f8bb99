//! LLM back ends speaking Ollama's protocol or OpenAI's, and the traffic policy towards them.
//!
//! How the parts fit, from a turn's point of view: [`BackendPool::start`] ([`pool`]) asks the
//! [`table`] for the endpoints the route allows, [`selection`] chooses one (or the queue to wait
//! in), [`endpoint`] leases it (permit, in-flight count, breaker admission), [`protocol`] sends
//! the request and parses the stream ([`StreamDecoder`]), and the outcome goes back through the
//! lease to the endpoint's [`breaker`]. Failover and fallback happen in [`pool`], bounded by the
//! [`budget`]. Beside the request path, two loops keep the endpoints current: [`health`] checks
//! every endpoint on an interval, and [`discovery`] swaps in one endpoint per address of a
//! `discoverDns` name. [`status`] reads all of it for `/v1/backends` and the gauges.
//!
//! - [`generation`]: what the rest of the service sees: [`GenerationRequest`], [`Generation`],
//!   [`Chunk`]s.
//! - [`error`]: [`EndpointError`] (one endpoint failed), [`BackendError`] (no generation for
//!   the turn; the HTTP layer maps it to a status), [`PoolStartError`].
//! - [`table`]: the configured back ends and their current endpoints, a snapshot swapped whole
//!   when discovery changes it, so that requests read it without a lock (the layout of
//!   `pingora-load-balancing`: backends, discovery, health and selection apart).
//! - [`endpoint`]: one endpoint's limits, queue, breaker and health; the [`Lease`](endpoint::Lease).
//! - [`selection`]: the choice among candidates (smooth weighted round robin, power of two
//!   random choices, rendezvous hashing with bounded load).
//! - [`breaker`] and [`health`]: the passive circuit breaker and the active health checks.
//! - [`budget`]: the retry budget.
//! - [`rollout`]: a canary rollout's split of sessions and each side's figures.
//! - [`discovery`]: DNS resolution of `discoverDns`, behind a [`Resolver`] that tests replace.
//! - [`status`]: the `/v1/backends` document and the per-endpoint gauges.
//! - [`wire`]: messages, tools and tool calls in each protocol's shape.
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
//!   }],
//!   "rollout": {                 // only while the config has `rollout`
//!     "candidateBackend": "canary", "candidateModel": null, "candidateWeightPercent": 25,
//!     "sinceUnixSeconds": 1800000000, // the figures cover this pod's life (a step's window)
//!     "ttftBucketsMs": [50, 100, ...], // upper bounds; ttftCounts has one more (slower)
//!     "current":   {"turns": 30, "errors": 0, "ttftCounts": [...],
//!                   "completionTokens": 900, "generationSeconds": 41.5},
//!     "candidate": {"turns": 10, "errors": 1, "ttftCounts": [...],
//!                   "completionTokens": 290, "generationSeconds": 12.0}
//!   }
//! }
//! ```

mod breaker;
mod budget;
mod discovery;
mod endpoint;
mod error;
mod generation;
mod health;
mod pool;
mod protocol;
mod rollout;
mod selection;
mod status;
mod table;
mod wire;

pub use breaker::BreakerState;
pub use discovery::{Resolver, StaticResolver, SystemResolver};
pub use error::{BackendError, EndpointError, PoolStartError, Saturation};
pub use generation::{Chunk, ChunkStream, Generation, GenerationRequest, Usage};
pub use pool::BackendPool;
pub use protocol::StreamDecoder;
pub use rollout::{RolloutReport, Side, SideReport, TTFT_BUCKETS_MS};
pub use status::{EndpointStatus, PoolStatus};
