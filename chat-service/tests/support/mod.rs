//! Runs the service in-process on a real port against the rig's real Redis, FerretDB and Ollama.

#![allow(dead_code)]

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

pub mod binary;
pub mod clients;
pub mod flaky;
pub mod listener;
pub mod pool;
pub mod records;
pub mod tool_calls;
pub mod ttl_proxy;

use chat_rig::{Parts, Rig};
use chat_service::config::{BackendConfig, Config, ModelsConfig};
use chat_service::{AppState, Secrets, SharedState};
use serde_json::Value;

/// The rig: the one `rig up` described in `CHATOP_RIG_ENV`, else a private one without Kubernetes
/// (this service does not need it) started once for this test binary.
pub fn rig() -> &'static Rig {
    static RIG: OnceLock<Result<Rig, String>> = OnceLock::new();
    let rig = RIG.get_or_init(|| {
        // On a thread of its own: callers are inside an async runtime.
        std::thread::spawn(|| {
            Parts::parse("redis,mongodb,ollama")
                .and_then(|parts| Rig::attach_or_start("chat-service", parts))
                .map_err(|e| format!("{e:#}"))
        })
        .join()
        .expect("rig start-up thread")
    });
    match rig {
        Ok(rig) => rig,
        Err(e) => panic!("the test rig is not available: {e}"),
    }
}

/// A config pointing at the rig's Ollama with small generations, isolated in its own database
/// and Redis key prefix.
pub fn test_config(rig: &Rig) -> Config {
    let mut models = ModelsConfig::new(rig.model());
    models.allowed = vec![rig.model().into()];
    let mut config = Config::new(
        vec![BackendConfig::ollama("ollama", rig.ollama_url())],
        models,
    );
    config.listen = "127.0.0.1:0".into();
    config.history.mongodb.database = chat_rig::unique_name("chat");
    config.history.mongodb.timeout_ms = 1_500;
    config.history.redis.key_prefix = chat_rig::unique_name("chat");
    config.context.max_output_tokens = 12;
    // Ollama runs one generation at a time on a shared CPU: queued turns wait long for a token.
    config.routing.first_token_timeout_ms = 300_000;
    config.routing.total_timeout_ms = 600_000;
    config.limits.max_message_bytes = 2_048;
    config
}

pub struct TestService {
    pub base: String,
    pub state: SharedState,
    pub http: reqwest::Client,
    stop: tokio_util::sync::CancellationToken,
}

impl Drop for TestService {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub async fn start(config: Config, redis_url: &str, mongodb_url: &str) -> TestService {
    start_with_api_keys(config, redis_url, mongodb_url, None).await
}

/// Like [`start`], with `api_keys` as the service reads them from its environment (entries of
/// `key` or `name key`, comma-separated); they count when `config.auth.enabled`.
pub async fn start_with_api_keys(
    config: Config,
    redis_url: &str,
    mongodb_url: &str,
    api_keys: Option<&str>,
) -> TestService {
    let secrets = Secrets {
        redis_url: redis_url.into(),
        mongodb_uri: mongodb_url.into(),
        backend_api_keys: config.backends.iter().map(|_| None).collect(),
        api_keys: api_keys.map(str::to_string),
    };
    let config_limits = config.limits.clone();
    let state = AppState::new(config, secrets).await.expect("state");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    // Behind the binary's own listener: the peer address (trusted proxies, per-IP limits), the
    // connection limits and its keep-alive handling.
    let limits = chat_service::server::ConnectionLimits::from(&config_limits);
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(chat_service::server::serve(
        listener,
        chat_service::router(state.clone()),
        limits,
        stop.clone(),
    ));
    TestService {
        base,
        state,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(600))
            .build()
            .unwrap(),
        stop,
    }
}

/// The service on the shared rig's stores.
pub async fn start_on_rig() -> TestService {
    let rig = rig();
    start(test_config(rig), rig.redis_url(), rig.mongodb_url()).await
}

