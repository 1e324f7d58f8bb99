//! The chart's Argo CD health check (charts/chat-operator/argocd/health.lua) run by a real Lua
//! interpreter on ChatServices in every state their status can report.

mod support;

use chat_operator::crd::ChatService;
use serde_json::{Value, json};
use support::argocd::argocd_health;

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
