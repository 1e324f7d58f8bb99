//! A converged ChatService is left alone between resyncs: writes that change nothing the operator
//! reads (the status kube-controller-manager keeps on Services, PodDisruptionBudgets and HPAs,
//! which the caches drop) and the watch event of the operator's own status write trigger no
//! reconcile, while a status written by someone else is still put right. At 1,000 ChatServices
//! every such event was a reconcile (docs/BENCHMARKS.md, "Operator convergence").
//!
//! The reconciles are counted on the operator's own `/metrics`; its resync is an hour, so every
//! reconcile in a window came from a watch event.

mod support;

use std::time::Duration;

use chat_operator::OperatorConfig;
use chat_operator::crd::ChatService;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use support::chat_service::{chat_service, create, minimal_spec, wait_condition};
use support::snapshot::settle;
use support::{Operator, env};

/// Reconciles the operator starts within `window`, after `action`.
async fn reconciles_during(
    operator: &Operator,
    window: Duration,
    action: impl std::future::Future<Output = ()>,
) -> u64 {
    let before = operator.reconciles().await;
    action.await;
    tokio::time::sleep(window).await;
    operator.reconciles().await - before
}

#[tokio::test]
async fn writes_that_change_nothing_the_operator_reads_trigger_no_reconcile() {
    let env = env("quiet").await;
    let config = OperatorConfig {
        namespaces: vec![env.ns.clone()],
        ..OperatorConfig::default()
    };
    let operator = Operator::start_resync(
        env.operator_client.clone(),
        config,
        Duration::from_secs(3600),
    );
    create(&env, &chat_service("chat", minimal_spec())).await;
    wait_condition(&env, "chat", "ConfigValid", "True").await;
    settle(&env, "the ChatService and its children to settle").await;

    // Nothing happens: nothing is reconciled.
    let idle = reconciles_during(&operator, Duration::from_secs(3), async {}).await;
    assert_eq!(idle, 0, "reconciles with nothing changing");

    // Status-only writes to a child whose status the operator never reads (as
    // kube-controller-manager makes to Services, PDBs and HPAs): no reconcile.
    let services: Api<Service> = env.api();
    let status_writes = async {
        for i in 1..=3 {
            let status = json!({"status": {"conditions": [{
                "type": "example.com/Checked", "status": "True", "reason": format!("Round{i}"),
                "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
            services
                .patch_status("chat", &PatchParams::default(), &Patch::Merge(&status))
                .await
                .expect("a status write to the chat Service");
            // Apart by more than the controller's debounce, so each would be its own reconcile.
            tokio::time::sleep(Duration::from_millis(800)).await;
        }
    };
    let after_child_status =
        reconciles_during(&operator, Duration::from_secs(3), status_writes).await;
    let triggers = operator.metrics_text().await;
    assert_eq!(
        after_child_status,
        0,
        "reconciles after 3 status-only writes to the chat Service; watch events:\n{}",
        triggers
            .lines()
            .filter(|l| l.starts_with("chatoperator_watch_events_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // A status written by someone else is put right, and the operator's own rewrite of it
    // triggers nothing more: one reconcile, not two.
    let chat_services: Api<ChatService> = env.api();
    let writes_before = operator.counter("chatoperator_status_writes_total").await;
    let clobber = async {
        let wrong = json!({"status": {"conditions": []}});
        chat_services
            .patch_status("chat", &PatchParams::default(), &Patch::Merge(&wrong))
            .await
            .expect("a foreign status write");
        wait_condition(&env, "chat", "ConfigValid", "True").await;
    };
    let after_clobber = reconciles_during(&operator, Duration::from_secs(3), clobber).await;
    let rewrites = operator.counter("chatoperator_status_writes_total").await - writes_before;
    assert_eq!(rewrites, 1, "status writes putting the status right");
    assert_eq!(
        after_clobber, 1,
        "reconciles after a foreign status write (the echo of the operator's own write must not count)"
    );
    operator.stop().await;
}
