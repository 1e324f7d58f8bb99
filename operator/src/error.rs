//! The operator's errors: the error of each reconcile step that talks to the API server,
//! carrying what it was working on (the build step's and the caches' are next to them), and the
//! one [`Error`] that wraps them with the operator's lifecycle failures. Each variant has a short
//! label that metrics and logs use.

use crate::build::BuildError;
use crate::cache::CacheUnavailable;
use crate::children::ChildKind;

/// A Secret or ConfigMap the spec names could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {kind} {name:?}: {source}")]
pub struct DereferenceError {
    /// `Secret` or `ConfigMap`.
    pub kind: &'static str,
    pub name: String,
    #[source]
    pub source: kube::Error,
}

/// A generated credentials Secret could not be created or read.
#[derive(Debug, thiserror::Error)]
#[error("cannot create or re-own the generated Secret {name:?}: {source}")]
pub struct ProvisionError {
    pub name: String,
    #[source]
    pub source: kube::Error,
}

/// An existing object with a child's name could not be read to see who owns it.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {kind:?} {name:?} to check its owner: {source}")]
pub struct ClaimError {
    pub kind: ChildKind,
    pub name: String,
    #[source]
    pub source: kube::Error,
}

/// A child that could not be applied or pruned.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("cannot apply {kind:?} {name:?}: {source}")]
    Apply {
        kind: ChildKind,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot hand spec.replicas of Deployment {name:?} over to the autoscaler: {source}")]
    HandOverReplicas {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot delete {kind:?} {name:?}: {source}")]
    Prune {
        kind: ChildKind,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// The status could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the status: {0}")]
pub struct PublishError(#[source] pub kube::Error);

/// What can stop a reconcile. Problems the user must fix in the spec or a Secret are not errors:
/// they become a `ConfigValid=False` condition and the reconcile waits for a change.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[source] kube::Error),
    #[error("dereference: {0}")]
    Dereference(#[from] DereferenceError),
    #[error("claim: {0}")]
    Claim(#[from] ClaimError),
    #[error("provision: {0}")]
    Provision(#[from] ProvisionError),
    #[error("build: {0}")]
    Build(#[from] BuildError),
    #[error("apply: {0}")]
    Apply(#[from] ApplyError),
    #[error("status: {0}")]
    Publish(#[from] PublishError),
    #[error("object has no {0}")]
    MissingObjectKey(&'static str),
    #[error("leader election failed: {0}")]
    LeaderElection(String),
    #[error("{0}")]
    CacheUnavailable(#[from] CacheUnavailable),
    #[error("shutting down before the watch caches were filled")]
    ShuttingDown,
}

impl Error {
    /// Short, stable label for metrics (`reason="kube"`) and log fields. It names the kind of
    /// failure, not the step: every failed API call is `kube`, whichever step made it.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Kube(_)
            | Error::Dereference(_)
            | Error::Claim(_)
            | Error::Provision(_)
            | Error::Apply(_)
            | Error::Publish(_) => "kube",
            Error::Build(BuildError::Serialize { .. }) => "serialize",
            Error::Build(BuildError::RenderConfig(_)) => "render_config",
            Error::MissingObjectKey(_) => "missing_object_key",
            Error::LeaderElection(_) => "leader_election",
            Error::CacheUnavailable(_) => "cache_unavailable",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_errors_keep_the_labels_the_metrics_had() {
        let api = || kube::Error::Api(Box::new(kube::core::Status::failure("boom", "Conflict")));
        let apply = Error::from(ApplyError::Apply {
            kind: crate::children::ChildKind::Deployment,
            name: "support".into(),
            source: api(),
        });
        assert_eq!(apply.label(), "kube");
        assert!(
            apply.to_string().contains("Deployment \"support\""),
            "{apply}"
        );
        let read = Error::from(DereferenceError {
            kind: "Secret",
            name: "llm-keys".into(),
            source: api(),
        });
        assert_eq!(read.label(), "kube");
        assert!(read.to_string().contains("llm-keys"), "{read}");
        assert_eq!(Error::from(CacheUnavailable).label(), "cache_unavailable");
    }
}
