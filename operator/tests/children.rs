//! What the operator builds from a ChatService on the rig's real API server, and what it takes
//! away: every child of a full spec, children pruned when a feature is turned off, garbage
//! collection on deletion, a missing Secret reported in the status, and the replica count handed
//! to the HPA. The operator runs in-process under the chart's RBAC (see `support`).

mod support;

use chat_operator::crd::ChatService;
use chat_rig::eventually;
use chat_rig::wait::{until_exists, until_gone};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use support::chat_service::{
    chat_service, checksum, condition, create, json_merge, merge_spec, minimal_spec, wait_condition,
};
use support::snapshot::{settle, snapshot};
use support::{Operator, WAIT, env, wait_reconciles};

#[tokio::test]
async fn create_builds_every_child_and_a_resync_writes_nothing() {
    let env = env("create").await;
    let operator = Operator::start(&env);
    let mut spec = minimal_spec();
    json_merge(
        &mut spec,
        json!({"ollama": {"models": ["gemma3:270m"], "gpus": 1, "modelStorage": "2Gi"},
        "autoscaling": {"minReplicas": 2, "maxReplicas": 4, "targetCPUUtilizationPercentage": 70}}),
    );
    create(&env, &chat_service("chat", spec)).await;

    let deployment: Deployment = until_exists(&env.api(), "chat", WAIT).await;
    let dspec = deployment.spec.as_ref().unwrap();
    let ours = deployment
        .managed_fields()
        .iter()
        .find(|m| m.manager.as_deref() == Some("chat-operator"))
        .expect("chat-operator manages the Deployment");
    let fields = serde_json::to_string(&ours.fields_v1).unwrap();
    assert!(
        !fields.contains("f:replicas"),
        "with autoscaling the HPA owns replicas: {fields}"
    );
    let pod = dspec.template.spec.as_ref().unwrap();
    let container = &pod.containers[0];
    assert_eq!(
        container
            .security_context
            .as_ref()
            .unwrap()
            .read_only_root_filesystem,
        Some(true)
    );
    assert!(container.readiness_probe.is_some() && container.liveness_probe.is_some());
    assert_eq!(pod.service_account_name.as_deref(), Some("chat"));
    assert!(!checksum(&deployment).is_empty());
    let owner = &deployment.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("ChatService", Some(true))
    );

    let config: ConfigMap = until_exists(&env.api(), "chat-config", WAIT).await;
    let text = &config.data.unwrap()["config.yaml"];
    chat_config::Config::from_yaml(text).expect("the rendered config is valid for the service");
    let connection: Secret = until_exists(&env.api(), "chat-connection", WAIT).await;
    let uri = String::from_utf8(connection.data.unwrap()["uri"].0.clone()).unwrap();
    assert!(
        uri.starts_with("mongodb://chat:")
            && uri.contains(&format!("chat-mongodb.{}.svc:27017", env.ns))
    );
    let _: Service = until_exists(&env.api(), "chat", WAIT).await;
    let _: ServiceAccount = until_exists(&env.api(), "chat", WAIT).await;
    let _: PodDisruptionBudget = until_exists(&env.api(), "chat", WAIT).await;
    let hpa: HorizontalPodAutoscaler = until_exists(&env.api(), "chat", WAIT).await;
    assert_eq!(hpa.spec.unwrap().max_replicas, 4);
    let _: Deployment = until_exists(&env.api(), "chat-redis", WAIT).await;
    let _: Service = until_exists(&env.api(), "chat-redis", WAIT).await;
    let _: Secret = until_exists(&env.api(), "chat-redis-password", WAIT).await;
    let _: StatefulSet = until_exists(&env.api(), "chat-mongodb", WAIT).await;
    let _: Secret = until_exists(&env.api(), "chat-mongodb-credentials", WAIT).await;
    let mongo_service: Service = until_exists(&env.api(), "chat-mongodb", WAIT).await;
    assert_eq!(
        mongo_service.spec.unwrap().cluster_ip.as_deref(),
        Some("None")
    );
    let ollama: StatefulSet = until_exists(&env.api(), "chat-ollama", WAIT).await;
    let ollama_pod = ollama.spec.unwrap().template.spec.unwrap();
    assert_eq!(ollama_pod.init_containers.unwrap()[0].name, "pull-models");
    assert_eq!(
        ollama_pod.containers[0]
            .resources
            .as_ref()
            .unwrap()
            .limits
            .as_ref()
            .unwrap()["nvidia.com/gpu"]
            .0,
        "1"
    );
    for name in ["chat-redis", "chat-mongodb", "chat-ollama"] {
        let _: NetworkPolicy = until_exists(&env.api(), name, WAIT).await;
    }

    // No kubelet: pods never run, and the status says so instead of claiming readiness.
    let cr = wait_condition(&env, "chat", "ConfigValid", "True").await;
    let status = cr.status.clone().unwrap();
    assert_eq!(status.observed_generation, cr.metadata.generation);
    assert_eq!(status.connection_secret.as_deref(), Some("chat-connection"));
    assert_eq!(status.endpoint, Some(format!("http://chat.{}.svc", env.ns)));
    assert_eq!(condition(&cr, "Ready").unwrap().0, "False");
    assert_eq!(
        condition(&cr, "StorageReady").unwrap(),
        ("False".into(), "WaitingForPods".into())
    );

    // Settle first: kube-controller-manager writes workload and HPA status for a while and the
    // ChatService status rightly follows it. Settled means a 3 s window (over a resync) with no
    // change.
    settle(&env, "the ChatService and its children to settle").await;
    // Converged: several resyncs (every 2 s, counted on /metrics so they provably ran) must not
    // write anything the operator owns.
    let before = snapshot(&env).await;
    wait_reconciles(&operator, 3).await;
    let after = snapshot(&env).await;
    assert_eq!(
        before, after,
        "a resync of a converged ChatService wrote something"
    );
    operator.stop().await;
}