impl TestService {
    /// The Redis key of a session's recent-turns copy.
    pub fn recent_key(&self, session: &str) -> String {
        format!(
            "{}:session:{session}:recent",
            self.state.config.history.redis.key_prefix
        )
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post_json(
        &self,
        path: &str,
        body: &Value,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let response = self
            .http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        let value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
        (status, headers, value)
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics_text(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let response = self.http.get(self.url(path)).send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
        (status, value)
    }

    /// Every stored message of a session, following the cursor.
    pub async fn all_messages(&self, session: &str) -> Vec<Value> {
        let mut messages = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(c) => format!("/v1/sessions/{session}/messages?limit=37&cursor={c}"),
                None => format!("/v1/sessions/{session}/messages?limit=37"),
            };
            let (status, page) = self.get_json(&path).await;
            assert_eq!(status, 200, "{page}");
            messages.extend(page["messages"].as_array().unwrap().iter().cloned());
            match page["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_string()),
                None => return messages,
            }
        }
    }
}

/// The interpreter for the `openai` client test: `CHATOP_PYTHON`, else the rig's venv.
pub fn python() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("CHATOP_PYTHON") {
        return path.into();
    }
    match chat_rig::paths::python() {
        Ok(path) => path,
        Err(e) => panic!(
            "the OpenAI SDK test needs a Python with the `openai` package: set CHATOP_PYTHON ({e})"
        ),
    }
}

