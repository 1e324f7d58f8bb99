//! Every manifest in `examples/` applied as a user would (server-side apply of each document, the
//! Secrets it ships included) to the rig's real API server, with the operator running under the
//! chart's RBAC; each must reach its documented conditions and produce the children it promises.
//! There is no kubelet here, so managed pods never become ready: the expected conditions say so.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use chat_config::{Config, RateLimitKey, Strategy};
use chat_operator::crd::ChatService;
use chat_rig::wait::{absent_for, until_exists, until_object};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde::Deserialize;
use support::chat_service::condition;
use support::{Env, Operator, WAIT, env};

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Applies every document of an example into the test namespace; returns the ChatService's name.
async fn apply_example(env: &Env, file: &str) -> String {
    let text = std::fs::read_to_string(examples_dir().join(file)).unwrap();
    let mut chat_service = None;
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_yaml::Value::deserialize(document).unwrap();
        if value.is_null() {
            continue;
        }
        let object: DynamicObject = serde_yaml::from_value(value)
            .unwrap_or_else(|e| panic!("{file}: a document is not a Kubernetes object: {e}"));
        let types = object.types.clone().expect("apiVersion and kind");
        let gvk = GroupVersionKind::try_from(&types).unwrap();
        let resource = ApiResource::from_gvk(&gvk);
        if types.kind == "ChatService" {
            chat_service = Some(object.name_any());
        }
        Api::<DynamicObject>::namespaced_with(env.admin.clone(), &env.ns, &resource)
            .patch(
                &object.name_any(),
                &PatchParams::apply("examples-test"),
                &Patch::Apply(&object),
            )
            .await
            .unwrap_or_else(|e| panic!("{file}: applying {} failed: {e}", object.name_any()));
    }
    chat_service.unwrap_or_else(|| panic!("{file} has no ChatService"))
}

/// How long a child the operator must not make is watched for.
const ABSENT: Duration = Duration::from_secs(1);

/// Waits until the ChatService's status is current and its conditions match `expected`
/// (type, status, reason); on timeout the panic shows the conditions last seen and the Events.
async fn wait_conditions(env: &Env, name: &str, expected: &[(&str, &str, &str)]) -> ChatService {
    let api: Api<ChatService> = env.api();
    let what = format!("to report {expected:?} for its current generation");
    until_object(&api, name, &what, WAIT, |cr| {
        let current =
            cr.status.as_ref().and_then(|s| s.observed_generation) == cr.metadata.generation;
        let matches = expected.iter().all(|(type_, status, reason)| {
            condition(cr, type_) == Some((status.to_string(), reason.to_string()))
        });
        (current && matches).then(|| cr.clone())
    })
    .await
}

async fn rendered_config(env: &Env, name: &str) -> Config {
    let map: ConfigMap = until_exists(&env.api(), &format!("{name}-config"), WAIT).await;
    Config::from_yaml(&map.data.unwrap()["config.yaml"]).unwrap()
}

async fn connection(env: &Env, name: &str) -> BTreeMap<String, String> {
    let secret: Secret = until_exists(&env.api(), &format!("{name}-connection"), WAIT).await;
    secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8(v.0).unwrap()))
        .collect()
}

const CONFIG_VALID: (&str, &str, &str) = ("ConfigValid", "True", "Valid");

#[tokio::test]
async fn every_example_has_a_test_here() {
    let mut files: Vec<String> = std::fs::read_dir(examples_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".yaml"))
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "autoscaling.yaml",
            "external-stores.yaml",
            "managed-ollama-gpu.yaml",
            "minimal.yaml",
            "multi-backend.yaml",
            "rollout.yaml"
        ],
        "a new example needs a test in operator/tests/examples.rs"
    );
}

