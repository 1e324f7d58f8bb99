//! Reading the file: YAML into [`Config`], then validation.

use crate::{Config, ConfigError};

impl Config {
    /// Parses the YAML the operator renders; unknown keys are errors so typos surface at start.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let config: Config = serde_yaml::from_str(text).map_err(|e| {
            let setting = e
                .location()
                .map(|l| format!("line {} column {}", l.line(), l.column()))
                .unwrap_or_else(|| "<document>".into());
            ConfigError::new(setting, e.to_string())
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and validates the config file at `path`.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
        })?;
        Self::from_yaml(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ENV_REDIS_URL;

    const MINIMAL: &str = r#"
backends:
  - name: local
    url: http://127.0.0.1:11434
    protocol: ollama
models:
  default: gemma3-270m
history: {}
"#;

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
    fn round_trips_through_yaml_in_camel_case() {
        let config = Config::from_yaml(MINIMAL).unwrap();
        let text = serde_yaml::to_string(&config).unwrap();
        assert!(text.contains("maxContextTokens"), "{text}");
        assert_eq!(Config::from_yaml(&text).unwrap(), config);
    }

    #[test]
    fn errors_name_the_setting() {
        let bad_url = MINIMAL.replace("http://127.0.0.1:11434", "ftp://x");
        assert_eq!(
            Config::from_yaml(&bad_url).unwrap_err().setting,
            "backends[0].url"
        );
        let zero_recent =
            format!("{MINIMAL}\n").replace("history: {}", "history: {redis: {recentMessages: 0}}");
        assert_eq!(
            Config::from_yaml(&zero_recent).unwrap_err().setting,
            "history.redis.recentMessages"
        );
        let bad_fallback = format!("{MINIMAL}routing: {{fallback: {{backend: nope}}}}\n");
        let err = Config::from_yaml(&bad_fallback).unwrap_err();
        assert_eq!(err.setting, "routing.fallback.backend");
        assert!(err.reason.contains("nope"), "{err}");
        let only_fallback = format!("{MINIMAL}routing: {{fallback: {{backend: local}}}}\n");
        assert_eq!(
            Config::from_yaml(&only_fallback).unwrap_err().setting,
            "routing.fallback.backend"
        );
        let empty_fallback = format!("{MINIMAL}routing: {{fallback: {{}}}}\n");
        assert_eq!(
            Config::from_yaml(&empty_fallback).unwrap_err().setting,
            "routing.fallback"
        );
        let zero_limit = format!("{MINIMAL}routing: {{maxInFlightPerBackend: 0}}\n");
        assert_eq!(
            Config::from_yaml(&zero_limit).unwrap_err().setting,
            "routing.maxInFlightPerBackend"
        );
        let low_factor = format!("{MINIMAL}routing: {{affinityLoadFactorPercent: 90}}\n");
        assert_eq!(
            Config::from_yaml(&low_factor).unwrap_err().setting,
            "routing.affinityLoadFactorPercent"
        );
        let budget = format!("{MINIMAL}routing: {{retryBudgetPercent: 101}}\n");
        assert_eq!(
            Config::from_yaml(&budget).unwrap_err().setting,
            "routing.retryBudgetPercent"
        );
        let dns = MINIMAL.replace(
            "protocol: ollama",
            "protocol: ollama\n    discoverDns: http://ollama/",
        );
        assert_eq!(
            Config::from_yaml(&dns).unwrap_err().setting,
            "backends[0].discoverDns"
        );
        let unknown = MINIMAL.replace("history: {}", "history: {}\nbogus: 1");
        let err = Config::from_yaml(&unknown).unwrap_err();
        assert!(err.reason.contains("bogus"), "{err}");
    }
}

#[cfg(test)]
mod example_file {
    #[test]
    fn the_shipped_example_is_valid() {
        let text = include_str!("../example.yaml");
        let config = super::Config::from_yaml(text).unwrap();
        assert_eq!(config.backends.len(), 2);
    }
}
