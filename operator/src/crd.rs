//! The `ChatService` custom resource: what a platform team writes, and the status it reads.
//!
//! Everything the API server can check is in the schema (types, enums, ranges, patterns and CEL
//! rules), so a bad spec is refused at `kubectl apply` instead of surfacing later as a condition.
//!
//! Over 500 lines on purpose: the whole schema in one file, read top to bottom as the resource
//! reads, is what `crds/chatservice.yaml` is generated from and checked against.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crate::rollout::spec::{
    RolloutCandidate, RolloutGates, RolloutPhase, RolloutSpec, RolloutStatus, WindowFigures,
};

/// API group of the custom resource.
pub const GROUP: &str = "chatoperator.dev";

/// Longest ChatService name: child names add up to 22 characters and some (Services, StatefulSet
/// pods) must stay valid DNS labels of at most 63.
pub const MAX_NAME_LENGTH: usize = 40;

/// A complete AI chat back end: the chat-service Deployment plus its history stores and LLM back
/// ends, built and kept in shape by the ChatOperator.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "chatoperator.dev",
    version = "v1alpha1",
    kind = "ChatService",
    plural = "chatservices",
    shortname = "chatsvc",
    category = "ai",
    namespaced,
    status = "ChatServiceStatus",
    derive = "PartialEq",
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".status.replicas"),
    printcolumn(name = "Available", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Endpoint", type_ = "string", json_path = ".status.endpoint"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 40").message("metadata.name must be at most 40 characters: child names are derived from it")
)]
#[x_kube(
    validation = Rule::new("(has(self.backends) && size(self.backends) > 0) || has(self.ollama)")
        .message("at least one back end is required: list spec.backends or set spec.ollama"),
    validation = Rule::new("(has(self.models) && has(self.models.default)) || (has(self.ollama) && size(self.ollama.models) > 0)")
        .message("spec.models.default is required unless spec.ollama.models names a model"),
    validation = Rule::new("!has(self.ollama) || !has(self.backends) || !self.backends.exists(b, b.name == 'ollama')")
        .message("the back-end name ollama is reserved for the managed Ollama while spec.ollama is set"),
    validation = Rule::new("!has(self.routing) || !has(self.routing.fallback) || !has(self.routing.fallback.backend) || (has(self.backends) && self.backends.exists(b, b.name == self.routing.fallback.backend))")
        .message("spec.routing.fallback.backend must name an entry of spec.backends"),
    validation = Rule::new("!has(self.service) || !has(self.service.type) || self.service.type == 'ClusterIP' || has(self.auth) || (has(self.allowUnauthenticated) && self.allowUnauthenticated)")
        .message("a NodePort or LoadBalancer Service publishes the chat API outside the cluster: set spec.auth, or spec.allowUnauthenticated: true to publish it without authentication")
        .field_path(".service.type"),
    validation = Rule::new("!has(self.ingress) || has(self.auth) || (has(self.allowUnauthenticated) && self.allowUnauthenticated)")
        .message("an Ingress publishes the chat API: set spec.auth, or spec.allowUnauthenticated: true to publish it without authentication")
        .field_path(".ingress"),
    validation = Rule::new("!has(self.rollout) || !has(self.rollout.candidate.backend) || (has(self.backends) && self.backends.exists(b, b.name == self.rollout.candidate.backend)) || (self.rollout.candidate.backend == 'ollama' && has(self.ollama))")
        .message("spec.rollout.candidate.backend must name an entry of spec.backends, or ollama while spec.ollama is set")
        .field_path(".rollout.candidate.backend"),
    validation = Rule::new("!has(self.rollout) || !has(self.rollout.candidate.backend) || (has(self.backends) ? size(self.backends) : 0) + (has(self.ollama) ? 1 : 0) >= 2")
        .message("rolling out a back end needs another back end that serves now: the candidate would be compared with itself (to canary a model on the only back end, name just candidate.model)")
        .field_path(".rollout.candidate.backend"),
    validation = Rule::new("!has(self.rollout) || !has(self.rollout.candidate.backend) || !has(self.routing) || !has(self.routing.fallback) || !has(self.routing.fallback.backend) || self.routing.fallback.backend != self.rollout.candidate.backend")
        .message("spec.rollout.candidate.backend is the fallback back end, which takes no regular traffic")
        .field_path(".rollout.candidate.backend"),
    validation = Rule::new("!has(self.rollout) || has(self.rollout.candidate.backend) || !has(self.rollout.candidate.model) || ((has(self.models) && has(self.models.default)) ? self.rollout.candidate.model != self.models.default : (!has(self.ollama) || size(self.ollama.models) == 0 || self.rollout.candidate.model != self.ollama.models[0]))")
        .message("spec.rollout.candidate.model is the default model already: name another model, or a candidate backend")
        .field_path(".rollout.candidate.model")
)]
#[serde(rename_all = "camelCase")]
pub struct ChatServiceSpec {
    /// Number of chat-service pods. Ignored while `autoscaling` is set: the HorizontalPodAutoscaler
    /// owns the replica count then. Default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: Option<i32>,
    /// Container image of the chat service. Default: the chat-service image of the same version as
    /// the operator (`ghcr.io/chatoperator/chat-service:<operator version>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512), regex(pattern = r"^[^\s]+$"))]
    pub image: Option<String>,
    /// CPU and memory of each chat-service container. Default: requests 100m CPU and 128Mi,
    /// limit 512Mi memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Scheduling and metadata overrides for the chat-service pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template: Option<PodTemplateOverrides>,
    /// Horizontal autoscaling of the chat-service pods (autoscaling/v2). Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
    /// Models users may ask for. Default model: the first of `ollama.models` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<ModelsSpec>,
    /// External LLM endpoints (Ollama API or any OpenAI-compatible server). May be combined with
    /// the managed `ollama`; at least one of the two is required.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub backends: Vec<BackendSpec>,
    /// An Ollama run by the operator: StatefulSet, headless Service, models pulled before the pods
    /// report ready. Absent means no managed Ollama.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ollama: Option<ManagedOllamaSpec>,
    /// How turns are spread over back ends, and how failures are handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<RoutingSpec>,
    /// Conversation context sent to the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<ContextSpec>,
    /// Where conversation history lives: recent turns in Redis, everything in MongoDB.
    pub history: HistorySpec,
    /// Response cache in Redis. Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSpec>,
    /// Per-caller request and token limits, shared by all replicas through Redis. Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    /// API-key authentication of callers. Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthSpec>,
    /// The Service in front of the chat pods. Default: ClusterIP on port 80. NodePort and
    /// LoadBalancer need `auth` unless `allowUnauthenticated` is true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceSpec>,
    /// An Ingress for the chat API (its chat routes only: never `/metrics`, `/v1/backends`, `/docs`
    /// or `/openapi.json`). None when absent. Needs `auth` unless `allowUnauthenticated` is true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<IngressSpec>,
    /// Accept a NodePort or LoadBalancer Service, or an Ingress, without `auth`: anyone who can
    /// reach it may then chat on your back ends. Default false, and then such a spec is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_unauthenticated: Option<bool>,
    /// NetworkPolicies, default-deny in both directions for every pod of this ChatService: only
    /// its chat pods reach its managed Redis, MongoDB and Ollama; the chat pods are called from
    /// their own namespace and `clientNamespaces` (from anywhere when the Service is a NodePort or
    /// LoadBalancer) and call only DNS, their stores and the ports of their back ends and
    /// external stores. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policies: Option<bool>,
    /// Namespaces, besides the ChatService's own, whose pods may call the chat API: the ingress
    /// controller's (e.g. `ingress-nginx`) and Prometheus's, for instance.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 32),
        inner(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")),
        extend("x-kubernetes-list-type" = "set")
    )]
    pub client_namespaces: Vec<String>,
    /// A canary rollout of a back end or a model, with automatic promotion and rollback (see
    /// `status.rollout`). None when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSpec>,
}

