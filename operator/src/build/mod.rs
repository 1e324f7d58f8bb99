//! Build: the desired children of a ChatService, as pure functions of the
//! [`ValidatedChatService`] alone. No client and no raw resource in here, so every decision is
//! unit-tested from YAML fixtures.

pub mod chat;
pub mod config_map;
pub mod connection;
pub mod exposure;
pub mod meta;
pub mod mongodb;
pub mod network;
pub mod ollama;
pub mod redis;
pub mod scaling;

use std::collections::BTreeSet;

use kube::core::Resource;
use serde::Serialize;

// The public paths of these predate the split of names and child kinds out of this module.
pub use crate::children::ChildKind;
use crate::layout::{MONGODB_PORT, OLLAMA_PORT, REDIS_PORT};
use crate::names::Component;
pub use crate::names::{FIELD_MANAGER, LABEL_MANAGED_BY, MANAGED_BY};
use crate::validated::{Mongodb, Redis, ValidatedChatService};

/// A child that could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot serialize {kind:?} {name:?}: {source}")]
    Serialize {
        kind: ChildKind,
        name: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot render the chat-service config: {0}")]
    RenderConfig(#[source] serde_yaml::Error),
}

/// One object to server-side apply.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredObject {
    pub kind: ChildKind,
    pub name: String,
    pub manifest: serde_json::Value,
}

impl DesiredObject {
    pub fn new<K: Resource<DynamicType = ()> + Serialize>(
        kind: ChildKind,
        object: &K,
    ) -> Result<Self, BuildError> {
        let name = object.meta().name.clone().unwrap_or_default();
        let manifest = serde_json::to_value(object).map_err(|source| BuildError::Serialize {
            kind,
            name: name.clone(),
            source,
        })?;
        Ok(Self {
            kind,
            name,
            manifest,
        })
    }
}

/// Everything one ChatService should have, in apply order. Generated credential Secrets are not
/// in here (they are created once, never applied) but are listed in `create_once` so that pruning
/// keeps them.
#[derive(Debug, Clone, Default)]
pub struct DesiredChildren {
    pub objects: Vec<DesiredObject>,
    pub create_once: Vec<(ChildKind, String)>,
}

impl DesiredChildren {
    pub fn push<K: Resource<DynamicType = ()> + Serialize>(
        &mut self,
        kind: ChildKind,
        object: &K,
    ) -> Result<(), BuildError> {
        self.objects.push(DesiredObject::new(kind, object)?);
        Ok(())
    }

    /// Names per kind that pruning must leave alone.
    pub fn keep(&self) -> BTreeSet<(ChildKind, String)> {
        self.objects
            .iter()
            .map(|o| (o.kind, o.name.clone()))
            .chain(self.create_once.iter().cloned())
            .collect()
    }

    pub fn get(&self, kind: ChildKind, name: &str) -> Option<&DesiredObject> {
        self.objects
            .iter()
            .find(|o| o.kind == kind && o.name == name)
    }

    fn sort(&mut self) {
        self.objects
            .sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
    }
}

