//! Provision: the credentials the operator generates for the stores it runs (the Redis password,
//! the MongoDB root user) are created once with random values and never applied again, so that a
//! password, once made, stays. Their values complete the [`ValidatedChatService`].

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::PostParams;
use rand::distr::{Alphanumeric, SampleString};

use super::dereference::{References, data_of, text_at};
use crate::build::{mongodb, redis};
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

/// Creates the generated credential Secrets of `cs` that `refs` did not find, and fills their
/// values into `cs`. An existing Secret is never touched. `refs` come from the watch cache:
/// present there means made earlier, by us or a previous operator; a cache that lags our own
/// create only costs a 409 and a GET.
pub async fn provision_credentials(
    client: &kube::Client,
    refs: &References,
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
    if matches!(cs.mongodb, Mongodb::Managed(_)) && missing(&name) {
        let credentials = MongoCredentials {
            username: mongodb::USERNAME.into(),
            password: random_password(),
        };
        let secret = mongodb::build_mongodb_credentials_secret(cs, &credentials);
        let stored = data_of(Some(create_once(&api, name, secret).await?));
        if let Mongodb::Managed(managed) = &mut cs.mongodb {
            managed.credentials = text_at(&stored, MONGODB_USERNAME_KEY)
                .zip(text_at(&stored, MONGODB_PASSWORD_KEY))
                .map(|(username, password)| MongoCredentials { username, password });
        }
    }
    Ok(())
}
