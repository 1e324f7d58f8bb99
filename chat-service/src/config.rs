//! The chat service's configuration: a YAML file (rendered by the operator into a ConfigMap),
//! with secrets supplied through environment variables named in the file.

use serde::{Deserialize, Serialize};

/// Environment variable that carries the MongoDB connection URI (from the connection Secret).
pub const ENV_MONGODB_URI: &str = "MONGODB_URI";
/// Environment variable that carries the Redis URL (with its password, from a Secret).
pub const ENV_REDIS_URL: &str = "REDIS_URL";

/// Top-level configuration of one chat-service process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP server listens on.
    #[serde(default = "defaults::listen")]
    pub listen: String,
    /// LLM back ends, tried in order (traffic policy is in `routing`).
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
    /// When set, the DNS name of a headless Service whose pods are balanced individually.
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoutingConfig {
    #[serde(default = "defaults::strategy")]
    pub strategy: Strategy,
    #[serde(default = "defaults::connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default = "defaults::first_token_timeout_ms")]
    pub first_token_timeout_ms: u64,
    #[serde(default = "defaults::total_timeout_ms")]
    pub total_timeout_ms: u64,
    /// Attempts per turn across back ends, counting the first.
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    #[serde(default = "defaults::health_check_interval_seconds")]
    pub health_check_interval_seconds: u64,
    /// Consecutive failures that open a back end's circuit breaker.
    #[serde(default = "defaults::breaker_failures")]
    pub breaker_failures: u32,
    #[serde(default = "defaults::breaker_cooldown_seconds")]
    pub breaker_cooldown_seconds: u64,
}

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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(default)]
    pub enabled: bool,
    /// File with one API key per line (a mounted Secret); reloaded when it changes.
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
