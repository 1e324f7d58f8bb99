//! What serde cannot check: ranges, cross-field rules and URL shapes. Every rule runs, so that
//! one pass reports every problem with its path.

use crate::{BackendConfig, Config, ConfigError, ConfigErrors, HistoryConfig, RoutingConfig};

/// Problems found so far, in the order of the file.
#[derive(Default)]
struct Problems(Vec<ConfigError>);

impl Problems {
    fn report(&mut self, setting: impl Into<String>, reason: impl Into<String>) {
        self.0.push(ConfigError::new(setting, reason));
    }

    /// Reports `reason` against `setting` unless `holds`.
    fn require(&mut self, holds: bool, setting: impl Into<String>, reason: impl Into<String>) {
        if !holds {
            self.report(setting, reason);
        }
    }

    fn at_least_one(&mut self, value: u64, setting: &str) {
        self.require(value >= 1, setting, "must be at least 1");
    }
}

impl Config {
    /// Checks what serde cannot: ranges, cross-field rules and URL shapes. Reports every
    /// problem, not just the first. [`Config::load`] and [`Config::from_yaml`] call it; call it
    /// yourself only for a config built in code.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut problems = Problems::default();
        problems.require(
            self.listen.parse::<std::net::SocketAddr>().is_ok(),
            "listen",
            format!("`{}` is not host:port with an IP address", self.listen),
        );
        check_backends(&self.backends, &mut problems);
        problems.require(
            !self.models.default.is_empty(),
            "models.default",
            "must not be empty",
        );
        problems.require(
            !self.models.allowed.iter().any(String::is_empty),
            "models.allowed",
            "must not contain an empty name",
        );
        check_history(&self.history, &mut problems);
        check_rollout(self, &mut problems);
        problems.require(
            self.context.max_context_tokens >= 16,
            "context.maxContextTokens",
            "must be at least 16",
        );
        problems.at_least_one(
            u64::from(self.context.max_output_tokens),
            "context.maxOutputTokens",
        );
        let mut tokenized = std::collections::BTreeSet::new();
        for (i, tokenizer) in self.context.tokenizers.iter().enumerate() {
            problems.require(
                !tokenizer.model.is_empty(),
                format!("context.tokenizers[{i}].model"),
                "must not be empty",
            );
            problems.require(
                !tokenizer.file.is_empty(),
                format!("context.tokenizers[{i}].file"),
                "must not be empty",
            );
            let candidate = self
                .rollout
                .as_ref()
                .and_then(|r| r.candidate_model.as_deref());
            problems.require(
                tokenizer.model.is_empty()
                    || tokenizer.model == self.models.default
                    || self.models.allowed.contains(&tokenizer.model)
                    || candidate == Some(tokenizer.model.as_str()),
                format!("context.tokenizers[{i}].model"),
                format!(
                    "{:?} is neither models.default, one of models.allowed nor the rollout's \
                     candidate model, so no request would use its tokenizer",
                    tokenizer.model
                ),
            );
            problems.require(
                tokenized.insert(tokenizer.model.as_str()),
                format!("context.tokenizers[{i}].model"),
                format!("names {:?} a second time", tokenizer.model),
            );
        }
        check_summarisation(self, &mut problems);
        check_routing(&self.routing, &self.backends, &mut problems);
        problems.at_least_one(
            u64::from(self.access_log.sample_every),
            "accessLog.sampleEvery",
        );
        let rate_limit = &self.rate_limit;
        if rate_limit.enabled {
            problems.at_least_one(
                u64::from(rate_limit.requests_per_window),
                "rateLimit.requestsPerWindow",
            );
            problems.at_least_one(rate_limit.window_seconds, "rateLimit.windowSeconds");
        }
        problems.require(
            !(self.auth.enabled && self.auth.api_keys_file.as_deref() == Some("")),
            "auth.apiKeysFile",
            "must not be empty when set",
        );
        problems.require(
            !self.auth.user_header.is_empty()
                && self
                    .auth
                    .user_header
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "auth.userHeader",
            "must be a header name (letters, digits and `-`)",
        );
        for (setting, value) in [
            ("limits.maxMessageBytes", self.limits.max_message_bytes),
            (
                "limits.maxConcurrentRequests",
                self.limits.max_concurrent_requests,
            ),
            ("limits.maxConnections", self.limits.max_connections),
            (
                "limits.maxSocketsPerCaller",
                self.limits.max_sockets_per_caller,
            ),
        ] {
            problems.require(value >= 1, setting, "must be at least 1");
        }
        for (setting, value) in [
            (
                "limits.headerReadTimeoutMs",
                self.limits.header_read_timeout_ms,
            ),
            ("limits.bodyReadTimeoutMs", self.limits.body_read_timeout_ms),
            ("limits.idleTimeoutMs", self.limits.idle_timeout_ms),
            (
                "limits.websocketIdleTimeoutMs",
                self.limits.websocket_idle_timeout_ms,
            ),
        ] {
            problems.require(value >= 1, setting, "must be at least 1");
        }
        problems.0.extend(crate::store_tls::shape_problems(self));
        ConfigErrors::from_vec(problems.0).map_or(Ok(()), Err)
    }
}

