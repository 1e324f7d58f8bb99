//! OpenAI API parity, proven with the official clients: the `openai` Python package and the
//! `openai` npm package (both installed by `tests/rig/install.sh`; the test fails, never skips,
//! without them) against the service on the rig's real Redis, FerretDB and Ollama. The service
//! reaches Ollama through the named fixture `OllamaCallCountingProxy`, a transparent proxy that
//! records each request body, so the test sees both what the model did (the same answer for the
//! same seed, JSON for a JSON schema) and what was sent upstream (`top_p`, `seed`, `stop`,
//! `format`).

mod support;

use std::process::Command;

use chat_service::config::{BackendConfig, Config};
use serde_json::{Value, json};
use support::clients::{self, node, python};
use support::{OllamaCallCountingProxy, TestService, rig, start_with_api_keys, test_config};

const KEY: &str = "parity-key-0123456789";
const KEYS: &str = "parity parity-key-0123456789";

async fn run_client(program: Command, service: &TestService, label: &str) -> Value {
    clients::run_client(program, service, rig().model(), KEY, label).await
}

fn parity_config(proxy: &OllamaCallCountingProxy) -> Config {
    let mut config = test_config(rig());
    config.backends = vec![BackendConfig::ollama("ollama", &proxy.url)];
    config.auth.enabled = true;
    config.context.max_output_tokens = 16;
    config
}

const PYTHON_CLIENT: &str = r#"
import json, sys
import openai
from openai import OpenAI
base, model, key = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
ask = [{"role": "user", "content": "Name a colour."}]

# The same seed at a high temperature: the same answer twice.
seeded = [client.chat.completions.create(model=model, messages=ask, max_tokens=4,
          temperature=1.5, seed=7).choices[0].message.content for _ in range(2)]

# A JSON schema: the answer parses as JSON and follows it.
schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
structured = client.chat.completions.create(
    model=model, max_tokens=16, temperature=0.0,
    messages=[{"role": "user", "content": "Is water wet? Answer in JSON."}],
    response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
).choices[0].message.content
parsed = json.loads(structured)

# JSON mode, stop and top_p, as an end user named by an e-mail address; then that user again.
first = client.chat.completions.with_raw_response.create(
    model=model, max_tokens=4, top_p=0.5, stop=["\n\n", "END"], user="eve@example.com",
    response_format={"type": "json_object"},
    messages=[{"role": "user", "content": "Give a JSON object."}])
json_mode = first.parse().choices[0].message.content
again = client.chat.completions.with_raw_response.create(
    model=model, max_tokens=2, user="eve@example.com",
    messages=[{"role": "user", "content": "And again."}])

def refused(call):
    try:
        call()
    except openai.APIStatusError as e:
        return {"class": type(e).__name__, "status": e.status_code, "type": e.type,
                "param": e.param, "code": e.code, "message": e.message}
    return None

