//! Apply: server-side apply of the desired children with one field manager, one-time creation of
//! generated credentials, and pruning of children the spec no longer asks for.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{
    DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, PropagationPolicy,
};
use kube::{Api, Client, ResourceExt};
use rand::distr::{Alphanumeric, SampleString};

use crate::build::{
    ChildKind, ChildNames, DesiredChildren, FIELD_MANAGER, LABEL_CHATSERVICE, mongodb, redis,
};
use crate::crd::ChatService;
use crate::error::Result;
use crate::references::References;
use crate::status::WorkloadState;

/// Applied objects as the API server returned them, keyed by kind and name.
pub type Applied = BTreeMap<(ChildKind, String), DynamicObject>;

fn random_password() -> String {
    // Alphanumeric only, so it needs no escaping in URLs or shells.
    Alphanumeric.sample_string(&mut rand::rng(), 32)
}

/// Creates the generated credential Secrets that do not exist yet and records their data in
/// `refs`. An existing Secret is never touched, so a password, once made, stays.
pub async fn ensure_generated_secrets(
    client: &Client,
    cr: &ChatService,
    refs: &mut References,
) -> Result<()> {
    let namespace = cr.namespace().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let names = ChildNames::of(cr);
    let mut wanted = Vec::new();
    if cr.spec.history.redis.managed.is_some() {
        wanted.push((
            names.redis_password(),
            redis::build_redis_password_secret(cr, &random_password())?,
        ));
    }
    if cr.spec.history.mongodb.managed.is_some() {
        let secret =
            mongodb::build_mongodb_credentials_secret(cr, mongodb::USERNAME, &random_password())?;
        wanted.push((names.mongodb_credentials(), secret));
    }
    for (name, secret) in wanted {
        if matches!(refs.generated.get(&name), Some(Some(_))) {
            continue;
        }
        let stored = match api.create(&PostParams::default(), &secret).await {
            Ok(created) => created,
            // Another reconcile (or a previous operator) won the race: use what is there.
            Err(kube::Error::Api(e)) if e.code == 409 => api.get(&name).await?,
            Err(e) => return Err(e.into()),
        };
        tracing::info!(secret = %name, "generated credentials Secret created");
        let data = stored
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect();
        refs.generated.insert(name, Some(data));
    }
    Ok(())
}

fn dynamic_api(client: &Client, namespace: &str, kind: ChildKind) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), namespace, &kind.api_resource())
}

/// Field manager that keeps a Deployment's replica count while the operator lets go of it.
pub const REPLICAS_HANDOVER_MANAGER: &str = "chat-operator-replicas-handover";

/// When autoscaling is turned on, the operator's apply stops carrying `spec.replicas`. Were the
/// operator still its only owner, the API server would drop the field and default it to 1,
/// scaling a busy Deployment down until the HPA reacts. So a second manager first applies the
/// current count (server-side apply's documented way to transfer a field), and only then does
/// the operator's apply leave it out.
async fn hand_over_replicas(api: &Api<DynamicObject>, name: &str) -> Result<()> {
    let Some(live) = api.get_opt(name).await? else {
        return Ok(());
    };
    let operator_owns_replicas = live.managed_fields().iter().any(|entry| {
        entry.manager.as_deref() == Some(FIELD_MANAGER)
            && entry
                .fields_v1
                .as_ref()
                .is_some_and(|fields| fields.0.pointer("/f:spec/f:replicas").is_some())
    });
    let Some(replicas) = live.data.pointer("/spec/replicas").cloned() else {
        return Ok(());
    };
    if !operator_owns_replicas {
        return Ok(());
    }
    let keep = serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"replicas": replicas},
    });
    api.patch(
        name,
        &PatchParams::apply(REPLICAS_HANDOVER_MANAGER).force(),
        &Patch::Apply(&keep),
    )
    .await?;
    tracing::info!(deployment = %name, %replicas, "spec.replicas handed over for the HPA");
    Ok(())
}

/// Applies every desired object. Unchanged objects cause no write on the server: an apply whose
/// result equals the stored object does not bump its resourceVersion.
pub async fn apply_children(
    client: &Client,
    namespace: &str,
    desired: &DesiredChildren,
) -> Result<Applied> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut applied = Applied::new();
    for object in &desired.objects {
        let api = dynamic_api(client, namespace, object.kind);
        if object.kind == ChildKind::Deployment
            && object.manifest.pointer("/spec/replicas").is_none()
        {
            hand_over_replicas(&api, &object.name).await?;
        }
        let result = api
            .patch(&object.name, &params, &Patch::Apply(&object.manifest))
            .await?;
        applied.insert((object.kind, object.name.clone()), result);
    }
    Ok(applied)
}

/// Deletes children of `cr` that are not desired any more. Only objects carrying this
/// ChatService's label *and* its controller reference are candidates, so user objects are safe.
pub async fn prune_children(
    client: &Client,
    cr: &ChatService,
    desired: &DesiredChildren,
) -> Result<Vec<String>> {
    let namespace = cr.namespace().unwrap_or_default();
    let uid = cr.uid().unwrap_or_default();
    let keep = desired.keep();
    let selector = format!("{LABEL_CHATSERVICE}={}", cr.name_any());
    let mut pruned = Vec::new();
    for kind in ChildKind::ALL {
        let api = dynamic_api(client, &namespace, kind);
        let list = api
            .list_metadata(&ListParams::default().labels(&selector))
            .await?;
        for object in list.items {
            let name = object.name_any();
            let owned = object
                .owner_references()
                .iter()
                .any(|o| o.uid == uid && o.controller == Some(true));
            if !owned || keep.contains(&(kind, name.clone())) {
                continue;
            }
            let params = DeleteParams {
                propagation_policy: Some(PropagationPolicy::Background),
                ..Default::default()
            };
            match api.delete(&name, &params).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
            pruned.push(format!("{kind:?}/{name}"));
        }
    }
    Ok(pruned)
}

/// Workload state of an applied Deployment.
pub fn deployment_state(object: &DynamicObject) -> Option<WorkloadState> {
    let deployment: Deployment = object.clone().try_parse().ok()?;
    let generation = deployment.metadata.generation;
    let spec_replicas = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let status = deployment.status.unwrap_or_default();
    Some(WorkloadState {
        desired: spec_replicas,
        ready: status.ready_replicas.unwrap_or(0),
        updated: status.updated_replicas.unwrap_or(0),
        available: status.available_replicas.unwrap_or(0),
        observed_latest: status.observed_generation.is_some()
            && status.observed_generation >= generation,
    })
}

/// Workload state of an applied StatefulSet.
pub fn statefulset_state(object: &DynamicObject) -> Option<WorkloadState> {
    let sts: StatefulSet = object.clone().try_parse().ok()?;
    let generation = sts.metadata.generation;
    let spec_replicas = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let status = sts.status.unwrap_or_default();
    Some(WorkloadState {
        desired: spec_replicas,
        ready: status.ready_replicas.unwrap_or(0),
        updated: status.updated_replicas.unwrap_or(0),
        available: status.available_replicas.unwrap_or(0),
        observed_latest: status.observed_generation.is_some()
            && status.observed_generation >= generation,
    })
}
