//! The Helm chart (charts/chat-operator): `helm lint` and `helm template` with the rig's helm, the
//! values schema, the monitoring extras against the metric names the code registers, the Argo CD
//! health check run by a real Lua interpreter, and the rendered chart applied to the rig's real API
//! server twice with server-side apply, the second time changing nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use chat_operator::crd::ChatService;
use chat_rig::{Rig, paths, unique_name};
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use serde::Deserialize;
use serde_json::{Value, json};

const FIELD_MANAGER: &str = "chart-test";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart_dir() -> PathBuf {
    repo().join("charts/chat-operator")
}

fn tool(name: &str) -> PathBuf {
    paths::cached_bin(name).unwrap_or_else(|e| panic!("{e:#}"))
}

fn run(program: &Path, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", program.display()))
}

fn describe(what: &str, out: &Output) -> String {
    format!(
        "{what}: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `helm template` of the chart with extra arguments (e.g. `--set`); the raw output.
fn helm_template(release: &str, namespace: &str, extra: &[&str]) -> Output {
    let chart = chart_dir();
    let mut args = vec![
        "template",
        release,
        chart.to_str().unwrap(),
        "--namespace",
        namespace,
    ];
    args.extend_from_slice(extra);
    run(&tool("helm"), &args)
}

fn render(release: &str, namespace: &str, extra: &[&str]) -> String {
    let out = helm_template(release, namespace, extra);
    assert!(out.status.success(), "{}", describe("helm template", &out));
    String::from_utf8(out.stdout).unwrap()
}

/// The non-empty YAML documents of a multi-document stream.
fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found = find(docs, kind);
    assert_eq!(found.len(), 1, "expected one {kind}, found {}", found.len());
    found[0]
}

fn env_of(container: &Value) -> BTreeMap<String, Value> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e.clone()))
        .collect()
}