bad_n = refused(lambda: client.chat.completions.create(model=model, messages=ask, n=2))
bad_image = refused(lambda: client.chat.completions.create(model=model, messages=[{"role": "user",
    "content": [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]))
bad_top_p = refused(lambda: client.chat.completions.create(model=model, messages=ask, top_p=3))
bad_model = refused(lambda: client.chat.completions.create(model="gpt-9", messages=ask))
not_found = refused(lambda: client.models.retrieve("no-such-model"))
wrong_key = refused(lambda: OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
                    .models.list())
print(json.dumps({
    "seeded": seeded, "structured": parsed, "json_mode": json_mode,
    "first_session": first.headers.get("x-session-id"),
    "again_session": again.headers.get("x-session-id"),
    "again_context": again.headers.get("x-context-messages"),
    "bad_n": bad_n, "bad_image": bad_image, "bad_top_p": bad_top_p, "bad_model": bad_model,
    "not_found": not_found, "wrong_key": wrong_key,
}))
"#;

const NODE_CLIENT: &str = r#"
const { OpenAI } = require('openai');
const [base, model, key] = process.argv.slice(1);
const client = new OpenAI({ baseURL: base + '/v1', apiKey: key, maxRetries: 0 });
(async () => {
  const stream = await client.chat.completions.create({
    model, max_tokens: 4, stream: true, stream_options: { include_usage: true },
    seed: 11, top_p: 0.8, stop: ['END'], user: 'nora@example.com',
    messages: [{ role: 'user', content: 'Name a fruit.' }],
  });
  let text = '', usage = null, context = null;
  for await (const chunk of stream) {
    if (chunk.choices.length && chunk.choices[0].delta.content) text += chunk.choices[0].delta.content;
    if (chunk.usage) { usage = chunk.usage; context = chunk.x_context_messages; }
  }
  const refused = async (call) => {
    try { await call(); return null; } catch (e) {
      return { class: e.constructor.name, bad: e instanceof OpenAI.BadRequestError,
               auth: e instanceof OpenAI.AuthenticationError, status: e.status,
               type: e.type, param: e.param, code: e.code };
    }
  };
  const badN = await refused(() => client.chat.completions.create(
    { model, n: 3, messages: [{ role: 'user', content: 'x' }] }));
  const wrongKey = await refused(() => new OpenAI(
    { baseURL: base + '/v1', apiKey: 'wrong', maxRetries: 0 }).models.list());
  console.log(JSON.stringify({ text, usage, context, badN, wrongKey }));
})().catch((e) => { console.error(e); process.exit(1); });
"#;

fn assert_refusal(refusal: &Value, class: &str, status: u64, kind: &str, param: Option<&str>) {
    assert_eq!(refusal["class"], class, "{refusal}");
    assert_eq!(refusal["status"], status, "{refusal}");
    assert_eq!(refusal["type"], kind, "{refusal}");
    assert_eq!(refusal["param"].as_str(), param, "{refusal}");
    assert!(refusal["code"].is_string(), "{refusal}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_official_python_and_node_clients_get_openai_behaviour() {
    let proxy = OllamaCallCountingProxy::start(rig().ollama_url()).await;
    let rig = rig();
    let service = start_with_api_keys(
        parity_config(&proxy),
        rig.redis_url(),
        rig.mongodb_url(),
        Some(KEYS),
    )
    .await;

    let mut python = Command::new(python());
    python.args(["-c", PYTHON_CLIENT]);
    let result = run_client(python, &service, "python").await;
    let bodies = proxy.chat_bodies();
    assert_eq!(bodies.len(), 5, "one upstream call per turn: {bodies:#?}");

    // seed: same answer twice, and the seed reached Ollama among its options.
    let seeded = result["seeded"].as_array().unwrap();
    assert_eq!(
        seeded[0], seeded[1],
        "same seed, different answers: {result}"
    );
    assert_eq!(bodies[0]["options"]["seed"], 7, "{}", bodies[0]);
    // A JSON schema becomes Ollama's `format`, and the answer follows it.
    assert!(result["structured"]["ok"].is_boolean(), "{result}");
    assert_eq!(
        bodies[2]["format"]["required"],
        json!(["ok"]),
        "{}",
        bodies[2]
    );
    // JSON mode is `format: "json"`: the answer is JSON from its first character.
    assert_eq!(bodies[3]["format"], "json", "{}", bodies[3]);
    assert!(
        result["json_mode"]
            .as_str()
            .unwrap()
            .trim_start()
            .starts_with('{'),
        "{result}"
    );
    assert_eq!(bodies[3]["options"]["top_p"], 0.5, "{}", bodies[3]);
    assert_eq!(
        bodies[3]["options"]["stop"],
        json!(["\n\n", "END"]),
        "{}",
        bodies[3]
    );
    assert!(bodies[4].get("format").is_none(), "{}", bodies[4]);
    assert!(bodies[4]["options"].get("stop").is_none(), "{}", bodies[4]);
    // An e-mail address as `user` selects one session of that end user.
    let session = result["first_session"].as_str().unwrap();
    assert!(session.starts_with("u-"), "{result}");
    assert_eq!(result["again_session"], session, "{result}");
    assert_eq!(result["again_context"], "2", "{result}");

    // Errors in OpenAI's shape: the SDK raises the class for the status, with type/param/code.
    assert_refusal(
        &result["bad_n"],
        "BadRequestError",
        400,
        "invalid_request_error",
        Some("n"),
    );
    assert_refusal(
        &result["bad_image"],
        "BadRequestError",
        400,
        "invalid_request_error",
        Some("messages[0].content[0].type"),
    );
    assert!(
        result["bad_image"]["message"]
            .as_str()
            .unwrap()
            .contains("text only"),
        "{result}"
    );
    assert_refusal(
        &result["bad_top_p"],
        "BadRequestError",
        400,
        "invalid_request_error",
        Some("top_p"),
    );
    assert_refusal(
        &result["bad_model"],
        "BadRequestError",
        400,
        "invalid_request_error",
        Some("model"),
    );
    assert_refusal(
        &result["not_found"],
        "NotFoundError",
        404,
        "not_found_error",
        None,
    );
    assert_refusal(
        &result["wrong_key"],
        "AuthenticationError",
        401,
        "authentication_error",
        None,
    );

    let mut node = node();
    node.args(["-e", NODE_CLIENT, "--"]);
    let result = run_client(node, &service, "node").await;
    let bodies = proxy.chat_bodies();
    assert_eq!(bodies.len(), 6, "{bodies:#?}");
    let streamed = &bodies[5];
    assert_eq!(streamed["options"]["seed"], 11, "{streamed}");
    assert_eq!(streamed["options"]["top_p"], 0.8, "{streamed}");
    assert_eq!(streamed["options"]["stop"], json!(["END"]), "{streamed}");
    // stream_options.include_usage: the last chunk carries the usage.
    assert!(
        result["usage"]["completion_tokens"].as_u64().unwrap() >= 1,
        "{result}"
    );
    assert_eq!(result["context"], 0, "{result}");
    assert!(!result["text"].as_str().unwrap().is_empty(), "{result}");
    assert_eq!(result["badN"]["bad"], true, "{result}");
    assert_eq!(result["badN"]["param"], "n", "{result}");
    assert_eq!(result["badN"]["type"], "invalid_request_error", "{result}");
    assert_eq!(result["wrongKey"]["auth"], true, "{result}");
    assert_eq!(result["wrongKey"]["status"], 401, "{result}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spent_rate_limit_is_the_sdks_rate_limit_error() {
    let proxy = OllamaCallCountingProxy::start(rig().ollama_url()).await;
    let mut config = parity_config(&proxy);
    config.rate_limit.enabled = true;
    config.rate_limit.requests_per_window = 1;
    config.rate_limit.window_seconds = 600;
    let rig = rig();
    let service = start_with_api_keys(config, rig.redis_url(), rig.mongodb_url(), Some(KEYS)).await;
    let script = r#"
import json, sys
import openai
from openai import OpenAI
base, model, key = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
client.models.list()
try:
    client.models.list()
    print(json.dumps(None))
except openai.RateLimitError as e:
    print(json.dumps({"class": type(e).__name__, "status": e.status_code, "type": e.type,
                      "param": e.param, "code": e.code,
                      "retry_after": e.response.headers.get("retry-after")}))
"#;
    let mut python = Command::new(python());
    python.args(["-c", script]);
    let refusal = run_client(python, &service, "python").await;
    assert_refusal(&refusal, "RateLimitError", 429, "rate_limit_error", None);
    assert_eq!(refusal["code"], "rate_limited", "{refusal}");
    assert!(refusal["retry_after"].is_string(), "{refusal}");
    assert_eq!(proxy.chat_calls(), 0);
}
