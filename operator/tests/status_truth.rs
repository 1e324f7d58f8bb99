//! Status that tells the truth, on statuses the real controllers produced: kube-controller-manager
//! refuses to create a ChatService's pods (a ResourceQuota of zero pods), and the ChatService says
//! Degraded with the controller's own words, which the chart's Argo CD health check turns into
//! Degraded; once the quota is gone, the fault clears by itself. Against the rig's API server and
//! kube-controller-manager; pod faults that need a kubelet (crash loops, OOM kills) are covered
//! by the unit tests of `chat_operator::pods` on the kubelet's status format.

mod support;

use std::time::{Duration, Instant};

use chat_operator::crd::ChatService;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ResourceQuota;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use support::argocd::argocd_health;
use support::chat_service::{chat_service, create, minimal_spec};
use support::{Env, Operator, WAIT, env};

fn degraded(cr: &ChatService) -> Option<(String, String, String)> {
    let c = cr
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Everything a failed wait should show: the ChatService's conditions and the Deployments'.
async fn dump(env: &Env, name: &str) -> String {
    let cr = env.api::<ChatService>().get(name).await.ok();
    let deployments = env
        .api::<Deployment>()
        .list(&Default::default())
        .await
        .map(|l| {
            l.items
                .iter()
                .map(|d| {
                    format!(
                        "{}: {:?}",
                        d.name_any(),
                        d.status.as_ref().and_then(|s| s.conditions.clone())
                    )
                })
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    format!(
        "ChatService conditions: {:#?}\nDeployments: {deployments:#?}",
        cr.and_then(|c| c.status).map(|s| s.conditions)
    )
}

/// Waits until Degraded of `name` satisfies `wanted`, or panics with [`dump`].
async fn wait_degraded(
    env: &Env,
    name: &str,
    what: &str,
    wanted: impl Fn(&(String, String, String)) -> bool,
) -> ChatService {
    let deadline = Instant::now() + WAIT * 2;
    loop {
        if let Ok(cr) = env.api::<ChatService>().get(name).await
            && degraded(&cr).as_ref().is_some_and(&wanted)
        {
            return cr;
        }
        if Instant::now() > deadline {
            panic!("Degraded never became {what}\n{}", dump(env, name).await);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn pods_the_controllers_cannot_create_make_it_degraded_until_that_is_fixed() {
    let env = env("quota").await;
    let quota: ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "no-pods"},
        "spec": {"hard": {"pods": "0"}},
    }))
    .unwrap();
    let quotas: Api<ResourceQuota> = Api::namespaced(env.admin.clone(), &env.ns);
    quotas.create(&PostParams::default(), &quota).await.unwrap();
    let _operator = Operator::start(&env);
    create(&env, &chat_service("support", minimal_spec())).await;

    let cr = wait_degraded(
        &env,
        "support",
        "True/ReplicaFailure",
        |(status, reason, _)| status == "True" && reason == "ReplicaFailure",
    )
    .await;
    let (_, _, message) = degraded(&cr).unwrap();
    assert!(
        message.contains("Deployment support cannot create pods (FailedCreate)")
            && message.contains("exceeded quota: no-pods"),
        "the message names the Deployment and quotes the controller: {message}"
    );
    let ready = cr
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .unwrap();
    assert_eq!(ready.status, "False", "{ready:?}");

    // Argo CD shows this very status as Degraded, with the same words.
    let (health, health_message) = argocd_health(&serde_json::to_value(&cr).unwrap());
    assert_eq!(health, "Degraded", "{health_message}");
    assert!(
        health_message.contains("exceeded quota"),
        "{health_message}"
    );

    // The quota goes: the controllers create the pods, and the fault is not sticky.
    quotas
        .delete("no-pods", &DeleteParams::default())
        .await
        .unwrap();
    let cr = wait_degraded(&env, "support", "False", |(status, _, _)| status == "False").await;
    let (health, _) = argocd_health(&serde_json::to_value(&cr).unwrap());
    assert_ne!(health, "Degraded", "{}", dump(&env, "support").await);
}