/// Only when enabled: a disabled feature's limits are not checked.
fn check_summarisation(config: &Config, problems: &mut Problems) {
    let summarisation = &config.context.summarisation;
    if !summarisation.enabled {
        return;
    }
    if let Some(model) = &summarisation.model {
        let served = *model == config.models.default || config.models.allowed.contains(model);
        problems.require(
            served,
            "context.summarisation.model",
            format!("{model:?} is neither models.default nor one of models.allowed"),
        );
    }
    problems.at_least_one(
        u64::from(summarisation.every_turns),
        "context.summarisation.everyTurns",
    );
    let half_budget = config.context.max_context_tokens / 2;
    problems.require(
        summarisation.max_summary_tokens >= 1 && summarisation.max_summary_tokens <= half_budget,
        "context.summarisation.maxSummaryTokens",
        format!(
            "must be between 1 and half of context.maxContextTokens ({half_budget}), so that \
             recent turns fit next to the summary"
        ),
    );
    problems.at_least_one(summarisation.timeout_ms, "context.summarisation.timeoutMs");
    problems.require(
        !summarisation.prompt.trim().is_empty(),
        "context.summarisation.prompt",
        "must not be empty",
    );
}

fn check_backends(backends: &[BackendConfig], problems: &mut Problems) {
    problems.require(
        !backends.is_empty(),
        "backends",
        "at least one back end is required",
    );
    let mut names = std::collections::BTreeSet::new();
    for (i, backend) in backends.iter().enumerate() {
        let setting = |field: &str| format!("backends[{i}].{field}");
        if backend.name.is_empty() {
            problems.report(setting("name"), "must not be empty");
        } else if !names.insert(backend.name.as_str()) {
            problems.report(
                setting("name"),
                format!("duplicate name `{}`", backend.name),
            );
        }
        problems.require(
            backend.url.starts_with("http://") || backend.url.starts_with("https://"),
            setting("url"),
            "must start with http:// or https://",
        );
        problems.require(backend.weight >= 1, setting("weight"), "must be at least 1");
        if let Some(host) = &backend.discover_dns {
            problems.require(
                !(host.is_empty()
                    || host.contains("://")
                    || host.contains('/')
                    || host.contains(char::is_whitespace)),
                setting("discoverDns"),
                "must be a DNS name, optionally with `:port`, without scheme or path",
            );
        }
        problems.require(
            backend.api_key_env.as_deref() != Some(""),
            setting("apiKeyEnv"),
            "must not be empty when set",
        );
    }
}