#[test]
fn helm_lint_passes_with_defaults_and_with_every_extra() {
    let helm = tool("helm");
    let chart = chart_dir();
    let chart = chart.to_str().unwrap();
    let out = run(&helm, &["lint", "--strict", chart]);
    assert!(out.status.success(), "{}", describe("helm lint", &out));
    let out = run(
        &helm,
        &[
            "lint",
            "--strict",
            chart,
            "--set",
            "replicas=3,watchNamespace=team-a,serviceMonitor.enabled=true,\
             prometheusRule.enabled=true,grafanaDashboard.enabled=true",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        describe("helm lint (extras)", &out)
    );
}

#[test]
fn deployment_runs_restricted_with_probes_and_single_replica_settings() {
    let docs = documents(&render("ops", "operators", &["--include-crds"]));
    let crd = one(&docs, "CustomResourceDefinition");
    assert_eq!(crd["metadata"]["name"], "chatservices.chatoperator.dev");
    assert_eq!(
        one(&docs, "ClusterRole")["metadata"]["name"],
        "chat-operator"
    );
    let binding = one(&docs, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], "chat-operator");
    assert_eq!(binding["subjects"][0]["name"], "ops-chat-operator");
    assert_eq!(binding["subjects"][0]["namespace"], "operators");
    assert_eq!(
        one(&docs, "ServiceAccount")["metadata"]["name"],
        "ops-chat-operator"
    );

    let deployment = one(&docs, "Deployment");
    assert_eq!(deployment["metadata"]["namespace"], "operators");
    assert_eq!(deployment["spec"]["replicas"], 1);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "ops-chat-operator");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let container = &pod["containers"][0];
    assert_eq!(
        container["image"],
        "ghcr.io/chatoperator/chat-operator:0.1.0"
    );
    let security = &container["securityContext"];
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(container[probe]["httpGet"]["path"], "/healthz", "{probe}");
        assert_eq!(container[probe]["httpGet"]["port"], "metrics", "{probe}");
    }
    assert_eq!(container["ports"][0]["containerPort"], 8080);
    assert!(container["resources"]["requests"]["memory"].is_string());
    assert!(container["resources"]["limits"]["memory"].is_string());

    let env = env_of(container);
    assert_eq!(
        env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    assert_eq!(
        env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    assert_eq!(env["METRICS_ADDRESS"]["value"], "0.0.0.0:8080");
    assert_eq!(env["RESYNC_SECONDS"]["value"], "300");
    assert!(!env.contains_key("WATCH_NAMESPACE"), "all namespaces");
    assert!(
        !env.contains_key("DISABLE_LEADER_ELECTION"),
        "on by default"
    );

    // The Lease the binary uses (src/main.rs) is what the Role grants.
    let role = one(&docs, "Role");
    assert_eq!(role["metadata"]["namespace"], "operators");
    assert!(
        role["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["resourceNames"] == json!(["chat-operator-leader"])
                && r["verbs"] == json!(["get", "update"])),
        "{role}"
    );
    // No monitoring extras by default.
    for kind in ["ServiceMonitor", "PrometheusRule", "ConfigMap"] {
        assert!(find(&docs, kind).is_empty(), "{kind} rendered by default");
    }
}

#[test]
fn leader_election_follows_replicas_and_namespace_scope() {
    // Several replicas: leader election stays on, rolling updates.
    let docs = documents(&render("ops", "operators", &["--set", "replicas=3"]));
    let deployment = one(&docs, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 3);
    assert_eq!(deployment["spec"]["strategy"]["type"], "RollingUpdate");
    let env = env_of(&deployment["spec"]["template"]["spec"]["containers"][0]);
    assert!(!env.contains_key("DISABLE_LEADER_ELECTION"));
    assert_eq!(find(&docs, "Role").len(), 1);

    // One replica without leader election: no Lease, and never two operators at once.
    let docs = documents(&render(
        "ops",
        "operators",
        &["--set", "leaderElection.enabled=false"],
    ));
    let deployment = one(&docs, "Deployment");
    assert_eq!(deployment["spec"]["strategy"]["type"], "Recreate");
    let env = env_of(&deployment["spec"]["template"]["spec"]["containers"][0]);
    assert_eq!(env["DISABLE_LEADER_ELECTION"]["value"], "true");
    assert!(find(&docs, "Role").is_empty());

    // Several replicas without leader election are refused.
    let out = helm_template(
        "ops",
        "operators",
        &["--set", "replicas=2,leaderElection.enabled=false"],
    );
    assert!(!out.status.success(), "rendered replicas=2 without a Lease");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("leaderElection.enabled"),
        "{}",
        describe("helm template", &out)
    );

    // One watched namespace: the ClusterRole is bound there only.
    let docs = documents(&render(
        "ops",
        "operators",
        &["--set", "watchNamespace=team-a"],
    ));
    assert!(find(&docs, "ClusterRoleBinding").is_empty());
    let bindings = find(&docs, "RoleBinding");
    let watched = bindings
        .iter()
        .find(|b| b["metadata"]["namespace"] == "team-a")
        .expect("a RoleBinding in the watched namespace");
    assert_eq!(watched["roleRef"]["kind"], "ClusterRole");
    assert_eq!(watched["roleRef"]["name"], "chat-operator");
    let env = env_of(&one(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]);
    assert_eq!(env["WATCH_NAMESPACE"]["value"], "team-a");
}

