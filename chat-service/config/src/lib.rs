//! `chat-config`: the configuration of one chat-service process — a YAML file, with secrets
//! supplied through environment variables that the file names.
//!
//! Two crates use the one type, so they cannot drift: the chat service (`chat-service`) parses
//! and validates the file at start-up ([`Config::load`]) and reads the secrets it names
//! ([`Secrets::from_env`]); the operator (`chat-operator`) builds a [`Config`] from a
//! ChatService resource, checks it with [`Config::validate`] and renders it into the ConfigMap
//! the service mounts, so it never writes a file the service would refuse.
//!
//! A [`Config`] from [`Config::load`], [`Config::load_with`] or [`Config::from_yaml`] has been
//! validated, once; one built in code ([`Config::new`], [`BackendConfig::ollama`], ...) is
//! checked by calling [`Config::validate`]. Both report every problem at once as
//! [`ConfigErrors`], each named by its path in the file (`backends[1].url`).

mod access_log;
mod backends;
mod defaults;
mod error;
mod history;
mod load;
mod requests;
mod rollout;
mod routing;
mod secrets;
mod service;
mod store_tls;
mod summarisation;
mod validate;

pub use access_log::AccessLogConfig;
pub use backends::{BackendConfig, ModelsConfig, Protocol};
pub use error::{ConfigError, ConfigErrors};
pub use history::{
    HistoryConfig, MongoHistoryConfig, RedisHistoryConfig, RetentionConfig, StoreTlsConfig,
};
pub use requests::{
    AuthConfig, CacheConfig, ContextConfig, LimitsConfig, RateLimitConfig, RateLimitKey,
    TokenizerConfig,
};
pub use rollout::RolloutConfig;
pub use routing::{FallbackConfig, RoutingConfig, Strategy};
pub use secrets::Secrets;
pub use service::Config;
pub use summarisation::SummarisationConfig;

/// Environment variable that carries the MongoDB connection URI (from the connection Secret).
pub const ENV_MONGODB_URI: &str = "MONGODB_URI";
/// Environment variable that carries the Redis URL (with its password, from a Secret).
pub const ENV_REDIS_URL: &str = "REDIS_URL";
/// Environment variable with accepted API keys (one per line or comma-separated), read when
/// `auth` is enabled, in addition to `auth.apiKeysFile`.
pub const ENV_API_KEYS: &str = "CHAT_API_KEYS";
