//! What the observe step saw of the children after applying: the numbers the conditions are
//! computed from.

use crate::pods::Fault;
use crate::probe::{BackendReport, StoreReport};

/// Replica counts of one workload as its controller reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkloadState {
    pub desired: i32,
    pub ready: i32,
    pub updated: i32,
    pub available: i32,
    /// The workload controller has seen the latest spec.
    pub observed_latest: bool,
}

impl WorkloadState {
    pub fn is_ready(&self) -> bool {
        self.observed_latest && self.desired > 0 && self.ready >= self.desired
    }
    pub fn is_rolling(&self) -> bool {
        !self.observed_latest || self.updated < self.desired
    }
}

/// What the reconcile saw after applying. A store or Ollama that is not managed is `None`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    pub chat: Option<WorkloadState>,
    pub redis: Option<WorkloadState>,
    pub mongodb: Option<WorkloadState>,
    pub ollama: Option<WorkloadState>,
    pub endpoint: Option<String>,
    pub connection_secret: Option<String>,
    /// What the chat pods report about their back ends; `None` when nobody was asked (no chat pod
    /// is available yet).
    pub backends: Option<BackendReport>,
    /// What a chat pod reports about Redis and MongoDB; `None` when no chat pod runs yet.
    pub stores: Option<StoreReport>,
    /// Faults of the pods and workload controllers, chat pods first ([`crate::pods`]).
    pub faults: Vec<Fault>,
    /// Children the API server refused in this reconcile, each with its message.
    pub apply_failures: Vec<String>,
    /// Why the custom metric the HPA scales on cannot be read (no metrics adapter serves the
    /// custom metrics API); `None` when it can or is not used.
    pub metrics_unavailable: Option<String>,
}
