//! Claim: before a child is first applied (or a credentials Secret first created), make sure no
//! object of that kind and name exists that this ChatService does not control. Server-side apply
//! with `force` would otherwise take it over: a user's Service would get our selector, another
//! ChatService's child (ChatService `a-redis`'s chat Service is ChatService `a`'s Redis Service)
//! would be fought over on every reconcile. A conflict is the user's to resolve, so it becomes
//! `ConfigValid=False` with reason `NameConflict`, naming the object, and nothing is applied.
//!
//! Objects the watch cache shows as controlled by this ChatService need no request; only names
//! the cache does not hold are read, which happens on the first build and while a conflict lasts.
//!
//! One kind of object without a controller is ours to take: a generated credentials Secret left
//! behind by a deleted ChatService of the same name whose data was retained (it carries the
//! operator's labels naming that ChatService). Re-using it is what lets the re-created
//! ChatService open the retained data; anyone who could plant such a Secret can write any Secret
//! of the namespace anyway.

use kube::api::DynamicObject;
use kube::{Api, Client};
use serde_json::Value;

use crate::build::{self, BuildError};
use crate::children::{ChildKind, ChildStores};
use crate::error::ClaimError;
use crate::names::{LABEL_CHATSERVICE, LABEL_MANAGED_BY, MANAGED_BY};
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

/// Whether `labels` (an object's `metadata.labels`) mark it as made by the operator for the
/// ChatService `name`.
fn labelled_for(labels: Option<&Value>, name: &str) -> bool {
    let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
    label(LABEL_MANAGED_BY) == Some(MANAGED_BY) && label(LABEL_CHATSERVICE) == Some(name)
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

/// The objects among `wanted` that exist in the namespace of `cs` without being controlled by
/// it, as `NameConflict` problems; a retained credentials Secret of its name is not one.
pub async fn foreign_objects(
    client: &Client,
    cs: &ValidatedChatService,
    wanted: Vec<(ChildKind, String)>,
    stores: &ChildStores,
) -> Result<Vec<ConfigProblem>, ClaimError> {
    let namespace = cs.namespace.as_str();
    let generated = cs.generated_secrets();
    let mut problems = Vec::new();
    // The names not in the cache are asked for all at once (on a first reconcile, all of them).
    let lookups = wanted.into_iter().map(|(kind, name)| async move {
        let metadata = match stores.value(kind, namespace, &name) {
            Some(cached) => cached.get("metadata").cloned().unwrap_or_default(),
            None => {
                let api: Api<DynamicObject> =
                    Api::namespaced_with(client.clone(), namespace, &kind.api_resource());
                let live = api.get_opt(&name).await.map_err(|source| ClaimError {
                    kind,
                    name: name.clone(),
                    source,
                })?;
                let Some(live) = live else {
                    return Ok(None);
                };
                serde_json::to_value(&live.metadata).unwrap_or_default()
            }
        };
        Ok::<_, ClaimError>(Some((kind, name, metadata)))
    });
    let found = futures::future::try_join_all(lookups).await?;
    for (kind, name, metadata) in found.into_iter().flatten() {
        let owner = controller(metadata.get("ownerReferences"));
        let retained = owner.is_none()
            && kind == ChildKind::Secret
            && generated.contains(&name)
            && labelled_for(metadata.get("labels"), &cs.name);
        let ours = owner
            .as_ref()
            .is_some_and(|(_, _, owner_uid)| *owner_uid == cs.owner.uid);
        if !ours && !retained {
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
    fn only_the_operators_labels_for_this_name_mark_a_retained_secret() {
        let ours = json!({"app.kubernetes.io/managed-by": "chat-operator", "chatoperator.dev/chatservice": "a"});
        assert!(labelled_for(Some(&ours), "a"));
        assert!(!labelled_for(Some(&ours), "b"));
        let users = json!({"chatoperator.dev/chatservice": "a"});
        assert!(!labelled_for(Some(&users), "a"));
        assert!(!labelled_for(None, "a"));
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
