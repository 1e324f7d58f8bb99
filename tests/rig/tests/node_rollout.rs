//! Rollouts on the rig's real node, as a user runs them: the operator installed with its Helm
//! chart, `examples/rollout.yaml` applied with `kubectl apply` (the current back end `ollama`
//! and the candidate `ollama-next` are two real Ollama pods of the stand-in image in
//! `ai-models`), and conversations of two turns each sent to the chat Service the whole time.
//!
//! - **Promotion**: with short steps (50 % then 100 %), the rollout advances, the operator's pod
//!   is deleted mid-way and its replacement continues from `status.rollout` (same step, same
//!   step start, no new Event), and the candidate is promoted: it then serves every new session.
//! - **Rollback**: the named fault is the candidate's Ollama going away (its Deployment scaled to
//!   0) once it has served turns. Its turns then fail over to the current back end (no turn is
//!   lost), the error-rate gate breaks, and the operator sends the candidate back to 0 %, well
//!   within one step's window; the time from the fault to `RolledBack` is printed. Brought back,
//!   the candidate gets no more turns: a rollback holds until the spec is edited.
//!
//! Every conversation's turns are answered (a connection refused by a pod that is going away
//! is sent again: the turn never reached a chat service) and stored (read back at the end).
//! Substituted: the model (the rig's chat model for the example's `gemma3-270m`), the steps'
//! minimum turns and seconds, and the speed gates (the two Ollamas share two busy cores).

mod real_node;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chat_rig::wait::until_object;
use chat_rig::{Rig, eventually, unique_name};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams};
use real_node::{
    Kubectl, apply, call, chat_pods_of, chatservice_api, enforce_restricted, example_documents,
    install_operator, is_ready, kind_and_name, mark, pod_ip, pod_name, repo, run_on_real_node,
    scrape, service_base, uninstall_operator,
};
use serde_json::{Value, json};

/// The rig's instruction-tuned chat model, which both Ollama pods pull from their image.
const CHAT_MODEL: &str = "smollm2:135m";
/// A rollout's longest wait: every turn is a real generation on two shared cores.
const ROLLOUT_WAIT: Duration = Duration::from_secs(420);
/// `minSecondsPerStep` of the failing rollout: the step's window the rollback must beat.
const FAILING_STEP_SECONDS: u64 = 600;

