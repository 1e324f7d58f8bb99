//! The chart's Argo CD health check (charts/chat-operator/argocd/health.lua) run by a real Lua
//! interpreter on ChatServices in every state their status can report.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use chat_operator::crd::ChatService;
use serde_json::{Value, json};
use support::chart::{chart_dir, describe};

fn lua_interpreter() -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin"] {
        let path = Path::new(dir).join("lua5.4");
        if path.is_file() {
            return path;
        }
    }
    panic!(
        "the Argo CD health check test needs a Lua interpreter at /usr/bin/lua5.4: \
         install the Debian package lua5.4 (apt-get install lua5.4; tests/rig/install.sh's apt step)"
    );
}

/// A JSON value as a Lua table constructor (what Argo CD hands the script as `obj`).
fn lua_literal(value: &Value) -> String {
    match value {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            let mut out = String::from("\"");
            for b in s.bytes() {
                match b {
                    b'"' => out.push_str("\\\""),
                    b'\\' => out.push_str("\\\\"),
                    0x20..=0x7e => out.push(b as char),
                    other => out.push_str(&format!("\\{other:03}")),
                }
            }
            out.push('"');
            out
        }
        Value::Array(items) => format!(
            "{{{}}}",
            items.iter().map(lua_literal).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(fields) => format!(
            "{{{}}}",
            fields
                .iter()
                .map(|(k, v)| format!(
                    "[{}] = {}",
                    lua_literal(&Value::String(k.clone())),
                    lua_literal(v)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Runs charts/chat-operator/argocd/health.lua on `obj`; returns (status, message).
fn argocd_health(obj: &Value) -> (String, String) {
    let script = chart_dir().join("argocd/health.lua");
    let driver = format!(
        "obj = {}\nlocal hs = dofile({})\nio.write(hs.status, \"\\n\", hs.message or \"\", \"\\n\")\n",
        lua_literal(obj),
        lua_literal(&Value::String(script.to_str().unwrap().into()))
    );
    let mut child = Command::new(lua_interpreter())
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting lua5.4");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(driver.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        describe("lua5.4 health.lua", &out)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    (
        lines.next().unwrap_or_default().to_string(),
        lines.next().unwrap_or_default().to_string(),
    )
}

fn condition(type_: &str, status: bool, reason: &str, message: &str) -> Value {
    json!({
        "type": type_,
        "status": if status { "True" } else { "False" },
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2025-01-01T00:00:00Z",
    })
}

/// A ChatService at `generation` with the given status; checked to be a valid ChatService.
fn chat_service(generation: i64, status: Option<Value>) -> Value {
    let mut obj = json!({
        "apiVersion": "chatoperator.dev/v1alpha1",
        "kind": "ChatService",
        "metadata": {"name": "support", "namespace": "team-a", "generation": generation},
        "spec": {
            "models": {"default": "gemma3-270m"},
            "backends": [{"name": "ollama", "url": "http://ollama:11434", "protocol": "ollama"}],
            "history": {"redis": {"managed": {}}, "mongodb": {"managed": {}}},
        },
    });
    if let Some(status) = status {
        obj["status"] = status;
    }
    serde_json::from_value::<ChatService>(obj.clone())
        .unwrap_or_else(|e| panic!("fixture is not a ChatService: {e}\n{obj:#}"));
    obj
}

fn settled(ready: bool, progressing: bool, degraded: bool, config_valid: bool) -> Vec<Value> {
    vec![
        condition(
            "Ready",
            ready,
            if ready { "Ready" } else { "StorageNotReady" },
            if ready {
                "2 of 2 chat-service pods are ready."
            } else {
                "Storage is not ready; see StorageReady."
            },
        ),
        condition(
            "ConfigValid",
            config_valid,
            if config_valid {
                "Valid"
            } else {
                "MissingSecretKey"
            },
            if config_valid {
                "The spec is valid."
            } else {
                "Secret team-a/llm-key has no key \"api-key\"."
            },
        ),
        condition(
            "Progressing",
            progressing,
            if progressing { "RollingOut" } else { "Settled" },
            if progressing {
                "1 of 2 chat-service pods run the latest spec."
            } else {
                "No rollout in progress."
            },
        ),
        condition(
            "Degraded",
            degraded,
            if degraded {
                "NoAvailablePods"
            } else {
                "AsExpected"
            },
            if degraded {
                "No chat-service pod is available."
            } else {
                "No fault detected."
            },
        ),
    ]
}

#[test]
fn argocd_health_check_reads_chat_service_status() {
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "no status yet",
            chat_service(1, None),
            "Progressing",
            "Waiting for the operator",
        ),
        (
            "ready and current",
            chat_service(
                3,
                Some(
                    json!({"observedGeneration": 3, "conditions": settled(true, false, false, true)}),
                ),
            ),
            "Healthy",
            "2 of 2 chat-service pods are ready.",
        ),
        (
            "ready, but for an older generation",
            chat_service(
                4,
                Some(
                    json!({"observedGeneration": 3, "conditions": settled(true, false, false, true)}),
                ),
            ),
            "Progressing",
            "generation 4",
        ),
        (
            "degraded, but for an older generation",
            chat_service(
                5,
                Some(
                    json!({"observedGeneration": 4, "conditions": settled(false, false, true, false)}),
                ),
            ),
            "Progressing",
            "generation 5",
        ),
        (
            "rolling out",
            chat_service(
                2,
                Some(
                    json!({"observedGeneration": 2, "conditions": settled(false, true, false, true)}),
                ),
            ),
            "Progressing",
            "1 of 2 chat-service pods run the latest spec.",
        ),
        (
            "invalid config",
            chat_service(
                2,
                Some(
                    json!({"observedGeneration": 2, "conditions": settled(false, false, true, false)}),
                ),
            ),
            "Degraded",
            "Secret team-a/llm-key has no key \"api-key\".",
        ),
        (
            "no available pods",
            chat_service(
                2,
                Some(
                    json!({"observedGeneration": 2, "conditions": settled(false, false, true, true)}),
                ),
            ),
            "Degraded",
            "No chat-service pod is available.",
        ),
        (
            "storage still starting",
            chat_service(
                1,
                Some(
                    json!({"observedGeneration": 1, "conditions": settled(false, false, false, true)}),
                ),
            ),
            "Progressing",
            "Storage is not ready",
        ),
        (
            "status without conditions",
            chat_service(1, Some(json!({"observedGeneration": 1}))),
            "Progressing",
            "Waiting for the Ready condition",
        ),
    ];
    for (name, obj, status, message) in cases {
        let (got_status, got_message) = argocd_health(&obj);
        assert_eq!(got_status, status, "{name}: message {got_message:?}");
        assert!(
            got_message.contains(message),
            "{name}: message {got_message:?} lacks {message:?}"
        );
    }
}
