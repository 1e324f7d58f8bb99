//! Managed Ollama: a StatefulSet whose pods pull the requested models into their volume before
//! they start serving (an init container), a headless Service so the chat service can balance
//! pods individually, and GPU requests when asked.

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, HTTPGetAction, Probe, ResourceRequirements, Service,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::meta::{
    child_meta, claim_retention, label_selector, managed_pod_template,
    restricted_container_security, volume_claim, workload_service,
};
use crate::layout::OLLAMA_PORT;
use crate::names::Component;
use crate::validated::{ManagedOllama, ValidatedChatService};

const MODELS_DIR: &str = "/models";
const RUN_AS_USER: i64 = 1000;

/// Shell run by the init container: start a private server on loopback, pull every model, stop.
/// Models are passed as arguments, never interpolated into the script.
const PULL_SCRIPT: &str = r#"set -eu
OLLAMA_HOST=127.0.0.1:11435 ollama serve & server=$!
export OLLAMA_HOST=127.0.0.1:11435
until ollama list >/dev/null 2>&1; do sleep 1; done
for model in "$@"; do echo "pulling $model"; ollama pull "$model"; done
kill "$server"; wait "$server" || true"#;

fn env() -> Vec<EnvVar> {
    [
        ("OLLAMA_MODELS", MODELS_DIR),
        ("HOME", "/tmp"),
        ("OLLAMA_HOST", "0.0.0.0:11434"),
    ]
    .into_iter()
    .map(|(name, value)| EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    })
    .collect()
}

fn mounts() -> Vec<VolumeMount> {
    vec![
        VolumeMount {
            name: "models".into(),
            mount_path: MODELS_DIR.into(),
            ..Default::default()
        },
        VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            ..Default::default()
        },
    ]
}

pub fn build_ollama_statefulset(cs: &ValidatedChatService, managed: &ManagedOllama) -> StatefulSet {
    let image = managed.image.clone();
    let resources = managed.resources.clone();

    let mut pull_args = vec![
        "-c".to_string(),
        PULL_SCRIPT.to_string(),
        "pull-models".to_string(),
    ];
    pull_args.extend(managed.models.iter().cloned());
    let pull = Container {
        name: "pull-models".into(),
        image: Some(image.clone()),
        command: Some(vec!["sh".into()]),
        args: Some(pull_args),
        env: Some(env()),
        resources: Some(ResourceRequirements {
            requests: resources.requests.clone(),
            limits: resources.limits.clone(),
            ..Default::default()
        }),
        security_context: Some(restricted_container_security()),
        volume_mounts: Some(mounts()),
        ..Default::default()
    };
    let serve = Container {
        name: "ollama".into(),
        image: Some(image),
        args: Some(vec!["serve".into()]),
        env: Some(env()),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: OLLAMA_PORT,
            ..Default::default()
        }]),
        resources: Some(resources),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/api/tags".into()),
                port: IntOrString::String("http".into()),
                ..Default::default()
            }),
            period_seconds: Some(10),
            ..Default::default()
        }),
        liveness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/api/version".into()),
                port: IntOrString::String("http".into()),
                ..Default::default()
            }),
            period_seconds: Some(20),
            initial_delay_seconds: Some(10),
            ..Default::default()
        }),
        security_context: Some(restricted_container_security()),
        volume_mounts: Some(mounts()),
        ..Default::default()
    };
    StatefulSet {
        metadata: child_meta(cs, cs.names.ollama(), Component::Ollama),
        spec: Some(StatefulSetSpec {
            replicas: Some(managed.replicas),
            service_name: Some(cs.names.ollama()),
            // Pods are independent model servers; start them all at once.
            pod_management_policy: Some("Parallel".into()),
            selector: label_selector(cs, Component::Ollama),
            template: managed_pod_template(
                cs,
                Component::Ollama,
                RUN_AS_USER,
                Some(vec![pull]),
                vec![serve],
                "tmp",
            ),
            persistent_volume_claim_retention_policy: Some(claim_retention(managed.retention)),
            volume_claim_templates: Some(vec![volume_claim(
                cs,
                Component::Ollama,
                "models",
                managed.storage.clone(),
                managed.storage_class_name.clone(),
            )]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn build_ollama_service(cs: &ValidatedChatService) -> Service {
    workload_service(cs, Component::Ollama, "http", OLLAMA_PORT, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::*;

    #[test]
    fn models_are_pulled_before_serving_and_gpus_requested() {
        let cs = validated(FULL);
        let sts = build_ollama_statefulset(&cs, cs.ollama.as_ref().unwrap());
        assert_eq!(sts.spec.as_ref().unwrap().replicas, Some(2));
        let pull = init_container(&sts, "pull-models");
        assert_eq!(
            pull.args.as_ref().unwrap().last().map(String::as_str),
            Some("gemma3:270m")
        );
        let resources = container(&sts, "ollama").resources.as_ref().unwrap();
        assert_eq!(resources.limits.as_ref().unwrap()["nvidia.com/gpu"].0, "1");
        assert_eq!(
            resources.requests.as_ref().unwrap()["nvidia.com/gpu"].0,
            "1"
        );
        assert_eq!(
            pull.resources.as_ref().unwrap().limits,
            resources.limits,
            "the pull gets the serving container's resources"
        );
        assert_eq!(claim_storage(&sts, "models"), "5Gi");
        assert_eq!(
            build_ollama_service(&cs)
                .spec
                .unwrap()
                .cluster_ip
                .as_deref(),
            Some("None")
        );
    }
}
