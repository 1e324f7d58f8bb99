//! The CA files of stores reached over TLS: the shape of the setting is validated with the rest
//! of the config (the operator renders paths of files that exist only in the pod), the files
//! themselves when the service loads its config, so that a missing or garbled CA is reported
//! with its setting and path before any connection is tried.

use std::path::Path;

use crate::{Config, ConfigError, ConfigErrors, StoreTlsConfig};

/// Settings of the stores' TLS, with the path of each in the file.
fn store_tls(config: &Config) -> [(&'static str, Option<&StoreTlsConfig>); 2] {
    [
        (
            "history.redis.tls.caFile",
            config.history.redis.tls.as_ref(),
        ),
        (
            "history.mongodb.tls.caFile",
            config.history.mongodb.tls.as_ref(),
        ),
    ]
}

/// Reasons the settings are malformed, without touching the file system.
pub(crate) fn shape_problems(config: &Config) -> Vec<ConfigError> {
    store_tls(config)
        .into_iter()
        .filter_map(|(setting, tls)| {
            let ca_file = &tls?.ca_file;
            (!Path::new(ca_file).is_absolute()).then(|| {
                ConfigError::new(
                    setting,
                    format!("`{ca_file}` must be an absolute path to a PEM file"),
                )
            })
        })
        .collect()
}

impl Config {
    /// Reads every CA file the config names and checks that it holds at least one PEM
    /// certificate. [`Config::load`] calls it; the operator, which renders paths of files that
    /// exist only inside the pod, does not.
    pub fn check_store_files(&self) -> Result<(), ConfigErrors> {
        let problems = store_tls(self)
            .into_iter()
            .filter_map(|(setting, tls)| {
                let ca_file = &tls?.ca_file;
                pem_problem(Path::new(ca_file)).map(|reason| ConfigError::new(setting, reason))
            })
            .collect();
        ConfigErrors::from_vec(problems).map_or(Ok(()), Err)
    }
}

fn pem_problem(path: &Path) -> Option<String> {
    match std::fs::read_to_string(path) {
        Err(e) => Some(format!("cannot read CA file {}: {e}", path.display())),
        Ok(text) if !text.contains("-----BEGIN CERTIFICATE-----") => Some(format!(
            "CA file {} holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)",
            path.display()
        )),
        Ok(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_ca(redis: Option<&str>, mongodb: Option<&str>) -> Config {
        let mut config = Config::new(
            vec![crate::BackendConfig::ollama("a", "http://a")],
            crate::ModelsConfig::new("m"),
        );
        config.history.redis.tls = redis.map(|f| StoreTlsConfig { ca_file: f.into() });
        config.history.mongodb.tls = mongodb.map(|f| StoreTlsConfig { ca_file: f.into() });
        config
    }

    #[test]
    fn a_relative_ca_path_is_refused_by_validation() {
        let errors = with_ca(Some("ca.crt"), None).validate().unwrap_err();
        assert!(
            errors
                .get("history.redis.tls.caFile")
                .unwrap()
                .reason
                .contains("absolute"),
            "{errors}"
        );
    }

    #[test]
    fn missing_and_garbled_ca_files_are_named_with_their_path() {
        let dir = std::env::temp_dir().join(format!("chat-config-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let garbled = dir.join("garbled.pem");
        std::fs::write(&garbled, "not a certificate").unwrap();
        let config = with_ca(Some("/nonexistent/ca.crt"), garbled.to_str());
        let errors = config.check_store_files().unwrap_err();
        let redis = &errors.get("history.redis.tls.caFile").unwrap().reason;
        assert!(redis.contains("/nonexistent/ca.crt"), "{redis}");
        let mongodb = &errors.get("history.mongodb.tls.caFile").unwrap().reason;
        assert!(mongodb.contains("no PEM certificate"), "{mongodb}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
