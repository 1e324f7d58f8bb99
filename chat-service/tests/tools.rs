//! Tool calling on `POST /v1/chat/completions`, proven with the official clients (the `openai`
//! Python package and the `openai` npm package) against the service on the rig's real Redis,
//! FerretDB and Ollama: the whole tool loop (the model asks for a tool, the SDK parses the call,
//! the client sends the result, the model answers), streamed calls put together by the SDKs'
//! own helpers, clear refusals of malformed tools, and the calls and results in the stored
//! history, its export and its erasure.
//!
//! The service reaches Ollama through the named fixture `OllamaScriptedToolCall`: every request
//! goes to the real Ollama (which must accept the tools: it refuses them for a model whose
//! template has none, so the fixture creates a variant of the rig's model that has them), and
//! only where the small model answers a tool offer without calling one does the fixture answer
//! with a call, in Ollama's wire shape. What reached Ollama (tools, the assistant's call, the
//! tool result) is recorded.

mod support;

use std::process::Command;

use chat_service::config::{BackendConfig, Config, ModelsConfig};
use reqwest::Method;
use serde_json::{Value, json};
use support::clients::{node, python, run_client};
use support::records::call;
use support::tool_calls::{OllamaScriptedToolCall, SCRIPTED_ARGUMENTS, TOOLS_MODEL};
use support::{TestService, rig, start_with_api_keys, test_config};

const KEY: &str = "tools-key-0123456789";
const OTHER_KEY: &str = "tools-other-0123456789";
const KEYS: &str = "tools tools-key-0123456789,other tools-other-0123456789";

async fn service(fixture: &OllamaScriptedToolCall) -> TestService {
    let rig = rig();
    let mut config: Config = test_config(rig);
    config.backends = vec![BackendConfig::ollama("ollama", &fixture.url)];
    config.models = ModelsConfig::new(TOOLS_MODEL);
    config.models.allowed = vec![TOOLS_MODEL.into()];
    config.auth.enabled = true;
    config.context.max_output_tokens = 16;
    start_with_api_keys(config, rig.redis_url(), rig.mongodb_url(), Some(KEYS)).await
}

const PYTHON_CLIENT: &str = r#"
import json, sys
import openai
from openai import OpenAI
base, model, key = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
tools = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
user = "tool-user@example.com"

# The tool loop as OpenAI's guide writes it, in a session of the end user.
messages = [{"role": "user", "content": "What is the weather in Paris? Call get_weather."}]
first = client.chat.completions.with_raw_response.create(
    model=model, messages=messages, tools=tools, user=user)
asked = first.parse().choices[0]
call = asked.message.tool_calls[0]
messages.append(asked.message)
messages.append({"role": "tool", "tool_call_id": call.id,
                 "content": json.dumps({"temperature_c": 18})})
final = client.chat.completions.create(model=model, messages=messages, tools=tools, user=user)

