//! The two examples that no other test runs, applied to the rig's real node the way a user
//! applies them (`kubectl apply -f`), with only their placeholders filled in:
//!
//! - **`examples/multi-backend.yaml`**: three chat pods behind API keys, two Ollama back ends
//!   (`ollama-a` and `ollama-b`, here two Services in front of the one shared Ollama pod: two
//!   shared cores) and a hosted OpenAI-compatible back end at `https://llm.example.com`, which
//!   this machine cannot reach, so it stands for a provider that is down. The test checks what
//!   the example's comment promises: callers need a key; a caller's sessions are its own; the
//!   small model is answered by the Ollama back ends and never sent to the hosted one; the large
//!   model, which only the unreachable back end serves, is refused at once (503
//!   `backend_unavailable`), not left to hang;
//!   `BackendsReady` counts the endpoints the chat pods' health checks pass; a deterministic
//!   answer comes from the response cache on any replica, but never for another caller; and the
//!   per-key rate limit holds across the three replicas.
//! - **`examples/autoscaling.yaml`**: the HPA keeps two replicas, reads CPU from metrics-server,
//!   and, as the example says, cannot read `chat_requests_in_flight` without a metrics adapter
//!   (`FailedGetPodsMetric`); the series such an adapter would serve is real: a chat pod's
//!   `/metrics`, at the port and path its Prometheus annotations name, counts a turn while it
//!   streams and drops back to zero after it.
//!
//! - **A managed Ollama** (the operator's own model server, here on CPU: the GPU example's
//!   shape without the GPU) answers the chat pods' turns, and its NetworkPolicy fences it: the
//!   chat pod reaches it, a pod of another namespace does not (while that pod does reach the
//!   shared Ollama, which no policy fences).
//!
//! Substituted: the model (the rig's chat model for the example's `gemma3-270m`), short answers
//! (two shared cores), the Secrets' values. Starts a private control plane and the node, like
//! `node.rs`; needs root and the installer's binaries.

mod real_node;

use std::time::{Duration, Instant};

use chat_rig::wait::until_object;
use chat_rig::{Rig, eventually, unique_name};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams};
use real_node::{
    Kubectl, apply, call, chat_pods_of, chatservice_api, enforce_restricted, example_documents,
    install_operator, kind_and_name, mark, pod_ip, pod_name, pods_of, repo, run_on_real_node,
    scrape, service_base, start_intruder, uninstall_operator,
};

/// The rig's instruction-tuned chat model, which the shared Ollama's manifest pulls.
const CHAT_MODEL: &str = "smollm2:135m";
/// The small model the examples name.
const EXAMPLE_MODEL: &str = "gemma3-270m";
/// The two callers' API keys (the example's placeholders, replaced).
const KEY_A: &str = "node-examples-key-for-team-a-0123456789";
const KEY_B: &str = "node-examples-key-for-team-b-0123456789";

/// A condition's status, reason and message.
fn condition(cs: &DynamicObject, type_: &str) -> Option<(String, String, String)> {
    let conditions = cs.data.get("status")?.get("conditions")?.as_array()?;
    conditions.iter().find(|c| c["type"] == type_).map(|c| {
        let field = |name: &str| c[name].as_str().unwrap_or_default().to_string();
        (field("status"), field("reason"), field("message"))
    })
}

