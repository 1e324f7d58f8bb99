//! Named test fixture, not a stand-in for Ollama in general: `FlakyUpstream` speaks Ollama's
//! `/api/chat` (NDJSON) and `/api/tags` just far enough to play a back end that misbehaves on
//! command: answers 500, refuses connections, hangs before the first byte, breaks the stream
//! after N tokens, answers slowly, or ends its body a while after its last line. Healthy answers are a fixed short reply, streamed or, when
//! the request says `"stream": false`, whole (every other mode streams whatever was asked, as
//! some servers do). It counts every generation request and records its model, last message and
//! `stream` field, so tests can tell which back end served which turn and how it was asked. In `SlowTokens` mode it records when the service closed the stream, so a
//! test can tell that a client leaving cancelled the upstream request.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Answers with [`REPLY`], token by token.
    Healthy,
    /// `500 Internal Server Error` on `/api/chat`.
    Fail500,
    /// The port is closed: connections are refused.
    Refuse,
    /// Accepts `/api/chat` and never answers.
    Hang,
    /// Sends this many tokens, then breaks the connection mid-stream.
    FailAfterTokens(usize),
    /// One token per interval for up to ten minutes, until the service closes the stream.
    SlowTokens(Duration),
    /// This many tokens, one per interval, then a normal end.
    SlowReply(usize, Duration),
    /// A healthy answer whose body ends this long after its `"done": true` line, as from a
    /// server (or a proxy in front of it) that writes the end of its response on its own.
    LateBodyEnd(Duration),
}

/// The tokens of a healthy answer.
pub const REPLY: [&str; 4] = ["Hello", " from", " the", " fixture."];

/// One `/api/chat` request as received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub model: String,
    pub last_message: String,
    /// The request's `stream` field (Ollama streams when it is absent).
    pub stream: bool,
}

struct Shared {
    mode: Mutex<Mode>,
    latency: Mutex<Duration>,
    chat_calls: AtomicUsize,
    recorded: Mutex<Vec<Recorded>>,
    /// `SlowTokens` streams the service closed, and the tokens each had sent by then.
    closed_streams: Mutex<Vec<(std::time::Instant, usize)>>,
}

pub struct FlakyUpstream {
    pub url: String,
    address: SocketAddr,
    shared: Arc<Shared>,
    server: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for FlakyUpstream {
    fn drop(&mut self) {
        if let Some(server) = self.server.lock().unwrap().take() {
            server.abort();
        }
    }
}

impl FlakyUpstream {
    /// Listens on 127.0.0.1.
    pub async fn start(mode: Mode) -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), mode).await
    }

    /// Listens on `bind` (e.g. `0.0.0.0:0`, reachable on every loopback address); the URL
    /// names 127.0.0.1.
    pub async fn start_on(bind: SocketAddr, mode: Mode) -> Self {
        let shared = Arc::new(Shared {
            mode: Mutex::new(mode),
            latency: Mutex::new(Duration::ZERO),
            chat_calls: AtomicUsize::new(0),
            recorded: Mutex::new(Vec::new()),
            closed_streams: Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
        let address = listener.local_addr().unwrap();
        let fixture = Self {
            url: format!("http://127.0.0.1:{}", address.port()),
            address,
            shared,
            server: Mutex::new(None),
        };
        let server = fixture.serve(listener);
        *fixture.server.lock().unwrap() = Some(server);
        if mode == Mode::Refuse {
            fixture.close();
        }
        fixture
    }

    pub fn port(&self) -> u16 {
        self.address.port()
    }

    fn serve(&self, listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
        let app = axum::Router::new()
            .route("/api/chat", post(chat))
            .route("/api/tags", get(tags))
            .route(
                "/api/version",
                get(|| async { Json(json!({"version": "fixture"})) }),
            )
            .with_state(self.shared.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        })
    }

    fn close(&self) {
        if let Some(server) = self.server.lock().unwrap().take() {
            server.abort();
        }
    }

    /// Changes behaviour from the next request on; `Refuse` closes the port, any other mode
    /// opens it again on the same port.
    pub async fn set_mode(&self, mode: Mode) {
        let previous = std::mem::replace(&mut *self.shared.mode.lock().unwrap(), mode);
        if mode == Mode::Refuse {
            self.close();
            // Let the aborted task drop its listener.
            tokio::time::sleep(Duration::from_millis(50)).await;
        } else if previous == Mode::Refuse {
            let listener = tokio::net::TcpListener::bind(self.address).await.unwrap();
            let server = self.serve(listener);
            *self.server.lock().unwrap() = Some(server);
        }
    }

    /// Delay before the response head of every `/api/chat`.
    pub fn set_latency(&self, latency: Duration) {
        *self.shared.latency.lock().unwrap() = latency;
    }

    /// `/api/chat` requests received (whatever was answered).
    pub fn chat_calls(&self) -> usize {
        self.shared.chat_calls.load(Ordering::SeqCst)
    }

    /// When each `SlowTokens` stream was closed by the service, with the tokens it had sent.
    pub fn closed_streams(&self) -> Vec<(std::time::Instant, usize)> {
        self.shared.closed_streams.lock().unwrap().clone()
    }

    pub fn recorded(&self) -> Vec<Recorded> {
        self.shared.recorded.lock().unwrap().clone()
    }

    /// Whether a request whose last message contains `text` reached this fixture.
    pub fn received(&self, text: &str) -> bool {
        self.recorded()
            .iter()
            .any(|r| r.last_message.contains(text))
    }
}

