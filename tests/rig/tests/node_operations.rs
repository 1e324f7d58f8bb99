//! Day-two operations on the rig's real node, each the way a platform team meets it:
//!
//! - **External stores over TLS**: `examples/external-stores.yaml` runs its chat pods against
//!   stores the operator does not run: a TLS-only redis-server with an AUTH token (what
//!   ElastiCache with in-transit encryption looks like) and a TLS-only FerretDB (DocumentDB's
//!   shape), as pods of another namespace behind Services, with a CA the test makes. The chat
//!   pods verify both servers against the CA from the Secrets the example names; the
//!   ChatService reports `StorageReady=True` from the pods' own view; a chat turn is answered
//!   through the ClusterIP and the test finds it in both stores, reading them from the host over
//!   TLS verified against the same CA.
//! - **A tokenizer from a ConfigMap**: the chat model's real `tokenizer.json`, gzipped, put in a
//!   ConfigMap with `kubectl create configmap --from-file` and named in
//!   `spec.context.tokenizers`; the chat pod rolls and `GET /v1/models` says the model's tokens
//!   are counted with it.
//! - **A CPU HPA** (metrics-server on the node) scales the chat Deployment up under load and back
//!   down once the load stops.
//! - **A chat pod that cannot start** under a memory limit too low for its sandbox (the OOM
//!   killer ends runc's init; the pod status only says `ContainerCreating`) makes the ChatService
//!   report `Degraded=True` (`PodNotStarting`) naming the pod and quoting the kubelet's Event,
//!   while the old pod keeps serving; restoring the limit clears it.
//!
//! What the test substitutes for the example's placeholders: the Secrets' values (the test's CA,
//! token and URI) and the addresses (the store Services); the URI drops `replicaSet=rs0`
//! (FerretDB is a single server) and names `authMechanism=PLAIN` (FerretDB 1.x's login over
//! TLS). One replica and the rig's chat model (two shared cores). Starts a private control plane
//! and the node, like `node.rs`; needs root and the installer's binaries.

mod real_node;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chat_rig::images::stand_ins::{MONGO_IMAGE, REDIS_IMAGE};
use chat_rig::tls::StoreCa;
use chat_rig::wait::until_object;
use chat_rig::{Rig, eventually, unique_name};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use real_node::{
    Kubectl, chat, chatservice_api, enforce_restricted, http, install_operator, mark,
    ready_chat_pods, repo, run_on_real_node, uninstall_operator,
};

/// The rig's instruction-tuned chat model, which the shared Ollama's manifest pulls.
const CHAT_MODEL: &str = "smollm2:135m";
/// The ChatService of examples/external-stores.yaml.
const NAME: &str = "support-aws";
/// The test's own throwaway credentials of the two stores.
const REDIS_TOKEN: &str = "node-test-redis-auth-token";
const MONGODB_USER: &str = "chat";
const MONGODB_PASSWORD: &str = "node-test-mongodb-password";

/// A condition's status, reason and message.
fn condition(cs: &DynamicObject, type_: &str) -> Option<(String, String, String)> {
    let conditions = cs.data.get("status")?.get("conditions")?.as_array()?;
    conditions.iter().find(|c| c["type"] == type_).map(|c| {
        let field = |name: &str| c[name].as_str().unwrap_or_default().to_string();
        (field("status"), field("reason"), field("message"))
    })
}

/// The platform's stores, as pods of namespace `ns`, and how the host reaches them.
struct ExternalStores {
    ns: String,
    ca: StoreCa,
    redis_ip: String,
    mongodb_ip: String,
}

fn store_pod(name: &str, image: &str, command: serde_json::Value, port: u16) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "terminationGracePeriodSeconds": 2,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 999, "runAsGroup": 999,
                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": name, "image": image, "imagePullPolicy": "Never",
                "command": command,
                "ports": [{"containerPort": port}],
                "readinessProbe": {"tcpSocket": {"port": port}, "periodSeconds": 2},
                "securityContext": {"allowPrivilegeEscalation": false,
                    "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}},
                "volumeMounts": [
                    {"name": "tls", "mountPath": "/tls", "readOnly": true},
                    {"name": "data", "mountPath": "/data"},
                    {"name": "state", "mountPath": "/state"},
                ],
            }],
            "volumes": [
                {"name": "tls", "secret": {"secretName": "store-tls", "defaultMode": 0o444}},
                {"name": "data", "emptyDir": {}},
                {"name": "state", "emptyDir": {}},
            ],
        },
    })
}

