//! The chat-service pods and what sits directly around them: Deployment, Service,
//! ServiceAccount, HorizontalPodAutoscaler, PodDisruptionBudget and Ingress.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HPAScalingRules, HorizontalPodAutoscaler,
    HorizontalPodAutoscalerBehavior, HorizontalPodAutoscalerSpec, MetricIdentifier, MetricSpec,
    MetricTarget, PodsMetricSource, ResourceMetricSource,
};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, KeyToPath, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
    Secret, SecretKeySelector, SecretVolumeSource, Service, ServiceAccount, ServicePort,
    ServiceSpec, TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::{
    HTTPIngressPath, HTTPIngressRuleValue, Ingress, IngressBackend, IngressRule,
    IngressServiceBackend, IngressSpec as K8sIngressSpec, IngressTLS, ServiceBackendPort,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use sha2::{Digest, Sha256};

use super::config::{AUTH_DIR, AUTH_FILE, CONFIG_DIR, CONFIG_KEY, api_key_env};
use super::connection::{MONGODB_CA_DIR, MONGODB_CA_FILE, MONGODB_URI_KEY, REDIS_URL_KEY};
use super::{
    ChildNames, Component, child_meta, label_selector, labels, restricted_container_security,
    restricted_pod_security, selector_labels,
};
use crate::crd::{ChatService, ServiceType};
use crate::error::Result;

pub const CONTAINER_PORT: i32 = 8080;
pub const SHUTDOWN_GRACE_SECONDS: u64 = 30;
pub const DEFAULT_REPLICAS: i32 = 2;
pub const DEFAULT_SERVICE_PORT: i32 = 80;
/// Pod-template annotation whose change rolls the pods when config or connection data change.
pub const CHECKSUM_ANNOTATION: &str = "chatoperator.dev/config-checksum";
/// Distroless "nonroot" user; the chat-service image runs as it.
const RUN_AS_USER: i64 = 65532;

/// Image of the chat service that ships with this operator version.
pub fn default_image(operator_version: &str) -> String {
    format!("ghcr.io/chatoperator/chat-service:{operator_version}")
}

/// SHA-256 over what the pods read at start-up (config file and connection Secret), so any change
/// in either gives the pod template a new annotation and Kubernetes rolls the pods.
pub fn pod_checksum(config: &ConfigMap, connection: &Secret) -> String {
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
    hex::encode(hash.finalize())
}

pub fn build_service_account(cr: &ChatService) -> Result<ServiceAccount> {
    Ok(ServiceAccount {
        metadata: child_meta(cr, ChildNames::of(cr).chat(), Component::Chat)?,
        // The chat service never calls the Kubernetes API.
        automount_service_account_token: Some(false),
        ..Default::default()
    })
}

fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
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

fn quantities(pairs: &[(&str, &str)]) -> BTreeMap<String, Quantity> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
        .collect()
}

pub fn default_resources(
    requests: &[(&str, &str)],
    limits: &[(&str, &str)],
) -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(quantities(requests)),
        limits: Some(quantities(limits)),
        ..Default::default()
    }
}

