//! Shared set-up of the operator's integration tests: a fresh namespace on the rig's real API
//! server, the operator's ServiceAccount bound to the chart's ClusterRole, and an in-process
//! operator that runs under that identity (by impersonation), so every test also proves the RBAC.

#![allow(dead_code)] // each test binary uses its own subset

use std::time::Duration;

use chat_operator::crd::ChatService;
use chat_operator::leader::LeaseSettings;
use chat_operator::{OperatorConfig, run};
use chat_rig::{Rig, eventually};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, CustomResourceExt};
use serde_json::json;

pub const WAIT: Duration = Duration::from_secs(60);
pub const OPERATOR_SA: &str = "chat-operator";

/// Installs the CRD and ClusterRole (idempotent) and waits until the CRD serves.
pub async fn install(admin: &Client) {
    let params = PatchParams::apply("chat-operator-tests").force();
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    crds.patch(
        "chatservices.chatoperator.dev",
        &params,
        &Patch::Apply(ChatService::crd()),
    )
    .await
    .expect("apply CRD");
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/chat-operator/templates/clusterrole.yaml"
    ))
    .unwrap();
    let role: ClusterRole = serde_yaml::from_str(&text).unwrap();
    Api::<ClusterRole>::all(admin.clone())
        .patch("chat-operator", &params, &Patch::Apply(role))
        .await
        .expect("apply ClusterRole");
    eventually("the CRD to be established", WAIT, || async {
        let crd = crds.get("chatservices.chatoperator.dev").await.ok()?;
        let established = crd
            .status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        established.then_some(())
    })
    .await;
    // Discovery lags a little behind Established.
    eventually("ChatService to be served", WAIT, || async {
        Api::<ChatService>::all(admin.clone())
            .list(&ListParams::default().limit(1))
            .await
            .ok()
    })
    .await;
}

pub struct Env {
    pub admin: Client,
    pub ns: String,
    pub operator_client: Client,
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

    let kubeconfig = kube::config::Kubeconfig::read_from(rig.kubeconfig_path()).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    config.auth_info.impersonate = Some(format!("system:serviceaccount:{ns}:{OPERATOR_SA}"));
    config.auth_info.impersonate_groups = Some(vec![
        "system:serviceaccounts".into(),
        "system:authenticated".into(),
    ]);
    let operator_client = Client::try_from(config).unwrap();
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
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let metrics: std::net::SocketAddr = ([127, 0, 0, 1], chat_rig::free_port().unwrap()).into();
        let config = OperatorConfig {
            namespace: Some(env.ns.clone()),
            resync: Duration::from_secs(2),
            metrics_address: Some(metrics),
            leader_election,
            ..OperatorConfig::default()
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
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let text = eventually("the operator's /metrics", WAIT, || async {
            let mut stream = tokio::net::TcpStream::connect(self.metrics).await.ok()?;
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: operator\r\nConnection: close\r\n\r\n")
                .await
                .ok()?;
            let mut text = String::new();
            stream.read_to_string(&mut text).await.ok()?;
            Some(text)
        })
        .await;
        text.lines()
            .find_map(|l| l.strip_prefix("chatoperator_reconciles_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no reconcile counter in /metrics: {text}"))
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

/// Status and reason of one condition.
pub fn condition(cr: &ChatService, type_: &str) -> Option<(String, String)> {
    let c = cr
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone()))
}

pub async fn wait_for<K>(env: &Env, name: &str) -> K
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(env.admin.clone(), &env.ns);
    eventually(&format!("{} {name}", K::kind(&())), WAIT, || async {
        api.get_opt(name).await.ok().flatten()
    })
    .await
}

pub async fn wait_condition(env: &Env, name: &str, type_: &str, status: &str) -> ChatService {
    let api: Api<ChatService> = Api::namespaced(env.admin.clone(), &env.ns);
    eventually(&format!("{type_}={status} on {name}"), WAIT, || async {
        let cr = api.get(name).await.ok()?;
        (condition(&cr, type_)?.0 == status).then_some(cr)
    })
    .await
}
