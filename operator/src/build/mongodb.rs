//! Managed MongoDB: a StatefulSet with a data volume, a headless Service and generated root
//! credentials.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, ExecAction, Probe, Secret, Service, TCPSocketAction, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::meta::{
    child_meta, claim_retention, credentials_meta, label_selector, managed_pod_template,
    restricted_container_security, secret_env, volume_claim, workload_service,
};
use crate::crd::RetentionPolicy;
use crate::layout::MONGODB_PORT;
use crate::names::{Component, MONGODB_PASSWORD_KEY, MONGODB_USERNAME_KEY};
use crate::validated::{ManagedMongodb, MongoCredentials, ValidatedChatService};

/// Root user of the managed MongoDB.
pub const USERNAME: &str = "chat";
/// The `mongodb` user of the official image.
const RUN_AS_USER: i64 = 999;

/// Created once with a random password and never applied again, so the credentials survive;
/// owned by the ChatService only when the data volume goes with it (`retention`).
pub fn build_mongodb_credentials_secret(
    cs: &ValidatedChatService,
    credentials: &MongoCredentials,
    retention: RetentionPolicy,
) -> Secret {
    Secret {
        metadata: credentials_meta(
            cs,
            cs.names.mongodb_credentials(),
            Component::Mongodb,
            retention,
        ),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            (
                MONGODB_USERNAME_KEY.to_string(),
                ByteString(credentials.username.as_bytes().to_vec()),
            ),
            (
                MONGODB_PASSWORD_KEY.to_string(),
                ByteString(credentials.password.as_bytes().to_vec()),
            ),
        ])),
        ..Default::default()
    }
}

pub fn build_mongodb_statefulset(
    cs: &ValidatedChatService,
    managed: &ManagedMongodb,
) -> StatefulSet {
    let credentials = cs.names.mongodb_credentials();
    let container = Container {
        name: "mongodb".into(),
        image: Some(managed.image.clone()),
        env: Some(vec![
            secret_env(
                "MONGO_INITDB_ROOT_USERNAME",
                &credentials,
                MONGODB_USERNAME_KEY,
            ),
            secret_env(
                "MONGO_INITDB_ROOT_PASSWORD",
                &credentials,
                MONGODB_PASSWORD_KEY,
            ),
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("mongodb".into()),
            container_port: MONGODB_PORT,
            ..Default::default()
        }]),
        resources: Some(managed.resources.clone()),
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
    StatefulSet {
        metadata: child_meta(cs, cs.names.mongodb(), Component::Mongodb),
        spec: Some(StatefulSetSpec {
            replicas: Some(1),
            service_name: Some(cs.names.mongodb()),
            selector: label_selector(cs, Component::Mongodb),
            template: managed_pod_template(
                cs,
                Component::Mongodb,
                RUN_AS_USER,
                None,
                vec![container],
                "tmp",
            ),
            persistent_volume_claim_retention_policy: Some(claim_retention(managed.retention)),
            volume_claim_templates: Some(vec![volume_claim(
                cs,
                Component::Mongodb,
                "data",
                managed.storage.clone(),
                managed.storage_class_name.clone(),
            )]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Headless: the StatefulSet pod gets a stable DNS name through it.
pub fn build_mongodb_service(cs: &ValidatedChatService) -> Service {
    workload_service(cs, Component::Mongodb, "mongodb", MONGODB_PORT, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::*;

    #[test]
    fn statefulset_has_a_volume_claim_and_headless_service() {
        let cs = validated(MINIMAL);
        let sts = build_mongodb_statefulset(&cs, managed_mongodb(&cs));
        let spec = sts.spec.as_ref().unwrap();
        assert_eq!(spec.service_name.as_deref(), Some("support-mongodb"));
        assert_eq!(claim_storage(&sts, "data"), "10Gi");
        let mongodb = container(&sts, "mongodb");
        assert_eq!(
            secret_ref(env_var(mongodb, "MONGO_INITDB_ROOT_PASSWORD")),
            ("support-mongodb-credentials", "password")
        );
        let service = build_mongodb_service(&cs).spec.unwrap();
        assert_eq!(service.cluster_ip.as_deref(), Some("None"));
    }

    #[test]
    fn credentials_secret_holds_user_and_password() {
        let cs = validated(MINIMAL);
        let secret = build_mongodb_credentials_secret(
            &cs,
            &MongoCredentials {
                username: USERNAME.into(),
                password: "pw".into(),
            },
            RetentionPolicy::Delete,
        );
        assert_eq!(secret_value(&secret, MONGODB_USERNAME_KEY), "chat");
        assert_eq!(secret_value(&secret, MONGODB_PASSWORD_KEY), "pw");
        assert_eq!(
            secret.metadata.name.as_deref(),
            Some("support-mongodb-credentials")
        );
        assert_eq!(secret.metadata.owner_references.map(|o| o.len()), Some(1));
    }

    #[test]
    fn retained_data_keeps_an_unowned_credentials_secret() {
        let cs = validated(MINIMAL);
        let managed = managed_mongodb(&cs);
        assert_eq!(managed.retention, RetentionPolicy::Retain, "the default");
        let sts = build_mongodb_statefulset(&cs, managed);
        let policy = sts.spec.unwrap().persistent_volume_claim_retention_policy;
        let policy = policy.unwrap();
        assert_eq!(policy.when_deleted.as_deref(), Some("Retain"));
        assert_eq!(policy.when_scaled.as_deref(), Some("Retain"));
        let credentials = MongoCredentials::default();
        let secret = build_mongodb_credentials_secret(&cs, &credentials, managed.retention);
        assert_eq!(secret.metadata.owner_references, None);
    }
}
