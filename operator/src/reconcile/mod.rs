//! The reconcile pipeline of one ChatService, step by step:
//!
//! 1. [`dereference`] reads what the spec points at (Secrets), so no later step needs a client
//!    to decide anything;
//! 2. [`validate`] checks it and makes every decision once, giving the
//!    [`crate::validated::ValidatedChatService`]; problems the user must fix end the reconcile
//!    here with `ConfigValid=False`;
//!    [`claim`] then refuses names held by objects this ChatService does not control
//!    (`NameConflict`), before anything is created;
//! 3. [`provision`] creates the generated credentials the managed stores need;
//! 4. [`crate::build`] turns the validated service into desired objects (pure);
//! 5. [`apply`] server-side applies and prunes them, comparing with the watch caches first;
//!    a child the API server refuses is reported (Degraded, ApplyFailed) and the rest applied;
//! 6. [`observe`] reads what the children report;
//! 7. [`crate::status`] computes the conditions (pure) and [`publish`] writes them and the
//!    Events.
//!
//! Each step has its own error type naming what it was working on; [`crate::Error`] wraps them.

pub mod apply;
pub mod claim;
pub mod dereference;
pub mod metrics_api;
pub mod observe;
pub mod provision;
pub mod publish;
mod quantity;
mod spec_checks;
pub mod validate;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource, ResourceExt};
use tracing::{Instrument, info_span};

use self::validate::ValidateError;
use crate::build;
use crate::children::ChildStores;
use crate::crd::ChatService;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::status::{Observed, compute_status};
use crate::validated::ConfigProblem;

/// How often the chat pods' view of their back ends is read into `BackendsReady`.
const BACKEND_RECHECK: Duration = Duration::from_secs(60);

/// How often a running rollout step reads the chat pods' figures and judges its gates: a gate
/// over its limit on two observations in a row rolls back, so within about twice this.
const ROLLOUT_RECHECK: Duration = Duration::from_secs(10);

/// Shared by all reconciles.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Version whose chat-service image is the default.
    pub chat_service_version: String,
    /// Every converged ChatService is re-checked this often.
    pub resync: Duration,
    /// Watch caches of every child kind (only the operator's own objects).
    pub stores: ChildStores,
    /// Watch cache of the pods of every ChatService, metadata and status only.
    pub pods:
        kube::runtime::reflector::Store<crate::cache::Compact<k8s_openapi::api::core::v1::Pod>>,
    /// The operator's own namespace (the chat pods' NetworkPolicy lets it in).
    pub operator_namespace: Option<String>,
    /// Plain HTTP towards the chat pods' back-end status endpoint.
    pub http: reqwest::Client,
    /// Consecutive failures per object, for exponential back-off.
    pub failures: Mutex<HashMap<ObjectRef<ChatService>, u32>>,
    /// Turns true when a shutdown is asked for.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// Whether the custom metrics API is served, asked at most once a minute.
    pub custom_metrics: metrics_api::CustomMetricsCheck,
    /// The status last written to each ChatService, so that its echo triggers nothing.
    pub own_status: crate::triggers::OwnStatus,
}

/// Back-off after `failures` consecutive failures: 5 s doubling up to 5 min.
pub fn backoff(failures: u32) -> Duration {
    let seconds = 5u64.saturating_mul(1u64 << failures.saturating_sub(1).min(6));
    Duration::from_secs(seconds.min(300))
}

/// The controller's reconcile: the pipeline, timed and counted.
pub async fn reconcile(cr: Arc<ChatService>, ctx: Arc<Context>) -> Result<Action> {
    let span = info_span!("reconcile", chatservice = %cr.name_any(), namespace = %cr.namespace().unwrap_or_default());
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let result = run_pipeline(&cr, &ctx).instrument(span).await;
    ctx.metrics
        .observe(started.elapsed(), result.as_ref().err().map(Error::label));
    if result.is_ok() {
        let mut failures = ctx.failures.lock().expect("failure map lock");
        failures.remove(&ObjectRef::from_obj(cr.as_ref()));
    }
    result
}

