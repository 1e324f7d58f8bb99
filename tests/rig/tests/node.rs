//! End to end on the rig's real node (`chat_rig::kubelet_node`: kubelet, containerd, runc,
//! kube-proxy, CoreDNS, kube-router): the product images built from their Dockerfiles and the
//! stand-ins are imported into the node's containerd; the shared Ollama of examples/minimal.yaml
//! runs as a pod of the ollama stand-in image (tests/rig/manifests/shared-ollama.yaml); the
//! operator, installed with its Helm chart, runs as a pod and reconciles examples/minimal.yaml;
//! a chat session (SmolLM2, the rig's chat model) is answered through the chat Service's
//! ClusterIP while the Deployment scales and rolls. Every namespace enforces Pod Security
//! `restricted`. On the same node: a chat pod runs as a non-root user and cannot write its root
//! file system, and a pod of another namespace cannot reach the managed Redis and MongoDB,
//! which the chat pods reach (kube-router enforces the operator's NetworkPolicies).
//!
//! Starts a private control plane (not the shared rig: the node's scheduler would take every
//! test's pods) and the node, which may run once per machine. Needs root, the installer's
//! binaries (tests/rig/install.sh) and the workspace's debug binaries (`cargo build
//! --workspace --bins`). On failure it prints conditions, events, pod statuses and logs.

mod real_node;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use chat_rig::wait::until_object;
use chat_rig::{Rig, eventually, unique_name};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use real_node::{
    Kubectl, chat, chatservice_api, condition, enforce_restricted, http, install_operator, mark,
    pod_ip, pod_name, pods_of, ready_chat_pods, repo, run_on_real_node, start_intruder,
    uninstall_operator,
};

/// The rig's instruction-tuned chat model (tests/rig/install.sh, step chat-model), which the
/// shared Ollama's manifest pulls.
const CHAT_MODEL: &str = "smollm2:135m";

