//! The one connection Secret per ChatService: the MongoDB URI (key `uri`) and the Redis URL the
//! chat pods read through `secretKeyRef`, whichever way the stores are run.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;

use super::meta::child_meta;
use crate::crd::MongoFlavor;
use crate::layout::{MONGODB_CA_DIR, MONGODB_CA_FILE, MONGODB_PORT, REDIS_PORT};
use crate::names::{Component, MONGODB_URI_KEY, REDIS_URL_KEY};
use crate::validated::{Mongodb, Redis, ValidatedChatService};

pub fn build_connection_secret(cs: &ValidatedChatService) -> Secret {
    let data = BTreeMap::from([
        (
            MONGODB_URI_KEY.to_string(),
            ByteString(mongodb_uri(cs).into_bytes()),
        ),
        (
            REDIS_URL_KEY.to_string(),
            ByteString(redis_url(cs).into_bytes()),
        ),
    ]);
    Secret {
        metadata: child_meta(cs, cs.names.connection_secret(), Component::Chat),
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    }
}

pub fn mongodb_uri(cs: &ValidatedChatService) -> String {
    match &cs.mongodb {
        Mongodb::External(external) => {
            let mut params: Vec<(&str, String)> = Vec::new();
            if external.ca.is_some() {
                params.push(("tls", "true".into()));
                params.push(("tlsCAFile", format!("{MONGODB_CA_DIR}/{MONGODB_CA_FILE}")));
            }
            if external.flavor == MongoFlavor::Documentdb {
                // DocumentDB does not support retryable writes; the drivers default them on.
                params.push(("retryWrites", "false".into()));
            }
            with_query_params(&external.uri, &params)
        }
        Mongodb::Managed(managed) => {
            let credentials = managed.credentials.clone().unwrap_or_default();
            format!(
                "mongodb://{}:{}@{}.{}.svc:{MONGODB_PORT}/?authSource=admin",
                percent_encode(&credentials.username),
                percent_encode(&credentials.password),
                cs.names.mongodb(),
                cs.namespace,
            )
        }
    }
}

pub fn redis_url(cs: &ValidatedChatService) -> String {
    match &cs.redis {
        Redis::External(external) => {
            let scheme = if external.tls { "rediss" } else { "redis" };
            let auth = match &external.password {
                Some(password) => format!(":{}@", percent_encode(password)),
                None => String::new(),
            };
            format!(
                "{scheme}://{auth}{}/{}",
                external.address, external.database
            )
        }
        Redis::Managed(managed) => format!(
            "redis://:{}@{}.{}.svc:{REDIS_PORT}/0",
            percent_encode(managed.password.as_deref().unwrap_or_default()),
            cs.names.redis(),
            cs.namespace,
        ),
    }
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
    use crate::fixtures::*;
    use crate::validated::MongoCredentials;

    #[test]
    fn managed_stores_point_at_in_cluster_services() {
        let mut cs = validated(MINIMAL);
        if let Redis::Managed(redis) = &mut cs.redis {
            redis.password = Some("p@ss".into());
        }
        if let Mongodb::Managed(mongodb) = &mut cs.mongodb {
            mongodb.credentials = Some(MongoCredentials {
                username: "chat".into(),
                password: "s3cret".into(),
            });
        }
        let secret = build_connection_secret(&cs);
        assert_eq!(
            secret_value(&secret, MONGODB_URI_KEY),
            "mongodb://chat:s3cret@support-mongodb.team-a.svc:27017/?authSource=admin"
        );
        assert_eq!(
            secret_value(&secret, REDIS_URL_KEY),
            "redis://:p%40ss@support-redis.team-a.svc:6379/0"
        );
        assert_eq!(secret.metadata.name.as_deref(), Some("support-connection"));
    }

    #[test]
    fn documentdb_gets_tls_ca_and_no_retryable_writes() {
        let mut cs = validated(FULL);
        if let Mongodb::External(mongodb) = &mut cs.mongodb {
            mongodb.uri =
                "mongodb://u:p@docdb.cluster.amazonaws.com:27017/?retryWrites=true&w=majority"
                    .into();
        }
        if let Redis::External(redis) = &mut cs.redis {
            redis.password = Some("tok en".into());
        }
        let secret = build_connection_secret(&cs);
        assert_eq!(
            secret_value(&secret, MONGODB_URI_KEY),
            "mongodb://u:p@docdb.cluster.amazonaws.com:27017/?w=majority&tls=true&tlsCAFile=/var/run/chat-service/mongodb-ca/ca.pem&retryWrites=false"
        );
        assert_eq!(
            secret_value(&secret, REDIS_URL_KEY),
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
