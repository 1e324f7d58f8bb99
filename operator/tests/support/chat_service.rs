//! ChatService objects for the tests: written as JSON like a user writes them, created and
//! patched on the rig with the admin's client, and read back (conditions, the config checksum the
//! operator puts on the Deployment).

use chat_operator::crd::ChatService;
use chat_rig::wait;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
use serde_json::json;

use super::{Env, WAIT};

/// The manifest a user writes: name and spec, nothing else.
fn manifest(name: &str, spec: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "chatoperator.dev/v1alpha1",
        "kind": "ChatService",
        "metadata": {"name": name},
        "spec": spec,
    })
}

/// A typed ChatService (the client may fill defaults in).
pub fn chat_service(name: &str, spec: serde_json::Value) -> ChatService {
    serde_json::from_value(manifest(name, spec)).unwrap()
}

pub fn minimal_spec() -> serde_json::Value {
    json!({
        "backends": [{"name": "vllm", "url": "http://vllm.ml:8000", "protocol": "openai"}],
        "models": {"default": "gemma3:270m"},
        "history": {"redis": {"managed": {}}, "mongodb": {"managed": {}}},
    })
}

/// A ChatService as untyped JSON, exactly as written (no client-side defaults or checks).
pub fn raw_chat_service(name: &str, spec: serde_json::Value) -> DynamicObject {
    serde_json::from_value(manifest(name, spec)).unwrap()
}

pub async fn create(env: &Env, cr: &ChatService) {
    Api::<ChatService>::namespaced(env.admin.clone(), &env.ns)
        .create(&PostParams::default(), cr)
        .await
        .unwrap();
}

pub async fn merge_spec(env: &Env, name: &str, patch: serde_json::Value) {
    Api::<ChatService>::namespaced(env.admin.clone(), &env.ns)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": patch })),
        )
        .await
        .unwrap();
}

/// RFC 7386 merge patch of JSON values (a `null` removes the key): how the tests vary a spec.
pub fn json_merge(target: &mut serde_json::Value, patch: serde_json::Value) {
    match (target, patch) {
        (serde_json::Value::Object(t), serde_json::Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(&k);
                } else {
                    json_merge(t.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
        }
        (t, p) => *t = p,
    }
}

/// The config checksum on the Deployment's pod template: it changes exactly when the rendered
/// config does, which rolls the pods.
pub fn checksum(d: &Deployment) -> String {
    d.spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .as_ref()
        .unwrap()["chatoperator.dev/config-checksum"]
        .clone()
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

/// Waits until condition `type_` of `name` has `status`; on timeout the panic shows every
/// condition and the Events about it.
pub async fn wait_condition(env: &Env, name: &str, type_: &str, status: &str) -> ChatService {
    let api: Api<ChatService> = env.api();
    wait::until_object(
        &api,
        name,
        &format!("to report {type_}={status}"),
        WAIT,
        |cr| (condition(cr, type_)?.0 == status).then(|| cr.clone()),
    )
    .await
}

/// Creates each `(what, spec, field)` case as ChatService `bad` and returns what went wrong: a
/// case passes when the API server answers 422 with a cause at `field` (`<field>: ` is how it
/// prefixes one; a bare substring would let "spec" match any message). Every case is tried.
pub async fn rejection_failures(
    api: &Api<DynamicObject>,
    cases: Vec<(&str, serde_json::Value, &str)>,
) -> Vec<String> {
    let mut failures = Vec::new();
    for (what, spec, field) in cases {
        let cr = raw_chat_service("bad", spec);
        match api.create(&PostParams::default(), &cr).await {
            Ok(_) => {
                failures.push(format!("{what}: accepted"));
                let _ = api.delete("bad", &Default::default()).await;
            }
            Err(kube::Error::Api(status)) if status.code != 422 => failures.push(format!(
                "{what}: code {} instead of 422: {}",
                status.code, status.message
            )),
            Err(kube::Error::Api(status)) if !status.message.contains(&format!("{field}: ")) => {
                failures.push(format!(
                    "{what}: message does not name {field}: {}",
                    status.message
                ))
            }
            Err(kube::Error::Api(_)) => {}
            Err(error) => failures.push(format!("{what}: unexpected error {error}")),
        }
    }
    failures
}
