//! What a deleted ChatService leaves behind, against the rig's real API server and its
//! kube-controller-manager (whose StatefulSet controller creates the volume claims and whose
//! garbage collector deletes what a deleted owner owned): with
//! `history.mongodb.managed.retentionPolicy: Retain` (the default) the MongoDB volume claim and the
//! generated credentials Secret survive, and a ChatService re-created under the same name mounts
//! the same claim and logs in with the same password; with `Delete` both go with it.

mod support;

use std::collections::BTreeMap;

use chat_operator::crd::ChatService;
use chat_rig::wait::{until_exists, until_gone, until_object};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret};
use kube::api::DeleteParams;
use kube::{Api, ResourceExt};
use serde_json::json;
use support::chat_service::{chat_service, create, json_merge, minimal_spec, wait_condition};
use support::{Env, Operator, WAIT, env};

/// Deleting a ChatService means waiting for the garbage collector, which on two busy cores can
/// take a while after a burst of deletions.
const GC_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

fn spec(retention: Option<&str>) -> serde_json::Value {
    let mut spec = minimal_spec();
    if let Some(policy) = retention {
        json_merge(
            &mut spec,
            json!({"history": {"mongodb": {"managed": {"retentionPolicy": policy}}}}),
        );
    }
    spec
}

fn credentials(secret: &Secret) -> BTreeMap<String, Vec<u8>> {
    secret
        .data
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect()
}

/// The MongoDB password inside the connection URI the chat pods read.
async fn password_in_connection_uri(env: &Env, name: &str) -> String {
    let secret: Secret = until_exists(&env.api(), &format!("{name}-connection"), WAIT).await;
    let uri =
        String::from_utf8(credentials(&secret)[chat_operator::names::MONGODB_URI_KEY].clone())
            .unwrap();
    let userinfo = uri
        .strip_prefix("mongodb://")
        .and_then(|rest| rest.split_once('@'))
        .map(|(userinfo, _)| userinfo.to_string())
        .unwrap_or_else(|| panic!("no credentials in the connection URI {uri:?}"));
    userinfo.split_once(':').unwrap().1.to_string()
}

/// Creates ChatService `name`, waits for its StatefulSet, the claim its StatefulSet controller
/// makes and the credentials Secret, and returns (StatefulSet, claim, Secret).
async fn stack(
    env: &Env,
    name: &str,
    retention: Option<&str>,
) -> (StatefulSet, PersistentVolumeClaim, Secret) {
    create(env, &chat_service(name, spec(retention))).await;
    wait_condition(env, name, "ConfigValid", "True").await;
    let sts: StatefulSet = until_exists(&env.api(), &format!("{name}-mongodb"), WAIT).await;
    let claim: PersistentVolumeClaim =
        until_exists(&env.api(), &format!("data-{name}-mongodb-0"), WAIT).await;
    let secret: Secret =
        until_exists(&env.api(), &format!("{name}-mongodb-credentials"), WAIT).await;
    (sts, claim, secret)
}

fn when_deleted(sts: &StatefulSet) -> Option<String> {
    sts.spec
        .as_ref()?
        .persistent_volume_claim_retention_policy
        .as_ref()?
        .when_deleted
        .clone()
}

/// Deletes ChatService `name` and waits until the garbage collector has removed its StatefulSet.
async fn delete_and_collect(env: &Env, name: &str) {
    let chat_services: Api<ChatService> = env.api();
    chat_services
        .delete(name, &DeleteParams::default())
        .await
        .unwrap();
    until_gone(&chat_services, name, WAIT).await;
    until_gone(
        &env.api::<StatefulSet>(),
        &format!("{name}-mongodb"),
        GC_WAIT,
    )
    .await;
}

