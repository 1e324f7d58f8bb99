//! Named fault fixture, not a stand-in for Ollama: `FailingAfter` passes requests through to a
//! real Ollama (the rig's), and from its `turns`-th generation request on answers every one
//! with 500, as a candidate model that breaks under real traffic would. It records when it
//! first failed, so a test can time breach to rollback, and counts what it was asked.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

struct Shared {
    upstream: String,
    healthy_turns: usize,
    chat_calls: AtomicUsize,
    first_failure: Mutex<Option<Instant>>,
    http: reqwest::Client,
}

pub struct FailingAfter {
    pub url: String,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FailingAfter {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FailingAfter {
    /// In front of `upstream`, serving `healthy_turns` generations before it fails.
    pub async fn start(upstream: &str, healthy_turns: usize) -> Self {
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_string(),
            healthy_turns,
            chat_calls: AtomicUsize::new(0),
            first_failure: Mutex::new(None),
            http: reqwest::Client::new(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .fallback(pass_or_fail)
            .with_state(shared.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url,
            shared,
            server,
        }
    }

    /// Generation requests received, failed ones included.
    pub fn chat_calls(&self) -> usize {
        self.shared.chat_calls.load(Ordering::SeqCst)
    }

    /// When the first request was failed, if one was.
    pub fn first_failure(&self) -> Option<Instant> {
        *self.shared.first_failure.lock().unwrap()
    }
}

async fn pass_or_fail(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let generation = path.starts_with("/api/chat") || path.starts_with("/v1/chat");
    if generation {
        let seen = shared.chat_calls.fetch_add(1, Ordering::SeqCst);
        if seen >= shared.healthy_turns {
            shared
                .first_failure
                .lock()
                .unwrap()
                .get_or_insert_with(Instant::now);
            let message = format!(
                "{{\"error\":\"fault fixture: failing every turn after {}\"}}",
                shared.healthy_turns
            );
            return (StatusCode::INTERNAL_SERVER_ERROR, message).into_response();
        }
    }
    let request = shared
        .http
        .request(method, format!("{}{path}", shared.upstream))
        .header("content-type", "application/json")
        .body(body);
    match request.send().await {
        Ok(upstream) => {
            let status = StatusCode::from_u16(upstream.status().as_u16()).unwrap();
            let bytes = upstream.bytes().await.unwrap_or_default();
            (status, Body::from(bytes)).into_response()
        }
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}
