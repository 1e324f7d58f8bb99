//! Shared by the tests that run on the rig's real node: the real kubectl client, HTTP calls to
//! the chat service, probes from a toolbox container inside a pod, and the diagnostics a failed
//! test prints (conditions, events, pod statuses, container logs).

#![allow(dead_code)] // each test binary uses a part of it

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use chat_rig::paths;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};

/// The real kubectl client against one API server.
#[derive(Clone)]
pub struct Kubectl {
    pub kubeconfig: PathBuf,
}

impl Kubectl {
    /// Runs kubectl; whether it succeeded, and its stdout and stderr together.
    pub fn try_run(&self, args: &[&str]) -> (bool, String) {
        let out =
            Command::new(paths::cached_bin("kubectl").expect("kubectl (tests/rig/install.sh)"))
                .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
                .args(args)
                .output()
                .expect("running kubectl");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// Runs kubectl and fails the test, with its output, when it fails.
    pub fn run(&self, args: &[&str]) -> String {
        let (ok, out) = self.try_run(args);
        assert!(ok, "kubectl {} failed: {out}", args.join(" "));
        out
    }

    /// What a failed test needs to say why: every ChatService's conditions, the events, each
    /// pod's status, and the logs (current and previous) of every container.
    pub fn dump(&self) {
        eprintln!("===== diagnostics from the real node =====");
        for args in [
            &["get", "nodes", "-o", "wide"][..],
            &["get", "pods", "-A", "-o", "wide"],
            &[
                "get",
                "chatservices",
                "-A",
                "-o",
                "jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name}:{\"\\n\"}{range .status.conditions[*]}  {.type}={.status} ({.reason}): {.message}{\"\\n\"}{end}{end}",
            ],
            &["get", "events", "-A", "--sort-by=.lastTimestamp"],
            &["get", "hpa", "-A", "-o", "wide"],
            &[
                "get",
                "pods",
                "-A",
                "-o",
                "jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name}: {.status}{\"\\n\"}{end}",
            ],
        ] {
            let (_, out) = self.try_run(args);
            eprintln!("--- kubectl {}\n{out}", args.join(" "));
        }
        let (_, pods) = self.try_run(&[
            "get",
            "pods",
            "-A",
            "-o",
            "jsonpath={range .items[*]}{.metadata.namespace} {.metadata.name}{\"\\n\"}{end}",
        ]);
        for line in pods.lines() {
            let Some((ns, pod)) = line.split_once(' ') else {
                continue;
            };
            for previous in [false, true] {
                let mut args = vec![
                    "logs",
                    "-n",
                    ns,
                    pod,
                    "--all-containers",
                    "--prefix",
                    "--tail=40",
                ];
                if previous {
                    args.push("--previous");
                }
                let (ok, out) = self.try_run(&args);
                if ok || !previous {
                    eprintln!(
                        "--- kubectl logs {ns}/{pod}{}\n{out}",
                        if previous { " --previous" } else { "" }
                    );
                }
            }
        }
        eprintln!("===== end of diagnostics =====");
    }

    /// Adds an ephemeral container of the node's toolbox image (busybox, user 65532, the
    /// `restricted` profile) to `pod`, sharing the process namespace of its container `target`,
    /// and waits until it runs; returns its name, for [`Kubectl::exec_in`].
    pub fn attach_toolbox(&self, ns: &str, pod: &str, target: &str) -> String {
        let name = format!("probe-{}", chat_rig::unique_name("t").replace('-', ""));
        let name = name[..name.len().min(40)].to_string();
        self.run(&[
            "debug",
            "-n",
            ns,
            pod,
            "--image",
            chat_rig::kubelet_node::images::TOOLBOX_IMAGE,
            "--image-pull-policy=Never",
            "--profile=restricted",
            "--target",
            target,
            "--container",
            &name,
            "--",
            "sleep",
            "3600",
        ]);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (ok, state) = self.try_run(&[
                "get",
                "pod",
                "-n",
                ns,
                pod,
                "-o",
                &format!(
                    "jsonpath={{.status.ephemeralContainerStatuses[?(@.name==\"{name}\")].state}}"
                ),
            ]);
            if ok && state.contains("running") {
                return name;
            }
            assert!(
                Instant::now() < deadline,
                "the toolbox container {name} in {ns}/{pod} did not start within 60 s: {state}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// `kubectl exec` of `argv` in container `container` of `pod`.
    pub fn exec_in(&self, ns: &str, pod: &str, container: &str, argv: &[&str]) -> (bool, String) {
        let mut args = vec!["exec", "-n", ns, pod, "-c", container, "--"];
        args.extend_from_slice(argv);
        self.try_run(&args)
    }

    /// Whether a TCP connection from `container` of `pod` to `ip:port` opens within 3 s (busybox
    /// nc, which runs `echo` on the connection and exits once it is open): `Ok`, or nc's output.
    pub fn connects(
        &self,
        ns: &str,
        pod: &str,
        container: &str,
        ip: &str,
        port: u16,
    ) -> Result<(), String> {
        let port = port.to_string();
        let argv = [
            "timeout",
            "5",
            "nc",
            "-w",
            "3",
            ip,
            &port,
            "-e",
            "/bin/echo",
        ];
        match self.exec_in(ns, pod, container, &argv) {
            (true, _) => Ok(()),
            (false, out) => Err(out),
        }
    }
}

/// The repository's own file `path`.
pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
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
pub async fn http(
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

/// One chat turn at `base`; retries while the service answers 503 (its health checks have not
/// yet seen a back end) or the connection fails (a pod going away right after a rollout).
pub async fn chat(base: &str, session: Option<&str>, message: &str) -> serde_json::Value {
    let mut body = serde_json::json!({"message": message});
    if let Some(s) = session {
        body["session_id"] = s.into();
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    let (status, text) = loop {
        let (status, text) = http(
            reqwest::Method::POST,
            &format!("{base}/v1/chat"),
            Some(body.clone()),
        )
        .await;
        if !matches!(status, 0 | 503) || Instant::now() > deadline {
            break (status, text);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    assert_eq!(status, 200, "POST {base}/v1/chat answered {status}: {text}");
    serde_json::from_str(&text).unwrap()
}

pub fn chatservice_api(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("chatoperator.dev", "v1alpha1", "ChatService");
    Api::namespaced_with(client.clone(), ns, &ApiResource::from_gvk(&gvk))
}

pub fn check_prerequisites() {
    let mut missing = Vec::new();
    for name in ["helm", "kubectl", "kubelet", "containerd"] {
        if let Err(e) = paths::cached_bin(name) {
            missing.push(format!("{e:#}"));
        }
    }
    if !is_root() {
        missing.push("root (the node creates bridges, mounts and cgroups)".into());
    }
    assert!(
        missing.is_empty(),
        "the end-to-end test needs: {}",
        missing.join("; ")
    );
}

/// Creates or labels namespace `name` with `pod-security.kubernetes.io/enforce: restricted`.
pub async fn enforce_restricted(client: &kube::Client, name: &str) {
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

/// Status and message of a condition; for `BackendsReady` the reason instead of the message.
pub fn condition(cs: &DynamicObject, type_: &str) -> Option<(String, String)> {
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

pub async fn pods_of(pods: &Api<Pod>, component: &str) -> Vec<Pod> {
    pods.list(&ListParams::default().labels(&format!("app.kubernetes.io/component={component}")))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(is_ready)
        .collect()
}

/// Whether `pod` is Ready and not being deleted.
pub fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

pub async fn ready_chat_pods(pods: &Api<Pod>) -> Vec<Pod> {
    pods_of(pods, "chat-service").await
}

pub fn mark(figures: &mut Vec<String>, what: &str, since: &mut Instant) {
    let line = format!("{what}: {:.1} s", since.elapsed().as_secs_f64());
    eprintln!("[real node] {line}");
    figures.push(line);
    *since = Instant::now();
}

pub fn pod_name(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

pub fn pod_ip(pod: &Pod) -> String {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .unwrap_or_default()
}

/// Starts pod `intruder` (the toolbox image, container `intruder`) in a new namespace of
/// Pod Security `restricted`, for probes from outside a ChatService's namespace; returns the
/// namespace once the pod is Ready.
pub async fn start_intruder(client: &kube::Client, kubectl: &Kubectl) -> String {
    let outsider = chat_rig::unique_name("outsider");
    enforce_restricted(client, &outsider).await;
    let image = chat_rig::kubelet_node::images::TOOLBOX_IMAGE;
    let overrides = serde_json::json!({"spec": {
        "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{"name": "intruder", "image": image, "imagePullPolicy": "Never",
            "command": ["sleep", "3600"],
            "securityContext": {"allowPrivilegeEscalation": false,
                "capabilities": {"drop": ["ALL"]}}}],
    }})
    .to_string();
    kubectl.run(&[
        "run",
        "-n",
        &outsider,
        "intruder",
        "--image",
        image,
        "--image-pull-policy=Never",
        "--restart=Never",
        "--overrides",
        &overrides,
    ]);
    kubectl.run(&[
        "wait",
        "-n",
        &outsider,
        "--for=condition=Ready",
        "pod/intruder",
        "--timeout=90s",
    ]);
    outsider
}

/// Installs the operator's Helm chart into `op_ns` with `--set` values `sets`, and waits until
/// its pod is Ready.
pub fn install_operator(kubectl: &Kubectl, op_ns: &str, sets: &[String]) {
    let helm = paths::cached_bin("helm").expect("helm (tests/rig/install.sh)");
    let kubeconfig = kubectl.kubeconfig.display().to_string();
    let chart = repo("charts/chat-operator").display().to_string();
    let mut cmd = Command::new(&helm);
    cmd.args(["install", "chat-operator", &chart, "--namespace", op_ns])
        .args(["--kubeconfig", &kubeconfig]);
    for set in sets {
        cmd.args(["--set", set]);
    }
    let out = cmd
        .args(["--wait", "--timeout", "180s"])
        .output()
        .expect("running helm");
    assert!(
        out.status.success(),
        "helm install: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `helm uninstall` of the chart [`install_operator`] installed.
pub fn uninstall_operator(kubectl: &Kubectl, op_ns: &str) {
    let helm = paths::cached_bin("helm").expect("helm (tests/rig/install.sh)");
    let kubeconfig = kubectl.kubeconfig.display().to_string();
    let out = Command::new(&helm)
        .args(["uninstall", "chat-operator", "--namespace", op_ns])
        .args(["--kubeconfig", &kubeconfig, "--wait", "--timeout", "60s"])
        .output()
        .expect("running helm");
    assert!(
        out.status.success(),
        "helm uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The scenario a real-node test runs: it gets the rig (control plane), the kubectl client and
/// the list of timings it reports.
pub type Scenario = Box<
    dyn for<'a> FnOnce(
        &'a chat_rig::Rig,
        &'a Kubectl,
        &'a mut Vec<String>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'a>>,
>;

/// Runs `scenario` on a private control plane with the real node and the workspace's images
/// imported (run folder `<run dir>/<name>`); on failure prints the diagnostics; then stops the
/// node and checks that it left nothing behind on the host. `label` prefixes its timings.
pub fn run_on_real_node(name: &str, label: &str, scenario: Scenario) {
    use chat_rig::kubelet_node::{KubeletNode, KubeletNodeOptions, leftovers};
    let started = Instant::now();
    check_prerequisites();
    let mut figures: Vec<String> = Vec::new();
    let mut t = Instant::now();
    let profile = chat_rig::images::cargo_profile_dir().unwrap();
    let archives = chat_rig::images::workspace_images(&profile).unwrap_or_else(|e| panic!("{e:#}"));
    mark(&mut figures, "images built or found cached", &mut t);
    let dir = chat_rig::run_dir().unwrap().join(name);
    let parts = chat_rig::Parts {
        kubernetes: true,
        redis: false,
        mongodb: false,
        ollama: false,
        tls_stores: false,
    };
    let rig = chat_rig::Rig::start(&dir, parts).unwrap_or_else(|e| panic!("{e:#}"));
    let node =
        KubeletNode::start(&rig, KubeletNodeOptions::default()).unwrap_or_else(|e| panic!("{e:#}"));
    let node_dir = node.info().dir.clone();
    node.import_images(&archives)
        .unwrap_or_else(|e| panic!("{e:#}"));
    mark(
        &mut figures,
        "control plane and node up, images imported",
        &mut t,
    );
    let kubectl = Kubectl {
        kubeconfig: rig.kubeconfig_path().to_path_buf(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(scenario(&rig, &kubectl, &mut figures))
    }));
    t = Instant::now();
    if outcome.is_err() {
        kubectl.dump();
        eprintln!("kubelet log: {}", node.info().kubelet_log.display());
    }
    let stopped = node.stop();
    drop(rig);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    stopped.unwrap_or_else(|e| panic!("{e:#}"));
    let left = leftovers(&node_dir);
    assert!(left.is_empty(), "the node left behind: {}", left.join("\n"));
    mark(&mut figures, "node stopped and clean", &mut t);
    figures.push(format!("total: {:.1} s", started.elapsed().as_secs_f64()));
    eprintln!("[{label}] {}", figures.join("; "));
}

/// Every document of example `file`, in namespace `ns`.
pub fn example_documents(file: &str, ns: &str) -> Vec<DynamicObject> {
    let text = std::fs::read_to_string(repo(file)).unwrap();
    let mut objects = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value: serde_json::Value = serde::Deserialize::deserialize(document).unwrap();
        if value.is_null() {
            continue;
        }
        let mut object: DynamicObject = serde_json::from_value(value).unwrap();
        object.metadata.namespace = Some(ns.to_string());
        objects.push(object);
    }
    objects
}

pub fn kind_and_name(object: &DynamicObject) -> (String, String) {
    let kind = object.types.as_ref().map(|t| t.kind.clone()).unwrap();
    (kind, object.metadata.name.clone().unwrap())
}

/// `kubectl apply` of `objects`, each from a file, as a user would.
pub fn apply(kubectl: &Kubectl, objects: &[DynamicObject]) {
    let file = chat_rig::scratch_dir("real-node-apply")
        .unwrap()
        .join(format!("{}.json", chat_rig::unique_name("doc")));
    for object in objects {
        std::fs::write(&file, serde_json::to_vec(object).unwrap()).unwrap();
        kubectl.run(&["apply", "-f", &file.display().to_string()]);
    }
}

/// A request on a fresh connection (so the Service proxy spreads them over the pods), with the
/// API key `key` when given: status, `Retry-After`, body.
pub async fn call(
    method: reqwest::Method,
    url: &str,
    key: Option<&str>,
    body: Option<serde_json::Value>,
) -> (u16, Option<String>, String) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap();
    let mut request = client.request(method, url);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    match request.send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            (
                status,
                retry_after,
                response.text().await.unwrap_or_default(),
            )
        }
        Err(e) => (0, None, format!("{e}")),
    }
}

/// The ClusterIP base URL of Service `name`.
pub async fn service_base(client: &kube::Client, ns: &str, name: &str) -> String {
    let spec = Api::<Service>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .unwrap()
        .spec
        .unwrap();
    format!(
        "http://{}:{}",
        spec.cluster_ip.unwrap(),
        spec.ports.unwrap()[0].port
    )
}

/// The Ready chat pods of ChatService `name`.
pub async fn chat_pods_of(pods: &Api<Pod>, name: &str) -> Vec<Pod> {
    ready_chat_pods(pods)
        .await
        .into_iter()
        .filter(|p| pod_name(p).starts_with(&format!("{name}-")))
        .collect()
}

/// The sum of the samples of metric `metric` (with every label pair of `labels`) on a chat
/// pod's `/metrics`, read at the port and path of the pod's Prometheus annotations.
pub async fn scrape(pod: &Pod, metric: &str, labels: &[&str]) -> f64 {
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let port = annotations
        .get("prometheus.io/port")
        .map_or("8080", String::as_str);
    let path = annotations
        .get("prometheus.io/path")
        .map_or("/metrics", String::as_str);
    let url = format!("http://{}:{port}{path}", pod_ip(pod));
    let (status, _, text) = call(reqwest::Method::GET, &url, None, None).await;
    assert_eq!(status, 200, "GET {url}: {text}");
    text.lines()
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
                && labels.iter().all(|pair| l.contains(pair))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |sum, value| sum + value)
}
