//! The top-level settings of one chat-service process, one field per section of the file.

use serde::{Deserialize, Serialize};

use crate::defaults;

use crate::{
    AccessLogConfig, AuthConfig, CacheConfig, ContextConfig, LimitsConfig, RateLimitConfig,
    RolloutConfig, RoutingConfig,
};
use crate::{BackendConfig, HistoryConfig, ModelsConfig};

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
    /// One log line per request; off by default (and then left out of a rendered file).
    #[serde(default, skip_serializing_if = "AccessLogConfig::is_default")]
    pub access_log: AccessLogConfig,
    /// The split of a canary rollout's current step; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutConfig>,
}

impl Config {
    /// A config with these back ends and models and every other setting at its default, as a
    /// file with only `backends`, `models` and `history: {}` would give. Not validated: callers
    /// change what they need, then call [`Config::validate`].
    pub fn new(backends: Vec<BackendConfig>, models: ModelsConfig) -> Self {
        Self {
            listen: defaults::listen(),
            backends,
            models,
            history: HistoryConfig::default(),
            context: ContextConfig::default(),
            routing: RoutingConfig::default(),
            cache: CacheConfig::default(),
            rate_limit: RateLimitConfig::default(),
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            shutdown_grace_seconds: defaults::shutdown_grace_seconds(),
            access_log: AccessLogConfig::default(),
            rollout: None,
        }
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
