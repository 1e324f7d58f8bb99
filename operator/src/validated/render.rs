//! Render: the chat-service config, built with the service's own `Config` type so the operator
//! can never write a file the service would refuse. The only place that names the chat
//! service's config types; everything else reaches them through [`ChatConfig`].

pub use chat_config::Config as ChatConfig;
pub use chat_config::RolloutConfig;
use chat_config::{
    AuthConfig, BackendConfig, CacheConfig, ContextConfig, FallbackConfig, HistoryConfig,
    LimitsConfig, ModelsConfig, MongoHistoryConfig, Protocol, RateLimitConfig, RateLimitKey,
    RedisHistoryConfig, RoutingConfig, StoreTlsConfig, Strategy, TokenizerConfig,
};
/// Variables the chat service reads its store addresses from.
pub use chat_config::{ENV_MONGODB_URI, ENV_REDIS_URL};
use kube::ResourceExt;

use crate::crd::{BackendProtocol, ChatService, MongoFlavor, RateLimitKeyBy, RoutingStrategy};
use crate::layout::{
    AUTH_DIR, AUTH_FILE, CHAT_PORT, MANAGED_OLLAMA_BACKEND, MONGODB_CA_DIR, MONGODB_CA_FILE,
    OLLAMA_PORT, REDIS_CA_DIR, REDIS_CA_FILE, SHUTDOWN_GRACE_SECONDS, api_key_env, tokenizer_dir,
};
use crate::names::ChildNames;