/// `examples/rollout.yaml` in `ns` as ChatService `name`, with the model substituted and
/// `rollout` fields overridden by `overrides`.
fn rollout_example(ns: &str, name: &str, overrides: Value) -> DynamicObject {
    let mut objects = example_documents("examples/rollout.yaml", ns);
    assert_eq!(objects.len(), 1, "examples/rollout.yaml is one ChatService");
    let mut object = objects.remove(0);
    assert_eq!(kind_and_name(&object).0, "ChatService");
    object.metadata.name = Some(name.to_string());
    let spec = &mut object.data["spec"];
    assert_eq!(spec["models"]["default"], "gemma3-270m", "{spec}");
    spec["models"]["default"] = CHAT_MODEL.into();
    spec["replicas"] = 1.into();
    spec["context"] = json!({"maxOutputTokens": 8});
    let backends: Vec<&str> = spec["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b["name"].as_str())
        .collect();
    assert_eq!(backends, ["ollama", "ollama-next"], "{spec}");
    for (field, value) in overrides.as_object().unwrap() {
        spec["rollout"][field] = value.clone();
    }
    object
}

/// The candidate's Ollama: the shared Ollama's Deployment and Service as `ollama-next`.
fn candidate_ollama() -> Vec<DynamicObject> {
    let mut objects = example_documents("tests/rig/manifests/shared-ollama.yaml", "ai-models");
    objects.retain(|o| kind_and_name(o).0 != "Namespace");
    for object in &mut objects {
        object.metadata.name = Some("ollama-next".into());
        let kind = kind_and_name(object).0;
        let spec = &mut object.data["spec"];
        match kind.as_str() {
            "Deployment" => {
                spec["selector"]["matchLabels"]["app"] = "ollama-next".into();
                spec["template"]["metadata"]["labels"]["app"] = "ollama-next".into();
            }
            "Service" => spec["selector"]["app"] = "ollama-next".into(),
            other => panic!("shared-ollama.yaml has an unexpected {other}"),
        }
    }
    objects
}

/// `status.rollout` of ChatService `name`, when it has one.
fn rollout_status(cs: &DynamicObject) -> Option<Value> {
    cs.data
        .get("status")?
        .get("rollout")
        .filter(|r| !r.is_null())
        .cloned()
}

/// Waits until `status.rollout` of `name` satisfies `check`; on timeout says what it was.
async fn wait_rollout(
    client: &kube::Client,
    ns: &str,
    name: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    until_object(
        &chatservice_api(client, ns),
        name,
        what,
        ROLLOUT_WAIT,
        |cs| rollout_status(cs).filter(|r| check(r)),
    )
    .await
}

/// Reasons of the rollout Events of namespace `ns`, oldest first.
async fn rollout_events(client: &kube::Client, ns: &str) -> Vec<String> {
    let mut events = Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    events.sort_by_key(|e| {
        e.event_time
            .clone()
            .map(|t| t.0)
            .or_else(|| e.deprecated_first_timestamp.clone().map(|t| t.0))
    });
    events
        .into_iter()
        .filter_map(|e| e.reason)
        .filter(|r| r.starts_with("Rollout"))
        .collect()
}

/// Conversations of two turns each, one after another, to the chat Service at `base`, until
/// stopped. A connection that fails is sent again (a pod going away during a roll refused it
/// before any chat service read it); any HTTP answer but 200 is a lost turn.
struct Traffic {
    stop: Arc<AtomicBool>,
    sessions: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<Result<usize, String>>,
}

impl Traffic {
    fn start(base: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sessions: Arc<Mutex<Vec<String>>> = Arc::default();
        let (task_stop, task_sessions) = (stop.clone(), sessions.clone());
        let task = tokio::spawn(async move {
            let mut turns = 0;
            while !task_stop.load(Ordering::SeqCst) {
                let session = unique_name("conversation");
                for n in 0..2 {
                    let body = json!({"session_id": session, "message": format!("Say hi ({n})")});
                    let deadline = Instant::now() + Duration::from_secs(60);
                    loop {
                        let url = format!("{base}/v1/chat");
                        let (status, _, text) =
                            call(reqwest::Method::POST, &url, None, Some(body.clone())).await;
                        match status {
                            200 => break,
                            0 if Instant::now() < deadline => {
                                tokio::time::sleep(Duration::from_millis(500)).await;
                            }
                            _ => {
                                return Err(format!(
                                    "turn {n} of {session} lost after {turns} turns: {status} {text}"
                                ));
                            }
                        }
                    }
                    turns += 1;
                }
                task_sessions.lock().unwrap().push(session);
            }
            Ok(turns)
        });
        Self {
            stop,
            sessions,
            task,
        }
    }

    /// Stops after the conversation in progress; fails the test if a turn was lost, or if a
    /// finished conversation does not have its four messages stored.
    async fn finish(self, base: &str) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        let turns = self
            .task
            .await
            .unwrap()
            .unwrap_or_else(|lost| panic!("{lost}"));
        let sessions = self.sessions.lock().unwrap().clone();
        for session in &sessions {
            let url = format!("{base}/v1/sessions/{session}/messages");
            let (status, _, text) = call(reqwest::Method::GET, &url, None, None).await;
            assert_eq!(status, 200, "GET {url}: {text}");
            let messages: Value = serde_json::from_str(&text).unwrap();
            let stored = messages["messages"].as_array().map_or(0, Vec::len);
            assert_eq!(stored, 4, "both turns of {session} stored: {text}");
        }
        assert!(turns > 0 && !sessions.is_empty(), "no conversation ran");
        turns
    }
}

