//! Who owns a name, and what one refused child does to the rest, against the rig's API server:
//! the operator never takes over an object it did not make (a user's Service or Secret, or
//! another ChatService's child), and a child the API server refuses is reported in status and one
//! Event while every other child is still applied.

mod support;

use std::collections::BTreeMap;

use chat_operator::crd::ChatService;
use chat_rig::wait::until_exists;
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{ListParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use support::chat_service::{chat_service, create, json_merge, minimal_spec, wait_condition};
use support::{Env, Operator, WAIT, env, wait_reconciles};

fn condition_of(cr: &ChatService, type_: &str) -> (String, String, String) {
    let c = cr
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .unwrap_or_else(|| panic!("no {type_} condition: {:?}", cr.status));
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

async fn events_about(env: &Env, name: &str, reason: &str) -> Vec<Event> {
    Api::<Event>::namespaced(env.admin.clone(), &env.ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                && e.reason.as_deref() == Some(reason)
        })
        .collect()
}

#[tokio::test]
async fn objects_the_chat_service_does_not_own_are_never_taken_over() {
    let env = env("owner").await;
    let _operator = Operator::start(&env);

    // A user's own Service and Secret, with the names children would get.
    let user_service: Service = serde_json::from_value(json!({
        "metadata": {"name": "shop"},
        "spec": {"selector": {"app": "shop"}, "ports": [{"port": 8080}]},
    }))
    .unwrap();
    let services: Api<Service> = env.api();
    services
        .create(&PostParams::default(), &user_service)
        .await
        .unwrap();
    let user_secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("billing-redis-password".into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "password".to_string(),
            ByteString(b"the user's own".to_vec()),
        )])),
        ..Default::default()
    };
    let secrets: Api<Secret> = env.api();
    secrets
        .create(&PostParams::default(), &user_secret)
        .await
        .unwrap();

    create(&env, &chat_service("shop", minimal_spec())).await;
    create(&env, &chat_service("billing", minimal_spec())).await;
    for (name, object) in [
        ("shop", "Service \"shop\""),
        ("billing", "Secret \"billing-redis-password\""),
    ] {
        let cr = wait_condition(&env, name, "ConfigValid", "False").await;
        let (_, reason, message) = condition_of(&cr, "ConfigValid");
        assert_eq!(reason, "NameConflict", "{name}: {message}");
        assert!(
            message.contains(&format!(
                "{object} already exists and it was not made by this ChatService"
            )),
            "{name}: {message}"
        );
        // Nothing was built for it: no Deployment, no ConfigMap, no generated Secret.
        let deployments: Api<Deployment> = env.api();
        assert!(deployments.get_opt(name).await.unwrap().is_none(), "{name}");
        let config_maps: Api<ConfigMap> = env.api();
        let config = format!("{name}-config");
        assert!(
            config_maps.get_opt(&config).await.unwrap().is_none(),
            "{name}"
        );
    }
    assert!(
        secrets
            .get_opt("shop-redis-password")
            .await
            .unwrap()
            .is_none(),
        "no credentials were generated for a ChatService that cannot be built"
    );
    // The user's objects are as they were.
    let service = services.get("shop").await.unwrap();
    assert_eq!(
        service.spec.clone().unwrap().selector.unwrap(),
        BTreeMap::from([("app".to_string(), "shop".to_string())])
    );
    assert!(service.owner_references().is_empty());
    let secret = secrets.get("billing-redis-password").await.unwrap();
    assert_eq!(
        secret.data.clone().unwrap()["password"].0,
        b"the user's own".to_vec()
    );
    assert!(secret.owner_references().is_empty());
}

#[tokio::test]
async fn two_chat_services_do_not_fight_over_one_name() {
    let env = env("collide").await;
    let _operator = Operator::start(&env);
    create(&env, &chat_service("a", minimal_spec())).await;
    wait_condition(&env, "a", "ConfigValid", "True").await;
    let services: Api<Service> = env.api();
    let redis: Service = until_exists(&services, "a-redis", WAIT).await;
    let a_uid = Api::<ChatService>::namespaced(env.admin.clone(), &env.ns)
        .get("a")
        .await
        .unwrap()
        .uid()
        .unwrap();

    // ChatService `a-redis` would name its chat Service `a-redis`: taken by `a`.
    create(&env, &chat_service("a-redis", minimal_spec())).await;
    let cr = wait_condition(&env, "a-redis", "ConfigValid", "False").await;
    let (_, reason, message) = condition_of(&cr, "ConfigValid");
    assert_eq!(reason, "NameConflict", "{message}");
    assert!(
        message.contains("Service \"a-redis\" already exists and it belongs to ChatService \"a\""),
        "{message}"
    );
    wait_reconciles(&_operator, 3).await;
    let after = services.get("a-redis").await.unwrap();
    assert_eq!(after.owner_references()[0].uid, a_uid);
    assert_eq!(
        after.spec.as_ref().unwrap().selector,
        redis.spec.as_ref().unwrap().selector,
        "a's Redis Service keeps a's Redis selector"
    );
    assert_eq!(
        after.metadata.resource_version, redis.metadata.resource_version,
        "nobody wrote to it"
    );
    let (ready, _, _) = condition_of(
        &wait_condition(&env, "a", "ConfigValid", "True").await,
        "ConfigValid",
    );
    assert_eq!(ready, "True");
}

/// A spec the schema admits and the Deployment does not (a node-affinity operator `Bogus`): every
/// other child is applied, NetworkPolicies included, and the API server's message is in the
/// Degraded condition and in one Event.
#[tokio::test]
async fn one_refused_child_does_not_stop_the_others() {
    let env = env("isolate").await;
    let operator = Operator::start(&env);
    let mut spec = minimal_spec();
    json_merge(
        &mut spec,
        json!({"podTemplate": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "Bogus", "values": ["chat"]}]}]}}}}}),
    );
    create(&env, &chat_service("chat", spec)).await;
    let cr = wait_condition(&env, "chat", "Degraded", "True").await;
    let (_, reason, message) = condition_of(&cr, "Degraded");
    assert_eq!(reason, "ApplyFailed", "{message}");
    assert!(
        message.contains("Deployment \"chat\"") && message.contains("\"Bogus\""),
        "the API server's message names the child and the value: {message}"
    );
    assert_eq!(condition_of(&cr, "Ready").1, "ApplyFailed");

    for name in ["chat-redis", "chat-mongodb"] {
        let _: NetworkPolicy = until_exists(&env.api(), name, WAIT).await;
    }
    let _: Service = until_exists(&env.api(), "chat", WAIT).await;
    let _: ConfigMap = until_exists(&env.api(), "chat-config", WAIT).await;
    let _: Deployment = until_exists(&env.api(), "chat-redis", WAIT).await;
    let _: StatefulSet = until_exists(&env.api(), "chat-mongodb", WAIT).await;
    let deployments: Api<Deployment> = env.api();
    assert!(deployments.get_opt("chat").await.unwrap().is_none());

    // Several reconciles later, still one Warning Event with the message.
    wait_reconciles(&operator, 3).await;
    let events = events_about(&env, "chat", "Degraded").await;
    assert_eq!(events.len(), 1, "{events:#?}");
    let note = events[0].note.clone().unwrap_or_default();
    assert!(
        note.contains("Deployment \"chat\"") && note.contains("Bogus"),
        "{note}"
    );
    assert_eq!(events[0].type_.as_deref(), Some("Warning"));
}
