//! The chat service: takes one user turn, builds the context from stored history, calls an LLM
//! back end, streams the answer and stores both turns durably.
//!
//! The configuration is the crate `chat-config`, re-exported as [`config`]: the operator
//! renders the same [`config::Config`] into the ConfigMap the service reads, so the two cannot
//! drift.

pub use chat_config as config;

pub mod auth;
pub mod backend;
pub mod cache;
pub mod context;
pub mod conversation;
pub mod history;
pub mod http;
pub mod idempotency;
pub mod logging;
pub mod metrics;
pub mod rate_limit;
pub mod server;
pub mod state;
pub mod summary;
pub mod tokens;
pub mod tools;
pub mod turn;

pub use config::Secrets;
pub use http::router;
pub use state::{AppState, SharedState};