/// Scheduling and metadata overrides applied to the chat-service pod template.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodTemplateOverrides {
    /// Extra pod labels. The operator's own selector labels win on conflict.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra pod annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Node labels the chat pods must run on (`kubernetes.io/os: linux`, a node pool label).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the chat pods tolerate, e.g. those of a dedicated node pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node and pod (anti-)affinity of the chat pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Replaces the default spreading (max skew 1 across nodes, best effort).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
    /// PriorityClass of the chat pods (a DNS subdomain name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub priority_class_name: Option<String>,
}

/// HorizontalPodAutoscaler settings. At least one target must be set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(
    validation = Rule::new("self.minReplicas <= self.maxReplicas").message("minReplicas must not exceed maxReplicas").field_path(".minReplicas"),
    validation = Rule::new("has(self.targetCPUUtilizationPercentage) || has(self.targetMemoryUtilizationPercentage) || has(self.inFlightRequestsPerPod)")
        .message("autoscaling needs at least one target: targetCPUUtilizationPercentage, targetMemoryUtilizationPercentage or inFlightRequestsPerPod")
)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// Default 1.
    #[serde(default = "defaults::min_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: i32,
    /// Most chat-service pods the HPA may run. Required.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Average CPU utilisation (percent of requests) to aim for.
    #[serde(
        default,
        rename = "targetCPUUtilizationPercentage",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 1, max = 100))]
    pub target_cpu_utilization_percentage: Option<i32>,
    /// Average memory utilisation (percent of requests) to aim for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub target_memory_utilization_percentage: Option<i32>,
    /// Average in-flight chat requests per pod to aim for: the per-pod gauge
    /// `chat_requests_in_flight` that each chat pod exports on `/metrics` (admitted chat API
    /// requests whose response has not finished). The HPA reads it from the custom metrics API
    /// (`custom.metrics.k8s.io`), so the cluster needs Prometheus scraping the chat pods and a
    /// metrics adapter serving the series per pod, e.g. a prometheus-adapter rule with
    /// `seriesQuery: 'chat_requests_in_flight{namespace!="",pod!=""}'`, resources mapped from the
    /// `namespace` and `pod` labels, and `metricsQuery: 'sum(<<.Series>>{<<.LabelMatchers>>}) by
    /// (<<.GroupBy>>)'` (full rule in examples/autoscaling.yaml). Without an adapter the HPA
    /// reports `FailedGetPodsMetric`; it then scales up on its other metrics but never down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub in_flight_requests_per_pod: Option<i32>,
    /// Seconds of lower recommendations before scaling down. Default: the HPA's (300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_down_stabilization_seconds: Option<i32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelsSpec {
    /// Model used when a request names none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")
    )]
    pub default: Option<String>,
    /// Further models a request may name (each starts with a letter or digit).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        inner(length(min = 1, max = 253), regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")),
        extend("x-kubernetes-list-type" = "set")
    )]
    pub allowed: Vec<String>,
}

