//! What each request gets or is held to: the model context, the response cache, rate limits,
//! API-key authentication and size and concurrency limits.

use serde::{Deserialize, Serialize};

use crate::{SummarisationConfig, defaults};

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
    /// Models whose prompts are counted with their own tokenizer (a Hugging Face
    /// `tokenizer.json`, loaded at start). Every other model is counted with the estimate of
    /// about 4 bytes per token. `GET /v1/models` says which each model gets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tokenizers: Vec<TokenizerConfig>,
    /// Summaries of the dropped part of long sessions, sent in its place; off by default.
    #[serde(default, skip_serializing_if = "SummarisationConfig::is_default")]
    pub summarisation: SummarisationConfig,
}

impl SummarisationConfig {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// The tokenizer of one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenizerConfig {
    /// The model's name as requests give it (`models.default` or one of `models.allowed`).
    pub model: String,
    /// Path of its `tokenizer.json`.
    pub file: String,
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
    /// One cache for every caller. Off (the default), answers are cached per principal, so
    /// that one caller never receives, or times, an answer another caller's context produced.
    #[serde(default)]
    pub shared: bool,
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(default)]
    pub enabled: bool,
    /// File with one API key per line (a mounted Secret); reloaded when it changes.
    /// Keys may also come from the environment variable [`ENV_API_KEYS`](crate::ENV_API_KEYS);
    /// both sources count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_keys_file: Option<String>,
    /// Peer IP addresses of proxies allowed to name the end user in [`Self::user_header`]; a
    /// request from one of them that carries the header belongs to that user instead of to its
    /// API key. Empty (the default): the header is ignored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Header the trusted proxies set to the authenticated end user.
    #[serde(default = "defaults::user_header")]
    pub user_header: String,
    /// The key id that owns the sessions stored before sessions had owners (their storage key
    /// is the bare session id). Unset: with auth on, nobody reaches them; with auth off,
    /// every caller does, as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub legacy_sessions_owner: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest accepted user message in bytes (413 beyond).
    #[serde(default = "defaults::max_message_bytes")]
    pub max_message_bytes: usize,
    /// Requests handled at once before load shedding with 503. A request takes its place only
    /// once its body is read, so a slow upload never holds one.
    #[serde(default = "defaults::max_concurrent_requests")]
    pub max_concurrent_requests: usize,
    /// Open client connections (WebSockets included); beyond, new connections wait in the
    /// kernel's accept queue until one closes.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// A request's headers must be complete this long after its first byte arrives, else the
    /// connection is closed.
    #[serde(default = "defaults::header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// A request's body must be complete this long after its headers, else 408 and the
    /// connection is closed.
    #[serde(default = "defaults::body_read_timeout_ms")]
    pub body_read_timeout_ms: u64,
    /// A keep-alive connection with no request for this long is closed.
    #[serde(default = "defaults::idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Open WebSockets per caller (API key, else client address); one more is closed with
    /// 1013. Each open socket also holds one of `maxConcurrentRequests`.
    #[serde(default = "defaults::max_sockets_per_caller")]
    pub max_sockets_per_caller: usize,
    /// A WebSocket on which the client sends no message for this long is closed (1000).
    #[serde(default = "defaults::websocket_idle_timeout_ms")]
    pub websocket_idle_timeout_ms: u64,
}
