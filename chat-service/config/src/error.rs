//! What is wrong with a config: the setting (its path in the file, or the environment variable)
//! and why, so that whoever runs the service can find and fix it.

/// A setting that is missing or out of range; `setting` is the path in the file (or the
/// environment variable) so that an operator can find it.
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
