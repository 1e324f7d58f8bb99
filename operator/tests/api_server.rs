//! The operator against the rig's real kube-apiserver and kube-controller-manager. The operator
//! runs in-process, scoped to the test's namespace, under the identity of a ServiceAccount bound
//! to the chart's ClusterRole (by impersonation), so every test also proves the RBAC sufficient.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chat_operator::crd::ChatService;
use chat_operator::leader::LeaseSettings;
use chat_rig::{Rig, eventually};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use support::{
    Env, OPERATOR_SA, Operator, WAIT, condition, env, install, wait_condition, wait_for,
};

mod support;

/// Runs the operator on a client that records every request it sends.
async fn start_counted(env: &Env) -> (Operator, Requests) {
    let requests = Requests::default();
    let client = requests.client(env).await;
    (Operator::start_client(env, client, None), requests)
}

/// The config of `env.operator_client` (the operator's identity, by impersonation), for clients
/// that add a tower layer of their own.
async fn operator_kube_config(env: &Env) -> kube::Config {
    let rig = Rig::shared();
    let kubeconfig = kube::config::Kubeconfig::read_from(rig.kubeconfig_path()).unwrap();
    let mut config = kube::config::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    config.auth_info.impersonate = Some(format!("system:serviceaccount:{}:{OPERATOR_SA}", env.ns));
    config.auth_info.impersonate_groups = Some(vec![
        "system:serviceaccounts".into(),
        "system:authenticated".into(),
    ]);
    config
}

/// Requests an operator's client sent, as "METHOD path?query", recorded by a tower layer on
/// the client itself (no mock: the requests go on to the real API server).
#[derive(Clone, Default)]
struct Requests(Arc<Mutex<Vec<String>>>);

impl Requests {
    /// A client like `env.operator_client` (same identity) that records into `self`.
    async fn client(&self, env: &Env) -> Client {
        let config = operator_kube_config(env).await;
        let log = self.0.clone();
        let record =
            tower::util::MapRequestLayer::new(move |request: http::Request<kube::client::Body>| {
                let uri = request.uri();
                log.lock().unwrap().push(format!(
                    "{} {}?{}",
                    request.method(),
                    uri.path(),
                    uri.query().unwrap_or("")
                ));
                request
            });
        kube::client::ClientBuilder::try_from(config)
            .unwrap()
            .with_layer(&record)
            .build()
    }

    fn clear(&self) {
        self.0.lock().unwrap().clear();
    }

    /// Requests that write (every method but GET; server-side apply is a PATCH).
    fn writes(&self) -> Vec<String> {
        self.matching(|r| !r.starts_with("GET "))
    }

    /// GETs that are not watches (single reads and LISTs).
    fn reads(&self) -> Vec<String> {
        self.matching(|r| r.starts_with("GET ") && !r.contains("watch=true"))
    }

    fn matching(&self, keep: impl Fn(&str) -> bool) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|r| keep(r))
            .cloned()
            .collect()
    }
}

/// Waits until the operator has started `more` reconciles beyond those it has started now.
async fn wait_reconciles(operator: &Operator, more: u64) {
    let start = operator.reconciles().await;
    eventually(&format!("{more} more reconciles"), WAIT, || async {
        (operator.reconciles().await >= start + more).then_some(())
    })
    .await;
}