#[tokio::test]
async fn features_turned_off_are_pruned_and_deletion_collects_children() {
    let env = env("prune").await;
    let operator = Operator::start(&env);
    let secrets: Api<Secret> = Api::namespaced(env.admin.clone(), &env.ns);
    let mut spec = minimal_spec();
    json_merge(
        &mut spec,
        json!({"autoscaling": {"maxReplicas": 3, "targetCPUUtilizationPercentage": 60}}),
    );
    create(&env, &chat_service("chat", spec)).await;
    let _: HorizontalPodAutoscaler = until_exists(&env.api(), "chat", WAIT).await;
    let _: Deployment = until_exists(&env.api(), "chat-redis", WAIT).await;
    let password: Secret = until_exists(&env.api(), "chat-redis-password", WAIT).await;

    // The generated password survives reconciles untouched.
    wait_reconciles(&operator, 2).await;
    assert_eq!(
        secrets.get("chat-redis-password").await.unwrap().data,
        password.data
    );

    let redis_auth: Secret = serde_json::from_value(
        json!({"metadata": {"name": "redis-auth"}, "stringData": {"token": "t0ken"}}),
    )
    .unwrap();
    secrets
        .create(&PostParams::default(), &redis_auth)
        .await
        .unwrap();
    merge_spec(&env, "chat", json!({
        "autoscaling": null,
        "history": {"redis": {"managed": null, "external": {"address": "cache.example.com:6379", "tls": true,
            "passwordSecret": {"name": "redis-auth", "key": "token"}}}},
    }))
    .await;
    until_gone(&env.api::<HorizontalPodAutoscaler>(), "chat", WAIT).await;
    until_gone(&env.api::<Deployment>(), "chat-redis", WAIT).await;
    until_gone(&env.api::<Service>(), "chat-redis", WAIT).await;
    until_gone(&env.api::<NetworkPolicy>(), "chat-redis", WAIT).await;
    until_gone(&env.api::<Secret>(), "chat-redis-password", WAIT).await;
    let connection = eventually(
        "the connection Secret to use external Redis",
        WAIT,
        || async {
            let s = secrets.get("chat-connection").await.ok()?;
            let url = String::from_utf8(s.data?.get("redis-url")?.0.clone()).ok()?;
            url.starts_with("rediss://").then_some(url)
        },
    )
    .await;
    assert_eq!(connection, "rediss://:t0ken@cache.example.com:6379/0");
    // The user's own Secret is never pruned.
    assert!(secrets.get_opt("redis-auth").await.unwrap().is_some());

    Api::<ChatService>::namespaced(env.admin.clone(), &env.ns)
        .delete("chat", &DeleteParams::default())
        .await
        .unwrap();
    until_gone(&env.api::<Deployment>(), "chat", WAIT).await;
    until_gone(&env.api::<StatefulSet>(), "chat-mongodb", WAIT).await;
    until_gone(&env.api::<ConfigMap>(), "chat-config", WAIT).await;
    until_gone(&env.api::<Secret>(), "chat-connection", WAIT).await;
    // The MongoDB volume is retained by default, and so is the key to it (storage_lifecycle.rs).
    let credentials = secrets.get("chat-mongodb-credentials").await.unwrap();
    assert!(credentials.metadata.owner_references.is_none());
    operator.stop().await;
}

