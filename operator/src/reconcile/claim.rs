//! Claim: before a child is first applied (or a credentials Secret first created), make sure no
//! object of that kind and name exists that this ChatService does not control. Server-side apply
//! with `force` would otherwise take it over: a user's Service would get our selector, another
//! ChatService's child (ChatService `a-redis`'s chat Service is ChatService `a`'s Redis Service)
//! would be fought over on every reconcile. A conflict is the user's to resolve, so it becomes
//! `ConfigValid=False` with reason `NameConflict`, naming the object, and nothing is applied.
//!
//! Objects the watch cache shows as controlled by this ChatService need no request; only names
//! the cache does not hold are read, which happens on the first build and while a conflict lasts.

use kube::api::DynamicObject;
use kube::{Api, Client, ResourceExt};
use serde_json::Value;

use crate::build::{self, BuildError};
use crate::children::{ChildKind, ChildStores};
use crate::error::ClaimError;
use crate::validated::{ConfigProblem, ValidatedChatService};

/// Every name the ChatService will create: its children, as built before provisioning (their
/// names do not depend on the credentials), and the generated credentials Secrets.
pub fn names_to_claim(cs: &ValidatedChatService) -> Result<Vec<(ChildKind, String)>, BuildError> {
    let children = build::desired_children(cs)?.objects.into_iter();
    let mut names: Vec<_> = children.map(|object| (object.kind, object.name)).collect();
    let secrets = cs.generated_secrets().into_iter();
    names.extend(secrets.map(|name| (ChildKind::Secret, name)));
    Ok(names)
}

/// Who controls an object, as its controller ownerReference says.
fn controller(owner_references: Option<&Value>) -> Option<(String, String, String)> {
    owner_references?
        .as_array()?
        .iter()
        .find(|o| o.get("controller").and_then(Value::as_bool) == Some(true))
        .map(|o| {
            let text = |key: &str| o.get(key).and_then(Value::as_str).unwrap_or("").to_string();
            (text("kind"), text("name"), text("uid"))
        })
}

fn conflict(kind: ChildKind, name: &str, owner: Option<(String, String, String)>) -> ConfigProblem {
    let held_by = match owner {
        Some((owner_kind, owner_name, _)) => format!("it belongs to {owner_kind} {owner_name:?}"),
        None => "it was not made by this ChatService".into(),
    };
    ConfigProblem {
        reason: "NameConflict",
        message: format!(
            "{kind:?} {name:?} already exists and {held_by}; the operator does not take it over. Rename or delete it, or rename this ChatService."
        ),
    }
}

/// The objects among `wanted` that exist in `namespace` without being controlled by the owner
/// with `uid`, as `NameConflict` problems.
pub async fn foreign_objects(
    client: &Client,
    namespace: &str,
    uid: &str,
    wanted: Vec<(ChildKind, String)>,
    stores: &ChildStores,
) -> Result<Vec<ConfigProblem>, ClaimError> {
    let mut problems = Vec::new();
    for (kind, name) in wanted {
        let owner = match stores.value(kind, namespace, &name) {
            Some(cached) => controller(cached.pointer("/metadata/ownerReferences")),
            None => {
                let api: Api<DynamicObject> =
                    Api::namespaced_with(client.clone(), namespace, &kind.api_resource());
                let live = api.get_opt(&name).await.map_err(|source| ClaimError {
                    kind,
                    name: name.clone(),
                    source,
                })?;
                let Some(live) = live else { continue };
                let references = serde_json::to_value(live.owner_references()).ok();
                controller(references.as_ref())
            }
        };
        if owner
            .as_ref()
            .is_none_or(|(_, _, owner_uid)| owner_uid != uid)
        {
            problems.push(conflict(kind, &name, owner));
        }
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_controller_reference_is_the_owner() {
        let references = json!([
            {"kind": "Other", "name": "x", "uid": "1"},
            {"kind": "ChatService", "name": "a", "uid": "2", "controller": true}
        ]);
        assert_eq!(
            controller(Some(&references)),
            Some(("ChatService".into(), "a".into(), "2".into()))
        );
        assert_eq!(controller(None), None);
    }

    #[test]
    fn a_conflict_names_the_object_and_its_owner() {
        let problem = conflict(
            ChildKind::Service,
            "a-redis",
            Some(("ChatService".into(), "a-redis".into(), "9".into())),
        );
        assert_eq!(problem.reason, "NameConflict");
        assert!(
            problem.message.starts_with(
                "Service \"a-redis\" already exists and it belongs to ChatService \"a-redis\""
            ),
            "{}",
            problem.message
        );
    }
}
