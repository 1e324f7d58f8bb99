//! Publish: writes the computed status when it differs from the stored one, and one Event per
//! condition that flipped and per rollout transition (sent on a task of its own, after the
//! status).

use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};

use super::Context;

use crate::crd::{ChatService, ChatServiceStatus};
use crate::error::PublishError;
use crate::names::FIELD_MANAGER;
use crate::rollout::machine::Transition;
use crate::status::{announcement, transitions};

/// Writes `new` unless it is the stored status, then announces what flipped. An Event that cannot
/// be published is logged, not an error: the status already says it.
pub async fn publish_status(
    ctx: &Context,
    cr: &ChatService,
    new: ChatServiceStatus,
    rollout: Option<Transition>,
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
    // The Events go out on a task of their own, off the reconcile's critical path: the status
    // already says what they announce, and each is a request of its own.
    let rollout_event = rollout.map(|t| Event {
        type_: if t.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: format!("Rollout{}", t.reason),
        note: Some(t.note),
        action: "Rollout".into(),
        secondary: None,
    });
    let events: Vec<Event> = transitions(old, &new)
        .into_iter()
        .map(|condition| {
            let announced = announcement(condition);
            Event {
                type_: if announced.warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: announced.reason,
                note: Some(announced.note),
                action: "Reconcile".into(),
                secondary: None,
            }
        })
        .chain(rollout_event)
        .collect();
    if !events.is_empty() {
        let recorder = ctx.recorder.clone();
        let reference = cr.object_ref(&());
        tokio::spawn(async move {
            for event in events {
                if let Err(e) = recorder.publish(&event, &reference).await {
                    tracing::warn!(error = %e, "could not publish an Event");
                }
            }
        });
    }
    Ok(())
}
