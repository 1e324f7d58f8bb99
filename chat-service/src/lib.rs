//! The chat service: takes one user turn, builds the context from stored history, calls an LLM
//! back end, streams the answer and stores both turns durably.
//!
//! [`config`] is always compiled: the operator renders [`config::Config`] into the ConfigMap the
//! service reads, so the two cannot drift. Everything else is behind the `server` feature.

pub mod config;

#[cfg(feature = "server")]
pub mod api;
#[cfg(feature = "server")]
pub mod auth;
#[cfg(feature = "server")]
pub mod backend;
#[cfg(feature = "server")]
pub mod cache;
#[cfg(feature = "server")]
pub mod context;
#[cfg(feature = "server")]
pub mod error;
#[cfg(feature = "server")]
pub mod history;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod rate_limit;
#[cfg(feature = "server")]
pub mod state;
#[cfg(feature = "server")]
pub mod turn;

#[cfg(feature = "server")]
pub use api::router;
#[cfg(feature = "server")]
pub use state::{AppState, Secrets, SharedState};
