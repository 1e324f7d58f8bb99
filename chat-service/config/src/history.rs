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
    /// How long sessions and how many of their messages are kept; unset keeps everything.
    #[serde(default, skip_serializing_if = "RetentionConfig::keeps_everything")]
    pub retention: RetentionConfig,
}

/// Retention of the stored history, enforced by a sweeper in every replica (it works on every
/// MongoDB-compatible server, FerretDB on SQLite included, which has no TTL indexes) and, for
/// message counts, after each stored turn. Where the server has TTL indexes, a maximum age is
/// also written into every document as `expire_at`, for the server to delete what no replica
/// swept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetentionConfig {
    /// A session whose last turn is older than this many seconds is erased from MongoDB and
    /// Redis; the response cache keeps no answer longer than this either.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_seconds: Option<u64>,
    /// Only the newest this many messages of a session are kept (an even number keeps whole
    /// turns); older ones are deleted after each turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_messages_per_session: Option<u32>,
    /// Seconds between two sweeps for expired sessions.
    #[serde(default = "defaults::sweep_interval_seconds")]
    pub sweep_interval_seconds: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            max_age_seconds: None,
            max_messages_per_session: None,
            sweep_interval_seconds: defaults::sweep_interval_seconds(),
        }
    }
}

impl RetentionConfig {
    pub fn keeps_everything(&self) -> bool {
        self.max_age_seconds.is_none() && self.max_messages_per_session.is_none()
    }
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
    /// Milliseconds a Redis command may take before it counts as failed (the turn then goes on
    /// with MongoDB alone); also the connect timeout.
    #[serde(default = "defaults::redis_timeout_ms")]
    pub timeout_ms: u64,
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
