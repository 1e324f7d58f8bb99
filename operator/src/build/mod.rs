//! Desired children of a ChatService: pure functions from the validated spec (and the secret
//! material the dereference step found) to Kubernetes objects. No client in here, so every
//! decision is unit-tested from YAML fixtures.

pub mod chat;
pub mod config;
pub mod connection;
pub mod mongodb;
pub mod network;
pub mod ollama;
pub mod redis;

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, Container, EmptyDirVolumeSource, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PodSecurityContext, PodSpec, PodTemplateSpec, SeccompProfile,
    Secret, SecurityContext, Service, ServiceAccount, ServicePort, ServiceSpec, Volume,
    VolumeResourceRequirements,
};
use k8s_openapi::api::networking::v1::{Ingress, NetworkPolicy};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use kube::core::{ApiResource, Resource};
use serde::Serialize;

use crate::crd::ChatService;
use crate::error::{Error, Result};

/// The one field manager every server-side apply uses.
pub const FIELD_MANAGER: &str = "chat-operator";
/// Names the ChatService a child belongs to; the selector for watches and pruning.
pub const LABEL_CHATSERVICE: &str = "chatoperator.dev/chatservice";
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
pub const MANAGED_BY: &str = "chat-operator";

/// The part of the stack a child object belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Chat,
    Redis,
    Mongodb,
    Ollama,
}

impl Component {
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Chat => "chat-service",
            Component::Redis => "redis",
            Component::Mongodb => "mongodb",
            Component::Ollama => "ollama",
        }
    }
}

/// Deterministic child names, so a re-created operator finds what it made before.
#[derive(Debug, Clone)]
pub struct ChildNames {
    base: String,
}

impl ChildNames {
    pub fn of(cr: &ChatService) -> Self {
        Self {
            base: cr.name_any(),
        }
    }
    /// Deployment, Service, ServiceAccount, HPA, PDB and Ingress of the chat pods.
    pub fn chat(&self) -> String {
        self.base.clone()
    }
    pub fn config_map(&self) -> String {
        format!("{}-config", self.base)
    }
    pub fn connection_secret(&self) -> String {
        format!("{}-connection", self.base)
    }
    pub fn redis(&self) -> String {
        format!("{}-redis", self.base)
    }
    pub fn redis_password(&self) -> String {
        format!("{}-redis-password", self.base)
    }
    pub fn mongodb(&self) -> String {
        format!("{}-mongodb", self.base)
    }
    pub fn mongodb_credentials(&self) -> String {
        format!("{}-mongodb-credentials", self.base)
    }
    pub fn ollama(&self) -> String {
        format!("{}-ollama", self.base)
    }
}

/// Labels every child carries.
pub fn labels(cr: &ChatService, component: Component) -> BTreeMap<String, String> {
    let mut labels = selector_labels(cr, component);
    labels.insert(LABEL_MANAGED_BY.into(), MANAGED_BY.into());
    labels.insert(LABEL_INSTANCE.into(), cr.name_any());
    labels
}

/// The immutable subset used in selectors: never add to it, Deployments cannot change selectors.
pub fn selector_labels(cr: &ChatService, component: Component) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_CHATSERVICE.to_string(), cr.name_any()),
        (LABEL_NAME.to_string(), component.as_str().to_string()),
        (LABEL_COMPONENT.to_string(), component.as_str().to_string()),
    ])
}

pub fn label_selector(cr: &ChatService, component: Component) -> LabelSelector {
    LabelSelector {
        match_labels: Some(selector_labels(cr, component)),
        ..Default::default()
    }
}

/// Controller reference, so the garbage collector removes children with their ChatService.
pub fn owner_reference(cr: &ChatService) -> Result<OwnerReference> {
    cr.controller_owner_ref(&())
        .ok_or_else(|| Error::MissingObjectKey("metadata.uid"))
}

pub fn child_meta(cr: &ChatService, name: String, component: Component) -> Result<ObjectMeta> {
    Ok(ObjectMeta {
        name: Some(name),
        namespace: cr.namespace(),
        labels: Some(labels(cr, component)),
        owner_references: Some(vec![owner_reference(cr)?]),
        ..Default::default()
    })
}

