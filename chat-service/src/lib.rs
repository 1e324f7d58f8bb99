//! The chat service: takes one user turn, builds the context from stored history, calls an LLM
//! back end, streams the answer and stores both turns durably.
//!
//! [`config`] is always compiled: the operator renders [`config::Config`] into the ConfigMap the
//! service reads, so the two cannot drift. Everything else is behind the `server` feature.

pub mod config;

#[cfg(feature = "server")]
pub mod auth;
#[cfg(feature = "server")]
pub mod backend;
#[cfg(feature = "server")]
pub mod cache;
#[cfg(feature = "server")]
pub mod context;
#[cfg(feature = "server")]
pub mod conversation;
#[cfg(feature = "server")]
pub mod history;
#[cfg(feature = "server")]
pub mod http;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod rate_limit;
#[cfg(feature = "server")]
pub mod state;
#[cfg(feature = "server")]
pub mod turn;

#[cfg(feature = "server")]
pub use http::router;
#[cfg(feature = "server")]
pub use state::{AppState, Secrets, SharedState};

/// Binds the service's listener. Every accepted connection gets `TCP_NODELAY`: answers go out in
/// small pieces (SSE events, WebSocket frames, the last chunk of a body), and with Nagle's
/// algorithm each piece after the first waited for the client's delayed ACK, up to 40 ms.
#[cfg(feature = "server")]
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

#[cfg(all(test, feature = "server"))]
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
