//! Managed Redis: a single-pod Deployment (recent turns, cache and rate limits are rebuilt from
//! MongoDB or expire, so no volume), its Service and a generated password Secret.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, ExecAction, Probe, Secret, Service, TCPSocketAction, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::meta::{
    child_meta, label_selector, managed_pod_template, restricted_container_security, secret_env,
    workload_service,
};
use crate::layout::REDIS_PORT;
use crate::names::{Component, REDIS_PASSWORD_KEY};
use crate::validated::{ManagedRedis, ValidatedChatService};

/// The `redis` user of the official image.
const RUN_AS_USER: i64 = 999;

/// Created once with a random password and never applied again, so the password survives.
pub fn build_redis_password_secret(cs: &ValidatedChatService, password: &str) -> Secret {
    Secret {
        metadata: child_meta(cs, cs.names.redis_password(), Component::Redis),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            REDIS_PASSWORD_KEY.to_string(),
            ByteString(password.as_bytes().to_vec()),
        )])),
        ..Default::default()
    }
}

/// The managed Redis's eviction policy. Everything in it is a copy or expendable: recent turns
/// (MongoDB keeps every turn and refills them), cached answers and rate-limit windows. Evicting
/// any least-recently-used key, rather than only keys with a TTL, means a write never fails
/// with OOM; the cost is that an evicted rate-limit window restarts early.
pub const REDIS_EVICTION_POLICY: &str = "allkeys-lru";

/// The shell line that starts Redis. The password comes from the Secret through the environment
/// and is written by the shell's built-in printf into a config file on the pod's own volume
/// (mode 600), so it is in neither the pod spec nor any process's command line; `exec` leaves
/// Redis as the container's first process, so it gets SIGTERM itself. The line ends with Redis
/// options, so more may be appended.
pub fn redis_script(maxmemory_bytes: u64) -> String {
    format!(
        "umask 077 && printf 'requirepass \"%s\"\\n' \"$REDIS_PASSWORD\" > /data/redis.conf && exec redis-server /data/redis.conf --maxmemory {maxmemory_bytes} --maxmemory-policy {REDIS_EVICTION_POLICY} --save '' --appendonly no --dir /data"
    )
}

pub fn build_redis_deployment(cs: &ValidatedChatService, managed: &ManagedRedis) -> Deployment {
    let container = Container {
        name: "redis".into(),
        image: Some(managed.image.clone()),
        command: Some(vec!["sh".into(), "-c".into()]),
        args: Some(vec![redis_script(managed.maxmemory_bytes)]),
        env: Some(vec![secret_env(
            "REDIS_PASSWORD",
            &cs.names.redis_password(),
            REDIS_PASSWORD_KEY,
        )]),
        ports: Some(vec![ContainerPort {
            name: Some("redis".into()),
            container_port: REDIS_PORT,
            ..Default::default()
        }]),
        resources: Some(managed.resources.clone()),
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
    Deployment {
        metadata: child_meta(cs, cs.names.redis(), Component::Redis),
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            selector: label_selector(cs, Component::Redis),
            // Never two Redis pods with diverging data behind one Service.
            strategy: Some(DeploymentStrategy {
                type_: Some("Recreate".into()),
                ..Default::default()
            }),
            template: managed_pod_template(
                cs,
                Component::Redis,
                RUN_AS_USER,
                None,
                vec![container],
                "data",
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn build_redis_service(cs: &ValidatedChatService) -> Service {
    workload_service(cs, Component::Redis, "redis", REDIS_PORT, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::*;

    #[test]
    fn password_reaches_redis_only_through_the_secret() {
        let cs = validated(MINIMAL);
        let d = build_redis_deployment(&cs, managed_redis(&cs));
        let redis = container(&d, "redis");
        assert_eq!(
            secret_ref(env_var(redis, "REDIS_PASSWORD")),
            ("support-redis-password", "password")
        );
        assert!(!serde_json::to_string(&d).unwrap().contains("\"r\""));
        let script = &redis.args.as_ref().unwrap()[0];
        assert!(
            script.contains(&format!("--maxmemory {} ", 192 * 1024 * 1024))
                && script.contains("--maxmemory-policy allkeys-lru")
                && !script.contains("--requirepass"),
            "{script}"
        );
        assert_eq!(
            redis.image.as_deref(),
            Some("docker.io/library/redis:7.4-alpine")
        );
        assert_eq!(
            redis
                .security_context
                .as_ref()
                .unwrap()
                .read_only_root_filesystem,
            Some(true)
        );
        let secret = build_redis_password_secret(&cs, "pw");
        assert_eq!(secret_value(&secret, REDIS_PASSWORD_KEY), "pw");
        assert_eq!(
            build_redis_service(&cs).spec.unwrap().cluster_ip,
            None,
            "a Deployment's Service needs no stable pod names"
        );
    }
}