fn check_history(history: &HistoryConfig, problems: &mut Problems) {
    let retention = &history.retention;
    if let Some(age) = retention.max_age_seconds {
        problems.at_least_one(age, "history.retention.maxAgeSeconds");
    }
    if let Some(count) = retention.max_messages_per_session {
        problems.require(
            count >= 2,
            "history.retention.maxMessagesPerSession",
            "must be at least 2 (one turn)",
        );
    }
    problems.require(
        (1..=86_400).contains(&retention.sweep_interval_seconds),
        "history.retention.sweepIntervalSeconds",
        "must be between 1 and 86400",
    );
    let redis = &history.redis;
    problems.require(
        !redis.url_env.is_empty(),
        "history.redis.urlEnv",
        "must not be empty",
    );
    problems.at_least_one(
        u64::from(redis.recent_messages),
        "history.redis.recentMessages",
    );
    problems.at_least_one(redis.ttl_seconds, "history.redis.ttlSeconds");
    problems.require(
        !(redis.key_prefix.is_empty() || redis.key_prefix.contains(char::is_whitespace)),
        "history.redis.keyPrefix",
        "must be non-empty without spaces",
    );
    let mongo = &history.mongodb;
    problems.require(
        !mongo.uri_env.is_empty(),
        "history.mongodb.uriEnv",
        "must not be empty",
    );
    for (setting, name) in [
        ("history.mongodb.database", &mongo.database),
        ("history.mongodb.collection", &mongo.collection),
    ] {
        problems.require(
            !(name.is_empty() || name.contains(['$', '.', '\0', ' '])),
            setting,
            "must be a non-empty name without `$`, `.`, spaces or NUL",
        );
    }
    problems.at_least_one(mongo.timeout_ms, "history.mongodb.timeoutMs");
    problems.at_least_one(history.redis.timeout_ms, "history.redis.timeoutMs");
}

fn check_routing(routing: &RoutingConfig, backends: &[BackendConfig], problems: &mut Problems) {
    for (setting, value) in [
        ("routing.connectTimeoutMs", routing.connect_timeout_ms),
        (
            "routing.firstTokenTimeoutMs",
            routing.first_token_timeout_ms,
        ),
        ("routing.totalTimeoutMs", routing.total_timeout_ms),
    ] {
        problems.at_least_one(value, setting);
    }
    // A zero total timeout is reported above; comparing against it would say nothing new.
    problems.require(
        routing.total_timeout_ms == 0 || routing.first_token_timeout_ms <= routing.total_timeout_ms,
        "routing.firstTokenTimeoutMs",
        "must not exceed routing.totalTimeoutMs",
    );
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
        problems.at_least_one(value, setting);
    }
    problems.require(
        routing.retry_budget_percent <= 100,
        "routing.retryBudgetPercent",
        "must be between 0 and 100",
    );
    problems.require(
        routing.affinity_load_factor_percent >= 100,
        "routing.affinityLoadFactorPercent",
        "must be at least 100 (an endpoint may always take its average share)",
    );
    let Some(fallback) = &routing.fallback else {
        return;
    };
    problems.require(
        fallback.backend.is_some() || fallback.model.is_some(),
        "routing.fallback",
        "must name a `backend`, a `model` or both",
    );
    problems.require(
        fallback.model.as_deref() != Some(""),
        "routing.fallback.model",
        "must not be empty when set",
    );
    if let Some(name) = &fallback.backend {
        if !backends.iter().any(|b| &b.name == name) {
            problems.report(
                "routing.fallback.backend",
                format!("`{name}` is not the name of a back end in `backends`"),
            );
        } else if backends.iter().all(|b| &b.name == name) {
            problems.report(
                "routing.fallback.backend",
                "the fallback back end takes no regular traffic, so another back end is required",
            );
        }
    }
}

fn check_rollout(config: &Config, problems: &mut Problems) {
    let Some(rollout) = &config.rollout else {
        return;
    };
    problems.require(
        rollout.candidate_weight_percent <= 100,
        "rollout.candidateWeightPercent",
        "must be between 0 and 100",
    );
    problems.require(
        rollout.candidate_backend.is_some() || rollout.candidate_model.is_some(),
        "rollout",
        "must name a `candidateBackend`, a `candidateModel` or both",
    );
    problems.require(
        rollout.candidate_model.as_deref() != Some(""),
        "rollout.candidateModel",
        "must not be empty when set",
    );
    if let Some(name) = &rollout.candidate_backend {
        if !config.backends.iter().any(|b| &b.name == name) {
            problems.report(
                "rollout.candidateBackend",
                format!("`{name}` is not the name of a back end in `backends`"),
            );
        } else if config.backends.iter().all(|b| &b.name == name) {
            problems.report(
                "rollout.candidateBackend",
                "the candidate serves only its share, so another back end is required",
            );
        }
    }
}

#[cfg(test)]
mod tests;