/// One turn as caller `key`; retries while the service answers 503 (its health checks have not
/// yet seen a back end) or the connection fails.
async fn turn(base: &str, key: Option<&str>, body: serde_json::Value) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, _, text) = call(
            reqwest::Method::POST,
            &format!("{base}/v1/chat"),
            key,
            Some(body.clone()),
        )
        .await;
        if status == 200 {
            return serde_json::from_str(&text).unwrap();
        }
        assert!(
            matches!(status, 0 | 503) && Instant::now() < deadline,
            "POST {base}/v1/chat {body} answered {status}: {text}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// examples/multi-backend.yaml with its placeholders filled in.
fn multi_backend_example(ns: &str) -> Vec<DynamicObject> {
    let mut objects = example_documents("examples/multi-backend.yaml", ns);
    for object in &mut objects {
        match kind_and_name(object) {
            (kind, name) if kind == "Secret" && name == "chat-api-keys" => {
                object.data["stringData"] =
                    serde_json::json!({"keys": format!("{KEY_A}\n{KEY_B}\n")});
            }
            (kind, name) if kind == "Secret" && name == "hosted-llm" => {
                object.data["stringData"] =
                    serde_json::json!({"api-key": "node-examples-provider-key"});
            }
            (kind, name) if kind == "ChatService" && name == "routed" => {
                let spec = &mut object.data["spec"];
                assert_eq!(spec["models"]["default"], EXAMPLE_MODEL, "{spec}");
                spec["models"]["default"] = CHAT_MODEL.into();
                spec["models"]["allowed"][0] = CHAT_MODEL.into();
                for backend in spec["backends"].as_array_mut().unwrap() {
                    if backend["models"][0] == EXAMPLE_MODEL {
                        backend["models"][0] = CHAT_MODEL.into();
                    }
                }
                spec["context"] = serde_json::json!({"maxOutputTokens": 24});
            }
            other => panic!("examples/multi-backend.yaml has an unexpected {other:?}"),
        }
    }
    assert_eq!(objects.len(), 3, "two Secrets and the ChatService");
    objects
}

/// Back-end requests of every Ready pod of `routed`, per back end.
async fn backend_requests(pods: &Api<Pod>) -> [f64; 3] {
    let mut sums = [0.0; 3];
    for pod in chat_pods_of(pods, "routed").await {
        for (i, backend) in ["ollama-a", "ollama-b", "hosted"].iter().enumerate() {
            sums[i] += scrape(
                &pod,
                "chat_backend_requests_total",
                &[&format!("backend=\"{backend}\"")],
            )
            .await;
        }
    }
    sums
}

async fn multi_backend(
    client: &kube::Client,
    kubectl: &Kubectl,
    ns: &str,
    figures: &mut Vec<String>,
) {
    apply(kubectl, &multi_backend_example(ns));
    let chatservices = chatservice_api(client, ns);
    until_object(
        &chatservices,
        "routed",
        "to report Ready=True and BackendsReady=True",
        Duration::from_secs(360),
        |cs| {
            condition(cs, "Ready").filter(|(s, _, _)| s == "True")?;
            condition(cs, "BackendsReady").filter(|(s, _, _)| s == "True")
        },
    )
    .await;
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    eventually(
        "the example's 3 chat pods Ready",
        Duration::from_secs(180),
        || async { (chat_pods_of(&pods, "routed").await.len() == 3).then_some(()) },
    )
    .await;
    // The hosted back end cannot be reached from here: the chat pods' health checks say so,
    // and the condition counts only the endpoints that pass them.
    let backends = until_object(
        &chatservices,
        "routed",
        "to count 2 of the 3 back-end endpoints healthy (the hosted one is unreachable)",
        Duration::from_secs(120),
        |cs| {
            condition(cs, "BackendsReady")
                .filter(|(s, _, message)| s == "True" && message.starts_with("2 of 3"))
        },
    )
    .await;
    figures.push(format!("multi-backend BackendsReady: {backends:?}"));

    let base = service_base(client, ns, "routed").await;
    let chat_url = format!("{base}/v1/chat");
    let (status, _, text) = call(
        reqwest::Method::POST,
        &chat_url,
        None,
        Some(serde_json::json!({"message": "Hello?"})),
    )
    .await;
    assert_eq!(status, 401, "a turn without an API key: {text}");
    let (status, _, text) = call(
        reqwest::Method::POST,
        &chat_url,
        Some("not-one-of-the-keys"),
        Some(serde_json::json!({"message": "Hello?"})),
    )
    .await;
    assert_eq!(status, 401, "a turn with an unknown API key: {text}");

    // Team A's turn, and its session belongs to team A only.
    let before = backend_requests(&pods).await;
    let first = turn(
        &base,
        Some(KEY_A),
        serde_json::json!({"message": "Name one colour."}),
    )
    .await;
    let session = first["session_id"].as_str().unwrap().to_string();
    let messages_url = format!("{base}/v1/sessions/{session}/messages");
    let (status, _, text) = call(reqwest::Method::GET, &messages_url, Some(KEY_A), None).await;
    assert_eq!(status, 200, "team A reads its session: {text}");
    assert!(text.contains("Name one colour."), "{text}");
    let (status, _, text) = call(reqwest::Method::GET, &messages_url, Some(KEY_B), None).await;
    assert_eq!(status, 404, "team B must not see team A's session: {text}");
    let continued = turn(
        &base,
        Some(KEY_B),
        serde_json::json!({"session_id": session, "message": "And another?"}),
    )
    .await;
    assert_eq!(
        continued["context_messages"], 0,
        "team B naming team A's session id starts its own session, without A's history: {continued}"
    );

    // The small model is served by the two Ollama back ends only.
    let after = backend_requests(&pods).await;
    let ollama = (after[0] - before[0]) + (after[1] - before[1]);
    assert!(
        ollama >= 2.0 && after[2] == before[2],
        "the two turns of the small model went to ollama-a/ollama-b, never to hosted: before {before:?}, after {after:?}"
    );
    figures.push(format!(
        "back-end requests (ollama-a, ollama-b, hosted): {after:?}"
    ));

    // The large model has only the unreachable back end: a clear error, quickly.
    let started = Instant::now();
    let (status, _, text) = call(
        reqwest::Method::POST,
        &chat_url,
        Some(KEY_A),
        Some(serde_json::json!({"message": "Hello?", "model": "large-model"})),
    )
    .await;
    assert!(
        status == 503 && text.contains("backend_unavailable"),
        "a turn for the large model, which only the unreachable hosted back end serves, must be refused as unavailable: {status} {text}"
    );
    figures.push(format!(
        "large model with its only back end down: {status} after {:.1} s",
        started.elapsed().as_secs_f64()
    ));

    // Deterministic answers: the second identical request (new session, same context) is a
    // cache hit on whichever replica takes it; another caller's identical request is not.
    let deterministic =
        serde_json::json!({"message": "Reply with the word yes.", "temperature": 0.0});
    let original = turn(&base, Some(KEY_A), deterministic.clone()).await;
    assert_eq!(original["cached"], false, "{original}");
    let mut hits = 0;
    for _ in 0..3 {
        let again = turn(&base, Some(KEY_A), deterministic.clone()).await;
        assert_eq!(
            again["cached"], true,
            "a repeated deterministic turn: {again}"
        );
        assert_eq!(again["message"], original["message"], "{again}");
        hits += 1;
    }
    let other = turn(&base, Some(KEY_B), deterministic.clone()).await;
    assert_eq!(
        other["cached"], false,
        "team B must not get team A's cached answer: {other}"
    );

    // The per-key limit (60 requests a 60 s window, a GCRA bucket: a burst of 60, then one more
    // a second) holds across the replicas: team B's cached turns, spread over the three pods,
    // are refused with 429 and Retry-After once the burst is spent. Per-pod limits would admit
    // up to three bursts.
    let mut answered = 0;
    let mut refused = None;
    let burst_started = Instant::now();
    for _ in 0..300 {
        let (status, retry_after, text) = call(
            reqwest::Method::POST,
            &chat_url,
            Some(KEY_B),
            Some(deterministic.clone()),
        )
        .await;
        match status {
            200 => answered += 1,
            429 => {
                refused = Some((retry_after, text));
                break;
            }
            other => panic!("a cached turn answered {other}: {text}"),
        }
    }
    let elapsed = burst_started.elapsed().as_secs_f64();
    let (retry_after, text) = refused.unwrap_or_else(|| {
        panic!("300 requests with one key in {elapsed:.0} s were all answered: the limit is 60 a minute")
    });
    assert!(
        f64::from(answered) <= 61.0 + elapsed && retry_after.is_some(),
        "{answered} requests answered in {elapsed:.1} s before the 429 ({text}); the bucket allows 60 + 1 a second; Retry-After {retry_after:?}"
    );
    let mut served = Vec::new();
    for pod in chat_pods_of(&pods, "routed").await {
        served.push(scrape(&pod, "chat_rate_limited_total", &[]).await);
    }
    figures.push(format!(
        "{hits} cache hits; rate limit: {answered} answered in {elapsed:.1} s, then 429 (Retry-After {}); refusals per pod so far {served:?}",
        retry_after.unwrap()
    ));
}

/// examples/autoscaling.yaml with its model substituted.
fn autoscaling_example(ns: &str) -> Vec<DynamicObject> {
    let mut objects = example_documents("examples/autoscaling.yaml", ns);
    assert_eq!(objects.len(), 1, "the ChatService");
    let spec = &mut objects[0].data["spec"];
    assert_eq!(spec["models"]["default"], EXAMPLE_MODEL, "{spec}");
    spec["models"]["default"] = CHAT_MODEL.into();
    objects
}

async fn autoscaling(
    client: &kube::Client,
    kubectl: &Kubectl,
    ns: &str,
    figures: &mut Vec<String>,
) {
    apply(kubectl, &autoscaling_example(ns));
    let chatservices = chatservice_api(client, ns);
    until_object(
        &chatservices,
        "autoscaled",
        "to report Ready=True",
        Duration::from_secs(300),
        |cs| condition(cs, "Ready").filter(|(s, _, _)| s == "True"),
    )
    .await;
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    let ready = eventually(
        "the HPA's two minimum replicas Ready",
        Duration::from_secs(240),
        || async {
            let ready = chat_pods_of(&pods, "autoscaled").await;
            (ready.len() == 2).then_some(ready)
        },
    )
    .await;

    // CPU from metrics-server; the custom metric cannot be read without an adapter, as the
    // example's comment says, and the HPA says why.
    let hpa = |path: &str| {
        kubectl
            .try_run(&[
                "get",
                "hpa",
                "-n",
                ns,
                "autoscaled",
                "-o",
                &format!("jsonpath={path}"),
            ])
            .1
    };
    // What the HPA reads for its CPU target: metrics-server's figures for both chat pods.
    let metrics_path = format!("/apis/metrics.k8s.io/v1beta1/namespaces/{ns}/pods");
    let cpu = eventually(
        "metrics-server to serve the CPU of both chat pods (the HPA's CPU source)",
        Duration::from_secs(180),
        || async {
            let (ok, out) = kubectl.try_run(&["get", "--raw", &metrics_path]);
            let list: serde_json::Value = serde_json::from_str(&out).ok().filter(|_| ok)?;
            let figures: Vec<String> = list["items"]
                .as_array()?
                .iter()
                .filter(|p| ready.iter().any(|r| p["metadata"]["name"] == pod_name(r)))
                .filter_map(|p| {
                    p["containers"][0]["usage"]["cpu"]
                        .as_str()
                        .map(str::to_string)
                })
                .collect();
            (figures.len() == ready.len()).then_some(figures)
        },
    )
    .await;
    let failed = eventually(
        "an HPA event saying chat_requests_in_flight cannot be read (no metrics adapter)",
        Duration::from_secs(180),
        || async {
            let (_, events) = kubectl.try_run(&[
                "get",
                "events",
                "-n",
                ns,
                "--field-selector",
                "involvedObject.kind=HorizontalPodAutoscaler,involvedObject.name=autoscaled",
                "-o",
                "jsonpath={range .items[*]}{.reason}: {.message}{\"\\n\"}{end}",
            ]);
            events
                .lines()
                .find(|l| {
                    l.starts_with("FailedGetPodsMetric") && l.contains("chat_requests_in_flight")
                })
                .map(str::to_string)
        },
    )
    .await;
    assert_eq!(
        hpa("{.spec.minReplicas}/{.spec.maxReplicas}"),
        "2/10",
        "the HPA the example declares"
    );
    figures.push(format!(
        "autoscaling: chat pods' CPU from metrics-server {cpu:?}; HPA current metrics {}; {failed}",
        hpa("{.status.currentMetrics}")
    ));

    // The series an adapter would serve: each pod's gauge counts a streaming turn while it runs.
    let base = service_base(client, ns, "autoscaled").await;
    for pod in &ready {
        assert_eq!(
            scrape(pod, "chat_requests_in_flight", &[]).await,
            0.0,
            "an idle chat pod's requests in flight"
        );
    }
    let stream_url = format!("{base}/v1/chat");
    let streaming = tokio::spawn(async move {
        call(
            reqwest::Method::POST,
            &stream_url,
            None,
            Some(serde_json::json!({
                "message": "Write a long story about a lighthouse keeper and the sea.",
                "stream": true
            })),
        )
        .await
    });
    let mut peak = 0.0_f64;
    while !streaming.is_finished() && peak < 1.0 {
        let mut total = 0.0;
        for pod in &ready {
            total += scrape(pod, "chat_requests_in_flight", &[]).await;
        }
        peak = peak.max(total);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _, body) = streaming.await.unwrap();
    assert_eq!(status, 200, "the streamed turn: {body}");
    assert!(
        body.contains("event: done"),
        "the stream ended with done: {body}"
    );
    assert!(
        peak >= 1.0,
        "no chat pod counted the streaming turn in chat_requests_in_flight"
    );
    eventually(
        "requests in flight back to 0 once the stream ended",
        Duration::from_secs(30),
        || async {
            let mut total = 0.0;
            for pod in &ready {
                total += scrape(pod, "chat_requests_in_flight", &[]).await;
            }
            (total == 0.0).then_some(())
        },
    )
    .await;
    figures.push(format!(
        "chat_requests_in_flight counted the stream ({peak}) and went back to 0"
    ));
}

/// A ChatService with its own Ollama (CPU, one replica, the rig's model): a turn is answered
/// through it, and only the chat pods can open a connection to it.
async fn managed_ollama(
    client: &kube::Client,
    kubectl: &Kubectl,
    ns: &str,
    figures: &mut Vec<String>,
) {
    let chat_service: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "chatoperator.dev/v1alpha1", "kind": "ChatService",
        "metadata": {"name": "own-model", "namespace": ns},
        "spec": {
            "replicas": 1,
            "ollama": {"replicas": 1, "models": [CHAT_MODEL], "modelStorage": "1Gi",
                "resources": {"requests": {"cpu": "100m", "memory": "256Mi"},
                    "limits": {"memory": "1Gi"}}},
            "context": {"maxOutputTokens": 24},
            "history": {"redis": {"managed": {}}, "mongodb": {"managed": {}}},
        },
    }))
    .unwrap();
    apply(kubectl, &[chat_service]);
    let chatservices = chatservice_api(client, ns);
    until_object(
        &chatservices,
        "own-model",
        "to report Ready=True and BackendsReady=True with its managed Ollama",
        Duration::from_secs(360),
        |cs| {
            condition(cs, "Ready").filter(|(s, _, _)| s == "True")?;
            condition(cs, "BackendsReady").filter(|(s, _, _)| s == "True")
        },
    )
    .await;
    let base = service_base(client, ns, "own-model").await;
    let answer = turn(
        &base,
        None,
        serde_json::json!({"message": "Name one colour."}),
    )
    .await;
    assert_eq!(answer["model"], CHAT_MODEL, "{answer}");

    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    let ollama_ip = pods_of(&pods, "ollama")
        .await
        .iter()
        .find(|p| pod_name(p).starts_with("own-model-"))
        .map(pod_ip)
        .expect("the managed Ollama pod, Ready");
    let chat_pod = chat_pods_of(&pods, "own-model")
        .await
        .first()
        .map(pod_name)
        .expect("a Ready chat pod");
    let probe = kubectl.attach_toolbox(ns, &chat_pod, "chat-service");
    if let Err(e) = kubectl.connects(ns, &chat_pod, &probe, &ollama_ip, 11434) {
        panic!("the chat pod must reach its managed Ollama at {ollama_ip}:11434: {e}");
    }
    let outsider = start_intruder(client, kubectl).await;
    let shared = Api::<Pod>::namespaced(client.clone(), "ai-models")
        .list(&ListParams::default().labels("app=ollama"))
        .await
        .unwrap();
    let shared_ip = shared
        .items
        .first()
        .map(pod_ip)
        .expect("the shared Ollama pod");
    if let Err(e) = kubectl.connects(&outsider, "intruder", "intruder", &shared_ip, 11434) {
        panic!(
            "the intruder reaches nothing, not even the unfenced shared Ollama at {shared_ip}: {e}"
        );
    }
    assert!(
        kubectl
            .connects(&outsider, "intruder", "intruder", &ollama_ip, 11434)
            .is_err(),
        "a pod of namespace {outsider} reached the managed Ollama at {ollama_ip}:11434: its NetworkPolicy is not enforced"
    );
    kubectl.run(&["delete", "namespace", &outsider, "--wait=false"]);
    figures.push(format!(
        "managed Ollama answered ({}); reachable from the chat pod, not from namespace {outsider}",
        answer["model"]
    ));
}