#[tokio::test]
async fn missing_secret_reports_config_invalid_then_recovers() {
    let env = env("secret").await;
    let operator = Operator::start(&env);
    let mut spec = minimal_spec();
    json_merge(
        &mut spec,
        json!({"auth": {"apiKeysSecret": {"name": "api-keys", "key": "keys"}}}),
    );
    create(&env, &chat_service("chat", spec)).await;
    let cr = wait_condition(&env, "chat", "ConfigValid", "False").await;
    let invalid = cr
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "ConfigValid")
        .unwrap()
        .clone();
    assert_eq!(invalid.reason, "SecretMissing");
    assert!(
        invalid.message.contains("spec.auth.apiKeysSecret") && invalid.message.contains("api-keys"),
        "{}",
        invalid.message
    );
    assert!(
        Api::<Deployment>::namespaced(env.admin.clone(), &env.ns)
            .get_opt("chat")
            .await
            .unwrap()
            .is_none()
    );

    // Several resyncs later: still one Warning Event, and the condition time has not moved.
    wait_reconciles(&operator, 3).await;
    let events: Api<Event> = Api::namespaced(env.admin.clone(), &env.ns);
    let warnings: Vec<_> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("ConfigValidFalse"))
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].series.is_none(),
        "the Event repeated: {:?}",
        warnings[0].series
    );
    let again = Api::<ChatService>::namespaced(env.admin.clone(), &env.ns)
        .get("chat")
        .await
        .unwrap();
    let still = again
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "ConfigValid")
        .unwrap();
    assert_eq!(still.last_transition_time, invalid.last_transition_time);

    // The Secret appears: the watch re-runs the reconcile and the stack is built.
    let keys: Secret = serde_json::from_value(
        json!({"metadata": {"name": "api-keys"}, "stringData": {"keys": "k1\nk2"}}),
    )
    .unwrap();
    Api::<Secret>::namespaced(env.admin.clone(), &env.ns)
        .create(&PostParams::default(), &keys)
        .await
        .unwrap();
    wait_condition(&env, "chat", "ConfigValid", "True").await;
    let _: Deployment = until_exists(&env.api(), "chat", WAIT).await;
    operator.stop().await;
}

