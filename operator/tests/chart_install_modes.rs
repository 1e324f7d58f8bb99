//! The chart's two install modes under the chart's own RBAC: the RBAC objects `helm template`
//! renders are applied to the rig's real API server, and the operator runs as the chart's
//! ServiceAccount (by impersonation).
//!
//! - Namespaced (`watchNamespaces`): Roles only. The operator reconciles ChatServices in the
//!   watched namespaces, sends no request anywhere else (its requests are recorded), and its
//!   identity is refused everywhere else.
//! - Cluster-wide (the default): the ClusterRole and ClusterRoleBinding allow every list and watch
//!   the operator starts with across all namespaces, and a reconcile in a namespace that has no
//!   binding of its own. The operator itself is not run over all namespaces: the shared rig holds
//!   other tests' ChatServices, which it would reconcile too.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use chat_operator::OperatorConfig;
use chat_operator::children::ChildKind;
use chat_operator::crd::ChatService;
use chat_operator::leader::LeaseSettings;
use chat_rig::wait::until_exists;
use chat_rig::{Rig, unique_name};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::api::{DynamicObject, ListParams, PartialObjectMeta, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use support::chart::{describe, documents, render, run, tool};
use support::chat_service::{chat_service, create, minimal_spec, wait_condition};
use support::requests::Requests;
use support::{Env, Operator, install, service_account_config};

const FIELD_MANAGER: &str = "chart-install-modes-test";
const RBAC_KINDS: [&str; 5] = [
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "ClusterRole",
    "ClusterRoleBinding",
];

/// Deletes what a test made outside its namespaces' contents: the namespaces and, for the
/// cluster-wide install, its ClusterRoleBinding (the ClusterRole is shared with other tests).
struct Cleanup {
    kubeconfig: PathBuf,
    namespaces: Vec<String>,
    cluster_role_binding: Option<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let kubeconfig = self.kubeconfig.to_str().unwrap().to_string();
        let kubectl = tool("kubectl");
        if let Some(binding) = &self.cluster_role_binding {
            let _ = run(
                &kubectl,
                &[
                    "--kubeconfig",
                    &kubeconfig,
                    "delete",
                    "clusterrolebinding",
                    binding,
                    "--ignore-not-found",
                    "--wait=false",
                ],
            );
        }
        for namespace in &self.namespaces {
            let _ = run(
                &kubectl,
                &[
                    "--kubeconfig",
                    &kubeconfig,
                    "delete",
                    "namespace",
                    namespace,
                    "--ignore-not-found",
                    "--wait=false",
                ],
            );
        }
    }
}

