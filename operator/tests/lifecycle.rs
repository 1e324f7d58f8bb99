//! The operator process's own life: killed mid-reconcile and restarted without duplicates, shut
//! down at any moment of its start, and two replicas electing one leader that hands over on a
//! graceful stop.

mod support;

use std::time::Duration;

use chat_operator::leader::LeaseSettings;
use chat_rig::eventually;
use chat_rig::wait::until_exists;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{ListParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use support::chat_service::{
    chat_service, checksum, create, merge_spec, minimal_spec, wait_condition,
};
use support::{OPERATOR_SA, Operator, WAIT, env, operator_kube_config, wait_reconciles};

#[tokio::test]
async fn restart_mid_reconcile_converges_without_duplicates() {
    let env = env("restart").await;
    create(&env, &chat_service("chat", minimal_spec())).await;
    // Killed (not stopped) as soon as its first write shows: the generated password is created
    // before anything is applied, so the rest of the reconcile is cut off.
    let operator = Operator::start(&env);
    let password: Secret = until_exists(&env.api(), "chat-redis-password", WAIT).await;
    drop(operator);
    // Killed in the middle of the applies (the ConfigMap comes before the workloads).
    let operator = Operator::start(&env);
    let _: ConfigMap = until_exists(&env.api(), "chat-config", WAIT).await;
    drop(operator);
    // And once more at an arbitrary moment.
    let operator = Operator::start(&env);
    tokio::time::sleep(Duration::from_millis(700)).await;
    drop(operator);
    let operator = Operator::start(&env);
    let _: Deployment = until_exists(&env.api(), "chat", WAIT).await;
    wait_condition(&env, "chat", "ConfigValid", "True").await;
    let lp = ListParams::default().labels("chatoperator.dev/chatservice=chat");
    let secrets = Api::<Secret>::namespaced(env.admin.clone(), &env.ns)
        .list(&lp)
        .await
        .unwrap();
    let mut names: Vec<_> = secrets.iter().map(|s| s.name_any()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "chat-connection",
            "chat-mongodb-credentials",
            "chat-redis-password"
        ]
    );
    let deployments = Api::<Deployment>::namespaced(env.admin.clone(), &env.ns)
        .list(&lp)
        .await
        .unwrap();
    assert_eq!(deployments.items.len(), 2, "chat and chat-redis only");
    // The password made by the first, killed operator is the one in use.
    let now: Secret = until_exists(&env.api(), "chat-redis-password", WAIT).await;
    assert_eq!(now.metadata.uid, password.metadata.uid);
    assert_eq!(now.data, password.data);
    operator.stop().await;
}

/// A shutdown asked for at any moment of the start, including while the watch caches are still
/// listing and a reconcile already waits for them, returns: the caches are fed by the controller's
/// trigger streams, which a graceful shutdown stops polling, so such a reconcile must give up
/// rather than wait for caches that will never fill.
#[tokio::test]
async fn a_shutdown_during_start_up_returns_promptly() {
    let env = env("early-stop").await;
    create(&env, &chat_service("chat", minimal_spec())).await;
    let operator = Operator::start(&env);
    let _: Deployment = until_exists(&env.api(), "chat", WAIT).await;
    operator.stop().await;
    for delay_ms in (0..=400).step_by(20) {
        let operator = Operator::start(&env);
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        operator.stop_within(Duration::from_secs(10)).await;
    }
}

/// Holds back the answer to every LIST of Ingresses (not the watches) for a minute.
struct SlowIngressList<S> {
    inner: S,
}

impl<S> tower::Service<http::Request<kube::client::Body>> for SlowIngressList<S>
where
    S: tower::Service<http::Request<kube::client::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<kube::client::Body>) -> Self::Future {
        let uri = request.uri();
        let list =
            uri.path().ends_with("/ingresses") && !uri.query().unwrap_or("").contains("watch=true");
        let answer = self.inner.call(request);
        Box::pin(async move {
            if list {
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            answer.await
        })
    }
}