/// `chat_http_requests_total` of POST /v1/chat answered 200, from one pod's /metrics.
async fn chat_turns_served(pod_ip: &str) -> u64 {
    let url = format!("http://{pod_ip}:8080/metrics");
    let (status, text) = http(reqwest::Method::GET, &url, None).await;
    assert_eq!(status, 200, "GET {url}: {text:.200}");
    text.lines()
        .filter(|l| l.starts_with("chat_http_requests_total{"))
        .filter(|l| l.contains("route=\"/v1/chat\"") && l.contains("status=\"200\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// A chat pod runs as the non-root user 65532 and its root file system is read-only: seen from
/// a toolbox container that shares the chat container's processes (the chat image has no shell).
async fn chat_pod_is_confined(kubectl: &Kubectl, ns: &str, chat_pod: &str) -> String {
    let probe = kubectl.attach_toolbox(ns, chat_pod, "chat-service");
    let (ok, status) = kubectl.exec_in(ns, chat_pod, &probe, &["cat", "/proc/1/status"]);
    let uids = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap_or_default();
    assert!(ok, "reading the chat process's status: {status}");
    let ids: Vec<&str> = uids.split_whitespace().skip(1).collect();
    assert!(
        !ids.is_empty() && ids.iter().all(|id| *id == "65532"),
        "the chat process must run as user 65532 (real, effective, saved, fs): {uids:?}"
    );
    let (ok, write) = kubectl.exec_in(
        ns,
        chat_pod,
        &probe,
        &["touch", "/proc/1/root/usr/local/bin/written"],
    );
    assert!(
        !ok && write.contains("Read-only file system"),
        "writing the chat container's root file system must fail as read-only: {write}"
    );
    probe
}

/// The managed Redis and MongoDB take connections from the chat pods and from nobody else: a
/// pod of another namespace cannot open one (the operator's NetworkPolicies, enforced by
/// kube-router), while the chat pod, through its toolbox container, can.
async fn stores_are_fenced(
    client: &kube::Client,
    kubectl: &Kubectl,
    ns: &str,
    chat_pod: &str,
    probe: &str,
) {
    let outsider = start_intruder(client, kubectl).await;
    // The intruder's own network works: it reaches the shared Ollama, which no policy fences.
    let ollama = Api::<Pod>::namespaced(client.clone(), "ai-models")
        .list(&ListParams::default().labels("app=ollama"))
        .await
        .unwrap();
    let ollama_ip = ollama
        .items
        .first()
        .map(pod_ip)
        .expect("the shared Ollama pod");
    if let Err(e) = kubectl.connects(&outsider, "intruder", "intruder", &ollama_ip, 11434) {
        panic!("the intruder pod reaches nothing, not even the shared Ollama at {ollama_ip}: {e}");
    }
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    for (component, port) in [("redis", 6379), ("mongodb", 27017)] {
        let store = pods_of(&pods, component).await;
        let ip = store
            .first()
            .map(pod_ip)
            .unwrap_or_else(|| panic!("no Ready {component} pod"));
        if let Err(e) = kubectl.connects(ns, chat_pod, probe, &ip, port) {
            panic!("the chat pod must reach its {component} at {ip}:{port}: {e}");
        }
        if kubectl
            .connects(&outsider, "intruder", "intruder", &ip, port)
            .is_ok()
        {
            panic!(
                "a pod of namespace {outsider} reached the managed {component} at {ip}:{port}: the NetworkPolicy is not enforced"
            );
        }
    }
    kubectl.run(&["delete", "namespace", &outsider, "--wait=false"]);
}

async fn scenario(rig: &Rig, kubectl: &Kubectl, figures: &mut Vec<String>) {
    let mut t = Instant::now();
    let client = rig.kube_client().await;
    let ns = unique_name("e2e");
    let op_ns = unique_name("chat-operator");
    // Every pod the operator, its chart and the shared Ollama create must pass `restricted`.
    for name in [&ns, &op_ns] {
        enforce_restricted(&client, name).await;
    }
    let shared_ollama = repo("tests/rig/manifests/shared-ollama.yaml");
    kubectl.run(&["apply", "-f", &shared_ollama.display().to_string()]);

    install_operator(kubectl, &op_ns, &[format!("watchNamespace={ns}")]);
    mark(figures, "operator chart installed and Ready", &mut t);
    kubectl.run(&[
        "-n",
        "ai-models",
        "rollout",
        "status",
        "deployment/ollama",
        "--timeout=180s",
    ]);
    mark(figures, "shared Ollama pod Ready", &mut t);

    // The minimal example, with the rig's chat model and short answers (two shared cores).
    let text = std::fs::read_to_string(repo("examples/minimal.yaml")).unwrap();
    let mut example: DynamicObject = serde_yaml::from_str(&text).unwrap();
    example.metadata.namespace = Some(ns.clone());
    example.data["spec"]["models"] = serde_json::json!({"default": CHAT_MODEL});
    example.data["spec"]["context"] = serde_json::json!({"maxOutputTokens": 24});
    let chatservices = chatservice_api(&client, &ns);
    let ssa = PatchParams::apply("e2e-test").force();
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
    mark(figures, "minimal example Ready=True", &mut t);
    // The operator (a pod in another namespace) read the chat pods' own view of their back ends.
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
    let first = chat(&base, None, "My name is Ada. Say hello.").await;
    let session = first["session_id"].as_str().unwrap().to_string();
    let reply = first["message"]
        .as_str()
        .unwrap_or_default()
        .trim()
        .to_string();
    assert!(!reply.is_empty(), "empty reply: {first}");
    assert_eq!(first["model"], CHAT_MODEL, "{first}");
    figures.push(format!("first reply: {reply:?}"));
    mark(figures, "first chat turn through the ClusterIP", &mut t);

    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let chat_pod = pod_name(&ready_chat_pods(&pods).await[0]);
    let probe = chat_pod_is_confined(kubectl, &ns, &chat_pod).await;
    stores_are_fenced(&client, kubectl, &ns, &chat_pod, &probe).await;
    mark(
        figures,
        "chat pod confined; stores fenced by NetworkPolicy",
        &mut t,
    );

    // Scale 1 → 3, and one session across the replicas.
    chatservices
        .patch(
            "minimal",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"spec": {"replicas": 3}})),
        )
        .await
        .unwrap();
    eventually(
        "3 Ready chat-service pods",
        Duration::from_secs(180),
        || async { (ready_chat_pods(&pods).await.len() == 3).then_some(()) },
    )
    .await;
    // kube-proxy follows the EndpointSlice; give it one sync.
    tokio::time::sleep(Duration::from_secs(2)).await;
    mark(figures, "scaled to 3 Ready pods", &mut t);
    // Turns of the session until a second replica has served one (kube-proxy picks at random;
    // right after the scale-up it may not yet list the new pods): at most 12.
    let mut turns = 1;
    let mut served = BTreeMap::new();
    while turns < 12 {
        turns += 1;
        let r = chat(
            &base,
            Some(&session),
            &format!("Turn {turns}: name a colour."),
        )
        .await;
        assert_eq!(r["session_id"], session.as_str());
        served.clear();
        for p in ready_chat_pods(&pods).await {
            served.insert(pod_name(&p), chat_turns_served(&pod_ip(&p)).await);
        }
        if turns >= 5 && served.values().filter(|n| **n > 0).count() >= 2 {
            break;
        }
    }
    assert!(
        served.values().filter(|n| **n > 0).count() >= 2,
        "{turns} turns of one session should spread over the replicas: {served:?}"
    );
    let url = format!("{base}/v1/sessions/{session}/messages?limit=100");
    let (status, page) = http(reqwest::Method::GET, &url, None).await;
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
    figures.push(format!("turns served per pod: {served:?}"));
    mark(figures, "session continued across replicas", &mut t);

    // Roll: the same Ollama through its OpenAI-compatible API is a new back end → new ReplicaSet.
    let rs_api = Api::<ReplicaSet>::namespaced(client.clone(), &ns);
    let chat_rs = ListParams::default().labels("app.kubernetes.io/component=chat-service");
    let old_rs: BTreeSet<String> = rs_api
        .list(&chat_rs)
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|r| r.metadata.name)
        .collect();
    let new_backend = "ollama-openai";
    let backends = serde_json::json!({"spec": {"backends": [{"name": new_backend,
        "url": "http://ollama.ai-models.svc.cluster.local:11434", "protocol": "openai"}]}});
    chatservices
        .patch("minimal", &PatchParams::default(), &Patch::Merge(&backends))
        .await
        .unwrap();
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    eventually(
        "the rollout to a new ReplicaSet",
        Duration::from_secs(240),
        || async {
            let rs = rs_api.list(&chat_rs).await.ok()?.items;
            let is_old =
                |r: &ReplicaSet| old_rs.contains(r.metadata.name.as_deref().unwrap_or_default());
            rs.iter().find(|r| {
                !is_old(r) && r.status.as_ref().and_then(|s| s.ready_replicas) == Some(3)
            })?;
            let old_scaled_down = rs
                .iter()
                .filter(|r| is_old(r))
                .all(|r| r.spec.as_ref().and_then(|s| s.replicas) == Some(0));
            let d = deployments.get("minimal").await.ok()?.status?;
            let done = d.updated_replicas == Some(3) && d.replicas == Some(3);
            (old_scaled_down && done && ready_chat_pods(&pods).await.len() == 3).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, listed) = http(reqwest::Method::GET, &format!("{base}/v1/backends"), None).await;
    assert_eq!(status, 200, "{listed}");
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let entries = listed["backends"].as_array().cloned().unwrap_or_default();
    assert!(
        entries.len() == 1
            && entries[0]["name"] == new_backend
            && entries[0]["protocol"] == "openai",
        "the new back end is the one in use after the rollout: {listed}"
    );
    let after = chat(&base, None, "One turn after the rollout.").await;
    assert!(after["session_id"].is_string(), "{after}");
    mark(figures, "rolled out the new back end", &mut t);

    // Delete: the owner's garbage collector removes every child, and the kubelet their pods.
    chatservices
        .delete("minimal", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        &format!("every pod of namespace {ns} gone"),
        Duration::from_secs(180),
        || async {
            pods.list(&ListParams::default())
                .await
                .ok()?
                .items
                .is_empty()
                .then_some(())
        },
    )
    .await;
    // Not what the storage retention (default Retain) keeps with the data: the MongoDB
    // volume claim and its credentials Secret, so that a re-created ChatService opens it again.
    let leftovers = kubectl.run(&[
        "get",
        "all,configmaps,secrets,networkpolicies,serviceaccounts",
        "-n",
        &ns,
        "-l",
        "chatoperator.dev/chatservice=minimal",
        "-o",
        "name",
    ]);
    let leftovers: Vec<&str> = leftovers
        .lines()
        .filter(|l| *l != "secret/minimal-mongodb-credentials")
        .collect();
    assert!(
        leftovers.is_empty(),
        "children of ChatService minimal left: {leftovers:?}"
    );
    mark(figures, "deleted; every child gone", &mut t);
    uninstall_operator(kubectl, &op_ns);
}

#[test]
fn end_to_end() {
    run_on_real_node(
        "node-e2e",
        "end_to_end",
        Box::new(|rig, kubectl, figures| Box::pin(scenario(rig, kubectl, figures))),
    );
}
