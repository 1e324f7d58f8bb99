//! The operator's one error type. Each variant has a short label that metrics and logs use.

/// What can stop a reconcile. Problems the user must fix in the spec or a Secret are not errors:
/// they become a `ConfigValid=False` condition and the reconcile waits for a change.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[source] kube::Error),
    #[error("cannot serialize an object: {0}")]
    Serialize(#[source] serde_json::Error),
    #[error("cannot render the chat-service config: {0}")]
    RenderConfig(#[source] serde_yaml::Error),
    #[error("object has no {0}")]
    MissingObjectKey(&'static str),
    #[error("leader election failed: {0}")]
    LeaderElection(String),
    #[error("the watch cache of the operator's children stopped")]
    CacheUnavailable,
    #[error("shutting down before the watch caches were filled")]
    ShuttingDown,
}

impl Error {
    /// Short, stable label for metrics (`reason="kube"`) and log fields.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Serialize(_) => "serialize",
            Error::RenderConfig(_) => "render_config",
            Error::MissingObjectKey(_) => "missing_object_key",
            Error::LeaderElection(_) => "leader_election",
            Error::CacheUnavailable => "cache_unavailable",
            Error::ShuttingDown => "shutting_down",
        }
    }
}

impl From<kube::Error> for Error {
    fn from(error: kube::Error) -> Self {
        Error::Kube(error)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
