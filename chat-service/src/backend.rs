//! LLM back ends speaking Ollama's protocol or OpenAI's, behind one pooled HTTP client. A turn
//! tries the back ends in configured order until one produces a first token.

use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::time::timeout_at;

use crate::config::{BackendConfig, Config, Protocol, RoutingConfig};
use crate::error::AppError;
use crate::history::ContextMessage;
use crate::metrics::{BackendLabels, Metrics};

/// Token counts the back end reported for one generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

impl Usage {
    fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Chunk {
    Token(String),
    /// The generation ended; `finish_reason` is `stop` or `length` as OpenAI spells them.
    Done {
        usage: Usage,
        finish_reason: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    #[error("status {status}: {body}")]
    Status { status: u16, body: String },
    #[error("malformed stream: {0}")]
    Malformed(String),
    #[error("no first token within {0:?}")]
    FirstTokenTimeout(Duration),
    #[error("generation exceeded {0:?}")]
    TotalTimeout(Duration),
    #[error("stream ended without a final message")]
    Truncated,
}

pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<Chunk, BackendError>> + Send>>;

/// A generation that has produced its first chunk; the rest follows from `rest`.
pub struct Generation {
    pub backend: String,
    pub first: Chunk,
    pub rest: ChunkStream,
}

pub struct GenerationRequest<'a> {
    pub model: &'a str,
    pub messages: &'a [ContextMessage],
    pub max_tokens: u32,
    /// Sampling temperature; the back end's default when `None`.
    pub temperature: Option<f32>,
    pub request_id: &'a str,
}

struct Backend {
    name: String,
    base_url: String,
    protocol: Protocol,
    api_key: Option<String>,
    models: Vec<String>,
}

pub struct BackendPool {
    backends: Vec<Backend>,
    client: reqwest::Client,
    routing: RoutingConfig,
}

impl BackendPool {
    /// `api_keys` holds, per back end in order, the key read from its `apiKeyEnv`.
    pub fn new(config: &Config, api_keys: Vec<Option<String>>) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(config.routing.connect_timeout_ms))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()?;
        let backends = config
            .backends
            .iter()
            .zip(api_keys)
            .map(|(b, api_key): (&BackendConfig, _)| Backend {
                name: b.name.clone(),
                base_url: b.url.trim_end_matches('/').to_string(),
                protocol: b.protocol,
                api_key,
                models: b.models.clone(),
            })
            .collect();
        Ok(Self {
            backends,
            client,
            routing: config.routing.clone(),
        })
    }

    /// Starts a generation on the first back end that answers with a first token in time.
    pub async fn start(
        &self,
        request: &GenerationRequest<'_>,
        metrics: &Metrics,
    ) -> Result<Generation, AppError> {
        let first_token_timeout = Duration::from_millis(self.routing.first_token_timeout_ms);
        let total_timeout = Duration::from_millis(self.routing.total_timeout_ms);
        let mut failures = Vec::new();
        let mut timed_out = false;
        let candidates = self
            .backends
            .iter()
            .filter(|b| b.models.is_empty() || b.models.iter().any(|m| m == request.model))
            .take(self.routing.max_attempts as usize);
        for backend in candidates {
            let started = Instant::now();
            let deadline = tokio::time::Instant::now() + total_timeout;
            let attempt = async {
                let mut stream = backend
                    .open(&self.client, request, deadline, total_timeout)
                    .await?;
                match stream.next().await {
                    Some(first) => Ok((first?, stream)),
                    None => Err(BackendError::Truncated),
                }
            };
            match tokio::time::timeout(first_token_timeout, attempt).await {
                Ok(Ok((first, rest))) => {
                    metrics
                        .time_to_first_token
                        .get_or_create(&BackendLabels {
                            backend: backend.name.clone(),
                        })
                        .observe(started.elapsed().as_secs_f64());
                    return Ok(Generation {
                        backend: backend.name.clone(),
                        first,
                        rest,
                    });
                }
                Ok(Err(e)) => {
                    tracing::warn!(backend = %backend.name, error = %e, "back end failed");
                    failures.push(format!("{}: {e}", backend.name));
                }
                Err(_) => {
                    timed_out = true;
                    let e = BackendError::FirstTokenTimeout(first_token_timeout);
                    tracing::warn!(backend = %backend.name, error = %e, "back end timed out");
                    failures.push(format!("{}: {e}", backend.name));
                }
            }
        }
        if failures.is_empty() {
            return Err(AppError::BackendUnavailable(format!(
                "no back end serves model `{}`",
                request.model
            )));
        }
        let detail = failures.join("; ");
        Err(if timed_out {
            AppError::BackendTimeout(detail)
        } else {
            AppError::BackendUnavailable(detail)
        })
    }

    /// Per back end, whether it answers its model-listing endpoint.
    pub async fn health(&self) -> Vec<(String, bool)> {
        let checks = self.backends.iter().map(|backend| async move {
            let path = match backend.protocol {
                Protocol::Ollama => "/api/tags",
                Protocol::Openai => "/v1/models",
            };
            let mut request = self
                .client
                .get(format!("{}{path}", backend.base_url))
                .timeout(Duration::from_secs(2));
            if let Some(key) = &backend.api_key {
                request = request.bearer_auth(key);
            }
            let healthy = matches!(request.send().await, Ok(r) if r.status().is_success());
            (backend.name.clone(), healthy)
        });
        futures::future::join_all(checks).await
    }
}