/// A tokenizer ConfigMap that does not exist yet: `ConfigValid=False` naming the field; once it
/// is created (gzipped, so in `binaryData`, as `kubectl create configmap --from-file` writes a
/// `.gz` file) the watch re-runs the reconcile, the chat pods mount it, and a new tokenizer in
/// the same ConfigMap rolls them.
#[tokio::test]
async fn a_tokenizer_configmap_that_appears_later_is_mounted_and_its_change_rolls_the_pods() {
    use k8s_openapi::ByteString;
    let env = env("tokenizer").await;
    let operator = Operator::start(&env);
    let mut spec = minimal_spec();
    json_merge(
        &mut spec,
        json!({"context": {"tokenizers": [{"model": "gemma3:270m",
            "configMap": {"name": "gemma-tokenizer", "key": "tokenizer.json.gz"}}]}}),
    );
    create(&env, &chat_service("chat", spec)).await;
    let cr = wait_condition(&env, "chat", "ConfigValid", "False").await;
    let invalid = cr
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "ConfigValid")
        .unwrap();
    assert_eq!(invalid.reason, "ConfigMapMissing", "{invalid:?}");
    assert!(
        invalid
            .message
            .contains("spec.context.tokenizers[0].configMap: ConfigMap \"gemma-tokenizer\""),
        "{}",
        invalid.message
    );

    let config_maps: Api<ConfigMap> = Api::namespaced(env.admin.clone(), &env.ns);
    // The first bytes of a gzip stream are all the operator looks at; the chat service
    // decompresses (the real-node test loads a real tokenizer this way).
    let gzip = |tail: u8| ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some("gemma-tokenizer".into()),
            ..Default::default()
        },
        binary_data: Some(
            [(
                "tokenizer.json.gz".to_string(),
                ByteString(vec![0x1f, 0x8b, 0x08, 0x00, tail]),
            )]
            .into(),
        ),
        ..Default::default()
    };
    config_maps
        .create(&PostParams::default(), &gzip(1))
        .await
        .unwrap();
    wait_condition(&env, "chat", "ConfigValid", "True").await;
    let deployments: Api<Deployment> = Api::namespaced(env.admin.clone(), &env.ns);
    let deployment: Deployment = until_exists(&deployments, "chat", WAIT).await;
    let first = checksum(&deployment);
    let volume = deployment
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .volumes
        .into_iter()
        .flatten()
        .find(|v| v.name == "tokenizer-0")
        .and_then(|v| v.config_map)
        .expect("the tokenizer volume");
    assert_eq!(volume.name, "gemma-tokenizer");

    config_maps
        .replace("gemma-tokenizer", &PostParams::default(), &{
            let mut next = gzip(2);
            next.metadata.resource_version = config_maps
                .get("gemma-tokenizer")
                .await
                .unwrap()
                .metadata
                .resource_version;
            next
        })
        .await
        .unwrap();
    eventually("a new tokenizer to roll the chat pods", WAIT, || async {
        let d = deployments.get("chat").await.ok()?;
        (checksum(&d) != first).then_some(())
    })
    .await;
    operator.stop().await;
}

/// Turning autoscaling on hands `spec.replicas` to the HPA without a dip: dropping the field
/// from the operator's apply would otherwise let the API server default it to 1, scaling a
/// busy Deployment down until the HPA reacts.
#[tokio::test]
async fn turning_autoscaling_on_keeps_the_running_replica_count() {
    let env = env("handoff").await;
    let _operator = Operator::start(&env);
    let mut spec = minimal_spec();
    json_merge(&mut spec, json!({"replicas": 3}));
    create(&env, &chat_service("chat", spec)).await;
    let deployments: Api<Deployment> = Api::namespaced(env.admin.clone(), &env.ns);
    eventually("the Deployment with 3 replicas", WAIT, || async {
        let d = deployments.get_opt("chat").await.ok()??;
        (d.spec?.replicas == Some(3)).then_some(())
    })
    .await;

    merge_spec(
        &env,
        "chat",
        json!({"autoscaling": {"minReplicas": 2, "maxReplicas": 6, "targetCPUUtilizationPercentage": 70}}),
    )
    .await;
    let _: HorizontalPodAutoscaler = until_exists(&env.api(), "chat", WAIT).await;
    let api: Api<ChatService> = Api::namespaced(env.admin.clone(), &env.ns);
    eventually("the autoscaling change to be reconciled", WAIT, || async {
        let cr = api.get("chat").await.ok()?;
        (cr.status?.observed_generation == cr.metadata.generation).then_some(())
    })
    .await;

    let deployment = deployments.get("chat").await.unwrap();
    assert_eq!(
        deployment.spec.as_ref().unwrap().replicas,
        Some(3),
        "the running replica count survives the hand-over to the HPA"
    );
    let operator_owns_replicas = deployment
        .metadata
        .managed_fields
        .unwrap_or_default()
        .iter()
        .filter(|m| m.manager.as_deref() == Some(chat_operator::build::FIELD_MANAGER))
        .any(|m| {
            m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.pointer("/f:spec/f:replicas").is_some())
        });
    assert!(
        !operator_owns_replicas,
        "the operator no longer owns spec.replicas once the HPA does"
    );
}
