//! Dereference: read every Secret and ConfigMap a ChatService points at, plus the credential
//! Secrets the operator generated for it earlier, so that validation needs no client.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, Client, ResourceExt};

use crate::children::ChildStores;
use crate::crd::{ChatService, ConfigMapKeyRef, SecretKeyRef};
use crate::error::DereferenceError;
use crate::names::ChildNames;

/// Data of a Secret by key; `None` when the Secret does not exist.
pub type SecretData = Option<BTreeMap<String, Vec<u8>>>;

/// Data of a ConfigMap by key, `data` and `binaryData` together; `None` when it does not exist.
pub type ConfigMapData = Option<BTreeMap<String, Vec<u8>>>;

/// What the dereference step found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct References {
    /// Every Secret named by the spec, by name.
    pub secrets: BTreeMap<String, SecretData>,
    /// The operator's own generated Secrets (Redis password, MongoDB credentials), by name.
    pub generated: BTreeMap<String, SecretData>,
    /// Every ConfigMap named by the spec (the models' tokenizers), by name.
    pub config_maps: BTreeMap<String, ConfigMapData>,
}

/// Every Secret key the spec refers to, with the path of the field that names it.
pub fn secret_refs(cr: &ChatService) -> Vec<(String, SecretKeyRef)> {
    let spec = &cr.spec;
    let mut refs = Vec::new();
    for (i, backend) in spec.backends.iter().enumerate() {
        if let Some(r) = &backend.api_key_secret {
            refs.push((format!("spec.backends[{i}].apiKeySecret"), r.clone()));
        }
    }
    if let Some(r) = spec
        .history
        .redis
        .external
        .as_ref()
        .and_then(|e| e.password_secret.as_ref())
    {
        refs.push((
            "spec.history.redis.external.passwordSecret".into(),
            r.clone(),
        ));
    }
    if let Some(r) = spec
        .history
        .redis
        .external
        .as_ref()
        .and_then(|e| e.ca_secret.as_ref())
    {
        refs.push(("spec.history.redis.external.caSecret".into(), r.clone()));
    }
    if let Some(external) = &spec.history.mongodb.external {
        refs.push((
            "spec.history.mongodb.external.uriSecret".into(),
            external.uri_secret.clone(),
        ));
        if let Some(r) = &external.ca_secret {
            refs.push(("spec.history.mongodb.external.caSecret".into(), r.clone()));
        }
    }
    if let Some(auth) = &spec.auth {
        refs.push((
            "spec.auth.apiKeysSecret".into(),
            auth.api_keys_secret.clone(),
        ));
    }
    refs
}

/// Every ConfigMap key the spec refers to, with the path of the field that names it.
pub fn config_map_refs(cr: &ChatService) -> Vec<(String, ConfigMapKeyRef)> {
    let tokenizers = cr.spec.context.iter().flat_map(|c| &c.tokenizers);
    tokenizers
        .enumerate()
        .map(|(i, t)| {
            (
                format!("spec.context.tokenizers[{i}].configMap"),
                t.config_map.clone(),
            )
        })
        .collect()
}

/// Names of the user's ConfigMaps whose appearance, change or removal should re-run this
/// ChatService.
pub fn watched_config_map_names(cr: &ChatService) -> BTreeSet<String> {
    config_map_refs(cr)
        .into_iter()
        .map(|(_, r)| r.name)
        .collect()
}

/// The data of a ConfigMap as read from the API, `None` when it does not exist.
pub fn config_map_data(config_map: Option<ConfigMap>) -> ConfigMapData {
    config_map.map(|c| {
        let mut data: BTreeMap<String, Vec<u8>> = c
            .binary_data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect();
        for (k, v) in c.data.unwrap_or_default() {
            data.insert(k, v.into_bytes());
        }
        data
    })
}

/// Names of Secrets whose appearance, change or removal should re-run this ChatService.
pub fn watched_secret_names(cr: &ChatService) -> BTreeSet<String> {
    let names = ChildNames::of(cr);
    secret_refs(cr)
        .into_iter()
        .map(|(_, r)| r.name)
        .chain([
            names.redis_password(),
            names.mongodb_credentials(),
            names.connection_secret(),
        ])
        .collect()
}

/// The text at `key` of a Secret's data, trimmed (a file written with a final newline holds the
/// same password as one without).
pub fn text_at(data: &SecretData, key: &str) -> Option<String> {
    let bytes = data.as_ref()?.get(key)?;
    Some(String::from_utf8_lossy(bytes).trim().to_string())
}

/// The data of a Secret as read from the API, `None` when it does not exist.
pub fn data_of(secret: Option<Secret>) -> SecretData {
    secret.map(|s| {
        let mut data: BTreeMap<String, Vec<u8>> = s
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect();
        // stringData is write-only, but a Secret read straight after creation can carry it.
        for (k, v) in s.string_data.unwrap_or_default() {
            data.entry(k).or_insert_with(|| v.into_bytes());
        }
        data
    })
}

/// Reads the Secrets and ConfigMaps the spec names (GET: a user's Secrets are not cached, only watched for
/// changes by metadata) and the operator's generated credentials (from the watch cache, so
/// reading both costs nothing; validation uses those of the stores that are managed).
pub async fn read_references(
    client: &Client,
    cr: &ChatService,
    stores: &ChildStores,
) -> Result<References, DereferenceError> {
    let namespace = cr.namespace().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let mut out = References::default();
    for (_, r) in secret_refs(cr) {
        if !out.secrets.contains_key(&r.name) {
            let found = api
                .get_opt(&r.name)
                .await
                .map_err(|source| DereferenceError {
                    kind: "Secret",
                    name: r.name.clone(),
                    source,
                })?;
            out.secrets.insert(r.name.clone(), data_of(found));
        }
    }
    // Tokenizers are read when a reconcile needs them, not cached: a few of up to 1 MiB each
    // would otherwise stay in the operator's memory for every ChatService.
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    for (_, r) in config_map_refs(cr) {
        if !out.config_maps.contains_key(&r.name) {
            let found = config_maps
                .get_opt(&r.name)
                .await
                .map_err(|source| DereferenceError {
                    kind: "ConfigMap",
                    name: r.name.clone(),
                    source,
                })?;
            out.config_maps
                .insert(r.name.clone(), config_map_data(found));
        }
    }
    let names = ChildNames::of(cr);
    for name in [names.redis_password(), names.mongodb_credentials()] {
        let cached = stores.get::<Secret>(&namespace, &name);
        out.generated.insert(name, data_of(cached));
    }
    Ok(out)
}