/// Wire protocol of an LLM back end.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BackendProtocol {
    /// Ollama's native API.
    Ollama,
    /// An OpenAI-compatible API (vLLM, llama.cpp server, Ollama's /v1, hosted APIs).
    Openai,
}

/// One external LLM endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(
    validation = Rule::new("!self.url.matches('^[A-Za-z][-A-Za-z0-9+.]*://[^/?#]*@')")
        .message("url must not carry user info (user:password@): name the API key in apiKeySecret").field_path(".url"),
    validation = Rule::new(r"!self.url.matches('^(?i)[a-z][-a-z0-9+.]*://(169[.]254[.][0-9.]+|[[]fe80:[^]]*[]]|[[]fd00:ec2::254[]]|metadata|metadata[.]google[.]internal)[.]?([:/?#]|$)')")
        .message("url must not point at a link-local or cloud metadata address: the chat pods would hand it requests and show its answers").field_path(".url"),
    validation = Rule::new(r"!self.url.matches('/v1/?$')")
        .message("url is the base URL without /v1: the chat service adds the API path").field_path(".url"),
    validation = Rule::new(r"!has(self.apiKeySecret) || self.url.matches('^(?i)https://') || self.url.matches('^(?i)http://(localhost|127[.][0-9.]+|[[]::1[]]|[a-z0-9-]+|[^/:?#@]+[.]svc|[^/:?#@]+[.]svc[.]cluster[.]local)([:/?#]|$)')")
        .message("apiKeySecret over plain http is only sent to in-cluster hosts (no dots, *.svc, *.svc.cluster.local or loopback): use an https:// url").field_path(".apiKeySecret")
)]
#[serde(rename_all = "camelCase")]
pub struct BackendSpec {
    /// Unique name (a DNS label), used in metrics and logs.
    #[schemars(
        length(min = 1, max = 40),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Base URL without `/v1`, e.g. `http://vllm.ml:8000` or `https://llm.example.com`.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("isURL(self) && url(self).getScheme() in ['http', 'https']").message("url must be an http:// or https:// URL"))]
    pub url: String,
    pub protocol: BackendProtocol,
    /// Relative share of traffic. Default 1.
    #[serde(default = "defaults::weight")]
    #[schemars(range(min = 1, max = 1000))]
    pub weight: i32,
    /// Secret key holding the back end's API key, sent as a bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret: Option<SecretKeyRef>,
    /// Models this back end serves; empty means any allowed model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        inner(
            length(min = 1, max = 253),
            regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")
        )
    )]
    pub models: Vec<String>,
}