/// A shutdown while a reconcile waits for the caches of the operator's children (their first
/// lists are slow, as in a large cluster) returns: the reconcile gives up instead of waiting for
/// lists that a stopping controller no longer reads. The delay is a tower layer on the operator's
/// own client that holds back the first LIST of Ingresses (a narrow mock of a slow API server).
#[tokio::test]
async fn a_shutdown_while_a_reconcile_waits_for_the_caches_returns() {
    let env = env("slow-list").await;
    create(&env, &chat_service("chat", minimal_spec())).await;
    let config = operator_kube_config(&env.ns).await;
    let slow_list = tower::layer::layer_fn(|inner| SlowIngressList { inner });
    let client = kube::client::ClientBuilder::try_from(config)
        .unwrap()
        .with_layer(&slow_list)
        .build();
    let operator = Operator::start_client(&env, client, None);
    // The reconcile has started (the counter counts starts) and now waits for the Ingress cache.
    wait_reconciles(&operator, 1).await;
    operator.stop_within(Duration::from_secs(10)).await;
    // Nothing was written by the reconcile that gave up.
    let deployment = Api::<Deployment>::namespaced(env.admin.clone(), &env.ns)
        .get_opt("chat")
        .await
        .unwrap();
    assert!(deployment.is_none());
}

#[tokio::test]
async fn two_replicas_elect_one_leader_and_hand_over_on_shutdown() {
    /// The Lease name `chat-operator` uses (main.rs) and the chart's Role names.
    const LEASE: &str = "chat-operator-leader";
    let env = env("leader").await;
    // The chart's leader-election Role (templates/rbac.yaml, rendered by hand): create any Lease,
    // get and update only the operator's own. The ClusterRole grants no Lease access at all.
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "chat-operator-leader-election"},
        "rules": [
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
             "resourceNames": [LEASE], "verbs": ["get", "update"]},
        ],
    }))
    .unwrap();
    Api::<Role>::namespaced(env.admin.clone(), &env.ns)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "chat-operator-leader-election"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "chat-operator-leader-election"},
        "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_SA, "namespace": env.ns}],
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(env.admin.clone(), &env.ns)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let lease = |identity: &str| LeaseSettings {
        namespace: env.ns.clone(),
        name: LEASE.into(),
        identity: identity.into(),
        duration: Duration::from_secs(6),
    };
    let leases: Api<Lease> = Api::namespaced(env.admin.clone(), &env.ns);
    let holder = || async {
        leases
            .get_opt(LEASE)
            .await
            .ok()
            .flatten()?
            .spec?
            .holder_identity
    };
    let first = Operator::start_with(&env, Some(lease("first")));
    eventually("the first replica to lead", WAIT, || async {
        (holder().await.as_deref() == Some("first")).then_some(())
    })
    .await;
    let second = Operator::start_with(&env, Some(lease("second")));
    create(&env, &chat_service("chat", minimal_spec())).await;
    let deployment: Deployment = until_exists(&env.api(), "chat", WAIT).await;

    // Over more than a lease duration (the leader renews, the standby retries every 2 s), the
    // leader keeps the Lease and the standby never reconciles.
    wait_reconciles(&first, 4).await;
    assert_eq!(holder().await.as_deref(), Some("first"));
    assert_eq!(second.reconciles().await, 0, "the standby reconciled");

    // A graceful stop releases the Lease; the standby takes over and reconciles a change.
    first.stop().await;
    eventually("the second replica to lead", WAIT, || async {
        (holder().await.as_deref() == Some("second")).then_some(())
    })
    .await;
    merge_spec(&env, "chat", json!({"routing": {"maxAttempts": 3}})).await;
    let deployments: Api<Deployment> = Api::namespaced(env.admin.clone(), &env.ns);
    eventually("the new leader to roll the config", WAIT, || async {
        let d = deployments.get("chat").await.ok()?;
        (checksum(&d) != checksum(&deployment)).then_some(())
    })
    .await;
    assert!(second.reconciles().await > 0);
    second.stop().await;
    // The last leader gave the Lease up too.
    assert_eq!(holder().await, None);
}
