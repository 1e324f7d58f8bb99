//! The chat service's configuration: a YAML file (rendered by the operator into a ConfigMap),
//! with secrets supplied through environment variables named in the file.

use serde::{Deserialize, Serialize};

/// Environment variable that carries the MongoDB connection URI (from the connection Secret).
pub const ENV_MONGODB_URI: &str = "MONGODB_URI";
/// Environment variable that carries the Redis URL (with its password, from a Secret).
pub const ENV_REDIS_URL: &str = "REDIS_URL";
/// Environment variable with accepted API keys (one per line or comma-separated), read when
/// `auth` is enabled, in addition to `auth.apiKeysFile`.
pub const ENV_API_KEYS: &str = "CHAT_API_KEYS";

/// A setting that is missing or out of range; `setting` is the path in the file (or the
/// environment variable) so that an operator can find it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid setting `{setting}`: {reason}")]
pub struct ConfigError {
    pub setting: String,
    pub reason: String,
}

impl ConfigError {
    fn new(setting: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            setting: setting.into(),
            reason: reason.into(),
        }
    }
}

/// Top-level configuration of one chat-service process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP server listens on.
    #[serde(default = "defaults::listen")]
    pub listen: String,
    /// LLM back ends; how traffic is spread over them is `routing`.
    pub backends: Vec<BackendConfig>,
    /// Models users may ask for, and the default.
    pub models: ModelsConfig,
    /// Where conversation history lives.
    pub history: HistoryConfig,
    /// How the context sent to the model is built.
    #[serde(default)]
    pub context: ContextConfig,
    /// Timeouts, retries and load balancing towards the back ends.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// Response cache in Redis.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Per-caller rate limits shared across replicas through Redis.
    #[serde(default)]
    pub rate_limit: RateLimitConfig,
    /// API-key authentication.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Request size and concurrency limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Seconds to finish in-flight turns and streams after SIGTERM.
    #[serde(default = "defaults::shutdown_grace_seconds")]
    pub shutdown_grace_seconds: u64,
}

/// Wire protocol an LLM back end speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Ollama's native API (`/api/chat` NDJSON streaming, `/api/tags`).
    Ollama,
    /// Any OpenAI-compatible server (`/v1/chat/completions` SSE, `/v1/models`).
    Openai,
}