fn chat_service(name: &str, spec: serde_json::Value) -> ChatService {
    serde_json::from_value(json!({
        "apiVersion": "chatoperator.dev/v1alpha1",
        "kind": "ChatService",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap()
}

fn minimal_spec() -> serde_json::Value {
    json!({
        "backends": [{"name": "vllm", "url": "http://vllm.ml:8000", "protocol": "openai"}],
        "models": {"default": "gemma3:270m"},
        "history": {"redis": {"managed": {}}, "mongodb": {"managed": {}}},
    })
}

/// A ChatService as untyped JSON, exactly as written (no client-side defaults or checks).
fn raw_chat_service(name: &str, spec: serde_json::Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "chatoperator.dev/v1alpha1",
        "kind": "ChatService",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap()
}

async fn create(env: &Env, cr: &ChatService) {
    Api::<ChatService>::namespaced(env.admin.clone(), &env.ns)
        .create(&PostParams::default(), cr)
        .await
        .unwrap();
}

async fn merge_spec(env: &Env, name: &str, patch: serde_json::Value) {
    Api::<ChatService>::namespaced(env.admin.clone(), &env.ns)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": patch })),
        )
        .await
        .unwrap();
}

async fn wait_gone<K>(env: &Env, name: &str)
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(env.admin.clone(), &env.ns);
    eventually(
        &format!("{} {name} to be deleted", K::kind(&())),
        WAIT,
        || async { matches!(api.get_opt(name).await, Ok(None)).then_some(()) },
    )
    .await
}

fn checksum(d: &Deployment) -> String {
    d.spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .as_ref()
        .unwrap()["chatoperator.dev/config-checksum"]
        .clone()
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
    ];
    assert!(cases.len() >= 12);
    // Every case is tried, and all that fail are reported together.
    let mut failures = Vec::new();
    for (what, spec, field) in cases {
        let cr = raw_chat_service("bad", spec);
        match api.create(&PostParams::default(), &cr).await {
            Ok(_) => {
                failures.push(format!("{what}: accepted"));
                let _ = api.delete("bad", &DeleteParams::default()).await;
            }
            Err(kube::Error::Api(status)) if status.code != 422 => failures.push(format!(
                "{what}: code {} instead of 422: {}",
                status.code, status.message
            )),
            // `<field>: ` is how the API server prefixes a cause reported at that field (a
            // bare substring would let "spec" match any message).
            Err(kube::Error::Api(status)) if !status.message.contains(&format!("{field}: ")) => {
                failures.push(format!(
                    "{what}: message does not name {field}: {}",
                    status.message
                ))
            }
            Err(kube::Error::Api(_)) => {}
            Err(error) => failures.push(format!("{what}: unexpected error {error}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
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

fn json_merge(target: &mut serde_json::Value, patch: serde_json::Value) {
    match (target, patch) {
        (serde_json::Value::Object(t), serde_json::Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(&k);
                } else {
                    json_merge(t.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
        }
        (t, p) => *t = p,
    }
}

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

    let deployment: Deployment = wait_for(&env, "chat").await;
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

    let config: ConfigMap = wait_for(&env, "chat-config").await;
    let text = &config.data.unwrap()["config.yaml"];
    chat_config::Config::from_yaml(text).expect("the rendered config is valid for the service");
    let connection: Secret = wait_for(&env, "chat-connection").await;
    let uri = String::from_utf8(connection.data.unwrap()["uri"].0.clone()).unwrap();
    assert!(
        uri.starts_with("mongodb://chat:")
            && uri.contains(&format!("chat-mongodb.{}.svc:27017", env.ns))
    );
    let _: Service = wait_for(&env, "chat").await;
    let _: ServiceAccount = wait_for(&env, "chat").await;
    let _: PodDisruptionBudget = wait_for(&env, "chat").await;
    let hpa: HorizontalPodAutoscaler = wait_for(&env, "chat").await;
    assert_eq!(hpa.spec.unwrap().max_replicas, 4);
    let _: Deployment = wait_for(&env, "chat-redis").await;
    let _: Service = wait_for(&env, "chat-redis").await;
    let _: Secret = wait_for(&env, "chat-redis-password").await;
    let _: StatefulSet = wait_for(&env, "chat-mongodb").await;
    let _: Secret = wait_for(&env, "chat-mongodb-credentials").await;
    let mongo_service: Service = wait_for(&env, "chat-mongodb").await;
    assert_eq!(
        mongo_service.spec.unwrap().cluster_ip.as_deref(),
        Some("None")
    );
    let ollama: StatefulSet = wait_for(&env, "chat-ollama").await;
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
        let _: NetworkPolicy = wait_for(&env, name).await;
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
    eventually(
        "the ChatService and its children to settle",
        WAIT,
        || async {
            let first = snapshot(&env).await;
            tokio::time::sleep(Duration::from_secs(3)).await;
            (snapshot(&env).await == first).then_some(())
        },
    )
    .await;
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

/// The operator's own requests, counted on its client: a converged ChatService (with every
/// child kind) is re-reconciled without a single request, also by a freshly started operator,
/// and a hand edit of a field the operator owns is still reverted.
#[tokio::test]
async fn converged_reconciles_send_no_requests_and_drift_is_still_reverted() {
    let env = env("noop").await;
    let (operator, requests) = start_counted(&env).await;
    let mut spec = minimal_spec();
    json_merge(
        &mut spec,
        json!({"ollama": {"models": ["gemma3:270m"], "modelStorage": "2Gi"},
        "autoscaling": {"minReplicas": 2, "maxReplicas": 4, "targetCPUUtilizationPercentage": 70},
        "ingress": {"host": "chat.example.com"}}),
    );
    create(&env, &chat_service("chat", spec)).await;
    let _: HorizontalPodAutoscaler = wait_for(&env, "chat").await;
    let _: k8s_openapi::api::networking::v1::Ingress = wait_for(&env, "chat").await;
    wait_condition(&env, "chat", "ConfigValid", "True").await;
    eventually(
        "the ChatService and its children to settle",
        WAIT,
        || async {
            let first = snapshot(&env).await;
            tokio::time::sleep(Duration::from_secs(3)).await;
            (snapshot(&env).await == first).then_some(())
        },
    )
    .await;

    assert!(
        requests.writes().iter().any(|r| r.starts_with("PATCH ")),
        "the recording layer saw the applies that built the stack"
    );

    // (a) Resyncs of the converged object (every 2 s, counted on /metrics so they provably
    // ran): no write of any kind (apply, status, Event), and no read either.
    let quiet = |what: &'static str| {
        let requests = requests.clone();
        let operator = &operator;
        async move {
            requests.clear();
            wait_reconciles(operator, 3).await;
            assert_eq!(requests.writes(), Vec::<String>::new(), "{what}: writes");
            assert_eq!(requests.reads(), Vec::<String>::new(), "{what}: reads");
        }
    };
    quiet("resync").await;

    // (b) Drift is still corrected: an image edited by a merge patch (kubectl edit) and a
    // ConfigMap value taken over by another field manager's forced apply are both reverted.
    let deployments: Api<Deployment> = Api::namespaced(env.admin.clone(), &env.ns);
    let image = |d: &Deployment| {
        d.spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
            .image
            .clone()
            .unwrap()
    };
    let original = image(&deployments.get("chat").await.unwrap());
    let patch = json!({"spec": {"template": {"spec": {"containers": [{"name": "chat-service", "image": "evil:latest"}]}}}});
    deployments
        .patch("chat", &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .unwrap();
    let config_maps: Api<ConfigMap> = Api::namespaced(env.admin.clone(), &env.ns);
    let rendered =
        config_maps.get("chat-config").await.unwrap().data.unwrap()["config.yaml"].clone();
    let takeover = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "chat-config"}, "data": {"config.yaml": "evil: true\n"}});
    config_maps
        .patch(
            "chat-config",
            &PatchParams::apply("intruder").force(),
            &Patch::Apply(takeover),
        )
        .await
        .unwrap();
    eventually("the image and the config to be reverted", WAIT, || async {
        let d = deployments.get("chat").await.ok()?;
        let c = config_maps.get("chat-config").await.ok()?;
        (image(&d) == original && c.data?["config.yaml"] == rendered).then_some(())
    })
    .await;
    eventually("the reverted objects to settle", WAIT, || async {
        let first = snapshot(&env).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        (snapshot(&env).await == first).then_some(())
    })
    .await;
    quiet("resync after the repair").await;
    operator.stop().await;

    // (c) A fresh operator (empty memory, caches filled from the API server) writes nothing
    // either: the spec hash on each child says it is up to date.
    let (operator, requests) = start_counted(&env).await;
    wait_reconciles(&operator, 2).await;
    assert_eq!(requests.writes(), Vec::<String>::new(), "restart: writes");
    operator.stop().await;
}

/// resourceVersions of what only the operator writes, plus the operator's managedFields time on
/// workloads (their status is written by kube-controller-manager, which is not us).
async fn snapshot(env: &Env) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let lp = ListParams::default().labels("chatoperator.dev/chatservice=chat");
    macro_rules! rv {
        ($k:ty) => {
            for o in Api::<$k>::namespaced(env.admin.clone(), &env.ns)
                .list(&lp)
                .await
                .unwrap()
            {
                out.insert(
                    format!("{}/{}", <$k as kube::Resource>::kind(&()), o.name_any()),
                    o.resource_version().unwrap(),
                );
            }
        };
    }
    rv!(ConfigMap);
    rv!(Secret);
    rv!(Service);
    rv!(ServiceAccount);
    rv!(NetworkPolicy);
    macro_rules! ours {
        ($k:ty) => {
            for o in Api::<$k>::namespaced(env.admin.clone(), &env.ns)
                .list(&lp)
                .await
                .unwrap()
            {
                let time = o
                    .managed_fields()
                    .iter()
                    .filter(|m| m.manager.as_deref() == Some("chat-operator"))
                    .map(|m| format!("{:?}", m.time))
                    .collect::<Vec<_>>()
                    .join(",");
                out.insert(
                    format!("{}/{}", <$k as kube::Resource>::kind(&()), o.name_any()),
                    format!("{:?}/{time}", o.metadata.generation),
                );
            }
        };
    }
    ours!(Deployment);
    ours!(StatefulSet);
    ours!(HorizontalPodAutoscaler);
    ours!(PodDisruptionBudget);
    let cr = Api::<ChatService>::namespaced(env.admin.clone(), &env.ns)
        .get("chat")
        .await
        .unwrap();
    out.insert("ChatService/chat".into(), cr.resource_version().unwrap());
    out
}

#[tokio::test]
async fn edits_deletions_and_drift_are_repaired() {
    let env = env("drift").await;
    let operator = Operator::start(&env);
    create(&env, &chat_service("chat", minimal_spec())).await;
    let deployment: Deployment = wait_for(&env, "chat").await;
    let first = checksum(&deployment);

    // Edit the spec: the ConfigMap follows and the pod template checksum changes.
    merge_spec(&env, "chat", json!({"routing": {"maxAttempts": 4}})).await;
    let deployments: Api<Deployment> = Api::namespaced(env.admin.clone(), &env.ns);
    let edited = eventually("the checksum to change", WAIT, || async {
        let d = deployments.get("chat").await.ok()?;
        (checksum(&d) != first).then_some(d)
    })
    .await;
    let config: ConfigMap = wait_for(&env, "chat-config").await;
    assert!(config.data.unwrap()["config.yaml"].contains("maxAttempts: 4"));
    assert_ne!(checksum(&edited), first);

    // Delete a child: it comes back.
    let services: Api<Service> = Api::namespaced(env.admin.clone(), &env.ns);
    let old_uid = services.get("chat").await.unwrap().uid();
    services
        .delete("chat", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the Service to be re-created", WAIT, || async {
        let s = services.get_opt("chat").await.ok()??;
        (s.uid() != old_uid).then_some(())
    })
    .await;

    // Hand-edit an owned field and add a label: the field is reverted, the label stays.
    let patch = json!({
        "metadata": {"labels": {"example.com/team": "payments"}},
        "spec": {"template": {"spec": {"containers": [{"name": "chat-service", "image": "evil:latest"}]}}},
    });
    deployments
        .patch("chat", &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .unwrap();
    let reverted = eventually("the image to be reverted", WAIT, || async {
        let d = deployments.get("chat").await.ok()?;
        let image = d.spec.as_ref()?.template.spec.as_ref()?.containers[0]
            .image
            .clone()?;
        (image != "evil:latest").then_some(d)
    })
    .await;
    assert_eq!(
        reverted
            .labels()
            .get("example.com/team")
            .map(String::as_str),
        Some("payments")
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
    let _: HorizontalPodAutoscaler = wait_for(&env, "chat").await;
    let _: Deployment = wait_for(&env, "chat-redis").await;
    let password: Secret = wait_for(&env, "chat-redis-password").await;

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
    wait_gone::<HorizontalPodAutoscaler>(&env, "chat").await;
    wait_gone::<Deployment>(&env, "chat-redis").await;
    wait_gone::<Service>(&env, "chat-redis").await;
    wait_gone::<NetworkPolicy>(&env, "chat-redis").await;
    wait_gone::<Secret>(&env, "chat-redis-password").await;
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
    wait_gone::<Deployment>(&env, "chat").await;
    wait_gone::<StatefulSet>(&env, "chat-mongodb").await;
    wait_gone::<ConfigMap>(&env, "chat-config").await;
    wait_gone::<Secret>(&env, "chat-connection").await;
    wait_gone::<Secret>(&env, "chat-mongodb-credentials").await;
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
    let _: Deployment = wait_for(&env, "chat").await;
    operator.stop().await;
}

#[tokio::test]
async fn restart_mid_reconcile_converges_without_duplicates() {
    let env = env("restart").await;
    create(&env, &chat_service("chat", minimal_spec())).await;
    // Killed (not stopped) as soon as its first write shows: the generated password is created
    // before anything is applied, so the rest of the reconcile is cut off.
    let operator = Operator::start(&env);
    let password: Secret = wait_for(&env, "chat-redis-password").await;
    drop(operator);
    // Killed in the middle of the applies (the ConfigMap comes before the workloads).
    let operator = Operator::start(&env);
    let _: ConfigMap = wait_for(&env, "chat-config").await;
    drop(operator);
    // And once more at an arbitrary moment.
    let operator = Operator::start(&env);
    tokio::time::sleep(Duration::from_millis(700)).await;
    drop(operator);
    let operator = Operator::start(&env);
    let _: Deployment = wait_for(&env, "chat").await;
    wait_condition(&env, "chat", "ConfigValid", "True").await;
    let lp = ListParams::default().labels("chatoperator.dev/chatservice=chat");
    let secrets = Api::<Secret>::namespaced(env.admin.clone(), &env.ns)
        .list(&lp)
        .await
        .unwrap();
    let mut names: Vec<_> = secrets.iter().map(|s| s.name_any()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "chat-connection",
            "chat-mongodb-credentials",
            "chat-redis-password"
        ]
    );
    let deployments = Api::<Deployment>::namespaced(env.admin.clone(), &env.ns)
        .list(&lp)
        .await
        .unwrap();
    assert_eq!(deployments.items.len(), 2, "chat and chat-redis only");
    // The password made by the first, killed operator is the one in use.
    let now: Secret = wait_for(&env, "chat-redis-password").await;
    assert_eq!(now.metadata.uid, password.metadata.uid);
    assert_eq!(now.data, password.data);
    operator.stop().await;
}

/// A shutdown asked for at any moment of the start, including while the watch caches are still
/// listing and a reconcile already waits for them, returns: the caches are fed by the controller's
/// trigger streams, which a graceful shutdown stops polling, so such a reconcile must give up
/// rather than wait for caches that will never fill.
#[tokio::test]
async fn a_shutdown_during_start_up_returns_promptly() {
    let env = env("early-stop").await;
    create(&env, &chat_service("chat", minimal_spec())).await;
    let operator = Operator::start(&env);
    let _: Deployment = wait_for(&env, "chat").await;
    operator.stop().await;
    for delay_ms in (0..=400).step_by(20) {
        let operator = Operator::start(&env);
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        operator.stop_within(Duration::from_secs(10)).await;
    }
}

/// Holds back the answer to every LIST of Ingresses (not the watches) for a minute.
struct SlowIngressList<S> {
    inner: S,
}

impl<S> tower::Service<http::Request<kube::client::Body>> for SlowIngressList<S>
where
    S: tower::Service<http::Request<kube::client::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<kube::client::Body>) -> Self::Future {
        let uri = request.uri();
        let list =
            uri.path().ends_with("/ingresses") && !uri.query().unwrap_or("").contains("watch=true");
        let answer = self.inner.call(request);
        Box::pin(async move {
            if list {
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            answer.await
        })
    }
}

/// A shutdown while a reconcile waits for the caches of the operator's children (their first
/// lists are slow, as in a large cluster) returns: the reconcile gives up instead of waiting for
/// lists that a stopping controller no longer reads. The delay is a tower layer on the operator's
/// own client that holds back the first LIST of Ingresses (a narrow mock of a slow API server).
#[tokio::test]
async fn a_shutdown_while_a_reconcile_waits_for_the_caches_returns() {
    let env = env("slow-list").await;
    create(&env, &chat_service("chat", minimal_spec())).await;
    let config = operator_kube_config(&env).await;
    let slow_list = tower::layer::layer_fn(|inner| SlowIngressList { inner });
    let client = kube::client::ClientBuilder::try_from(config)
        .unwrap()
        .with_layer(&slow_list)
        .build();
    let operator = Operator::start_client(&env, client, None);
    // The reconcile has started (the counter counts starts) and now waits for the Ingress cache.
    wait_reconciles(&operator, 1).await;
    operator.stop_within(Duration::from_secs(10)).await;
    // Nothing was written by the reconcile that gave up.
    let deployment = Api::<Deployment>::namespaced(env.admin.clone(), &env.ns)
        .get_opt("chat")
        .await
        .unwrap();
    assert!(deployment.is_none());
}

#[tokio::test]
async fn two_replicas_elect_one_leader_and_hand_over_on_shutdown() {
    /// The Lease name `chat-operator` uses (main.rs) and the chart's Role names.
    const LEASE: &str = "chat-operator-leader";
    let env = env("leader").await;
    // The chart's leader-election Role (templates/rbac.yaml, rendered by hand): create any Lease,
    // get and update only the operator's own. The ClusterRole grants no Lease access at all.
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "chat-operator-leader-election"},
        "rules": [
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
             "resourceNames": [LEASE], "verbs": ["get", "update"]},
        ],
    }))
    .unwrap();
    Api::<Role>::namespaced(env.admin.clone(), &env.ns)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "chat-operator-leader-election"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "chat-operator-leader-election"},
        "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_SA, "namespace": env.ns}],
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(env.admin.clone(), &env.ns)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let lease = |identity: &str| LeaseSettings {
        namespace: env.ns.clone(),
        name: LEASE.into(),
        identity: identity.into(),
        duration: Duration::from_secs(6),
    };
    let leases: Api<Lease> = Api::namespaced(env.admin.clone(), &env.ns);
    let holder = || async {
        leases
            .get_opt(LEASE)
            .await
            .ok()
            .flatten()?
            .spec?
            .holder_identity
    };
    let first = Operator::start_with(&env, Some(lease("first")));
    eventually("the first replica to lead", WAIT, || async {
        (holder().await.as_deref() == Some("first")).then_some(())
    })
    .await;
    let second = Operator::start_with(&env, Some(lease("second")));
    create(&env, &chat_service("chat", minimal_spec())).await;
    let deployment: Deployment = wait_for(&env, "chat").await;

    // Over more than a lease duration (the leader renews, the standby retries every 2 s), the
    // leader keeps the Lease and the standby never reconciles.
    wait_reconciles(&first, 4).await;
    assert_eq!(holder().await.as_deref(), Some("first"));
    assert_eq!(second.reconciles().await, 0, "the standby reconciled");

    // A graceful stop releases the Lease; the standby takes over and reconciles a change.
    first.stop().await;
    eventually("the second replica to lead", WAIT, || async {
        (holder().await.as_deref() == Some("second")).then_some(())
    })
    .await;
    merge_spec(&env, "chat", json!({"routing": {"maxAttempts": 3}})).await;
    let deployments: Api<Deployment> = Api::namespaced(env.admin.clone(), &env.ns);
    eventually("the new leader to roll the config", WAIT, || async {
        let d = deployments.get("chat").await.ok()?;
        (checksum(&d) != checksum(&deployment)).then_some(())
    })
    .await;
    assert!(second.reconciles().await > 0);
    second.stop().await;
    // The last leader gave the Lease up too.
    assert_eq!(holder().await, None);
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
    let _: HorizontalPodAutoscaler = wait_for(&env, "chat").await;
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
