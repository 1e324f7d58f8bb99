//! Managed Redis: a single-pod Deployment (recent turns, cache and rate limits are rebuilt from
//! MongoDB or expire, so no volume), its Service and a generated password Secret.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, EnvVarSource, ExecAction, Probe, Secret, SecretKeySelector,
    Service, TCPSocketAction, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::chat::default_resources;
use super::{
    ChildNames, Component, child_meta, label_selector, managed_pod_template,
    restricted_container_security, workload_service,
};
use crate::crd::ChatService;
use crate::error::Result;

pub const PORT: i32 = 6379;
pub const PASSWORD_KEY: &str = "password";
pub const DEFAULT_IMAGE: &str = "docker.io/library/redis:7.4-alpine";
/// The `redis` user of the official image.
const RUN_AS_USER: i64 = 999;

/// Created once with a random password and never applied again, so the password survives.
pub fn build_redis_password_secret(cr: &ChatService, password: &str) -> Result<Secret> {
    Ok(Secret {
        metadata: child_meta(cr, ChildNames::of(cr).redis_password(), Component::Redis)?,
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            PASSWORD_KEY.to_string(),
            ByteString(password.as_bytes().to_vec()),
        )])),
        ..Default::default()
    })
}

pub fn build_redis_deployment(cr: &ChatService) -> Result<Deployment> {
    let managed = cr.spec.history.redis.managed.clone().unwrap_or_default();
    let names = ChildNames::of(cr);
    let container = Container {
        name: "redis".into(),
        image: Some(managed.image.unwrap_or_else(|| DEFAULT_IMAGE.into())),
        // The password comes from the environment, so it never appears in the pod spec.
        command: Some(vec!["sh".into(), "-c".into()]),
        args: Some(vec![
            "exec redis-server --requirepass \"$REDIS_PASSWORD\" --save '' --appendonly no --dir /data".into(),
        ]),
        env: Some(vec![EnvVar {
            name: "REDIS_PASSWORD".into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: names.redis_password(),
                    key: PASSWORD_KEY.into(),
                    optional: Some(false),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }]),
        ports: Some(vec![ContainerPort {
            name: Some("redis".into()),
            container_port: PORT,
            ..Default::default()
        }]),
        resources: Some(
            managed
                .resources
                .unwrap_or_else(|| default_resources(&[("cpu", "50m"), ("memory", "64Mi")], &[("memory", "256Mi")])),
        ),
        liveness_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::String("redis".into()),
                ..Default::default()
            }),
            period_seconds: Some(10),
            ..Default::default()
        }),
        readiness_probe: Some(Probe {
            exec: Some(ExecAction {
                command: Some(vec![
                    "sh".into(),
                    "-c".into(),
                    "REDISCLI_AUTH=\"$REDIS_PASSWORD\" redis-cli ping | grep -q PONG".into(),
                ]),
            }),
            period_seconds: Some(5),
            ..Default::default()
        }),
        security_context: Some(restricted_container_security()),
        volume_mounts: Some(vec![VolumeMount {
            name: "data".into(),
            mount_path: "/data".into(),
            ..Default::default()
        }]),
        ..Default::default()
    };
    Ok(Deployment {
        metadata: child_meta(cr, names.redis(), Component::Redis)?,
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            selector: label_selector(cr, Component::Redis),
            // Never two Redis pods with diverging data behind one Service.
            strategy: Some(DeploymentStrategy {
                type_: Some("Recreate".into()),
                ..Default::default()
            }),
            template: managed_pod_template(
                cr,
                Component::Redis,
                RUN_AS_USER,
                None,
                vec![container],
                "data",
            ),
            ..Default::default()
        }),
        ..Default::default()
    })
}

pub fn build_redis_service(cr: &ChatService) -> Result<Service> {
    workload_service(
        cr,
        ChildNames::of(cr).redis(),
        Component::Redis,
        "redis",
        PORT,
        false,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures::*;

    #[test]
    fn password_reaches_redis_only_through_the_secret() {
        let cr = chat_service(MINIMAL);
        let d = build_redis_deployment(&cr).unwrap();
        let text = serde_json::to_string(&d).unwrap();
        assert!(text.contains("support-redis-password"));
        let pod = d.spec.unwrap().template.spec.unwrap();
        assert_eq!(
            pod.containers[0]
                .security_context
                .as_ref()
                .unwrap()
                .read_only_root_filesystem,
            Some(true)
        );
        let secret = build_redis_password_secret(&cr, "pw").unwrap();
        assert_eq!(secret.data.unwrap()[PASSWORD_KEY].0, b"pw");
    }
}