pub fn assert_error(status: u16, body: &Value, expected_status: u16, expected_code: &str) {
    assert_eq!(status, expected_status, "{body}");
    assert_eq!(body["error"]["code"], expected_code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

pub fn exists(path: &Path) -> bool {
    path.exists()
}

/// Test fixture, not a mock of Ollama: a transparent HTTP proxy in front of the real Ollama that
/// only counts the generation calls (`POST /api/chat`) passing through it, records their
/// request bodies, and records each answer's `prompt_eval_count` (the model's own count of the
/// context it was sent), so that a test can tell how often and with what the service went
/// upstream.
pub struct OllamaCallCountingProxy {
    pub url: String,
    chat_calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    chat_bodies: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
    prompt_counts: std::sync::Arc<std::sync::Mutex<Vec<u64>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for OllamaCallCountingProxy {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl OllamaCallCountingProxy {
    pub async fn start(upstream: &str) -> Self {
        Self::start_with_fault(upstream, None).await
    }

    /// Like [`OllamaCallCountingProxy::start`], with a mock of one thing: a generation call whose
    /// body contains `marker` (e.g. the summarisation prompt) fails with a 500 instead of
    /// reaching Ollama; it is counted and recorded like the others. Every other call passes
    /// through to the real Ollama.
    pub async fn start_failing_calls_containing(upstream: &str, marker: &str) -> Self {
        Self::start_with_fault(upstream, Some(marker.to_string())).await
    }

    async fn start_with_fault(upstream: &str, fail_marker: Option<String>) -> Self {
        use axum::body::{Body, Bytes};
        use axum::extract::State;
        use axum::http::{Method, Uri};
        use futures::StreamExt;
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};

        #[derive(Clone)]
        struct Forward {
            upstream: String,
            client: reqwest::Client,
            chat_calls: Arc<AtomicUsize>,
            chat_bodies: Arc<std::sync::Mutex<Vec<Value>>>,
            prompt_counts: Arc<std::sync::Mutex<Vec<u64>>>,
            fail_marker: Option<String>,
        }
        async fn forward(
            State(forward): State<Forward>,
            method: Method,
            uri: Uri,
            body: Bytes,
        ) -> axum::response::Response {
            let chat = method == Method::POST && uri.path() == "/api/chat";
            if chat {
                forward.chat_calls.fetch_add(1, Ordering::SeqCst);
                let recorded = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let marked = forward.fail_marker.as_deref().is_some_and(|marker| {
                    recorded["messages"].as_array().is_some_and(|messages| {
                        messages
                            .iter()
                            .any(|m| m["content"].as_str().is_some_and(|c| c.contains(marker)))
                    })
                });
                forward.chat_bodies.lock().unwrap().push(recorded);
                if marked {
                    let mut response = axum::response::Response::new(Body::from(
                        r#"{"error":"injected failure of this call (test fixture)"}"#,
                    ));
                    *response.status_mut() = axum::http::StatusCode::INTERNAL_SERVER_ERROR;
                    return response;
                }
            }
            let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
            let upstream = forward
                .client
                .request(method, format!("{}{path}", forward.upstream))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .expect("the real Ollama answers");
            let status = upstream.status();
            // The answer passes through as it streams; its prompt_eval_count is recorded as the
            // bytes holding it go by (before the client gets them), once per answer.
            let mut seen = Vec::new();
            let mut counts = chat.then(|| forward.prompt_counts.clone());
            let stream = upstream.bytes_stream().inspect(move |chunk| {
                if let (Ok(bytes), Some(_)) = (chunk, &counts) {
                    seen.extend_from_slice(bytes);
                    if let Some(count) = prompt_eval_count(&seen) {
                        counts.take().unwrap().lock().unwrap().push(count);
                    }
                }
            });
            let mut response = axum::response::Response::new(Body::from_stream(stream));
            *response.status_mut() = status;
            response
        }

        let chat_calls = Arc::new(AtomicUsize::new(0));
        let chat_bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
        let prompt_counts = Arc::new(std::sync::Mutex::new(Vec::new()));
        let app = axum::Router::new().fallback(forward).with_state(Forward {
            upstream: upstream.trim_end_matches('/').to_string(),
            client: reqwest::Client::new(),
            chat_calls: chat_calls.clone(),
            chat_bodies: chat_bodies.clone(),
            prompt_counts: prompt_counts.clone(),
            fail_marker,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            url,
            chat_calls,
            chat_bodies,
            prompt_counts,
            server,
        }
    }

    /// The `prompt_eval_count` of each `POST /api/chat` answer so far, in order.
    pub fn prompt_counts(&self) -> Vec<u64> {
        self.prompt_counts.lock().unwrap().clone()
    }

    /// The bodies of the `POST /api/chat` calls so far, in order.
    pub fn chat_bodies(&self) -> Vec<Value> {
        self.chat_bodies.lock().unwrap().clone()
    }

    /// `POST /api/chat` calls that reached Ollama so far.
    pub fn chat_calls(&self) -> usize {
        self.chat_calls.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// The `prompt_eval_count` of an Ollama answer read so far (`bytes`): of the whole JSON
/// document, or of a complete NDJSON line of a streamed one; `None` until it has gone by.
fn prompt_eval_count(bytes: &[u8]) -> Option<u64> {
    let count = |v: Value| v["prompt_eval_count"].as_u64();
    if let Ok(whole) = serde_json::from_slice::<Value>(bytes) {
        return count(whole);
    }
    let complete = &bytes[..bytes.iter().rposition(|b| *b == b'\n')? + 1];
    complete
        .split(|b| *b == b'\n')
        .filter_map(|line| serde_json::from_slice::<Value>(line).ok())
        .find_map(count)
}

/// The value of a metric line (`name{labels} value`) in `/metrics` text, 0 when absent.
pub fn metric_value(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name_and_labels)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|value| value.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// Tokens charged to `user` (`rateLimit.keyBy: user`) right now, read from the limiter's key
/// in Redis: how far its theoretical arrival time is ahead of Redis's clock, in tokens.
pub async fn charged_tokens(service: &TestService, user: &str) -> f64 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(user.as_bytes());
    let key = format!(
        "{}:ratelimit:user:{}:tokens",
        service.state.config.history.redis.key_prefix,
        hex::encode(&digest[..8])
    );
    let client = redis::Client::open(rig().redis_url()).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let tat: Option<f64> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    let (seconds, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut redis).await.unwrap();
    let now_ms = (seconds * 1_000 + micros / 1_000) as f64;
    let limits = &service.state.config.rate_limit;
    let window_ms = limits.window_seconds as f64 * 1_000.0;
    tat.map_or(0.0, |tat| {
        (tat - now_ms).max(0.0) * limits.tokens_per_window as f64 / window_ms
    })
}