/// One LLM back end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendConfig {
    /// Unique name, used in metrics and logs.
    pub name: String,
    /// Base URL, e.g. `http://ollama:11434` or `https://llm.example.com` (without `/v1`).
    pub url: String,
    pub protocol: Protocol,
    /// Relative share of traffic for weighted strategies.
    #[serde(default = "defaults::weight")]
    pub weight: u32,
    /// Name of the environment variable holding this back end's API key, if it needs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// When set, the DNS name of a headless Service whose pods are balanced individually: every
    /// address it resolves to becomes an endpoint `<name>/<ip>` reached with `url`'s scheme and
    /// port (or the port given as `host:port` here). Meant for in-cluster plain HTTP; with
    /// `https` the certificate would have to name the pod IPs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discover_dns: Option<String>,
    /// Models this back end serves; empty means any model in `models.allowed`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelsConfig {
    /// Model used when a request names none.
    pub default: String,
    /// Models a request may name; empty means only the default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HistoryConfig {
    #[serde(default)]
    pub redis: RedisHistoryConfig,
    #[serde(default)]
    pub mongodb: MongoHistoryConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedisHistoryConfig {
    /// Environment variable holding the Redis URL.
    #[serde(default = "defaults::redis_url_env")]
    pub url_env: String,
    /// Prefix of every key this service writes, so several services can share one Redis.
    #[serde(default = "defaults::key_prefix")]
    pub key_prefix: String,
    /// Recent messages kept per session in Redis.
    #[serde(default = "defaults::recent_messages")]
    pub recent_messages: u32,
    /// Seconds a session's recent messages live in Redis after its last use.
    #[serde(default = "defaults::ttl_seconds")]
    pub ttl_seconds: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MongoHistoryConfig {
    /// Environment variable holding the MongoDB URI.
    #[serde(default = "defaults::mongodb_uri_env")]
    pub uri_env: String,
    #[serde(default = "defaults::database")]
    pub database: String,
    /// Collection of messages (one document per message); sessions go to `<collection>_sessions`.
    #[serde(default = "defaults::collection")]
    pub collection: String,
    /// Milliseconds to find a reachable server before an operation fails (then the API answers 503).
    #[serde(default = "defaults::mongodb_timeout_ms")]
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContextConfig {
    /// System prompt put first in every context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<String>,
    /// Budget for the context sent to the model, in approximate tokens; oldest turns go first.
    #[serde(default = "defaults::max_context_tokens")]
    pub max_context_tokens: u32,
    /// Upper bound of generated tokens per turn.
    #[serde(default = "defaults::max_output_tokens")]
    pub max_output_tokens: u32,
}

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

/// Response cache. A turn is answered from (and stored into) the cache only when `enabled` is
/// true and the request asks for deterministic generation with `temperature: 0`; any other
/// request bypasses the cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CacheConfig {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "defaults::cache_ttl_seconds")]
    pub ttl_seconds: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitConfig {
    #[serde(default)]
    pub enabled: bool,
    /// Requests admitted per caller per window.
    #[serde(default = "defaults::requests_per_window")]
    pub requests_per_window: u32,
    /// Tokens (prompt + completion) admitted per caller per window; 0 means unlimited.
    #[serde(default)]
    pub tokens_per_window: u64,
    #[serde(default = "defaults::window_seconds")]
    pub window_seconds: u64,
    /// Who a limit applies to.
    #[serde(default)]
    pub key_by: RateLimitKey,
}

/// The caller a rate limit is counted against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub enum RateLimitKey {
    /// The API key's non-secret id when `auth` is enabled, else the client IP.
    #[default]
    ApiKey,
    /// The `x-user-id` header (set by a trusted gateway), else the client IP.
    User,
    /// The TCP peer address of the request.
    ClientIp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(default)]
    pub enabled: bool,
    /// File with one API key per line (a mounted Secret); reloaded when it changes.
    /// Keys may also come from the environment variable [`ENV_API_KEYS`]; both sources count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_keys_file: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest accepted user message in bytes (413 beyond).
    #[serde(default = "defaults::max_message_bytes")]
    pub max_message_bytes: usize,
    /// Requests handled at once before load shedding with 503.
    #[serde(default = "defaults::max_concurrent_requests")]
    pub max_concurrent_requests: usize,
}

mod defaults {
    use super::Strategy;
    pub fn listen() -> String {
        "0.0.0.0:8080".into()
    }
    pub fn shutdown_grace_seconds() -> u64 {
        30
    }
    pub fn weight() -> u32 {
        1
    }
    pub fn redis_url_env() -> String {
        super::ENV_REDIS_URL.into()
    }
    pub fn key_prefix() -> String {
        "chat".into()
    }
    pub fn recent_messages() -> u32 {
        20
    }
    pub fn ttl_seconds() -> u64 {
        3600
    }
    pub fn mongodb_uri_env() -> String {
        super::ENV_MONGODB_URI.into()
    }
    pub fn database() -> String {
        "chat".into()
    }
    pub fn collection() -> String {
        "messages".into()
    }
    pub fn mongodb_timeout_ms() -> u64 {
        3_000
    }
    pub fn max_context_tokens() -> u32 {
        4096
    }
    pub fn max_output_tokens() -> u32 {
        512
    }
    pub fn strategy() -> Strategy {
        Strategy::RoundRobin
    }
    pub fn connect_timeout_ms() -> u64 {
        2_000
    }
    pub fn first_token_timeout_ms() -> u64 {
        30_000
    }
    pub fn total_timeout_ms() -> u64 {
        300_000
    }
    pub fn max_attempts() -> u32 {
        2
    }
    pub fn health_check_interval_seconds() -> u64 {
        10
    }
    pub fn breaker_failures() -> u32 {
        5
    }
    pub fn breaker_cooldown_seconds() -> u64 {
        30
    }
    pub fn unhealthy_threshold() -> u32 {
        2
    }
    pub fn healthy_threshold() -> u32 {
        1
    }
    pub fn max_in_flight_per_backend() -> u32 {
        8
    }
    pub fn queue_depth() -> u32 {
        64
    }
    pub fn queue_timeout_ms() -> u64 {
        30_000
    }
    pub fn retry_budget_percent() -> u32 {
        20
    }
    pub fn retry_budget_min_per_second() -> u32 {
        3
    }
    pub fn affinity_load_factor_percent() -> u32 {
        125
    }
    pub fn discovery_interval_seconds() -> u64 {
        15
    }
    pub fn cache_ttl_seconds() -> u64 {
        600
    }
    pub fn requests_per_window() -> u32 {
        60
    }
    pub fn window_seconds() -> u64 {
        60
    }
    pub fn max_message_bytes() -> usize {
        32 * 1024
    }
    pub fn max_concurrent_requests() -> usize {
        512
    }
}

