//! The Helm chart (charts/chat-operator) rendered with the rig's helm: `helm lint` and
//! `helm template` with every extra, the Deployment's security and probes, leader election by
//! replica count and scope, and the values schema. The monitoring extras, the Argo CD health check
//! and the chart applied to a real API server have files of their own (`chart_*.rs`).

mod support;

use serde_json::json;
use support::chart::{
    chart_dir, describe, documents, env_of, find, helm_template, one, render, run, tool,
};

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
    assert!(!env.contains_key("WATCH_NAMESPACES"), "all namespaces");
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

    // Namespaced: a Role and RoleBinding in each watched namespace, no ClusterRole at all.
    let docs = documents(&render(
        "ops",
        "operators",
        &["--set", "watchNamespaces={team-b,team-a}"],
    ));
    assert!(find(&docs, "ClusterRoleBinding").is_empty());
    assert!(find(&docs, "ClusterRole").is_empty());
    for namespace in ["team-a", "team-b"] {
        let role = find(&docs, "Role")
            .into_iter()
            .find(|r| r["metadata"]["namespace"] == namespace)
            .unwrap_or_else(|| panic!("a Role in {namespace}"));
        assert_eq!(role["rules"], support::operator_rules());
        let binding = find(&docs, "RoleBinding")
            .into_iter()
            .find(|b| b["metadata"]["namespace"] == namespace)
            .unwrap_or_else(|| panic!("a RoleBinding in {namespace}"));
        assert_eq!(binding["roleRef"]["kind"], "Role");
        assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
        assert_eq!(binding["subjects"][0]["namespace"], "operators");
    }
    let env = env_of(&one(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]);
    assert_eq!(env["WATCH_NAMESPACES"]["value"], "team-a,team-b");
    // The older single value means the same as a list of one.
    let docs = documents(&render(
        "ops",
        "operators",
        &["--set", "watchNamespace=team-a"],
    ));
    assert!(find(&docs, "ClusterRole").is_empty());
    let env = env_of(&one(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]);
    assert_eq!(env["WATCH_NAMESPACES"]["value"], "team-a");
}

#[test]
fn values_schema_rejects_bad_values() {
    for (set, field) in [
        ("replicas=two", "replicas"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("metrics.port=70000", "port"),
        ("watchNamespace=Not_A_Namespace", "watchNamespace"),
        ("watchNamespaces={ok,Not_A_Namespace}", "watchNamespaces"),
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
