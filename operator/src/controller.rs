//! The reconciler: the kube-runtime Controller that runs the pipeline for each ChatService, and
//! `run`, which wires it with watches, metrics, leader election and graceful shutdown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::{Ingress, NetworkPolicy};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::api::{PartialObjectMeta, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{Instrument, info_span};

use crate::apply::{
    apply_children, deployment_state, ensure_generated_secrets, prune_children, statefulset_state,
};
use crate::build::{self, ChildKind, ChildNames, FIELD_MANAGER, LABEL_MANAGED_BY, MANAGED_BY};
use crate::cache::{self, ChildStores};
use crate::crd::{ChatService, ChatServiceStatus};
use crate::error::{Error, Result};
use crate::leader::{LeaseLock, LeaseSettings};
use crate::metrics::{ApiRequests, Metrics};
use crate::probe;
use crate::references::{read_references, watched_secret_names};
use crate::status::{self, Observed, compute_status, transitions};
use crate::validate::validate;

/// How the operator runs.
#[derive(Debug, Clone)]
pub struct OperatorConfig {
    /// Watch one namespace only; all namespaces when `None`.
    pub namespace: Option<String>,
    /// Version whose chat-service image is the default.
    pub chat_service_version: String,
    /// Where `/metrics` and `/healthz` are served; not served when `None`.
    pub metrics_address: Option<SocketAddr>,
    /// Lease-based leader election; off when `None` (a single replica, or tests).
    pub leader_election: Option<LeaseSettings>,
    /// Every converged ChatService is re-checked this often, to repair drift the watches missed.
    pub resync: Duration,
    /// Name reported on Events, e.g. the pod name.
    pub instance: Option<String>,
    /// The counter of the client's requests, when the client was made by
    /// [`ApiRequests::client`]; published on `/metrics`.
    pub api_requests: Option<ApiRequests>,
    /// ChatServices reconciled at once; 0 is unbounded. The bound caps memory in a burst (each
    /// reconcile holds its desired objects and API responses). It is safe only because a
    /// reconcile of a converged object sends no request at all: kube-runtime picks the next of
    /// several waiting objects in no fixed order, so when reconciles are slow and demand exceeds
    /// the bound, some objects wait indefinitely (docs/BENCHMARKS.md, "the stall").
    pub max_concurrent_reconciles: u16,
}

/// Default of [`OperatorConfig::max_concurrent_reconciles`].
pub const DEFAULT_MAX_CONCURRENT_RECONCILES: u16 = 16;

/// Requests for the same ChatService within this window are merged into one reconcile: creating
/// a ChatService's children sends a burst of watch events (one per child, then workload status
/// from kube-controller-manager), each of which would otherwise trigger a reconcile of its own.
const DEBOUNCE: Duration = Duration::from_millis(500);

/// How often the chat pods' view of their back ends is read into `BackendsReady`.
const BACKEND_RECHECK: Duration = Duration::from_secs(60);

/// Objects per page of the initial list of each child kind.
const OWNED_PAGE_SIZE: u32 = 100;

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            namespace: None,
            chat_service_version: env!("CARGO_PKG_VERSION").to_string(),
            metrics_address: None,
            leader_election: None,
            resync: Duration::from_secs(300),
            instance: None,
            api_requests: None,
            max_concurrent_reconciles: DEFAULT_MAX_CONCURRENT_RECONCILES,
        }
    }
}

/// Shared by all reconciles.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub config: OperatorConfig,
    /// Watch caches of every child kind (only the operator's own objects).
    pub stores: ChildStores,
    /// Plain HTTP towards the chat pods' back-end status endpoint.
    pub http: reqwest::Client,
    /// Consecutive failures per object, for exponential back-off.
    failures: Mutex<HashMap<ObjectRef<ChatService>, u32>>,
    /// Turns true when a shutdown is asked for.
    stopping: tokio::sync::watch::Receiver<bool>,
}

/// Back-off after `failures` consecutive failures: 5 s doubling up to 5 min.
pub fn backoff(failures: u32) -> Duration {
    let seconds = 5u64.saturating_mul(1u64 << failures.saturating_sub(1).min(6));
    Duration::from_secs(seconds.min(300))
}

