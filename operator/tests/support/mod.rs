//! Shared set-up of the operator's integration tests: a fresh namespace on the rig's real API
//! server, the operator's ServiceAccount bound to the chart's ClusterRole, and an in-process
//! operator that runs under that identity (by impersonation), so every test also proves the RBAC.
//! The submodules hold what several test files share: ChatService objects ([`chat_service`]), the
//! recording of an operator's requests ([`requests`]) and snapshots of what it owns
//! ([`snapshot`]).

#![allow(dead_code)] // each test binary uses its own subset

pub mod argocd;
pub mod chart;
pub mod chat_service;
pub mod requests;
pub mod snapshot;

use std::time::Duration;

use chat_operator::leader::LeaseSettings;
use chat_operator::{OperatorConfig, run};
use chat_rig::{Rig, eventually};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, RoleBinding};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

/// How long a test waits for the operator to act. On two busy cores a reconcile can queue.
pub const WAIT: Duration = Duration::from_secs(60);
pub const OPERATOR_SA: &str = "chat-operator";
const FIELD_MANAGER: &str = "chat-operator-tests";

/// Installs the CRD and ClusterRole (idempotent) and waits until the CRD serves.
pub async fn install(admin: &Client) {
    chat_rig::crd::install(
        admin,
        &chat_operator::crd::custom_resource_definition(),
        FIELD_MANAGER,
    )
    .await
    .expect("apply CRD");
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let role: ClusterRole = serde_json::from_value(json!({
        "metadata": {"name": "chat-operator", "labels": {"app.kubernetes.io/name": "chat-operator"}},
        "rules": operator_rules(),
    }))
    .unwrap();
    Api::<ClusterRole>::all(admin.clone())
        .patch("chat-operator", &params, &Patch::Apply(role))
        .await
        .expect("apply ClusterRole");
}

/// The chart's RBAC rules of the operator (charts/chat-operator/files/operator-rules.yaml), the
/// same in the ClusterRole of a cluster-wide install and the Roles of a namespaced one.
pub fn operator_rules() -> serde_json::Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/chat-operator/files/operator-rules.yaml"
    ))
    .unwrap();
    serde_yaml::from_str(&text).unwrap()
}

pub struct Env {
    pub admin: Client,
    pub ns: String,
    pub operator_client: Client,
}

impl Env {
    /// The admin's view of one kind in the test namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.admin.clone(), &self.ns)
    }
}

/// A kube config with the operator's identity in `ns` (the ServiceAccount, by impersonation), for
/// the operator's client and for clients that add a tower layer of their own.
pub async fn operator_kube_config(ns: &str) -> kube::Config {
    service_account_config(ns, OPERATOR_SA).await
}

/// A kube config with the identity of ServiceAccount `ns/name`, by impersonation.
pub async fn service_account_config(ns: &str, name: &str) -> kube::Config {
    let rig = Rig::shared();
    let kubeconfig = kube::config::Kubeconfig::read_from(rig.kubeconfig_path()).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    config.auth_info.impersonate = Some(format!("system:serviceaccount:{ns}:{name}"));
    config.auth_info.impersonate_groups = Some(vec![
        "system:serviceaccounts".into(),
        "system:authenticated".into(),
    ]);
    config
}

/// A fresh namespace with the operator's ServiceAccount bound to the ClusterRole there, and a
/// client that impersonates that ServiceAccount.
pub async fn env(prefix: &str) -> Env {
    let rig = Rig::shared();
    let (admin, ns) = rig.test_namespace(prefix).await;
    install(&admin).await;
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": OPERATOR_SA}})).unwrap();
    Api::<ServiceAccount>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "chat-operator"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "chat-operator"},
        "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_SA, "namespace": ns}],
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();

    let operator_client = Client::try_from(operator_kube_config(&ns).await).unwrap();
    Env {
        admin,
        ns,
        operator_client,
    }
}

/// A running in-process operator; killed (aborted, not stopped) on drop.
pub struct Operator {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<chat_operator::Result<()>>,
    pub metrics: std::net::SocketAddr,
}

impl Operator {
    pub fn start(env: &Env) -> Self {
        Self::start_with(env, None)
    }

    pub fn start_with(env: &Env, leader_election: Option<LeaseSettings>) -> Self {
        Self::start_client(env, env.operator_client.clone(), leader_election)
    }

    /// Runs the operator on the given client (e.g. one that records its requests).
    pub fn start_client(env: &Env, client: Client, leader_election: Option<LeaseSettings>) -> Self {
        let config = OperatorConfig {
            namespaces: vec![env.ns.clone()],
            leader_election,
            ..OperatorConfig::default()
        };
        Self::start_config(client, config)
    }

    /// Runs the operator on `client` with `config`, re-checking every 2 s and serving its
    /// metrics on a free port.
    pub fn start_config(client: Client, config: OperatorConfig) -> Self {
        Self::start_resync(client, config, Duration::from_secs(2))
    }

    /// Runs the operator on `client` with `config`, re-checking every `resync` and serving its
    /// metrics on a free port.
    pub fn start_resync(client: Client, config: OperatorConfig, resync: Duration) -> Self {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let metrics: std::net::SocketAddr = ([127, 0, 0, 1], chat_rig::free_port().unwrap()).into();
        let config = OperatorConfig {
            resync,
            metrics_address: Some(metrics),
            ..config
        };
        let task = tokio::spawn(run(client, config, async move {
            let _ = rx.await;
        }));
        Self {
            stop: Some(tx),
            task,
            metrics,
        }
    }

    /// `chatoperator_reconciles_total` from the operator's own `/metrics`, so a test can prove
    /// reconciles really ran during a window in which it expects no writes.
    pub async fn reconciles(&self) -> u64 {
        self.counter("chatoperator_reconciles_total").await
    }

    /// The operator's whole `/metrics` text.
    pub async fn metrics_text(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        eventually("the operator's /metrics", WAIT, || async {
            let mut stream = tokio::net::TcpStream::connect(self.metrics).await.ok()?;
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: operator\r\nConnection: close\r\n\r\n")
                .await
                .ok()?;
            let mut text = String::new();
            stream.read_to_string(&mut text).await.ok()?;
            Some(text)
        })
        .await
    }

    /// The counter `name` (without labels) from the operator's own `/metrics`.
    pub async fn counter(&self, name: &str) -> u64 {
        let text = self.metrics_text().await;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics: {text}"))
    }

    pub async fn stop(self) {
        self.stop_within(Duration::from_secs(30)).await;
    }

    /// Asks for a graceful shutdown and fails the test unless the operator has returned within
    /// `limit` (a hang bound, not a speed target).
    pub async fn stop_within(mut self, limit: Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = &mut self.task;
        tokio::time::timeout(limit, task)
            .await
            .unwrap_or_else(|_| panic!("no graceful shutdown within {limit:?}"))
            .unwrap()
            .unwrap();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until the operator has started `more` reconciles beyond those it has started now.
pub async fn wait_reconciles(operator: &Operator, more: u64) {
    let start = operator.reconciles().await;
    eventually(&format!("{more} more reconciles"), WAIT, || async {
        (operator.reconciles().await >= start + more).then_some(())
    })
    .await;
}
