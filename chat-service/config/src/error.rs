//! What is wrong with a config: the setting (its path in the file, or the environment variable)
//! and why, so that whoever runs the service can find and fix it. Validation reports every
//! problem at once ([`ConfigErrors`]), so that a broken file takes one round of fixes, not one
//! per mistake.

use std::fmt;

/// A setting that is missing or out of range; `setting` is the path in the file (such as
/// `backends[1].url` or `routing.maxAttempts`), or the environment variable, so that an
/// operator can find it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid setting `{setting}`: {reason}")]
pub struct ConfigError {
    pub setting: String,
    pub reason: String,
}

impl ConfigError {
    pub fn new(setting: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            setting: setting.into(),
            reason: reason.into(),
        }
    }
}

/// Every problem found in one config, in the order of the file; never empty. Displayed one per
/// line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(Vec<ConfigError>);

impl ConfigErrors {
    /// `None` when there is nothing to report.
    pub(crate) fn from_vec(errors: Vec<ConfigError>) -> Option<Self> {
        (!errors.is_empty()).then_some(Self(errors))
    }

    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.0.iter()
    }

    pub fn as_slice(&self) -> &[ConfigError] {
        &self.0
    }

    /// The settings reported, in order, e.g. to find one in a test or a log.
    pub fn settings(&self) -> Vec<&str> {
        self.0.iter().map(|e| e.setting.as_str()).collect()
    }

    /// The error about `setting`, if there is one.
    pub fn get(&self, setting: &str) -> Option<&ConfigError> {
        self.0.iter().find(|e| e.setting == setting)
    }
}

impl From<ConfigError> for ConfigErrors {
    fn from(error: ConfigError) -> Self {
        Self(vec![error])
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl IntoIterator for ConfigErrors {
    type Item = ConfigError;
    type IntoIter = std::vec::IntoIter<ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a ConfigError;
    type IntoIter = std::slice::Iter<'a, ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_lists_every_error_on_its_own_line() {
        let errors = ConfigErrors::from_vec(vec![
            ConfigError::new("listen", "bad"),
            ConfigError::new("backends[1].url", "worse"),
        ])
        .unwrap();
        assert_eq!(
            errors.to_string(),
            "invalid setting `listen`: bad\ninvalid setting `backends[1].url`: worse"
        );
        assert_eq!(errors.settings(), ["listen", "backends[1].url"]);
        assert_eq!(errors.get("backends[1].url").unwrap().reason, "worse");
    }

    #[test]
    fn nothing_to_report_is_no_error() {
        assert_eq!(ConfigErrors::from_vec(Vec::new()), None);
    }
}
