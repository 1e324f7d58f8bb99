//! The value of every setting the file may leave out. Serde uses these functions, and each
//! section's `Default` is its serde defaults, so that `routing: {}`, a missing `routing` and
//! `RoutingConfig::default()` are the same.

use crate::{
    AuthConfig, CacheConfig, ContextConfig, LimitsConfig, MongoHistoryConfig, RateLimitConfig,
    RedisHistoryConfig, RoutingConfig, Strategy, SummarisationConfig,
};

pub(crate) fn listen() -> String {
    "0.0.0.0:8080".into()
}
pub(crate) fn shutdown_grace_seconds() -> u64 {
    30
}
pub(crate) fn weight() -> u32 {
    1
}
pub(crate) fn redis_url_env() -> String {
    crate::ENV_REDIS_URL.into()
}
pub(crate) fn key_prefix() -> String {
    "chat".into()
}
pub(crate) fn recent_messages() -> u32 {
    20
}
pub(crate) fn redis_timeout_ms() -> u64 {
    500
}
pub(crate) fn ttl_seconds() -> u64 {
    3600
}
pub(crate) fn mongodb_uri_env() -> String {
    crate::ENV_MONGODB_URI.into()
}
pub(crate) fn database() -> String {
    "chat".into()
}
pub(crate) fn collection() -> String {
    "messages".into()
}
pub(crate) fn sweep_interval_seconds() -> u64 {
    300
}
pub(crate) fn mongodb_timeout_ms() -> u64 {
    3_000
}
pub(crate) fn max_context_tokens() -> u32 {
    4096
}
pub(crate) fn max_output_tokens() -> u32 {
    512
}
pub(crate) fn summary_every_turns() -> u32 {
    5
}
pub(crate) fn max_summary_tokens() -> u32 {
    256
}
pub(crate) fn summary_timeout_ms() -> u64 {
    60_000
}
pub(crate) fn summary_prompt() -> String {
    "Summarise the conversation below for whoever continues it: keep names, facts, numbers, \
     decisions and open questions; leave out pleasantries. Answer with the summary only."
        .into()
}
pub(crate) fn strategy() -> Strategy {
    Strategy::RoundRobin
}
pub(crate) fn connect_timeout_ms() -> u64 {
    2_000
}
pub(crate) fn first_token_timeout_ms() -> u64 {
    30_000
}
pub(crate) fn total_timeout_ms() -> u64 {
    300_000
}
pub(crate) fn max_attempts() -> u32 {
    2
}
pub(crate) fn health_check_interval_seconds() -> u64 {
    10
}
pub(crate) fn breaker_failures() -> u32 {
    5
}
pub(crate) fn breaker_cooldown_seconds() -> u64 {
    30
}
pub(crate) fn unhealthy_threshold() -> u32 {
    2
}
pub(crate) fn healthy_threshold() -> u32 {
    1
}
pub(crate) fn max_in_flight_per_backend() -> u32 {
    8
}
pub(crate) fn queue_depth() -> u32 {
    64
}
pub(crate) fn queue_timeout_ms() -> u64 {
    30_000
}
pub(crate) fn retry_budget_percent() -> u32 {
    20
}
pub(crate) fn retry_budget_min_per_second() -> u32 {
    3
}
pub(crate) fn affinity_load_factor_percent() -> u32 {
    125
}
pub(crate) fn discovery_interval_seconds() -> u64 {
    15
}
pub(crate) fn cache_ttl_seconds() -> u64 {
    600
}
pub(crate) fn requests_per_window() -> u32 {
    60
}
pub(crate) fn window_seconds() -> u64 {
    60
}
pub(crate) fn user_header() -> String {
    "x-forwarded-user".into()
}
pub(crate) fn max_message_bytes() -> usize {
    32 * 1024
}
pub(crate) fn max_concurrent_requests() -> usize {
    512
}
pub(crate) fn max_connections() -> usize {
    4096
}
pub(crate) fn header_read_timeout_ms() -> u64 {
    10_000
}
pub(crate) fn body_read_timeout_ms() -> u64 {
    30_000
}
pub(crate) fn idle_timeout_ms() -> u64 {
    75_000
}
pub(crate) fn max_sockets_per_caller() -> usize {
    16
}
pub(crate) fn websocket_idle_timeout_ms() -> u64 {
    300_000
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
    LimitsConfig,
    AuthConfig,
    SummarisationConfig
);
