//! Apply: server-side apply of the desired children with one field manager, and pruning of
//! children the spec no longer asks for.
//!
//! ## Skipping applies that would change nothing
//!
//! A no-op server-side apply writes nothing to etcd, but it is still a write request: the API
//! server decodes it, runs admission, merges managed fields and compares. On a full resync of 500
//! ChatServices that was 6,000 requests. So each child is compared with the operator's watch
//! cache ([`crate::cache`]) first, and applied only when the comparison fails:
//!
//! 1. Every applied manifest carries the annotation [`SPEC_HASH_ANNOTATION`], a hash of the
//!    manifest without it. An equal hash on the cached object means the last successful apply
//!    (by this operator process or an earlier one: it survives restarts) was of exactly this
//!    manifest, so the set of fields the operator owns is exactly the set in the manifest. When
//!    the spec changes, the hash changes and the object is applied, which also releases fields
//!    the new manifest leaves out (e.g. `spec.replicas` when autoscaling is turned on).
//! 2. Every value in the manifest (the annotation included) must be present and equal in the
//!    cached object ([`first_difference`]). Someone who edits or removes a field the operator
//!    sets, by any means (kubectl edit, a merge patch, another field manager's forced apply), makes
//!    the values differ, and the next reconcile re-applies with `force`, which reverts it.
//!
//! Tradeoffs, chosen knowingly:
//! * Values, not ownership, are compared. Another manager that applies the *same* value to one
//!   of our fields becomes a co-owner unnoticed; that is harmless (nothing differs), and when the
//!   operator's value changes, its forced apply takes the field back.
//! * The comparison is of the cached (watch) copy, not of a fresh GET. A change is seen once its
//!   watch event arrives, and that event also triggers the reconcile, so drift is corrected at
//!   watch latency rather than at the next resync. A cache that lags *our* apply only costs one
//!   redundant (no-op) apply.
//! * Values the API server normalises (a quantity written as `0.5` comes back as `500m`) or
//!   fills in for an empty list/map are compared literally, except that an empty desired map,
//!   list or string matches an absent field. A manifest that the server rewrites is re-applied
//!   on every reconcile: correct, only not free. The builders write canonical values, and the
//!   API-server tests assert zero writes for the full set of kinds.
//! * The resourceVersion the apply returned is not remembered and compared: it moves whenever
//!   kube-controller-manager writes a workload's status, which would re-apply Deployments and
//!   StatefulSets for nothing, and it would not survive a restart.

use std::collections::BTreeMap;

use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams, PropagationPolicy};
use kube::{Api, Client, ResourceExt};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::build::DesiredChildren;
use crate::children::{ChildKind, ChildStores};
use crate::error::ApplyError;
use crate::names::FIELD_MANAGER;

/// Hash of the manifest the operator last applied to a child (see the module docs).
pub const SPEC_HASH_ANNOTATION: &str = "chatoperator.dev/spec-hash";

/// Applied objects as the API server returned them, keyed by kind and name.
pub type Applied = BTreeMap<(ChildKind, String), DynamicObject>;

fn dynamic_api(client: &Client, namespace: &str, kind: ChildKind) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), namespace, &kind.api_resource())
}

/// Field manager that keeps a Deployment's replica count while the operator lets go of it.
pub const REPLICAS_HANDOVER_MANAGER: &str = "chat-operator-replicas-handover";

/// When autoscaling is turned on, the operator's apply stops carrying `spec.replicas`. Were the
/// operator still its only owner, the API server would drop the field and default it to 1,
/// scaling a busy Deployment down until the HPA reacts. So a second manager first applies the
/// current count (server-side apply's documented way to transfer a field), and only then does
/// the operator's apply leave it out.
async fn hand_over_replicas(api: &Api<DynamicObject>, name: &str) -> kube::Result<()> {
    let Some(live) = api.get_opt(name).await? else {
        return Ok(());
    };
    let operator_owns_replicas = live.managed_fields().iter().any(|entry| {
        entry.manager.as_deref() == Some(FIELD_MANAGER)
            && entry
                .fields_v1
                .as_ref()
                .is_some_and(|fields| fields.0.pointer("/f:spec/f:replicas").is_some())
    });
    let Some(replicas) = live.data.pointer("/spec/replicas").cloned() else {
        return Ok(());
    };
    if !operator_owns_replicas {
        return Ok(());
    }
    let keep = serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"replicas": replicas},
    });
    api.patch(
        name,
        &PatchParams::apply(REPLICAS_HANDOVER_MANAGER).force(),
        &Patch::Apply(&keep),
    )
    .await?;
    tracing::info!(deployment = %name, %replicas, "spec.replicas handed over for the HPA");
    Ok(())
}

