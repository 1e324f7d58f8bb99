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

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets { .. }")
    }
}

impl Secrets {
    /// Reads the variables the config names; a missing one is reported by setting and variable.
    pub fn from_env(config: &Config) -> Result<Self, ConfigError> {
        let read = |setting: &str, variable: &str| {
            std::env::var(variable)
                .ok()
                .filter(|v| !v.is_empty())
                .ok_or_else(|| ConfigError {
                    setting: setting.to_string(),
                    reason: format!("environment variable `{variable}` is not set"),
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
                    .map(|variable| read(&format!("backends[{i}].apiKeyEnv"), variable))
                    .transpose()
            })
            .collect::<Result<_, _>>()?;
        let api_keys = std::env::var(ENV_API_KEYS)
            .ok()
            .filter(|keys| config.auth.enabled && !keys.trim().is_empty());
        if config.auth.enabled && config.auth.api_keys_file.is_none() && api_keys.is_none() {
            return Err(ConfigError {
                setting: "auth.apiKeysFile".into(),
                reason: format!("auth is enabled but neither the file nor `{ENV_API_KEYS}` is set"),
            });
        }
        Ok(Self {
            redis_url,
            mongodb_uri,
            backend_api_keys,
            api_keys,
        })
    }
}
