//! The chat service: takes one user turn, builds the context from stored history, calls an LLM
//! back end, streams the answer and stores both turns durably.
//!
//! [`config`] is always compiled: the operator renders [`config::Config`] into the ConfigMap the
//! service reads, so the two cannot drift.

pub mod config;