/// Starts the TLS Redis and the TLS FerretDB. Their Services come first: the serving
/// certificate names the Services' DNS names and ClusterIPs, so the chat pods (by name) and
/// this test (by ClusterIP) both verify the server for real.
async fn start_external_stores(client: &kube::Client, kubectl: &Kubectl) -> ExternalStores {
    let ns = unique_name("platform-stores");
    kubectl.run(&["create", "namespace", &ns]);
    let services = Api::<Service>::namespaced(client.clone(), &ns);
    let mut ips = Vec::new();
    for (name, port) in [("redis", 6379), ("mongodb", 27017)] {
        let service: Service = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name},
            "spec": {"selector": {"app": name}, "ports": [{"port": port, "targetPort": port}]},
        }))
        .unwrap();
        let created = services
            .create(&Default::default(), &service)
            .await
            .unwrap_or_else(|e| panic!("creating Service {ns}/{name}: {e}"));
        ips.push(created.spec.and_then(|s| s.cluster_ip).unwrap());
    }
    let (redis_ip, mongodb_ip) = (ips[0].clone(), ips[1].clone());
    let mut sans = vec![format!("IP:{redis_ip}"), format!("IP:{mongodb_ip}")];
    for name in ["redis", "mongodb"] {
        sans.push(format!("DNS:{name}.{ns}.svc.cluster.local"));
        sans.push(format!("DNS:{name}.{ns}.svc"));
    }
    let sans: Vec<&str> = sans.iter().map(String::as_str).collect();
    let dir = chat_rig::scratch_dir("node-external-stores").unwrap();
    let ca = StoreCa::create_for(&dir, "platform-store-ca", &sans).unwrap();
    let file = |key: &str, path: &std::path::Path| format!("--from-file={key}={}", path.display());
    kubectl.run(&[
        "create",
        "secret",
        "generic",
        "store-tls",
        "-n",
        &ns,
        &file("ca.crt", &ca.ca_file),
        &file("server.crt", &ca.server_cert),
        &file("server.key", &ca.server_key),
    ]);
    let redis = store_pod(
        "redis",
        REDIS_IMAGE,
        serde_json::json!([
            "redis-server",
            "--port",
            "0",
            "--tls-port",
            "6379",
            "--tls-cert-file",
            "/tls/server.crt",
            "--tls-key-file",
            "/tls/server.key",
            "--tls-ca-cert-file",
            "/tls/ca.crt",
            "--tls-auth-clients",
            "no",
            "--requirepass",
            REDIS_TOKEN,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            "/data"
        ]),
        6379,
    );
    let mongodb = store_pod(
        "mongodb",
        MONGO_IMAGE,
        serde_json::json!([
            "/usr/local/bin/ferretdb",
            "--handler=sqlite",
            "--sqlite-url=file:/data/",
            "--state-dir=/state",
            "--telemetry=disable",
            "--debug-addr=-",
            "--log-level=warn",
            "--listen-addr=",
            "--listen-tls=:27017",
            "--listen-tls-cert-file=/tls/server.crt",
            "--listen-tls-key-file=/tls/server.key"
        ]),
        27017,
    );
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    for pod in [redis, mongodb] {
        let pod: Pod = serde_json::from_value(pod).unwrap();
        pods.create(&Default::default(), &pod)
            .await
            .unwrap_or_else(|e| panic!("creating the store pod: {e}"));
    }
    kubectl.run(&[
        "wait",
        "-n",
        &ns,
        "--for=condition=Ready",
        "pod/redis",
        "pod/mongodb",
        "--timeout=120s",
    ]);
    ExternalStores {
        ns,
        ca,
        redis_ip,
        mongodb_ip,
    }
}

