//! One generation request on one endpoint: the request body per protocol, and the answer parsed
//! into [`Chunk`]s: streamed (Ollama's NDJSON, OpenAI's SSE) when the turn streams, or one JSON
//! document when it does not ([`GenerationRequest::stream`]). A whole answer is one read and one
//! parse instead of one per token; a server that streams anyway (content type NDJSON or SSE) is
//! decoded as a stream.

use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::time::timeout_at;

use super::error::EndpointError;
use super::generation::{Chunk, ChunkStream, GenerationRequest, Usage};
use super::wire::{
    OllamaToolCall, OpenAiToolCall, StreamedToolCalls, WireMessages, WireTool, wire_tools,
};
use crate::config::Protocol;
use crate::conversation::OutputFormat;
use crate::tools::ToolCall;

/// Where a request goes: one endpoint's base URL, protocol and key.
pub(super) struct Target<'a> {
    pub base_url: &'a str,
    /// The generation URL (`/api/chat` or `/v1/chat/completions`), parsed once per endpoint.
    pub chat_url: &'a reqwest::Url,
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

/// The generation path of a protocol.
pub(super) fn chat_path(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Ollama => "/api/chat",
        Protocol::Openai => "/v1/chat/completions",
    }
}

/// The request body, typed and borrowed, serialised straight into the request's buffer (no
/// `serde_json::Value` tree in between). Ollama nests its sampling options; OpenAI does not.
#[derive(Serialize)]
struct RequestBody<'a> {
    model: &'a str,
    messages: WireMessages<'a>,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
    #[serde(skip_serializing_if = "Option::is_none")]
    options: Option<OllamaOptions<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
    /// OpenAI's output format.
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<serde_json::Value>,
    /// Ollama's output format: `"json"` or a JSON schema.
    #[serde(skip_serializing_if = "Option::is_none")]
    format: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<WireTool<'a>>,
    /// OpenAI only; Ollama has no such option.
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<serde_json::Value>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Serialize)]
struct OllamaOptions<'a> {
    num_predict: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
}

fn request_body<'a>(
    protocol: Protocol,
    model: &'a str,
    request: &'a GenerationRequest<'_>,
) -> RequestBody<'a> {
    let sampling = request.sampling;
    let (tools, tool_choice) = wire_tools(protocol, &sampling.tools, &sampling.tool_choice);
    let mut body = RequestBody {
        model,
        messages: WireMessages {
            protocol,
            messages: request.messages,
        },
        stream: request.stream,
        max_tokens: None,
        temperature: None,
        stream_options: None,
        options: None,
        top_p: None,
        seed: None,
        stop: &[],
        response_format: None,
        format: None,
        tools,
        tool_choice,
    };
    // The client's sampling options in the protocol's own fields: Ollama takes `top_p`, `seed`
    // and `stop` among its `options` and the output format as `format` (`"json"` or a JSON
    // schema); OpenAI servers take them as the client sent them. Unset options are left out,
    // so that the back end's defaults apply.
    match protocol {
        Protocol::Ollama => {
            body.options = Some(OllamaOptions {
                num_predict: request.max_tokens,
                temperature: request.temperature,
                top_p: sampling.top_p,
                seed: sampling.seed,
                stop: &sampling.stop,
            });
            body.format = match &sampling.format {
                OutputFormat::Text => None,
                OutputFormat::JsonObject => Some(json!("json")),
                OutputFormat::JsonSchema { schema, .. } => Some(schema.clone()),
            };
        }
        Protocol::Openai => {
            body.max_tokens = Some(request.max_tokens);
            body.temperature = request.temperature;
            body.top_p = sampling.top_p;
            body.seed = sampling.seed;
            body.stop = &sampling.stop;
            body.response_format = match &sampling.format {
                OutputFormat::Text => None,
                OutputFormat::JsonObject => Some(json!({"type": "json_object"})),
                OutputFormat::JsonSchema {
                    name,
                    schema,
                    strict,
                } => Some(json!({
                    "type": "json_schema",
                    "json_schema": {"name": name, "schema": schema, "strict": strict},
                })),
            };
            if request.stream {
                body.stream_options = Some(StreamOptions {
                    include_usage: true,
                });
            }
        }
    }
    body
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
    let body = serde_json::to_vec(&request_body(target.protocol, model, request))
        .map_err(|e| EndpointError::Malformed(e.to_string()))?;
    let mut http = client
        .post(target.chat_url.clone())
        .header(reqwest::header::CONTENT_TYPE, APPLICATION_JSON)
        .header("x-request-id", request.request_id)
        .body(body);
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
    let protocol = target.protocol;
    if !request.stream && !is_streamed(&response) {
        let body = match timeout_at(deadline, response.bytes()).await {
            Err(_) => return Err(EndpointError::TotalTimeout(total_timeout)),
            Ok(body) => body?,
        };
        let chunks = decode_whole(protocol, &body)?;
        return Ok(Box::pin(futures::stream::iter(chunks.into_iter().map(Ok))));
    }
    let chunks = async_stream::stream! {
        let mut bytes = Box::pin(response.bytes_stream());
        let mut decoder = StreamDecoder::new(protocol);
        // One timer for the whole stream, not one per read.
        let expired = tokio::time::sleep_until(deadline);
        tokio::pin!(expired);
        let mut decoded = Vec::new();
        loop {
            let read = tokio::select! {
                biased;
                read = bytes.next() => read,
                () = &mut expired => {
                    yield Err(EndpointError::TotalTimeout(total_timeout));
                    return;
                }
            };
            match read {
                None => decoder.finish_into(&mut decoded),
                Some(Err(e)) => { yield Err(EndpointError::Http(e)); return; }
                Some(Ok(data)) => decoder.feed_into(&data, &mut decoded),
            }
            if decoder.ended() {
                if decoded.last().is_some_and(Result::is_ok) {
                    // Before the end goes out: the turn stops reading at it.
                    release_connection(bytes);
                }
                for item in decoded.drain(..) {
                    yield item;
                }
                return;
            }
            for item in decoded.drain(..) {
                yield item;
            }
        }
    };
    Ok(Box::pin(chunks))
}