/// The config the chat pods get for `cr`. Infallible: every spec the schema admits maps to a
/// config, and whether the service accepts it is [`ChatConfig::validate`]'s to say.
pub fn render_config(cr: &ChatService) -> ChatConfig {
    let spec = &cr.spec;
    let namespace = cr.namespace().unwrap_or_default();
    let names = ChildNames::of(cr);

    let mut backends = Vec::new();
    let mut allowed = spec
        .models
        .as_ref()
        .map(|m| m.allowed.clone())
        .unwrap_or_default();
    if let Some(managed) = &spec.ollama {
        let host = format!("{}.{namespace}.svc", names.ollama());
        backends.push(BackendConfig {
            name: MANAGED_OLLAMA_BACKEND.into(),
            url: format!("http://{host}:{OLLAMA_PORT}"),
            protocol: Protocol::Ollama,
            weight: 1,
            api_key_env: None,
            // The Service is headless, so its name resolves to every pod and each is balanced.
            discover_dns: Some(host),
            models: managed.models.clone(),
        });
        for model in &managed.models {
            if !allowed.contains(model) {
                allowed.push(model.clone());
            }
        }
    }
    for backend in &spec.backends {
        backends.push(BackendConfig {
            name: backend.name.clone(),
            url: backend.url.clone(),
            protocol: match backend.protocol {
                BackendProtocol::Ollama => Protocol::Ollama,
                BackendProtocol::Openai => Protocol::Openai,
            },
            weight: u32::try_from(backend.weight).unwrap_or(1),
            api_key_env: backend
                .api_key_secret
                .as_ref()
                .map(|_| api_key_env(&backend.name)),
            discover_dns: None,
            models: backend.models.clone(),
        });
    }
    let default_model = spec
        .models
        .as_ref()
        .and_then(|m| m.default.clone())
        .or_else(|| spec.ollama.as_ref().and_then(|o| o.models.first().cloned()))
        .unwrap_or_default();
    allowed.retain(|m| *m != default_model);

    let redis = &spec.history.redis;
    let mut redis_config = RedisHistoryConfig {
        key_prefix: redis
            .key_prefix
            .clone()
            .unwrap_or_else(|| format!("{namespace}:{}", cr.name_any())),
        ..Default::default()
    };
    if let Some(n) = redis.recent_messages {
        redis_config.recent_messages = non_negative(n);
    }
    if let Some(ttl) = redis.ttl_seconds {
        redis_config.ttl_seconds = non_negative(ttl);
    }
    // The CA files are where build/chat.rs mounts the Secrets; the service checks them at start.
    if redis
        .external
        .as_ref()
        .is_some_and(|e| e.ca_secret.is_some())
    {
        redis_config.tls = Some(StoreTlsConfig {
            ca_file: format!("{REDIS_CA_DIR}/{REDIS_CA_FILE}"),
        });
    }
    let mongo = &spec.history.mongodb;
    let mut mongo_config = MongoHistoryConfig::default();
    if let Some(database) = &mongo.database {
        mongo_config.database = database.clone();
    }
    if let Some(collection) = &mongo.collection {
        mongo_config.collection = collection.clone();
    }
    if let Some(external) = &mongo.external {
        if external.ca_secret.is_some() {
            mongo_config.tls = Some(StoreTlsConfig {
                ca_file: format!("{MONGODB_CA_DIR}/{MONGODB_CA_FILE}"),
            });
        }
        if external.flavor == MongoFlavor::Documentdb {
            mongo_config.retry_writes = Some(false);
        }
    }

    let mut context = ContextConfig::default();
    if let Some(c) = &spec.context {
        context.system_prompt = c.system_prompt.clone();
        if let Some(n) = c.max_context_tokens {
            context.max_context_tokens = non_negative(n);
        }
        if let Some(n) = c.max_output_tokens {
            context.max_output_tokens = non_negative(n);
        }
        context.tokenizers = c
            .tokenizers
            .iter()
            .enumerate()
            .map(|(i, t)| TokenizerConfig {
                model: t.model.clone(),
                file: format!("{}/{}", tokenizer_dir(i), t.config_map.key),
            })
            .collect();
        if let Some(spec) = &c.summarisation {
            let summarisation = &mut context.summarisation;
            summarisation.enabled = spec.enabled;
            summarisation.model = spec.model.clone();
            set(&mut summarisation.every_turns, spec.every_turns);
            set(
                &mut summarisation.max_summary_tokens,
                spec.max_summary_tokens,
            );
            set(&mut summarisation.timeout_ms, spec.timeout_ms);
            if let Some(prompt) = &spec.prompt {
                summarisation.prompt = prompt.clone();
            }
        }
    }

    let mut routing = RoutingConfig::default();
    if let Some(r) = &spec.routing {
        if let Some(strategy) = r.strategy {
            routing.strategy = match strategy {
                RoutingStrategy::RoundRobin => Strategy::RoundRobin,
                RoutingStrategy::LeastInFlight => Strategy::LeastInFlight,
                RoutingStrategy::SessionAffinity => Strategy::SessionAffinity,
            };
        }
        set(&mut routing.connect_timeout_ms, r.connect_timeout_ms);
        set(
            &mut routing.first_token_timeout_ms,
            r.first_token_timeout_ms,
        );
        set(&mut routing.total_timeout_ms, r.total_timeout_ms);
        set(&mut routing.max_attempts, r.max_attempts);
        set(
            &mut routing.health_check_interval_seconds,
            r.health_check_interval_seconds,
        );
        if let Some(b) = &r.circuit_breaker {
            set(&mut routing.breaker_failures, b.failure_threshold);
            set(&mut routing.breaker_cooldown_seconds, b.cooldown_seconds);
        }
        set(
            &mut routing.max_in_flight_per_backend,
            r.max_in_flight_per_backend,
        );
        set(&mut routing.queue_depth, r.queue_depth);
        set(&mut routing.queue_timeout_ms, r.queue_timeout_ms);
        set(&mut routing.retry_budget_percent, r.retry_budget_percent);
        routing.fallback = r.fallback.as_ref().map(|f| FallbackConfig {
            backend: f.backend.clone(),
            model: f.model.clone(),
        });
    }

    let routing_total_timeout_ms = routing.total_timeout_ms;

    let mut cache = CacheConfig::default();
    if let Some(c) = &spec.cache {
        cache.enabled = c.enabled;
        set(&mut cache.ttl_seconds, c.ttl_seconds);
    }
    let mut rate_limit = RateLimitConfig::default();
    if let Some(r) = &spec.rate_limit {
        rate_limit.enabled = true;
        set(&mut rate_limit.requests_per_window, r.requests_per_window);
        set(&mut rate_limit.tokens_per_window, r.tokens_per_window);
        set(&mut rate_limit.window_seconds, r.window_seconds);
        if let Some(key_by) = r.key_by {
            rate_limit.key_by = match key_by {
                RateLimitKeyBy::ApiKey => RateLimitKey::ApiKey,
                RateLimitKeyBy::User => RateLimitKey::User,
                RateLimitKeyBy::ClientIp => RateLimitKey::ClientIp,
            };
        }
    }
    let mut auth = AuthConfig::default();
    if spec.auth.is_some() {
        auth.enabled = true;
        auth.api_keys_file = Some(format!("{AUTH_DIR}/{AUTH_FILE}"));
    }

    ChatConfig {
        listen: format!("0.0.0.0:{CHAT_PORT}"),
        backends,
        models: ModelsConfig {
            default: default_model,
            allowed,
        },
        history: HistoryConfig {
            redis: redis_config,
            mongodb: mongo_config,
            retention: retention(spec.history.retention.as_ref()),
        },
        context,
        routing,
        cache,
        rate_limit,
        auth,
        limits: LimitsConfig::default(),
        shutdown_grace_seconds: SHUTDOWN_GRACE_SECONDS.max(routing_total_timeout_ms.div_ceil(1000)),
        // Not part of the ChatService API (yet): the service's default, no access log.
        access_log: Default::default(),
        // Decided by the rollout's step of the reconcile (crate::rollout::step), not the spec.
        rollout: None,
    }
}

fn retention(spec: Option<&crate::crd::RetentionSpec>) -> chat_config::RetentionConfig {
    let mut retention = chat_config::RetentionConfig::default();
    if let Some(spec) = spec {
        retention.max_age_seconds = spec.max_age_seconds.map(non_negative);
        retention.max_messages_per_session = spec.max_messages_per_session.map(non_negative);
        set(
            &mut retention.sweep_interval_seconds,
            spec.sweep_interval_seconds,
        );
    }
    retention
}