/// Turns each back end of ChatService `name` received, summed over its Ready chat pods:
/// (`ollama`, `ollama-next`).
async fn backend_requests(pods: &Api<Pod>, name: &str) -> (f64, f64) {
    let mut sums = (0.0, 0.0);
    for pod in chat_pods_of(pods, name).await {
        sums.0 += scrape(&pod, "chat_backend_requests_total", &["backend=\"ollama\""]).await;
        sums.1 += scrape(
            &pod,
            "chat_backend_requests_total",
            &["backend=\"ollama-next\""],
        )
        .await;
    }
    sums
}

/// The rollout weight every Ready chat pod of `name` serves, from its `GET /v1/backends`.
async fn served_weights(pods: &Api<Pod>, name: &str) -> Vec<u64> {
    let mut weights = Vec::new();
    for pod in chat_pods_of(pods, name).await {
        let url = format!("http://{}:8080/v1/backends", pod_ip(&pod));
        let (status, _, text) = call(reqwest::Method::GET, &url, None, None).await;
        assert_eq!(status, 200, "GET {url}: {text}");
        let report: Value = serde_json::from_str(&text).unwrap();
        weights.push(
            report["rollout"]["candidateWeightPercent"]
                .as_u64()
                .unwrap(),
        );
    }
    weights
}

/// The operator's Ready pod in `op_ns`.
async fn operator_pod(client: &kube::Client, op_ns: &str) -> Option<String> {
    Api::<Pod>::namespaced(client.clone(), op_ns)
        .list(&ListParams::default().labels("app.kubernetes.io/name=chat-operator"))
        .await
        .ok()?
        .items
        .into_iter()
        .find(is_ready)
        .map(|p| pod_name(&p))
}

async fn wait_ready(client: &kube::Client, ns: &str, name: &str) {
    until_object(
        &chatservice_api(client, ns),
        name,
        "to report Ready=True",
        Duration::from_secs(300),
        |cs| {
            let conditions = cs.data.get("status")?.get("conditions")?.as_array()?;
            conditions
                .iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
                .then_some(())
        },
    )
    .await;
}

