//! Validate: what the schema cannot know. Referenced Secrets and keys must exist, and the rendered
//! config must pass the chat service's own checks. Problems here are the user's to fix, so they
//! become a `ConfigValid=False` condition, not a reconcile error.

use crate::build::{ChildNames, SecretMaterial, config::render_config, mongodb, redis};
use crate::crd::ChatService;
use crate::references::{References, secret_refs};

/// One thing the user must fix, as a sentence that names the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// CamelCase reason for the condition and Event.
    pub reason: &'static str,
    pub message: String,
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_string()
}

/// Checks references and config; on success returns the secret material the builders need.
/// Generated credentials missing from `refs` are left `None` here; the caller creates them first.
pub fn validate(cr: &ChatService, refs: &References) -> Result<SecretMaterial, Vec<ConfigProblem>> {
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
    if !problems.is_empty() {
        return Err(problems);
    }
    let value = |field: Option<&crate::crd::SecretKeyRef>| {
        field.and_then(|r| {
            refs.secrets
                .get(&r.name)?
                .as_ref()?
                .get(&r.key)
                .map(|b| text(b))
        })
    };
    let spec = &cr.spec;
    let mut material = SecretMaterial {
        external_redis_password: value(
            spec.history
                .redis
                .external
                .as_ref()
                .and_then(|e| e.password_secret.as_ref()),
        ),
        external_mongodb_uri: value(
            spec.history
                .mongodb
                .external
                .as_ref()
                .map(|e| &e.uri_secret),
        ),
        ..Default::default()
    };
    if let Some(uri) = &material.external_mongodb_uri
        && !(uri.starts_with("mongodb://") || uri.starts_with("mongodb+srv://"))
    {
        problems.push(ConfigProblem {
            reason: "InvalidMongoUri",
            message: "spec.history.mongodb.external.uriSecret: the URI must start with mongodb:// or mongodb+srv://."
                .into(),
        });
    }
    let names = ChildNames::of(cr);
    let generated = |name: &str, key: &str| {
        refs.generated
            .get(name)?
            .as_ref()?
            .get(key)
            .map(|b| text(b))
    };
    material.redis_password = generated(&names.redis_password(), redis::PASSWORD_KEY);
    let user = generated(&names.mongodb_credentials(), mongodb::USERNAME_KEY);
    let password = generated(&names.mongodb_credentials(), mongodb::PASSWORD_KEY);
    material.mongodb_credentials = user.zip(password);

    match render_config(cr) {
        Ok(config) => {
            if let Err(errors) = config.validate() {
                problems.extend(errors.iter().map(|e| ConfigProblem {
                    reason: "InvalidConfig",
                    message: format!("The rendered chat-service config is invalid: {e}."),
                }));
            }
        }
        Err(e) => problems.push(ConfigProblem {
            reason: "InvalidConfig",
            message: format!("The chat-service config cannot be rendered: {e}."),
        }),
    }
    if problems.is_empty() {
        Ok(material)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::build::fixtures::*;

    fn secret(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, Vec<u8>>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
        )
    }

    #[test]
    fn missing_secret_and_key_are_named() {
        let cr = chat_service(FULL);
        let mut refs = References::default();
        refs.secrets
            .insert("llm-keys".into(), secret(&[("other", "x")]));
        refs.secrets.insert("redis-auth".into(), None);
        let problems = validate(&cr, &refs).unwrap_err();
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
    fn complete_references_yield_the_material() {
        let cr = chat_service(FULL);
        let mut refs = References::default();
        refs.secrets
            .insert("llm-keys".into(), secret(&[("hosted", "k")]));
        refs.secrets
            .insert("redis-auth".into(), secret(&[("token", "t\n")]));
        refs.secrets.insert(
            "docdb".into(),
            secret(&[("uri", "mongodb://u:p@h:27017"), ("ca.pem", "PEM")]),
        );
        refs.secrets
            .insert("api-keys".into(), secret(&[("keys", "a\nb")]));
        let material = validate(&cr, &refs).unwrap();
        assert_eq!(material.external_redis_password.as_deref(), Some("t"));
        assert_eq!(
            material.external_mongodb_uri.as_deref(),
            Some("mongodb://u:p@h:27017")
        );
    }

    #[test]
    fn a_non_mongodb_uri_is_refused() {
        let cr = chat_service(FULL);
        let mut refs = References::default();
        refs.secrets
            .insert("llm-keys".into(), secret(&[("hosted", "k")]));
        refs.secrets
            .insert("redis-auth".into(), secret(&[("token", "t")]));
        refs.secrets.insert(
            "docdb".into(),
            secret(&[("uri", "postgres://x"), ("ca.pem", "PEM")]),
        );
        refs.secrets
            .insert("api-keys".into(), secret(&[("keys", "a")]));
        assert_eq!(
            validate(&cr, &refs).unwrap_err()[0].reason,
            "InvalidMongoUri"
        );
    }
}
