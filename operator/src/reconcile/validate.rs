//! Validate: what the schema cannot know, decided once. Referenced Secrets, ConfigMaps and keys
//! must exist (a tokenizer must look like one) and
//! the rendered config must pass the chat service's own checks; then every default is applied and
//! every choice (managed or external store, fixed or autoscaled replicas) made, giving the
//! [`ValidatedChatService`] the builders consume. Problems here are the user's to fix, so they
//! become a `ConfigValid=False` condition, not a reconcile error.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::{Resource, ResourceExt};

use sha2::{Digest, Sha256};

use super::dereference::{References, config_map_refs, secret_refs, text_at};
use super::quantity::parse_quantity;
use super::spec_checks::spec_problems;
use crate::crd::{ChatService, SecretKeyRef, ServiceType};
use crate::layout::api_key_env;
use crate::names::{ChildNames, MONGODB_PASSWORD_KEY, MONGODB_USERNAME_KEY, REDIS_PASSWORD_KEY};
use crate::validated::render::render_config;
use crate::validated::{
    ApiKeyEnv, ChatPods, ChatServiceExposure, ConfigProblem, ExternalMongodb, ExternalRedis,
    ManagedMongodb, ManagedOllama, ManagedRedis, MongoCredentials, Mongodb, MountedTokenizer,
    Redis, Replicas, ValidatedChatService,
};

pub const DEFAULT_CHAT_REPLICAS: i32 = 2;
pub const DEFAULT_SERVICE_PORT: i32 = 80;
pub const DEFAULT_REDIS_IMAGE: &str = "docker.io/library/redis:7.4-alpine";
pub const DEFAULT_MONGODB_IMAGE: &str = "docker.io/library/mongo:7.0";
pub const DEFAULT_MONGODB_STORAGE: &str = "10Gi";
pub const DEFAULT_OLLAMA_IMAGE: &str = "docker.io/ollama/ollama:0.12.6";
pub const DEFAULT_OLLAMA_STORAGE: &str = "20Gi";
pub const DEFAULT_GPU_RESOURCE: &str = "nvidia.com/gpu";

/// Image of the chat service that ships with this operator version.
pub fn default_chat_image(operator_version: &str) -> String {
    format!("ghcr.io/chatoperator/chat-service:{operator_version}")
}

/// Share of the managed Redis container's memory limit that Redis may fill with data: the rest
/// is for client buffers, fragmentation and the process itself.
pub const REDIS_MAXMEMORY_SHARE: f64 = 0.75;

/// `maxmemory` for a container memory limit of `limit_bytes`.
pub fn redis_maxmemory(limit_bytes: f64) -> u64 {
    (limit_bytes * REDIS_MAXMEMORY_SHARE) as u64
}

/// Why a ChatService could not be validated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidateError {
    /// The user must fix these; reported in status, not as a reconcile error.
    #[error("the configuration is invalid: {0:?}")]
    Config(Vec<ConfigProblem>),
    /// The object lacks a field the API server always sets.
    #[error("object has no {0}")]
    MissingObjectKey(&'static str),
}

fn quantities(pairs: &[(&str, &str)]) -> BTreeMap<String, Quantity> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
        .collect()
}

/// Requests and limits of a container whose spec sets none.
fn default_resources(requests: &[(&str, &str)], limits: &[(&str, &str)]) -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(quantities(requests)),
        limits: Some(quantities(limits)),
        ..Default::default()
    }
}

