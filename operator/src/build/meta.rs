//! What every child shares: labels, metadata with the owner reference, the restricted security
//! context, and the small pieces of pod spec that several builders use alike.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, KeyToPath,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSecurityContext, PodSpec, PodTemplateSpec,
    SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext, Service, ServicePort,
    ServiceSpec, Volume, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use k8s_openapi::api::apps::v1::StatefulSetPersistentVolumeClaimRetentionPolicy;

use crate::crd::RetentionPolicy;
use crate::names::{
    Component, LABEL_CHATSERVICE, LABEL_COMPONENT, LABEL_INSTANCE, LABEL_MANAGED_BY, LABEL_NAME,
    MANAGED_BY,
};
use crate::validated::ValidatedChatService;

/// Labels every child carries.
pub fn labels(cs: &ValidatedChatService, component: Component) -> BTreeMap<String, String> {
    let mut labels = selector_labels(cs, component);
    labels.insert(LABEL_MANAGED_BY.into(), MANAGED_BY.into());
    labels.insert(LABEL_INSTANCE.into(), cs.name.clone());
    labels
}

/// The immutable subset used in selectors: never add to it, Deployments cannot change selectors.
pub fn selector_labels(
    cs: &ValidatedChatService,
    component: Component,
) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_CHATSERVICE.to_string(), cs.name.clone()),
        (LABEL_NAME.to_string(), component.as_str().to_string()),
        (LABEL_COMPONENT.to_string(), component.as_str().to_string()),
    ])
}

pub fn label_selector(cs: &ValidatedChatService, component: Component) -> LabelSelector {
    LabelSelector {
        match_labels: Some(selector_labels(cs, component)),
        ..Default::default()
    }
}

/// Name, namespace, labels and the controller reference of a child.
pub fn child_meta(cs: &ValidatedChatService, name: String, component: Component) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(cs.namespace.clone()),
        labels: Some(labels(cs, component)),
        owner_references: Some(vec![cs.owner.clone()]),
        ..Default::default()
    }
}

/// The Service in front of a managed store or back end: one named port targeting the container
/// port of the same name; `headless` for StatefulSets, whose pods need stable DNS names.
pub fn workload_service(
    cs: &ValidatedChatService,
    component: Component,
    port_name: &str,
    port: i32,
    headless: bool,
) -> Service {
    Service {
        metadata: child_meta(cs, cs.names.component(component), component),
        spec: Some(ServiceSpec {
            cluster_ip: headless.then(|| "None".into()),
            selector: Some(selector_labels(cs, component)),
            ports: Some(vec![ServicePort {
                name: Some(port_name.into()),
                port,
                target_port: Some(IntOrString::String(port_name.into())),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A StatefulSet's per-pod volume claim of `storage`, labelled as the component.
pub fn volume_claim(
    cs: &ValidatedChatService,
    component: Component,
    name: &str,
    storage: Quantity,
    storage_class_name: Option<String>,
) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(labels(cs, component)),
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

/// A StatefulSet's volume lifecycle: `whenDeleted` as the ChatService asks; volumes of pods
/// removed by scaling down are always kept (a scale-up finds its data again).
pub fn claim_retention(policy: RetentionPolicy) -> StatefulSetPersistentVolumeClaimRetentionPolicy {
    StatefulSetPersistentVolumeClaimRetentionPolicy {
        when_deleted: Some(policy.as_str().into()),
        when_scaled: Some(RetentionPolicy::Retain.as_str().into()),
    }
}

/// Metadata of a generated credentials Secret. The Secret goes with the data it opens: owned by
/// the ChatService (and removed with it) when the data volume is, and without an owner when the
/// volume is retained, so that a ChatService re-created under the same name reuses it instead
/// of generating a password the old data refuses.
pub fn credentials_meta(
    cs: &ValidatedChatService,
    name: String,
    component: Component,
    retention: RetentionPolicy,
) -> ObjectMeta {
    let mut meta = child_meta(cs, name, component);
    if retention == RetentionPolicy::Retain {
        meta.owner_references = None;
    }
    meta
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

/// Pod template of a managed store or model server: its component labels, no service-account
/// token, the restricted security context as `uid`, and one emptyDir volume `empty_dir` (scratch
/// space or, for Redis, its data).
pub fn managed_pod_template(
    cs: &ValidatedChatService,
    component: Component,
    uid: i64,
    init_containers: Option<Vec<Container>>,
    containers: Vec<Container>,
    empty_dir: &str,
) -> PodTemplateSpec {
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels(cs, component)),
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

/// A variable read from a Secret key that must exist.
pub fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A volume holding one key of a Secret as the file `path`.
pub fn secret_volume(volume: &str, secret: &str, key: &str, path: &str) -> Volume {
    Volume {
        name: volume.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.into()),
            items: Some(vec![KeyToPath {
                key: key.into(),
                path: path.into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}