#[tokio::test]
async fn minimal_example_builds_managed_stores_and_waits_for_their_pods() {
    let env = env("ex-minimal").await;
    let _operator = Operator::start(&env);
    let name = apply_example(&env, "minimal.yaml").await;
    wait_conditions(
        &env,
        &name,
        &[
            CONFIG_VALID,
            ("StorageReady", "False", "WaitingForPods"),
            ("BackendsReady", "True", "Configured"),
            ("Ready", "False", "StorageNotReady"),
        ],
    )
    .await;
    let _: Deployment = until_exists(&env.api(), &format!("{name}-redis"), WAIT).await;
    let _: StatefulSet = until_exists(&env.api(), &format!("{name}-mongodb"), WAIT).await;
    let config = rendered_config(&env, &name).await;
    assert_eq!(config.models.default, "gemma3-270m");
    assert_eq!(
        config.backends[0].url,
        "http://ollama.ai-models.svc.cluster.local:11434"
    );
    let urls = connection(&env, &name).await;
    assert!(urls["redis-url"].starts_with("redis://:"), "{urls:?}");
    assert!(
        urls["redis-url"].ends_with(&format!("@{name}-redis.{}.svc:6379/0", env.ns)),
        "{urls:?}"
    );
    assert!(
        urls["uri"].contains(&format!("@{name}-mongodb.{}.svc:27017/", env.ns)),
        "{urls:?}"
    );
}

#[tokio::test]
async fn external_stores_example_wires_elasticache_and_documentdb_without_running_either() {
    let env = env("ex-external").await;
    let _operator = Operator::start(&env);
    let name = apply_example(&env, "external-stores.yaml").await;
    wait_conditions(
        &env,
        &name,
        &[
            CONFIG_VALID,
            // Never contacted (no chat pod runs here): not claimed ready.
            ("StorageReady", "Unknown", "NotVerified"),
            ("BackendsReady", "True", "Configured"),
        ],
    )
    .await;
    let urls = connection(&env, &name).await;
    assert_eq!(
        urls["redis-url"],
        "rediss://:replace-with-the-elasticache-auth-token@master.chat-cache.abc123.euw1.cache.amazonaws.com:6379/0"
    );
    let uri = &urls["uri"];
    assert!(
        uri.starts_with(
            "mongodb://chat:replace-me@docdb.cluster-abc.eu-west-1.docdb.amazonaws.com:27017/?"
        ),
        "{uri}"
    );
    for param in [
        "replicaSet=rs0",
        "tls=true",
        "retryWrites=false",
        "tlsCAFile=",
    ] {
        assert!(uri.contains(param), "{param} missing from {uri}");
    }
    // The operator runs no store of its own for this ChatService.
    absent_for(&env.api::<Deployment>(), &format!("{name}-redis"), ABSENT).await;
    absent_for(
        &env.api::<StatefulSet>(),
        &format!("{name}-mongodb"),
        ABSENT,
    )
    .await;
    // The DocumentDB CA bundle reaches the chat pods as a file.
    let deployment: Deployment = until_exists(&env.api(), &name, WAIT).await;
    let pod = deployment.spec.unwrap().template.spec.unwrap();
    let mounts = pod.containers[0].volume_mounts.clone().unwrap_or_default();
    assert!(
        mounts
            .iter()
            .any(|m| m.mount_path == "/var/run/chat-service/mongodb-ca"),
        "{mounts:?}"
    );
    let mut config = rendered_config(&env, &name).await;
    assert_eq!(config.history.mongodb.database, "support");
    assert_eq!(config.history.redis.ttl_seconds, 86400);
    assert_eq!(config.history.mongodb.retry_writes, Some(false));
    // Both CA Secrets land, as kubelet would project them, where the rendered config says, and
    // chat-config's start-up check (readable, PEM) accepts them.
    let root = chat_rig::scratch_dir("ex-external-ca").unwrap();
    for volume in pod.volumes.unwrap_or_default() {
        let Some(source) = volume.secret else {
            continue;
        };
        let mount = mounts.iter().find(|m| m.name == volume.name).unwrap();
        let secret: Secret = env
            .api()
            .get(source.secret_name.as_deref().unwrap())
            .await
            .unwrap();
        for item in source.items.unwrap_or_default() {
            let file = root
                .join(mount.mount_path.trim_start_matches('/'))
                .join(&item.path);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            let data = secret.data.as_ref().unwrap()[&item.key].0.clone();
            std::fs::write(file, data).unwrap();
        }
    }
    for tls in [
        &mut config.history.redis.tls,
        &mut config.history.mongodb.tls,
    ] {
        let tls = tls
            .as_mut()
            .expect("TLS with a CA file for both external stores");
        tls.ca_file = root
            .join(tls.ca_file.trim_start_matches('/'))
            .display()
            .to_string();
    }
    config.check_store_files().unwrap();
}

