//! The API server's own checks of a ChatService: the CRD's schema and CEL rules reject every
//! invalid spec with 422 and a message naming the field, before any operator sees it.

mod support;

use chat_operator::crd::ChatService;
use chat_rig::Rig;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, PostParams};
use serde_json::json;
use support::chat_service::{json_merge, minimal_spec, raw_chat_service, rejection_failures};
use support::install;

/// A valid rollout of a second back end `canary` (added next to the minimal spec's `vllm`),
/// merged with `patch`: each rollout case breaks exactly one thing.
fn rollout(patch: serde_json::Value) -> serde_json::Value {
    let mut rollout = json!({"candidate": {"backend": "canary"}, "steps": [5, 50, 100]});
    json_merge(&mut rollout, patch);
    json!({
        "backends": [
            {"name": "vllm", "url": "http://vllm.ml:8000", "protocol": "openai"},
            {"name": "canary", "url": "http://canary.ml:8000", "protocol": "openai"}],
        "rollout": rollout,
    })
}

#[tokio::test]
async fn invalid_chat_services_are_rejected_naming_the_field() {
    let rig = Rig::shared();
    let (admin, ns) = rig.test_namespace("invalid").await;
    install(&admin).await;
    // Raw JSON through a dynamic API: the typed ChatService would refuse some of these specs
    // (an unknown enum variant) on the client, and the point is what the API server says.
    let api: Api<DynamicObject> =
        Api::namespaced_with(admin, &ns, &ApiResource::erase::<ChatService>(&()));

    let with = |patch: serde_json::Value| {
        let mut spec = minimal_spec();
        json_merge(&mut spec, patch);
        spec
    };
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "negative replicas",
            with(json!({"replicas": -1})),
            "spec.replicas",
        ),
        (
            "min above max",
            with(
                json!({"autoscaling": {"minReplicas": 5, "maxReplicas": 2, "targetCPUUtilizationPercentage": 50}}),
            ),
            "spec.autoscaling.minReplicas",
        ),
        (
            "autoscaling without target",
            with(json!({"autoscaling": {"maxReplicas": 3}})),
            "spec.autoscaling",
        ),
        (
            "ftp url",
            with(json!({"backends": [{"name": "a", "url": "ftp://x", "protocol": "openai"}]})),
            "spec.backends[0].url",
        ),
        (
            "unknown protocol",
            with(json!({"backends": [{"name": "a", "url": "http://x", "protocol": "grpc"}]})),
            "spec.backends[0].protocol",
        ),
        (
            "weight zero",
            with(
                json!({"backends": [{"name": "a", "url": "http://x", "protocol": "openai", "weight": 0}]}),
            ),
            "spec.backends[0].weight",
        ),
        (
            "bad backend name",
            with(
                json!({"backends": [{"name": "Not_DNS", "url": "http://x", "protocol": "openai"}]}),
            ),
            "spec.backends[0].name",
        ),
        (
            "duplicate backend names",
            with(json!({"backends": [
                {"name": "a", "url": "http://x", "protocol": "openai"},
                {"name": "a", "url": "http://y", "protocol": "openai"}]})),
            "spec.backends[1]",
        ),
        (
            "no back end at all",
            with(json!({"backends": null})),
            "spec",
        ),
        (
            "redis both managed and external",
            with(json!({"history": {"redis": {"managed": {}, "external": {"address": "r:6379"}}}})),
            "spec.history.redis",
        ),
        (
            "mongodb neither",
            with(json!({"history": {"mongodb": {"managed": null}}})),
            "spec.history.mongodb",
        ),
        (
            "documentdb without CA",
            with(
                json!({"history": {"mongodb": {"managed": null, "external": {"flavor": "documentdb", "uriSecret": {"name": "d", "key": "uri"}}}}}),
            ),
            "spec.history.mongodb.external.caSecret",
        ),
        (
            "redis address without port",
            with(
                json!({"history": {"redis": {"managed": null, "external": {"address": "redis.example.com"}}}}),
            ),
            "spec.history.redis.external.address",
        ),
        (
            "unknown routing strategy",
            with(json!({"routing": {"strategy": "Random"}})),
            "spec.routing.strategy",
        ),
        (
            "first-token timeout above total",
            with(json!({"routing": {"firstTokenTimeoutMs": 9000, "totalTimeoutMs": 1000}})),
            "spec.routing.firstTokenTimeoutMs",
        ),
        (
            "too many GPUs",
            with(json!({"ollama": {"models": ["m"], "gpus": 99}})),
            "spec.ollama.gpus",
        ),
        (
            "service port out of range",
            with(json!({"service": {"port": 70000}})),
            "spec.service.port",
        ),
        ("no default model", with(json!({"models": null})), "spec"),
        (
            "reserved back-end name",
            with(
                json!({"ollama": {"models": ["m"]}, "backends": [{"name": "ollama", "url": "http://x", "protocol": "ollama"}]}),
            ),
            "spec",
        ),
        (
            "rollout without steps",
            with(rollout(json!({"steps": []}))),
            "spec.rollout.steps",
        ),
        (
            "rollout steps not increasing",
            with(rollout(json!({"steps": [50, 25, 100]}))),
            "spec.rollout.steps",
        ),
        (
            "rollout step repeated",
            with(rollout(json!({"steps": [25, 25, 100]}))),
            "spec.rollout.steps[1]",
        ),
        (
            "rollout step above 100",
            with(rollout(json!({"steps": [50, 150]}))),
            "spec.rollout.steps[1]",
        ),
        (
            "rollout not ending at 100",
            with(rollout(json!({"steps": [5, 50]}))),
            "spec.rollout.steps",
        ),
        (
            "rollout candidate model is the default",
            with(json!({"rollout": {"candidate": {"model": "gemma3:270m"}, "steps": [100]}})),
            "spec.rollout.candidate.model",
        ),
        (
            "rollout candidate back end unknown",
            with(rollout(json!({"candidate": {"backend": "nowhere"}}))),
            "spec.rollout.candidate.backend",
        ),
        (
            "rollout candidate back end is the only one",
            with(json!({"rollout": {"candidate": {"backend": "vllm"}, "steps": [100]}})),
            "spec.rollout.candidate.backend",
        ),
        (
            "rollout candidate empty",
            with(rollout(json!({"candidate": {"backend": null}}))),
            "spec.rollout.candidate",
        ),
        (
            "rollout ratio gate below 100",
            with(rollout(json!({"gates": {"maxTtftP95RatioPercent": 50}}))),
            "spec.rollout.gates.maxTtftP95RatioPercent",
        ),
    ];
    assert!(cases.len() >= 12);
    // Every case is tried, and all that fail are reported together.
    let failures = rejection_failures(&api, cases).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The base of the rollout cases is itself valid, so each case fails for its own reason.
    let valid = raw_chat_service("rollout", with(rollout(json!({}))));
    api.create(&PostParams::default(), &valid)
        .await
        .expect("a valid rollout is accepted");
    let long_name = raw_chat_service(&"n".repeat(41), minimal_spec());
    let error = api
        .create(&PostParams::default(), &long_name)
        .await
        .expect_err("long name");
    assert!(
        error
            .to_string()
            .contains("metadata.name must be at most 40 characters"),
        "{error}"
    );
}
