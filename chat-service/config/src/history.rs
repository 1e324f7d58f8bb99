//! `history`: where conversation history lives — recent turns in Redis, all of it in MongoDB.

use serde::{Deserialize, Serialize};

use crate::defaults;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
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
    /// How to verify a `rediss://` server; without it the system's trust store is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<StoreTlsConfig>,
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
    /// Milliseconds to find a reachable server before an operation fails (then the API answers
    /// 503).
    #[serde(default = "defaults::mongodb_timeout_ms")]
    pub timeout_ms: u64,
    /// TLS to the server with verification against a CA file (the `tlsCAFile` URI option, kept
    /// here so the URI in the Secret stays the one the provider gives out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<StoreTlsConfig>,
    /// Whether the driver retries writes once. Amazon DocumentDB refuses retryable writes, so
    /// its flavor sets `false`; unset leaves the URI's choice (the driver's default is on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_writes: Option<bool>,
}

/// Server verification for a store reached over TLS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StoreTlsConfig {
    /// PEM file of the CA certificates that sign the store's server certificate (for Amazon
    /// DocumentDB, its CA bundle); absolute path, checked when the file is loaded.
    pub ca_file: String,
}