#[tokio::test]
async fn managed_ollama_example_asks_for_gpus_and_waits_for_the_model_pods() {
    let env = env("ex-gpu").await;
    let _operator = Operator::start(&env);
    let name = apply_example(&env, "managed-ollama-gpu.yaml").await;
    wait_conditions(
        &env,
        &name,
        &[
            CONFIG_VALID,
            ("BackendsReady", "False", "WaitingForPods"),
            ("Ready", "False", "StorageNotReady"),
        ],
    )
    .await;
    let ollama: StatefulSet = until_exists(&env.api(), &format!("{name}-ollama"), WAIT).await;
    let spec = ollama.spec.unwrap();
    assert_eq!(spec.replicas, Some(2));
    let container = &spec.template.spec.unwrap().containers[0];
    let limits = container
        .resources
        .as_ref()
        .and_then(|r| r.limits.clone())
        .unwrap_or_default();
    assert_eq!(
        limits.get("nvidia.com/gpu").map(|q| q.0.as_str()),
        Some("1"),
        "{limits:?}"
    );
    let config = rendered_config(&env, &name).await;
    assert_eq!(config.models.default, "gemma3:270m");
    assert_eq!(config.routing.strategy, Strategy::SessionAffinity);
    let managed = &config.backends[0];
    assert_eq!(
        managed.discover_dns.as_deref(),
        Some(format!("{name}-ollama.{}.svc", env.ns).as_str()),
        "the chat service balances over the Ollama pods one by one"
    );
}

#[tokio::test]
async fn autoscaling_example_scales_on_cpu_and_requests_in_flight() {
    let env = env("ex-hpa").await;
    let _operator = Operator::start(&env);
    let name = apply_example(&env, "autoscaling.yaml").await;
    wait_conditions(&env, &name, &[CONFIG_VALID]).await;
    let hpa: HorizontalPodAutoscaler = until_exists(&env.api(), &name, WAIT).await;
    let spec = hpa.spec.unwrap();
    assert_eq!((spec.min_replicas, spec.max_replicas), (Some(2), 10));
    assert_eq!(spec.scale_target_ref.name, name);
    let metrics = spec.metrics.unwrap();
    let cpu = metrics
        .iter()
        .find_map(|m| m.resource.as_ref())
        .expect("a CPU metric");
    assert_eq!(cpu.name, "cpu");
    assert_eq!(cpu.target.average_utilization, Some(70));
    let pods = metrics
        .iter()
        .find_map(|m| m.pods.as_ref())
        .expect("a custom per-pod metric");
    assert_eq!(pods.metric.name, "chat_requests_in_flight");
    assert_eq!(
        pods.target.average_value.as_ref().map(|q| q.0.as_str()),
        Some("8")
    );
    let behavior = spec.behavior.expect("scale-down stabilisation");
    assert_eq!(
        behavior.scale_down.unwrap().stabilization_window_seconds,
        Some(120)
    );
    // The HPA owns the replica count: the operator leaves spec.replicas to it.
    let deployment: Deployment = until_exists(&env.api(), &name, WAIT).await;
    let owned_by_operator = deployment
        .managed_fields()
        .iter()
        .filter(|f| f.manager.as_deref() == Some("chat-operator"))
        .any(|f| {
            f.fields_v1
                .as_ref()
                .is_some_and(|v| v.0.pointer("/f:spec/f:replicas").is_some())
        });
    assert!(
        !owned_by_operator,
        "the operator must not own spec.replicas"
    );
}

