//! Test fixtures of the unit tests of every step: ChatServices as YAML, a test double of the dereference step's
//! findings, the validated form the builders take, and accessors that reach into built objects
//! without `.as_ref().unwrap()` chains.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Container, EnvVar, PodSpec, Secret};

use crate::crd::ChatService;
use crate::reconcile::dereference::{References, SecretData, config_map_refs, secret_refs};
use crate::reconcile::validate::validate;
use crate::validated::{
    ManagedMongodb, ManagedRedis, MongoCredentials, Mongodb, Redis, ValidatedChatService,
};

/// A ChatService as the API server hands it over (uid and namespace set).
pub fn chat_service(yaml: &str) -> ChatService {
    let mut cr: ChatService = serde_yaml::from_str(yaml).expect("fixture parses");
    cr.metadata.namespace.get_or_insert_with(|| "team-a".into());
    cr.metadata
        .uid
        .get_or_insert_with(|| "6a0b3c1e-0000-4000-8000-000000000001".into());
    cr.metadata.generation.get_or_insert(1);
    cr
}

pub const MINIMAL: &str = r#"
apiVersion: chatoperator.dev/v1alpha1
kind: ChatService
metadata: {name: support}
spec:
  backends:
    - {name: vllm, url: "http://vllm.ml:8000", protocol: openai}
  models: {default: gemma3:270m}
  history:
    redis: {managed: {}}
    mongodb: {managed: {}}
"#;

pub const FULL: &str = r#"
apiVersion: chatoperator.dev/v1alpha1
kind: ChatService
metadata: {name: support}
spec:
  image: registry.example/chat-service:9.9.9
  podTemplate:
    labels: {team: a}
    annotations: {example.com/owner: a}
    nodeSelector: {pool: chat}
    priorityClassName: high
  autoscaling: {minReplicas: 2, maxReplicas: 6, targetCPUUtilizationPercentage: 70, inFlightRequestsPerPod: 20, scaleDownStabilizationSeconds: 120}
  backends:
    - {name: hosted, url: "https://llm.example.com", protocol: openai, weight: 3, apiKeySecret: {name: llm-keys, key: hosted}}
  ollama: {replicas: 2, models: ["gemma3:270m"], gpus: 1, modelStorage: 5Gi}
  routing: {strategy: SessionAffinity, maxAttempts: 3, circuitBreaker: {failureThreshold: 7}, maxInFlightPerBackend: 4, queueDepth: 2, retryBudgetPercent: 10, fallback: {backend: hosted}}
  history:
    redis:
      external: {address: "cache.abc.use1.cache.amazonaws.com:6379", tls: true, passwordSecret: {name: redis-auth, key: token}, caSecret: {name: redis-ca, key: ca.crt}}
    mongodb:
      external: {flavor: documentdb, uriSecret: {name: docdb, key: uri}, caSecret: {name: docdb, key: ca.pem}}
      database: support
  cache: {enabled: true, ttlSeconds: 60}
  rateLimit: {requestsPerWindow: 10, keyBy: ClientIP}
  auth: {apiKeysSecret: {name: api-keys, key: keys}}
  service: {type: LoadBalancer, port: 8443}
  ingress: {host: chat.example.com, tlsSecretName: chat-tls}
"#;

/// The URI [`fake_references`] puts in a referenced MongoDB URI key.
pub const FAKE_MONGODB_URI: &str = "mongodb://u:p@docdb:27017/";

/// Secret data with the given keys and values.
pub fn secret(pairs: &[(&str, &str)]) -> SecretData {
    Some(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect(),
    )
}

/// A test double of the dereference step's findings: every Secret key the spec names exists,
/// holding `fake-<key>` (a MongoDB URI for the URI key); no generated credentials yet.
pub fn fake_references(cr: &ChatService) -> References {
    let mut refs = References::default();
    for (field, r) in secret_refs(cr) {
        let value = if field.ends_with("uriSecret") {
            FAKE_MONGODB_URI.to_string()
        } else {
            format!("fake-{}", r.key)
        };
        refs.secrets
            .entry(r.name)
            .or_insert_with(|| Some(BTreeMap::new()))
            .get_or_insert_with(BTreeMap::new)
            .insert(r.key, value.into_bytes());
    }
    for (_, r) in config_map_refs(cr) {
        refs.config_maps
            .entry(r.name)
            .or_insert_with(|| Some(BTreeMap::new()))
            .get_or_insert_with(BTreeMap::new)
            .insert(r.key, FAKE_TOKENIZER.as_bytes().to_vec());
    }
    refs
}

/// What [`fake_references`] puts in a referenced tokenizer key: a JSON object, as far as the
/// operator looks.
pub const FAKE_TOKENIZER: &str = r#"{"model": {"type": "WordLevel"}}"#;