/// Bytes a back end may still send after its answer's end (OpenAI's `[DONE]`, the chunked
/// body's last chunk) before its connection is given up rather than read to its end.
const DRAIN_LIMIT_BYTES: usize = 16 * 1024;
const DRAIN_LIMIT_TIME: Duration = Duration::from_secs(2);

/// Reads the rest of an answer whose end was decoded, so that the HTTP client sees the body
/// end and keeps the connection for the next request: a body dropped before its end closes
/// it, and every streamed turn would then pay a new connection on both sides. What is already
/// there is read at once; a rest still on its way is read by a task of its own.
fn release_connection<S>(mut bytes: std::pin::Pin<Box<S>>)
where
    S: futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send + 'static,
{
    use futures::FutureExt;
    let mut drained = 0;
    loop {
        match bytes.next().now_or_never() {
            Some(Some(Ok(data))) => {
                drained += data.len();
                if drained > DRAIN_LIMIT_BYTES {
                    return;
                }
            }
            // The body's end (the connection goes back to the pool), or an error.
            Some(None | Some(Err(_))) => return,
            None => break,
        }
    }
    tokio::spawn(async move {
        let _ = tokio::time::timeout(DRAIN_LIMIT_TIME, async {
            while let Some(Ok(data)) = bytes.next().await {
                drained += data.len();
                if drained > DRAIN_LIMIT_BYTES {
                    return;
                }
            }
        })
        .await;
    });
}

const APPLICATION_JSON: reqwest::header::HeaderValue =
    reqwest::header::HeaderValue::from_static("application/json");

/// Whether the response is a stream (NDJSON or SSE) whatever the request asked for.
fn is_streamed(response: &reqwest::Response) -> bool {
    response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("ndjson") || v.contains("event-stream"))
}