/// A key in a Secret of the ChatService's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Key inside the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// A key in a ConfigMap of the ChatService's namespace (in `data` or `binaryData`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapKeyRef {
    /// ConfigMap name.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Key inside the ConfigMap.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// An Ollama StatefulSet run by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManagedOllamaSpec {
    /// Default 1.
    #[serde(default = "defaults::one")]
    #[schemars(range(min = 1, max = 64))]
    pub replicas: i32,
    /// Default `docker.io/ollama/ollama:0.12.6`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512), regex(pattern = r"^[^\s]+$"))]
    pub image: Option<String>,
    /// Models pulled into each pod's volume before the pod reports ready, e.g. `gemma3:270m`.
    #[schemars(
        length(min = 1, max = 16),
        inner(length(min = 1, max = 253), regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")),
        extend("x-kubernetes-list-type" = "set")
    )]
    pub models: Vec<String>,
    /// GPUs per pod (requested as `gpuResourceName`). Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 16))]
    pub gpus: Option<i32>,
    /// Extended resource name of a GPU, `<vendor domain>/<name>`. Default `nvidia.com/gpu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$")
    )]
    pub gpu_resource_name: Option<String>,
    /// Size of each pod's model volume. Default 20Gi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_storage: Option<Quantity>,
    /// StorageClass of the model volumes. Default: the cluster's default class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub storage_class_name: Option<String>,
    /// Default: requests 1 CPU and 2Gi memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// What happens to the model volumes when the ChatService is deleted (the StatefulSet's
    /// `persistentVolumeClaimRetentionPolicy.whenDeleted`): `Retain` keeps the pulled models for
    /// a ChatService re-created under the same name, `Delete` removes them with it. Volumes of
    /// pods removed by scaling down are always kept. Default `Retain`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_policy: Option<RetentionPolicy>,
}

/// Load-balancing strategy across back ends.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RoutingStrategy {
    RoundRobin,
    LeastInFlight,
    /// Consistent hash of the session id, so a session keeps hitting the same KV cache.
    SessionAffinity,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("!has(self.firstTokenTimeoutMs) || !has(self.totalTimeoutMs) || self.firstTokenTimeoutMs <= self.totalTimeoutMs")
    .message("firstTokenTimeoutMs must not exceed totalTimeoutMs").field_path(".firstTokenTimeoutMs"))]
#[serde(rename_all = "camelCase")]
pub struct RoutingSpec {
    /// Default RoundRobin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<RoutingStrategy>,
    /// Default 2000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 600000))]
    pub connect_timeout_ms: Option<i64>,
    /// Time allowed until the first token. Default 30000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600000))]
    pub first_token_timeout_ms: Option<i64>,
    /// Time allowed for a whole turn. Default 300000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600000))]
    pub total_timeout_ms: Option<i64>,
    /// Attempts per turn across back ends, counting the first. Default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10))]
    pub max_attempts: Option<i32>,
    /// Seconds between back-end health checks. Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub health_check_interval_seconds: Option<i64>,
    /// When a back end stops getting turns after failures, and when it is tried again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreakerSpec>,
    /// Requests in flight per back-end endpoint (each managed Ollama pod is one). Default 8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_in_flight_per_backend: Option<i32>,
    /// Requests that may wait per endpoint once every candidate is at its limit; beyond that
    /// the chat service answers 503 with Retry-After (or uses `fallback`). 0 = no waiting.
    /// Default 64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100000))]
    pub queue_depth: Option<i32>,
    /// Longest wait in that queue. Default 30000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 600000))]
    pub queue_timeout_ms: Option<i64>,
    /// Retries allowed, as a percentage of turns, so that retries cannot multiply an outage.
    /// Default 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub retry_budget_percent: Option<i32>,
    /// What serves a turn instead of a 503 when every back end is full or has its circuit open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<FallbackSpec>,
}