impl Backend {
    async fn open(
        &self,
        client: &reqwest::Client,
        request: &GenerationRequest<'_>,
        deadline: tokio::time::Instant,
        total_timeout: Duration,
    ) -> Result<ChunkStream, BackendError> {
        let (path, mut body) = match self.protocol {
            Protocol::Ollama => (
                "/api/chat",
                json!({
                    "model": request.model,
                    "messages": request.messages,
                    "stream": true,
                    "options": { "num_predict": request.max_tokens },
                }),
            ),
            Protocol::Openai => (
                "/v1/chat/completions",
                json!({
                    "model": request.model,
                    "messages": request.messages,
                    "stream": true,
                    "max_tokens": request.max_tokens,
                    "stream_options": { "include_usage": true },
                }),
            ),
        };
        if let Some(temperature) = request.temperature {
            match self.protocol {
                Protocol::Ollama => body["options"]["temperature"] = json!(temperature),
                Protocol::Openai => body["temperature"] = json!(temperature),
            }
        }
        let mut http = client
            .post(format!("{}{path}", self.base_url))
            .header("x-request-id", request.request_id)
            .json(&body);
        if let Some(key) = &self.api_key {
            http = http.bearer_auth(key);
        }
        let response = http.send().await?;
        if !response.status().is_success() {
            let status = response.status().as_u16();
            let body = response.text().await.unwrap_or_default();
            return Err(BackendError::Status {
                status,
                body: body.chars().take(300).collect(),
            });
        }
        let lines = lines(response.bytes_stream());
        let protocol = self.protocol;
        let chunks = async_stream::stream! {
            let mut lines = std::pin::pin!(lines);
            let mut pending_finish: Option<String> = None;
            let mut tokens_seen = 0u32;
            loop {
                let line = match timeout_at(deadline, lines.next()).await {
                    Err(_) => { yield Err(BackendError::TotalTimeout(total_timeout)); return; }
                    Ok(None) => {
                        // OpenAI servers that ignore `include_usage` end with [DONE] only.
                        if let Some(finish_reason) = pending_finish.take() {
                            yield Ok(Chunk::Done { usage: Usage::new(0, tokens_seen), finish_reason });
                        } else {
                            yield Err(BackendError::Truncated);
                        }
                        return;
                    }
                    Ok(Some(Err(e))) => { yield Err(e); return; }
                    Ok(Some(Ok(line))) => line,
                };
                let parsed = match protocol {
                    Protocol::Ollama => parse_ollama_line(&line),
                    Protocol::Openai => parse_openai_line(&line, &mut pending_finish),
                };
                match parsed {
                    Ok(Some(chunk)) => {
                        let done = matches!(chunk, Chunk::Done { .. });
                        if !done { tokens_seen += 1; }
                        yield Ok(chunk);
                        if done { return; }
                    }
                    Ok(None) => {}
                    Err(e) => { yield Err(e); return; }
                }
            }
        };
        Ok(Box::pin(chunks))
    }
}

/// Splits a byte stream into lines (NDJSON and SSE are both line-based).
fn lines(
    bytes: impl Stream<Item = Result<bytes::Bytes, reqwest::Error>> + Send + 'static,
) -> impl Stream<Item = Result<String, BackendError>> + Send {
    async_stream::stream! {
        let mut bytes = std::pin::pin!(bytes);
        let mut buffer: Vec<u8> = Vec::new();
        while let Some(next) = bytes.next().await {
            match next {
                Ok(data) => buffer.extend_from_slice(&data),
                Err(e) => { yield Err(BackendError::Http(e)); return; }
            }
            while let Some(end) = buffer.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buffer.drain(..=end).collect();
                let text = String::from_utf8_lossy(&line).trim_end_matches(['\r', '\n']).to_string();
                if !text.is_empty() {
                    yield Ok(text);
                }
            }
        }
        if !buffer.is_empty() {
            yield Ok(String::from_utf8_lossy(&buffer).trim().to_string());
        }
    }
}

