//! API-key authentication. Keys come from a mounted Secret file (one per line) and/or an
//! environment variable; only their SHA-256 digests are kept in memory. A presented key is hashed
//! once and compared against every digest in constant time (`subtle`), so neither the timing nor
//! the 401 body tells a caller how close a guess was. The file is re-read on an interval and
//! swapped in when its content changes, so a rotated Secret takes effect without a restart.
//! How a request presents its key is up to the HTTP layer (its `auth` middleware).
//!
//! An entry is a key, or a name and a key separated by whitespace (`team-a sk-…`). The name is
//! the key's id: it owns the sessions made with the key, so a key rotated under the same name
//! keeps them. An unnamed key's id is the first 8 hex digits of its SHA-256.

use std::path::PathBuf;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::AuthConfig;

/// How often the key file is re-read; Kubernetes itself takes up to a minute to update a
/// mounted Secret, so a few seconds add nothing noticeable.
pub const KEY_FILE_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Which API key made a request, as a non-secret id (its configured name, else the first 8 hex
/// digits of its SHA-256); put in request extensions for ownership, the rate limiter and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyId(pub String);

#[derive(Clone)]
struct KnownKey {
    digest: [u8; 32],
    id: String,
}

/// The accepted keys, replaced as a whole on reload.
pub struct ApiKeys {
    keys: RwLock<Arc<Vec<KnownKey>>>,
    file: Option<PathBuf>,
    from_env: Vec<String>,
    /// Digest of the file content last loaded, to skip unchanged re-reads.
    file_digest: RwLock<Option<[u8; 32]>>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot read API keys from {path}: {source}")]
pub struct KeyFileError {
    path: String,
    source: std::io::Error,
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The non-secret id of a key: enough to tell keys apart in metrics and logs, useless to guess it.
pub fn key_id(key: &str) -> String {
    hex::encode(&sha256(key.as_bytes())[..4])
}

/// A key's name: short and plain, since it becomes part of storage keys and a metric label.
fn is_key_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Keys in a file or variable: one per line or comma-separated; blanks and `#` comments skipped.
fn parse_keys(text: &str) -> impl Iterator<Item = &str> {
    text.split(['\n', ','])
        .map(str::trim)
        .filter(|k| !k.is_empty() && !k.starts_with('#'))
}

impl ApiKeys {
    /// Loads the keys once; an unreadable file at start-up is an error, later it keeps the
    /// previous keys. `env_keys` is the content of [`crate::config::ENV_API_KEYS`].
    pub fn load(config: &AuthConfig, env_keys: Option<&str>) -> Result<Arc<Self>, KeyFileError> {
        let keys = Arc::new(Self {
            keys: RwLock::new(Arc::new(Vec::new())),
            file: config.api_keys_file.as_ref().map(PathBuf::from),
            from_env: env_keys
                .map(|text| parse_keys(text).map(str::to_string).collect())
                .unwrap_or_default(),
            file_digest: RwLock::new(None),
        });
        keys.reload()?;
        Ok(keys)
    }

    /// Re-reads the file; returns whether the set of keys changed.
    pub fn reload(&self) -> Result<bool, KeyFileError> {
        let file_text = match &self.file {
            Some(path) => Some(
                std::fs::read_to_string(path).map_err(|source| KeyFileError {
                    path: path.display().to_string(),
                    source,
                })?,
            ),
            None => None,
        };
        let digest = file_text.as_deref().map(|t| sha256(t.as_bytes()));
        let mut last = self.file_digest.write().expect("key digest lock");
        if *last == digest && digest.is_some() {
            return Ok(false);
        }
        let mut known: Vec<KnownKey> = Vec::new();
        for entry in self
            .from_env
            .iter()
            .map(String::as_str)
            .chain(file_text.as_deref().into_iter().flat_map(parse_keys))
        {
            let (id, key) = match entry.split_once(char::is_whitespace) {
                Some((name, key)) if is_key_name(name) && !key.trim().is_empty() => {
                    (name.to_string(), key.trim())
                }
                _ => (key_id(entry), entry),
            };
            known.push(KnownKey {
                digest: sha256(key.as_bytes()),
                id,
            });
        }
        tracing::info!(keys = known.len(), "API keys loaded");
        *self.keys.write().expect("keys lock") = Arc::new(known);
        *last = digest;
        Ok(true)
    }

    /// The id of the matching key. Every stored digest is compared, so the time taken does not
    /// depend on which key (if any) matched.
    pub fn verify(&self, presented: &str) -> Option<ApiKeyId> {
        let digest = sha256(presented.as_bytes());
        let keys = self.keys.read().expect("keys lock").clone();
        let mut found: Option<&KnownKey> = None;
        for known in keys.iter() {
            if bool::from(known.digest.ct_eq(&digest)) {
                found = Some(known);
            }
        }
        found.map(|k| ApiKeyId(k.id.clone()))
    }

    /// Polls the key file until the keys are dropped (the app state is gone).
    pub fn watch(self: &Arc<Self>) {
        if self.file.is_none() {
            return;
        }
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(KEY_FILE_POLL_INTERVAL);
            interval.tick().await;
            loop {
                interval.tick().await;
                let Some(keys) = weak.upgrade() else { return };
                if let Err(e) = keys.reload() {
                    tracing::warn!(error = %e, "API key file unreadable; keeping the previous keys");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_verify_by_digest_and_reload_from_the_file() {
        let dir = std::env::temp_dir().join(format!("chat-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("keys");
        std::fs::write(
            &file,
            "# comment\nalpha-key\n\nbeta-key\nteam-a  named-key\n",
        )
        .unwrap();
        let config = AuthConfig {
            enabled: true,
            api_keys_file: Some(file.display().to_string()),
            ..AuthConfig::default()
        };
        let keys = ApiKeys::load(&config, Some("env-key")).unwrap();
        assert_eq!(
            keys.verify("alpha-key"),
            Some(ApiKeyId(key_id("alpha-key")))
        );
        assert!(keys.verify("env-key").is_some());
        assert_eq!(keys.verify("named-key"), Some(ApiKeyId("team-a".into())));
        assert_eq!(
            keys.verify("team-a  named-key"),
            None,
            "the name is not part of the key"
        );
        assert_eq!(keys.verify("alpha-ke"), None);
        assert_eq!(keys.verify(""), None);
        assert!(!keys.reload().unwrap(), "unchanged file is not reloaded");
        std::fs::write(&file, "gamma-key\n").unwrap();
        assert!(keys.reload().unwrap());
        assert_eq!(keys.verify("alpha-key"), None);
        assert!(keys.verify("gamma-key").is_some());
        assert_eq!(key_id("gamma-key").len(), 8);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