#[test]
fn values_schema_rejects_bad_values() {
    for (set, field) in [
        ("replicas=two", "replicas"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("metrics.port=70000", "port"),
        ("watchNamespace=Not_A_Namespace", "watchNamespace"),
        ("replica=2", "replica"),
    ] {
        let out = helm_template("ops", "operators", &["--set", set]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted --set {set}");
        assert!(
            stderr.contains("values don't meet the specifications of the schema"),
            "--set {set}: not a schema error: {}",
            describe("helm template", &out)
        );
        assert!(
            stderr.contains(field),
            "--set {set}: error does not name {field}: {stderr}"
        );
    }
    // A string is not a number even when it looks like one in a values file.
    let dir = chat_rig::scratch_dir("chart-values").unwrap();
    let file = dir.join("values.yaml");
    std::fs::write(&file, "replicas: \"2\"\n").unwrap();
    let out = helm_template("ops", "operators", &["-f", file.to_str().unwrap()]);
    assert!(!out.status.success(), "accepted replicas: \"2\"");
}

/// Metric names (`chat_*`, `chatoperator_*`) in a PromQL expression.
fn metric_names(expr: &str, into: &mut BTreeSet<String>) {
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if starts_word && expr[i..].starts_with("chat") {
            let end = expr[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(expr.len(), |n| i + n);
            let name = &expr[i..end];
            // Label values and names such as `chat-service` or `chatoperator.dev/...` are not
            // metric names; a metric name is followed by `{`, `[`, `)` or a space.
            let next = bytes.get(end).copied();
            if name.contains('_') && matches!(next, None | Some(b'{' | b'[' | b')' | b' ' | b'\n'))
            {
                into.insert(name.to_string());
            }
            i = end;
        } else {
            i += 1;
        }
    }
}

/// The sample names a family registered under `base` exposes (counters add `_total`,
/// histograms `_bucket`, `_sum` and `_count`).
fn exposed(base: &str, kind: &str) -> Vec<String> {
    match kind {
        "counter" => vec![format!("{base}_total")],
        "histogram" => ["_bucket", "_sum", "_count"]
            .iter()
            .map(|s| format!("{base}{s}"))
            .collect(),
        _ => vec![base.to_string()],
    }
}

/// Names the chat service exposes, read from its registrations in chat-service/src/metrics.rs
/// (the operator does not link the service's server code): `registry.register("name", ...)` under
/// the `chat` prefix, with the type taken from the metric's field declaration.
fn chat_service_metric_names() -> BTreeSet<String> {
    let source = std::fs::read_to_string(repo().join("chat-service/src/metrics.rs")).unwrap();
    assert!(
        source.contains("Registry::with_prefix(\"chat\")"),
        "chat-service/src/metrics.rs no longer uses the `chat` prefix"
    );
    let mut names = BTreeSet::new();
    let mut rest = source.as_str();
    while let Some(at) = rest.find("registry.register(") {
        rest = &rest[at + "registry.register(".len()..];
        let open = rest.find('"').unwrap();
        let close = open + 1 + rest[open + 1..].find('"').unwrap();
        let base = &rest[open + 1..close];
        // The third argument is `<field>.clone()`; the field's declared type says the kind.
        let call_end = rest.find(");").unwrap();
        let field = rest[..call_end]
            .trim_end()
            .trim_end_matches(',')
            .rsplit(',')
            .next()
            .unwrap()
            .trim()
            .trim_end_matches(".clone()")
            .trim();
        let declaration = source
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("pub {field}:")))
            .unwrap_or_else(|| panic!("no field declaration for {field}"));
        let kind = if declaration.contains("Histogram") {
            "histogram"
        } else if declaration.contains("Counter") {
            "counter"
        } else {
            "gauge"
        };
        names.extend(exposed(&format!("chat_{base}"), kind));
    }
    assert!(names.len() > 5, "found too few metrics: {names:?}");
    names
}

/// Names the operator exposes, from its real registry (with one failure recorded: a labelled
/// family shows up only once it has a sample).
fn operator_metric_names() -> BTreeSet<String> {
    let metrics = chat_operator::metrics::Metrics::default();
    metrics.observe(Duration::from_millis(1), Some("probe"));
    let text = metrics.encode();
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (base, kind) = (parts.next().unwrap(), parts.next().unwrap());
            names.extend(exposed(base, kind));
        }
    }
    names
}