/// `manifest` with [`SPEC_HASH_ANNOTATION`] set to the hash of `manifest`.
pub fn with_spec_hash(manifest: &Value) -> Value {
    let bytes = serde_json::to_vec(manifest).unwrap_or_default();
    let hash = hex::encode(&Sha256::digest(&bytes)[..12]);
    let mut out = manifest.clone();
    if let Some(meta) = out.get_mut("metadata").and_then(Value::as_object_mut) {
        let annotations = meta
            .entry("annotations")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(annotations) = annotations.as_object_mut() {
            annotations.insert(SPEC_HASH_ANNOTATION.into(), Value::String(hash));
        }
    }
    out
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Object(map) => map.is_empty(),
        Value::Array(items) => items.is_empty(),
        Value::String(text) => text.is_empty(),
        _ => false,
    }
}

/// The path of the first value in `desired` that `live` does not have (equal), or `None` when
/// `live` contains all of `desired`. Maps may have more keys in `live` (defaults, other
/// managers' fields); lists must have the same length and contain the desired items in order.
/// An empty desired map, list or string matches an absent field, which is how the API server
/// stores it.
pub fn first_difference(live: Option<&Value>, desired: &Value) -> Option<String> {
    fn walk(live: Option<&Value>, desired: &Value, path: &mut String) -> bool {
        match (desired, live) {
            (_, None) | (_, Some(Value::Null)) => is_empty(desired),
            (Value::Object(want), Some(Value::Object(have))) => want.iter().all(|(key, value)| {
                let len = path.len();
                path.push('.');
                path.push_str(key);
                let same = walk(have.get(key), value, path);
                if same {
                    path.truncate(len);
                }
                same
            }),
            (Value::Array(want), Some(Value::Array(have))) => {
                if want.len() != have.len() {
                    path.push_str(&format!(" (length {} != {})", have.len(), want.len()));
                    return false;
                }
                want.iter().zip(have).enumerate().all(|(i, (value, item))| {
                    let len = path.len();
                    path.push_str(&format!("[{i}]"));
                    let same = walk(Some(item), value, path);
                    if same {
                        path.truncate(len);
                    }
                    same
                })
            }
            (want, Some(have)) => want == have,
        }
    }
    let mut path = String::new();
    (!walk(live, desired, &mut path)).then(|| {
        if path.is_empty() {
            "(object)".into()
        } else {
            path
        }
    })
}

/// The wave a child kind is applied in: everything a later wave reads or targets is applied
/// in an earlier one (the NetworkPolicies that fence the store pods, the ServiceAccount,
/// Secrets and ConfigMap the workloads mount before the workloads; the Deployment before the
/// HPA that scales it). The children of one wave are applied concurrently.
fn wave(kind: ChildKind) -> u8 {
    match kind {
        ChildKind::NetworkPolicy
        | ChildKind::ServiceAccount
        | ChildKind::Secret
        | ChildKind::ConfigMap => 0,
        ChildKind::Service
        | ChildKind::StatefulSet
        | ChildKind::Deployment
        | ChildKind::PodDisruptionBudget
        | ChildKind::Ingress => 1,
        ChildKind::HorizontalPodAutoscaler => 2,
    }
}

/// Applies the desired objects that the watch cache does not already show as applied and
/// unchanged (see the module docs), wave by wave ([`wave`]), the children of a wave at once.
/// Returns the objects it applied and the errors of those it could not: one child the API
/// server refuses does not keep the others from being applied.
pub async fn apply_children(
    client: &Client,
    namespace: &str,
    desired: &DesiredChildren,
    stores: &ChildStores,
) -> (Applied, Vec<ApplyError>) {
    let mut applied = Applied::new();
    let mut failures = Vec::new();
    let mut ordered: Vec<&crate::build::DesiredObject> = desired.objects.iter().collect();
    // A stable sort: by wave, the builders' order within one.
    ordered.sort_by_key(|object| wave(object.kind));
    for group in ordered.chunk_by(|a, b| wave(a.kind) == wave(b.kind)) {
        let results = futures::future::join_all(
            group
                .iter()
                .map(|object| apply_child(client, namespace, object, stores)),
        )
        .await;
        for (object, result) in group.iter().zip(results) {
            match result {
                Ok(Some(result)) => {
                    applied.insert((object.kind, object.name.clone()), result);
                }
                Ok(None) => {}
                Err(error) => failures.push(error),
            }
        }
    }
    (applied, failures)
}