async fn scenario(rig: &Rig, kubectl: &Kubectl, figures: &mut Vec<String>) {
    let mut t = Instant::now();
    let client = rig.kube_client().await;
    let ns = unique_name("examples");
    let op_ns = unique_name("chat-operator");
    for name in [&ns, &op_ns] {
        enforce_restricted(&client, name).await;
    }
    let shared_ollama = repo("tests/rig/manifests/shared-ollama.yaml");
    kubectl.run(&["apply", "-f", &shared_ollama.display().to_string()]);
    // The two Ollama servers of the multi-backend example, as two Services of the one pod.
    for name in ["ollama-a", "ollama-b"] {
        let service = serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "ai-models"},
            "spec": {"selector": {"app": "ollama"}, "ports": [{"port": 11434, "targetPort": 11434}]},
        });
        let object: DynamicObject = serde_json::from_value(service).unwrap();
        apply(kubectl, &[object]);
    }
    install_operator(kubectl, &op_ns, &[]);
    kubectl.run(&[
        "-n",
        "ai-models",
        "rollout",
        "status",
        "deployment/ollama",
        "--timeout=180s",
    ]);
    mark(figures, "operator and shared Ollama Ready", &mut t);

    multi_backend(&client, kubectl, &ns, figures).await;
    mark(figures, "multi-backend example checked", &mut t);
    autoscaling(&client, kubectl, &ns, figures).await;
    mark(figures, "autoscaling example checked", &mut t);
    let chatservices = chatservice_api(&client, &ns);
    for name in ["routed", "autoscaled"] {
        chatservices
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    managed_ollama(&client, kubectl, &ns, figures).await;
    mark(figures, "managed Ollama answered and fenced", &mut t);

    for name in ["own-model"] {
        chatservices
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
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
}

#[test]
fn the_multi_backend_and_autoscaling_examples_run_on_the_real_node() {
    run_on_real_node(
        "node-examples",
        "node_examples",
        Box::new(|rig, kubectl, figures| Box::pin(scenario(rig, kubectl, figures))),
    );
}