async fn tags() -> Json<Value> {
    Json(json!({"models": [{"name": "fixture-model", "model": "fixture-model"}]}))
}

fn line(value: Value) -> Bytes {
    Bytes::from(format!("{value}\n"))
}

/// The last line of a streamed answer of `tokens` tokens.
fn done_line(model: &str, tokens: usize) -> Bytes {
    line(json!({
        "model": model,
        "message": {"role": "assistant", "content": ""},
        "done": true,
        "done_reason": "stop",
        "prompt_eval_count": 5,
        "eval_count": tokens,
    }))
}

fn token_line(model: &str, token: &str) -> Bytes {
    line(json!({
        "model": model,
        "message": {"role": "assistant", "content": token},
        "done": false,
    }))
}

async fn chat(State(shared): State<Arc<Shared>>, Json(body): Json<Value>) -> Response {
    shared.chat_calls.fetch_add(1, Ordering::SeqCst);
    let model = body["model"].as_str().unwrap_or_default().to_string();
    let last_message = body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_string();
    let stream = body["stream"].as_bool().unwrap_or(true);
    shared.recorded.lock().unwrap().push(Recorded {
        model: model.clone(),
        last_message,
        stream,
    });
    let mode = *shared.mode.lock().unwrap();
    let latency = *shared.latency.lock().unwrap();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    match mode {
        Mode::Fail500 | Mode::Refuse => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "fixture: failing on purpose",
        )
            .into_response(),
        Mode::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
        Mode::Healthy if !stream => Json(json!({
            "model": model,
            "message": {"role": "assistant", "content": REPLY.concat()},
            "done": true,
            "done_reason": "stop",
            "prompt_eval_count": 5,
            "eval_count": REPLY.len(),
        }))
        .into_response(),
        Mode::Healthy => {
            let mut lines: Vec<Result<Bytes, std::io::Error>> =
                REPLY.iter().map(|t| Ok(token_line(&model, t))).collect();
            lines.push(Ok(done_line(&model, REPLY.len())));
            ndjson(Body::from_stream(futures::stream::iter(lines)))
        }
        Mode::LateBodyEnd(after) => {
            let stream = async_stream::stream! {
                for token in REPLY {
                    yield Ok::<Bytes, std::io::Error>(token_line(&model, token));
                }
                yield Ok(done_line(&model, REPLY.len()));
                tokio::time::sleep(after).await;
            };
            ndjson(Body::from_stream(stream))
        }
        Mode::FailAfterTokens(n) => {
            let model_for_stream = model.clone();
            let stream = async_stream::stream! {
                for i in 0..n {
                    yield Ok::<Bytes, std::io::Error>(token_line(&model_for_stream, REPLY[i % REPLY.len()]));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                // An error in the body aborts the connection mid-response.
                yield Err(std::io::Error::other("fixture: breaking the stream"));
            };
            ndjson(Body::from_stream(stream))
        }
        Mode::SlowTokens(interval) => {
            let shared = shared.clone();
            let stream = async_stream::stream! {
                let mut closed = StreamClosed { shared, sent: 0 };
                let deadline = std::time::Instant::now() + Duration::from_secs(600);
                while std::time::Instant::now() < deadline {
                    yield Ok::<Bytes, std::io::Error>(token_line(&model, " word"));
                    closed.count_one();
                    tokio::time::sleep(interval).await;
                }
            };
            ndjson(Body::from_stream(stream))
        }
        Mode::SlowReply(tokens, interval) => {
            let stream = async_stream::stream! {
                for _ in 0..tokens {
                    yield Ok::<Bytes, std::io::Error>(token_line(&model, " word"));
                    tokio::time::sleep(interval).await;
                }
                yield Ok(done_line(&model, tokens));
            };
            ndjson(Body::from_stream(stream))
        }
    }
}

/// Notes, when the stream is dropped (the service closed the connection), how many tokens went.
struct StreamClosed {
    shared: Arc<Shared>,
    sent: usize,
}

impl StreamClosed {
    fn count_one(&mut self) {
        self.sent += 1;
    }
}

impl Drop for StreamClosed {
    fn drop(&mut self) {
        self.shared
            .closed_streams
            .lock()
            .unwrap()
            .push((std::time::Instant::now(), self.sent));
    }
}

fn ndjson(body: Body) -> Response {
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(body)
        .unwrap()
}