/// examples/external-stores.yaml, in namespace `ns`, with the placeholders filled in for
/// `stores`: the documents, Secrets first.
fn external_stores_example(ns: &str, stores: &ExternalStores) -> Vec<DynamicObject> {
    let text = std::fs::read_to_string(repo("examples/external-stores.yaml")).unwrap();
    let ca_pem = std::fs::read_to_string(&stores.ca.ca_file).unwrap();
    let mut objects = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value: serde_json::Value = serde::Deserialize::deserialize(document).unwrap();
        if value.is_null() {
            continue;
        }
        let mut object: DynamicObject = serde_json::from_value(value).unwrap();
        object.metadata.namespace = Some(ns.to_string());
        let kind = object.types.as_ref().map(|t| t.kind.clone()).unwrap();
        let name = object.metadata.name.clone().unwrap();
        match (kind.as_str(), name.as_str()) {
            ("Secret", "elasticache-auth") => {
                object.data["stringData"] = serde_json::json!({"token": REDIS_TOKEN});
            }
            ("Secret", "elasticache-ca") => {
                object.data["stringData"] = serde_json::json!({"ca.pem": ca_pem});
            }
            ("Secret", "docdb-connection") => {
                let uri = format!(
                    "mongodb://{MONGODB_USER}:{MONGODB_PASSWORD}@mongodb.{}.svc.cluster.local:27017/?authMechanism=PLAIN&authSource=%24external",
                    stores.ns
                );
                object.data["stringData"] = serde_json::json!({"uri": uri, "ca.pem": ca_pem});
            }
            ("ChatService", NAME) => {
                let spec = &mut object.data["spec"];
                spec["replicas"] = 1.into();
                spec["models"] = serde_json::json!({"default": CHAT_MODEL});
                spec["context"] = serde_json::json!({"maxOutputTokens": 24});
                spec["history"]["redis"]["external"]["address"] =
                    format!("redis.{}.svc.cluster.local:6379", stores.ns).into();
            }
            other => panic!("examples/external-stores.yaml has an unexpected {other:?}"),
        }
        objects.push(object);
    }
    assert_eq!(objects.len(), 4, "three Secrets and the ChatService");
    objects
}

/// The turn's messages in the TLS FerretDB and its recent copy in the TLS Redis, read from the
/// host through the stores' ClusterIPs with the server verified against the CA.
async fn stored_in_both(stores: &ExternalStores, ns: &str, session: &str) -> (usize, usize) {
    use futures::TryStreamExt;
    use mongodb::bson::{Document, doc};
    use mongodb::options::{ClientOptions, Tls, TlsOptions};
    let uri = format!(
        "mongodb://{MONGODB_USER}:{MONGODB_PASSWORD}@{}:27017/?tls=true&authMechanism=PLAIN&authSource=%24external&serverSelectionTimeoutMS=10000",
        stores.mongodb_ip
    );
    let mut options = ClientOptions::parse(uri).await.unwrap();
    options.tls = Some(Tls::Enabled(
        TlsOptions::builder()
            .ca_file_path(stores.ca.ca_file.clone())
            .build(),
    ));
    let messages: Vec<Document> = mongodb::Client::with_options(options)
        .unwrap()
        .database("support")
        .collection::<Document>("messages")
        .find(doc! {"session_id": session})
        .await
        .unwrap_or_else(|e| panic!("reading the TLS FerretDB at {}: {e}", stores.mongodb_ip))
        .try_collect()
        .await
        .unwrap();
    let certificates = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(std::fs::read(&stores.ca.ca_file).unwrap()),
    };
    let url = format!("rediss://:{REDIS_TOKEN}@{}:6379/0", stores.redis_ip);
    let client = redis::Client::build_with_tls(url, certificates).unwrap();
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("connecting to the TLS Redis at {}: {e}", stores.redis_ip));
    let recent: Vec<String> = redis::cmd("ZRANGE")
        .arg(format!("{ns}:{NAME}:session:{session}:recent"))
        .arg(0)
        .arg(-1)
        .query_async(&mut connection)
        .await
        .unwrap();
    (messages.len(), recent.len())
}

/// Whether `cs` reports condition `type_` with `status`, and that condition.
fn has(cs: &DynamicObject, type_: &str, status: &str) -> Option<(String, String, String)> {
    condition(cs, type_).filter(|(s, _, _)| s == status)
}

