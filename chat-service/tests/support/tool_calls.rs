//! Test fixture `OllamaScriptedToolCall`, not a mock of Ollama: a proxy in front of the real
//! Ollama that passes every request through to it, records each `POST /api/chat` body, and
//! replaces one kind of answer only.
//!
//! The rig's models have chat templates without tools, and Ollama refuses `tools` for them
//! ("does not support tools"). The fixture therefore first creates, on the real Ollama, a variant
//! of the rig's chat model ([`TOOLS_MODEL`], from `chat_rig::paths::CHAT_MODEL`: the same weights,
//! no download) whose template renders the offered tools, past calls and results into the prompt,
//! so that Ollama accepts and uses them.
//! When a request offers `tools` and does not end with a tool
//! result, and the real model's answer (Ollama accepted the request: its status is recorded)
//! holds no tool call, the fixture answers instead with one call of the first tool, in Ollama's
//! own wire shape (arguments as a JSON object, no id), streamed as NDJSON when the request
//! streams. The small model of the rig cannot be relied on to call a tool; everything else it
//! answers itself.

use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{Method, Uri};
use serde_json::{Value, json};

/// What one `POST /api/chat` (or `/v1/chat/completions`) went through.
#[derive(Debug, Clone)]
pub struct ChatCall {
    pub body: Value,
    /// The real Ollama's status for this request.
    pub ollama_status: u16,
    /// The fixture answered with its scripted tool call.
    pub scripted: bool,
}

pub struct OllamaScriptedToolCall {
    pub url: String,
    calls: Arc<Mutex<Vec<ChatCall>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for OllamaScriptedToolCall {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The tools-capable variant of the rig's chat model that the fixture creates.
pub const TOOLS_MODEL: &str = "chatop-tools-smollm2:135m";

/// A ChatML template (SmolLM2's) with the tools, the assistant's calls and the results in it;
/// the `<tool_call>` form is what Ollama parses calls from in the model's output.
const TOOLS_TEMPLATE: &str = concat!(
    "{{- if .Tools }}<|im_start|>system\n",
    "To call a tool answer only <tool_call>{\"name\": \"...\", \"arguments\": {...}}</tool_call>. Tools:\n",
    "{{ range .Tools }}{{ . }}\n{{ end }}<|im_end|>\n{{ end }}",
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ if .Content }}{{ .Content }}{{ end }}",
    "{{ if .ToolCalls }}<tool_call>{{ range .ToolCalls }}{\"name\": \"{{ .Function.Name }}\", ",
    "\"arguments\": {{ .Function.Arguments }}}{{ end }}</tool_call>{{ end }}<|im_end|>\n{{ end }}",
    "<|im_start|>assistant\n",
);

/// Creates [`TOOLS_MODEL`] on the Ollama at `ollama` (idempotent: the same name, base and
/// template give the same model).
pub async fn create_tools_model(ollama: &str) {
    let created = reqwest::Client::new()
        .post(format!("{}/api/create", ollama.trim_end_matches('/')))
        .json(
            &json!({"model": TOOLS_MODEL, "from": chat_rig::paths::CHAT_MODEL,
            "template": TOOLS_TEMPLATE, "stream": false}),
        )
        .send()
        .await
        .expect("the real Ollama answers");
    let status = created.status();
    let body = created.text().await.unwrap_or_default();
    assert!(
        status.is_success(),
        "creating {TOOLS_MODEL}: {status} {body}"
    );
}

/// The arguments the scripted call passes.
pub const SCRIPTED_ARGUMENTS: &str = r#"{"city":"Paris"}"#;

#[derive(Clone)]
struct Forward {
    upstream: String,
    client: reqwest::Client,
    calls: Arc<Mutex<Vec<ChatCall>>>,
}

fn wants_tool_call(body: &Value) -> Option<String> {
    let first_tool = body["tools"][0]["function"]["name"].as_str()?;
    let last_role = body["messages"].as_array()?.last()?["role"].as_str()?;
    (last_role != "tool").then(|| first_tool.to_string())
}

/// Whether an Ollama answer (whole or NDJSON) called a tool itself.
fn has_tool_call(answer: &[u8]) -> bool {
    answer
        .split(|b| *b == b'\n')
        .filter_map(|line| serde_json::from_slice::<Value>(line).ok())
        .any(|line| {
            line["message"]["tool_calls"]
                .as_array()
                .is_some_and(|c| !c.is_empty())
        })
}

fn scripted_answer(model: &str, tool: &str, stream: bool) -> (String, &'static str) {
    let arguments: Value = serde_json::from_str(SCRIPTED_ARGUMENTS).unwrap();
    let call = json!({"role": "assistant", "content": "",
        "tool_calls": [{"function": {"name": tool, "arguments": arguments}}]});
    if stream {
        let lines = [
            json!({"model": model, "message": call, "done": false}),
            json!({"model": model, "message": {"role": "assistant", "content": ""},
                "done": true, "done_reason": "stop", "prompt_eval_count": 20, "eval_count": 8}),
        ];
        let text = lines.iter().map(|l| format!("{l}\n")).collect();
        (text, "application/x-ndjson")
    } else {
        let whole = json!({"model": model, "message": call, "done": true,
            "done_reason": "stop", "prompt_eval_count": 20, "eval_count": 8});
        (whole.to_string(), "application/json")
    }
}

async fn forward(
    State(forward): State<Forward>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> axum::response::Response {
    // Ollama's own API, and its OpenAI-compatible one (recorded, never scripted).
    let native = uri.path() == "/api/chat";
    let chat = method == Method::POST && (native || uri.path() == "/v1/chat/completions");
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let upstream = forward
        .client
        .request(method, format!("{}{path}", forward.upstream))
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .expect("the real Ollama answers");
    let status = upstream.status();
    let content_type = upstream.headers().get("content-type").cloned();
    let answer = upstream.bytes().await.unwrap_or_default();
    let mut response = axum::response::Response::new(Body::from(answer.clone()));
    *response.status_mut() = status;
    if let Some(content_type) = content_type {
        response.headers_mut().insert("content-type", content_type);
    }
    if !chat {
        return response;
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let tool =
        wants_tool_call(&body).filter(|_| native && status.is_success() && !has_tool_call(&answer));
    forward.calls.lock().unwrap().push(ChatCall {
        body: body.clone(),
        ollama_status: status.as_u16(),
        scripted: tool.is_some(),
    });
    let Some(tool) = tool else {
        return response;
    };
    let model = body["model"].as_str().unwrap_or_default();
    let (text, content_type) = scripted_answer(model, &tool, body["stream"] == true);
    let mut response = axum::response::Response::new(Body::from(text));
    response
        .headers_mut()
        .insert("content-type", content_type.parse().unwrap());
    response
}

impl OllamaScriptedToolCall {
    /// In front of the Ollama at `upstream`, with [`TOOLS_MODEL`] created there.
    pub async fn start(upstream: &str) -> Self {
        create_tools_model(upstream).await;
        let calls = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new().fallback(forward).with_state(Forward {
            upstream: upstream.trim_end_matches('/').to_string(),
            client: reqwest::Client::new(),
            calls: calls.clone(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { url, calls, server }
    }

    /// Every `POST /api/chat` and `/v1/chat/completions` so far, in order.
    pub fn chat_calls(&self) -> Vec<ChatCall> {
        self.calls.lock().unwrap().clone()
    }
}