/// A degraded answer instead of none: a back end kept in reserve, a cheaper model, or both.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("has(self.backend) || has(self.model)").message("fallback needs a backend, a model or both"))]
#[serde(rename_all = "camelCase")]
pub struct FallbackSpec {
    /// Name of an entry of `spec.backends` held in reserve: it takes no regular traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 40))]
    pub backend: Option<String>,
    /// Model to generate with instead of the requested one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")
    )]
    pub model: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreakerSpec {
    /// Consecutive failures that open a back end's circuit. Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub failure_threshold: Option<i32>,
    /// Seconds an open circuit waits before a trial request. Default 30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub cooldown_seconds: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("!has(self.systemPrompt) || (size(self.systemPrompt) + 3) / 4 + 4 < (has(self.maxContextTokens) ? self.maxContextTokens : 4096)")
    .message("systemPrompt does not fit maxContextTokens (about 4 bytes a token, default budget 4096): no room would be left for the conversation").field_path(".systemPrompt"))]
#[serde(rename_all = "camelCase")]
pub struct ContextSpec {
    /// Instructions sent first in every context. Must fit well inside `maxContextTokens`
    /// (counted as about 4 bytes per token). Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16384))]
    pub system_prompt: Option<String>,
    /// Token budget of the context; oldest turns are dropped first (or summarised). Counted
    /// with the model's own tokenizer where `tokenizers` has one, else as about 4 bytes per
    /// token. Default 4096.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 16, max = 1048576))]
    pub max_context_tokens: Option<i32>,
    /// Upper bound of generated tokens per turn. Default 512.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1048576))]
    pub max_output_tokens: Option<i32>,
    /// Summaries of the older part of a session that no longer fits `maxContextTokens`,
    /// sent in its place next to the recent turns. Unset, the oldest turns are only dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summarisation: Option<SummarisationSpec>,
    /// The models' own tokenizers, each a Hugging Face `tokenizer.json` in a ConfigMap of this
    /// namespace, plain or gzipped (a ConfigMap holds at most 1 MiB; most tokenizers fit only
    /// gzipped): `kubectl create configmap smollm2-tokenizer --from-file=tokenizer.json.gz`.
    /// Prompt tokens of these models are counted with their tokenizer, every other model's by
    /// about 4 bytes per token; `GET /v1/models` says which. A change to a ConfigMap rolls the
    /// chat pods. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 16),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["model"])
    )]
    pub tokenizers: Vec<TokenizerSpec>,
}

/// The tokenizer of one model.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenizerSpec {
    /// The model as requests name it: `models.default`, one of `models.allowed`, or the
    /// rollout's candidate model.
    #[schemars(length(min = 1, max = 256))]
    pub model: String,
    /// The ConfigMap key that holds its `tokenizer.json` (or `tokenizer.json.gz`).
    pub config_map: ConfigMapKeyRef,
}

