//! Prometheus metrics of the service, registered once and shared through the app state.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The matched route template, or `unmatched`.
    pub route: String,
    /// A standard method's name, or `other`.
    pub method: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: String,
}

/// One endpoint: the configured back end and the endpoint (`<backend>` or `<backend>/<ip>`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub backend: String,
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointOutcomeLabels {
    pub backend: String,
    pub endpoint: String,
    /// `success` (first token), `error` (connection, 5xx, broken stream), `timeout`,
    /// `throttled` (429), `rejected` (other 4xx), `stream_error` (failure after the first token).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShedLabels {
    /// `queue_full`, `queue_timeout`, `breakers_open` or `contention`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub model: String,
    /// `in` (prompt) or `out` (completion).
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    /// `redis` or `mongodb`.
    pub store: &'static str,
    pub operation: &'static str,
    /// `ok` or `error`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitedLabels {
    /// `requests` or `tokens`.
    pub exhausted: &'static str,
    /// `redis` (shared across replicas) or `local` (Redis unreachable).
    pub limiter: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SummaryLabels {
    /// `stored`, `failed` (the back end refused or broke off), `timeout`, `empty` (the model
    /// answered nothing), `budget` (the caller's token budget had no room), `store_error`,
    /// `erased` (the session went while the summary was written).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiKeyLabels {
    /// First 8 hex digits of the key's SHA-256, never the key.
    pub key_id: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every (store, operation) that [`Metrics::store_op`] counts. Their series exist from start-up
/// at 0, for both outcomes: an alert on `rate(..{outcome="error"}[5m])` sees the first error, and
/// a background loop's first run adds no series to a scrape.
pub const STORE_OPERATIONS: &[(&str, &str)] = &[
    ("redis", "load"),
    ("redis", "refill"),
    ("redis", "append"),
    ("redis", "delete"),
    ("redis", "ping"),
    ("mongodb", "load"),
    ("mongodb", "append"),
    ("mongodb", "trim"),
    ("mongodb", "delete"),
    ("mongodb", "list"),
    ("mongodb", "page"),
    ("mongodb", "summary_load"),
    ("mongodb", "summary_claim"),
    ("mongodb", "summary_store"),
    ("mongodb", "sweep"),
    ("mongodb", "erasure"),
];

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: HistogramFamily<RouteLabels>,
    pub time_to_first_token: HistogramFamily<BackendLabels>,
    pub tokens: Family<TokenLabels, Counter>,
    pub store_operations: Family<StoreLabels, Counter>,
    pub open_websockets: Gauge,
    /// Chat API requests holding an admission permit (streams until their last event): the
    /// per-pod series `chat_requests_in_flight` that the operator's HPA averages.
    pub requests_in_flight: Gauge,
    /// 1 while Redis answers, 0 while turns are served from MongoDB alone.
    pub redis_up: Gauge,
    /// 1 when MongoDB keeps the history's TTL indexes (the server's backstop for
    /// `retention.maxAgeSeconds`), 0 when it refused them (the sweeper alone enforces the age),
    /// -1 until that is known or when no maximum age is set.
    pub history_ttl_index: Gauge,
    pub incomplete_turns: Counter,
    pub rate_limited: Family<RateLimitedLabels, Counter>,
    pub api_key_requests: Family<ApiKeyLabels, Counter>,
    pub auth_rejected: Counter,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub cache_coalesced: Counter,
    /// 1 while the endpoint passes its active health checks.
    pub backend_up: Family<EndpointLabels, Gauge>,
    /// 0 closed, 1 half-open, 2 open.
    pub backend_breaker_state: Family<EndpointLabels, Gauge>,
    pub backend_in_flight: Family<EndpointLabels, Gauge>,
    pub backend_queued: Family<EndpointLabels, Gauge>,
    pub backend_requests: Family<EndpointOutcomeLabels, Counter>,
    pub backend_retries: Counter,
    pub backend_retry_budget_exhausted: Counter,
    pub backend_shed: Family<ShedLabels, Counter>,
    pub backend_fallbacks: Counter,
    /// Summary calls (`context.summarisation`) by outcome; every outcome but `stored` leaves
    /// the session on plain trimming.
    pub summaries: Family<SummaryLabels, Counter>,
}

fn latency_histogram() -> Histogram {
    // 5 ms .. ~80 s covers both a cached answer and a long CPU-bound generation.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("chat");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route, method and status",
            requests.clone(),
        );
        let request_duration: HistogramFamily<RouteLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "http_request_duration_seconds",
            "Time until the response head is sent, by route",
            request_duration.clone(),
        );
        let time_to_first_token: HistogramFamily<BackendLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "time_to_first_token_seconds",
            "Time from the back-end request to its first generated token",
            time_to_first_token.clone(),
        );
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "tokens",
            "Prompt (in) and completion (out) tokens",
            tokens.clone(),
        );
        let store_operations = Family::<StoreLabels, Counter>::default();
        for &(store, operation) in STORE_OPERATIONS {
            for outcome in ["ok", "error"] {
                // Creating the series is the point; the guard it returns is not needed.
                drop(store_operations.get_or_create(&StoreLabels {
                    store,
                    operation,
                    outcome,
                }));
            }
        }
        registry.register(
            "history_store_operations",
            "History store operations by store, operation and outcome",
            store_operations.clone(),
        );
        let open_websockets = Gauge::default();
        registry.register(
            "open_websockets",
            "WebSocket connections open",
            open_websockets.clone(),
        );
        let requests_in_flight = Gauge::default();
        registry.register(
            "requests_in_flight",
            "Chat API requests in flight on this pod (admitted, response not finished)",
            requests_in_flight.clone(),
        );
        let redis_up = Gauge::default();
        registry.register(
            "redis_up",
            "Whether the last Redis operation succeeded",
            redis_up.clone(),
        );
        let history_ttl_index = Gauge::default();
        history_ttl_index.set(-1);
        registry.register(
            "history_ttl_index",
            "1 when MongoDB expires idle sessions too (TTL indexes), 0 when it has no TTL indexes and the retention sweeper alone does, -1 when unknown or no maximum age is set",
            history_ttl_index.clone(),
        );
        let incomplete_turns = Counter::default();
        registry.register(
            "incomplete_turns",
            "Turns stored incomplete because the client left or the back end failed mid-stream",
            incomplete_turns.clone(),
        );
        let rate_limited = Family::<RateLimitedLabels, Counter>::default();
        registry.register(
            "rate_limited",
            "Requests refused with 429, by exhausted budget and limiter",
            rate_limited.clone(),
        );
        let api_key_requests = Family::<ApiKeyLabels, Counter>::default();
        registry.register(
            "api_key_requests",
            "Authenticated requests by API key id (a hash prefix, not the key)",
            api_key_requests.clone(),
        );
        let auth_rejected = Counter::default();
        registry.register(
            "auth_rejected",
            "Requests refused with 401 for a missing or unknown API key",
            auth_rejected.clone(),
        );
        let cache_hits = Counter::default();
        registry.register(
            "cache_hits",
            "Turns answered from the response cache in Redis",
            cache_hits.clone(),
        );
        let cache_misses = Counter::default();
        registry.register(
            "cache_misses",
            "Cacheable turns that went to a back end",
            cache_misses.clone(),
        );
        let cache_coalesced = Counter::default();
        registry.register(
            "cache_coalesced",
            "Cacheable turns answered by an identical generation already in flight",
            cache_coalesced.clone(),
        );
        let backend_up = Family::<EndpointLabels, Gauge>::default();
        registry.register(
            "backend_up",
            "Whether the endpoint passes its active health checks",
            backend_up.clone(),
        );
        let backend_breaker_state = Family::<EndpointLabels, Gauge>::default();
        registry.register(
            "backend_breaker_state",
            "Circuit breaker of the endpoint: 0 closed, 1 half-open, 2 open",
            backend_breaker_state.clone(),
        );
        let backend_in_flight = Family::<EndpointLabels, Gauge>::default();
        registry.register(
            "backend_in_flight",
            "Generation requests in flight on the endpoint",
            backend_in_flight.clone(),
        );
        let backend_queued = Family::<EndpointLabels, Gauge>::default();
        registry.register(
            "backend_queued",
            "Requests waiting for an in-flight slot of the endpoint",
            backend_queued.clone(),
        );
        let backend_requests = Family::<EndpointOutcomeLabels, Counter>::default();
        registry.register(
            "backend_requests",
            "Generation attempts on an endpoint by outcome",
            backend_requests.clone(),
        );
        let backend_retries = Counter::default();
        registry.register(
            "backend_retries",
            "Attempts on another endpoint after a failure before the first token",
            backend_retries.clone(),
        );
        let backend_retry_budget_exhausted = Counter::default();
        registry.register(
            "backend_retry_budget_exhausted",
            "Failovers not made because the retry budget was spent",
            backend_retry_budget_exhausted.clone(),
        );
        let backend_shed = Family::<ShedLabels, Counter>::default();
        registry.register(
            "backend_shed",
            "Turns no endpoint could take (before any fallback), by reason",
            backend_shed.clone(),
        );
        let backend_fallbacks = Counter::default();
        registry.register(
            "backend_fallbacks",
            "Turns sent to routing.fallback",
            backend_fallbacks.clone(),
        );
        let summaries = Family::<SummaryLabels, Counter>::default();
        registry.register(
            "summaries",
            "Summary calls for sessions past their context budget, by outcome",
            summaries.clone(),
        );
        Self {
            registry,
            summaries,
            backend_up,
            backend_breaker_state,
            backend_in_flight,
            backend_queued,
            backend_requests,
            backend_retries,
            backend_retry_budget_exhausted,
            backend_shed,
            backend_fallbacks,
            rate_limited,
            api_key_requests,
            auth_rejected,
            cache_hits,
            cache_misses,
            cache_coalesced,
            requests,
            request_duration,
            time_to_first_token,
            tokens,
            store_operations,
            open_websockets,
            requests_in_flight,
            redis_up,
            history_ttl_index,
            incomplete_turns,
        }
    }

    pub fn store_op(&self, store: &'static str, operation: &'static str, ok: bool) {
        debug_assert!(
            STORE_OPERATIONS.contains(&(store, operation)),
            "{store}/{operation} is missing from STORE_OPERATIONS"
        );
        self.store_operations
            .get_or_create(&StoreLabels {
                store,
                operation,
                outcome: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_store_operation_is_a_series_at_zero_from_the_start() {
        let text = Metrics::new().encode();
        for &(store, operation) in STORE_OPERATIONS {
            for outcome in ["ok", "error"] {
                let line = format!(
                    "chat_history_store_operations_total{{store=\"{store}\",operation=\"{operation}\",outcome=\"{outcome}\"}} 0"
                );
                assert!(text.contains(&line), "missing {line} in\n{text}");
            }
        }
    }
}