/// Builds every desired child of `cs`.
pub fn desired_children(cs: &ValidatedChatService) -> Result<DesiredChildren, BuildError> {
    let mut out = DesiredChildren::default();
    let connection = connection::build_connection_secret(cs);
    let config_map = config_map::build_config_map(cs)?;
    let checksum = chat::pod_checksum(&config_map, &connection, &cs.chat.tokenizers);

    out.push(ChildKind::ServiceAccount, &chat::build_service_account(cs))?;
    out.push(ChildKind::Secret, &connection)?;
    out.push(ChildKind::ConfigMap, &config_map)?;
    out.push(
        ChildKind::Deployment,
        &chat::build_deployment(cs, &checksum),
    )?;
    out.push(ChildKind::Service, &exposure::build_service(cs))?;
    out.push(ChildKind::PodDisruptionBudget, &scaling::build_pdb(cs))?;
    if let Some(hpa) = scaling::build_hpa(cs) {
        out.push(ChildKind::HorizontalPodAutoscaler, &hpa)?;
    }
    if let Some(ingress) = exposure::build_ingress(cs) {
        out.push(ChildKind::Ingress, &ingress)?;
    }
    // Only this ChatService's chat pods may reach what the operator runs for it.
    let mut fenced = Vec::new();
    if let Redis::Managed(managed) = &cs.redis {
        fenced.push((Component::Redis, REDIS_PORT));
        out.push(
            ChildKind::Deployment,
            &redis::build_redis_deployment(cs, managed),
        )?;
        out.push(ChildKind::Service, &redis::build_redis_service(cs))?;
    }
    if let Mongodb::Managed(managed) = &cs.mongodb {
        fenced.push((Component::Mongodb, MONGODB_PORT));
        out.push(
            ChildKind::StatefulSet,
            &mongodb::build_mongodb_statefulset(cs, managed),
        )?;
        out.push(ChildKind::Service, &mongodb::build_mongodb_service(cs))?;
    }
    if let Some(managed) = &cs.ollama {
        fenced.push((Component::Ollama, OLLAMA_PORT));
        out.push(
            ChildKind::StatefulSet,
            &ollama::build_ollama_statefulset(cs, managed),
        )?;
        out.push(ChildKind::Service, &ollama::build_ollama_service(cs))?;
    }
    if cs.network_policies {
        let policy = network::build_chat_network_policy(cs);
        out.push(ChildKind::NetworkPolicy, &policy)?;
        for (component, port) in fenced {
            let policy = network::build_network_policy(cs, component, port);
            out.push(ChildKind::NetworkPolicy, &policy)?;
        }
    }
    out.create_once = cs
        .generated_secrets()
        .into_iter()
        .map(|name| (ChildKind::Secret, name))
        .collect();
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::*;
    use crate::names::LABEL_CHATSERVICE;

    fn names(children: &DesiredChildren) -> Vec<(ChildKind, String)> {
        children
            .objects
            .iter()
            .map(|o| (o.kind, o.name.clone()))
            .collect()
    }

    #[test]
    fn minimal_spec_gets_managed_stores_and_no_optional_children() {
        let children = desired_children(&validated(MINIMAL)).unwrap();
        let names = names(&children);
        for expected in [
            (ChildKind::ServiceAccount, "support"),
            (ChildKind::Secret, "support-connection"),
            (ChildKind::ConfigMap, "support-config"),
            (ChildKind::Deployment, "support"),
            (ChildKind::Deployment, "support-redis"),
            (ChildKind::StatefulSet, "support-mongodb"),
            (ChildKind::Service, "support-mongodb"),
            (ChildKind::NetworkPolicy, "support-redis"),
            (ChildKind::PodDisruptionBudget, "support"),
        ] {
            assert!(
                names.contains(&(expected.0, expected.1.to_string())),
                "{expected:?} missing from {names:?}"
            );
        }
        assert!(
            !names
                .iter()
                .any(|(k, _)| *k == ChildKind::HorizontalPodAutoscaler || *k == ChildKind::Ingress)
        );
        assert!(!names.iter().any(|(_, n)| n.contains("ollama")));
        assert!(
            children
                .keep()
                .contains(&(ChildKind::Secret, "support-redis-password".into()))
        );
    }

    #[test]
    fn every_child_is_owned_labelled_and_namespaced() {
        let children = desired_children(&validated(FULL)).unwrap();
        for object in &children.objects {
            let meta = &object.manifest["metadata"];
            assert_eq!(meta["namespace"], "team-a", "{}", object.name);
            assert_eq!(meta["labels"][LABEL_CHATSERVICE], "support");
            assert_eq!(meta["ownerReferences"][0]["kind"], "ChatService");
            assert_eq!(meta["ownerReferences"][0]["controller"], true);
            assert!(
                object.manifest["apiVersion"].is_string() && object.manifest["kind"].is_string()
            );
        }
    }

    #[test]
    fn external_stores_replace_managed_ones() {
        let children = desired_children(&validated(FULL)).unwrap();
        let names = names(&children);
        assert!(
            !names
                .iter()
                .any(|(_, n)| n.contains("redis") || n.contains("mongodb")),
            "{names:?}"
        );
        assert!(children.create_once.is_empty());
        assert!(names.contains(&(ChildKind::StatefulSet, "support-ollama".into())));
        assert!(names.contains(&(ChildKind::HorizontalPodAutoscaler, "support".into())));
        assert!(names.contains(&(ChildKind::Ingress, "support".into())));
    }

    #[test]
    fn network_policies_can_be_turned_off() {
        let yaml = MINIMAL.replace("  models:", "  networkPolicies: false\n  models:");
        let children = desired_children(&validated(&yaml)).unwrap();
        assert!(
            !children
                .objects
                .iter()
                .any(|o| o.kind == ChildKind::NetworkPolicy)
        );
    }
}