/// Summarisation of dropped context. A turn that had to drop history beyond what the session's
/// summary covers has a new summary written after it, in the background (no turn waits for
/// one); later turns send summary + recent turns. Summaries are stored in MongoDB next to the
/// messages (which stay) and erased with their session. A failed or slow summary call leaves
/// the session on plain trimming.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SummarisationSpec {
    /// Default true (the block asks for summaries).
    #[serde(default = "defaults::enabled")]
    pub enabled: bool,
    /// The model that writes summaries: `models.default` or one of `models.allowed`.
    /// Default: the model of the turn that needs the summary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub model: Option<String>,
    /// At most one summary call per this many turns of a session (a failed call counts): the
    /// cost bound. Each call's tokens count against the caller's token budget. Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub every_turns: Option<i32>,
    /// Upper bound of a summary's length in tokens; at most half of `maxContextTokens`.
    /// Default 256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 524288))]
    pub max_summary_tokens: Option<i32>,
    /// A summary call taking longer is abandoned (the session keeps plain trimming).
    /// Default 60000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600000))]
    pub timeout_ms: Option<i64>,
    /// The instructions sent with the messages to summarise. Default: keep names, facts,
    /// numbers, decisions and open questions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16384))]
    pub prompt: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistorySpec {
    pub redis: RedisSpec,
    pub mongodb: MongoSpec,
    /// How long conversations are kept. Unset keeps every session and message for ever. The
    /// chat pods sweep expired sessions on every server; where the server has TTL indexes
    /// (MongoDB, DocumentDB) they also make TTL indexes on `expire_at` as a backstop for when no
    /// pod sweeps (the metric `chat_history_ttl_index` says whether the server took them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<RetentionSpec>,
}

/// Retention of the conversation history, enforced by the chat pods themselves: a sweeper in
/// every pod erases sessions past `maxAgeSeconds` from MongoDB and Redis (it works on every
/// MongoDB-compatible server, FerretDB and DocumentDB included), and each stored turn trims its
/// session to `maxMessagesPerSession`. No cached answer outlives `maxAgeSeconds`. Where the
/// server has TTL indexes (MongoDB, DocumentDB), the pods also make TTL indexes on `expire_at`,
/// a backstop that deletes a session once no pod has swept it for a while (the metric
/// `chat_history_ttl_index` says whether the server took them).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetentionSpec {
    /// A session whose last turn is older than this many seconds is erased, with every message
    /// and its Redis copy. At most 10 years.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 60, max = 315360000))]
    pub max_age_seconds: Option<i64>,
    /// Only the newest this many messages of each session are kept (a turn is two messages, so
    /// an even number keeps whole turns); Redis never holds more either.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 1000000))]
    pub max_messages_per_session: Option<i32>,
    /// Seconds between two sweeps for expired sessions, in every chat pod. Default 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 86400))]
    pub sweep_interval_seconds: Option<i32>,
}

/// Redis for recent turns, the cache and rate limits: exactly one of `managed` or `external`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("has(self.managed) != has(self.external)").message("exactly one of managed or external must be set"))]
#[serde(rename_all = "camelCase")]
pub struct RedisSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed: Option<ManagedRedisSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalRedisSpec>,
    /// Recent messages kept per session in Redis (copies; MongoDB keeps every turn). At most
    /// 1000, so one session cannot fill Redis. Default 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub recent_messages: Option<i32>,
    /// Seconds a session's recent messages live after its last use; at most 30 days.
    /// Default 3600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 2592000))]
    pub ttl_seconds: Option<i64>,
    /// Prefix of every key, so several ChatServices can share one Redis. Default: the
    /// ChatService's namespace and name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[^\s]+$"))]
    pub key_prefix: Option<String>,
}

/// A Redis Deployment run by the operator, with a generated password.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManagedRedisSpec {
    /// Default `docker.io/library/redis:7.4-alpine`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512), regex(pattern = r"^[^\s]+$"))]
    pub image: Option<String>,
    /// Default: requests 50m CPU and 64Mi, limit 256Mi memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

/// A Redis the operator does not run, e.g. Amazon ElastiCache.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("!has(self.caSecret) || (has(self.tls) && self.tls)")
    .message("caSecret needs tls: true (a CA is only used to verify a TLS server)").field_path(".caSecret"))]