/// A whole (non-streamed) answer: its text as one token when not empty, its tool calls if any,
/// then the final chunk.
pub fn decode_whole(protocol: Protocol, body: &[u8]) -> Result<Vec<Chunk>, EndpointError> {
    let (text, tool_calls, done) = match protocol {
        Protocol::Ollama => {
            let parsed: OllamaLine = serde_json::from_slice(body)
                .map_err(|e| EndpointError::Malformed(e.to_string()))?;
            if let Some(error) = parsed.error {
                return Err(EndpointError::Malformed(error));
            }
            let message = parsed.message.unwrap_or_default();
            let tool_calls: Vec<ToolCall> =
                message.tool_calls.into_iter().map(ToolCall::from).collect();
            let done = Chunk::Done {
                usage: Usage::new(parsed.prompt_eval_count, parsed.eval_count),
                finish_reason: ollama_finish_reason(
                    parsed.done_reason.as_deref(),
                    !tool_calls.is_empty(),
                )
                .into(),
            };
            (message.content, tool_calls, done)
        }
        Protocol::Openai => {
            let parsed: OpenAiCompletion = serde_json::from_slice(body)
                .map_err(|e| EndpointError::Malformed(e.to_string()))?;
            let Some(choice) = parsed.choices.into_iter().next() else {
                return Err(EndpointError::Malformed("no choices in the answer".into()));
            };
            let usage = parsed
                .usage
                .map(|u| Usage::new(u.prompt_tokens, u.completion_tokens))
                .unwrap_or_default();
            let done = Chunk::Done {
                usage,
                finish_reason: choice.finish_reason.unwrap_or_else(|| "stop".into()),
            };
            let message = choice.message.unwrap_or_default();
            let tool_calls = message
                .tool_calls
                .unwrap_or_default()
                .into_iter()
                .map(ToolCall::from)
                .collect();
            (message.content.unwrap_or_default(), tool_calls, done)
        }
    };
    let mut chunks = Vec::with_capacity(2);
    if !text.is_empty() {
        chunks.push(Chunk::Token(text));
    }
    if !tool_calls.is_empty() {
        chunks.push(Chunk::ToolCalls(tool_calls));
    }
    chunks.push(done);
    Ok(chunks)
}

/// Ollama ends an answer that called tools with `stop`; OpenAI's clients look for `tool_calls`.
fn ollama_finish_reason(done_reason: Option<&str>, called_tools: bool) -> &'static str {
    match done_reason {
        Some("length") => "length",
        _ if called_tools => "tool_calls",
        _ => "stop",
    }
}

/// Decodes a streamed answer (Ollama's NDJSON or OpenAI's SSE, both line-based) from the bytes
/// as they arrive, in whatever pieces the network delivers them, into [`Chunk`]s: tokens, then
/// one [`Chunk::Done`], or an error; nothing after either. Synchronous and free of I/O, so that
/// the fuzz targets (chat-service/fuzz) run exactly what a generation runs.
pub struct StreamDecoder {
    protocol: Protocol,
    /// Bytes of a line whose end has not arrived yet.
    partial: Vec<u8>,
    /// OpenAI: the finish reason, held until the usage chunk (or the end) arrives.
    pending_finish: Option<String>,
    /// Tool calls seen so far (OpenAI streams them in pieces, Ollama whole), handed on as one
    /// [`Chunk::ToolCalls`] just before the end.
    tool_calls: StreamedToolCalls,
    tokens_seen: u32,
    ended: bool,
}

impl StreamDecoder {
    pub fn new(protocol: Protocol) -> Self {
        Self {
            protocol,
            partial: Vec::new(),
            pending_finish: None,
            tool_calls: StreamedToolCalls::default(),
            tokens_seen: 0,
            ended: false,
        }
    }

    /// The chunks that `data`, appended to what came before, completes.
    pub fn feed(&mut self, data: &[u8]) -> Vec<Result<Chunk, EndpointError>> {
        let mut out = Vec::new();
        self.feed_into(data, &mut out);
        out
    }

    /// As [`feed`](Self::feed), appending to `out` (the stream reuses one buffer). Complete
    /// lines are parsed where they lie: in `data` itself when nothing was pending, so the
    /// bytes are copied only when a line spans reads.
    pub fn feed_into(&mut self, data: &[u8], out: &mut Vec<Result<Chunk, EndpointError>>) {
        if self.ended {
            return;
        }
        let mut data = data;
        if !self.partial.is_empty() {
            // Finish the pending line first.
            let Some(offset) = data.iter().position(|&b| b == b'\n') else {
                self.partial.extend_from_slice(data);
                return;
            };
            let mut line = std::mem::take(&mut self.partial);
            line.extend_from_slice(&data[..offset]);
            data = &data[offset + 1..];
            self.one_line(&line, out);
            line.clear();
            self.partial = line; // keeps its capacity
            if self.ended {
                return;
            }
        }
        while let Some(offset) = data.iter().position(|&b| b == b'\n') {
            let (line, rest) = (&data[..offset], &data[offset + 1..]);
            data = rest;
            self.one_line(line, out);
            if self.ended {
                return;
            }
        }
        self.partial.extend_from_slice(data);
    }

