//! End to end on the rig's real control plane plus the local node: the operator installed with
//! its Helm chart runs as a pod, reconciles examples/minimal.yaml into running pods, and a chat
//! session is answered through the chat Service's ClusterIP while the Deployment scales and rolls.
//!
//! Needs root (network namespaces), the installer's binaries (tests/rig/install.sh: helm,
//! kube-apiserver, ferretdb, ollama, the model) and the workspace's binaries
//! (`cargo build -p chat-service -p chat-operator`, same CARGO_TARGET_DIR). A missing piece fails
//! the test with a message naming it.
//!
//! Over 500 lines, knowingly: this stand-in for a kubelet is to be replaced by a real node
//! (kubelet, containerd, CNI), so it is not split further.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use chat_rig::node::{Node, NodeOptions, default_bin_dir};
use chat_rig::wait::until_object;
use chat_rig::{Rig, eventually, paths, unique_name};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};

fn chatservice_api(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("chatoperator.dev", "v1alpha1", "ChatService");
    Api::namespaced_with(client.clone(), ns, &ApiResource::from_gvk(&gvk))
}

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn check_prerequisites() {
    let mut missing = Vec::new();
    let bin = default_bin_dir();
    for name in ["chat-service", "chat-operator"] {
        if !bin.join(name).is_file() {
            missing.push(format!(
                "{} (build it: cargo build -p {name}, with the same CARGO_TARGET_DIR)",
                bin.join(name).display()
            ));
        }
    }
    for name in ["helm", "ferretdb", "ollama"] {
        if let Err(e) = paths::cached_bin(name) {
            missing.push(format!("{e:#}"));
        }
    }
    if !Path::new("/proc/self/ns/net").exists() || !nix_root() {
        missing.push("root (the node creates network namespaces and bind mounts)".into());
    }
    assert!(
        missing.is_empty(),
        "end_to_end needs: {}",
        missing.join("; ")
    );
}

/// Creates or labels namespace `name` with `pod-security.kubernetes.io/enforce: restricted`.
async fn enforce_restricted(client: &kube::Client, name: &str) {
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": {"pod-security.kubernetes.io/enforce": "restricted"}},
    }))
    .unwrap();
    Api::<Namespace>::all(client.clone())
        .patch(
            name,
            &PatchParams::apply("e2e-test").force(),
            &Patch::Apply(&ns),
        )
        .await
        .unwrap_or_else(|e| panic!("labelling namespace {name} restricted: {e}"));
}

fn nix_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// A JSON request with a fresh connection each time (so the Service proxy balances them).
async fn http(
    method: reqwest::Method,
    url: &str,
    body: Option<serde_json::Value>,
) -> (u16, String) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap();
    let mut req = client.request(method, url);
    if let Some(b) = body {
        req = req.json(&b);
    }
    match req.send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.text().await.unwrap_or_default())
        }
        Err(e) => (0, format!("{e}")),
    }
}

