//! A converged ChatService stays converged without traffic, and drift is repaired: resyncs of a
//! converged object send no request at all (counted on the operator's own client), also from a
//! freshly started operator, while hand edits, deleted children and a taken-over field are put
//! back.

mod support;

use chat_rig::eventually;
use chat_rig::wait::until_exists;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use support::chat_service::{
    chat_service, checksum, create, json_merge, merge_spec, minimal_spec, wait_condition,
};
use support::requests::start_counted;
use support::snapshot::settle;
use support::{Operator, WAIT, env, wait_reconciles};

/// The operator's own requests, counted on its client: a converged ChatService (with every
/// child kind) is re-reconciled without a single request, also by a freshly started operator,
/// and a hand edit of a field the operator owns is still reverted.
#[tokio::test]
async fn converged_reconciles_send_no_requests_and_drift_is_still_reverted() {
    let env = env("noop").await;
    let (operator, requests) = start_counted(&env).await;
    let mut spec = minimal_spec();
    json_merge(
        &mut spec,
        json!({"ollama": {"models": ["gemma3:270m"], "modelStorage": "2Gi"},
        "autoscaling": {"minReplicas": 2, "maxReplicas": 4, "targetCPUUtilizationPercentage": 70},
        "ingress": {"host": "chat.example.com"}, "allowUnauthenticated": true}),
    );
    create(&env, &chat_service("chat", spec)).await;
    let _: HorizontalPodAutoscaler = until_exists(&env.api(), "chat", WAIT).await;
    let _: k8s_openapi::api::networking::v1::Ingress = until_exists(&env.api(), "chat", WAIT).await;
    wait_condition(&env, "chat", "ConfigValid", "True").await;
    settle(&env, "the ChatService and its children to settle").await;

    assert!(
        requests.writes().iter().any(|r| r.starts_with("PATCH ")),
        "the recording layer saw the applies that built the stack"
    );

    // (a) Resyncs of the converged object (every 2 s, counted on /metrics so they provably
    // ran): no write of any kind (apply, status, Event), and no read either.
    let quiet = |what: &'static str| {
        let requests = requests.clone();
        let operator = &operator;
        async move {
            requests.clear();
            wait_reconciles(operator, 3).await;
            assert_eq!(requests.writes(), Vec::<String>::new(), "{what}: writes");
            assert_eq!(requests.reads(), Vec::<String>::new(), "{what}: reads");
        }
    };
    quiet("resync").await;

    // (b) Drift is still corrected: an image edited by a merge patch (kubectl edit) and a
    // ConfigMap value taken over by another field manager's forced apply are both reverted.
    let deployments: Api<Deployment> = Api::namespaced(env.admin.clone(), &env.ns);
    let image = |d: &Deployment| {
        d.spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
            .image
            .clone()
            .unwrap()
    };
    let original = image(&deployments.get("chat").await.unwrap());
    let patch = json!({"spec": {"template": {"spec": {"containers": [{"name": "chat-service", "image": "evil:latest"}]}}}});
    deployments
        .patch("chat", &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .unwrap();
    let config_maps: Api<ConfigMap> = Api::namespaced(env.admin.clone(), &env.ns);
    let rendered =
        config_maps.get("chat-config").await.unwrap().data.unwrap()["config.yaml"].clone();
    let takeover = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "chat-config"}, "data": {"config.yaml": "evil: true\n"}});
    config_maps
        .patch(
            "chat-config",
            &PatchParams::apply("intruder").force(),
            &Patch::Apply(takeover),
        )
        .await
        .unwrap();
    eventually("the image and the config to be reverted", WAIT, || async {
        let d = deployments.get("chat").await.ok()?;
        let c = config_maps.get("chat-config").await.ok()?;
        (image(&d) == original && c.data?["config.yaml"] == rendered).then_some(())
    })
    .await;
    settle(&env, "the reverted objects to settle").await;
    quiet("resync after the repair").await;
    operator.stop().await;

    // (c) A fresh operator (empty memory, caches filled from the API server) writes nothing
    // either: the spec hash on each child says it is up to date.
    let (operator, requests) = start_counted(&env).await;
    wait_reconciles(&operator, 2).await;
    assert_eq!(requests.writes(), Vec::<String>::new(), "restart: writes");
    operator.stop().await;
}

#[tokio::test]
async fn edits_deletions_and_drift_are_repaired() {
    let env = env("drift").await;
    let operator = Operator::start(&env);
    create(&env, &chat_service("chat", minimal_spec())).await;
    let deployment: Deployment = until_exists(&env.api(), "chat", WAIT).await;
    let first = checksum(&deployment);

    // Edit the spec: the ConfigMap follows and the pod template checksum changes.
    merge_spec(&env, "chat", json!({"routing": {"maxAttempts": 4}})).await;
    let deployments: Api<Deployment> = Api::namespaced(env.admin.clone(), &env.ns);
    let edited = eventually("the checksum to change", WAIT, || async {
        let d = deployments.get("chat").await.ok()?;
        (checksum(&d) != first).then_some(d)
    })
    .await;
    let config: ConfigMap = until_exists(&env.api(), "chat-config", WAIT).await;
    assert!(config.data.unwrap()["config.yaml"].contains("maxAttempts: 4"));
    assert_ne!(checksum(&edited), first);

    // Delete a child: it comes back.
    let services: Api<Service> = Api::namespaced(env.admin.clone(), &env.ns);
    let old_uid = services.get("chat").await.unwrap().uid();
    services
        .delete("chat", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the Service to be re-created", WAIT, || async {
        let s = services.get_opt("chat").await.ok()??;
        (s.uid() != old_uid).then_some(())
    })
    .await;

    // Hand-edit an owned field and add a label: the field is reverted, the label stays.
    let patch = json!({
        "metadata": {"labels": {"example.com/team": "payments"}},
        "spec": {"template": {"spec": {"containers": [{"name": "chat-service", "image": "evil:latest"}]}}},
    });
    deployments
        .patch("chat", &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .unwrap();
    let reverted = eventually("the image to be reverted", WAIT, || async {
        let d = deployments.get("chat").await.ok()?;
        let image = d.spec.as_ref()?.template.spec.as_ref()?.containers[0]
            .image
            .clone()?;
        (image != "evil:latest").then_some(d)
    })
    .await;
    assert_eq!(
        reverted
            .labels()
            .get("example.com/team")
            .map(String::as_str),
        Some("payments")
    );
    operator.stop().await;
}