    /// One complete line (without its `\n`).
    fn one_line(&mut self, line: &[u8], out: &mut Vec<Result<Chunk, EndpointError>>) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches('\r');
        if !text.is_empty() {
            let item = self.line(text);
            self.push(item, out);
        }
    }

    /// The stream ended: its last line if it had no newline, then the end itself (a held
    /// finish reason, else [`EndpointError::Truncated`]).
    pub fn finish(&mut self) -> Vec<Result<Chunk, EndpointError>> {
        let mut out = Vec::new();
        self.finish_into(&mut out);
        out
    }

    /// As [`finish`](Self::finish), appending to `out`.
    pub fn finish_into(&mut self, out: &mut Vec<Result<Chunk, EndpointError>>) {
        if self.ended {
            return;
        }
        let rest = std::mem::take(&mut self.partial);
        let text = String::from_utf8_lossy(&rest);
        let text = text.trim();
        if !text.is_empty() {
            let item = self.line(text);
            self.push(item, out);
        }
        if !self.ended {
            // OpenAI servers that ignore `include_usage` end with [DONE] only.
            let end = match self.pending_finish.take() {
                Some(finish_reason) => Ok(Some(Chunk::Done {
                    usage: Usage::new(0, self.tokens_seen),
                    finish_reason,
                })),
                None => Err(EndpointError::Truncated),
            };
            self.push(end, out);
            self.ended = true;
        }
    }

    /// Whether the stream is over (done or failed): nothing more will be decoded.
    pub fn ended(&self) -> bool {
        self.ended
    }

    fn line(&mut self, line: &str) -> Result<Option<Chunk>, EndpointError> {
        match self.protocol {
            Protocol::Ollama => parse_ollama_line(line, &mut self.tool_calls),
            Protocol::Openai => {
                parse_openai_line(line, &mut self.pending_finish, &mut self.tool_calls)
            }
        }
    }

    fn push(
        &mut self,
        item: Result<Option<Chunk>, EndpointError>,
        out: &mut Vec<Result<Chunk, EndpointError>>,
    ) {
        match item {
            Ok(Some(mut chunk)) => {
                if let Chunk::Done { finish_reason, .. } = &mut chunk {
                    self.ended = true;
                    let tool_calls = self.tool_calls.take();
                    if !tool_calls.is_empty() {
                        if self.protocol == Protocol::Ollama && finish_reason == "stop" {
                            *finish_reason = "tool_calls".into();
                        }
                        out.push(Ok(Chunk::ToolCalls(tool_calls)));
                    }
                } else {
                    self.tokens_seen += 1;
                }
                out.push(Ok(chunk));
            }
            Ok(None) => {}
            Err(e) => {
                self.ended = true;
                out.push(Err(e));
            }
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

#[derive(Deserialize, Default)]
struct OllamaMessage {
    #[serde(default)]
    content: String,
    #[serde(default)]
    tool_calls: Vec<OllamaToolCall>,
}

fn parse_ollama_line(
    line: &str,
    tool_calls: &mut StreamedToolCalls,
) -> Result<Option<Chunk>, EndpointError> {
    let parsed: OllamaLine =
        serde_json::from_str(line).map_err(|e| EndpointError::Malformed(e.to_string()))?;
    if let Some(error) = parsed.error {
        return Err(EndpointError::Malformed(error));
    }
    let message = parsed.message.unwrap_or_default();
    for call in message.tool_calls {
        tool_calls.push(call.into());
    }
    if parsed.done {
        // A tool call's finish reason is set where the calls are handed on (`push`).
        let finish_reason = ollama_finish_reason(parsed.done_reason.as_deref(), false);
        return Ok(Some(Chunk::Done {
            usage: Usage::new(parsed.prompt_eval_count, parsed.eval_count),
            finish_reason: finish_reason.into(),
        }));
    }
    Ok((!message.content.is_empty()).then_some(Chunk::Token(message.content)))
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

#[derive(Deserialize, Default)]
struct OpenAiDelta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<OpenAiToolCall>>,
}

/// A non-streamed OpenAI answer: `choices[].message` instead of `choices[].delta`.
#[derive(Deserialize)]
struct OpenAiCompletion {
    #[serde(default)]
    choices: Vec<OpenAiWholeChoice>,
    #[serde(default)]
    usage: Option<OpenAiUsage>,
}

#[derive(Deserialize)]
struct OpenAiWholeChoice {
    #[serde(default)]
    message: Option<OpenAiDelta>,
    #[serde(default)]
    finish_reason: Option<String>,
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
    tool_calls: &mut StreamedToolCalls,
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
        let delta = choice.delta.unwrap_or_default();
        if let Some(content) = delta.content {
            text.push_str(&content);
        }
        for piece in delta.tool_calls.unwrap_or_default() {
            tool_calls.add(piece);
        }
    }
    Ok((!text.is_empty()).then_some(Chunk::Token(text)))
}

#[cfg(test)]
mod tests;
