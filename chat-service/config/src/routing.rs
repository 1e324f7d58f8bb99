//! `routing`: how turns are spread over the back ends, retried, limited and failed over.

use serde::{Deserialize, Serialize};

use crate::defaults;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Strategy {
    RoundRobin,
    LeastInFlight,
    SessionAffinity,
}

/// Traffic policy towards the LLM back ends. Every field has a default, so `routing: {}` is valid.
///
/// Endpoints: each back end is one endpoint, or, with `discoverDns`, one endpoint per address
/// its DNS name resolves to (named `<backend>/<ip>`), re-resolved every
/// `discoveryIntervalSeconds`. Limits, queues and breakers below apply per endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoutingConfig {
    /// How an endpoint is chosen among those serving the requested model: `roundRobin`
    /// (smooth weighted round robin by `weight`), `leastInFlight` (power of two random
    /// choices, fewer requests in flight per unit of weight wins) or `sessionAffinity`
    /// (weighted rendezvous hashing of the session id with bounded load, so that a session's
    /// turns reuse one endpoint's KV cache; stateless requests fall back to `leastInFlight`).
    #[serde(default = "defaults::strategy")]
    pub strategy: Strategy,
    /// Milliseconds to open a TCP (and TLS) connection to an endpoint.
    #[serde(default = "defaults::connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Milliseconds from sending a request to its first token; past it the attempt fails over.
    /// Applies to turns whose client streams (SSE, WebSocket, the response cache's leaders):
    /// for a JSON client the back end is asked for a whole answer, which has no first token
    /// before its last, so those attempts are bounded by `totalTimeoutMs` alone.
    #[serde(default = "defaults::first_token_timeout_ms")]
    pub first_token_timeout_ms: u64,
    /// Milliseconds a whole generation may take.
    #[serde(default = "defaults::total_timeout_ms")]
    pub total_timeout_ms: u64,
    /// Attempts per turn across endpoints, counting the first; never the same endpoint twice.
    /// Connection errors, 5xx, 429 and timeouts before the first token are retried; other 4xx
    /// are not.
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    /// Seconds between active health checks (`GET /api/tags` for Ollama, `GET /v1/models`
    /// for OpenAI-compatible servers).
    #[serde(default = "defaults::health_check_interval_seconds")]
    pub health_check_interval_seconds: u64,
    /// Consecutive failed health checks that mark an endpoint unhealthy.
    #[serde(default = "defaults::unhealthy_threshold")]
    pub unhealthy_threshold: u32,
    /// Consecutive successful health checks that mark an unhealthy endpoint healthy again.
    #[serde(default = "defaults::healthy_threshold")]
    pub healthy_threshold: u32,
    /// Consecutive failed requests (errors or timeouts before or after the first token) that
    /// open an endpoint's circuit breaker.
    #[serde(default = "defaults::breaker_failures")]
    pub breaker_failures: u32,
    /// Seconds an open breaker keeps traffic away; then one probe request is let through
    /// (half-open): success closes the breaker, failure opens it again.
    #[serde(default = "defaults::breaker_cooldown_seconds")]
    pub breaker_cooldown_seconds: u64,
    /// Requests in flight per endpoint; further requests wait in the endpoint's queue.
    #[serde(default = "defaults::max_in_flight_per_backend")]
    pub max_in_flight_per_backend: u32,
    /// Requests that may wait per endpoint once every candidate is at its in-flight limit;
    /// beyond it the request is refused with 503 (or sent to `fallback`). 0 disables waiting.
    #[serde(default = "defaults::queue_depth")]
    pub queue_depth: u32,
    /// Milliseconds a request waits in a queue before it is refused with 503.
    #[serde(default = "defaults::queue_timeout_ms")]
    pub queue_timeout_ms: u64,
    /// Retries allowed, as a percentage of recent first attempts (a token bucket: every turn
    /// deposits this share of a retry, every retry takes one), so that retries cannot multiply
    /// an outage. 0 to 100.
    #[serde(default = "defaults::retry_budget_percent")]
    pub retry_budget_percent: u32,
    /// Retries per second always allowed on top of `retryBudgetPercent`, so that a quiet
    /// service still fails over.
    #[serde(default = "defaults::retry_budget_min_per_second")]
    pub retry_budget_min_per_second: u32,
    /// `sessionAffinity` only: an endpoint keeps its sessions while its requests in flight stay
    /// below `ceil(factor * average)`, with factor = this / 100; beyond it sessions spill to
    /// their next endpoint. At least 100.
    #[serde(default = "defaults::affinity_load_factor_percent")]
    pub affinity_load_factor_percent: u32,
    /// Seconds between DNS resolutions of back ends with `discoverDns`.
    #[serde(default = "defaults::discovery_interval_seconds")]
    pub discovery_interval_seconds: u64,
    /// Used instead of answering 503 when every candidate endpoint is saturated (queues full)
    /// or has its breaker open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<FallbackConfig>,
}

/// Degraded service instead of a 503: another back end, another model, or both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FallbackConfig {
    /// Name of a back end in `backends` reserved for fallback: it takes no regular traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Model generated with instead of the requested one (need not be in `models.allowed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}