#[tokio::test]
async fn retained_data_keeps_its_credentials_across_delete_and_recreate() {
    let env = env("retain").await;
    let operator = Operator::start(&env);
    let (sts, claim, secret) = stack(&env, "keep", None).await;
    assert_eq!(when_deleted(&sts).as_deref(), Some("Retain"), "the default");
    assert!(
        secret.owner_references().is_empty(),
        "a Secret whose data is retained must have no owner, or the garbage collector takes it: {:?}",
        secret.owner_references()
    );
    assert!(
        claim
            .owner_references()
            .iter()
            .all(|o| o.kind != "StatefulSet"),
        "a retained claim is not owned by its StatefulSet: {:?}",
        claim.owner_references()
    );
    let before = credentials(&secret);
    let password = password_in_connection_uri(&env, "keep").await;
    assert_eq!(password.as_bytes(), before["password"].as_slice());

    delete_and_collect(&env, "keep").await;
    // The garbage collector has acted (the StatefulSet is gone); what it left is the data and
    // the key to it.
    let claims: Api<PersistentVolumeClaim> = env.api();
    let kept_claim = claims
        .get_opt("data-keep-mongodb-0")
        .await
        .unwrap()
        .expect("the retained claim survives the ChatService");
    assert_eq!(kept_claim.uid(), claim.uid(), "the same claim");
    let secrets: Api<Secret> = env.api();
    let kept = secrets
        .get_opt("keep-mongodb-credentials")
        .await
        .unwrap()
        .expect("the credentials Secret survives with the data");
    assert_eq!(credentials(&kept), before);

    // Re-created under the same name: the old claim and the old password, not a new one.
    let (sts, claim_again, secret_again) = stack(&env, "keep", None).await;
    assert_eq!(when_deleted(&sts).as_deref(), Some("Retain"));
    assert_eq!(
        claim_again.uid(),
        claim.uid(),
        "the new StatefulSet mounts the old claim"
    );
    assert_eq!(
        secret_again.uid(),
        secret.uid(),
        "the Secret was reused, not re-made"
    );
    assert_eq!(
        credentials(&secret_again),
        before,
        "the password is unchanged"
    );
    assert_eq!(password_in_connection_uri(&env, "keep").await, password);
    let cr = wait_condition(&env, "keep", "ConfigValid", "True").await;
    let valid = cr.status.unwrap().conditions;
    assert!(
        valid
            .iter()
            .all(|c| c.type_ != "ConfigValid" || c.reason != "NameConflict"),
        "{valid:#?}"
    );
    operator.stop().await;
}

#[tokio::test]
async fn deleted_data_takes_its_credentials_along() {
    let env = env("purge").await;
    let operator = Operator::start(&env);
    let (sts, claim, secret) = stack(&env, "gone", Some("Delete")).await;
    assert_eq!(when_deleted(&sts).as_deref(), Some("Delete"));
    let cr: ChatService = env.api().get("gone").await.unwrap();
    assert!(
        secret
            .owner_references()
            .iter()
            .any(|o| o.uid == cr.uid().unwrap() && o.controller == Some(true)),
        "the Secret goes with the ChatService: {:?}",
        secret.owner_references()
    );
    // The StatefulSet controller hands the claim to the StatefulSet, so that the garbage
    // collector deletes it with it.
    let claims: Api<PersistentVolumeClaim> = env.api();
    until_object(
        &claims,
        "data-gone-mongodb-0",
        "to be owned by its StatefulSet",
        WAIT,
        |c| {
            c.owner_references()
                .iter()
                .any(|o| o.kind == "StatefulSet" && Some(&o.uid) == sts.uid().as_ref())
                .then_some(())
        },
    )
    .await;
    let before = credentials(&secret);

    delete_and_collect(&env, "gone").await;
    until_gone(&claims, "data-gone-mongodb-0", GC_WAIT).await;
    until_gone(&env.api::<Secret>(), "gone-mongodb-credentials", GC_WAIT).await;

    // Re-created: a fresh volume and fresh credentials (nothing old is left that they must open).
    let (_, claim_again, secret_again) = stack(&env, "gone", Some("Delete")).await;
    assert_ne!(claim_again.uid(), claim.uid());
    assert_ne!(credentials(&secret_again)["password"], before["password"]);
    operator.stop().await;
}

/// Changing the policy of a running ChatService moves only the Secret's owner reference: its
/// password stays, whichever way.
#[tokio::test]
async fn changing_the_policy_re_owns_the_secret_and_keeps_the_password() {
    let env = env("repolicy").await;
    let operator = Operator::start(&env);
    let (_, _, secret) = stack(&env, "flip", Some("Delete")).await;
    let before = credentials(&secret);
    let secrets: Api<Secret> = env.api();
    support::chat_service::merge_spec(
        &env,
        "flip",
        json!({"history": {"mongodb": {"managed": {"retentionPolicy": "Retain"}}}}),
    )
    .await;
    let unowned = until_object(
        &secrets,
        "flip-mongodb-credentials",
        "to lose its owner",
        WAIT,
        |s| s.owner_references().is_empty().then(|| s.clone()),
    )
    .await;
    assert_eq!(credentials(&unowned), before);
    let sts: StatefulSet = until_object(
        &env.api(),
        "flip-mongodb",
        "to retain its claims",
        WAIT,
        |s: &StatefulSet| (when_deleted(s).as_deref() == Some("Retain")).then(|| s.clone()),
    )
    .await;
    drop(sts);
    support::chat_service::merge_spec(
        &env,
        "flip",
        json!({"history": {"mongodb": {"managed": {"retentionPolicy": "Delete"}}}}),
    )
    .await;
    let owned = until_object(
        &secrets,
        "flip-mongodb-credentials",
        "to be owned again",
        WAIT,
        |s| (!s.owner_references().is_empty()).then(|| s.clone()),
    )
    .await;
    assert_eq!(credentials(&owned), before);
    operator.stop().await;
}