async fn promotes(
    client: &kube::Client,
    kubectl: &Kubectl,
    op_ns: &str,
    figures: &mut Vec<String>,
) {
    let ns = unique_name("rollout-promote");
    enforce_restricted(client, &ns).await;
    // Generous speed gates: both Ollamas share two busy cores, so their speeds vary by turn;
    // this part is about the steps, the failing one about a gate.
    let overrides = json!({
        "steps": [50, 100], "minTurnsPerStep": 3, "minSecondsPerStep": 30,
        "gates": {"maxErrorRatePercent": 2, "maxTtftP95RatioPercent": 10000,
            "minTokensPerSecondRatioPercent": 1},
    });
    apply(kubectl, &[rollout_example(&ns, "canary", overrides)]);
    wait_ready(client, &ns, "canary").await;
    let started = Instant::now();
    let base = service_base(client, &ns, "canary").await;
    let traffic = Traffic::start(base.clone());

    let advanced = wait_rollout(
        client,
        &ns,
        "canary",
        "reach its second step (100 %)",
        |r| r["step"] == 1 && r["phase"] == "Progressing",
    )
    .await;
    assert_eq!(advanced["candidateWeightPercent"], 100, "{advanced:#}");
    figures.push(format!(
        "promote: step 2 after {:.1} s",
        started.elapsed().as_secs_f64()
    ));

    // The operator's pod deleted mid-step: its replacement reads the rollout from status.
    let before = operator_pod(client, op_ns).await.expect("the operator pod");
    kubectl.run(&["delete", "pod", "-n", op_ns, &before, "--wait=false"]);
    let after = eventually(
        "a new operator pod Ready",
        Duration::from_secs(180),
        || async { operator_pod(client, op_ns).await.filter(|p| *p != before) },
    )
    .await;
    let cs = chatservice_api(client, &ns).get("canary").await.unwrap();
    let mid = rollout_status(&cs).unwrap();
    assert_eq!(
        (&mid["phase"], &mid["step"]),
        (&json!("Progressing"), &json!(1)),
        "the operator was restarted mid-step: {mid:#}"
    );
    let promoted = wait_rollout(client, &ns, "canary", "promote", |r| {
        r["phase"] == "Promoted"
    })
    .await;
    figures.push(format!(
        "promote: Promoted after {:.1} s, operator pod {before} replaced by {after} on step 2",
        started.elapsed().as_secs_f64()
    ));
    assert_eq!(promoted["step"], 1, "{promoted:#}");
    assert_eq!(
        promoted["stepStartedAt"], advanced["stepStartedAt"],
        "the restarted operator kept the step's start: {promoted:#}"
    );
    assert!(
        promoted["candidate"]["turns"].as_i64().unwrap_or(0) >= 3,
        "{promoted:#}"
    );
    let turns = traffic.finish(&base).await;
    let events = rollout_events(client, &ns).await;
    assert_eq!(
        events,
        ["RolloutStarted", "RolloutStepAdvanced", "RolloutPromoted"],
        "one Event per transition, none for the operator's restart ({turns} turns served)"
    );

    // Promoted: the candidate takes every new session.
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    assert_eq!(served_weights(&pods, "canary").await, [100]);
    let (current_before, candidate_before) = backend_requests(&pods, "canary").await;
    for n in 0..3 {
        let body = json!({"session_id": unique_name("after"), "message": format!("Hello ({n})")});
        let (status, _, text) = call(
            reqwest::Method::POST,
            &format!("{base}/v1/chat"),
            None,
            Some(body),
        )
        .await;
        assert_eq!(status, 200, "{text}");
    }
    let (current_after, candidate_after) = backend_requests(&pods, "canary").await;
    assert_eq!(
        (
            current_after - current_before,
            candidate_after - candidate_before
        ),
        (0.0, 3.0),
        "after promotion every new session goes to ollama-next"
    );
    figures.push(format!(
        "promote: {turns} turns, none lost; turns per back end (ollama, ollama-next): ({current_after}, {candidate_after})"
    ));
    chatservice_api(client, &ns)
        .delete("canary", &DeleteParams::default())
        .await
        .unwrap();
}

