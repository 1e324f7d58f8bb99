//! What validation yields: either the [`ValidatedChatService`], every decision about a
//! ChatService made once (defaults applied, secret material read, the config rendered by
//! [`render`]), which the builders consume alone and never look at the raw resource; or the
//! [`ConfigProblem`]s the user must fix. Made by [`crate::reconcile::validate`]; a module of its
//! own because both the build and the status steps read it.

pub mod render;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

use self::render::ChatConfig;
use crate::crd::{
    AutoscalingSpec, ConfigMapKeyRef, IngressSpec, MongoFlavor, PodTemplateOverrides,
    RetentionPolicy, SecretKeyRef, ServiceType,
};
use crate::names::ChildNames;

/// One thing the user must fix, as a sentence that names the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// CamelCase reason for the condition and Event.
    pub reason: &'static str,
    pub message: String,
}

/// The single input of the build step.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedChatService {
    pub name: String,
    pub namespace: String,
    /// Controller reference of every child, so the garbage collector removes them with it.
    pub owner: OwnerReference,
    pub names: ChildNames,
    pub chat: ChatPods,
    pub service: ChatServiceExposure,
    pub ingress: Option<IngressSpec>,
    pub redis: Redis,
    pub mongodb: Mongodb,
    pub ollama: Option<ManagedOllama>,
    /// NetworkPolicies in front of the managed stores and Ollama.
    pub network_policies: bool,
    /// Namespaces besides its own whose pods may call the chat pods.
    pub client_namespaces: Vec<String>,
    /// The operator's own namespace, whose pods ask the chat pods what they see of their back
    /// ends and stores (set by the controller, not the spec).
    pub operator_namespace: Option<String>,
    /// The chat-service config, checked by the service's own validation.
    pub config: ChatConfig,
}

/// The chat-service pods.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatPods {
    pub image: String,
    pub replicas: Replicas,
    pub resources: ResourceRequirements,
    pub overrides: PodTemplateOverrides,
    /// External back ends' API keys, each read from a Secret key into a variable.
    pub api_keys: Vec<ApiKeyEnv>,
    /// The callers' API-key file (`spec.auth.apiKeysSecret`), mounted when set.
    pub auth_keys: Option<SecretKeyRef>,
    /// The external MongoDB's CA bundle, mounted when set.
    pub mongodb_ca: Option<SecretKeyRef>,
    /// The external Redis's CA, mounted when set.
    pub redis_ca: Option<SecretKeyRef>,
    /// The models' tokenizers, in `spec.context.tokenizers` order (the config names the files
    /// by that index), each mounted from its ConfigMap.
    pub tokenizers: Vec<MountedTokenizer>,
}

/// A tokenizer file the chat pods load at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountedTokenizer {
    pub config_map: ConfigMapKeyRef,
    /// SHA-256 of the file, hex: part of the pod checksum, so that a new tokenizer in the same
    /// ConfigMap rolls the pods (which load it only at start).
    pub digest: String,
}

/// Who sets the chat Deployment's replica count.
#[derive(Debug, Clone, PartialEq)]
pub enum Replicas {
    /// The operator, to this number.
    Fixed(i32),
    /// A HorizontalPodAutoscaler; the Deployment leaves the field out.
    Autoscaled(AutoscalingSpec),
}

/// A back end's API key: the variable and the Secret key it is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyEnv {
    pub variable: String,
    pub secret: SecretKeyRef,
}

/// The Service in front of the chat pods.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatServiceExposure {
    pub type_: ServiceType,
    pub port: i32,
    pub annotations: BTreeMap<String, String>,
}

/// Redis, run by the operator or somebody else (the schema allows exactly one).
#[derive(Debug, Clone, PartialEq)]
pub enum Redis {
    Managed(ManagedRedis),
    External(ExternalRedis),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ManagedRedis {
    pub image: String,
    pub resources: ResourceRequirements,
    /// Redis's `maxmemory`: a share of the container's memory limit, so that Redis evicts
    /// before the kernel kills it.
    pub maxmemory_bytes: u64,
    /// The generated password; `None` until the provision step has created its Secret.
    pub password: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ExternalRedis {
    /// `host:port`.
    pub address: String,
    pub tls: bool,
    pub database: i32,
    pub password: Option<String>,
    /// The CA Secret key the chat pods verify the server against.
    pub ca: Option<SecretKeyRef>,
}

/// MongoDB, run by the operator or somebody else (the schema allows exactly one).
#[derive(Debug, Clone, PartialEq)]
pub enum Mongodb {
    Managed(ManagedMongodb),
    External(ExternalMongodb),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ManagedMongodb {
    pub image: String,
    pub resources: ResourceRequirements,
    pub storage: Quantity,
    pub storage_class_name: Option<String>,
    /// The generated root user; `None` until the provision step has created its Secret.
    pub credentials: Option<MongoCredentials>,
    /// Whether the data volume and the credentials Secret outlive the ChatService.
    pub retention: RetentionPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MongoCredentials {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ExternalMongodb {
    /// The URI from the referenced Secret, checked to be a MongoDB URI.
    pub uri: String,
    pub flavor: MongoFlavor,
    pub ca: Option<SecretKeyRef>,
}

/// The Ollama StatefulSet run by the operator.
#[derive(Debug, Clone, PartialEq)]
pub struct ManagedOllama {
    pub replicas: i32,
    pub image: String,
    pub models: Vec<String>,
    /// With the GPUs, when asked for, in both requests and limits.
    pub resources: ResourceRequirements,
    pub storage: Quantity,
    pub storage_class_name: Option<String>,
    /// Whether the model volumes outlive the ChatService.
    pub retention: RetentionPolicy,
}

impl ValidatedChatService {
    /// In-cluster URL of the chat API, reported in status.
    pub fn endpoint(&self) -> String {
        let host = format!("{}.{}.svc", self.names.chat(), self.namespace);
        match self.service.port {
            80 => format!("http://{host}"),
            port => format!("http://{host}:{port}"),
        }
    }

    /// Whether the HPA scales on the per-pod custom metric (requests in flight), which needs a
    /// metrics adapter.
    pub fn scales_on_requests_in_flight(&self) -> bool {
        matches!(&self.chat.replicas, Replicas::Autoscaled(a) if a.in_flight_requests_per_pod.is_some())
    }

    /// Names of the generated credential Secrets, which are created once and never applied.
    pub fn generated_secrets(&self) -> Vec<String> {
        let mut names = Vec::new();
        if matches!(self.redis, Redis::Managed(_)) {
            names.push(self.names.redis_password());
        }
        if matches!(self.mongodb, Mongodb::Managed(_)) {
            names.push(self.names.mongodb_credentials());
        }
        names
    }
}