async fn chat(base: &str, session: Option<&str>, message: &str) -> serde_json::Value {
    let mut body = serde_json::json!({"message": message});
    if let Some(s) = session {
        body["session_id"] = s.into();
    }
    // A 503 (with Retry-After) means the service's health checks have not yet seen a back end
    // answer; on two busy cores Ollama's health answer can take longer than their timeout.
    let deadline = Instant::now() + Duration::from_secs(90);
    let (status, text) = loop {
        let (status, text) = http(
            reqwest::Method::POST,
            &format!("{base}/v1/chat"),
            Some(body.clone()),
        )
        .await;
        // 0: the connection failed (right after a rollout the proxy can still pick a pod that is
        // going away); real clients retry that too.
        if !matches!(status, 0 | 503) || Instant::now() > deadline {
            break (status, text);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    assert_eq!(status, 200, "POST {base}/v1/chat answered {status}: {text}");
    serde_json::from_str(&text).unwrap()
}

/// Status and message of a condition; for `BackendsReady` the reason instead of the message.
fn condition(cs: &DynamicObject, type_: &str) -> Option<(String, String)> {
    let conds = cs
        .data
        .get("status")?
        .get("conditions")?
        .as_array()?
        .clone();
    let detail = if type_ == "Ready" {
        "message"
    } else {
        "reason"
    };
    conds.iter().find(|c| c["type"] == type_).map(|c| {
        (
            c["status"].as_str().unwrap_or_default().to_string(),
            c[detail].as_str().unwrap_or_default().to_string(),
        )
    })
}

async fn ready_chat_pods(pods: &Api<Pod>) -> Vec<Pod> {
    pods.list(&ListParams::default().labels("app.kubernetes.io/component=chat-service"))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .collect()
}

/// `chat_http_requests_total` of POST /v1/chat answered 200, from one pod's /metrics.
async fn chat_turns_served(pod_ip: &str) -> u64 {
    let (status, text) = http(
        reqwest::Method::GET,
        &format!("http://{pod_ip}:8080/metrics"),
        None,
    )
    .await;
    assert_eq!(status, 200, "GET /metrics of pod {pod_ip}: {text:.200}");
    text.lines()
        .filter(|l| l.starts_with("chat_http_requests_total{"))
        .filter(|l| l.contains("route=\"/v1/chat\"") && l.contains("status=\"200\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

fn container_pids(pods: &[Pod]) -> Vec<u32> {
    pods.iter()
        .filter_map(|p| p.status.as_ref()?.container_statuses.clone())
        .flatten()
        .filter_map(|c| c.container_id?.strip_prefix("chat-rig://")?.parse().ok())
        .collect()
}

fn mark(figures: &mut Vec<String>, what: &str, since: &mut Instant) {
    figures.push(format!("{what}: {:.1} s", since.elapsed().as_secs_f64()));
    eprintln!(
        "[end_to_end] {what}: {:.1} s",
        since.elapsed().as_secs_f64()
    );
    *since = Instant::now();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn end_to_end() {
    let started = Instant::now();
    let mut figures: Vec<String> = Vec::new();
    let mut t = Instant::now();
    check_prerequisites();
    let rig = Rig::shared();
    let client = rig.kube_client().await;
    let (_, ns) = rig.test_namespace("e2e").await;
    let op_ns = unique_name("chat-operator");
    // Every pod the operator and its chart create must pass Pod Security `restricted`.
    for name in [&ns, &op_ns] {
        enforce_restricted(&client, name).await;
    }
    let node = Node::start(
        rig,
        NodeOptions {
            namespaces: vec![ns.clone(), op_ns.clone(), "ai-models".into()],
            ..Default::default()
        },
    )
    .expect("starting the local node");
    mark(&mut figures, "rig and node up", &mut t);

    // The operator, from its chart, as a pod of the node. The operator's API-server tests apply
    // the chart's ClusterRole (a fixed name) straight from the file to the same shared API
    // server; mark it for adoption by this release, as one would after a plain-kubectl install.
    let adopt = serde_json::json!({"metadata": {
        "labels": {"app.kubernetes.io/managed-by": "Helm"},
        "annotations": {
            "meta.helm.sh/release-name": "chat-operator",
            "meta.helm.sh/release-namespace": op_ns,
        },
    }});
    match Api::<ClusterRole>::all(client.clone())
        .patch(
            "chat-operator",
            &PatchParams::default(),
            &Patch::Merge(&adopt),
        )
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => panic!("marking ClusterRole chat-operator for adoption: {e}"),
    }
    let helm = paths::cached_bin("helm").unwrap();
    let kubeconfig = rig.kubeconfig_path().display().to_string();
    run(Command::new(&helm).args([
        "install",
        "chat-operator",
        &repo("charts/chat-operator").display().to_string(),
        "--namespace",
        &op_ns,
        "--create-namespace",
        "--kubeconfig",
        &kubeconfig,
        "--set",
        &format!("watchNamespace={ns}"),
        "--wait",
        "--timeout",
        "180s",
    ]));
    mark(&mut figures, "operator chart installed and Ready", &mut t);

    // The example's external Ollama: a selector-less Service whose endpoint is the node's IP,
    // which the node's proxy dials on loopback (the rig's Ollama).
    let ollama_port: u16 = rig
        .ollama_url()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let ssa = PatchParams::apply("e2e-test").force();
    let ns_obj: Namespace = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ai-models"}}))
    .unwrap();
    Api::<Namespace>::all(client.clone())
        .patch("ai-models", &ssa, &Patch::Apply(&ns_obj))
        .await
        .unwrap();
    let svc: Service = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "ollama", "namespace": "ai-models"},
        "spec": {"ports": [{"name": "http", "port": 11434, "targetPort": ollama_port}]}})).unwrap();
    Api::<Service>::namespaced(client.clone(), "ai-models")
        .patch("ollama", &ssa, &Patch::Apply(&svc))
        .await
        .unwrap();
    let slice: k8s_openapi::api::discovery::v1::EndpointSlice = serde_json::from_value(serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "ollama-rig", "namespace": "ai-models", "labels": {
            "kubernetes.io/service-name": "ollama", "endpointslice.kubernetes.io/managed-by": "e2e-test"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": ollama_port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [node.info().node_ip.to_string()], "conditions": {"ready": true}}]})).unwrap();
    Api::<k8s_openapi::api::discovery::v1::EndpointSlice>::namespaced(client.clone(), "ai-models")
        .patch("ollama-rig", &ssa, &Patch::Apply(&slice))
        .await
        .unwrap();

    // The minimal example, unchanged.
    let text = std::fs::read_to_string(repo("examples/minimal.yaml")).unwrap();
    let mut example: DynamicObject = serde_yaml::from_str(&text).unwrap();
    example.metadata.namespace = Some(ns.clone());
    // Short generations: this is a base model on two shared cores (TEST-RIG.md); the example
    // otherwise stays as written.
    example.data["spec"]["context"] = serde_json::json!({"maxOutputTokens": 16});
    let chatservices = chatservice_api(&client, &ns);
    chatservices
        .patch("minimal", &ssa, &Patch::Apply(&example))
        .await
        .expect("applying examples/minimal.yaml");
    until_object(
        &chatservices,
        "minimal",
        "to report Ready=True",
        Duration::from_secs(300),
        |cs| condition(cs, "Ready").filter(|(s, _)| s == "True"),
    )
    .await;
    mark(&mut figures, "minimal example Ready=True", &mut t);
    // The operator (a pod here) read the chat pods' own view of their back ends.
    until_object(
        &chatservices,
        "minimal",
        "to report BackendsReady=True (Healthy) from the chat service's /v1/backends",
        Duration::from_secs(120),
        |cs| {
            condition(cs, "BackendsReady").filter(|(s, reason)| s == "True" && reason == "Healthy")
        },
    )
    .await;

    let service = Api::<Service>::namespaced(client.clone(), &ns)
        .get("minimal")
        .await
        .unwrap();
    let spec = service.spec.unwrap();
    let base = format!(
        "http://{}:{}",
        spec.cluster_ip.unwrap(),
        spec.ports.unwrap()[0].port
    );
    let first = chat(&base, None, "Say hello.").await;
    let session = first["session_id"].as_str().unwrap().to_string();
    assert!(
        !first["message"]
            .as_str()
            .unwrap_or_default()
            .trim()
            .is_empty(),
        "empty reply: {first}"
    );
    mark(
        &mut figures,
        "first chat turn through the ClusterIP",
        &mut t,
    );

    // Scale 1 → 3.
    chatservices
        .patch(
            "minimal",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"spec": {"replicas": 3}})),
        )
        .await
        .unwrap();
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    eventually(
        "3 Ready chat-service pods",
        Duration::from_secs(180),
        || async {
            let ready = ready_chat_pods(&pods).await;
            (ready.len() == 3).then_some(())
        },
    )
    .await;
    // The Service proxy follows the EndpointSlice; give it one sync.
    tokio::time::sleep(Duration::from_secs(2)).await;
    mark(&mut figures, "scaled to 3 Ready pods", &mut t);

    // One session across replicas.
    let turns = 6;
    for i in 1..turns {
        let r = chat(&base, Some(&session), &format!("Turn {i}: name a colour.")).await;
        assert_eq!(r["session_id"], session.as_str());
    }
    let (status, page) = http(
        reqwest::Method::GET,
        &format!("{base}/v1/sessions/{session}/messages?limit=100"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{page}");
    let page: serde_json::Value = serde_json::from_str(&page).unwrap();
    let messages = page["messages"].as_array().unwrap();
    assert_eq!(
        messages.len(),
        2 * turns,
        "full history of {turns} turns: {page}"
    );
    let roles: Vec<&str> = messages
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert!(
        roles.chunks(2).all(|p| p == ["user", "assistant"]),
        "turns in order: {roles:?}"
    );
    let mut served = BTreeMap::new();
    for p in ready_chat_pods(&pods).await {
        let ip = p.status.unwrap().pod_ip.unwrap();
        served.insert(p.metadata.name.unwrap(), chat_turns_served(&ip).await);
    }
    let serving = served.values().filter(|n| **n > 0).count();
    assert!(
        serving >= 2,
        "turns of one session should spread over the replicas: {served:?}"
    );
    figures.push(format!("turns served per pod: {served:?}"));
    mark(&mut figures, "session continued across replicas", &mut t);

    // Roll: a new back-end URL (same Ollama, another spelling) → new ReplicaSet.
    let rs_api = Api::<ReplicaSet>::namespaced(client.clone(), &ns);
    let old_rs: BTreeSet<String> = rs_api
        .list(&ListParams::default().labels("app.kubernetes.io/component=chat-service"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|r| r.metadata.name)
        .collect();
    // The same Ollama through its OpenAI-compatible API: a new back end (name and protocol).
    // (The URL keeps its `.cluster.local` name: Ollama bound to loopback, as the rig's is, answers
    // 403 to Host names outside localhost/.local/.internal.)
    let new_backend = "ollama-openai";
    chatservices
        .patch(
            "minimal",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"spec": {"backends": [
                {"name": new_backend, "url": "http://ollama.ai-models.svc.cluster.local:11434", "protocol": "openai"}]}})),
        )
        .await
        .unwrap();
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    eventually(
        "the rollout to a new ReplicaSet",
        Duration::from_secs(240),
        || async {
            let rs = rs_api
                .list(&ListParams::default().labels("app.kubernetes.io/component=chat-service"))
                .await
                .ok()?
                .items;
            let fresh = rs.iter().find(|r| {
                !old_rs.contains(r.metadata.name.as_deref().unwrap_or_default())
                    && r.status.as_ref().and_then(|s| s.ready_replicas) == Some(3)
            })?;
            let old_scaled_down = rs
                .iter()
                .filter(|r| old_rs.contains(r.metadata.name.as_deref().unwrap_or_default()))
                .all(|r| r.spec.as_ref().and_then(|s| s.replicas) == Some(0));
            let d = deployments.get("minimal").await.ok()?;
            let done = d.status.as_ref().and_then(|s| s.updated_replicas) == Some(3)
                && d.status.as_ref().and_then(|s| s.replicas) == Some(3);
            (old_scaled_down && done && ready_chat_pods(&pods).await.len() == 3)
                .then(|| fresh.metadata.name.clone())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, backends) = http(reqwest::Method::GET, &format!("{base}/v1/backends"), None).await;
    assert_eq!(status, 200, "{backends}");
    let listed: serde_json::Value = serde_json::from_str(&backends).unwrap();
    let entries = listed["backends"].as_array().cloned().unwrap_or_default();
    assert!(
        entries.len() == 1
            && entries[0]["name"] == new_backend
            && entries[0]["protocol"] == "openai",
        "the new back end is the one in use after the rollout: {backends}"
    );
    let after = chat(&base, None, "One turn after the rollout.").await;
    assert!(after["session_id"].is_string(), "{after}");
    mark(&mut figures, "rolled out the new back end", &mut t);

    // Delete: every child goes (owner GC), and every local process and namespace with it.
    let before: Vec<Pod> = pods.list(&ListParams::default()).await.unwrap().items;
    let pids = container_pids(&before);
    assert!(!pids.is_empty(), "container pids in pod statuses");
    chatservices
        .delete("minimal", &DeleteParams::default())
        .await
        .unwrap();
    let selector = "chatoperator.dev/chatservice=minimal";
    eventually(
        "every child of ChatService minimal gone",
        Duration::from_secs(180),
        || async {
            let lp = ListParams::default().labels(selector);
            let c = client.clone();
            let n = Api::<Pod>::namespaced(c.clone(), &ns)
                .list(&lp)
                .await
                .ok()?
                .items
                .len()
                + Api::<Deployment>::namespaced(c.clone(), &ns)
                    .list(&lp)
                    .await
                    .ok()?
                    .items
                    .len()
                + Api::<k8s_openapi::api::apps::v1::StatefulSet>::namespaced(c.clone(), &ns)
                    .list(&lp)
                    .await
                    .ok()?
                    .items
                    .len()
                + Api::<Service>::namespaced(c.clone(), &ns)
                    .list(&lp)
                    .await
                    .ok()?
                    .items
                    .len()
                + Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(c.clone(), &ns)
                    .list(&lp)
                    .await
                    .ok()?
                    .items
                    .len()
                + Api::<k8s_openapi::api::core::v1::Secret>::namespaced(c.clone(), &ns)
                    .list(&lp)
                    .await
                    .ok()?
                    .items
                    .len()
                + Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(c.clone(), &ns)
                    .list(&lp)
                    .await
                    .ok()?
                    .items
                    .len()
                + Api::<ReplicaSet>::namespaced(c.clone(), &ns)
                    .list(&lp)
                    .await
                    .ok()?
                    .items
                    .len()
                + Api::<Pod>::namespaced(c.clone(), &ns)
                    .list(&ListParams::default())
                    .await
                    .ok()?
                    .items
                    .len();
            (n == 0).then_some(())
        },
    )
    .await;
    for pid in &pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "container process {pid} still runs after its pod was deleted"
        );
    }
    // Only the operator's pod still has a namespace.
    let live = node.live_pod_namespaces();
    assert_eq!(
        live.len(),
        1,
        "pod namespaces left besides the operator's: {live:?}"
    );
    mark(
        &mut figures,
        "deleted; children, processes and namespaces gone",
        &mut t,
    );

    run(Command::new(&helm).args([
        "uninstall",
        "chat-operator",
        "--namespace",
        &op_ns,
        "--kubeconfig",
        &kubeconfig,
        "--wait",
        "--timeout",
        "60s",
    ]));
    let run_id = node.info().run_id.clone();
    drop(node);
    let leftovers = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    let leftovers = String::from_utf8_lossy(&leftovers.stdout).into_owned();
    assert!(
        !leftovers.contains(&run_id),
        "links of node run {run_id} left after shutdown: {leftovers}"
    );
    let netns = run(Command::new("ip").args(["netns", "list"]));
    assert!(
        !netns.contains(&format!("chatop-{run_id}-")),
        "netns left: {netns}"
    );
    mark(
        &mut figures,
        "operator uninstalled, node stopped and clean",
        &mut t,
    );
    figures.push(format!("total: {:.1} s", started.elapsed().as_secs_f64()));
    eprintln!("[end_to_end] {}", figures.join("; "));
}
