//! Secrets the config names but does not hold: read from the environment variables it names
//! (mounted from Kubernetes Secrets), and never printed.

use crate::{Config, ConfigError, ENV_API_KEYS};

/// Secrets named by the config and read from the environment (mounted from Kubernetes Secrets).
#[derive(Clone)]
pub struct Secrets {
    pub redis_url: String,
    pub mongodb_uri: String,
    /// Per back end, in config order.
    pub backend_api_keys: Vec<Option<String>>,
    /// Content of [`ENV_API_KEYS`], when `auth` is enabled and it is set.
    pub api_keys: Option<String>,
}

/// Secrets end up in logs through `{:?}` of whatever holds them; this prints none of them.
impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets { .. }")
    }
}

impl Secrets {
    /// Reads the variables the config names; a missing one is reported by setting and variable.
    pub fn from_env(config: &Config) -> Result<Self, ConfigError> {
        Self::from_variables(config, |variable| std::env::var(variable).ok())
    }

    /// [`Secrets::from_env`] with the variables looked up by `variable`, so that tests need not
    /// change the process environment.
    pub fn from_variables(
        config: &Config,
        variable: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let read = |setting: &str, name: &str| {
            variable(name).filter(|v| !v.is_empty()).ok_or_else(|| {
                ConfigError::new(setting, format!("environment variable `{name}` is not set"))
            })
        };
        let redis_url = read("history.redis.urlEnv", &config.history.redis.url_env)?;
        let mongodb_uri = read("history.mongodb.uriEnv", &config.history.mongodb.uri_env)?;
        let backend_api_keys = config
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                b.api_key_env
                    .as_deref()
                    .map(|name| read(&format!("backends[{i}].apiKeyEnv"), name))
                    .transpose()
            })
            .collect::<Result<_, _>>()?;
        let api_keys =
            variable(ENV_API_KEYS).filter(|keys| config.auth.enabled && !keys.trim().is_empty());
        if config.auth.enabled && config.auth.api_keys_file.is_none() && api_keys.is_none() {
            return Err(ConfigError::new(
                "auth.apiKeysFile",
                format!("auth is enabled but neither the file nor `{ENV_API_KEYS}` is set"),
            ));
        }
        Ok(Self {
            redis_url,
            mongodb_uri,
            backend_api_keys,
            api_keys,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::{BackendConfig, ENV_MONGODB_URI, ENV_REDIS_URL, ModelsConfig};

    fn config() -> Config {
        let mut hosted = BackendConfig::openai("hosted", "https://llm.example.com");
        hosted.api_key_env = Some("HOSTED_KEY".into());
        Config::new(
            vec![
                BackendConfig::ollama("local", "http://ollama:11434"),
                hosted,
            ],
            ModelsConfig::new("m"),
        )
    }

    fn environment(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn read(config: &Config, env: &HashMap<String, String>) -> Result<Secrets, ConfigError> {
        Secrets::from_variables(config, |name| env.get(name).cloned())
    }

    const ALL: &[(&str, &str)] = &[
        (ENV_REDIS_URL, "redis://:pw@redis:6379"),
        (ENV_MONGODB_URI, "mongodb://u:p@mongo:27017"),
        ("HOSTED_KEY", "sk-secret"),
    ];

    #[test]
    fn reads_every_variable_the_config_names() {
        let secrets = read(&config(), &environment(ALL)).unwrap();
        assert_eq!(secrets.redis_url, "redis://:pw@redis:6379");
        assert_eq!(secrets.mongodb_uri, "mongodb://u:p@mongo:27017");
        assert_eq!(
            secrets.backend_api_keys,
            [None, Some("sk-secret".to_string())]
        );
        assert_eq!(secrets.api_keys, None);
    }

    #[test]
    fn a_missing_variable_is_named_with_its_setting() {
        let env = environment(&ALL[..2]);
        let error = read(&config(), &env).unwrap_err();
        assert_eq!(error.setting, "backends[1].apiKeyEnv");
        assert!(error.reason.contains("`HOSTED_KEY`"), "{error}");

        let mut env = environment(ALL);
        env.insert(ENV_MONGODB_URI.into(), String::new());
        let error = read(&config(), &env).unwrap_err();
        assert_eq!(error.setting, "history.mongodb.uriEnv");
        assert!(error.reason.contains(ENV_MONGODB_URI), "{error}");
    }

    #[test]
    fn from_env_reads_the_process_environment() {
        let mut config = config();
        config.history.redis.url_env = "CHAT_CONFIG_TEST_VARIABLE_THAT_IS_NEVER_SET".into();
        let error = Secrets::from_env(&config).unwrap_err();
        assert_eq!(error.setting, "history.redis.urlEnv");
        assert!(
            error
                .reason
                .contains("`CHAT_CONFIG_TEST_VARIABLE_THAT_IS_NEVER_SET`"),
            "{error}"
        );
    }

    #[test]
    fn auth_needs_a_key_file_or_keys_in_the_environment() {
        let mut config = config();
        config.auth.enabled = true;
        let error = read(&config, &environment(ALL)).unwrap_err();
        assert_eq!(error.setting, "auth.apiKeysFile");
        let mut env = environment(ALL);
        env.insert(ENV_API_KEYS.into(), "key-1,key-2".into());
        let secrets = read(&config, &env).unwrap();
        assert_eq!(secrets.api_keys.as_deref(), Some("key-1,key-2"));
    }

    #[test]
    fn debug_shows_no_secret() {
        let secrets = read(&config(), &environment(ALL)).unwrap();
        let printed = format!("{secrets:?} {secrets:#?}");
        for (_, value) in ALL {
            assert!(!printed.contains(value), "{printed}");
        }
        assert!(!printed.contains("pw"), "{printed}");
    }
}