/// The Service in front of a managed store or back end: one named port targeting the container
/// port of the same name; `headless` for StatefulSets, whose pods need stable DNS names.
pub fn workload_service(
    cr: &ChatService,
    name: String,
    component: Component,
    port_name: &str,
    port: i32,
    headless: bool,
) -> Result<Service> {
    Ok(Service {
        metadata: child_meta(cr, name, component)?,
        spec: Some(ServiceSpec {
            cluster_ip: headless.then(|| "None".into()),
            selector: Some(selector_labels(cr, component)),
            ports: Some(vec![ServicePort {
                name: Some(port_name.into()),
                port,
                target_port: Some(IntOrString::String(port_name.into())),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// A StatefulSet's per-pod volume claim of `storage`, labelled as the component.
pub fn volume_claim(
    cr: &ChatService,
    component: Component,
    name: &str,
    storage: Quantity,
    storage_class_name: Option<String>,
) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(labels(cr, component)),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name,
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_string(), storage)])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Pod Security "restricted" plus a read-only root file system, for every container we run.
pub fn restricted_container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Pod template of a managed store or model server: its component labels, no service-account
/// token, the restricted security context as `uid`, and one emptyDir volume `empty_dir` (scratch
/// space or, for Redis, its data).
pub fn managed_pod_template(
    cr: &ChatService,
    component: Component,
    uid: i64,
    init_containers: Option<Vec<Container>>,
    containers: Vec<Container>,
    empty_dir: &str,
) -> PodTemplateSpec {
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels(cr, component)),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            automount_service_account_token: Some(false),
            security_context: Some(restricted_pod_security(uid)),
            init_containers,
            containers,
            volumes: Some(vec![Volume {
                name: empty_dir.into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

pub fn restricted_pod_security(uid: i64) -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(uid),
        run_as_group: Some(uid),
        fs_group: Some(uid),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The kinds of object the operator creates, in the order they are applied (what others read
/// first: ServiceAccount, Secrets and ConfigMap before the workloads that mount them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChildKind {
    ServiceAccount,
    Secret,
    ConfigMap,
    Service,
    StatefulSet,
    Deployment,
    HorizontalPodAutoscaler,
    PodDisruptionBudget,
    NetworkPolicy,
    Ingress,
}

impl ChildKind {
    pub const ALL: [ChildKind; 10] = [
        ChildKind::ServiceAccount,
        ChildKind::Secret,
        ChildKind::ConfigMap,
        ChildKind::Service,
        ChildKind::StatefulSet,
        ChildKind::Deployment,
        ChildKind::HorizontalPodAutoscaler,
        ChildKind::PodDisruptionBudget,
        ChildKind::NetworkPolicy,
        ChildKind::Ingress,
    ];

    pub fn api_resource(self) -> ApiResource {
        match self {
            ChildKind::ServiceAccount => ApiResource::erase::<ServiceAccount>(&()),
            ChildKind::Secret => ApiResource::erase::<Secret>(&()),
            ChildKind::ConfigMap => ApiResource::erase::<ConfigMap>(&()),
            ChildKind::Service => ApiResource::erase::<Service>(&()),
            ChildKind::StatefulSet => ApiResource::erase::<StatefulSet>(&()),
            ChildKind::Deployment => ApiResource::erase::<Deployment>(&()),
            ChildKind::HorizontalPodAutoscaler => {
                ApiResource::erase::<HorizontalPodAutoscaler>(&())
            }
            ChildKind::PodDisruptionBudget => ApiResource::erase::<PodDisruptionBudget>(&()),
            ChildKind::NetworkPolicy => ApiResource::erase::<NetworkPolicy>(&()),
            ChildKind::Ingress => ApiResource::erase::<Ingress>(&()),
        }
    }
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
    ) -> Result<Self> {
        Ok(Self {
            kind,
            name: object.meta().name.clone().unwrap_or_default(),
            manifest: serde_json::to_value(object).map_err(Error::Serialize)?,
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
    ) -> Result<()> {
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

/// Secret material the dereference step read, which the builders need.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SecretMaterial {
    /// The generated Redis password (managed Redis).
    pub redis_password: Option<String>,
    /// The generated MongoDB root user and password (managed MongoDB).
    pub mongodb_credentials: Option<(String, String)>,
    /// External Redis password from the referenced Secret.
    pub external_redis_password: Option<String>,
    /// External MongoDB URI from the referenced Secret.
    pub external_mongodb_uri: Option<String>,
}

/// Builds every desired child of `cr`.
pub fn desired_children(
    cr: &ChatService,
    secrets: &SecretMaterial,
    operator_image_tag: &str,
) -> Result<DesiredChildren> {
    let mut out = DesiredChildren::default();
    let connection = connection::build_connection_secret(cr, secrets)?;
    let rendered = config::render_config(cr)?;
    let config_map = config::build_config_map(cr, &rendered)?;
    let checksum = chat::pod_checksum(&config_map, &connection);

    out.push(ChildKind::ServiceAccount, &chat::build_service_account(cr)?)?;
    out.push(ChildKind::Secret, &connection)?;
    out.push(ChildKind::ConfigMap, &config_map)?;
    out.push(
        ChildKind::Deployment,
        &chat::build_deployment(cr, &checksum, operator_image_tag)?,
    )?;
    out.push(ChildKind::Service, &chat::build_service(cr)?)?;
    out.push(ChildKind::PodDisruptionBudget, &chat::build_pdb(cr)?)?;
    if let Some(hpa) = chat::build_hpa(cr)? {
        out.push(ChildKind::HorizontalPodAutoscaler, &hpa)?;
    }
    if let Some(ingress) = chat::build_ingress(cr)? {
        out.push(ChildKind::Ingress, &ingress)?;
    }
    let names = ChildNames::of(cr);
    let network_policies = cr.spec.network_policies.unwrap_or(true);
    if cr.spec.history.redis.managed.is_some() {
        out.push(ChildKind::Deployment, &redis::build_redis_deployment(cr)?)?;
        out.push(ChildKind::Service, &redis::build_redis_service(cr)?)?;
        out.create_once
            .push((ChildKind::Secret, names.redis_password()));
        if network_policies {
            out.push(
                ChildKind::NetworkPolicy,
                &network::build_network_policy(cr, Component::Redis, redis::PORT)?,
            )?;
        }
    }
    if cr.spec.history.mongodb.managed.is_some() {
        out.push(
            ChildKind::StatefulSet,
            &mongodb::build_mongodb_statefulset(cr)?,
        )?;
        out.push(ChildKind::Service, &mongodb::build_mongodb_service(cr)?)?;
        out.create_once
            .push((ChildKind::Secret, names.mongodb_credentials()));
        if network_policies {
            out.push(
                ChildKind::NetworkPolicy,
                &network::build_network_policy(cr, Component::Mongodb, mongodb::PORT)?,
            )?;
        }
    }
    if cr.spec.ollama.is_some() {
        out.push(
            ChildKind::StatefulSet,
            &ollama::build_ollama_statefulset(cr)?,
        )?;
        out.push(ChildKind::Service, &ollama::build_ollama_service(cr)?)?;
        if network_policies {
            out.push(
                ChildKind::NetworkPolicy,
                &network::build_network_policy(cr, Component::Ollama, ollama::PORT)?,
            )?;
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
pub(crate) mod fixtures {
    use crate::crd::ChatService;

    /// A ChatService as the API server hands it over (uid and namespace set).
    pub fn chat_service(yaml: &str) -> ChatService {
        let mut cr: ChatService = serde_yaml::from_str(yaml).expect("fixture parses");
        cr.metadata.namespace.get_or_insert_with(|| "team-a".into());
        cr.metadata
            .uid
            .get_or_insert_with(|| "6a0b3c1e-0000-4000-8000-000000000001".into());
        cr.metadata.generation.get_or_insert(1);
        cr
    }

    pub const MINIMAL: &str = r#"
apiVersion: chatoperator.dev/v1alpha1
kind: ChatService
metadata: {name: support}
spec:
  backends:
    - {name: vllm, url: "http://vllm.ml:8000", protocol: openai}
  models: {default: gemma3:270m}
  history:
    redis: {managed: {}}
    mongodb: {managed: {}}
"#;

    pub const FULL: &str = r#"
apiVersion: chatoperator.dev/v1alpha1
kind: ChatService
metadata: {name: support}
spec:
  image: registry.example/chat-service:9.9.9
  podTemplate:
    labels: {team: a}
    annotations: {example.com/owner: a}
    nodeSelector: {pool: chat}
    priorityClassName: high
  autoscaling: {minReplicas: 2, maxReplicas: 6, targetCPUUtilizationPercentage: 70, inFlightRequestsPerPod: 20, scaleDownStabilizationSeconds: 120}
  backends:
    - {name: hosted, url: "https://llm.example.com", protocol: openai, weight: 3, apiKeySecret: {name: llm-keys, key: hosted}}
  ollama: {replicas: 2, models: ["gemma3:270m"], gpus: 1, modelStorage: 5Gi}
  routing: {strategy: SessionAffinity, maxAttempts: 3, circuitBreaker: {failureThreshold: 7}, maxInFlightPerBackend: 4, queueDepth: 2, retryBudgetPercent: 10, fallback: {backend: hosted}}
  history:
    redis:
      external: {address: "cache.abc.use1.cache.amazonaws.com:6379", tls: true, passwordSecret: {name: redis-auth, key: token}}
    mongodb:
      external: {flavor: documentdb, uriSecret: {name: docdb, key: uri}, caSecret: {name: docdb, key: ca.pem}}
      database: support
  cache: {enabled: true, ttlSeconds: 60}
  rateLimit: {requestsPerWindow: 10, keyBy: ClientIP}
  auth: {apiKeysSecret: {name: api-keys, key: keys}}
  service: {type: LoadBalancer, port: 8443}
  ingress: {host: chat.example.com, tlsSecretName: chat-tls}
"#;
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;

    fn material() -> SecretMaterial {
        SecretMaterial {
            redis_password: Some("r".into()),
            mongodb_credentials: Some(("chat".into(), "m".into())),
            external_redis_password: Some("token".into()),
            external_mongodb_uri: Some("mongodb://u:p@docdb:27017/".into()),
        }
    }

    fn names(children: &DesiredChildren) -> Vec<(ChildKind, String)> {
        children
            .objects
            .iter()
            .map(|o| (o.kind, o.name.clone()))
            .collect()
    }

    #[test]
    fn minimal_spec_gets_managed_stores_and_no_optional_children() {
        let children = desired_children(&chat_service(MINIMAL), &material(), "0.1.0").unwrap();
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
        let children = desired_children(&chat_service(FULL), &material(), "0.1.0").unwrap();
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
        let children = desired_children(&chat_service(FULL), &material(), "0.1.0").unwrap();
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
        let children = desired_children(&chat_service(&yaml), &material(), "0.1.0").unwrap();
        assert!(
            !children
                .objects
                .iter()
                .any(|o| o.kind == ChildKind::NetworkPolicy)
        );
    }
}
