//! `FixedLatencyUpstream`: an OpenAI-compatible server whose answers take a fixed, known time, so
//! that whatever a client sees beyond that time is added by what sits in between. It is a bench
//! fixture, not a model: the content is a fixed list of words.
//!
//! Streaming: the first chunk (role and first word) after `delay`, then one chunk per word every
//! `gap`, then the finish chunk, the usage chunk and `[DONE]` together. Non-streaming: the whole
//! completion after `delay + (chunks - 1) * gap`, the time the streamed answer takes to finish, so
//! the two shapes cost the same upstream time.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use serde::Deserialize;
use serde_json::json;

/// How long the fixture takes to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Until the first chunk (streaming) or part of the whole answer (non-streaming).
    pub delay: Duration,
    /// Words in the answer, one per streamed chunk; at least 1.
    pub chunks: u64,
    /// Between two streamed chunks.
    pub gap: Duration,
}

impl Shape {
    /// What a non-streaming answer waits: the time the streamed one takes to its last word.
    pub fn total(&self) -> Duration {
        self.delay + self.gap * (self.chunks.max(1) as u32 - 1)
    }

    pub fn describe(&self) -> String {
        format!(
            "first chunk after {} ms, {} chunks {} ms apart",
            self.delay.as_millis(),
            self.chunks,
            self.gap.as_millis()
        )
    }
}

struct Settings {
    delay_us: AtomicU64,
    chunks: AtomicU64,
    gap_us: AtomicU64,
    model: String,
}

impl Settings {
    fn shape(&self) -> Shape {
        Shape {
            delay: Duration::from_micros(self.delay_us.load(Ordering::Relaxed)),
            chunks: self.chunks.load(Ordering::Relaxed).max(1),
            gap: Duration::from_micros(self.gap_us.load(Ordering::Relaxed)),
        }
    }
}

/// The fixture, serving on 127.0.0.1 from a runtime (and threads) of its own, so that its work is
/// not scheduled behind the load generator's.
pub struct FixedLatencyUpstream {
    address: SocketAddr,
    settings: Arc<Settings>,
    runtime: Option<tokio::runtime::Runtime>,
}

#[derive(Deserialize)]
struct CompletionRequest {
    #[serde(default)]
    stream: bool,
}

async fn pause_until(start: tokio::time::Instant, after: Duration) {
    if !after.is_zero() {
        tokio::time::sleep_until(start + after).await;
    }
}

fn word(i: u64) -> String {
    format!("w{i} ")
}

fn chunk(model: &str, delta: serde_json::Value, finish: Option<&str>) -> String {
    let body = json!({
        "id": "chatcmpl-fixture",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    });
    format!("data: {body}\n\n")
}

async fn completions(
    State(settings): State<Arc<Settings>>,
    axum::Json(request): axum::Json<CompletionRequest>,
) -> Response {
    // Every pause ends at a deadline counted from the arrival of the request, so that timer
    // rounding (tokio's timer has 1 ms ticks) does not add up over the chunks and both shapes end
    // at the same time.
    let arrived = tokio::time::Instant::now();
    let shape = settings.shape();
    let model = settings.model.clone();
    if !request.stream {
        pause_until(arrived, shape.total()).await;
        let content: String = (0..shape.chunks).map(word).collect();
        return axum::Json(json!({
            "id": "chatcmpl-fixture",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 8, "completion_tokens": shape.chunks, "total_tokens": 8 + shape.chunks},
        }))
        .into_response();
    }
    let events = async_stream::stream! {
        pause_until(arrived, shape.delay).await;
        yield Ok::<_, Infallible>(Bytes::from(chunk(&model, json!({"role": "assistant", "content": word(0)}), None)));
        for i in 1..shape.chunks {
            pause_until(arrived, shape.delay + shape.gap * i as u32).await;
            yield Ok(Bytes::from(chunk(&model, json!({"content": word(i)}), None)));
        }
        let usage = json!({
            "id": "chatcmpl-fixture", "object": "chat.completion.chunk", "created": 0, "model": model,
            "choices": [],
            "usage": {"prompt_tokens": 8, "completion_tokens": shape.chunks, "total_tokens": 8 + shape.chunks},
        });
        let tail = format!("{}data: {usage}\n\ndata: [DONE]\n\n", chunk(&model, json!({}), Some("stop")));
        yield Ok(Bytes::from(tail));
    };
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(events))
        .expect("static response parts")
}

async fn models(State(settings): State<Arc<Settings>>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{"id": settings.model, "object": "model", "created": 0, "owned_by": "fixture"}],
    }))
    .into_response()
}

impl FixedLatencyUpstream {
    pub fn start(model: &str, shape: Shape, threads: usize) -> Result<Self> {
        let settings = Arc::new(Settings {
            delay_us: AtomicU64::new(0),
            chunks: AtomicU64::new(1),
            gap_us: AtomicU64::new(0),
            model: model.to_string(),
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("fixed-latency-upstream")
            .enable_all()
            .build()?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let app = Router::new()
            .route("/v1/chat/completions", post(completions))
            .route("/v1/models", get(models))
            .with_state(settings.clone());
        runtime.spawn(async move {
            // Like real servers (Go's net package, uvicorn), the fixture writes with TCP_NODELAY.
            let listener = tokio::net::TcpListener::from_std(listener)
                .expect("listener into the runtime")
                .tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                });
            axum::serve(listener, app).await.expect("fixture server");
        });
        let upstream = Self {
            address,
            settings,
            runtime: Some(runtime),
        };
        upstream.set_shape(shape);
        std::net::TcpStream::connect(address).context("the fixture does not accept connections")?;
        Ok(upstream)
    }

    pub fn set_shape(&self, shape: Shape) {
        let s = &self.settings;
        s.delay_us
            .store(shape.delay.as_micros() as u64, Ordering::Relaxed);
        s.chunks.store(shape.chunks.max(1), Ordering::Relaxed);
        s.gap_us
            .store(shape.gap.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn shape(&self) -> Shape {
        self.settings.shape()
    }

    /// Base URL without `/v1`, as the service's `backends[].url` wants it.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }
}

impl Drop for FixedLatencyUpstream {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