#[derive(Deserialize)]
struct OllamaLine {
    #[serde(default)]
    message: Option<OllamaMessage>,
    #[serde(default)]
    done: bool,
    #[serde(default)]
    done_reason: Option<String>,
    #[serde(default)]
    prompt_eval_count: u32,
    #[serde(default)]
    eval_count: u32,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct OllamaMessage {
    #[serde(default)]
    content: String,
}

fn parse_ollama_line(line: &str) -> Result<Option<Chunk>, BackendError> {
    let parsed: OllamaLine =
        serde_json::from_str(line).map_err(|e| BackendError::Malformed(e.to_string()))?;
    if let Some(error) = parsed.error {
        return Err(BackendError::Malformed(error));
    }
    if parsed.done {
        let finish_reason = match parsed.done_reason.as_deref() {
            Some("length") => "length",
            _ => "stop",
        };
        return Ok(Some(Chunk::Done {
            usage: Usage::new(parsed.prompt_eval_count, parsed.eval_count),
            finish_reason: finish_reason.into(),
        }));
    }
    Ok(parsed
        .message
        .map(|m| m.content)
        .filter(|c| !c.is_empty())
        .map(Chunk::Token))
}

#[derive(Deserialize)]
struct OpenAiChunk {
    #[serde(default)]
    choices: Vec<OpenAiChoice>,
    #[serde(default)]
    usage: Option<OpenAiUsage>,
}

#[derive(Deserialize)]
struct OpenAiChoice {
    #[serde(default)]
    delta: Option<OpenAiDelta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct OpenAiDelta {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct OpenAiUsage {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
}

/// One SSE line of an OpenAI stream. The finish reason arrives before the usage chunk, so it is
/// held in `pending_finish` until usage (or the end of the stream) arrives.
fn parse_openai_line(
    line: &str,
    pending_finish: &mut Option<String>,
) -> Result<Option<Chunk>, BackendError> {
    let Some(data) = line.strip_prefix("data:") else {
        return Ok(None); // comments, `event:` and `id:` lines
    };
    let data = data.trim();
    if data == "[DONE]" {
        return Ok(Some(Chunk::Done {
            usage: Usage::default(),
            finish_reason: pending_finish.take().unwrap_or_else(|| "stop".into()),
        }));
    }
    let parsed: OpenAiChunk =
        serde_json::from_str(data).map_err(|e| BackendError::Malformed(e.to_string()))?;
    if let Some(usage) = parsed.usage {
        return Ok(Some(Chunk::Done {
            usage: Usage::new(usage.prompt_tokens, usage.completion_tokens),
            finish_reason: pending_finish.take().unwrap_or_else(|| "stop".into()),
        }));
    }
    let mut text = String::new();
    for choice in parsed.choices {
        if let Some(reason) = choice.finish_reason {
            *pending_finish = Some(reason);
        }
        if let Some(content) = choice.delta.and_then(|d| d.content) {
            text.push_str(&content);
        }
    }
    Ok((!text.is_empty()).then_some(Chunk::Token(text)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ollama_lines_parse_to_tokens_and_usage() {
        let token =
            parse_ollama_line(r#"{"message":{"role":"assistant","content":"Hi"},"done":false}"#);
        assert_eq!(token.unwrap(), Some(Chunk::Token("Hi".into())));
        let done = parse_ollama_line(
            r#"{"message":{"role":"assistant","content":""},"done":true,"done_reason":"length","prompt_eval_count":12,"eval_count":4}"#,
        );
        assert_eq!(
            done.unwrap(),
            Some(Chunk::Done {
                usage: Usage::new(12, 4),
                finish_reason: "length".into()
            })
        );
    }

    #[test]
    fn openai_stream_holds_finish_reason_until_usage() {
        let mut pending = None;
        let token = parse_openai_line(
            r#"data: {"choices":[{"delta":{"content":"a"}}]}"#,
            &mut pending,
        );
        assert_eq!(token.unwrap(), Some(Chunk::Token("a".into())));
        let finish = parse_openai_line(
            r#"data: {"choices":[{"delta":{},"finish_reason":"length"}]}"#,
            &mut pending,
        );
        assert_eq!(finish.unwrap(), None);
        let usage = parse_openai_line(
            r#"data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}"#,
            &mut pending,
        );
        assert_eq!(
            usage.unwrap(),
            Some(Chunk::Done {
                usage: Usage::new(7, 3),
                finish_reason: "length".into()
            })
        );
        assert_eq!(
            parse_openai_line(": keep-alive", &mut pending).unwrap(),
            None
        );
    }
}
