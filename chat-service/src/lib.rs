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
pub mod metrics;
pub mod rate_limit;
pub mod state;
pub mod turn;

pub use config::Secrets;
pub use http::router;
pub use state::{AppState, SharedState};

/// Binds the service's listener. Every accepted connection gets `TCP_NODELAY`: answers go out in
/// small pieces (SSE events, WebSocket frames, the last chunk of a body), and with Nagle's
/// algorithm each piece after the first waited for the client's delayed ACK, up to 40 ms.
pub async fn bind(
    listen: &str,
) -> std::io::Result<axum::serve::TapIo<tokio::net::TcpListener, fn(&mut tokio::net::TcpStream)>> {
    use axum::serve::ListenerExt;
    fn no_delay(stream: &mut tokio::net::TcpStream) {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY on a connection");
        }
    }
    let listener = tokio::net::TcpListener::bind(listen).await?;
    Ok(listener.tap_io(no_delay as fn(&mut tokio::net::TcpStream)))
}

#[cfg(test)]
mod tests {
    use axum::serve::Listener;

    #[tokio::test]
    async fn accepted_connections_have_nodelay() {
        let mut listener = super::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let client = tokio::spawn(tokio::net::TcpStream::connect(address));
        let (accepted, _) = listener.accept().await;
        assert!(accepted.nodelay().unwrap());
        client.await.unwrap().unwrap();
    }
}