async fn external_stores_answer_a_turn(
    client: &kube::Client,
    kubectl: &Kubectl,
    ns: &str,
    stores: &ExternalStores,
) -> String {
    for object in external_stores_example(ns, stores) {
        let file = chat_rig::scratch_dir("node-example")
            .unwrap()
            .join("doc.json");
        std::fs::write(&file, serde_json::to_vec(&object).unwrap()).unwrap();
        kubectl.run(&["apply", "-f", &file.display().to_string()]);
    }
    let chatservices = chatservice_api(client, ns);
    until_object(
        &chatservices,
        NAME,
        "to report Ready=True and StorageReady=True from its chat pod's view of both TLS stores",
        Duration::from_secs(300),
        |cs| {
            has(cs, "Ready", "True")?;
            has(cs, "StorageReady", "True")
        },
    )
    .await;
    let service = Api::<Service>::namespaced(client.clone(), ns)
        .get(NAME)
        .await
        .unwrap();
    let spec = service.spec.unwrap();
    let base = format!(
        "http://{}:{}",
        spec.cluster_ip.unwrap(),
        spec.ports.unwrap()[0].port
    );
    let answer = chat(&base, None, "Name one colour.").await;
    let session = answer["session_id"].as_str().unwrap().to_string();
    assert!(
        !answer["message"].as_str().unwrap_or_default().is_empty(),
        "{answer}"
    );
    let (messages, recent) = stored_in_both(stores, ns, &session).await;
    assert_eq!(
        (messages, recent),
        (2, 2),
        "the turn's two messages in the TLS FerretDB and in the TLS Redis's recent copy"
    );
    base
}

/// How the chat pods behind `base` count the prompt tokens of the chat model, as
/// `GET /v1/models` says (`tokenizer` or `estimate`).
async fn token_counting(base: &str) -> String {
    let (status, text) = http(reqwest::Method::GET, &format!("{base}/v1/models"), None).await;
    assert_eq!(status, 200, "GET /v1/models: {text}");
    let models: serde_json::Value = serde_json::from_str(&text).unwrap();
    let entry = models["data"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["id"] == CHAT_MODEL)
        .unwrap_or_else(|| panic!("GET /v1/models does not list {CHAT_MODEL}: {text}"));
    entry["token_counting"].as_str().unwrap_or_default().into()
}

/// The chat model's real tokenizer, gzipped (1.5 MB of JSON would not fit a ConfigMap), put in a
/// ConfigMap with `kubectl create configmap --from-file` and named in `spec.context.tokenizers`:
/// the chat pods roll, load it, and `GET /v1/models` says the model is counted with it. Returns
/// the size of the ConfigMap's file.
async fn a_tokenizer_from_a_configmap_is_loaded(
    client: &kube::Client,
    kubectl: &Kubectl,
    ns: &str,
    base: &str,
) -> u64 {
    assert_eq!(
        token_counting(base).await,
        "estimate",
        "no tokenizer is configured yet"
    );
    let tokenizer = chat_rig::paths::chat_model_tokenizer().unwrap_or_else(|e| panic!("{e:#}"));
    let gzipped = chat_rig::scratch_dir("node-tokenizer")
        .unwrap()
        .join("tokenizer.json.gz");
    let out = std::process::Command::new("gzip")
        .args(["-9", "-c"])
        .arg(&tokenizer)
        .output()
        .expect("gzip (Debian's gzip package) runs");
    assert!(out.status.success(), "gzip: {out:?}");
    std::fs::write(&gzipped, &out.stdout).unwrap();
    kubectl.run(&[
        "-n",
        ns,
        "create",
        "configmap",
        "smollm2-tokenizer",
        &format!("--from-file=tokenizer.json.gz={}", gzipped.display()),
    ]);
    chatservice_api(client, ns)
        .patch(
            NAME,
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"spec": {"context": {"tokenizers": [
                {"model": CHAT_MODEL,
                 "configMap": {"name": "smollm2-tokenizer", "key": "tokenizer.json.gz"}}
            ]}}})),
        )
        .await
        .unwrap();
    eventually(
        "the rolled chat pod to count the chat model's tokens with its tokenizer",
        Duration::from_secs(300),
        || async { (token_counting(base).await == "tokenizer").then_some(()) },
    )
    .await;
    until_object(
        &chatservice_api(client, ns),
        NAME,
        "to report Ready=True with the tokenizer mounted",
        Duration::from_secs(240),
        |cs| has(cs, "Ready", "True"),
    )
    .await;
    let answer = chat(base, None, "Name one fruit.").await;
    assert!(
        !answer["message"].as_str().unwrap_or_default().is_empty(),
        "{answer}"
    );
    out.stdout.len() as u64
}

