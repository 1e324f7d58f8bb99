//! Managed MongoDB: a StatefulSet with a data volume, a headless Service and generated root
//! credentials.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, EnvVarSource, ExecAction, Probe, Secret, SecretKeySelector,
    Service, TCPSocketAction, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::chat::default_resources;
use super::{
    ChildNames, Component, child_meta, label_selector, managed_pod_template,
    restricted_container_security, volume_claim, workload_service,
};
use crate::crd::ChatService;
use crate::error::Result;

pub const PORT: i32 = 27017;
pub const USERNAME_KEY: &str = "username";
pub const PASSWORD_KEY: &str = "password";
pub const USERNAME: &str = "chat";
pub const DEFAULT_IMAGE: &str = "docker.io/library/mongo:7.0";
pub const DEFAULT_STORAGE: &str = "10Gi";
/// The `mongodb` user of the official image.
const RUN_AS_USER: i64 = 999;

pub fn build_mongodb_credentials_secret(
    cr: &ChatService,
    username: &str,
    password: &str,
) -> Result<Secret> {
    Ok(Secret {
        metadata: child_meta(
            cr,
            ChildNames::of(cr).mongodb_credentials(),
            Component::Mongodb,
        )?,
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            (
                USERNAME_KEY.to_string(),
                ByteString(username.as_bytes().to_vec()),
            ),
            (
                PASSWORD_KEY.to_string(),
                ByteString(password.as_bytes().to_vec()),
            ),
        ])),
        ..Default::default()
    })
}

fn credential_env(name: &str, secret: &str, key: &str) -> EnvVar {
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

pub fn build_mongodb_statefulset(cr: &ChatService) -> Result<StatefulSet> {
    let managed = cr.spec.history.mongodb.managed.clone().unwrap_or_default();
    let names = ChildNames::of(cr);
    let credentials = names.mongodb_credentials();
    let container = Container {
        name: "mongodb".into(),
        image: Some(managed.image.unwrap_or_else(|| DEFAULT_IMAGE.into())),
        env: Some(vec![
            credential_env("MONGO_INITDB_ROOT_USERNAME", &credentials, USERNAME_KEY),
            credential_env("MONGO_INITDB_ROOT_PASSWORD", &credentials, PASSWORD_KEY),
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("mongodb".into()),
            container_port: PORT,
            ..Default::default()
        }]),
        resources: Some(managed.resources.unwrap_or_else(|| {
            default_resources(
                &[("cpu", "100m"), ("memory", "256Mi")],
                &[("memory", "1Gi")],
            )
        })),
        liveness_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::String("mongodb".into()),
                ..Default::default()
            }),
            period_seconds: Some(10),
            initial_delay_seconds: Some(10),
            ..Default::default()
        }),
        readiness_probe: Some(Probe {
            exec: Some(ExecAction {
                command: Some(vec![
                    "mongosh".into(),
                    "--quiet".into(),
                    "--eval".into(),
                    "db.adminCommand('ping').ok".into(),
                ]),
            }),
            period_seconds: Some(10),
            timeout_seconds: Some(5),
            ..Default::default()
        }),
        security_context: Some(restricted_container_security()),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "data".into(),
                mount_path: "/data/db".into(),
                ..Default::default()
            },
            // mongod writes its socket and the entrypoint its scratch files here.
            VolumeMount {
                name: "tmp".into(),
                mount_path: "/tmp".into(),
                ..Default::default()
            },
        ]),
        ..Default::default()
    };
    let storage = managed
        .storage
        .unwrap_or_else(|| Quantity(DEFAULT_STORAGE.into()));
    Ok(StatefulSet {
        metadata: child_meta(cr, names.mongodb(), Component::Mongodb)?,
        spec: Some(StatefulSetSpec {
            replicas: Some(1),
            service_name: Some(names.mongodb()),
            selector: label_selector(cr, Component::Mongodb),
            template: managed_pod_template(
                cr,
                Component::Mongodb,
                RUN_AS_USER,
                None,
                vec![container],
                "tmp",
            ),
            volume_claim_templates: Some(vec![volume_claim(
                cr,
                Component::Mongodb,
                "data",
                storage,
                managed.storage_class_name,
            )]),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// Headless: the StatefulSet pod gets a stable DNS name through it.
pub fn build_mongodb_service(cr: &ChatService) -> Result<Service> {
    workload_service(
        cr,
        ChildNames::of(cr).mongodb(),
        Component::Mongodb,
        "mongodb",
        PORT,
        true,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures::*;

    #[test]
    fn statefulset_has_a_volume_claim_and_headless_service() {
        let cr = chat_service(MINIMAL);
        let sts = build_mongodb_statefulset(&cr).unwrap().spec.unwrap();
        assert_eq!(sts.service_name.as_deref(), Some("support-mongodb"));
        let claim = &sts.volume_claim_templates.unwrap()[0];
        let requests = claim
            .spec
            .as_ref()
            .unwrap()
            .resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap();
        assert_eq!(requests["storage"].0, "10Gi");
        let service = build_mongodb_service(&cr).unwrap().spec.unwrap();
        assert_eq!(service.cluster_ip.as_deref(), Some("None"));
    }
}
