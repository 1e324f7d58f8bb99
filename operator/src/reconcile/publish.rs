//! Publish: writes the computed status when it differs from the stored one, and one Event per
//! condition that flipped.

use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};

use super::Context;

use crate::crd::{ChatService, ChatServiceStatus};
use crate::error::PublishError;
use crate::names::FIELD_MANAGER;
use crate::status::{announcement, transitions};

/// Writes `new` unless it is the stored status, then announces what flipped. An Event that cannot
/// be published is logged, not an error: the status already says it.
pub async fn publish_status(
    ctx: &Context,
    cr: &ChatService,
    new: ChatServiceStatus,
) -> Result<(), PublishError> {
    let old = cr.status.as_ref();
    if old == Some(&new) {
        return Ok(());
    }
    let api: Api<ChatService> =
        Api::namespaced(ctx.client.clone(), &cr.namespace().unwrap_or_default());
    // Recorded before the write: its watch event may arrive before the response.
    ctx.own_status.writing(&cr.uid().unwrap_or_default(), &new);
    let patch = serde_json::json!({
        "apiVersion": ChatService::api_version(&()),
        "kind": ChatService::kind(&()),
        "status": new,
    });
    api.patch_status(
        &cr.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(PublishError)?;
    ctx.metrics.status_writes.inc();
    let recorder = &ctx.recorder;
    let reference = cr.object_ref(&());
    for condition in transitions(old, &new) {
        let announced = announcement(condition);
        let event = Event {
            type_: if announced.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: announced.reason,
            note: Some(announced.note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &reference).await {
            tracing::warn!(error = %e, "could not publish an Event");
        }
    }
    Ok(())
}