/// The chat Deployment's replica count as the HPA set it.
async fn replicas(deployments: &Api<Deployment>) -> i32 {
    deployments
        .get(NAME)
        .await
        .ok()
        .and_then(|d| d.spec?.replicas)
        .unwrap_or_default()
}

/// Autoscaling on CPU: requests to the chat pods through the ClusterIP until the HPA scales
/// the Deployment up, then none until it scales back down to one pod. Returns the two times.
async fn cpu_hpa_scales_up_and_down(
    client: &kube::Client,
    kubectl: &Kubectl,
    ns: &str,
    base: &str,
) -> (Duration, Duration) {
    let chatservices = chatservice_api(client, ns);
    let autoscaling = serde_json::json!({"spec": {
        "replicas": null,
        "autoscaling": {"minReplicas": 1, "maxReplicas": 3,
            "targetCPUUtilizationPercentage": 50, "scaleDownStabilizationSeconds": 0},
        "resources": {"requests": {"cpu": "20m", "memory": "64Mi"},
            "limits": {"memory": "256Mi"}},
    }});
    chatservices
        .patch(NAME, &PatchParams::default(), &Patch::Merge(&autoscaling))
        .await
        .unwrap();
    let deployments = Api::<Deployment>::namespaced(client.clone(), ns);
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    eventually(
        "one Ready chat pod with the 20m CPU request, under the HPA",
        Duration::from_secs(180),
        || async {
            let ready = ready_chat_pods(&pods).await;
            let requests = ready.first()?.spec.as_ref()?.containers[0]
                .resources
                .as_ref()?
                .requests
                .clone()?;
            (ready.len() == 1 && requests.get("cpu")?.0 == "20m").then_some(())
        },
    )
    .await;

    // Load: cheap requests on fresh connections (so kube-proxy spreads them over the pods),
    // about 200 a second from 8 loops.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut loops = Vec::new();
    for _ in 0..8 {
        let (stop, sent, url) = (stop.clone(), sent.clone(), format!("{base}/v1/models"));
        loops.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let _ = http(reqwest::Method::GET, &url, None).await;
                sent.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        }));
    }
    let started = Instant::now();
    eventually(
        "the HPA to scale the chat Deployment above 1 replica on CPU",
        Duration::from_secs(240),
        || async { (replicas(&deployments).await > 1).then_some(()) },
    )
    .await;
    let up = started.elapsed();
    eventually(
        "the scaled-up chat pods to become Ready",
        Duration::from_secs(180),
        || async { (ready_chat_pods(&pods).await.len() > 1).then_some(()) },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.unwrap();
    }
    eprintln!(
        "[node_operations] {} requests sent; scaled to {} replicas after {:.0} s",
        sent.load(Ordering::Relaxed),
        replicas(&deployments).await,
        up.as_secs_f64()
    );
    let (_, top) = kubectl.try_run(&["top", "pod", "-n", ns, "--containers"]);
    eprintln!("[node_operations] kubectl top pod under load:\n{top}");
    let stopped = Instant::now();
    eventually(
        "the HPA to scale the chat Deployment back to 1 replica once the load stopped",
        Duration::from_secs(300),
        || async { (replicas(&deployments).await == 1).then_some(()) },
    )
    .await;
    (up, stopped.elapsed())
}

