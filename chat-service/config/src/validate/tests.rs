use super::*;
use crate::{BackendConfig, FallbackConfig, ModelsConfig};

/// A valid config with two back ends, so that back-end and fallback rules can be broken one at
/// a time.
fn valid() -> Config {
    let config = Config::new(
        vec![
            BackendConfig::ollama("local", "http://127.0.0.1:11434"),
            BackendConfig::openai("hosted", "https://llm.example.com"),
        ],
        ModelsConfig::new("gemma3-270m"),
    );
    config.validate().unwrap();
    config
}

/// The settings `config` is refused for.
fn refused(config: &Config) -> Vec<String> {
    match config.validate() {
        Ok(()) => Vec::new(),
        Err(errors) => errors.iter().map(|e| e.setting.clone()).collect(),
    }
}

/// One way to break each rule, and the one setting it must be reported against.
type Breakage = (&'static str, fn(&mut Config));

fn tokenizer(model: &str, file: &str) -> crate::TokenizerConfig {
    crate::TokenizerConfig {
        model: model.into(),
        file: file.into(),
    }
}

/// Turns summarisation on and hands it over to be broken.
fn summarising(config: &mut Config) -> &mut crate::SummarisationConfig {
    config.context.summarisation.enabled = true;
    &mut config.context.summarisation
}

const EVERY_RULE: &[Breakage] = &[
    ("listen", |c| c.listen = "localhost:8080".into()),
    ("context.tokenizers[0].model", |c| {
        c.context.tokenizers = vec![tokenizer("", "/t.json")]
    }),
    ("context.tokenizers[0].file", |c| {
        c.context.tokenizers = vec![tokenizer("gemma3-270m", "")]
    }),
    ("context.tokenizers[0].model", |c| {
        c.context.tokenizers = vec![tokenizer("unserved", "/t.json")]
    }),
    ("context.tokenizers[1].model", |c| {
        c.context.tokenizers = vec![
            tokenizer("gemma3-270m", "/a.json"),
            tokenizer("gemma3-270m", "/b.json"),
        ]
    }),
    ("context.summarisation.model", |c| {
        summarising(c).model = Some("unserved".into())
    }),
    ("context.summarisation.everyTurns", |c| {
        summarising(c).every_turns = 0
    }),
    ("context.summarisation.maxSummaryTokens", |c| {
        summarising(c).max_summary_tokens = 0
    }),
    ("context.summarisation.maxSummaryTokens", |c| {
        c.context.max_context_tokens = 1000;
        summarising(c).max_summary_tokens = 501
    }),
    ("context.summarisation.timeoutMs", |c| {
        summarising(c).timeout_ms = 0
    }),
    ("context.summarisation.prompt", |c| {
        summarising(c).prompt = " ".into()
    }),
    ("backends", |c| c.backends.clear()),
    ("backends[1].name", |c| c.backends[1].name.clear()),
    ("backends[1].name", |c| c.backends[1].name = "local".into()),
    ("backends[1].url", |c| {
        c.backends[1].url = "llm.example.com".into()
    }),
    ("backends[0].weight", |c| c.backends[0].weight = 0),
    ("backends[0].discoverDns", |c| {
        c.backends[0].discover_dns = Some("http://ollama/".into())
    }),
    ("backends[0].discoverDns", |c| {
        c.backends[0].discover_dns = Some(String::new())
    }),
    ("backends[1].apiKeyEnv", |c| {
        c.backends[1].api_key_env = Some(String::new())
    }),
    ("models.default", |c| c.models.default.clear()),
    ("models.allowed", |c| {
        c.models.allowed = vec!["a".into(), String::new()]
    }),
    ("history.redis.urlEnv", |c| c.history.redis.url_env.clear()),
    ("history.redis.recentMessages", |c| {
        c.history.redis.recent_messages = 0
    }),
    ("history.redis.ttlSeconds", |c| {
        c.history.redis.ttl_seconds = 0
    }),
    ("history.redis.keyPrefix", |c| {
        c.history.redis.key_prefix = "team a".into()
    }),
    ("history.redis.keyPrefix", |c| {
        c.history.redis.key_prefix.clear()
    }),
    ("history.mongodb.uriEnv", |c| {
        c.history.mongodb.uri_env.clear()
    }),
    ("history.mongodb.database", |c| {
        c.history.mongodb.database = "chat.db".into()
    }),
    ("history.mongodb.collection", |c| {
        c.history.mongodb.collection = "$messages".into()
    }),
    ("history.mongodb.timeoutMs", |c| {
        c.history.mongodb.timeout_ms = 0
    }),
    ("context.maxContextTokens", |c| {
        c.context.max_context_tokens = 15
    }),
    ("context.maxOutputTokens", |c| {
        c.context.max_output_tokens = 0
    }),
    ("routing.connectTimeoutMs", |c| {
        c.routing.connect_timeout_ms = 0
    }),
    ("routing.firstTokenTimeoutMs", |c| {
        c.routing.first_token_timeout_ms = 0
    }),
    ("routing.totalTimeoutMs", |c| c.routing.total_timeout_ms = 0),
    ("routing.firstTokenTimeoutMs", |c| {
        c.routing.first_token_timeout_ms = c.routing.total_timeout_ms + 1
    }),
    ("routing.maxAttempts", |c| c.routing.max_attempts = 0),
    ("routing.healthCheckIntervalSeconds", |c| {
        c.routing.health_check_interval_seconds = 0
    }),
    ("routing.unhealthyThreshold", |c| {
        c.routing.unhealthy_threshold = 0
    }),
    ("routing.healthyThreshold", |c| {
        c.routing.healthy_threshold = 0
    }),
    ("routing.breakerFailures", |c| {
        c.routing.breaker_failures = 0
    }),
    ("routing.breakerCooldownSeconds", |c| {
        c.routing.breaker_cooldown_seconds = 0
    }),
    ("routing.maxInFlightPerBackend", |c| {
        c.routing.max_in_flight_per_backend = 0
    }),
    ("routing.queueTimeoutMs", |c| c.routing.queue_timeout_ms = 0),
    ("routing.discoveryIntervalSeconds", |c| {
        c.routing.discovery_interval_seconds = 0
    }),
    ("routing.retryBudgetPercent", |c| {
        c.routing.retry_budget_percent = 101
    }),
    ("routing.affinityLoadFactorPercent", |c| {
        c.routing.affinity_load_factor_percent = 99
    }),
    ("routing.fallback", |c| {
        c.routing.fallback = Some(FallbackConfig {
            backend: None,
            model: None,
        })
    }),
    ("routing.fallback.model", |c| {
        c.routing.fallback = Some(FallbackConfig {
            backend: None,
            model: Some(String::new()),
        })
    }),
    ("routing.fallback.backend", |c| {
        c.routing.fallback = Some(FallbackConfig {
            backend: Some("nope".into()),
            model: None,
        })
    }),
    ("routing.fallback.backend", |c| {
        c.backends.truncate(1);
        c.routing.fallback = Some(FallbackConfig {
            backend: Some("local".into()),
            model: None,
        })
    }),
    ("rateLimit.requestsPerWindow", |c| {
        c.rate_limit.enabled = true;
        c.rate_limit.requests_per_window = 0
    }),
    ("rateLimit.windowSeconds", |c| {
        c.rate_limit.enabled = true;
        c.rate_limit.window_seconds = 0
    }),
    ("auth.apiKeysFile", |c| {
        c.auth.enabled = true;
        c.auth.api_keys_file = Some(String::new())
    }),
    ("limits.maxMessageBytes", |c| c.limits.max_message_bytes = 0),
    ("limits.maxConcurrentRequests", |c| {
        c.limits.max_concurrent_requests = 0
    }),
    ("limits.maxConnections", |c| c.limits.max_connections = 0),
    ("limits.headerReadTimeoutMs", |c| {
        c.limits.header_read_timeout_ms = 0
    }),
    ("limits.bodyReadTimeoutMs", |c| {
        c.limits.body_read_timeout_ms = 0
    }),
    ("limits.idleTimeoutMs", |c| c.limits.idle_timeout_ms = 0),
    ("limits.maxSocketsPerCaller", |c| {
        c.limits.max_sockets_per_caller = 0
    }),
    ("limits.websocketIdleTimeoutMs", |c| {
        c.limits.websocket_idle_timeout_ms = 0
    }),
];

#[test]
fn every_rule_refuses_its_setting() {
    for (i, (setting, breakage)) in EVERY_RULE.iter().enumerate() {
        let mut config = valid();
        breakage(&mut config);
        assert_eq!(refused(&config), [*setting], "breakage #{i}");
    }
}

#[test]
fn every_problem_is_reported_with_its_path() {
    let mut config = valid();
    config.backends[1].url = "llm.example.com".into();
    config.routing.max_attempts = 0;
    config.limits.max_message_bytes = 0;
    let errors = config.validate().unwrap_err();
    assert_eq!(
        errors.settings(),
        [
            "backends[1].url",
            "routing.maxAttempts",
            "limits.maxMessageBytes"
        ]
    );
    let lines: Vec<_> = errors.to_string().lines().map(str::to_owned).collect();
    assert_eq!(
        lines,
        [
            "invalid setting `backends[1].url`: must start with http:// or https://",
            "invalid setting `routing.maxAttempts`: must be at least 1",
            "invalid setting `limits.maxMessageBytes`: must be at least 1",
        ]
    );
}

#[test]
fn reasons_say_what_is_wrong() {
    let mut config = valid();
    config.backends[1].name = "local".into();
    config.routing.fallback = Some(FallbackConfig {
        backend: Some("nope".into()),
        model: None,
    });
    let errors = config.validate().unwrap_err();
    assert_eq!(
        errors.get("backends[1].name").unwrap().reason,
        "duplicate name `local`"
    );
    assert!(
        errors
            .get("routing.fallback.backend")
            .unwrap()
            .reason
            .contains("`nope`")
    );
}

#[test]
fn limits_of_a_disabled_feature_are_not_checked() {
    let mut config = valid();
    config.rate_limit.requests_per_window = 0;
    config.rate_limit.window_seconds = 0;
    config.auth.api_keys_file = Some(String::new());
    config.context.summarisation.every_turns = 0;
    config.context.summarisation.model = Some("unserved".into());
    assert_eq!(refused(&config), Vec::<String>::new());
}

#[test]
fn boundary_values_are_accepted() {
    let mut config = valid();
    config.context.max_context_tokens = 16;
    config.context.summarisation.enabled = true;
    config.context.summarisation.max_summary_tokens = 8;
    config.context.summarisation.model = Some("gemma3-270m".into());
    config.routing.first_token_timeout_ms = config.routing.total_timeout_ms;
    config.routing.retry_budget_percent = 100;
    config.routing.affinity_load_factor_percent = 100;
    config.routing.queue_depth = 0;
    config.backends[0].discover_dns = Some("ollama-headless:11434".into());
    config.routing.fallback = Some(FallbackConfig {
        backend: Some("hosted".into()),
        model: Some("small".into()),
    });
    config.validate().unwrap();
}
