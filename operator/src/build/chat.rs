//! The chat-service pods: their Deployment and ServiceAccount, and the checksum that rolls them
//! when what they read at start-up changes.

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    HTTPGetAction, KeyToPath, Lifecycle, LifecycleHandler, PodSpec, PodTemplateSpec, Probe, Secret,
    ServiceAccount, SleepAction, TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sha2::{Digest, Sha256};

use super::meta::{
    child_meta, label_selector, labels, restricted_container_security, restricted_pod_security,
    secret_env, secret_volume,
};
use crate::layout::{
    AUTH_DIR, AUTH_FILE, CHAT_PORT, CONFIG_DIR, CONFIG_KEY, MONGODB_CA_DIR, MONGODB_CA_FILE,
    PRE_STOP_SECONDS, REDIS_CA_DIR, REDIS_CA_FILE, STORE_MARGIN_SECONDS, tokenizer_dir,
};
use crate::names::{Component, MONGODB_URI_KEY, REDIS_URL_KEY};
use crate::validated::render::{ENV_MONGODB_URI, ENV_REDIS_URL};
use crate::validated::{MountedTokenizer, Replicas, ValidatedChatService};

/// Pod-template annotation whose change rolls the pods when config or connection data change.
pub const CHECKSUM_ANNOTATION: &str = "chatoperator.dev/config-checksum";
/// Distroless "nonroot" user; the chat-service image runs as it.
const RUN_AS_USER: i64 = 65532;

/// SHA-256 over what the pods read at start-up (config file, connection Secret, tokenizer
/// files), so any change in one gives the pod template a new annotation and Kubernetes rolls the
/// pods.
pub fn pod_checksum(
    config: &ConfigMap,
    connection: &Secret,
    tokenizers: &[MountedTokenizer],
) -> String {
    let mut hash = Sha256::new();
    for (key, value) in config.data.iter().flatten() {
        hash.update(key.as_bytes());
        hash.update([0]);
        hash.update(value.as_bytes());
        hash.update([0]);
    }
    for (key, value) in connection.data.iter().flatten() {
        hash.update(key.as_bytes());
        hash.update([0]);
        hash.update(&value.0);
        hash.update([0]);
    }
    for tokenizer in tokenizers {
        hash.update(tokenizer.digest.as_bytes());
        hash.update([0]);
    }
    hex::encode(hash.finalize())
}

pub fn build_service_account(cs: &ValidatedChatService) -> ServiceAccount {
    ServiceAccount {
        metadata: child_meta(cs, cs.names.chat(), Component::Chat),
        // The chat service never calls the Kubernetes API.
        automount_service_account_token: Some(false),
        ..Default::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Default::default()
    }
}

fn env(cs: &ValidatedChatService) -> Vec<EnvVar> {
    let connection = cs.names.connection_secret();
    let mut env = vec![
        EnvVar {
            name: "CHAT_SERVICE_CONFIG".into(),
            value: Some(format!("{CONFIG_DIR}/{CONFIG_KEY}")),
            ..Default::default()
        },
        secret_env(ENV_MONGODB_URI, &connection, MONGODB_URI_KEY),
        secret_env(ENV_REDIS_URL, &connection, REDIS_URL_KEY),
    ];
    for key in &cs.chat.api_keys {
        env.push(secret_env(&key.variable, &key.secret.name, &key.secret.key));
    }
    env
}

fn read_only_mount(volume: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: volume.into(),
        mount_path: path.into(),
        read_only: Some(true),
        ..Default::default()
    }
}