#[tokio::test]
async fn multi_backend_example_renders_routing_rate_limits_cache_and_keys() {
    let env = env("ex-routed").await;
    let _operator = Operator::start(&env);
    let name = apply_example(&env, "multi-backend.yaml").await;
    wait_conditions(
        &env,
        &name,
        &[CONFIG_VALID, ("BackendsReady", "True", "Configured")],
    )
    .await;
    let config = rendered_config(&env, &name).await;
    let backends: Vec<(&str, u32, Vec<String>)> = config
        .backends
        .iter()
        .map(|b| (b.name.as_str(), b.weight, b.models.clone()))
        .collect();
    assert_eq!(
        backends,
        [
            ("ollama-a", 2, vec!["gemma3-270m".to_string()]),
            ("ollama-b", 1, vec!["gemma3-270m".to_string()]),
            ("hosted", 1, vec!["large-model".to_string()]),
        ]
    );
    assert_eq!(config.routing.strategy, Strategy::LeastInFlight);
    assert_eq!(config.routing.max_attempts, 2);
    assert_eq!(config.routing.breaker_failures, 5);
    assert_eq!(config.routing.breaker_cooldown_seconds, 30);
    assert_eq!(config.routing.max_in_flight_per_backend, 4);
    assert_eq!(config.routing.queue_depth, 8);
    assert!(config.rate_limit.enabled);
    assert_eq!(config.rate_limit.requests_per_window, 60);
    assert_eq!(config.rate_limit.tokens_per_window, 50000);
    assert_eq!(config.rate_limit.key_by, RateLimitKey::ApiKey);
    assert!(config.cache.enabled && config.cache.ttl_seconds == 600);
    assert!(config.auth.enabled);
    let mut allowed = config.allowed_models();
    allowed.sort();
    assert_eq!(allowed, ["gemma3-270m", "large-model"]);
    // The hosted back end's key reaches the pods from the user's Secret, never through the config.
    let deployment: Deployment = until_exists(&env.api(), &name, WAIT).await;
    let container = deployment.spec.unwrap().template.spec.unwrap().containers[0].clone();
    let key_env = container
        .env
        .unwrap_or_default()
        .into_iter()
        .find(|e| Some(e.name.as_str()) == config.backends[2].api_key_env.as_deref())
        .expect("the hosted back end's key variable");
    let from = key_env.value_from.unwrap().secret_key_ref.unwrap();
    assert_eq!(
        (from.name.as_str(), from.key.as_str()),
        ("hosted-llm", "api-key")
    );
    let rendered = serde_yaml::to_string(&config).unwrap();
    assert!(
        !rendered.contains("replace-with"),
        "secrets leaked into the config: {rendered}"
    );
}

#[tokio::test]
async fn rollout_example_starts_at_its_first_step_and_renders_the_split() {
    let env = env("ex-rollout").await;
    let _operator = Operator::start(&env);
    let name = apply_example(&env, "rollout.yaml").await;
    wait_conditions(&env, &name, &[CONFIG_VALID]).await;
    let api: Api<ChatService> = env.api();
    let cr = until_object(&api, &name, "to show its rollout", WAIT, |cr| {
        cr.status
            .as_ref()
            .and_then(|s| s.rollout.clone())
            .map(|_| cr.clone())
    })
    .await;
    let rollout = cr.status.unwrap().rollout.unwrap();
    assert_eq!(rollout.phase, chat_operator::crd::RolloutPhase::Progressing);
    assert_eq!(
        (
            rollout.step,
            rollout.candidate_weight_percent,
            rollout.current_weight_percent
        ),
        (0, 5, 95),
        "{rollout:?}"
    );
    // No kubelet here: no chat pod reports figures, so the first step holds and says why.
    let config = rendered_config(&env, &name).await;
    let split = config.rollout.expect("the split is rendered");
    assert_eq!(split.candidate_backend.as_deref(), Some("ollama-next"));
    assert_eq!(split.candidate_weight_percent, 5);
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(env.admin.clone(), &env.ns);
    let started = || async {
        let list = events.list(&Default::default()).await.unwrap();
        let reasons: Vec<String> = list.items.into_iter().filter_map(|e| e.reason).collect();
        reasons
            .iter()
            .filter(|r| r.as_str() == "RolloutStarted")
            .count()
    };
    chat_rig::eventually("a RolloutStarted Event", WAIT, || async {
        (started().await > 0).then_some(())
    })
    .await;
    // Later reconciles (every 10 s while a step runs) hold the step: no second announcement.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(started().await, 1, "one Event per transition");
}