#[serde(rename_all = "camelCase")]
pub struct ExternalRedisSpec {
    /// `host:port`.
    #[schemars(
        length(min = 3, max = 512),
        regex(pattern = r"^[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?:[0-9]{1,5}$")
    )]
    #[x_kube(validation = Rule::new("!self.matches(':[0-9]{1,5}$') || (int(self.substring(self.lastIndexOf(':') + 1)) >= 1 && int(self.substring(self.lastIndexOf(':') + 1)) <= 65535)").message("the port of address must be 1 to 65535"))]
    pub address: String,
    /// Connect with TLS (`rediss://`). Default false.
    #[serde(default)]
    pub tls: bool,
    /// Secret key holding the password (ElastiCache AUTH token); none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret: Option<SecretKeyRef>,
    /// Secret key holding the PEM CA certificate(s) that sign the server's certificate; mounted
    /// into the chat pods, which verify the server against it (`history.redis.tls.caFile`).
    /// Needs `tls: true`. Without it the pods trust the system CAs of their image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret: Option<SecretKeyRef>,
    /// Redis logical database. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 15))]
    pub database: Option<i32>,
}

/// MongoDB for the full history: exactly one of `managed` or `external`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(
    validation = Rule::new("has(self.managed) != has(self.external)").message("exactly one of managed or external must be set"),
    validation = Rule::new("!has(self.database) || !(self.database in ['admin', 'local', 'config'])")
        .message("database admin, local and config are MongoDB's own: name a database for the chat history").field_path(".database")
)]
#[serde(rename_all = "camelCase")]
pub struct MongoSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed: Option<ManagedMongoSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalMongoSpec>,
    /// Database of the history; not `admin`, `local` or `config`. Default `chat`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[^$./\\\s\x00]+$"))]
    pub database: Option<String>,
    /// Collection of messages; sessions go to `<collection>_sessions`. Default `messages`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 120), regex(pattern = r"^[^$.\s\x00]+$"))]
    pub collection: Option<String>,
}

/// A MongoDB StatefulSet run by the operator, with generated root credentials.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManagedMongoSpec {
    /// Default `docker.io/library/mongo:7.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512), regex(pattern = r"^[^\s]+$"))]
    pub image: Option<String>,
    /// Size of the data volume. Default 10Gi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<Quantity>,
    /// StorageClass of the data volume. Default: the cluster's default class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub storage_class_name: Option<String>,
    /// Default: requests 100m CPU and 256Mi, limit 1Gi memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// What happens to the data volume when the ChatService is deleted (the StatefulSet's
    /// `persistentVolumeClaimRetentionPolicy.whenDeleted`). `Retain` keeps the volume and the
    /// generated credentials Secret `<name>-mongodb-credentials` (which then has no owner), so a
    /// ChatService re-created under the same name finds its history and logs in with the same
    /// password; delete both by hand to start afresh. `Delete` removes the volume and the Secret
    /// with the ChatService. Default `Retain`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_policy: Option<RetentionPolicy>,
}

/// Whether a managed store's volumes outlive the ChatService.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RetentionPolicy {
    #[default]
    Retain,
    Delete,
}

impl RetentionPolicy {
    /// The value of a StatefulSet's `persistentVolumeClaimRetentionPolicy` fields.
    pub fn as_str(self) -> &'static str {
        match self {
            RetentionPolicy::Retain => "Retain",
            RetentionPolicy::Delete => "Delete",
        }
    }
}

/// Which server an external MongoDB URI points at.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MongoFlavor {
    Mongodb,
    /// Amazon DocumentDB: TLS with Amazon's CA bundle, and no retryable writes.
    Documentdb,
}

/// A MongoDB the operator does not run: MongoDB itself or Amazon DocumentDB.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("self.flavor != 'documentdb' || has(self.caSecret)")
    .message("caSecret is required for flavor documentdb (its TLS CA bundle)").field_path(".caSecret"))]