/// Applies one child unless the cache shows it applied and unchanged; the API server's copy
/// when it was applied.
async fn apply_child(
    client: &Client,
    namespace: &str,
    object: &crate::build::DesiredObject,
    stores: &ChildStores,
) -> Result<Option<DynamicObject>, ApplyError> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    {
        let manifest = with_spec_hash(&object.manifest);
        let live = stores.value(object.kind, namespace, &object.name);
        let Some(difference) = first_difference(live.as_ref(), &manifest) else {
            return Ok(None);
        };
        tracing::debug!(kind = ?object.kind, name = %object.name, %difference, "applying");
        let api = dynamic_api(client, namespace, object.kind);
        if object.kind == ChildKind::Deployment && manifest.pointer("/spec/replicas").is_none() {
            hand_over_replicas(&api, &object.name)
                .await
                .map_err(|source| ApplyError::HandOverReplicas {
                    name: object.name.clone(),
                    source,
                })?;
        }
        let result = api
            .patch(&object.name, &params, &Patch::Apply(&manifest))
            .await
            .map_err(|source| ApplyError::Apply {
                kind: object.kind,
                name: object.name.clone(),
                source,
            })?;
        Ok(Some(result))
    }
}

/// Deletes children of the owner with `uid` in `namespace` that are not desired any more, found
/// in the watch cache (no LIST). Only objects whose controller reference is this ChatService are
/// candidates (the cache holds only objects with the operator's managed-by label), so user
/// objects are safe.
pub async fn prune_children(
    client: &Client,
    namespace: &str,
    uid: &str,
    desired: &DesiredChildren,
    stores: &ChildStores,
) -> Result<Vec<String>, ApplyError> {
    let keep = desired.keep();
    let mut pruned = Vec::new();
    for kind in ChildKind::ALL {
        for name in stores.controlled_by(kind, namespace, uid) {
            if keep.contains(&(kind, name.clone())) {
                continue;
            }
            let params = DeleteParams {
                propagation_policy: Some(PropagationPolicy::Background),
                ..Default::default()
            };
            match dynamic_api(client, namespace, kind)
                .delete(&name, &params)
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(source) => return Err(ApplyError::Prune { kind, name, source }),
            }
            pruned.push(format!("{kind:?}/{name}"));
        }
    }
    Ok(pruned)
}

/// Logs what the apply and prune steps changed, if anything.
pub fn log_changes(applied: &Applied, pruned: &[String]) {
    if !applied.is_empty() || !pruned.is_empty() {
        let applied: Vec<_> = applied.keys().map(|(k, n)| format!("{k:?}/{n}")).collect();
        tracing::info!(?applied, ?pruned, "children changed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn live_objects_with_defaults_contain_the_manifest() {
        let desired = json!({"metadata": {"name": "a", "labels": {}}, "spec": {"ports": [{"name": "http", "port": 80}]}});
        let live = json!({"metadata": {"name": "a", "uid": "u"},
            "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}], "clusterIP": "10.0.0.1"}});
        assert_eq!(first_difference(Some(&live), &desired), None);
    }

    #[test]
    fn edited_removed_and_extra_items_are_differences() {
        let desired = json!({"spec": {"image": "a", "ports": [{"port": 80}]}});
        let edited = json!({"spec": {"image": "evil", "ports": [{"port": 80}]}});
        assert_eq!(
            first_difference(Some(&edited), &desired).as_deref(),
            Some(".spec.image")
        );
        let removed = json!({"spec": {"ports": [{"port": 80}]}});
        assert!(first_difference(Some(&removed), &desired).is_some());
        let extra = json!({"spec": {"image": "a", "ports": [{"port": 80}, {"port": 81}]}});
        assert!(first_difference(Some(&extra), &desired).is_some());
        assert_eq!(
            first_difference(None, &desired).as_deref(),
            Some("(object)")
        );
    }

    #[test]
    fn what_a_child_reads_or_targets_is_applied_in_an_earlier_wave() {
        assert!(wave(ChildKind::NetworkPolicy) < wave(ChildKind::StatefulSet));
        assert!(wave(ChildKind::Secret) < wave(ChildKind::Deployment));
        assert!(wave(ChildKind::ConfigMap) < wave(ChildKind::Deployment));
        assert!(wave(ChildKind::ServiceAccount) < wave(ChildKind::StatefulSet));
        assert!(wave(ChildKind::Deployment) < wave(ChildKind::HorizontalPodAutoscaler));
    }

    #[test]
    fn the_spec_hash_follows_the_manifest() {
        let a = with_spec_hash(&json!({"metadata": {"name": "a"}, "data": {"k": "1"}}));
        let same = with_spec_hash(&json!({"metadata": {"name": "a"}, "data": {"k": "1"}}));
        let other = with_spec_hash(&json!({"metadata": {"name": "a"}, "data": {"k": "2"}}));
        let hash = |v: &Value| v["metadata"]["annotations"][SPEC_HASH_ANNOTATION].clone();
        assert!(hash(&a).is_string());
        assert_eq!(hash(&a), hash(&same));
        assert_ne!(hash(&a), hash(&other));
        // A cached copy of the old manifest does not contain the new one.
        assert!(first_difference(Some(&a), &other).is_some());
    }
}