#[test]
fn monitoring_extras_use_the_metric_names_the_code_registers() {
    let docs = documents(&render(
        "ops",
        "operators",
        &[
            "--set",
            "serviceMonitor.enabled=true,prometheusRule.enabled=true,grafanaDashboard.enabled=true",
        ],
    ));
    let monitors = find(&docs, "ServiceMonitor");
    assert_eq!(
        monitors.len(),
        2,
        "operator and chat-service ServiceMonitors"
    );
    let chat_monitor = monitors
        .iter()
        .find(|m| {
            m["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "chat-service"
        })
        .expect("a ServiceMonitor for the chat-service Services");
    assert_eq!(
        chat_monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/managed-by"],
        "chat-operator"
    );
    assert_eq!(chat_monitor["spec"]["endpoints"][0]["port"], "http");

    let mut used = BTreeSet::new();
    let rule = one(&docs, "PrometheusRule");
    let mut alerts = BTreeSet::new();
    for group in rule["spec"]["groups"].as_array().unwrap() {
        for r in group["rules"].as_array().unwrap() {
            alerts.insert(r["alert"].as_str().unwrap().to_string());
            metric_names(r["expr"].as_str().unwrap(), &mut used);
        }
    }
    for wanted in [
        "ChatServiceErrorRateHigh",
        "ChatServiceLatencyHigh",
        "ChatBackendUnavailable",
        "ChatRateLimitSaturated",
        "ChatOperatorReconcileFailures",
    ] {
        assert!(
            alerts.contains(wanted),
            "missing alert {wanted}: {alerts:?}"
        );
    }

    let dashboard_map = one(&docs, "ConfigMap");
    assert_eq!(
        dashboard_map["metadata"]["labels"]["grafana_dashboard"],
        "1"
    );
    let dashboard: Value = serde_json::from_str(
        dashboard_map["data"]["chat-operator.json"]
            .as_str()
            .unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut panels = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            panels += 1;
            metric_names(target["expr"].as_str().unwrap(), &mut used);
        }
    }
    assert!(panels > 5, "dashboard has {panels} queries");

    let mut known = chat_service_metric_names();
    known.extend(operator_metric_names());
    let unknown: Vec<_> = used.difference(&known).collect();
    assert!(
        unknown.is_empty(),
        "rules or dashboard use metrics nobody registers: {unknown:?}\nregistered: {known:?}"
    );
    for wanted in [
        "chat_http_requests_total",
        "chat_http_request_duration_seconds_bucket",
        "chatoperator_reconcile_failures_total",
        "chatoperator_reconciles_total",
    ] {
        assert!(used.contains(wanted), "{wanted} is not used: {used:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Argo CD health check

fn lua_interpreter() -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin"] {
        let path = Path::new(dir).join("lua5.4");
        if path.is_file() {
            return path;
        }
    }
    panic!(
        "the Argo CD health check test needs a Lua interpreter at /usr/bin/lua5.4: \
         install the Debian package lua5.4 (apt-get install lua5.4; tests/rig/install.sh's apt step)"
    );
}

/// A JSON value as a Lua table constructor (what Argo CD hands the script as `obj`).
fn lua_literal(value: &Value) -> String {
    match value {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            let mut out = String::from("\"");
            for b in s.bytes() {
                match b {
                    b'"' => out.push_str("\\\""),
                    b'\\' => out.push_str("\\\\"),
                    0x20..=0x7e => out.push(b as char),
                    other => out.push_str(&format!("\\{other:03}")),
                }
            }
            out.push('"');
            out
        }
        Value::Array(items) => format!(
            "{{{}}}",
            items.iter().map(lua_literal).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(fields) => format!(
            "{{{}}}",
            fields
                .iter()
                .map(|(k, v)| format!(
                    "[{}] = {}",
                    lua_literal(&Value::String(k.clone())),
                    lua_literal(v)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Runs charts/chat-operator/argocd/health.lua on `obj`; returns (status, message).
fn argocd_health(obj: &Value) -> (String, String) {
    let script = chart_dir().join("argocd/health.lua");
    let driver = format!(
        "obj = {}\nlocal hs = dofile({})\nio.write(hs.status, \"\\n\", hs.message or \"\", \"\\n\")\n",
        lua_literal(obj),
        lua_literal(&Value::String(script.to_str().unwrap().into()))
    );
    let mut child = Command::new(lua_interpreter())
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting lua5.4");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(driver.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        describe("lua5.4 health.lua", &out)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    (
        lines.next().unwrap_or_default().to_string(),
        lines.next().unwrap_or_default().to_string(),
    )
}

fn condition(type_: &str, status: bool, reason: &str, message: &str) -> Value {
    json!({
        "type": type_,
        "status": if status { "True" } else { "False" },
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2025-01-01T00:00:00Z",
    })
}

/// A ChatService at `generation` with the given status; checked to be a valid ChatService.
fn chat_service(generation: i64, status: Option<Value>) -> Value {
    let mut obj = json!({
        "apiVersion": "chatoperator.dev/v1alpha1",
        "kind": "ChatService",
        "metadata": {"name": "support", "namespace": "team-a", "generation": generation},
        "spec": {
            "models": {"default": "gemma3-270m"},
            "backends": [{"name": "ollama", "url": "http://ollama:11434", "protocol": "ollama"}],
            "history": {"redis": {"managed": {}}, "mongodb": {"managed": {}}},
        },
    });
    if let Some(status) = status {
        obj["status"] = status;
    }
    serde_json::from_value::<ChatService>(obj.clone())
        .unwrap_or_else(|e| panic!("fixture is not a ChatService: {e}\n{obj:#}"));
    obj
}

fn settled(ready: bool, progressing: bool, degraded: bool, config_valid: bool) -> Vec<Value> {
    vec![
        condition(
            "Ready",
            ready,
            if ready { "Ready" } else { "StorageNotReady" },
            if ready {
                "2 of 2 chat-service pods are ready."
            } else {
                "Storage is not ready; see StorageReady."
            },
        ),
        condition(
            "ConfigValid",
            config_valid,
            if config_valid {
                "Valid"
            } else {
                "MissingSecretKey"
            },
            if config_valid {
                "The spec is valid."
            } else {
                "Secret team-a/llm-key has no key \"api-key\"."
            },
        ),
        condition(
            "Progressing",
            progressing,
            if progressing { "RollingOut" } else { "Settled" },
            if progressing {
                "1 of 2 chat-service pods run the latest spec."
            } else {
                "No rollout in progress."
            },
        ),
        condition(
            "Degraded",
            degraded,
            if degraded {
                "NoAvailablePods"
            } else {
                "AsExpected"
            },
            if degraded {
                "No chat-service pod is available."
            } else {
                "No fault detected."
            },
        ),
    ]
}

#[test]
fn argocd_health_check_reads_chat_service_status() {
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "no status yet",
            chat_service(1, None),
            "Progressing",
            "Waiting for the operator",
        ),
        (
            "ready and current",
            chat_service(
                3,
                Some(
                    json!({"observedGeneration": 3, "conditions": settled(true, false, false, true)}),
                ),
            ),
            "Healthy",
            "2 of 2 chat-service pods are ready.",
        ),
        (
            "ready, but for an older generation",
            chat_service(
                4,
                Some(
                    json!({"observedGeneration": 3, "conditions": settled(true, false, false, true)}),
                ),
            ),
            "Progressing",
            "generation 4",
        ),
        (
            "degraded, but for an older generation",
            chat_service(
                5,
                Some(
                    json!({"observedGeneration": 4, "conditions": settled(false, false, true, false)}),
                ),
            ),
            "Progressing",
            "generation 5",
        ),
        (
            "rolling out",
            chat_service(
                2,
                Some(
                    json!({"observedGeneration": 2, "conditions": settled(false, true, false, true)}),
                ),
            ),
            "Progressing",
            "1 of 2 chat-service pods run the latest spec.",
        ),
        (
            "invalid config",
            chat_service(
                2,
                Some(
                    json!({"observedGeneration": 2, "conditions": settled(false, false, true, false)}),
                ),
            ),
            "Degraded",
            "Secret team-a/llm-key has no key \"api-key\".",
        ),
        (
            "no available pods",
            chat_service(
                2,
                Some(
                    json!({"observedGeneration": 2, "conditions": settled(false, false, true, true)}),
                ),
            ),
            "Degraded",
            "No chat-service pod is available.",
        ),
        (
            "storage still starting",
            chat_service(
                1,
                Some(
                    json!({"observedGeneration": 1, "conditions": settled(false, false, false, true)}),
                ),
            ),
            "Progressing",
            "Storage is not ready",
        ),
        (
            "status without conditions",
            chat_service(1, Some(json!({"observedGeneration": 1}))),
            "Progressing",
            "Waiting for the Ready condition",
        ),
    ];
    for (name, obj, status, message) in cases {
        let (got_status, got_message) = argocd_health(&obj);
        assert_eq!(got_status, status, "{name}: message {got_message:?}");
        assert!(
            got_message.contains(message),
            "{name}: message {got_message:?} lacks {message:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The rendered chart on the real API server

struct Kubectl {
    bin: PathBuf,
    kubeconfig: PathBuf,
}

impl Kubectl {
    fn run(&self, args: &[&str]) -> Output {
        let mut all = vec!["--kubeconfig", self.kubeconfig.to_str().unwrap()];
        all.extend_from_slice(args);
        run(&self.bin, &all)
    }

    /// (kind/namespace/name -> resourceVersion) of every object in `file`.
    fn resource_versions(&self, file: &Path) -> BTreeMap<String, String> {
        let out = self.run(&["get", "-f", file.to_str().unwrap(), "-o", "json"]);
        assert!(out.status.success(), "{}", describe("kubectl get -f", &out));
        let list: Value = serde_json::from_slice(&out.stdout).unwrap();
        let items = match list["items"].as_array() {
            Some(items) => items.clone(),
            None => vec![list],
        };
        items
            .iter()
            .map(|o| {
                let m = &o["metadata"];
                (
                    format!(
                        "{}/{}/{}",
                        o["kind"].as_str().unwrap_or_default(),
                        m["namespace"].as_str().unwrap_or_default(),
                        m["name"].as_str().unwrap_or_default()
                    ),
                    m["resourceVersion"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect()
    }

    /// Resource versions once nothing (controllers updating status) writes for a moment.
    async fn settled_versions(&self, file: &Path) -> BTreeMap<String, String> {
        let mut last = self.resource_versions(file);
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = self.resource_versions(file);
            if now == last {
                return now;
            }
            last = now;
        }
        panic!("objects kept changing for 30 s: {last:?}");
    }
}

/// Removes what a test created: its namespace and its cluster-wide binding. The CRD and the
/// ClusterRole stay: other tests share them.
struct Cleanup<'a> {
    kubectl: &'a Kubectl,
    namespace: String,
    cluster_role_binding: String,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let _ = self.kubectl.run(&[
            "delete",
            "clusterrolebinding",
            &self.cluster_role_binding,
            "--ignore-not-found",
            "--wait=false",
        ]);
        let _ = self.kubectl.run(&[
            "delete",
            "namespace",
            &self.namespace,
            "--ignore-not-found",
            "--wait=false",
        ]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rendered_chart_applies_and_reapplying_changes_nothing() {
    let rig = Rig::shared();
    let kubectl = Kubectl {
        bin: tool("kubectl"),
        kubeconfig: rig.kubeconfig_path().to_path_buf(),
    };
    let (admin, ns) = rig.test_namespace("chart").await;
    let release = unique_name("rel");
    let _cleanup = Cleanup {
        kubectl: &kubectl,
        namespace: ns.clone(),
        cluster_role_binding: format!("{release}-chat-operator-{ns}"),
    };
    // The operator's pods must pass the "restricted" Pod Security Standard.
    Api::<Namespace>::all(admin.clone())
        .patch(
            &ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/warn": "restricted",
            }}})),
        )
        .await
        .expect("labelling the namespace");

    // Two replicas: the Lease Role and leader-election settings are part of what is applied.
    let manifests = render(&release, &ns, &["--include-crds", "--set", "replicas=2"]);
    let dir = chat_rig::scratch_dir("chart").unwrap();
    let file = dir.join("rendered.yaml");
    std::fs::write(&file, &manifests).unwrap();
    let file_arg = file.to_str().unwrap();
    let expected: BTreeSet<String> = documents(&manifests)
        .iter()
        .map(|d| d["kind"].as_str().unwrap().to_string())
        .collect();

    // First apply. --force-conflicts: the CRD and ClusterRole are shared with other tests, which
    // apply the same content under their own field manager.
    let out = kubectl.run(&[
        "apply",
        "--server-side",
        "--field-manager",
        FIELD_MANAGER,
        "--force-conflicts",
        "-f",
        file_arg,
    ]);
    assert!(out.status.success(), "{}", describe("kubectl apply", &out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("PodSecurity"),
        "the operator's pod template violates Pod Security restricted: {stderr}"
    );
    let applied = kubectl.resource_versions(&file);
    let applied_kinds: BTreeSet<String> = applied
        .keys()
        .map(|k| k.split('/').next().unwrap().to_string())
        .collect();
    assert_eq!(applied_kinds, expected);

    // The ReplicaSet controller creates the operator's pods under enforce=restricted (they stay
    // Pending: the rig runs no scheduler or kubelet).
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    let replica_sets: Api<ReplicaSet> = Api::namespaced(admin.clone(), &ns);
    let selector = format!("app.kubernetes.io/instance={release}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let list = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .expect("listing pods");
        if list.items.len() == 2 {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            let sets = replica_sets
                .list(&ListParams::default().labels(&selector))
                .await
                .expect("listing ReplicaSets");
            let conditions: Vec<_> = sets
                .items
                .iter()
                .flat_map(|rs| rs.status.iter().flat_map(|s| s.conditions.iter().flatten()))
                .map(|c| format!("{}: {}", c.type_, c.message.clone().unwrap_or_default()))
                .collect();
            panic!(
                "the operator's 2 pods were not created within 60 s ({} exist); \
                 ReplicaSet conditions: {conditions:?}",
                list.items.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Re-applying the same manifests (what a GitOps controller does on every sync) changes
    // nothing. Controllers may still write status right after the first apply, so compare once
    // writes have settled, and allow a second round if a late status write races the apply.
    let mut changed = Vec::new();
    for _round in 0..3 {
        let before = kubectl.settled_versions(&file).await;
        let out = kubectl.run(&[
            "apply",
            "--server-side",
            "--field-manager",
            FIELD_MANAGER,
            "-f",
            file_arg,
        ]);
        assert!(
            out.status.success(),
            "{}",
            describe("kubectl re-apply", &out)
        );
        let after = kubectl.resource_versions(&file);
        changed = before
            .iter()
            .filter(|(k, v)| after.get(*k) != Some(v))
            .map(|(k, _)| k.clone())
            .collect();
        if changed.is_empty() {
            break;
        }
    }
    assert!(
        changed.is_empty(),
        "re-applying the chart changed {changed:?} in every round"
    );
    let out = kubectl.run(&[
        "diff",
        "--server-side",
        "--field-manager",
        FIELD_MANAGER,
        "-f",
        file_arg,
    ]);
    assert!(
        out.status.code() == Some(0),
        "{}",
        describe("kubectl diff --server-side (expected no differences)", &out)
    );
}