async fn reconcile(cr: Arc<ChatService>, ctx: Arc<Context>) -> Result<Action> {
    let span = info_span!("reconcile", chatservice = %cr.name_any(), namespace = %cr.namespace().unwrap_or_default());
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let result = reconcile_inner(&cr, &ctx).instrument(span).await;
    ctx.metrics
        .observe(started.elapsed(), result.as_ref().err().map(Error::label));
    if result.is_ok() {
        ctx.failures
            .lock()
            .expect("failure map lock")
            .remove(&ObjectRef::from_obj(cr.as_ref()));
    }
    result
}

async fn reconcile_inner(cr: &ChatService, ctx: &Context) -> Result<Action> {
    if cr.meta().deletion_timestamp.is_some() {
        // Children go with their owner through the garbage collector; nothing to do.
        return Ok(Action::await_change());
    }
    let namespace = cr
        .namespace()
        .ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    let client = &ctx.client;
    // Before the first full list of every child kind, "not cached" could mean "not listed yet":
    // comparing then would re-apply (and could fail to prune) everything after a restart.
    // The caches fill only while the controller polls its trigger streams, which a graceful
    // shutdown stops: a reconcile still waiting then gives up, or the shutdown would never end.
    let mut stopping = ctx.stopping.clone();
    tokio::select! {
        ready = ctx.stores.wait_until_ready() => ready?,
        _ = stopping.wait_for(|stopping| *stopping) => return Err(Error::ShuttingDown),
    }

    // 1. dereference
    let mut refs = read_references(client, cr, &ctx.stores).await?;
    // 2. validate (generated credentials are made first so the URIs can be built)
    let preliminary = validate(cr, &refs);
    if let Err(problems) = preliminary {
        tracing::info!(problems = ?problems, "configuration invalid; waiting for a change");
        let new_status = compute_status(cr, &Observed::default(), Err(&problems), Timestamp::now());
        write_status(ctx, cr, new_status).await?;
        // The Secret watch re-runs this reconcile when a referenced Secret appears or changes.
        return Ok(Action::requeue(ctx.config.resync));
    }
    ensure_generated_secrets(client, cr, &mut refs).await?;
    let material = match validate(cr, &refs) {
        Ok(material) => material,
        Err(problems) => {
            let new_status =
                compute_status(cr, &Observed::default(), Err(&problems), Timestamp::now());
            write_status(ctx, cr, new_status).await?;
            return Ok(Action::requeue(ctx.config.resync));
        }
    };
    // 3. build
    let desired = build::desired_children(cr, &material, &ctx.config.chat_service_version)?;
    // 4. apply and prune
    let applied = apply_children(client, &namespace, &desired, &ctx.stores).await?;
    let pruned = prune_children(client, cr, &desired, &ctx.stores).await?;
    if !applied.is_empty() || !pruned.is_empty() {
        let applied: Vec<_> = applied.keys().map(|(k, n)| format!("{k:?}/{n}")).collect();
        tracing::info!(?applied, ?pruned, "children changed");
    }
    // 5. status, from the apply response when there is one (fresher) or else the watch cache
    let names = ChildNames::of(cr);
    let deployment = |name: String| match applied.get(&(ChildKind::Deployment, name.clone())) {
        Some(object) => object.clone().try_parse::<Deployment>().ok(),
        None => ctx
            .stores
            .deployment(&namespace, &name)
            .map(|d| d.as_ref().clone()),
    };
    let stateful_set = |name: String| match applied.get(&(ChildKind::StatefulSet, name.clone())) {
        Some(object) => object.clone().try_parse::<StatefulSet>().ok(),
        None => ctx
            .stores
            .stateful_set(&namespace, &name)
            .map(|s| s.as_ref().clone()),
    };
    let wanted = |kind: ChildKind, name: &str| desired.get(kind, name).is_some();
    let mut observed = Observed {
        chat: deployment(names.chat()).map(|d| deployment_state(&d)),
        redis: wanted(ChildKind::Deployment, &names.redis())
            .then(|| deployment(names.redis()).map(|d| deployment_state(&d)))
            .flatten(),
        mongodb: wanted(ChildKind::StatefulSet, &names.mongodb())
            .then(|| stateful_set(names.mongodb()).map(|s| statefulset_state(&s)))
            .flatten(),
        ollama: wanted(ChildKind::StatefulSet, &names.ollama())
            .then(|| stateful_set(names.ollama()).map(|s| statefulset_state(&s)))
            .flatten(),
        endpoint: Some(build::chat::endpoint(cr)),
        connection_secret: Some(names.connection_secret()),
        backends: None,
    };
    // Ask the chat pods what they see of their back ends once some of them serve.
    let chat_service = match applied.get(&(ChildKind::Service, names.chat())) {
        Some(object) => serde_json::to_value(object).ok(),
        None => ctx
            .stores
            .value(ChildKind::Service, &namespace, &names.chat()),
    };
    if observed.chat.is_some_and(|c| c.available > 0)
        && let Some(url) = chat_service.as_ref().and_then(probe::service_url)
    {
        observed.backends = Some(probe::read_backends(&ctx.http, &url).await);
    }
    let asked_backends = observed.backends.is_some();
    let new_status = compute_status(cr, &observed, Ok(()), Timestamp::now());
    write_status(ctx, cr, new_status).await?;
    // Workload status changes arrive through the watches of the children, so there is no need
    // to poll while pods come up; the resync only repairs what a watch could have missed. Back-end
    // health has no watch: while chat pods serve, it is read again every minute (one GET to the
    // chat Service, no API request).
    Ok(Action::requeue(if asked_backends {
        ctx.config.resync.min(BACKEND_RECHECK)
    } else {
        ctx.config.resync
    }))
}