/// Renders the chart as release `release` in `namespace` and applies its RBAC objects (and the
/// ServiceAccount) with kubectl; returns them. The operator's Deployment is left out: its pods
/// would never run on the rig, and the operator runs in this process instead.
fn apply_chart_rbac(release: &str, namespace: &str, extra: &[&str]) -> Vec<Value> {
    let docs: Vec<Value> = documents(&render(release, namespace, extra))
        .into_iter()
        .filter(|d| RBAC_KINDS.contains(&d["kind"].as_str().unwrap_or_default()))
        .collect();
    let dir = chat_rig::scratch_dir("install-modes").unwrap();
    let file = dir.join(format!("{release}-rbac.yaml"));
    let text: Vec<String> = docs
        .iter()
        .map(|d| serde_yaml::to_string(d).unwrap())
        .collect();
    std::fs::write(&file, text.join("---\n")).unwrap();
    let rig = Rig::shared();
    let out = run(
        &tool("kubectl"),
        &[
            "--kubeconfig",
            rig.kubeconfig_path().to_str().unwrap(),
            "apply",
            "--server-side",
            "--field-manager",
            FIELD_MANAGER,
            // The ClusterRole "chat-operator" is shared with the other tests' set-up.
            "--force-conflicts",
            "-f",
            file.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", describe("kubectl apply", &out));
    docs
}

fn kinds(docs: &[Value]) -> Vec<String> {
    docs.iter()
        .map(|d| {
            format!(
                "{}/{}/{}",
                d["kind"].as_str().unwrap(),
                d["metadata"]["namespace"].as_str().unwrap_or(""),
                d["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect()
}

fn forbidden<T: std::fmt::Debug>(what: &str, result: Result<T, kube::Error>) -> Option<String> {
    match result {
        Err(kube::Error::Api(e)) if e.code == 403 => None,
        other => Some(format!("{what}: expected 403 Forbidden, got {other:?}")),
    }
}

/// The chart's ServiceAccount of `release` in `namespace`, impersonated.
async fn chart_identity(release: &str, namespace: &str) -> kube::Config {
    service_account_config(namespace, &format!("{release}-chat-operator")).await
}

fn env_in(admin: &Client, ns: &str, operator_client: &Client) -> Env {
    Env {
        admin: admin.clone(),
        ns: ns.to_string(),
        operator_client: operator_client.clone(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn namespaced_install_reconciles_watched_namespaces_only() {
    let rig = Rig::shared();
    let (admin, operators) = rig.test_namespace("ns-mode-op").await;
    let (_, team_a) = rig.test_namespace("ns-mode-a").await;
    let (_, team_b) = rig.test_namespace("ns-mode-b").await;
    let (_, elsewhere) = rig.test_namespace("ns-mode-x").await;
    let _cleanup = Cleanup {
        kubeconfig: rig.kubeconfig_path().to_path_buf(),
        namespaces: vec![
            operators.clone(),
            team_a.clone(),
            team_b.clone(),
            elsewhere.clone(),
        ],
        cluster_role_binding: None,
    };
    // The CRD is cluster-scoped: a cluster admin installs it, not the namespaced release.
    install(&admin).await;
    let release = unique_name("nsrel");
    let watch = format!("watchNamespaces={{{team_a},{team_b}}}");
    let docs = apply_chart_rbac(&release, &operators, &["--set", &watch]);
    let applied = kinds(&docs);
    assert!(
        !applied.iter().any(|k| k.starts_with("Cluster")),
        "a namespaced install has no cluster-wide RBAC: {applied:?}"
    );
    for ns in [&team_a, &team_b] {
        assert!(
            applied
                .iter()
                .any(|k| k.starts_with(&format!("Role/{ns}/"))),
            "no Role in {ns}: {applied:?}"
        );
    }

    let requests = Requests::default();
    let identity = chart_identity(&release, &operators).await;
    let sa = Client::try_from(identity.clone()).unwrap();
    let operator = Operator::start_config(
        requests.client_for(identity),
        OperatorConfig {
            namespaces: vec![team_a.clone(), team_b.clone()],
            // The chart's leader-election Role in the release namespace is used too.
            leader_election: Some(LeaseSettings {
                namespace: operators.clone(),
                name: "chat-operator-leader".into(),
                identity: "install-modes-test".into(),
                duration: Duration::from_secs(15),
            }),
            ..OperatorConfig::default()
        },
    );

    for ns in [&team_a, &team_b, &elsewhere] {
        create(
            &env_in(&admin, ns, &sa),
            &chat_service("chat", minimal_spec()),
        )
        .await;
    }
    for ns in [&team_a, &team_b] {
        let env = env_in(&admin, ns, &sa);
        wait_condition(&env, "chat", "ConfigValid", "True").await;
        let _: Deployment = until_exists(&env.api(), "chat", support::WAIT).await;
    }
    // A few resyncs (every 2 s) later, the ChatService outside is still untouched.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let outside: ChatService = Api::namespaced(admin.clone(), &elsewhere)
        .get("chat")
        .await
        .unwrap();
    assert!(
        outside.status.is_none(),
        "a ChatService outside the watched namespaces got a status: {:?}",
        outside.status
    );
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), &elsewhere);
    assert!(deployments.get_opt("chat").await.unwrap().is_none());

    // It did not even try: every request it sent stays in its namespaces (the watched ones, and
    // the release namespace for its Lease).
    let allowed: Vec<String> = [&team_a, &team_b, &operators]
        .iter()
        .map(|ns| format!("/namespaces/{ns}/"))
        .collect();
    let strays: Vec<String> = requests
        .all()
        .into_iter()
        .filter(|r| !allowed.iter().any(|prefix| r.contains(prefix.as_str())))
        .collect();
    assert!(
        strays.is_empty(),
        "requests outside the watched namespaces: {strays:#?}"
    );

    // And had it tried, the API server would have refused it.
    let mut failures = Vec::new();
    let secrets: Api<Secret> = Api::namespaced(sa.clone(), &elsewhere);
    failures.extend(forbidden(
        "reading Secrets outside",
        secrets.list(&ListParams::default()).await,
    ));
    let all_secrets: Api<PartialObjectMeta<Secret>> = Api::all(sa.clone());
    failures.extend(forbidden(
        "listing Secrets in all namespaces",
        all_secrets.list_metadata(&ListParams::default()).await,
    ));
    let all_chat_services: Api<ChatService> = Api::all(sa.clone());
    failures.extend(forbidden(
        "listing ChatServices in all namespaces",
        all_chat_services.list(&ListParams::default()).await,
    ));
    let config_map: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "x"}})).unwrap();
    failures.extend(forbidden(
        "creating a ConfigMap outside",
        Api::<ConfigMap>::namespaced(sa.clone(), &elsewhere)
            .create(&PostParams::default(), &config_map)
            .await,
    ));
    let deployments_outside: Api<Deployment> = Api::namespaced(sa.clone(), &elsewhere);
    failures.extend(forbidden(
        "deleting a Deployment outside",
        deployments_outside
            .delete("chat", &Default::default())
            .await,
    ));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_wide_install_may_watch_everywhere_and_reconciles_without_a_local_binding() {
    let rig = Rig::shared();
    let (admin, operators) = rig.test_namespace("cw-mode-op").await;
    let (_, team) = rig.test_namespace("cw-mode-a").await;
    let release = unique_name("cwrel");
    let _cleanup = Cleanup {
        kubeconfig: rig.kubeconfig_path().to_path_buf(),
        namespaces: vec![operators.clone(), team.clone()],
        cluster_role_binding: Some(format!("{release}-chat-operator-{operators}")),
    };
    install(&admin).await;
    let docs = apply_chart_rbac(&release, &operators, &[]);
    let applied = kinds(&docs);
    assert!(
        applied.contains(&"ClusterRole//chat-operator".to_string()),
        "{applied:?}"
    );
    let binding: ClusterRoleBinding = Api::all(admin.clone())
        .get(&format!("{release}-chat-operator-{operators}"))
        .await
        .expect("the chart's ClusterRoleBinding");
    assert_eq!(binding.role_ref.name, "chat-operator");

    // Every list the operator starts its cluster-wide watches with is allowed.
    let sa = Client::try_from(chart_identity(&release, &operators).await).unwrap();
    let mut failures = Vec::new();
    let one = ListParams::default().limit(1);
    if let Err(e) = Api::<ChatService>::all(sa.clone()).list(&one).await {
        failures.push(format!("ChatServices in all namespaces: {e}"));
    }
    for kind in ChildKind::ALL {
        let api: Api<DynamicObject> = Api::all_with(sa.clone(), &kind.api_resource());
        let owned = ListParams::default()
            .labels("app.kubernetes.io/managed-by=chat-operator")
            .limit(1);
        if let Err(e) = api.list(&owned).await {
            failures.push(format!("{kind:?} in all namespaces: {e}"));
        }
    }
    let user_secrets: Api<PartialObjectMeta<Secret>> = Api::all(sa.clone());
    if let Err(e) = user_secrets.list_metadata(&one).await {
        failures.push(format!("Secret metadata in all namespaces: {e}"));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // A reconcile in a namespace with no binding of its own: the ClusterRoleBinding covers it.
    let operator = Operator::start_config(
        sa.clone(),
        OperatorConfig {
            namespaces: vec![team.clone()],
            ..OperatorConfig::default()
        },
    );
    let env = env_in(&admin, &team, &sa);
    create(&env, &chat_service("chat", minimal_spec())).await;
    wait_condition(&env, "chat", "ConfigValid", "True").await;
    let _: Deployment = until_exists(&env.api(), "chat", support::WAIT).await;
    let _: Secret = until_exists(&env.api(), "chat-connection", support::WAIT).await;
    operator.stop().await;
}