pub fn build_deployment(
    cr: &ChatService,
    checksum: &str,
    operator_version: &str,
) -> Result<Deployment> {
    let spec = &cr.spec;
    let names = ChildNames::of(cr);
    let overrides = spec.pod_template.clone().unwrap_or_default();

    let mut pod_labels = overrides.labels.clone();
    pod_labels.extend(labels(cr, Component::Chat));
    let mut annotations = overrides.annotations.clone();
    annotations.insert(CHECKSUM_ANNOTATION.into(), checksum.into());

    let mut env = vec![
        EnvVar {
            name: "CHAT_SERVICE_CONFIG".into(),
            value: Some(format!("{CONFIG_DIR}/{CONFIG_KEY}")),
            ..Default::default()
        },
        secret_env(
            chat_config::ENV_MONGODB_URI,
            &names.connection_secret(),
            MONGODB_URI_KEY,
        ),
        secret_env(
            chat_config::ENV_REDIS_URL,
            &names.connection_secret(),
            REDIS_URL_KEY,
        ),
    ];
    for backend in &spec.backends {
        if let Some(secret) = &backend.api_key_secret {
            env.push(secret_env(
                &api_key_env(&backend.name),
                &secret.name,
                &secret.key,
            ));
        }
    }

    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: names.config_map(),
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
        VolumeMount {
            name: "config".into(),
            mount_path: CONFIG_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        },
        VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            ..Default::default()
        },
    ];
    if let Some(auth) = &spec.auth {
        volumes.push(secret_volume(
            "api-keys",
            &auth.api_keys_secret.name,
            &auth.api_keys_secret.key,
            AUTH_FILE,
        ));
        mounts.push(VolumeMount {
            name: "api-keys".into(),
            mount_path: AUTH_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    if let Some(ca) = spec
        .history
        .mongodb
        .external
        .as_ref()
        .and_then(|e| e.ca_secret.as_ref())
    {
        volumes.push(secret_volume(
            "mongodb-ca",
            &ca.name,
            &ca.key,
            MONGODB_CA_FILE,
        ));
        mounts.push(VolumeMount {
            name: "mongodb-ca".into(),
            mount_path: MONGODB_CA_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
    }

    let topology_spread_constraints = if overrides.topology_spread_constraints.is_empty() {
        vec![TopologySpreadConstraint {
            max_skew: 1,
            topology_key: "kubernetes.io/hostname".into(),
            when_unsatisfiable: "ScheduleAnyway".into(),
            label_selector: Some(label_selector(cr, Component::Chat)),
            ..Default::default()
        }]
    } else {
        overrides.topology_spread_constraints.clone()
    };

    let container = Container {
        name: "chat-service".into(),
        image: Some(
            spec.image
                .clone()
                .unwrap_or_else(|| default_image(operator_version)),
        ),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: CONTAINER_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        env: Some(env),
        resources: Some(spec.resources.clone().unwrap_or_else(|| {
            default_resources(
                &[("cpu", "100m"), ("memory", "128Mi")],
                &[("memory", "512Mi")],
            )
        })),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        readiness_probe: Some(http_probe("/readyz", 5, 2)),
        security_context: Some(restricted_container_security()),
        volume_mounts: Some(mounts),
        ..Default::default()
    };

    Ok(Deployment {
        metadata: child_meta(cr, names.chat(), Component::Chat)?,
        spec: Some(DeploymentSpec {
            // With autoscaling the field is left out, so the HPA alone owns it.
            replicas: match spec.autoscaling {
                Some(_) => None,
                None => Some(spec.replicas.unwrap_or(DEFAULT_REPLICAS)),
            },
            selector: label_selector(cr, Component::Chat),
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
                    service_account_name: Some(names.chat()),
                    automount_service_account_token: Some(false),
                    security_context: Some(restricted_pod_security(RUN_AS_USER)),
                    termination_grace_period_seconds: Some(SHUTDOWN_GRACE_SECONDS as i64 + 5),
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
    })
}

fn secret_volume(volume: &str, secret: &str, key: &str, path: &str) -> Volume {
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

pub fn service_port(cr: &ChatService) -> i32 {
    cr.spec
        .service
        .as_ref()
        .and_then(|s| s.port)
        .unwrap_or(DEFAULT_SERVICE_PORT)
}

pub fn build_service(cr: &ChatService) -> Result<Service> {
    let service = cr.spec.service.clone().unwrap_or_default();
    let mut metadata = child_meta(cr, ChildNames::of(cr).chat(), Component::Chat)?;
    if !service.annotations.is_empty() {
        metadata.annotations = Some(service.annotations.clone());
    }
    Ok(Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(
                match service.type_.unwrap_or(ServiceType::ClusterIP) {
                    ServiceType::ClusterIP => "ClusterIP",
                    ServiceType::NodePort => "NodePort",
                    ServiceType::LoadBalancer => "LoadBalancer",
                }
                .into(),
            ),
            selector: Some(selector_labels(cr, Component::Chat)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: service_port(cr),
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// In-cluster URL of the chat API, reported in status.
pub fn endpoint(cr: &ChatService) -> String {
    let port = service_port(cr);
    let host = format!(
        "{}.{}.svc",
        ChildNames::of(cr).chat(),
        cr.namespace().unwrap_or_default()
    );
    if port == 80 {
        format!("http://{host}")
    } else {
        format!("http://{host}:{port}")
    }
}

pub fn build_pdb(cr: &ChatService) -> Result<PodDisruptionBudget> {
    Ok(PodDisruptionBudget {
        metadata: child_meta(cr, ChildNames::of(cr).chat(), Component::Chat)?,
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(label_selector(cr, Component::Chat)),
            ..Default::default()
        }),
        ..Default::default()
    })
}

pub fn build_hpa(cr: &ChatService) -> Result<Option<HorizontalPodAutoscaler>> {
    let Some(autoscaling) = &cr.spec.autoscaling else {
        return Ok(None);
    };
    let mut metrics = Vec::new();
    for (resource, target) in [
        ("cpu", autoscaling.target_cpu_utilization_percentage),
        ("memory", autoscaling.target_memory_utilization_percentage),
    ] {
        if let Some(percent) = target {
            metrics.push(MetricSpec {
                type_: "Resource".into(),
                resource: Some(ResourceMetricSource {
                    name: resource.into(),
                    target: MetricTarget {
                        type_: "Utilization".into(),
                        average_utilization: Some(percent),
                        ..Default::default()
                    },
                }),
                ..Default::default()
            });
        }
    }
    if let Some(in_flight) = autoscaling.in_flight_requests_per_pod {
        metrics.push(MetricSpec {
            type_: "Pods".into(),
            pods: Some(PodsMetricSource {
                metric: MetricIdentifier {
                    name: "chat_requests_in_flight".into(),
                    selector: None,
                },
                target: MetricTarget {
                    type_: "AverageValue".into(),
                    average_value: Some(Quantity(in_flight.to_string())),
                    ..Default::default()
                },
            }),
            ..Default::default()
        });
    }
    let behavior = autoscaling.scale_down_stabilization_seconds.map(|seconds| {
        HorizontalPodAutoscalerBehavior {
            scale_down: Some(HPAScalingRules {
                stabilization_window_seconds: Some(seconds),
                ..Default::default()
            }),
            ..Default::default()
        }
    });
    Ok(Some(HorizontalPodAutoscaler {
        metadata: child_meta(cr, ChildNames::of(cr).chat(), Component::Chat)?,
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name: ChildNames::of(cr).chat(),
            },
            min_replicas: Some(autoscaling.min_replicas),
            max_replicas: autoscaling.max_replicas,
            metrics: Some(metrics),
            behavior,
        }),
        ..Default::default()
    }))
}

pub fn build_ingress(cr: &ChatService) -> Result<Option<Ingress>> {
    let Some(ingress) = &cr.spec.ingress else {
        return Ok(None);
    };
    let mut metadata = child_meta(cr, ChildNames::of(cr).chat(), Component::Chat)?;
    if !ingress.annotations.is_empty() {
        metadata.annotations = Some(ingress.annotations.clone());
    }
    let backend = IngressBackend {
        service: Some(IngressServiceBackend {
            name: ChildNames::of(cr).chat(),
            port: Some(ServiceBackendPort {
                name: Some("http".into()),
                ..Default::default()
            }),
        }),
        ..Default::default()
    };
    Ok(Some(Ingress {
        metadata,
        spec: Some(K8sIngressSpec {
            ingress_class_name: ingress.class_name.clone(),
            rules: Some(vec![IngressRule {
                host: ingress.host.clone(),
                http: Some(HTTPIngressRuleValue {
                    paths: vec![HTTPIngressPath {
                        path: Some("/".into()),
                        path_type: "Prefix".into(),
                        backend,
                    }],
                }),
            }]),
            tls: ingress.tls_secret_name.as_ref().map(|secret| {
                vec![IngressTLS {
                    hosts: ingress.host.clone().map(|h| vec![h]),
                    secret_name: Some(secret.clone()),
                }]
            }),
            ..Default::default()
        }),
        ..Default::default()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures::*;

    fn pod_spec(d: &Deployment) -> &PodSpec {
        d.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    #[test]
    fn deployment_is_restricted_probed_and_spread() {
        let cr = chat_service(MINIMAL);
        let d = build_deployment(&cr, "abc", "0.1.0").unwrap();
        let spec = d.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(2));
        let pod = pod_spec(&d);
        let security = pod.security_context.as_ref().unwrap();
        assert_eq!(security.run_as_non_root, Some(true));
        assert_eq!(
            security.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        let c = &pod.containers[0];
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
        let annotations = spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap();
        assert_eq!(annotations[CHECKSUM_ANNOTATION], "abc");
        let env: Vec<_> = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        assert!(
            env.contains(&"MONGODB_URI") && env.contains(&"REDIS_URL"),
            "{env:?}"
        );
        let mongo = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == "MONGODB_URI")
            .unwrap();
        let selector = mongo
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!(
            (selector.name.as_str(), selector.key.as_str()),
            ("support-connection", "uri")
        );
    }

    #[test]
    fn overrides_and_autoscaling_shape_the_deployment() {
        let cr = chat_service(FULL);
        let d = build_deployment(&cr, "abc", "0.1.0").unwrap();
        let spec = d.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, None, "the HPA owns replicas");
        let pod = pod_spec(&d);
        assert_eq!(pod.node_selector.as_ref().unwrap()["pool"], "chat");
        assert_eq!(pod.priority_class_name.as_deref(), Some("high"));
        let meta = spec.template.metadata.as_ref().unwrap();
        assert_eq!(meta.labels.as_ref().unwrap()["team"], "a");
        assert_eq!(meta.annotations.as_ref().unwrap()["example.com/owner"], "a");
        let c = &pod.containers[0];
        assert_eq!(
            c.image.as_deref(),
            Some("registry.example/chat-service:9.9.9")
        );
        let key = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == "BACKEND_HOSTED_API_KEY")
            .unwrap();
        assert_eq!(
            key.value_from
                .as_ref()
                .unwrap()
                .secret_key_ref
                .as_ref()
                .unwrap()
                .name,
            "llm-keys"
        );
        let volumes: Vec<_> = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .map(|v| v.name.as_str())
            .collect();
        assert!(
            volumes.contains(&"api-keys") && volumes.contains(&"mongodb-ca"),
            "{volumes:?}"
        );
    }

    #[test]
    fn hpa_has_every_requested_metric() {
        let hpa = build_hpa(&chat_service(FULL)).unwrap().unwrap();
        let spec = hpa.spec.unwrap();
        assert_eq!((spec.min_replicas, spec.max_replicas), (Some(2), 6));
        let metrics = spec.metrics.unwrap();
        assert_eq!(metrics.len(), 2);
        assert_eq!(
            metrics[1].pods.as_ref().unwrap().metric.name,
            "chat_requests_in_flight"
        );
        assert_eq!(
            spec.behavior
                .unwrap()
                .scale_down
                .unwrap()
                .stabilization_window_seconds,
            Some(120)
        );
        assert!(build_hpa(&chat_service(MINIMAL)).unwrap().is_none());
    }

    #[test]
    fn service_ingress_and_endpoint_follow_the_spec() {
        let cr = chat_service(FULL);
        let service = build_service(&cr).unwrap().spec.unwrap();
        assert_eq!(service.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(service.ports.unwrap()[0].port, 8443);
        assert_eq!(endpoint(&cr), "http://support.team-a.svc:8443");
        assert_eq!(
            endpoint(&chat_service(MINIMAL)),
            "http://support.team-a.svc"
        );
        let ingress = build_ingress(&cr).unwrap().unwrap().spec.unwrap();
        assert_eq!(
            ingress.tls.unwrap()[0].secret_name.as_deref(),
            Some("chat-tls")
        );
    }

    #[test]
    fn checksum_changes_with_config_or_connection() {
        let cr = chat_service(MINIMAL);
        let material = crate::build::SecretMaterial {
            redis_password: Some("a".into()),
            ..Default::default()
        };
        let config = crate::build::config::build_config_map(
            &cr,
            &crate::build::config::render_config(&cr).unwrap(),
        )
        .unwrap();
        let connection = crate::build::connection::build_connection_secret(&cr, &material).unwrap();
        let base = pod_checksum(&config, &connection);
        assert_eq!(base, pod_checksum(&config, &connection));
        let other = crate::build::SecretMaterial {
            redis_password: Some("b".into()),
            ..Default::default()
        };
        let connection2 = crate::build::connection::build_connection_secret(&cr, &other).unwrap();
        assert_ne!(base, pod_checksum(&config, &connection2));
    }
}