async fn run_pipeline(cr: &ChatService, ctx: &Context) -> Result<Action> {
    if cr.meta().deletion_timestamp.is_some() {
        // Children go with their owner through the garbage collector; nothing to do.
        return Ok(Action::await_change());
    }
    let namespace = cr
        .namespace()
        .ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    wait_for_caches(ctx).await?;
    let refs = dereference::read_references(&ctx.client, cr, &ctx.stores).await?;
    let mut validated = match validate::validate(cr, &refs, &ctx.chat_service_version) {
        Ok(validated) => validated,
        Err(ValidateError::Config(problems)) => return wait_for_a_fix(cr, ctx, &problems).await,
        Err(ValidateError::MissingObjectKey(key)) => return Err(Error::MissingObjectKey(key)),
    };
    validated.operator_namespace = ctx.operator_namespace.clone();
    // Before the build: the weight it decides is part of the rendered config.
    let rollout = crate::rollout::step::decide(cr, &ctx.pods, &ctx.http, Timestamp::now()).await;
    if let (Some(spec), Some(decision)) = (&cr.spec.rollout, &rollout) {
        validated.config.rollout = Some(crate::rollout::step::config(spec, decision));
    }
    let uid = validated.owner.uid.clone();
    let wanted = claim::names_to_claim(&validated)?;
    let foreign = claim::foreign_objects(&ctx.client, &validated, wanted, &ctx.stores);
    let conflicts = foreign.await?;
    if !conflicts.is_empty() {
        return wait_for_a_fix(cr, ctx, &conflicts).await;
    }
    provision::provision_credentials(&ctx.client, &refs, &ctx.stores, &mut validated).await?;
    let desired = build::desired_children(&validated)?;
    let (applied, failures) =
        apply::apply_children(&ctx.client, &namespace, &desired, &ctx.stores).await;
    let pruned = apply::prune_children(&ctx.client, &namespace, &uid, &desired, &ctx.stores);
    let pruned = pruned.await?;
    ctx.metrics
        .child_writes
        .inc_by((applied.len() + pruned.len()) as u64);
    apply::log_changes(&applied, &pruned);
    let mut observed =
        observe::observe(&validated, &applied, &ctx.stores, &ctx.pods, &ctx.http).await;
    crate::pods::explain_not_starting(&ctx.client, &namespace, &mut observed.faults).await;
    for failure in &failures {
        tracing::warn!(error = %failure, "a child could not be applied");
    }
    observed.apply_failures = failures.iter().map(ToString::to_string).collect();
    if validated.scales_on_requests_in_flight() {
        observed.metrics_unavailable = ctx.custom_metrics.problem(&ctx.client).await;
    }
    // Back-end health and a chat pod's view of its stores have no watch, and a recent restart
    // stops counting as a fault after a while: look again soon while any of them is in play.
    let asked_backends =
        observed.backends.is_some() || observed.stores.is_some() || !observed.faults.is_empty();
    let mut status = compute_status(cr, &observed, Ok(()), Timestamp::now());
    let rolling = rollout
        .as_ref()
        .is_some_and(|d| d.status.phase == crate::crd::RolloutPhase::Progressing);
    let rollout_transition = rollout.as_ref().and_then(|d| d.transition.clone());
    status.rollout = rollout.map(|d| d.status);
    publish::publish_status(ctx, cr, status, rollout_transition).await?;
    // Workload status changes arrive through the watches of the children, so there is no need
    // to poll while pods come up; the resync only repairs what a watch could have missed.
    // Back-end health has no watch: while chat pods serve, it is read again every minute (one
    // GET to the chat Service, no API request).
    // A running rollout step is observed every ROLLOUT_RECHECK: its gates are judged on
    // each observation.
    let recheck = match (rolling, asked_backends) {
        (true, _) => ctx.resync.min(ROLLOUT_RECHECK),
        (false, true) => ctx.resync.min(BACKEND_RECHECK),
        (false, false) => ctx.resync,
    };
    Ok(Action::requeue(recheck))
}

/// Reports the user's config problems in status and waits: the Secret watch re-runs this
/// reconcile when a referenced Secret appears or changes, and a spec change triggers it anyway.
async fn wait_for_a_fix(
    cr: &ChatService,
    ctx: &Context,
    problems: &[ConfigProblem],
) -> Result<Action> {
    tracing::info!(problems = ?problems, "configuration invalid; waiting for a change");
    let status = compute_status(cr, &Observed::default(), Err(problems), Timestamp::now());
    publish::publish_status(ctx, cr, status, None).await?;
    Ok(Action::requeue(ctx.resync))
}

/// Before the first full list of every child kind, "not cached" could mean "not listed yet":
/// comparing then would re-apply (and could fail to prune) everything after a restart. The caches
/// fill only while the controller polls its trigger streams, which a graceful shutdown stops: a
/// reconcile still waiting then gives up, or the shutdown would never end.
async fn wait_for_caches(ctx: &Context) -> Result<()> {
    let mut stopping = ctx.stopping.clone();
    tokio::select! {
        ready = ctx.stores.wait_until_ready() => Ok(ready?),
        _ = stopping.wait_for(|stopping| *stopping) => Err(Error::ShuttingDown),
    }
}

/// The controller's error policy: back off per object, and leave a reconcile cut short by a
/// shutdown to the next start.
pub fn error_policy(cr: Arc<ChatService>, error: &Error, ctx: Arc<Context>) -> Action {
    if matches!(error, Error::ShuttingDown) {
        tracing::info!(chatservice = %cr.name_any(), "reconcile left to the next start");
        return Action::await_change();
    }
    let mut failures = ctx.failures.lock().expect("failure map lock");
    let count = failures
        .entry(ObjectRef::from_obj(cr.as_ref()))
        .or_insert(0);
    *count += 1;
    let delay = backoff(*count);
    tracing::warn!(chatservice = %cr.name_any(), error = %error, label = error.label(), retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(5));
        assert_eq!(backoff(2), Duration::from_secs(10));
        assert_eq!(backoff(4), Duration::from_secs(40));
        assert_eq!(backoff(30), Duration::from_secs(300));
    }
}