/// The config, scratch space, and the Secret files the spec asks for.
fn volumes_and_mounts(cs: &ValidatedChatService) -> (Vec<Volume>, Vec<VolumeMount>) {
    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: cs.names.config_map(),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        },
    ];
    let mut mounts = vec![
        read_only_mount("config", CONFIG_DIR),
        VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            ..Default::default()
        },
    ];
    if let Some(keys) = &cs.chat.auth_keys {
        volumes.push(secret_volume("api-keys", &keys.name, &keys.key, AUTH_FILE));
        mounts.push(read_only_mount("api-keys", AUTH_DIR));
    }
    if let Some(ca) = &cs.chat.mongodb_ca {
        volumes.push(secret_volume(
            "mongodb-ca",
            &ca.name,
            &ca.key,
            MONGODB_CA_FILE,
        ));
        mounts.push(read_only_mount("mongodb-ca", MONGODB_CA_DIR));
    }
    if let Some(ca) = &cs.chat.redis_ca {
        volumes.push(secret_volume("redis-ca", &ca.name, &ca.key, REDIS_CA_FILE));
        mounts.push(read_only_mount("redis-ca", REDIS_CA_DIR));
    }
    for (i, tokenizer) in cs.chat.tokenizers.iter().enumerate() {
        let volume = format!("tokenizer-{i}");
        let key = &tokenizer.config_map.key;
        volumes.push(Volume {
            name: volume.clone(),
            config_map: Some(ConfigMapVolumeSource {
                name: tokenizer.config_map.name.clone(),
                items: Some(vec![KeyToPath {
                    key: key.clone(),
                    path: key.clone(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        });
        mounts.push(read_only_mount(&volume, &tokenizer_dir(i)));
    }
    (volumes, mounts)
}

pub fn build_deployment(cs: &ValidatedChatService, checksum: &str) -> Deployment {
    let chat = &cs.chat;
    let overrides = chat.overrides.clone();

    let mut pod_labels = overrides.labels.clone();
    pod_labels.extend(labels(cs, Component::Chat));
    let mut annotations = overrides.annotations.clone();
    annotations.insert(CHECKSUM_ANNOTATION.into(), checksum.into());
    let (volumes, mounts) = volumes_and_mounts(cs);

    let topology_spread_constraints = if overrides.topology_spread_constraints.is_empty() {
        vec![TopologySpreadConstraint {
            max_skew: 1,
            topology_key: "kubernetes.io/hostname".into(),
            when_unsatisfiable: "ScheduleAnyway".into(),
            label_selector: Some(label_selector(cs, Component::Chat)),
            ..Default::default()
        }]
    } else {
        overrides.topology_spread_constraints.clone()
    };

    let container = Container {
        name: "chat-service".into(),
        image: Some(chat.image.clone()),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: CHAT_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        env: Some(env(cs)),
        resources: Some(chat.resources.clone()),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        readiness_probe: Some(http_probe("/readyz", 5, 2)),
        security_context: Some(restricted_container_security()),
        volume_mounts: Some(mounts),
        // The image has no shell or `sleep`: the kubelet's own sleep action.
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: PRE_STOP_SECONDS,
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };

    Deployment {
        metadata: child_meta(cs, cs.names.chat(), Component::Chat),
        spec: Some(DeploymentSpec {
            // With autoscaling the field is left out, so the HPA alone owns it.
            replicas: match chat.replicas {
                Replicas::Fixed(replicas) => Some(replicas),
                Replicas::Autoscaled(_) => None,
            },
            selector: label_selector(cs, Component::Chat),
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::String("25%".into())),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(annotations),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(cs.names.chat()),
                    automount_service_account_token: Some(false),
                    security_context: Some(restricted_pod_security(RUN_AS_USER)),
                    // preStop, then SIGTERM and the service's drain, then storing the turns it
                    // cut: the kubelet's SIGKILL comes only after all three.
                    termination_grace_period_seconds: Some(
                        PRE_STOP_SECONDS
                            + i64::try_from(cs.config.shutdown_grace_seconds)
                                .unwrap_or(i64::MAX / 2)
                            + STORE_MARGIN_SECONDS,
                    ),
                    containers: vec![container],
                    volumes: Some(volumes),
                    node_selector: (!overrides.node_selector.is_empty())
                        .then_some(overrides.node_selector),
                    tolerations: (!overrides.tolerations.is_empty())
                        .then_some(overrides.tolerations),
                    affinity: overrides.affinity,
                    priority_class_name: overrides.priority_class_name,
                    topology_spread_constraints: Some(topology_spread_constraints),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::{config_map, connection};
    use crate::fixtures::*;
    use crate::validated::Redis;

    #[test]
    fn the_pod_outlasts_the_drain_of_the_longest_turn() {
        let cs = validated(MINIMAL);
        // A turn may run routing.totalTimeoutMs; the service drains at least that long.
        let turn_seconds = cs.config.routing.total_timeout_ms.div_ceil(1000);
        assert!(cs.config.shutdown_grace_seconds >= turn_seconds);
        let d = build_deployment(&cs, "abc");
        let pod = pod(&d);
        assert_eq!(
            pod.termination_grace_period_seconds,
            Some(PRE_STOP_SECONDS + cs.config.shutdown_grace_seconds as i64 + STORE_MARGIN_SECONDS)
        );
        let pre_stop = container(&d, "chat-service")
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref())
            .and_then(|h| h.sleep.as_ref())
            .expect("a preStop sleep");
        assert_eq!(pre_stop.seconds, PRE_STOP_SECONDS);
    }

    #[test]
    fn deployment_is_restricted_probed_and_spread() {
        let d = build_deployment(&validated(MINIMAL), "abc");
        assert_eq!(d.spec.as_ref().unwrap().replicas, Some(2));
        let pod = pod(&d);
        let security = pod.security_context.as_ref().unwrap();
        assert_eq!(security.run_as_non_root, Some(true));
        assert_eq!(
            security.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        let c = container(&d, "chat-service");
        assert_eq!(
            c.image.as_deref(),
            Some("ghcr.io/chatoperator/chat-service:0.1.0")
        );
        let cs = c.security_context.as_ref().unwrap();
        assert_eq!(cs.allow_privilege_escalation, Some(false));
        assert_eq!(cs.read_only_root_filesystem, Some(true));
        assert_eq!(
            cs.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..])
        );
        assert!(c.liveness_probe.is_some() && c.readiness_probe.is_some());
        let tsc = pod.topology_spread_constraints.as_ref().unwrap();
        assert_eq!(tsc[0].topology_key, "kubernetes.io/hostname");
        assert_eq!(pod_annotations(&d)[CHECKSUM_ANNOTATION], "abc");
        assert_eq!(
            secret_ref(env_var(c, "MONGODB_URI")),
            ("support-connection", "uri")
        );
        assert_eq!(
            secret_ref(env_var(c, "REDIS_URL")),
            ("support-connection", "redis-url")
        );
        assert_eq!(volume_names(&d), ["config", "tmp"]);
    }

    #[test]
    fn overrides_and_autoscaling_shape_the_deployment() {
        let d = build_deployment(&validated(FULL), "abc");
        assert_eq!(
            d.spec.as_ref().unwrap().replicas,
            None,
            "the HPA owns replicas"
        );
        let pod = pod(&d);
        assert_eq!(pod.node_selector.as_ref().unwrap()["pool"], "chat");
        assert_eq!(pod.priority_class_name.as_deref(), Some("high"));
        let meta = d.spec.as_ref().unwrap().template.metadata.as_ref().unwrap();
        assert_eq!(meta.labels.as_ref().unwrap()["team"], "a");
        assert_eq!(pod_annotations(&d)["example.com/owner"], "a");
        let c = container(&d, "chat-service");
        assert_eq!(
            c.image.as_deref(),
            Some("registry.example/chat-service:9.9.9")
        );
        assert_eq!(
            secret_ref(env_var(c, "BACKEND_HOSTED_API_KEY")),
            ("llm-keys", "hosted")
        );
        assert_eq!(
            volume_names(&d),
            ["config", "tmp", "api-keys", "mongodb-ca", "redis-ca"]
        );
        // Each CA Secret lands where the rendered config names it.
        let config = crate::validated::render::render_config(&crate::fixtures::chat_service(FULL));
        for (volume, secret, ca_file) in [
            (
                "mongodb-ca",
                "docdb",
                config.history.mongodb.tls.unwrap().ca_file,
            ),
            (
                "redis-ca",
                "redis-ca",
                config.history.redis.tls.unwrap().ca_file,
            ),
        ] {
            let source = pod
                .volumes
                .as_ref()
                .unwrap()
                .iter()
                .find(|v| v.name == volume)
                .and_then(|v| v.secret.clone())
                .unwrap();
            assert_eq!(source.secret_name.as_deref(), Some(secret));
            let item = &source.items.as_ref().unwrap()[0];
            let mount = c
                .volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .find(|m| m.name == volume)
                .unwrap();
            assert_eq!(format!("{}/{}", mount.mount_path, item.path), ca_file);
        }
    }

    #[test]
    fn a_tokenizer_configmap_is_mounted_read_only_where_the_config_names_it() {
        let cr = crate::fixtures::with_tokenizer(MINIMAL);
        let cs = crate::reconcile::validate::validate(
            &cr,
            &crate::fixtures::fake_references(&cr),
            "0.1.0",
        )
        .unwrap();
        let d = build_deployment(&cs, "x");
        assert_eq!(volume_names(&d), ["config", "tmp", "tokenizer-0"]);
        let volume = pod(&d)
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "tokenizer-0")
            .and_then(|v| v.config_map.clone())
            .unwrap();
        assert_eq!(volume.name, "smollm2-tokenizer");
        let item = &volume.items.as_ref().unwrap()[0];
        assert_eq!(item.key, "tokenizer.json.gz");
        let mount = container(&d, "chat-service")
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == "tokenizer-0")
            .unwrap();
        assert_eq!(mount.read_only, Some(true));
        assert_eq!(
            format!("{}/{}", mount.mount_path, item.path),
            cs.config.context.tokenizers[0].file
        );
    }

    #[test]
    fn checksum_changes_with_the_tokenizer_content() {
        let cs = validated(MINIMAL);
        let config = config_map::build_config_map(&cs).unwrap();
        let connection = connection::build_connection_secret(&cs);
        let tokenizer = |digest: &str| MountedTokenizer {
            config_map: crate::crd::ConfigMapKeyRef {
                name: "t".into(),
                key: "k".into(),
            },
            digest: digest.into(),
        };
        let one = pod_checksum(&config, &connection, &[tokenizer("aa")]);
        assert_eq!(one, pod_checksum(&config, &connection, &[tokenizer("aa")]));
        assert_ne!(one, pod_checksum(&config, &connection, &[tokenizer("bb")]));
        assert_ne!(one, pod_checksum(&config, &connection, &[]));
    }

    #[test]
    fn checksum_changes_with_config_or_connection() {
        let mut cs = validated(MINIMAL);
        let config = config_map::build_config_map(&cs).unwrap();
        let base = pod_checksum(&config, &connection::build_connection_secret(&cs), &[]);
        assert_eq!(
            base,
            pod_checksum(&config, &connection::build_connection_secret(&cs), &[])
        );
        if let Redis::Managed(redis) = &mut cs.redis {
            redis.password = Some("other".into());
        }
        assert_ne!(
            base,
            pod_checksum(&config, &connection::build_connection_secret(&cs), &[])
        );
    }
}