#[serde(rename_all = "camelCase")]
pub struct ExternalMongoSpec {
    /// Default `mongodb`.
    #[serde(default = "defaults::flavor")]
    pub flavor: MongoFlavor,
    /// Secret key holding the connection URI (`mongodb://` or `mongodb+srv://`, credentials included).
    pub uri_secret: SecretKeyRef,
    /// Secret key holding a PEM CA bundle; turns TLS on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret: Option<SecretKeyRef>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheSpec {
    /// Default true.
    #[serde(default = "defaults::enabled")]
    pub enabled: bool,
    /// Seconds a cached answer lives; at most 30 days. Default 600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 2592000))]
    pub ttl_seconds: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitSpec {
    /// Requests admitted per caller per window. Default 60.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub requests_per_window: Option<i32>,
    /// Tokens (prompt + completion) per caller per window; 0 means unlimited. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub tokens_per_window: Option<i64>,
    /// Window length in seconds. Default 60.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub window_seconds: Option<i64>,
    /// Whom a limit is counted against. Default `ApiKey`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_by: Option<RateLimitKeyBy>,
}

/// The caller a rate limit is counted against.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RateLimitKeyBy {
    /// The API key's non-secret id when `auth` is set, else the client IP.
    ApiKey,
    /// The `x-user-id` header set by a trusted gateway in front, else the client IP.
    User,
    /// The client IP address as the chat service sees it.
    #[serde(rename = "ClientIP")]
    ClientIp,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// Secret key holding the accepted API keys, one per line. The file is mounted into the pods
    /// and re-read when it changes.
    pub api_keys_secret: SecretKeyRef,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ServiceType {
    ClusterIP,
    NodePort,
    LoadBalancer,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Default ClusterIP.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<ServiceType>,
    /// Default 80.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// Annotations of the chat Service, e.g. a cloud load balancer's settings.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(
    validation = Rule::new("!has(self.tlsSecretName) || has(self.host)").message("tlsSecretName needs host").field_path(".tlsSecretName"),
    validation = Rule::new("has(self.host)").message("ingress needs a host: without one its rule would answer for every host name").field_path(".host")
)]
#[serde(rename_all = "camelCase")]
pub struct IngressSpec {
    /// Host name the Ingress answers for (required; `*.example.com` allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(
            pattern = r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
        )
    )]
    pub host: Option<String>,
    /// IngressClass that serves the Ingress. Default: the cluster's default class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub class_name: Option<String>,
    /// Secret with the TLS certificate for `host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub tls_secret_name: Option<String>,
    /// Annotations of the Ingress, e.g. for the ingress controller or cert-manager.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Observed state, written by the operator only.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChatServiceStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` sums up `ConfigValid`, `StorageReady`, `BackendsReady`, `Progressing` and `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Chat-service pods the Deployment has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Chat-service pods that are ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// In-cluster URL of the chat API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Secret (key `uri`) with the MongoDB connection URI the chat pods use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_secret: Option<String>,
    /// Progress of `spec.rollout`: step, weights, gate figures and why it last moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
}

mod defaults {
    use super::MongoFlavor;
    pub fn min_replicas() -> i32 {
        1
    }
    pub fn weight() -> i32 {
        1
    }
    pub fn one() -> i32 {
        1
    }
    pub fn enabled() -> bool {
        true
    }
    pub fn flavor() -> MongoFlavor {
        MongoFlavor::Mongodb
    }
}

/// DNS-1035 label: the chat Service and the stores' Services are named after the ChatService.
pub const NAME_PATTERN: &str = "^[a-z]([-a-z0-9]*[a-z0-9])?$";

/// The CustomResourceDefinition: the derived one, plus the rule on `metadata.name`. A schema may
/// restrict only `name` and `generateName` of the metadata, and the derive cannot say it; a
/// pattern there costs nothing, where a CEL `matches` on the unbounded name exceeds the budget.
pub fn custom_resource_definition()
-> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps;
    use kube::CustomResourceExt;
    let mut crd = ChatService::crd();
    for version in &mut crd.spec.versions {
        let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        else {
            continue;
        };
        let name = JSONSchemaProps {
            type_: Some("string".into()),
            pattern: Some(NAME_PATTERN.into()),
            ..Default::default()
        };
        let metadata = JSONSchemaProps {
            type_: Some("object".into()),
            properties: Some([("name".to_string(), name)].into()),
            ..Default::default()
        };
        schema
            .properties
            .get_or_insert_with(Default::default)
            .insert("metadata".into(), metadata);
    }
    crd
}

/// The CustomResourceDefinition as the YAML committed under `crds/`.
pub fn crd_yaml() -> String {
    let yaml =
        serde_yaml::to_string(&custom_resource_definition()).expect("a CRD always serializes");
    format!("# Generated by `cargo run -p chat-operator --bin crdgen`; do not edit.\n{yaml}")
}