/// Problems with the Secrets the spec names: missing Secrets and missing keys.
fn reference_problems(cr: &ChatService, refs: &References) -> Vec<ConfigProblem> {
    let mut problems = Vec::new();
    for (field, r) in secret_refs(cr) {
        match refs.secrets.get(&r.name) {
            Some(Some(data)) if data.contains_key(&r.key) => {}
            Some(Some(_)) => problems.push(ConfigProblem {
                reason: "SecretKeyMissing",
                message: format!("{field}: Secret {:?} has no key {:?}.", r.name, r.key),
            }),
            _ => problems.push(ConfigProblem {
                reason: "SecretMissing",
                message: format!("{field}: Secret {:?} does not exist.", r.name),
            }),
        }
    }
    for (field, r) in config_map_refs(cr) {
        match refs.config_maps.get(&r.name) {
            Some(Some(data)) => match data.get(&r.key) {
                Some(content) if looks_like_a_tokenizer(content) => {}
                Some(_) => problems.push(ConfigProblem {
                    reason: "TokenizerInvalid",
                    message: format!(
                        "{field}: key {:?} of ConfigMap {:?} is neither a tokenizer.json (a JSON \
                         object) nor a gzipped one.",
                        r.key, r.name
                    ),
                }),
                None => problems.push(ConfigProblem {
                    reason: "ConfigMapKeyMissing",
                    message: format!(
                        "{field}: ConfigMap {:?} has no key {:?} (it has {}).",
                        r.name,
                        r.key,
                        key_list(data.keys())
                    ),
                }),
            },
            _ => problems.push(ConfigProblem {
                reason: "ConfigMapMissing",
                message: format!("{field}: ConfigMap {:?} does not exist.", r.name),
            }),
        }
    }
    problems
}

/// The keys of a ConfigMap, for a message.
fn key_list<'a>(keys: impl Iterator<Item = &'a String>) -> String {
    let keys: Vec<String> = keys.map(|k| format!("{k:?}")).collect();
    if keys.is_empty() {
        "no keys".into()
    } else {
        keys.join(", ")
    }
}

