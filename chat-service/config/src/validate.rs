//! What serde cannot check: ranges, cross-field rules and URL shapes.

use crate::{Config, ConfigError};

impl Config {
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
}