/// A memory limit the chat pod cannot start in (1Mi; the chat process itself runs in about 3Mi):
/// the OOM killer ends runc's init in the pod's sandbox, so the pod never starts and its status
/// only says `ContainerCreating`. The ChatService must say Degraded (`PodNotStarting`), naming
/// the pod and quoting the kubelet's Event (OOM-killed), while the old pod keeps answering; the
/// limit put back clears it.
async fn a_pod_that_cannot_start_is_reported_and_clears(
    client: &kube::Client,
    ns: &str,
    base: &str,
) -> String {
    let chatservices = chatservice_api(client, ns);
    let limit = |memory: &str| {
        serde_json::json!({"spec": {"resources": {"requests": {"cpu": "20m", "memory": memory},
            "limits": {"memory": memory}}}})
    };
    chatservices
        .patch(NAME, &PatchParams::default(), &Patch::Merge(&limit("1Mi")))
        .await
        .unwrap();
    let (_, reason, message) = until_object(
        &chatservices,
        NAME,
        "to report Degraded=True (PodNotStarting) quoting the OOM kill of the new pod's sandbox",
        Duration::from_secs(240),
        |cs| {
            has(cs, "Degraded", "True").filter(|(_, reason, message)| {
                reason == "PodNotStarting"
                    && message.contains(&format!("pod {NAME}-"))
                    && message.contains("OOM-killed")
            })
        },
    )
    .await;
    // The pod of the previous template still serves (the rollout cannot finish).
    let answer = chat(base, None, "Say one word.").await;
    assert!(answer["session_id"].is_string(), "{answer}");
    chatservices
        .patch(
            NAME,
            &PatchParams::default(),
            &Patch::Merge(&limit("256Mi")),
        )
        .await
        .unwrap();
    until_object(
        &chatservices,
        NAME,
        "to clear Degraded once the memory limit is back",
        Duration::from_secs(240),
        |cs| {
            has(cs, "Degraded", "False")?;
            has(cs, "Ready", "True")
        },
    )
    .await;
    format!("{reason}: {message}")
}

async fn scenario(rig: &Rig, kubectl: &Kubectl, figures: &mut Vec<String>) {
    let mut t = Instant::now();
    let client = rig.kube_client().await;
    let ns = unique_name("apps");
    let op_ns = unique_name("chat-operator");
    for name in [&ns, &op_ns] {
        enforce_restricted(&client, name).await;
    }
    let shared_ollama = repo("tests/rig/manifests/shared-ollama.yaml");
    kubectl.run(&["apply", "-f", &shared_ollama.display().to_string()]);
    // Cluster-wide, the chart's default install mode.
    install_operator(kubectl, &op_ns, &[]);
    let stores = start_external_stores(&client, kubectl).await;
    kubectl.run(&[
        "-n",
        "ai-models",
        "rollout",
        "status",
        "deployment/ollama",
        "--timeout=180s",
    ]);
    mark(
        figures,
        "operator, shared Ollama and the TLS stores Ready",
        &mut t,
    );

    let base = external_stores_answer_a_turn(&client, kubectl, &ns, &stores).await;
    mark(
        figures,
        "external-stores example answered a turn, stored over TLS",
        &mut t,
    );

    let size = a_tokenizer_from_a_configmap_is_loaded(&client, kubectl, &ns, &base).await;
    figures.push(format!(
        "tokenizer from a ConfigMap: {CHAT_MODEL}'s tokenizer.json.gz ({size} bytes) loaded"
    ));
    mark(figures, "tokenizer from a ConfigMap loaded", &mut t);

    let (up, down) = cpu_hpa_scales_up_and_down(&client, kubectl, &ns, &base).await;
    figures.push(format!(
        "CPU HPA: scaled up {:.0} s after the load started, back to 1 {:.0} s after it stopped",
        up.as_secs_f64(),
        down.as_secs_f64()
    ));
    mark(figures, "CPU HPA scaled up and down", &mut t);

    let reported = a_pod_that_cannot_start_is_reported_and_clears(&client, &ns, &base).await;
    figures.push(format!("Degraded while the pod cannot start: {reported}"));
    mark(
        figures,
        "pod that cannot start reported and cleared",
        &mut t,
    );

    chatservice_api(&client, &ns)
        .delete(NAME, &DeleteParams::default())
        .await
        .unwrap();
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    eventually(
        &format!("every pod of namespace {ns} gone"),
        Duration::from_secs(180),
        || async {
            let left = pods.list(&ListParams::default()).await.ok()?.items;
            left.is_empty().then_some(())
        },
    )
    .await;
    uninstall_operator(kubectl, &op_ns);
    kubectl.run(&["delete", "namespace", &stores.ns, "--wait=false"]);
}

#[test]
fn day_two_operations_on_the_real_node() {
    run_on_real_node(
        "node-operations",
        "node_operations",
        Box::new(|rig, kubectl, figures| Box::pin(scenario(rig, kubectl, figures))),
    );
}