/// A gzip stream, or text whose first non-blank character opens a JSON object: what the chat
/// service can load as a tokenizer. Anything else (a wrong key, a model file) would stop every
/// chat pod at start, so it is refused here with the field named.
fn looks_like_a_tokenizer(content: &[u8]) -> bool {
    content.starts_with(&[0x1f, 0x8b])
        || content.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

/// The tokenizer files the chat pods mount, each with its digest; only called once the
/// references are known to exist.
fn mounted_tokenizers(cr: &ChatService, refs: &References) -> Vec<MountedTokenizer> {
    config_map_refs(cr)
        .into_iter()
        .map(|(_, r)| {
            let content = refs
                .config_maps
                .get(&r.name)
                .and_then(|data| data.as_ref()?.get(&r.key));
            let digest = hex::encode(Sha256::digest(content.map_or(&[][..], Vec::as_slice)));
            MountedTokenizer {
                config_map: r,
                digest,
            }
        })
        .collect()
}

/// Checks `cr` against what the dereference step found and decides everything the builders
/// need. `operator_version` picks the default chat-service image.
pub fn validate(
    cr: &ChatService,
    refs: &References,
    operator_version: &str,
) -> Result<ValidatedChatService, ValidateError> {
    let mut problems = reference_problems(cr, refs);
    problems.extend(spec_problems(cr));
    if !problems.is_empty() {
        return Err(ValidateError::Config(problems));
    }
    let mut problems = Vec::new();
    let secret = |r: &SecretKeyRef| text_at(refs.secrets.get(&r.name)?, &r.key);
    let names = ChildNames::of(cr);
    let generated = |name: &str, key: &str| text_at(refs.generated.get(name)?, key);
    let spec = &cr.spec;

    // The schema's CEL rules admit exactly one of `managed` and `external` for each store; an
    // object that bypassed them is read as external when that is set, managed otherwise.
    let redis = match (&spec.history.redis.external, &spec.history.redis.managed) {
        (Some(external), _) => Redis::External(ExternalRedis {
            address: external.address.clone(),
            tls: external.tls,
            database: external.database.unwrap_or(0),
            password: external.password_secret.as_ref().and_then(secret),
            ca: external.ca_secret.clone(),
        }),
        (None, managed) => {
            let managed = managed.clone().unwrap_or_default();
            let resources = managed.resources.unwrap_or_else(|| {
                default_resources(
                    &[("cpu", "50m"), ("memory", "64Mi")],
                    &[("memory", "256Mi")],
                )
            });
            let limit = resources.limits.as_ref().and_then(|l| l.get("memory"));
            let limit = limit.and_then(|q| parse_quantity(&q.0).ok());
            if limit.is_none() {
                problems.push(ConfigProblem {
                    reason: "RedisMemoryLimitMissing",
                    message: "spec.history.redis.managed.resources.limits.memory: managed Redis needs a memory limit, so that its maxmemory can be set below it.".into(),
                });
            }
            Redis::Managed(ManagedRedis {
                image: managed.image.unwrap_or_else(|| DEFAULT_REDIS_IMAGE.into()),
                maxmemory_bytes: redis_maxmemory(limit.unwrap_or(0.0)),
                resources,
                password: generated(&names.redis_password(), REDIS_PASSWORD_KEY),
            })
        }
    };

    let mongodb = match (
        &spec.history.mongodb.external,
        &spec.history.mongodb.managed,
    ) {
        (Some(external), _) => {
            let uri = secret(&external.uri_secret).unwrap_or_default();
            if !(uri.starts_with("mongodb://") || uri.starts_with("mongodb+srv://")) {
                problems.push(ConfigProblem {
                    reason: "InvalidMongoUri",
                    message: "spec.history.mongodb.external.uriSecret: the URI must start with mongodb:// or mongodb+srv://."
                        .into(),
                });
            }
            Mongodb::External(ExternalMongodb {
                uri,
                flavor: external.flavor,
                ca: external.ca_secret.clone(),
            })
        }
        (None, managed) => {
            let managed = managed.clone().unwrap_or_default();
            let credentials = generated(&names.mongodb_credentials(), MONGODB_USERNAME_KEY)
                .zip(generated(
                    &names.mongodb_credentials(),
                    MONGODB_PASSWORD_KEY,
                ))
                .map(|(username, password)| MongoCredentials { username, password });
            Mongodb::Managed(ManagedMongodb {
                image: managed
                    .image
                    .unwrap_or_else(|| DEFAULT_MONGODB_IMAGE.into()),
                resources: managed.resources.unwrap_or_else(|| {
                    default_resources(
                        &[("cpu", "100m"), ("memory", "256Mi")],
                        &[("memory", "1Gi")],
                    )
                }),
                storage: managed
                    .storage
                    .unwrap_or_else(|| Quantity(DEFAULT_MONGODB_STORAGE.into())),
                storage_class_name: managed.storage_class_name,
                credentials,
                retention: managed.retention_policy.unwrap_or_default(),
            })
        }
    };

    let config = render_config(cr);
    if let Err(errors) = config.validate() {
        problems.extend(errors.iter().map(|e| ConfigProblem {
            reason: "InvalidConfig",
            message: format!("The rendered chat-service config is invalid: {e}."),
        }));
    }
    if !problems.is_empty() {
        return Err(ValidateError::Config(problems));
    }

    let namespace = cr
        .namespace()
        .ok_or(ValidateError::MissingObjectKey("metadata.namespace"))?;
    let owner = cr
        .controller_owner_ref(&())
        .ok_or(ValidateError::MissingObjectKey("metadata.uid"))?;
    Ok(ValidatedChatService {
        name: cr.name_any(),
        namespace,
        owner,
        names,
        chat: chat_pods(cr, refs, operator_version),
        service: exposure(cr),
        ingress: spec.ingress.clone(),
        redis,
        mongodb,
        ollama: managed_ollama(cr),
        network_policies: spec.network_policies.unwrap_or(true),
        client_namespaces: spec.client_namespaces.clone(),
        operator_namespace: None,
        config,
    })
}

fn chat_pods(cr: &ChatService, refs: &References, operator_version: &str) -> ChatPods {
    let spec = &cr.spec;
    ChatPods {
        image: spec
            .image
            .clone()
            .unwrap_or_else(|| default_chat_image(operator_version)),
        replicas: match &spec.autoscaling {
            Some(autoscaling) => Replicas::Autoscaled(autoscaling.clone()),
            None => Replicas::Fixed(spec.replicas.unwrap_or(DEFAULT_CHAT_REPLICAS)),
        },
        resources: spec.resources.clone().unwrap_or_else(|| {
            default_resources(
                &[("cpu", "100m"), ("memory", "128Mi")],
                &[("memory", "512Mi")],
            )
        }),
        overrides: spec.pod_template.clone().unwrap_or_default(),
        api_keys: spec
            .backends
            .iter()
            .filter_map(|backend| {
                Some(ApiKeyEnv {
                    variable: api_key_env(&backend.name),
                    secret: backend.api_key_secret.clone()?,
                })
            })
            .collect(),
        auth_keys: spec.auth.as_ref().map(|a| a.api_keys_secret.clone()),
        mongodb_ca: spec
            .history
            .mongodb
            .external
            .as_ref()
            .and_then(|e| e.ca_secret.clone()),
        redis_ca: spec
            .history
            .redis
            .external
            .as_ref()
            .and_then(|e| e.ca_secret.clone()),
        tokenizers: mounted_tokenizers(cr, refs),
    }
}

fn exposure(cr: &ChatService) -> ChatServiceExposure {
    let service = cr.spec.service.clone().unwrap_or_default();
    ChatServiceExposure {
        type_: service.type_.unwrap_or(ServiceType::ClusterIP),
        port: service.port.unwrap_or(DEFAULT_SERVICE_PORT),
        annotations: service.annotations,
    }
}

fn managed_ollama(cr: &ChatService) -> Option<ManagedOllama> {
    let managed = cr.spec.ollama.clone()?;
    let mut resources = managed.resources.unwrap_or_else(|| {
        default_resources(&[("cpu", "1"), ("memory", "2Gi")], &[("memory", "8Gi")])
    });
    if let Some(gpus) = managed.gpus.filter(|g| *g > 0) {
        let name = managed
            .gpu_resource_name
            .unwrap_or_else(|| DEFAULT_GPU_RESOURCE.into());
        let count = Quantity(gpus.to_string());
        // Extended resources must have requests equal to limits.
        resources
            .limits
            .get_or_insert_with(BTreeMap::new)
            .insert(name.clone(), count.clone());
        resources
            .requests
            .get_or_insert_with(BTreeMap::new)
            .insert(name, count);
    }
    Some(ManagedOllama {
        replicas: managed.replicas,
        image: managed.image.unwrap_or_else(|| DEFAULT_OLLAMA_IMAGE.into()),
        models: managed.models,
        resources,
        storage: managed
            .model_storage
            .unwrap_or_else(|| Quantity(DEFAULT_OLLAMA_STORAGE.into())),
        storage_class_name: managed.storage_class_name,
        retention: managed.retention_policy.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::*;

    fn problems(cr: &ChatService, refs: &References) -> Vec<ConfigProblem> {
        match validate(cr, refs, "0.1.0") {
            Err(ValidateError::Config(problems)) => problems,
            other => panic!("expected config problems, got {other:?}"),
        }
    }

    #[test]
    fn a_tokenizer_configmap_must_exist_hold_the_key_and_look_like_a_tokenizer() {
        let cr = with_tokenizer(MINIMAL);
        let field = "spec.context.tokenizers[0].configMap";
        let mut refs = fake_references(&cr);
        /// A ConfigMap's keys and contents, `None` for no ConfigMap.
        type Found = Option<&'static [(&'static str, &'static [u8])]>;
        let cases: [(Found, &str, String); 3] = [
            (
                None,
                "ConfigMapMissing",
                format!("{field}: ConfigMap \"smollm2-tokenizer\" does not exist."),
            ),
            (
                Some(&[("tokenizer.json", b"{}"), ("vocab.txt", b"a")]),
                "ConfigMapKeyMissing",
                format!(
                    "{field}: ConfigMap \"smollm2-tokenizer\" has no key \"tokenizer.json.gz\" \
                     (it has \"tokenizer.json\", \"vocab.txt\")."
                ),
            ),
            (
                Some(&[("tokenizer.json.gz", b"GGUF\x03\x00")]),
                "TokenizerInvalid",
                format!(
                    "{field}: key \"tokenizer.json.gz\" of ConfigMap \"smollm2-tokenizer\" is \
                     neither a tokenizer.json (a JSON object) nor a gzipped one."
                ),
            ),
        ];
        for (data, reason, message) in cases {
            let data = data.map(|pairs| {
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_vec()))
                    .collect()
            });
            refs.config_maps.insert("smollm2-tokenizer".into(), data);
            assert_eq!(
                problems(&cr, &refs),
                vec![ConfigProblem { reason, message }]
            );
        }
    }

    #[test]
    fn a_tokenizer_is_mounted_where_the_config_names_it_with_its_digest() {
        let cr = with_tokenizer(MINIMAL);
        let mut refs = fake_references(&cr);
        for content in [&b"\n  {\"model\": {}}"[..], &[0x1f, 0x8b, 0x08, 0x00][..]] {
            refs.config_maps.insert(
                "smollm2-tokenizer".into(),
                Some([("tokenizer.json.gz".to_string(), content.to_vec())].into()),
            );
            let cs = validate(&cr, &refs, "0.1.0").expect("a tokenizer that looks like one");
            let mounted = &cs.chat.tokenizers;
            assert_eq!(mounted.len(), 1);
            assert_eq!(mounted[0].config_map.name, "smollm2-tokenizer");
            assert_eq!(mounted[0].digest, hex::encode(Sha256::digest(content)));
            assert_eq!(
                cs.config.context.tokenizers,
                vec![chat_config::TokenizerConfig {
                    model: "gemma3:270m".into(),
                    file: "/var/run/chat-service/tokenizers/0/tokenizer.json.gz".into(),
                }]
            );
        }
    }

    #[test]
    fn a_tokenizer_of_a_model_nobody_can_ask_for_is_refused() {
        let mut cr = with_tokenizer(MINIMAL);
        cr.spec.context.as_mut().unwrap().tokenizers[0].model = "llama3:8b".into();
        let problems = problems(&cr, &fake_references(&cr));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].reason, "InvalidConfig");
        assert!(
            problems[0].message.contains("context.tokenizers[0].model")
                && problems[0].message.contains("\"llama3:8b\""),
            "{problems:?}"
        );
    }

    #[test]
    fn missing_secret_and_key_are_named() {
        let cr = chat_service(FULL);
        let mut refs = References::default();
        refs.secrets
            .insert("llm-keys".into(), secret(&[("other", "x")]));
        refs.secrets.insert("redis-auth".into(), None);
        let problems = problems(&cr, &refs);
        let messages: Vec<_> = problems.iter().map(|p| p.message.as_str()).collect();
        assert!(
            messages.contains(
                &"spec.backends[0].apiKeySecret: Secret \"llm-keys\" has no key \"hosted\"."
            ),
            "{messages:?}"
        );
        assert!(messages.contains(
            &"spec.history.redis.external.passwordSecret: Secret \"redis-auth\" does not exist."
        ));
        assert!(
            messages
                .iter()
                .any(|m| m.contains("spec.history.mongodb.external.uriSecret"))
        );
        assert_eq!(problems[0].reason, "SecretKeyMissing");
    }

    #[test]
    fn complete_references_yield_the_external_stores() {
        let cr = chat_service(FULL);
        let mut refs = fake_references(&cr);
        refs.secrets
            .insert("redis-auth".into(), secret(&[("token", "t\n")]));
        let validated = validate(&cr, &refs, "0.1.0").unwrap();
        let Redis::External(redis) = &validated.redis else {
            panic!("{:?}", validated.redis)
        };
        assert_eq!(redis.password.as_deref(), Some("t"));
        assert_eq!(redis.address, "cache.abc.use1.cache.amazonaws.com:6379");
        let Mongodb::External(mongodb) = &validated.mongodb else {
            panic!("{:?}", validated.mongodb)
        };
        assert_eq!(mongodb.uri, FAKE_MONGODB_URI);
        assert_eq!(mongodb.ca.as_ref().map(|c| c.key.as_str()), Some("ca.pem"));
    }

    #[test]
    fn a_non_mongodb_uri_is_refused() {
        let cr = chat_service(FULL);
        let mut refs = fake_references(&cr);
        refs.secrets.insert(
            "docdb".into(),
            secret(&[("uri", "postgres://x"), ("ca.pem", "PEM")]),
        );
        assert_eq!(problems(&cr, &refs)[0].reason, "InvalidMongoUri");
    }

    #[test]
    fn defaults_are_applied_once() {
        let cr = chat_service(MINIMAL);
        let validated = validate(&cr, &References::default(), "0.1.0").unwrap();
        assert_eq!(
            validated.chat.image,
            "ghcr.io/chatoperator/chat-service:0.1.0"
        );
        assert_eq!(validated.chat.replicas, Replicas::Fixed(2));
        assert_eq!(validated.service.port, 80);
        assert!(validated.network_policies);
        let Redis::Managed(redis) = &validated.redis else {
            panic!("{:?}", validated.redis)
        };
        assert_eq!(
            (redis.image.as_str(), redis.password.as_ref()),
            (DEFAULT_REDIS_IMAGE, None),
            "no password before the provision step"
        );
        let Mongodb::Managed(mongodb) = &validated.mongodb else {
            panic!("{:?}", validated.mongodb)
        };
        assert_eq!(mongodb.storage.0, "10Gi");
        assert_eq!(validated.endpoint(), "http://support.team-a.svc");
        assert_eq!(
            validated.generated_secrets(),
            ["support-redis-password", "support-mongodb-credentials"]
        );
    }

    #[test]
    fn generated_credentials_are_read_from_their_secrets() {
        let cr = chat_service(MINIMAL);
        let mut refs = References::default();
        refs.generated.insert(
            "support-redis-password".into(),
            secret(&[("password", "r")]),
        );
        refs.generated.insert(
            "support-mongodb-credentials".into(),
            secret(&[("username", "chat"), ("password", "m")]),
        );
        let validated = validate(&cr, &refs, "0.1.0").unwrap();
        assert!(
            matches!(&validated.redis, Redis::Managed(r) if r.password.as_deref() == Some("r"))
        );
        assert!(matches!(&validated.mongodb, Mongodb::Managed(m)
            if m.credentials == Some(MongoCredentials { username: "chat".into(), password: "m".into() })));
    }

    #[test]
    fn autoscaling_gpus_and_the_service_are_decided_from_the_spec() {
        let validated = validated(FULL);
        assert!(
            matches!(validated.chat.replicas, Replicas::Autoscaled(ref a) if a.max_replicas == 6)
        );
        assert_eq!(validated.service.port, 8443);
        assert_eq!(validated.endpoint(), "http://support.team-a.svc:8443");
        let ollama = validated.ollama.as_ref().unwrap();
        assert_eq!(
            ollama.resources.limits.as_ref().unwrap()["nvidia.com/gpu"].0,
            "1"
        );
        assert_eq!(
            ollama.resources.requests.as_ref().unwrap()["nvidia.com/gpu"].0,
            "1"
        );
        assert_eq!(ollama.storage.0, "5Gi");
        assert_eq!(
            validated.chat.api_keys[0].variable,
            "BACKEND_HOSTED_API_KEY"
        );
        assert!(validated.generated_secrets().is_empty());
    }

    #[test]
    fn an_object_without_uid_is_an_error_not_a_config_problem() {
        let mut cr = chat_service(MINIMAL);
        cr.metadata.uid = None;
        assert_eq!(
            validate(&cr, &References::default(), "0.1.0"),
            Err(ValidateError::MissingObjectKey("metadata.uid"))
        );
    }
}
