//! Provision: the credentials the operator generates for the stores it runs (the Redis password,
//! the MongoDB root user) are created once with random values and never applied again, so that a
//! password, once made, stays. Their values complete the [`ValidatedChatService`].
//!
//! The MongoDB credentials go with the data they open (`history.mongodb.managed.retentionPolicy`):
//! owned by the ChatService when its volume is deleted with it, unowned when the volume is
//! retained. A ChatService re-created under the same name then finds the retained Secret (claim
//! lets it through, see [`super::claim`]) and logs in to the old data with the old password. Only
//! the Secret's owner reference follows a change of the policy; its data is never rewritten.

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use rand::distr::{Alphanumeric, SampleString};
use serde_json::json;

use super::dereference::{References, data_of, text_at};
use crate::build::{mongodb, redis};
use crate::children::ChildStores;
use crate::crd::RetentionPolicy;
use crate::error::ProvisionError;
use crate::names::{MONGODB_PASSWORD_KEY, MONGODB_USERNAME_KEY, REDIS_PASSWORD_KEY};
use crate::validated::{MongoCredentials, Mongodb, Redis, ValidatedChatService};

fn random_password() -> String {
    // Alphanumeric only, so it needs no escaping in URLs or shells.
    Alphanumeric.sample_string(&mut rand::rng(), 32)
}

/// Creates `secret` unless it exists, and returns what is stored.
async fn create_once(
    api: &Api<Secret>,
    name: String,
    secret: Secret,
) -> Result<Secret, ProvisionError> {
    let stored = match api.create(&PostParams::default(), &secret).await {
        Ok(created) => created,
        // Another reconcile (or a previous operator) won the race: use what is there.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            api.get(&name).await.map_err(|source| ProvisionError {
                name: name.clone(),
                source,
            })?
        }
        Err(source) => return Err(ProvisionError { name, source }),
    };
    tracing::info!(secret = %name, "generated credentials Secret created");
    Ok(stored)
}

/// Makes the cached generated Secret `name` owned by `cs` when `retention` is `Delete` and
/// unowned when it is `Retain`; only `metadata.ownerReferences` is written, and only when it
/// differs. The Secret passed the claim step, so it is ours or retained for this name.
async fn own_as_retained(
    api: &Api<Secret>,
    stores: &ChildStores,
    cs: &ValidatedChatService,
    name: &str,
    retention: RetentionPolicy,
) -> Result<(), ProvisionError> {
    let Some(cached) = stores.get::<Secret>(&cs.namespace, name) else {
        return Ok(());
    };
    let owned = cached
        .owner_references()
        .iter()
        .any(|o| o.uid == cs.owner.uid);
    let owner_references = match (retention, owned) {
        (RetentionPolicy::Delete, false) => json!([cs.owner]),
        (RetentionPolicy::Retain, true) => json!(null),
        _ => return Ok(()),
    };
    let patch = json!({"metadata": {"ownerReferences": owner_references}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|source| ProvisionError {
            name: name.into(),
            source,
        })?;
    tracing::info!(secret = %name, retention = retention.as_str(), "generated credentials Secret re-owned");
    Ok(())
}

/// Creates the generated credential Secrets of `cs` that `refs` did not find, and fills their
/// values into `cs`. An existing Secret's data is never touched. `refs` come from the watch
/// cache: present there means made earlier, by us, a previous operator or a deleted ChatService
/// of the same name whose data was retained; a cache that lags our own create only costs a 409
/// and a GET.
pub async fn provision_credentials(
    client: &kube::Client,
    refs: &References,
    stores: &ChildStores,
    cs: &mut ValidatedChatService,
) -> Result<(), ProvisionError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &cs.namespace);
    let missing = |name: &str| !matches!(refs.generated.get(name), Some(Some(_)));

    let name = cs.names.redis_password();
    if matches!(cs.redis, Redis::Managed(_)) && missing(&name) {
        let secret = redis::build_redis_password_secret(cs, &random_password());
        let stored = data_of(Some(create_once(&api, name, secret).await?));
        if let Redis::Managed(managed) = &mut cs.redis {
            managed.password = text_at(&stored, REDIS_PASSWORD_KEY);
        }
    }
    let name = cs.names.mongodb_credentials();
    let retention = match &cs.mongodb {
        Mongodb::Managed(managed) => Some(managed.retention),
        Mongodb::External(_) => None,
    };
    if let Some(retention) = retention
        && !missing(&name)
    {
        own_as_retained(&api, stores, cs, &name, retention).await?;
    }
    if let Some(retention) = retention
        && missing(&name)
    {
        let credentials = MongoCredentials {
            username: mongodb::USERNAME.into(),
            password: random_password(),
        };
        let secret = mongodb::build_mongodb_credentials_secret(cs, &credentials, retention);
        let stored = data_of(Some(create_once(&api, name, secret).await?));
        if let Mongodb::Managed(managed) = &mut cs.mongodb {
            managed.credentials = text_at(&stored, MONGODB_USERNAME_KEY)
                .zip(text_at(&stored, MONGODB_PASSWORD_KEY))
                .map(|(username, password)| MongoCredentials { username, password });
        }
    }
    Ok(())
}