/// `yaml` with a tokenizer from ConfigMap `smollm2-tokenizer` (key `tokenizer.json.gz`) for its
/// default model.
pub fn with_tokenizer(yaml: &str) -> ChatService {
    let mut cr = chat_service(yaml);
    let model = cr
        .spec
        .models
        .as_ref()
        .and_then(|m| m.default.clone())
        .expect("the fixture names a default model");
    cr.spec
        .context
        .get_or_insert_with(Default::default)
        .tokenizers = vec![crate::crd::TokenizerSpec {
        model,
        config_map: crate::crd::ConfigMapKeyRef {
            name: "smollm2-tokenizer".into(),
            key: "tokenizer.json.gz".into(),
        },
    }];
    cr
}

/// `yaml` validated against [`fake_references`], with the generated credentials provisioned
/// (Redis password `r`, MongoDB user `chat` with password `m`).
pub fn validated(yaml: &str) -> ValidatedChatService {
    let cr = chat_service(yaml);
    let mut cs = validate(&cr, &fake_references(&cr), "0.1.0").expect("fixture validates");
    if let Redis::Managed(redis) = &mut cs.redis {
        redis.password = Some("r".into());
    }
    if let Mongodb::Managed(mongodb) = &mut cs.mongodb {
        mongodb.credentials = Some(MongoCredentials {
            username: "chat".into(),
            password: "m".into(),
        });
    }
    cs
}

pub fn managed_redis(cs: &ValidatedChatService) -> &ManagedRedis {
    match &cs.redis {
        Redis::Managed(managed) => managed,
        Redis::External(_) => panic!("the fixture's Redis is external"),
    }
}

pub fn managed_mongodb(cs: &ValidatedChatService) -> &ManagedMongodb {
    match &cs.mongodb {
        Mongodb::Managed(managed) => managed,
        Mongodb::External(_) => panic!("the fixture's MongoDB is external"),
    }
}

/// A workload with a pod template.
pub trait Workload {
    fn pod(&self) -> &PodSpec;
}

impl Workload for Deployment {
    fn pod(&self) -> &PodSpec {
        let spec = self.spec.as_ref().expect("Deployment has a spec");
        spec.template
            .spec
            .as_ref()
            .expect("pod template has a spec")
    }
}

impl Workload for StatefulSet {
    fn pod(&self) -> &PodSpec {
        let spec = self.spec.as_ref().expect("StatefulSet has a spec");
        spec.template
            .spec
            .as_ref()
            .expect("pod template has a spec")
    }
}

pub fn pod(workload: &impl Workload) -> &PodSpec {
    workload.pod()
}

/// The container `name` of a workload's pods.
pub fn container<'a>(workload: &'a impl Workload, name: &str) -> &'a Container {
    let pod = workload.pod();
    pod.containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name:?}"))
}

/// The init container `name` of a workload's pods.
pub fn init_container<'a>(workload: &'a impl Workload, name: &str) -> &'a Container {
    workload
        .pod()
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no init container {name:?}"))
}

/// The variable `name` of a container.
pub fn env_var<'a>(container: &'a Container, name: &str) -> &'a EnvVar {
    container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("no variable {name:?} in {}", container.name))
}

/// The Secret name and key a variable is read from.
pub fn secret_ref(env: &EnvVar) -> (&str, &str) {
    let selector = env
        .value_from
        .as_ref()
        .and_then(|v| v.secret_key_ref.as_ref())
        .unwrap_or_else(|| panic!("{} is not read from a Secret", env.name));
    (selector.name.as_str(), selector.key.as_str())
}

/// Names of the volumes of a workload's pods, in order.
pub fn volume_names(workload: &impl Workload) -> Vec<&str> {
    let pod = workload.pod();
    pod.volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect()
}

/// The annotations of a Deployment's pod template.
pub fn pod_annotations(deployment: &Deployment) -> &BTreeMap<String, String> {
    let spec = deployment.spec.as_ref().expect("Deployment has a spec");
    let meta = spec
        .template
        .metadata
        .as_ref()
        .expect("template has metadata");
    meta.annotations.as_ref().expect("template has annotations")
}

/// The storage requested by the volume claim template `name` of a StatefulSet.
pub fn claim_storage<'a>(sts: &'a StatefulSet, name: &str) -> &'a str {
    let spec = sts.spec.as_ref().expect("StatefulSet has a spec");
    let claim = spec
        .volume_claim_templates
        .iter()
        .flatten()
        .find(|c| c.metadata.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no volume claim {name:?}"));
    let requests = claim
        .spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.requests.as_ref())
        .expect("claim requests storage");
    &requests["storage"].0
}

/// The value of `key` in a built Secret, as text.
pub fn secret_value(secret: &Secret, key: &str) -> String {
    let data = secret.data.as_ref().expect("Secret has data");
    String::from_utf8(data[key].0.clone()).expect("UTF-8 value")
}
