//! What actually changed: a fingerprint of every ChatService of the run and every child the
//! operator manages, taken before and after a window, and the difference by kind.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use chat_operator::build::{self, ChildKind, LABEL_MANAGED_BY, MANAGED_BY};
use chat_operator::crd::ChatService;
use kube::api::{Api, DynamicObject, ListParams, ObjectMeta};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use crate::RUN_LABEL;

#[derive(Debug, Clone, PartialEq)]
pub struct Fingerprint {
    pub resource_version: String,
    /// metadata.generation plus the operator's managedFields entries (fields and time): changes
    /// only when the operator changed something it owns. A workload's resourceVersion also moves
    /// when kube-controller-manager writes its status, which is not the operator's doing.
    pub operator_owned: String,
}

pub type Snapshot = BTreeMap<(String, String, String), Fingerprint>;

fn fingerprint(meta: &ObjectMeta) -> Fingerprint {
    let ours = meta
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.manager.as_deref() == Some(build::FIELD_MANAGER))
        .map(|m| serde_json::to_string(m).unwrap_or_default())
        .collect::<Vec<_>>()
        .join(";");
    Fingerprint {
        resource_version: meta.resource_version.clone().unwrap_or_default(),
        operator_owned: format!("{:?}|{ours}", meta.generation),
    }
}

pub async fn snapshot(
    admin: &Client,
    run: &str,
    namespaces: &BTreeSet<String>,
) -> Result<Snapshot> {
    let mut out = Snapshot::new();
    let crs = Api::<ChatService>::all(admin.clone())
        .list(&ListParams::default().labels(&format!("{RUN_LABEL}={run}")))
        .await?;
    for cr in crs {
        out.insert(
            (
                "ChatService".into(),
                cr.namespace().unwrap_or_default(),
                cr.name_any(),
            ),
            fingerprint(&cr.metadata),
        );
    }
    let owned = ListParams::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGED_BY}"));
    for kind in ChildKind::ALL {
        let api: Api<DynamicObject> = Api::all_with(admin.clone(), &kind.api_resource());
        for object in api.list_metadata(&owned).await? {
            let namespace = object.namespace().unwrap_or_default();
            if namespaces.contains(&namespace) {
                out.insert(
                    (format!("{kind:?}"), namespace, object.name_any()),
                    fingerprint(&object.metadata),
                );
            }
        }
    }
    Ok(out)
}

#[derive(Default)]
pub struct Changes {
    pub objects: usize,
    /// kind -> (objects with a new resourceVersion, of which the operator's own fields changed)
    pub by_kind: BTreeMap<String, (usize, usize)>,
}

impl Changes {
    pub fn of(before: &Snapshot, after: &Snapshot) -> Self {
        let mut out = Changes {
            objects: after.len(),
            ..Default::default()
        };
        for (key, new) in after {
            let entry = out.by_kind.entry(key.0.clone()).or_default();
            match before.get(key) {
                Some(old) if old == new => {}
                Some(old) => {
                    if old.resource_version != new.resource_version {
                        entry.0 += 1;
                    }
                    if old.operator_owned != new.operator_owned {
                        entry.1 += 1;
                    }
                }
                // Created in the window.
                None => {
                    entry.0 += 1;
                    entry.1 += 1;
                }
            }
        }
        // Deleted in the window.
        for key in before.keys().filter(|k| !after.contains_key(*k)) {
            let entry = out.by_kind.entry(key.0.clone()).or_default();
            entry.0 += 1;
            entry.1 += 1;
        }
        out
    }
    pub fn rv_changed(&self) -> usize {
        self.by_kind.values().map(|c| c.0).sum()
    }
    pub fn operator_changed(&self) -> usize {
        self.by_kind.values().map(|c| c.1).sum()
    }
    pub fn json(&self) -> Value {
        json!({
            "objects": self.objects,
            "resource_version_changed": self.rv_changed(),
            "operator_fields_changed": self.operator_changed(),
            "by_kind": self.by_kind.iter()
                .filter(|(_, c)| c.0 + c.1 > 0)
                .map(|(k, c)| (k.clone(), json!({"resource_version_changed": c.0, "operator_fields_changed": c.1})))
                .collect::<serde_json::Map<_, _>>(),
        })
    }
    pub fn summary(&self) -> String {
        let kinds = self
            .by_kind
            .iter()
            .filter(|(_, c)| c.0 > 0)
            .map(|(k, c)| format!("{k} {}", c.0))
            .collect::<Vec<_>>()
            .join(", ");
        if kinds.is_empty() {
            format!("0 of {}", self.objects)
        } else {
            format!("{} of {} ({kinds})", self.rv_changed(), self.objects)
        }
    }
}
