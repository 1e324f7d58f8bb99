//! The ChatOperator: the ChatService custom resource and the reconciler that builds the chat stack.
//!
//! A reconcile is a pipeline, laid out in [`reconcile`]: dereference what the spec points at,
//! validate it into a [`validated::ValidatedChatService`] (every decision made once), provision
//! generated credentials, [`build`] the desired objects from it (pure), apply and prune them,
//! observe what the children report, and compute and publish the [`status`] (pure, one function
//! per condition). [`controller`] runs it with the watches that [`children`] derives from its one
//! list of child kinds, over the watch caches of [`cache`]. [`names`] and [`layout`] hold what
//! every step agrees on: object names and labels, ports and mount points.

pub mod build;
pub mod cache;
pub mod children;
pub mod controller;
pub mod crd;
pub mod error;
#[cfg(test)]
mod fixtures;
pub mod in_flight;
pub mod layout;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod pods;
pub mod probe;
pub mod reconcile;
pub mod rollout;
pub mod status;
pub mod triggers;
pub mod validated;

pub use controller::{OperatorConfig, run};
pub use error::{Error, Result};
