//! The one connection Secret per ChatService: the MongoDB URI (key `uri`) and the Redis URL the
//! chat pods read through `secretKeyRef`, whichever way the stores are run.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;

use super::{ChildNames, Component, SecretMaterial, child_meta, mongodb, redis};
use crate::crd::{ChatService, MongoFlavor};
use crate::error::Result;

pub const MONGODB_URI_KEY: &str = "uri";
pub const REDIS_URL_KEY: &str = "redis-url";
/// Where the external MongoDB CA bundle is mounted.
pub const MONGODB_CA_DIR: &str = "/var/run/chat-service/mongodb-ca";
pub const MONGODB_CA_FILE: &str = "ca.pem";

pub fn build_connection_secret(cr: &ChatService, secrets: &SecretMaterial) -> Result<Secret> {
    let data = BTreeMap::from([
        (
            MONGODB_URI_KEY.to_string(),
            ByteString(mongodb_uri(cr, secrets).into_bytes()),
        ),
        (
            REDIS_URL_KEY.to_string(),
            ByteString(redis_url(cr, secrets).into_bytes()),
        ),
    ]);
    Ok(Secret {
        metadata: child_meta(cr, ChildNames::of(cr).connection_secret(), Component::Chat)?,
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    })
}

pub fn mongodb_uri(cr: &ChatService, secrets: &SecretMaterial) -> String {
    let spec = &cr.spec.history.mongodb;
    if let Some(external) = &spec.external {
        let uri = secrets.external_mongodb_uri.clone().unwrap_or_default();
        let mut params: Vec<(&str, String)> = Vec::new();
        if external.ca_secret.is_some() {
            params.push(("tls", "true".into()));
            params.push(("tlsCAFile", format!("{MONGODB_CA_DIR}/{MONGODB_CA_FILE}")));
        }
        if external.flavor == MongoFlavor::Documentdb {
            // DocumentDB does not support retryable writes; the drivers default them on.
            params.push(("retryWrites", "false".into()));
        }
        return with_query_params(&uri, &params);
    }
    let (user, password) = secrets.mongodb_credentials.clone().unwrap_or_default();
    format!(
        "mongodb://{}:{}@{}.{}.svc:{}/?authSource=admin",
        percent_encode(&user),
        percent_encode(&password),
        ChildNames::of(cr).mongodb(),
        cr.namespace().unwrap_or_default(),
        mongodb::PORT
    )
}

pub fn redis_url(cr: &ChatService, secrets: &SecretMaterial) -> String {
    let spec = &cr.spec.history.redis;
    if let Some(external) = &spec.external {
        let scheme = if external.tls { "rediss" } else { "redis" };
        let auth = match &secrets.external_redis_password {
            Some(password) => format!(":{}@", percent_encode(password)),
            None => String::new(),
        };
        return format!(
            "{scheme}://{auth}{}/{}",
            external.address,
            external.database.unwrap_or(0)
        );
    }
    format!(
        "redis://:{}@{}.{}.svc:{}/0",
        percent_encode(secrets.redis_password.as_deref().unwrap_or_default()),
        ChildNames::of(cr).redis(),
        cr.namespace().unwrap_or_default(),
        redis::PORT
    )
}

/// Sets query parameters on a MongoDB URI, replacing any the user already gave for the same keys.
fn with_query_params(uri: &str, params: &[(&str, String)]) -> String {
    if params.is_empty() {
        return uri.to_string();
    }
    let (base, query) = match uri.split_once('?') {
        Some((base, query)) => (base.to_string(), query.to_string()),
        None => {
            let after_scheme = uri.split_once("://").map(|(_, rest)| rest).unwrap_or(uri);
            let base = if after_scheme.contains('/') {
                uri.to_string()
            } else {
                format!("{uri}/")
            };
            (base, String::new())
        }
    };
    let mut kept: Vec<String> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .filter(|p| {
            let key = p.split('=').next().unwrap_or_default();
            !params.iter().any(|(k, _)| k.eq_ignore_ascii_case(key))
        })
        .map(str::to_string)
        .collect();
    kept.extend(params.iter().map(|(k, v)| format!("{k}={v}")));
    format!("{base}?{}", kept.join("&"))
}

/// RFC 3986 percent-encoding of everything but unreserved characters, for URL user info.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures::*;

    fn value(secret: &Secret, key: &str) -> String {
        String::from_utf8(secret.data.as_ref().unwrap()[key].0.clone()).unwrap()
    }

    #[test]
    fn managed_stores_point_at_in_cluster_services() {
        let material = SecretMaterial {
            redis_password: Some("p@ss".into()),
            mongodb_credentials: Some(("chat".into(), "s3cret".into())),
            ..Default::default()
        };
        let secret = build_connection_secret(&chat_service(MINIMAL), &material).unwrap();
        assert_eq!(
            value(&secret, MONGODB_URI_KEY),
            "mongodb://chat:s3cret@support-mongodb.team-a.svc:27017/?authSource=admin"
        );
        assert_eq!(
            value(&secret, REDIS_URL_KEY),
            "redis://:p%40ss@support-redis.team-a.svc:6379/0"
        );
        assert_eq!(secret.metadata.name.as_deref(), Some("support-connection"));
    }

    #[test]
    fn documentdb_gets_tls_ca_and_no_retryable_writes() {
        let material = SecretMaterial {
            external_mongodb_uri: Some(
                "mongodb://u:p@docdb.cluster.amazonaws.com:27017/?retryWrites=true&w=majority"
                    .into(),
            ),
            external_redis_password: Some("tok en".into()),
            ..Default::default()
        };
        let secret = build_connection_secret(&chat_service(FULL), &material).unwrap();
        assert_eq!(
            value(&secret, MONGODB_URI_KEY),
            "mongodb://u:p@docdb.cluster.amazonaws.com:27017/?w=majority&tls=true&tlsCAFile=/var/run/chat-service/mongodb-ca/ca.pem&retryWrites=false"
        );
        assert_eq!(
            value(&secret, REDIS_URL_KEY),
            "rediss://:tok%20en@cache.abc.use1.cache.amazonaws.com:6379/0"
        );
    }

    #[test]
    fn query_is_added_to_a_bare_host() {
        assert_eq!(
            with_query_params("mongodb://h:1", &[("retryWrites", "false".into())]),
            "mongodb://h:1/?retryWrites=false"
        );
        assert_eq!(
            with_query_params("mongodb://h:1/db", &[]),
            "mongodb://h:1/db"
        );
    }
}