/// Schema minimums keep these positive; a negative could only come from a schema bypass.
fn non_negative<T: TryFrom<i64> + Default>(value: impl Into<i64>) -> T {
    T::try_from(value.into()).unwrap_or_default()
}

fn set<T: TryFrom<i64> + Default>(target: &mut T, value: Option<impl Into<i64>>) {
    if let Some(v) = value {
        *target = non_negative(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::*;

    #[test]
    fn minimal_spec_renders_a_config_the_service_accepts() {
        let cr = chat_service(MINIMAL);
        let config = render_config(&cr);
        config.validate().unwrap();
        assert_eq!(config.models.default, "gemma3:270m");
        assert_eq!(config.history.redis.key_prefix, "team-a:support");
    }

    #[test]
    fn retention_is_rendered_and_unset_keeps_everything() {
        let mut cr = chat_service(MINIMAL);
        assert!(render_config(&cr).history.retention.keeps_everything());
        cr.spec.history.retention = Some(crate::crd::RetentionSpec {
            max_age_seconds: Some(2_592_000),
            max_messages_per_session: Some(200),
            sweep_interval_seconds: None,
        });
        let config = render_config(&cr);
        config.validate().unwrap();
        let retention = &config.history.retention;
        assert_eq!(retention.max_age_seconds, Some(2_592_000));
        assert_eq!(retention.max_messages_per_session, Some(200));
        assert_eq!(retention.sweep_interval_seconds, 300);
    }

    #[test]
    fn summarisation_is_rendered_and_unset_stays_off() {
        let mut cr = chat_service(MINIMAL);
        assert!(!render_config(&cr).context.summarisation.enabled);
        cr.spec.context = Some(crate::crd::ContextSpec {
            max_context_tokens: Some(1024),
            summarisation: Some(crate::crd::SummarisationSpec {
                enabled: true,
                model: Some("gemma3:270m".into()),
                every_turns: Some(3),
                max_summary_tokens: Some(128),
                timeout_ms: None,
                prompt: Some("Summarise briefly.".into()),
            }),
            ..Default::default()
        });
        let config = render_config(&cr);
        config.validate().unwrap();
        let summarisation = &config.context.summarisation;
        assert!(summarisation.enabled);
        assert_eq!(summarisation.model.as_deref(), Some("gemma3:270m"));
        assert_eq!(
            (summarisation.every_turns, summarisation.max_summary_tokens),
            (3, 128)
        );
        assert_eq!(summarisation.timeout_ms, 60_000);
        assert_eq!(summarisation.prompt, "Summarise briefly.");
        // A summary as long as the whole budget is refused, naming the setting.
        cr.spec.context.as_mut().unwrap().max_context_tokens = Some(200);
        let errors = render_config(&cr).validate().unwrap_err();
        assert!(
            errors
                .get("context.summarisation.maxSummaryTokens")
                .is_some(),
            "{errors}"
        );
    }

    #[test]
    fn full_spec_maps_every_section() {
        let config = render_config(&chat_service(FULL));
        config.validate().unwrap();
        assert_eq!(config.backends[0].name, MANAGED_OLLAMA_BACKEND);
        assert_eq!(
            config.backends[0].url,
            "http://support-ollama.team-a.svc:11434"
        );
        assert_eq!(
            config.backends[1].api_key_env.as_deref(),
            Some("BACKEND_HOSTED_API_KEY")
        );
        assert_eq!(config.backends[1].weight, 3);
        assert_eq!(config.models.default, "gemma3:270m");
        assert_eq!(config.routing.strategy, Strategy::SessionAffinity);
        assert_eq!(config.routing.max_attempts, 3);
        assert_eq!(config.routing.breaker_failures, 7);
        assert_eq!(
            (
                config.routing.max_in_flight_per_backend,
                config.routing.queue_depth,
                config.routing.retry_budget_percent
            ),
            (4, 2, 10)
        );
        assert_eq!(
            config
                .routing
                .fallback
                .as_ref()
                .and_then(|f| f.backend.as_deref()),
            Some("hosted")
        );
        assert_eq!(config.history.mongodb.database, "support");
        assert!(config.cache.enabled && config.cache.ttl_seconds == 60);
        assert!(config.rate_limit.enabled && config.rate_limit.requests_per_window == 10);
        assert_eq!(config.rate_limit.key_by, RateLimitKey::ClientIp);
        assert_eq!(
            config.auth.api_keys_file.as_deref(),
            Some("/var/run/chat-service/auth/api-keys")
        );
        // TLS to both external stores, verified against the mounted CAs; DocumentDB's setting.
        assert_eq!(
            config
                .history
                .redis
                .tls
                .as_ref()
                .map(|t| t.ca_file.as_str()),
            Some("/var/run/chat-service/redis-ca/ca.pem")
        );
        assert_eq!(
            config
                .history
                .mongodb
                .tls
                .as_ref()
                .map(|t| t.ca_file.as_str()),
            Some("/var/run/chat-service/mongodb-ca/ca.pem")
        );
        assert_eq!(config.history.mongodb.retry_writes, Some(false));
    }
}