/// Writes status only when it differs, and publishes one Event per condition that flipped.
async fn write_status(ctx: &Context, cr: &ChatService, new: ChatServiceStatus) -> Result<()> {
    let old = cr.status.as_ref();
    if old == Some(&new) {
        return Ok(());
    }
    let api: Api<ChatService> =
        Api::namespaced(ctx.client.clone(), &cr.namespace().unwrap_or_default());
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
    .await?;
    let reference = cr.object_ref(&());
    for condition in transitions(old, &new) {
        let good = (condition.status == "True")
            != (condition.type_ == status::PROGRESSING || condition.type_ == status::DEGRADED);
        let event = Event {
            type_: if good || condition.type_ == status::PROGRESSING {
                EventType::Normal
            } else {
                EventType::Warning
            },
            reason: format!(
                "{}{}",
                condition.type_,
                if condition.status == "True" {
                    ""
                } else {
                    "False"
                }
            ),
            note: Some(condition.message.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            tracing::warn!(error = %e, "could not publish an Event");
        }
    }
    Ok(())
}

fn error_policy(cr: Arc<ChatService>, error: &Error, ctx: Arc<Context>) -> Action {
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

fn api_for<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs the operator until `shutdown` resolves (or leadership is lost), then finishes in-flight
/// reconciles and returns.
pub async fn run(
    client: Client,
    config: OperatorConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stopped| *stopped).await;
        }
    };
    let trigger = stop_tx.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = trigger.send(true);
    });

    let metrics = Arc::new(Metrics::new(
        config.api_requests.clone().unwrap_or_default(),
    ));
    if let Some(address) = config.metrics_address {
        let metrics = metrics.clone();
        let done = stop();
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(address, metrics, done).await {
                tracing::error!(error = %e, "metrics server failed");
            }
        });
    }

    let lease = config
        .leader_election
        .clone()
        .map(|settings| Arc::new(LeaseLock::new(client.clone(), settings)));
    if let Some(lease) = &lease {
        tokio::select! {
            acquired = lease.acquire() => acquired?,
            _ = stop() => return Ok(()),
        }
        let lease = lease.clone();
        let trigger = stop_tx.clone();
        let done = stop();
        tokio::spawn(async move {
            tokio::select! {
                lost = lease.hold() => {
                    tracing::error!(error = %lost, "leadership lost; stopping");
                    let _ = trigger.send(true);
                }
                _ = done => {}
            }
        });
    }

    let namespace = config.namespace.clone();
    let ns = namespace.as_deref();
    // Only the operator's own objects are watched and cached. The initial lists are paged, and
    // not `any_semantic`: the API server answers a resourceVersion="0" list from its watch cache
    // in one piece whatever the limit, and ten kinds of a few thousand objects each, decoded
    // with their managedFields before they are trimmed, set the operator's peak memory on a
    // restart.
    let owned = watcher::Config::default()
        .labels(&format!("{LABEL_MANAGED_BY}={MANAGED_BY}"))
        .page_size(OWNED_PAGE_SIZE);
    let (service_accounts, service_account_events) =
        cache::reflect(api_for::<ServiceAccount>(&client, ns), owned.clone());
    let (secrets, secret_events) = cache::reflect(api_for::<Secret>(&client, ns), owned.clone());
    let (config_maps, config_map_events) =
        cache::reflect(api_for::<ConfigMap>(&client, ns), owned.clone());
    let (services, service_events) = cache::reflect(api_for::<Service>(&client, ns), owned.clone());
    let (stateful_sets, stateful_set_events) =
        cache::reflect(api_for::<StatefulSet>(&client, ns), owned.clone());
    let (deployments, deployment_events) =
        cache::reflect(api_for::<Deployment>(&client, ns), owned.clone());
    let (hpas, hpa_events) = cache::reflect(
        api_for::<HorizontalPodAutoscaler>(&client, ns),
        owned.clone(),
    );
    let (pdbs, pdb_events) =
        cache::reflect(api_for::<PodDisruptionBudget>(&client, ns), owned.clone());
    let (network_policies, network_policy_events) =
        cache::reflect(api_for::<NetworkPolicy>(&client, ns), owned.clone());
    let (ingresses, ingress_events) = cache::reflect(api_for::<Ingress>(&client, ns), owned);
    let stores = ChildStores {
        service_accounts,
        secrets,
        config_maps,
        services,
        stateful_sets,
        deployments,
        hpas,
        pdbs,
        network_policies,
        ingresses,
    };
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "chat-operator".into(),
            instance: config.instance.clone(),
        },
    );
    let context = Arc::new(Context {
        client: client.clone(),
        recorder,
        metrics,
        config,
        stores,
        http: probe::http_client(),
        failures: Mutex::default(),
        stopping: stop_tx.subscribe(),
    });

    // The ChatServices, cached without their managedFields.
    let (store, writer) = reflector::store();
    let chat_services = watcher(
        api_for::<ChatService>(&client, ns),
        watcher::Config::default().any_semantic(),
    )
    .default_backoff()
    .modify(|cr: &mut ChatService| cr.managed_fields_mut().clear())
    .reflect(writer)
    .applied_objects();
    // The user's Secrets that a ChatService references, so that a missing Secret that appears
    // later triggers a re-check without polling. Metadata only, and not ours (those come
    // through the owned-Secret watch): the data is read when a reconcile needs it.
    let secret_metadata: Api<PartialObjectMeta<Secret>> = match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let user_secrets = watcher(
        secret_metadata,
        watcher::Config::default()
            .labels(&format!("{LABEL_MANAGED_BY}!={MANAGED_BY}"))
            .any_semantic(),
    )
    .default_backoff()
    .touched_objects();
    let secret_store = store.clone();
    let listed = store.clone();
    let concurrency = context.config.max_concurrent_reconciles;
    let controller = Controller::for_stream(chat_services, store)
        .with_config(
            kube::runtime::controller::Config::default()
                .concurrency(concurrency)
                .debounce(DEBOUNCE),
        )
        .owns_stream(deployment_events)
        .owns_stream(stateful_set_events)
        .owns_stream(service_events)
        .owns_stream(config_map_events)
        .owns_stream(service_account_events)
        .owns_stream(secret_events)
        .owns_stream(hpa_events)
        .owns_stream(pdb_events)
        .owns_stream(network_policy_events)
        .owns_stream(ingress_events)
        .watches_stream(user_secrets, move |secret: PartialObjectMeta<Secret>| {
            let namespace = secret.namespace();
            let name = secret.name_any();
            secret_store
                .state()
                .into_iter()
                .filter(|cr| {
                    cr.namespace() == namespace && watched_secret_names(cr).contains(&name)
                })
                .map(|cr| ObjectRef::from_obj(cr.as_ref()))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(stop())
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(%object, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile stream error"),
            }
        });
    // The controller holds every reconcile until the first list of ChatServices is in, and that
    // list arrives only while the trigger streams are polled, which a graceful shutdown stops. A
    // shutdown asked for before the list would wait for ever; nothing has been reconciled then,
    // so there is nothing to finish.
    let unlisted_at_stop = async {
        stop().await;
        if listed.wait_until_ready().now_or_never().is_some() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = controller => {}
        () = unlisted_at_stop => tracing::info!("stopped before the first list of ChatServices"),
    }

    if let Some(lease) = lease {
        lease.release().await;
    }
    tracing::info!("operator stopped");
    Ok(())
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