# Streamed, put together by the SDK's stream helper; the usage comes last, without choices.
with client.chat.completions.stream(
        model=model, tools=tools, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Weather in Paris? Call get_weather."}]) as stream:
    chunks = [event.chunk for event in stream if event.type == "chunk"]
    streamed = stream.get_final_completion().choices[0]

# `tool_choice: "none"`: a plain answer.
plain = client.chat.completions.create(model=model, tools=tools, tool_choice="none",
    messages=[{"role": "user", "content": "Say hello."}])

def refused(**request):
    try:
        client.chat.completions.create(model=model, **request)
    except openai.BadRequestError as e:
        return {"status": e.status_code, "type": e.type, "param": e.param, "message": e.message}
    return None

ask = [{"role": "user", "content": "Weather?"}]
bad = {
    "name": refused(messages=ask, tools=[{"type": "function", "function": {"name": "get weather"}}]),
    "no_function": refused(messages=ask, tools=[{"type": "function"}]),
    "choice": refused(messages=ask, tools=tools, tool_choice="sometimes"),
    "unknown_tool": refused(messages=ask, tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_time"}}),
    "stray_result": refused(messages=[ask[0], {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_b", "content": "18"}]),
}
print(json.dumps({
    "session": first.headers.get("x-session-id"),
    "asked": {"finish_reason": asked.finish_reason, "content": asked.message.content,
              "id": call.id, "type": call.type, "name": call.function.name,
              "arguments": call.function.arguments},
    "final": {"finish_reason": final.choices[0].finish_reason,
              "content": final.choices[0].message.content,
              "tool_calls": final.choices[0].message.tool_calls is not None},
    "streamed": {"finish_reason": streamed.finish_reason,
                 "calls": [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                           for c in (streamed.message.tool_calls or [])]},
    "last_chunk": {"choices": len(chunks[-1].choices),
                   "usage": chunks[-1].usage.model_dump() if chunks[-1].usage else None},
    "plain": {"finish_reason": plain.choices[0].finish_reason,
              "content": plain.choices[0].message.content,
              "tool_calls": plain.choices[0].message.tool_calls},
    "bad": bad,
}))
"#;

fn assert_refused(refusal: &Value, param: &str) {
    assert_eq!(refusal["status"], 400, "{refusal}");
    assert_eq!(refusal["type"], "invalid_request_error", "{refusal}");
    assert_eq!(refusal["param"], param, "{refusal}");
}

/// Ollama reads `tools`: it refuses them for a model whose template takes none (the rig's own),
/// which is why the fixture offers them to a variant that does.
async fn assert_ollama_reads_tools() {
    let refused = reqwest::Client::new()
        .post(format!("{}/api/chat", rig().ollama_url()))
        .json(
            &json!({"model": chat_rig::paths::CHAT_MODEL, "stream": false,
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "get_weather"}}]}),
        )
        .send()
        .await
        .unwrap();
    let status = refused.status().as_u16();
    let body = refused.text().await.unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("does not support tools"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_python_sdk_runs_the_tool_loop_and_the_session_keeps_it() {
    assert_ollama_reads_tools().await;
    let fixture = OllamaScriptedToolCall::start(rig().ollama_url()).await;
    let service = service(&fixture).await;
    let mut python = Command::new(python());
    python.args(["-c", PYTHON_CLIENT]);
    let result = run_client(python, &service, TOOLS_MODEL, KEY, "python").await;
    let calls = fixture.chat_calls();
    let dump = || format!("{result:#}\n{calls:#?}");

    // The SDK parsed the model's call, in OpenAI's shape.
    let asked = &result["asked"];
    assert_eq!(asked["finish_reason"], "tool_calls", "{}", dump());
    assert_eq!(asked["content"], Value::Null, "{}", dump());
    assert_eq!(asked["type"], "function", "{}", dump());
    assert_eq!(asked["name"], "get_weather", "{}", dump());
    let arguments: Value = serde_json::from_str(asked["arguments"].as_str().unwrap()).unwrap();
    assert!(arguments["city"].is_string(), "{}", dump());
    assert!(
        asked["id"].as_str().unwrap().starts_with("call_"),
        "{}",
        dump()
    );
    // The real Ollama was offered the tools, and accepted them.
    assert!(calls.iter().all(|c| c.ollama_status == 200), "{}", dump());
    assert_eq!(
        calls[0].body["tools"][0]["function"]["name"],
        "get_weather",
        "{}",
        dump()
    );
    // The next turn sent the call back in Ollama's shape (arguments as an object) and the
    // result with the tool's name; the model answered in text.
    let sent = calls[1].body["messages"].as_array().unwrap();
    let call_back = sent.iter().find(|m| m["role"] == "assistant").unwrap();
    assert!(
        call_back["tool_calls"][0]["function"]["arguments"].is_object(),
        "{}",
        dump()
    );
    let tool_result = sent.last().unwrap();
    assert_eq!(tool_result["role"], "tool", "{}", dump());
    assert_eq!(tool_result["tool_name"], "get_weather", "{}", dump());
    assert_eq!(
        tool_result["content"],
        r#"{"temperature_c": 18}"#,
        "{}",
        dump()
    );
    assert!(!calls[1].scripted, "{}", dump());
    assert!(
        result["final"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
            || result["final"]["tool_calls"] == true,
        "{}",
        dump()
    );

    // Streamed: the SDK's helper put the call together; include_usage ends with the usage.
    let streamed = &result["streamed"];
    assert_eq!(streamed["finish_reason"], "tool_calls", "{}", dump());
    assert_eq!(streamed["calls"][0]["name"], "get_weather", "{}", dump());
    let streamed_arguments = streamed["calls"][0]["arguments"].as_str().unwrap();
    assert!(
        serde_json::from_str::<Value>(streamed_arguments)
            .unwrap()
            .is_object(),
        "{}",
        dump()
    );
    assert_eq!(result["last_chunk"]["choices"], 0, "{}", dump());
    assert!(
        result["last_chunk"]["usage"]["total_tokens"]
            .as_u64()
            .unwrap()
            > 0,
        "{}",
        dump()
    );

    // tool_choice "none": no tools reached Ollama, a text answer came back.
    let plain = &result["plain"];
    assert_ne!(plain["finish_reason"], "tool_calls", "{}", dump());
    assert_eq!(plain["tool_calls"], Value::Null, "{}", dump());
    let plain_call = calls.iter().rfind(|c| !c.scripted).unwrap();
    assert!(plain_call.body.get("tools").is_none(), "{}", dump());

    let bad = &result["bad"];
    assert_refused(&bad["name"], "tools[0].function.name");
    assert_refused(&bad["no_function"], "tools[0].function");
    assert_refused(&bad["choice"], "tool_choice");
    assert_refused(&bad["unknown_tool"], "tool_choice");
    assert_refused(&bad["stray_result"], "messages[2].tool_call_id");
    assert_eq!(calls.len(), 4, "refusals never reach Ollama: {}", dump());

    // The session holds the whole loop, in order, with the links between call and result.
    let session = result["session"].as_str().unwrap();
    let path = format!("/v1/sessions/{session}/messages");
    let (status, page) = call(&service.base, Some(KEY), Method::GET, &path, None).await;
    assert_eq!(status, 200, "{page}");
    let stored = page["messages"].as_array().unwrap();
    let roles: Vec<&str> = stored.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant", "tool", "assistant"], "{page}");
    assert_eq!(stored[1]["tool_calls"][0]["id"], asked["id"], "{page}");
    assert_eq!(stored[1]["tool_calls"][0]["name"], "get_weather", "{page}");
    assert_eq!(stored[1]["finish_reason"], "tool_calls", "{page}");
    assert_eq!(stored[2]["tool_call_id"], asked["id"], "{page}");
    // Another caller does not see it.
    let (status, _) = call(&service.base, Some(OTHER_KEY), Method::GET, &path, None).await;
    assert_eq!(status, 404);
    // The export carries the call and its result.
    let export = export_lines(&service, "tool-user@example.com").await;
    let tool_line = export.iter().find(|l| l["role"] == "tool").unwrap();
    assert_eq!(tool_line["tool_call_id"], asked["id"], "{export:#?}");
    assert!(
        export
            .iter()
            .any(|l| l["tool_calls"][0]["name"] == "get_weather"),
        "{export:#?}"
    );
    // Erasing the end user erases the loop with the rest.
    let (status, erased) = call(
        &service.base,
        Some(KEY),
        Method::DELETE,
        "/v1/users/tool-user@example.com",
        None,
    )
    .await;
    assert_eq!(status, 200, "{erased}");
    let (status, _) = call(&service.base, Some(KEY), Method::GET, &path, None).await;
    assert_eq!(status, 404);
}

/// The message lines of the caller's export for `user`.
async fn export_lines(service: &TestService, user: &str) -> Vec<Value> {
    let text = reqwest::Client::new()
        .get(format!("{}/v1/sessions/export", service.base))
        .query(&[("user", user)])
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .filter(|line| line["type"] == "message")
        .collect()
}

const NODE_CLIENT: &str = r#"
const { OpenAI } = require('openai');
const [base, model, key] = process.argv.slice(1);
const client = new OpenAI({ baseURL: base + '/v1', apiKey: key, maxRetries: 0 });
(async () => {
  const calls = [];
  // The SDK's own tool runner, streaming: it puts the streamed call together, runs the
  // function, sends its result and reads the answer.
  const runner = client.chat.completions.runTools({
    model, stream: true, user: 'node-tools@example.com',
    messages: [{ role: 'user', content: 'What is the weather in Paris? Call get_weather.' }],
    tools: [{ type: 'function', function: {
      name: 'get_weather', description: 'The current weather in a city',
      parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
      parse: JSON.parse,
      function: (args) => { calls.push(args); return { temperature_c: 18 }; },
    } }],
  }, { maxChatCompletions: 2 });
  const final = await runner.finalChatCompletion();
  console.log(JSON.stringify({
    calls, roles: runner.messages.map((m) => m.role),
    finish_reason: final.choices[0].finish_reason, content: final.choices[0].message.content,
  }));
})().catch((e) => { console.error(e); process.exit(1); });
"#;

#[tokio::test(flavor = "multi_thread")]
async fn the_node_sdk_tool_runner_streams_the_loop() {
    let fixture = OllamaScriptedToolCall::start(rig().ollama_url()).await;
    let service = service(&fixture).await;
    let mut node = node();
    node.args(["-e", NODE_CLIENT, "--"]);
    let result = run_client(node, &service, TOOLS_MODEL, KEY, "node").await;
    let calls = fixture.chat_calls();
    let dump = || format!("{result:#}\n{calls:#?}");
    // The runner parsed the streamed call's arguments and ran the function with them.
    assert_eq!(
        result["calls"][0],
        serde_json::from_str::<Value>(SCRIPTED_ARGUMENTS).unwrap(),
        "{}",
        dump()
    );
    let roles = result["roles"].as_array().unwrap();
    assert_eq!(
        &roles[..3],
        [json!("user"), json!("assistant"), json!("tool")],
        "{}",
        dump()
    );
    assert!(calls.iter().all(|c| c.ollama_status == 200), "{}", dump());
    assert_eq!(calls[1].body["stream"], true, "{}", dump());
    assert_eq!(
        calls[1].body["messages"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()["role"],
        "tool"
    );
    // The session (the end user's) holds the loop.
    let (status, listed) = call(
        &service.base,
        Some(KEY),
        Method::GET,
        "/v1/sessions?user=node-tools@example.com",
        None,
    )
    .await;
    assert_eq!(status, 200, "{listed}");
    let export = export_lines(&service, "node-tools@example.com").await;
    let roles: Vec<&str> = export.iter().map(|l| l["role"].as_str().unwrap()).collect();
    assert_eq!(&roles[..3], ["user", "assistant", "tool"], "{export:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_openai_compatible_back_end_gets_the_tools_and_the_loop_in_its_shape() {
    let fixture = OllamaScriptedToolCall::start(rig().ollama_url()).await;
    let rig = rig();
    let mut config: Config = test_config(rig);
    // Ollama's OpenAI-compatible API, a real server of that protocol.
    config.backends = vec![BackendConfig::openai("ollama-v1", &fixture.url)];
    config.models = ModelsConfig::new(TOOLS_MODEL);
    config.models.allowed = vec![TOOLS_MODEL.into()];
    let service = start_with_api_keys(config, rig.redis_url(), rig.mongodb_url(), None).await;
    let request = json!({
        "model": TOOLS_MODEL,
        "tools": [{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_7", "type": "function",
                "function": {"name": "get_weather", "arguments": SCRIPTED_ARGUMENTS}}]},
            {"role": "tool", "tool_call_id": "call_7", "content": "18 C, sunny"},
        ],
    });
    let (status, _, answer) = service.post_json("/v1/chat/completions", &request).await;
    let calls = fixture.chat_calls();
    assert_eq!(status, 200, "{answer}\n{calls:#?}");
    assert_eq!(calls.len(), 1, "{calls:#?}");
    assert_eq!(
        calls[0].ollama_status, 200,
        "the server took the loop: {calls:#?}"
    );
    let sent = &calls[0].body;
    assert_eq!(
        sent["tools"][0]["function"]["name"], "get_weather",
        "{sent}"
    );
    assert_eq!(
        sent["tool_choice"]["function"]["name"], "get_weather",
        "{sent}"
    );
    let messages = sent["messages"].as_array().unwrap();
    assert_eq!(messages[1]["content"], Value::Null, "{sent}");
    assert_eq!(
        messages[1]["tool_calls"][0]["function"]["arguments"], SCRIPTED_ARGUMENTS,
        "OpenAI's arguments are text: {sent}"
    );
    assert_eq!(messages[2]["tool_call_id"], "call_7", "{sent}");
    assert!(answer["choices"][0]["message"].is_object(), "{answer}");
}
