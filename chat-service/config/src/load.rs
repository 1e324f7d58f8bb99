//! Reading the file: YAML into [`Config`], overrides from the command line, then validation —
//! once, so that a [`Config`] that comes from here is valid.

use std::path::Path;

use serde_path_to_error::Segment;

use crate::{Config, ConfigError, ConfigErrors};

impl Config {
    /// Parses and validates the YAML the operator renders; unknown keys are errors so typos
    /// surface at start.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigErrors> {
        let config = parse(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        Self::load_with(path, |_| {})
    }

    /// Reads the config file at `path`, applies `overrides` (such as command-line flags) and
    /// validates the result, so that an override may mend a setting and a bad one is reported;
    /// then reads the CA files it names ([`Config::check_store_files`]).
    pub fn load_with(
        path: &Path,
        overrides: impl FnOnce(&mut Config),
    ) -> Result<Self, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
        })?;
        let mut config = parse(&text)?;
        overrides(&mut config);
        config.validate()?;
        config.check_store_files()?;
        Ok(config)
    }
}

/// YAML into [`Config`] without validation. A failure names the setting by its path in the file
/// (`backends[0].protocol`), like validation does; the reason is serde's message with its line
/// and column.
fn parse(text: &str) -> Result<Config, ConfigError> {
    serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(text)).map_err(
        |error: serde_path_to_error::Error<serde_yaml::Error>| {
            let mut setting = setting_path(error.path());
            let message = error.inner().to_string();
            // serde_yaml starts the message with the path too; once is enough.
            let reason = match message.split_once(": ") {
                Some((path, rest)) if is_within(&setting, path) => rest.to_string(),
                _ => message,
            };
            // Serde reports a missing field at the struct that lacks it; the field is the setting.
            if let Some(field) = quoted_after(&reason, "missing field `") {
                if !setting.is_empty() {
                    setting.push('.');
                }
                setting.push_str(field);
            }
            if setting.is_empty() {
                setting = "<document>".into();
            }
            ConfigError::new(setting, reason)
        },
    )
}

/// Whether `setting` is `path` or lies inside it.
fn is_within(setting: &str, path: &str) -> bool {
    setting
        .strip_prefix(path)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
}

/// `backends[0].protocol` style: map keys joined by dots, list indices in brackets.
fn setting_path(path: &serde_path_to_error::Path) -> String {
    let mut setting = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => setting.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !setting.is_empty() {
                    setting.push('.');
                }
                setting.push_str(key);
            }
            Segment::Unknown => {}
        }
    }
    setting
}

/// The text between `prefix` and the next backtick, when `message` starts with `prefix`.
fn quoted_after<'a>(message: &'a str, prefix: &str) -> Option<&'a str> {
    message.strip_prefix(prefix)?.split('`').next()
}

#[cfg(test)]
mod tests;