macro_rules! default_from_serde {
    ($($t:ty),*) => {$(
        impl Default for $t {
            fn default() -> Self {
                serde_json::from_value(serde_json::json!({})).expect("every field has a default")
            }
        }
    )*};
}
default_from_serde!(
    RedisHistoryConfig,
    MongoHistoryConfig,
    ContextConfig,
    RoutingConfig,
    CacheConfig,
    RateLimitConfig,
    LimitsConfig
);

impl Config {
    /// Parses the YAML the operator renders; unknown keys are errors so typos surface at start.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let config: Config = serde_yaml::from_str(text).map_err(|e| {
            let setting = e
                .location()
                .map(|l| format!("line {} column {}", l.line(), l.column()))
                .unwrap_or_else(|| "<document>".into());
            ConfigError::new(setting, e.to_string())
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and validates the config file at `path`.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
        })?;
        Self::from_yaml(&text)
    }

    /// Checks what serde cannot: ranges, cross-field rules and URL shapes.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::new(
                "listen",
                format!("`{}` is not host:port with an IP address", self.listen),
            ));
        }
        if self.backends.is_empty() {
            return Err(ConfigError::new(
                "backends",
                "at least one back end is required",
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, backend) in self.backends.iter().enumerate() {
            if backend.name.is_empty() {
                return Err(ConfigError::new(
                    format!("backends[{i}].name"),
                    "must not be empty",
                ));
            }
            if !names.insert(backend.name.as_str()) {
                return Err(ConfigError::new(
                    format!("backends[{i}].name"),
                    format!("duplicate name `{}`", backend.name),
                ));
            }
            if !(backend.url.starts_with("http://") || backend.url.starts_with("https://")) {
                return Err(ConfigError::new(
                    format!("backends[{i}].url"),
                    "must start with http:// or https://",
                ));
            }
            if backend.weight == 0 {
                return Err(ConfigError::new(
                    format!("backends[{i}].weight"),
                    "must be at least 1",
                ));
            }
            if let Some(host) = &backend.discover_dns
                && (host.is_empty()
                    || host.contains("://")
                    || host.contains('/')
                    || host.contains(char::is_whitespace))
            {
                return Err(ConfigError::new(
                    format!("backends[{i}].discoverDns"),
                    "must be a DNS name, optionally with `:port`, without scheme or path",
                ));
            }
            if backend.api_key_env.as_deref() == Some("") {
                return Err(ConfigError::new(
                    format!("backends[{i}].apiKeyEnv"),
                    "must not be empty when set",
                ));
            }
        }
        if self.models.default.is_empty() {
            return Err(ConfigError::new("models.default", "must not be empty"));
        }
        if self.models.allowed.iter().any(String::is_empty) {
            return Err(ConfigError::new(
                "models.allowed",
                "must not contain an empty name",
            ));
        }
        let redis = &self.history.redis;
        if redis.url_env.is_empty() {
            return Err(ConfigError::new(
                "history.redis.urlEnv",
                "must not be empty",
            ));
        }
        if redis.recent_messages == 0 {
            return Err(ConfigError::new(
                "history.redis.recentMessages",
                "must be at least 1",
            ));
        }
        if redis.ttl_seconds == 0 {
            return Err(ConfigError::new(
                "history.redis.ttlSeconds",
                "must be at least 1",
            ));
        }
        if redis.key_prefix.is_empty() || redis.key_prefix.contains(char::is_whitespace) {
            return Err(ConfigError::new(
                "history.redis.keyPrefix",
                "must be non-empty without spaces",
            ));
        }
        let mongo = &self.history.mongodb;
        if mongo.uri_env.is_empty() {
            return Err(ConfigError::new(
                "history.mongodb.uriEnv",
                "must not be empty",
            ));
        }
        for (setting, name) in [
            ("history.mongodb.database", &mongo.database),
            ("history.mongodb.collection", &mongo.collection),
        ] {
            if name.is_empty() || name.contains(['$', '.', '\0', ' ']) {
                return Err(ConfigError::new(
                    setting,
                    "must be a non-empty name without `$`, `.`, spaces or NUL",
                ));
            }
        }
        if mongo.timeout_ms == 0 {
            return Err(ConfigError::new(
                "history.mongodb.timeoutMs",
                "must be at least 1",
            ));
        }
        if self.context.max_context_tokens < 16 {
            return Err(ConfigError::new(
                "context.maxContextTokens",
                "must be at least 16",
            ));
        }
        if self.context.max_output_tokens == 0 {
            return Err(ConfigError::new(
                "context.maxOutputTokens",
                "must be at least 1",
            ));
        }
        let routing = &self.routing;
        for (setting, value) in [
            ("routing.connectTimeoutMs", routing.connect_timeout_ms),
            (
                "routing.firstTokenTimeoutMs",
                routing.first_token_timeout_ms,
            ),
            ("routing.totalTimeoutMs", routing.total_timeout_ms),
        ] {
            if value == 0 {
                return Err(ConfigError::new(setting, "must be at least 1"));
            }
        }
        if routing.first_token_timeout_ms > routing.total_timeout_ms {
            return Err(ConfigError::new(
                "routing.firstTokenTimeoutMs",
                "must not exceed routing.totalTimeoutMs",
            ));
        }
        for (setting, value) in [
            ("routing.maxAttempts", u64::from(routing.max_attempts)),
            (
                "routing.healthCheckIntervalSeconds",
                routing.health_check_interval_seconds,
            ),
            (
                "routing.unhealthyThreshold",
                u64::from(routing.unhealthy_threshold),
            ),
            (
                "routing.healthyThreshold",
                u64::from(routing.healthy_threshold),
            ),
            (
                "routing.breakerFailures",
                u64::from(routing.breaker_failures),
            ),
            (
                "routing.breakerCooldownSeconds",
                routing.breaker_cooldown_seconds,
            ),
            (
                "routing.maxInFlightPerBackend",
                u64::from(routing.max_in_flight_per_backend),
            ),
            ("routing.queueTimeoutMs", routing.queue_timeout_ms),
            (
                "routing.discoveryIntervalSeconds",
                routing.discovery_interval_seconds,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::new(setting, "must be at least 1"));
            }
        }
        if routing.retry_budget_percent > 100 {
            return Err(ConfigError::new(
                "routing.retryBudgetPercent",
                "must be between 0 and 100",
            ));
        }
        if routing.affinity_load_factor_percent < 100 {
            return Err(ConfigError::new(
                "routing.affinityLoadFactorPercent",
                "must be at least 100 (an endpoint may always take its average share)",
            ));
        }
        if let Some(fallback) = &routing.fallback {
            if fallback.backend.is_none() && fallback.model.is_none() {
                return Err(ConfigError::new(
                    "routing.fallback",
                    "must name a `backend`, a `model` or both",
                ));
            }
            if fallback.model.as_deref() == Some("") {
                return Err(ConfigError::new(
                    "routing.fallback.model",
                    "must not be empty when set",
                ));
            }
            if let Some(name) = &fallback.backend {
                if !self.backends.iter().any(|b| &b.name == name) {
                    return Err(ConfigError::new(
                        "routing.fallback.backend",
                        format!("`{name}` is not the name of a back end in `backends`"),
                    ));
                }
                if self.backends.iter().all(|b| &b.name == name) {
                    return Err(ConfigError::new(
                        "routing.fallback.backend",
                        "the fallback back end takes no regular traffic, so another back end is required",
                    ));
                }
            }
        }
        let rate_limit = &self.rate_limit;
        if rate_limit.enabled {
            if rate_limit.requests_per_window == 0 {
                return Err(ConfigError::new(
                    "rateLimit.requestsPerWindow",
                    "must be at least 1",
                ));
            }
            if rate_limit.window_seconds == 0 {
                return Err(ConfigError::new(
                    "rateLimit.windowSeconds",
                    "must be at least 1",
                ));
            }
        }
        if self.auth.enabled && self.auth.api_keys_file.as_deref() == Some("") {
            return Err(ConfigError::new(
                "auth.apiKeysFile",
                "must not be empty when set",
            ));
        }
        if self.limits.max_message_bytes == 0 {
            return Err(ConfigError::new(
                "limits.maxMessageBytes",
                "must be at least 1",
            ));
        }
        if self.limits.max_concurrent_requests == 0 {
            return Err(ConfigError::new(
                "limits.maxConcurrentRequests",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// Every model a request may name: the default first, then the allow-list.
    pub fn allowed_models(&self) -> Vec<String> {
        let mut models = vec![self.models.default.clone()];
        for model in &self.models.allowed {
            if !models.contains(model) {
                models.push(model.clone());
            }
        }
        models
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
backends:
  - name: local
    url: http://127.0.0.1:11434
    protocol: ollama
models:
  default: gemma3-270m
history: {}
"#;

    #[test]
    fn minimal_file_gets_defaults() {
        let config = Config::from_yaml(MINIMAL).unwrap();
        assert_eq!(config.listen, "0.0.0.0:8080");
        assert_eq!(config.history.redis.url_env, ENV_REDIS_URL);
        assert_eq!(config.history.mongodb.timeout_ms, 3_000);
        assert_eq!(config.allowed_models(), vec!["gemma3-270m".to_string()]);
        assert_eq!(config.routing.max_in_flight_per_backend, 8);
        assert_eq!(config.routing.queue_depth, 64);
        assert_eq!(config.routing.queue_timeout_ms, 30_000);
        assert_eq!(config.routing.retry_budget_percent, 20);
        assert_eq!(config.routing.affinity_load_factor_percent, 125);
        assert_eq!(config.routing.fallback, None);
    }

    #[test]
    fn round_trips_through_yaml_in_camel_case() {
        let config = Config::from_yaml(MINIMAL).unwrap();
        let text = serde_yaml::to_string(&config).unwrap();
        assert!(text.contains("maxContextTokens"), "{text}");
        assert_eq!(Config::from_yaml(&text).unwrap(), config);
    }

    #[test]
    fn errors_name_the_setting() {
        let bad_url = MINIMAL.replace("http://127.0.0.1:11434", "ftp://x");
        assert_eq!(
            Config::from_yaml(&bad_url).unwrap_err().setting,
            "backends[0].url"
        );
        let zero_recent =
            format!("{MINIMAL}\n").replace("history: {}", "history: {redis: {recentMessages: 0}}");
        assert_eq!(
            Config::from_yaml(&zero_recent).unwrap_err().setting,
            "history.redis.recentMessages"
        );
        let bad_fallback = format!("{MINIMAL}routing: {{fallback: {{backend: nope}}}}\n");
        let err = Config::from_yaml(&bad_fallback).unwrap_err();
        assert_eq!(err.setting, "routing.fallback.backend");
        assert!(err.reason.contains("nope"), "{err}");
        let only_fallback = format!("{MINIMAL}routing: {{fallback: {{backend: local}}}}\n");
        assert_eq!(
            Config::from_yaml(&only_fallback).unwrap_err().setting,
            "routing.fallback.backend"
        );
        let empty_fallback = format!("{MINIMAL}routing: {{fallback: {{}}}}\n");
        assert_eq!(
            Config::from_yaml(&empty_fallback).unwrap_err().setting,
            "routing.fallback"
        );
        let zero_limit = format!("{MINIMAL}routing: {{maxInFlightPerBackend: 0}}\n");
        assert_eq!(
            Config::from_yaml(&zero_limit).unwrap_err().setting,
            "routing.maxInFlightPerBackend"
        );
        let low_factor = format!("{MINIMAL}routing: {{affinityLoadFactorPercent: 90}}\n");
        assert_eq!(
            Config::from_yaml(&low_factor).unwrap_err().setting,
            "routing.affinityLoadFactorPercent"
        );
        let budget = format!("{MINIMAL}routing: {{retryBudgetPercent: 101}}\n");
        assert_eq!(
            Config::from_yaml(&budget).unwrap_err().setting,
            "routing.retryBudgetPercent"
        );
        let dns = MINIMAL.replace(
            "protocol: ollama",
            "protocol: ollama\n    discoverDns: http://ollama/",
        );
        assert_eq!(
            Config::from_yaml(&dns).unwrap_err().setting,
            "backends[0].discoverDns"
        );
        let unknown = MINIMAL.replace("history: {}", "history: {}\nbogus: 1");
        let err = Config::from_yaml(&unknown).unwrap_err();
        assert!(err.reason.contains("bogus"), "{err}");
    }
}

#[cfg(test)]
mod example_file {
    #[test]
    fn the_shipped_example_is_valid() {
        let text = include_str!("../config/example.yaml");
        let config = super::Config::from_yaml(text).unwrap();
        assert_eq!(config.backends.len(), 2);
    }
}
