//! The handlers, one module per part of the API; [`super::router`] mounts them.

pub mod chat;
pub mod openai;
pub mod operations;
pub mod records;
pub mod sessions;
pub mod websocket;
