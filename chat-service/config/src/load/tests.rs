use super::*;
use crate::{BackendConfig, ENV_REDIS_URL, ModelsConfig, Protocol};

const MINIMAL: &str = r#"
backends:
  - name: local
    url: http://127.0.0.1:11434
    protocol: ollama
models:
  default: gemma3-270m
history: {}
"#;

/// The only error `text` has.
fn only_error(text: &str) -> ConfigError {
    let errors = Config::from_yaml(text).unwrap_err();
    assert_eq!(errors.as_slice().len(), 1, "{errors}");
    errors.into_iter().next().unwrap()
}

#[test]
fn minimal_file_gets_defaults() {
    let config = Config::from_yaml(MINIMAL).unwrap();
    assert_eq!(config.listen, "0.0.0.0:8080");
    assert_eq!(config.history.redis.url_env, ENV_REDIS_URL);
    assert_eq!(config.history.mongodb.timeout_ms, 3_000);
    assert_eq!(config.allowed_models(), vec!["gemma3-270m".to_string()]);
    assert_eq!(config.routing.max_in_flight_per_backend, 8);
    assert_eq!(config.routing.queue_depth, 64);
    assert_eq!(config.routing.queue_timeout_ms, 30_000);
    assert_eq!(config.routing.retry_budget_percent, 20);
    assert_eq!(config.routing.affinity_load_factor_percent, 125);
    assert_eq!(config.routing.fallback, None);
}

#[test]
fn built_in_code_equals_the_minimal_file() {
    let built = Config::new(
        vec![BackendConfig::ollama("local", "http://127.0.0.1:11434")],
        ModelsConfig::new("gemma3-270m"),
    );
    assert_eq!(built, Config::from_yaml(MINIMAL).unwrap());
    built.validate().unwrap();
    let hosted = BackendConfig::openai("hosted", "https://llm.example.com");
    assert_eq!(
        (hosted.protocol, hosted.weight),
        (Protocol::Openai, 1),
        "{hosted:?}"
    );
}

#[test]
fn round_trips_through_yaml_in_camel_case() {
    let config = Config::from_yaml(MINIMAL).unwrap();
    let text = serde_yaml::to_string(&config).unwrap();
    assert!(text.contains("maxContextTokens"), "{text}");
    assert_eq!(Config::from_yaml(&text).unwrap(), config);
}

#[test]
fn the_shipped_example_is_valid() {
    let config = Config::from_yaml(include_str!("../../example.yaml")).unwrap();
    assert_eq!(config.backends.len(), 2);
    assert_eq!(
        config.routing.fallback.unwrap().backend.as_deref(),
        Some("hosted")
    );
}

#[test]
fn a_missing_field_is_named_by_its_path() {
    let error = only_error(&MINIMAL.replace("history: {}", ""));
    assert_eq!(error.setting, "history");
    // The path is the setting; serde_yaml's copy of it is not repeated in the reason.
    assert!(
        error.reason.starts_with("missing field `history`"),
        "{error}"
    );
    let error = only_error(&MINIMAL.replace("default: gemma3-270m", "allowed: [a]"));
    assert_eq!(error.setting, "models.default");
    let error = only_error(&MINIMAL.replace("    protocol: ollama\n", ""));
    assert_eq!(error.setting, "backends[0].protocol");
}

#[test]
fn a_bad_value_is_named_by_its_path() {
    let error = only_error(&MINIMAL.replace("protocol: ollama", "protocol: grpc"));
    assert_eq!(error.setting, "backends[0].protocol");
    assert!(
        error.reason.starts_with("unknown variant `grpc`"),
        "{error}"
    );
    let error = only_error(&format!("{MINIMAL}routing: {{maxAttempts: many}}\n"));
    assert_eq!(error.setting, "routing.maxAttempts");
    let error = only_error(&format!("{MINIMAL}routing: {{strategy: random}}\n"));
    assert_eq!(error.setting, "routing.strategy");
}

#[test]
fn an_unknown_key_is_an_error_that_names_it() {
    let error = only_error(&MINIMAL.replace("history: {}", "history: {}\nbogus: 1"));
    assert_eq!(error.setting, "bogus");
    assert!(error.reason.starts_with("unknown field `bogus`"), "{error}");
    let error = only_error(&MINIMAL.replace("history: {}", "history: {redis: {ttl: 1}}"));
    assert_eq!(error.setting, "history.redis.ttl");
    assert!(error.reason.contains("`ttlSeconds`"), "{error}");
}

#[test]
fn a_file_that_is_not_a_mapping_is_a_document_error() {
    assert_eq!(only_error("- just\n- a list\n").setting, "<document>");
    assert_eq!(only_error("").setting, "backends");
}

#[test]
fn validation_errors_after_parsing_name_the_setting() {
    let error = only_error(&MINIMAL.replace("http://127.0.0.1:11434", "ftp://x"));
    assert_eq!(error.setting, "backends[0].url");
    let error =
        only_error(&MINIMAL.replace("history: {}", "history: {redis: {recentMessages: 0}}"));
    assert_eq!(error.setting, "history.redis.recentMessages");
    let error = only_error(&format!(
        "{MINIMAL}routing: {{fallback: {{backend: nope}}}}\n"
    ));
    assert_eq!(error.setting, "routing.fallback.backend");
    assert!(error.reason.contains("nope"), "{error}");
}

#[test]
fn overrides_apply_before_the_one_validation() {
    let dir = std::env::temp_dir().join(format!("chat-config-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.yaml");
    std::fs::write(&path, format!("{MINIMAL}listen: not-an-address\n")).unwrap();

    let errors = Config::load(&path).unwrap_err();
    assert_eq!(errors.settings(), ["listen"]);
    let config = Config::load_with(&path, |c| c.listen = "127.0.0.1:9000".into()).unwrap();
    assert_eq!(config.listen, "127.0.0.1:9000");
    let errors = Config::load_with(&path, |c| c.listen = "nowhere".into()).unwrap_err();
    assert!(errors.get("listen").unwrap().reason.contains("nowhere"));

    std::fs::remove_dir_all(&dir).unwrap();
    let errors = Config::load(&path).unwrap_err();
    assert_eq!(errors.settings(), ["--config"]);
}
