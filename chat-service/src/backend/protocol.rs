//! One generation request on one endpoint: the request body per protocol, and the streamed
//! answer (Ollama's NDJSON, OpenAI's SSE) parsed into [`Chunk`]s.

use std::time::Duration;

use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::time::timeout_at;

use super::error::EndpointError;
use super::generation::{Chunk, ChunkStream, GenerationRequest, Usage};
use crate::config::Protocol;

/// Where a request goes: one endpoint's base URL, protocol and key.
pub(super) struct Target<'a> {
    pub base_url: &'a str,
    pub protocol: Protocol,
    pub api_key: Option<&'a str>,
}

/// The model-listing path that active health checks ask for.
pub(super) fn health_path(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Ollama => "/api/tags",
        Protocol::Openai => "/v1/models",
    }
}

/// Sends the request for `model` and returns its chunks; errors before the response head
/// (connection refused, non-2xx status) come back here, later ones in the stream.
pub(super) async fn open(
    client: &reqwest::Client,
    target: &Target<'_>,
    model: &str,
    request: &GenerationRequest<'_>,
    deadline: tokio::time::Instant,
    total_timeout: Duration,
) -> Result<ChunkStream, EndpointError> {
    let (path, mut body) = match target.protocol {
        Protocol::Ollama => (
            "/api/chat",
            json!({
                "model": model,
                "messages": request.messages,
                "stream": true,
                "options": { "num_predict": request.max_tokens },
            }),
        ),
        Protocol::Openai => (
            "/v1/chat/completions",
            json!({
                "model": model,
                "messages": request.messages,
                "stream": true,
                "max_tokens": request.max_tokens,
                "stream_options": { "include_usage": true },
            }),
        ),
    };
    if let Some(temperature) = request.temperature {
        match target.protocol {
            Protocol::Ollama => body["options"]["temperature"] = json!(temperature),
            Protocol::Openai => body["temperature"] = json!(temperature),
        }
    }
    let mut http = client
        .post(format!("{}{path}", target.base_url))
        .header("x-request-id", request.request_id)
        .json(&body);
    if let Some(key) = target.api_key {
        http = http.bearer_auth(key);
    }
    let response = http.send().await?;
    if !response.status().is_success() {
        let status = response.status().as_u16();
        let body = response.text().await.unwrap_or_default();
        return Err(EndpointError::Status {
            status,
            body: body.chars().take(300).collect(),
        });
    }
    let lines = lines(response.bytes_stream());
    let protocol = target.protocol;
    let chunks = async_stream::stream! {
        let mut lines = std::pin::pin!(lines);
        let mut pending_finish: Option<String> = None;
        let mut tokens_seen = 0u32;
        loop {
            let line = match timeout_at(deadline, lines.next()).await {
                Err(_) => { yield Err(EndpointError::TotalTimeout(total_timeout)); return; }
                Ok(None) => {
                    // OpenAI servers that ignore `include_usage` end with [DONE] only.
                    if let Some(finish_reason) = pending_finish.take() {
                        yield Ok(Chunk::Done { usage: Usage::new(0, tokens_seen), finish_reason });
                    } else {
                        yield Err(EndpointError::Truncated);
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

/// Splits a byte stream into lines (NDJSON and SSE are both line-based).
fn lines(
    bytes: impl Stream<Item = Result<bytes::Bytes, reqwest::Error>> + Send + 'static,
) -> impl Stream<Item = Result<String, EndpointError>> + Send {
    async_stream::stream! {
        let mut bytes = std::pin::pin!(bytes);
        let mut buffer: Vec<u8> = Vec::new();
        while let Some(next) = bytes.next().await {
            match next {
                Ok(data) => buffer.extend_from_slice(&data),
                Err(e) => { yield Err(EndpointError::Http(e)); return; }
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

fn parse_ollama_line(line: &str) -> Result<Option<Chunk>, EndpointError> {
    let parsed: OllamaLine =
        serde_json::from_str(line).map_err(|e| EndpointError::Malformed(e.to_string()))?;
    if let Some(error) = parsed.error {
        return Err(EndpointError::Malformed(error));
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
) -> Result<Option<Chunk>, EndpointError> {
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
        serde_json::from_str(data).map_err(|e| EndpointError::Malformed(e.to_string()))?;
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
