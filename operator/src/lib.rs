//! The ChatOperator: the ChatService custom resource and the reconciler that builds the chat stack.
//!
//! A reconcile is a pipeline: [`references`] reads what the spec points at, [`validate`] decides
//! whether it is usable, [`build`] turns it into desired objects (pure), [`apply`] server-side
//! applies and prunes them (comparing with the watch caches of [`cache`] first), and [`status`]
//! reports what happened. [`controller`] runs it.

pub mod apply;
pub mod build;
pub mod cache;
pub mod controller;
pub mod crd;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod probe;
pub mod references;
pub mod status;
pub mod validate;

pub use controller::{OperatorConfig, run};
pub use error::{Error, Result};