async fn rolls_back(client: &kube::Client, kubectl: &Kubectl, figures: &mut Vec<String>) {
    let ns = unique_name("rollout-fail");
    enforce_restricted(client, &ns).await;
    let overrides = json!({
        "steps": [50, 100], "minTurnsPerStep": 1000, "minSecondsPerStep": FAILING_STEP_SECONDS,
        "gates": {"maxErrorRatePercent": 5, "maxTtftP95RatioPercent": 10000,
            "minTokensPerSecondRatioPercent": 1},
    });
    apply(kubectl, &[rollout_example(&ns, "failing", overrides)]);
    wait_ready(client, &ns, "failing").await;
    let base = service_base(client, &ns, "failing").await;
    let traffic = Traffic::start(base.clone());
    let healthy = wait_rollout(client, &ns, "failing", "count 5 candidate turns", |r| {
        r["phase"] == "Progressing" && r["candidate"]["turns"].as_i64().unwrap_or(0) >= 5
    })
    .await;
    assert_eq!(
        healthy["candidate"]["errors"], 0,
        "the candidate before the fault: {healthy:#}"
    );

    // The fault: the candidate's Ollama goes away.
    let fault = Instant::now();
    kubectl.run(&[
        "scale",
        "-n",
        "ai-models",
        "deployment/ollama-next",
        "--replicas=0",
    ]);
    let rolled_back = wait_rollout(client, &ns, "failing", "roll back", |r| {
        r["phase"] == "RolledBack"
    })
    .await;
    let fault_to_rollback = fault.elapsed();
    println!("[node_rollout] fault to RolledBack: {fault_to_rollback:?}");
    figures.push(format!(
        "rollback: fault to RolledBack {:.1} s (step window {FAILING_STEP_SECONDS} s): {}",
        fault_to_rollback.as_secs_f64(),
        rolled_back["message"]
    ));
    assert!(
        fault_to_rollback < Duration::from_secs(FAILING_STEP_SECONDS),
        "{rolled_back:#}"
    );
    assert_eq!(
        (
            &rolled_back["candidateWeightPercent"],
            &rolled_back["currentWeightPercent"]
        ),
        (&json!(0), &json!(100)),
        "{rolled_back:#}"
    );
    assert!(
        rolled_back["message"]
            .as_str()
            .unwrap_or_default()
            .contains("error rate"),
        "{rolled_back:#}"
    );

    // The rollback reaches the chat pods, and holds: the candidate, back up, gets no turn.
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    eventually(
        "the chat pods serving 0 % to the candidate",
        Duration::from_secs(180),
        || async {
            let weights = served_weights(&pods, "failing").await;
            (!weights.is_empty() && weights.iter().all(|w| *w == 0)).then_some(())
        },
    )
    .await;
    kubectl.run(&[
        "scale",
        "-n",
        "ai-models",
        "deployment/ollama-next",
        "--replicas=1",
    ]);
    kubectl.run(&[
        "-n",
        "ai-models",
        "rollout",
        "status",
        "deployment/ollama-next",
        "--timeout=180s",
    ]);
    let (_, candidate_before) = backend_requests(&pods, "failing").await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    let turns = traffic.finish(&base).await;
    let (current, candidate_after) = backend_requests(&pods, "failing").await;
    assert_eq!(
        candidate_after, candidate_before,
        "a rolled-back candidate got turns"
    );
    assert!(current > 0.0, "the current back end served the turns");
    let cs = chatservice_api(client, &ns).get("failing").await.unwrap();
    assert_eq!(
        rollout_status(&cs).unwrap()["phase"],
        "RolledBack",
        "a rollback holds until the spec is edited"
    );
    let events = rollout_events(client, &ns).await;
    assert_eq!(
        events,
        ["RolloutStarted", "RolloutRolledBack"],
        "one Event per transition ({turns} turns served, none lost)"
    );
    figures.push(format!("rollback: {turns} turns, none lost"));
    chatservice_api(client, &ns)
        .delete("failing", &DeleteParams::default())
        .await
        .unwrap();
}

async fn scenario(rig: &Rig, kubectl: &Kubectl, figures: &mut Vec<String>) {
    let mut t = Instant::now();
    let client = rig.kube_client().await;
    let op_ns = unique_name("chat-operator");
    enforce_restricted(&client, &op_ns).await;
    let shared_ollama = repo("tests/rig/manifests/shared-ollama.yaml");
    kubectl.run(&["apply", "-f", &shared_ollama.display().to_string()]);
    apply(kubectl, &candidate_ollama());
    install_operator(kubectl, &op_ns, &[]);
    for deployment in ["deployment/ollama", "deployment/ollama-next"] {
        kubectl.run(&[
            "-n",
            "ai-models",
            "rollout",
            "status",
            deployment,
            "--timeout=180s",
        ]);
    }
    mark(figures, "operator and both Ollamas Ready", &mut t);
    promotes(&client, kubectl, &op_ns, figures).await;
    mark(figures, "rollout promoted", &mut t);
    rolls_back(&client, kubectl, figures).await;
    mark(figures, "rollout rolled back", &mut t);
    uninstall_operator(kubectl, &op_ns);
}

#[test]
fn rollouts_promote_and_roll_back_on_the_real_node() {
    run_on_real_node(
        "node-rollout",
        "node_rollout",
        Box::new(|rig, kubectl, figures| Box::pin(scenario(rig, kubectl, figures))),
    );
}
