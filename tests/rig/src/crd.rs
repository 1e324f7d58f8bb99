//! Installing a CustomResourceDefinition on the rig's API server the way the tests and benches
//! need it: applied (server-side, idempotent, shared by every test of the process) and usable,
//! which is later than created — the API server first marks it `Established`, and discovery
//! serves the new resource a moment after that.

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams};
use kube::{Api, Client};

use crate::wait;

/// How long a CRD may take to serve on a busy machine.
pub const SERVE_TIMEOUT: Duration = Duration::from_secs(60);

/// Applies `crd` under `field_manager` (forced: tests share the object and apply the same content)
/// and waits until its resource can be listed.
pub async fn install(
    client: &Client,
    crd: &CustomResourceDefinition,
    field_manager: &str,
) -> Result<()> {
    let name = crd
        .metadata
        .name
        .clone()
        .ok_or_else(|| anyhow!("the CustomResourceDefinition has no name"))?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        &name,
        &PatchParams::apply(field_manager).force(),
        &Patch::Apply(crd),
    )
    .await
    .with_context(|| format!("applying CustomResourceDefinition {name}"))?;
    wait::until_object(&crds, &name, "to be Established", SERVE_TIMEOUT, |crd| {
        let established = crd
            .status
            .as_ref()?
            .conditions
            .as_ref()?
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        established.then_some(())
    })
    .await;
    let resource = served_resource(crd)?;
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    wait::until(
        &format!("{} to be served", resource.plural),
        SERVE_TIMEOUT,
        || async {
            api.list(&ListParams::default().limit(1))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        },
    )
    .await;
    Ok(())
}

/// The storage version of the CRD's resource (the one a client lists by default).
fn served_resource(crd: &CustomResourceDefinition) -> Result<ApiResource> {
    let spec = &crd.spec;
    let version = spec
        .versions
        .iter()
        .find(|v| v.storage)
        .or_else(|| spec.versions.first())
        .ok_or_else(|| {
            anyhow!(
                "CustomResourceDefinition {:?} has no version",
                crd.metadata.name
            )
        })?;
    let gvk = GroupVersionKind::gvk(&spec.group, &version.name, &spec.names.kind);
    Ok(ApiResource::from_gvk_with_plural(&gvk, &spec.names.plural))
}
