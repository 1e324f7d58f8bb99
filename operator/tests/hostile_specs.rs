//! Hostile and careless ChatServices: each is refused by the real API server (schema or CEL
//! rule, with the field named), or, where only the operator can tell, reported by the running
//! operator as `ConfigValid=False` naming the field, with no child object built.

mod support;

use chat_operator::children::ChildKind;
use chat_operator::crd::ChatService;
use chat_rig::Rig;
use kube::api::{ApiResource, DynamicObject, ListParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use support::chat_service::{
    json_merge, minimal_spec, raw_chat_service, rejection_failures, wait_condition,
};
use support::{Operator, env, install};

fn with(patch: serde_json::Value) -> serde_json::Value {
    let mut spec = minimal_spec();
    json_merge(&mut spec, patch);
    spec
}

fn backend(extra: serde_json::Value) -> serde_json::Value {
    let mut backend = json!({"name": "b", "url": "http://vllm.ml:8000", "protocol": "openai"});
    json_merge(&mut backend, extra);
    with(json!({ "backends": [backend] }))
}

#[tokio::test]
async fn hostile_specs_are_refused_by_the_api_server_naming_the_field() {
    let rig = Rig::shared();
    let (admin, ns) = rig.test_namespace("hostile").await;
    install(&admin).await;
    let api: Api<DynamicObject> =
        Api::namespaced_with(admin, &ns, &ApiResource::erase::<ChatService>(&()));
    let key = json!({"name": "llm-keys", "key": "k"});
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "empty allowed model",
            with(json!({"models": {"allowed": [""]}})),
            "spec.models.allowed[0]",
        ),
        (
            "model read as a flag",
            with(json!({"ollama": {"models": ["-h"]}})),
            "spec.ollama.models[0]",
        ),
        (
            "default model read as a flag",
            with(json!({"models": {"default": "--verbose"}})),
            "spec.models.default",
        ),
        (
            "empty back-end model",
            backend(json!({"models": [""]})),
            "spec.backends[0].models[0]",
        ),
        (
            "fallback model read as a flag",
            with(json!({"routing": {"fallback": {"model": "-x"}}})),
            "spec.routing.fallback.model",
        ),
        (
            "rollout candidate model read as a flag",
            with(json!({"rollout": {"candidate": {"model": "--verbose"}, "steps": [100]}})),
            "spec.rollout.candidate.model",
        ),
        (
            "rollout candidate back end that is the fallback",
            with(json!({
                "backends": [
                    {"name": "a", "url": "http://a.ml:8000", "protocol": "openai"},
                    {"name": "spare", "url": "http://spare.ml:8000", "protocol": "openai"}],
                "routing": {"fallback": {"backend": "spare"}},
                "rollout": {"candidate": {"backend": "spare"}, "steps": [100]}})),
            "spec.rollout.candidate.backend",
        ),
        (
            "rollout with a hundred steps",
            with(
                json!({"rollout": {"candidate": {"model": "m2"}, "steps": (1..=100).collect::<Vec<i32>>()}}),
            ),
            "spec.rollout.steps",
        ),
        (
            "GPU resource without a domain",
            with(json!({"ollama": {"models": ["m"], "gpus": 1, "gpuResourceName": "memory"}})),
            "spec.ollama.gpuResourceName",
        ),
        (
            "priority class with a space",
            with(json!({"podTemplate": {"priorityClassName": "Not Valid"}})),
            "spec.podTemplate.priorityClassName",
        ),
        (
            "storage class with a capital",
            with(json!({"history": {"mongodb": {"managed": {"storageClassName": "Fast SSD"}}}})),
            "spec.history.mongodb.managed.storageClassName",
        ),
        (
            "model storage class",
            with(json!({"ollama": {"models": ["m"], "storageClassName": "a_b"}})),
            "spec.ollama.storageClassName",
        ),
        (
            "ingress class",
            with(
                json!({"allowUnauthenticated": true, "ingress": {"host": "chat.example.com", "className": "Nginx!"}}),
            ),
            "spec.ingress.className",
        ),
        (
            "TLS secret name",
            with(
                json!({"allowUnauthenticated": true, "ingress": {"host": "chat.example.com", "tlsSecretName": "Chat_TLS"}}),
            ),
            "spec.ingress.tlsSecretName",
        ),
        (
            "image with a space",
            with(json!({"image": "chat service:1"})),
            "spec.image",
        ),
        (
            "back-end URL with user info",
            backend(json!({"url": "https://user:secret@llm.example.com"})),
            "spec.backends[0].url",
        ),
        (
            "cloud metadata address",
            backend(json!({"url": "http://169.254.169.254"})),
            "spec.backends[0].url",
        ),
        (
            "link-local address",
            backend(json!({"url": "http://169.254.10.1:8000"})),
            "spec.backends[0].url",
        ),
        (
            "IPv6 link-local address",
            backend(json!({"url": "http://[fe80::1]:8000"})),
            "spec.backends[0].url",
        ),
        (
            "GCE metadata host",
            backend(json!({"url": "http://metadata.google.internal"})),
            "spec.backends[0].url",
        ),
        (
            "URL ending in /v1",
            backend(json!({"url": "https://llm.example.com/v1"})),
            "spec.backends[0].url",
        ),
        (
            "API key over http to the internet",
            backend(json!({"url": "http://llm.example.com", "apiKeySecret": key})),
            "spec.backends[0].apiKeySecret",
        ),
        (
            "database admin",
            with(json!({"history": {"mongodb": {"database": "admin"}}})),
            "spec.history.mongodb.database",
        ),
        (
            "database local",
            with(json!({"history": {"mongodb": {"database": "local"}}})),
            "spec.history.mongodb.database",
        ),
        (
            "database config",
            with(json!({"history": {"mongodb": {"database": "config"}}})),
            "spec.history.mongodb.database",
        ),
        (
            "recentMessages 100000",
            with(json!({"history": {"redis": {"recentMessages": 100000}}})),
            "spec.history.redis.recentMessages",
        ),
        (
            "recentMessages 5000",
            with(json!({"history": {"redis": {"recentMessages": 5000}}})),
            "spec.history.redis.recentMessages",
        ),
        (
            "recent-history TTL of a year",
            with(json!({"history": {"redis": {"ttlSeconds": 31536000}}})),
            "spec.history.redis.ttlSeconds",
        ),
        (
            "cache TTL of a year",
            with(json!({"cache": {"ttlSeconds": 31536000}})),
            "spec.cache.ttlSeconds",
        ),
        (
            "system prompt above the budget",
            with(json!({"context": {"systemPrompt": "x".repeat(400), "maxContextTokens": 64}})),
            "spec.context.systemPrompt",
        ),
        (
            "system prompt above the default budget",
            with(json!({"context": {"systemPrompt": "y".repeat(16384)}})),
            "spec.context.systemPrompt",
        ),
        (
            "external Redis port 99999",
            with(
                json!({"history": {"redis": {"managed": null, "external": {"address": "cache.example.com:99999"}}}}),
            ),
            "spec.history.redis.external.address",
        ),
    ];
    let mut failures = rejection_failures(&api, cases).await;

    // Valid object names (DNS-1123 subdomains) that are no DNS-1035 label, which child Services need.
    for name in ["2chat", "chat.v2"] {
        match api
            .create(&Default::default(), &raw_chat_service(name, minimal_spec()))
            .await
        {
            Err(kube::Error::Api(status))
                if status.code == 422
                    && status.message.contains(&format!(
                        "metadata.name: Invalid value: {name:?}: metadata.name in body should match '{}'",
                        chat_operator::crd::NAME_PATTERN
                    )) => {}
            other => failures.push(format!("name {name:?}: {other:?}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Item: public exposure without auth is refused unless asked for, an Ingress needs a host.
#[tokio::test]
async fn public_exposure_without_auth_is_refused_unless_allowed() {
    let rig = Rig::shared();
    let (admin, ns) = rig.test_namespace("exposure").await;
    install(&admin).await;
    let api: Api<DynamicObject> =
        Api::namespaced_with(admin, &ns, &ApiResource::erase::<ChatService>(&()));
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "LoadBalancer without auth",
            with(json!({"service": {"type": "LoadBalancer"}})),
            "spec.service.type",
        ),
        (
            "NodePort without auth",
            with(json!({"service": {"type": "NodePort"}})),
            "spec.service.type",
        ),
        (
            "Ingress without auth",
            with(json!({"ingress": {"host": "chat.example.com"}})),
            "spec.ingress",
        ),
        (
            "LoadBalancer with allowUnauthenticated false",
            with(json!({"allowUnauthenticated": false, "service": {"type": "LoadBalancer"}})),
            "spec.service.type",
        ),
        (
            "Ingress without a host",
            with(json!({"allowUnauthenticated": true, "ingress": {}})),
            "spec.ingress.host",
        ),
    ];
    let mut failures = rejection_failures(&api, cases).await;

    let auth = json!({"apiKeysSecret": {"name": "keys", "key": "keys"}});
    let accepted = [
        (
            "LoadBalancer with auth",
            with(json!({"auth": auth, "service": {"type": "LoadBalancer"}})),
        ),
        (
            "Ingress with auth",
            with(json!({"auth": auth, "ingress": {"host": "chat.example.com"}})),
        ),
        (
            "NodePort, unauthenticated on purpose",
            with(json!({"allowUnauthenticated": true, "service": {"type": "NodePort"}})),
        ),
        (
            "ClusterIP without auth",
            with(json!({"service": {"type": "ClusterIP"}})),
        ),
    ];
    for (i, (what, spec)) in accepted.into_iter().enumerate() {
        if let Err(error) = api
            .create(
                &Default::default(),
                &raw_chat_service(&format!("ok{i}"), spec),
            )
            .await
        {
            failures.push(format!("{what}: refused: {error}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Specs the schema admits but a child would not: the running operator reports each as
/// `ConfigValid=False` with the field in the message, and applies nothing for it.
#[tokio::test]
async fn specs_only_the_operator_can_check_build_nothing() {
    let env = env("hostile-op").await;
    let operator = Operator::start(&env);
    let cases: Vec<(&str, serde_json::Value, &str, &str)> = vec![
        (
            "storage-lots",
            with(json!({"history": {"mongodb": {"managed": {"storage": "lots"}}}})),
            "InvalidQuantity",
            "spec.history.mongodb.managed.storage: \"lots\"",
        ),
        (
            "model-storage-negative",
            with(json!({"ollama": {"models": ["m"], "modelStorage": "-5Gi"}})),
            "InvalidQuantity",
            "spec.ollama.modelStorage: \"-5Gi\"",
        ),
        (
            "cpu-abc",
            with(json!({"resources": {"limits": {"cpu": "abc"}}})),
            "InvalidQuantity",
            "spec.resources.limits.cpu: \"abc\"",
        ),
        (
            "request-above-limit",
            with(
                json!({"resources": {"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}}}),
            ),
            "RequestAboveLimit",
            "spec.resources.requests.memory: the request",
        ),
        (
            "redis-request-above-limit",
            with(
                json!({"history": {"redis": {"managed": {"resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "500m"}}}}}}),
            ),
            "RequestAboveLimit",
            "spec.history.redis.managed.resources.requests.cpu",
        ),
        (
            "toleration-bogus",
            with(json!({"podTemplate": {"tolerations": [{"key": "k", "operator": "Bogus"}]}})),
            "InvalidToleration",
            "spec.podTemplate.tolerations[0].operator: \"Bogus\"",
        ),
        (
            "toleration-effect",
            with(
                json!({"podTemplate": {"tolerations": [{"key": "k", "operator": "Exists", "effect": "Sometimes"}]}}),
            ),
            "InvalidToleration",
            "spec.podTemplate.tolerations[0].effect",
        ),
        (
            "label-key",
            with(json!({"podTemplate": {"labels": {"bad key!": "x"}}})),
            "InvalidLabel",
            "spec.podTemplate.labels: key \"bad key!\"",
        ),
        (
            "label-value",
            with(json!({"podTemplate": {"labels": {"team": "a b"}}})),
            "InvalidLabel",
            "spec.podTemplate.labels[\"team\"]",
        ),
        (
            "node-selector-key",
            with(json!({"podTemplate": {"nodeSelector": {"-pool": "chat"}}})),
            "InvalidLabel",
            "spec.podTemplate.nodeSelector: key \"-pool\"",
        ),
        (
            "annotation-key",
            with(json!({"podTemplate": {"annotations": {"example.com/a/b": "x"}}})),
            "InvalidLabel",
            "spec.podTemplate.annotations: key \"example.com/a/b\"",
        ),
    ];
    let chat_services: Api<DynamicObject> = Api::namespaced_with(
        env.admin.clone(),
        &env.ns,
        &ApiResource::erase::<ChatService>(&()),
    );
    for (name, spec, _, _) in &cases {
        chat_services
            .create(&Default::default(), &raw_chat_service(name, spec.clone()))
            .await
            .unwrap_or_else(|e| panic!("{name}: the API server refused it: {e}"));
    }
    let mut failures = Vec::new();
    for (name, _, reason, message_start) in &cases {
        let cr = wait_condition(&env, name, "ConfigValid", "False").await;
        let condition = cr
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "ConfigValid"))
            .unwrap();
        if condition.reason != *reason || !condition.message.contains(message_start) {
            failures.push(format!(
                "{name}: expected {reason} with {message_start:?}, got {}: {}",
                condition.reason, condition.message
            ));
        }
    }
    // Nothing was built for any of them: no object of any child kind is owned by one.
    let uids: Vec<String> = Api::<ChatService>::namespaced(env.admin.clone(), &env.ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter_map(|cr| cr.uid())
        .collect();
    for kind in ChildKind::ALL {
        let api: Api<DynamicObject> =
            Api::namespaced_with(env.admin.clone(), &env.ns, &kind.api_resource());
        for object in api.list(&ListParams::default()).await.unwrap().items {
            if object
                .owner_references()
                .iter()
                .any(|o| uids.contains(&o.uid))
            {
                failures.push(format!(
                    "{kind:?} {} was built for a refused spec",
                    object.name_any()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    operator.stop().await;
}

/// Autoscaling on the per-pod custom metric while nothing serves the custom metrics API (the rig
/// registers no metrics adapter, as the test first proves by discovery): the HPA alone would only
/// record `FailedGetPodsMetric` events. The ChatService says so instead, naming the APIService
/// that is missing, while the rest of the stack (CPU scaling included) is still applied.
#[tokio::test]
async fn autoscaling_on_a_metric_no_adapter_serves_is_reported() {
    let env = env("hostile-metric").await;
    let discovery = http::Request::get("/apis/custom.metrics.k8s.io/v1beta1")
        .body(Vec::new())
        .unwrap();
    match env.admin.request_text(discovery).await {
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        other => panic!("the rig must not serve custom.metrics.k8s.io/v1beta1 here: {other:?}"),
    }
    let operator = Operator::start(&env);
    let spec = with(json!({"autoscaling": {
        "minReplicas": 1, "maxReplicas": 3,
        "targetCPUUtilizationPercentage": 70, "inFlightRequestsPerPod": 8,
    }}));
    let chat_services: Api<DynamicObject> = Api::namespaced_with(
        env.admin.clone(),
        &env.ns,
        &ApiResource::erase::<ChatService>(&()),
    );
    chat_services
        .create(&Default::default(), &raw_chat_service("scaled", spec))
        .await
        .expect("the API server accepts the spec: only the cluster lacks the adapter");
    // Degraded may first name a passing fault of the rollout; the metric's is the lasting one.
    let typed: Api<ChatService> = env.api();
    let cr = chat_rig::wait::until_object(
        &typed,
        "scaled",
        "to report Degraded=True with reason MetricsUnavailable",
        support::WAIT,
        |cr| {
            let conditions = &cr.status.as_ref()?.conditions;
            conditions
                .iter()
                .any(|c| {
                    c.type_ == "Degraded" && c.status == "True" && c.reason == "MetricsUnavailable"
                })
                .then(|| cr.clone())
        },
    )
    .await;
    let conditions = &cr.status.as_ref().unwrap().conditions;
    let degraded = conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
    for needle in [
        "autoscaling.inFlightRequestsPerPod",
        "custom.metrics.k8s.io/v1beta1",
        "APIService v1beta1.custom.metrics.k8s.io",
    ] {
        assert!(
            degraded.message.contains(needle),
            "the message does not name {needle:?}: {}",
            degraded.message
        );
    }
    let config_valid = conditions
        .iter()
        .find(|c| c.type_ == "ConfigValid")
        .unwrap();
    assert_eq!(config_valid.status, "True", "{conditions:#?}");
    // Not a half-built stack either: the HPA (its CPU target works without an adapter) is there.
    let hpas: Api<k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler> = env.api();
    chat_rig::wait::until_exists(&hpas, "scaled", support::WAIT).await;
    operator.stop().await;
}
