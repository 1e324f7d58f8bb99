//! The controller: `run` wires the reconcile pipeline ([`crate::reconcile`]) into a kube-runtime
//! Controller with its watches (the ChatServices, every child kind of [`crate::children`], the
//! user's referenced Secrets and ConfigMaps), metrics, leader election and graceful shutdown.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt, TryStreamExt};
use std::collections::BTreeSet;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::PartialObjectMeta;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};

use crate::cache::{self, Compact, api_for};
use crate::children::{ChildStores, watch_children};
use crate::crd::ChatService;
use crate::error::Result;
use crate::leader::{LeaseLock, LeaseSettings};
use crate::metrics::{ApiRequests, Metrics};
use crate::names::{LABEL_MANAGED_BY, MANAGED_BY};
use crate::probe;
use crate::reconcile::dereference::{watched_config_map_names, watched_secret_names};
use crate::reconcile::{Context, error_policy, reconcile};
use crate::triggers::{OwnStatus, SourceCounters, changed_chat_services};

/// How the operator runs.
#[derive(Debug, Clone)]
pub struct OperatorConfig {
    /// The namespaces watched (a namespaced install, whose RBAC covers only these); all
    /// namespaces when empty.
    pub namespaces: Vec<String>,
    /// Version whose chat-service image is the default.
    pub chat_service_version: String,
    /// The namespace the operator runs in: the chat pods' NetworkPolicy admits it, so that its
    /// status probes (`/v1/backends`, `/readyz`) reach them.
    pub operator_namespace: Option<String>,
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

/// Default of [`OperatorConfig::max_concurrent_reconciles`]. The load on the API server is
/// bounded on the client instead ([`crate::in_flight`]): a reconcile of a converged object sends
/// nothing, and a first one waits there for its turn, first come first served.
pub const DEFAULT_MAX_CONCURRENT_RECONCILES: u16 = 64;

/// Requests for the same ChatService within this window are merged into one reconcile: creating
/// a ChatService's children sends a burst of watch events (one per child, then workload status
/// from kube-controller-manager), each of which would otherwise trigger a reconcile of its own.
const DEBOUNCE: Duration = Duration::from_millis(500);

/// Objects per page of the initial list of each child kind.
const OWNED_PAGE_SIZE: u32 = 100;

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            namespaces: Vec::new(),
            chat_service_version: env!("CARGO_PKG_VERSION").to_string(),
            operator_namespace: None,
            metrics_address: None,
            leader_election: None,
            resync: Duration::from_secs(300),
            instance: None,
            api_requests: None,
            max_concurrent_reconciles: DEFAULT_MAX_CONCURRENT_RECONCILES,
        }
    }
}

/// The operator's stop signal: set by the caller's shutdown future or by lost leadership, and
/// awaited by everything that must wind down.
#[derive(Clone)]
struct Stop(tokio::sync::watch::Sender<bool>);

impl Stop {
    /// A stop signal that `shutdown` sets when it resolves.
    fn on(shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Self {
        let stop = Stop(tokio::sync::watch::channel(false).0);
        let trigger = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            trigger.request();
        });
        stop
    }

    fn request(&self) {
        self.0.send_replace(true);
    }

    /// Resolves once a stop is requested.
    fn requested(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.0.subscribe();
        async move {
            let _ = rx.wait_for(|stopped| *stopped).await;
        }
    }
}

/// Serves `/metrics` and `/healthz` until the stop, when an address is configured.
fn serve_metrics(address: Option<SocketAddr>, metrics: Arc<Metrics>, stop: &Stop) {
    let Some(address) = address else { return };
    let done = stop.requested();
    tokio::spawn(async move {
        if let Err(e) = crate::metrics::serve(address, metrics, done).await {
            tracing::error!(error = %e, "metrics server failed");
        }
    });
}

/// The right to reconcile: a held Lease, or nothing to hold when leader election is off.
struct Leader(Option<Arc<LeaseLock>>);

impl Leader {
    /// Gives the Lease up, so that another replica need not wait for it to expire.
    async fn step_down(self) {
        if let Some(lease) = self.0 {
            lease.release().await;
        }
    }
}

/// Waits for the Lease (when leader election is on) and keeps renewing it, requesting a stop
/// when it is lost. `Ok(None)` means a stop came first and there is nothing to run.
async fn lead(
    client: &Client,
    settings: Option<LeaseSettings>,
    stop: &Stop,
) -> Result<Option<Leader>> {
    let Some(settings) = settings else {
        return Ok(Some(Leader(None)));
    };
    let lease = Arc::new(LeaseLock::new(client.clone(), settings));
    tokio::select! {
        acquired = lease.acquire() => acquired?,
        _ = stop.requested() => return Ok(None),
    }
    let held = lease.clone();
    let trigger = stop.clone();
    let done = stop.requested();
    tokio::spawn(async move {
        tokio::select! {
            lost = held.hold() => {
                tracing::error!(error = %lost, "leadership lost; stopping");
                trigger.request();
            }
            _ = done => {}
        }
    });
    Ok(Some(Leader(Some(lease))))
}

/// Runs the operator until `shutdown` resolves (or leadership is lost), then finishes in-flight
/// reconciles and returns.
pub async fn run(
    client: Client,
    config: OperatorConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let stop = Stop::on(shutdown);
    let metrics = Arc::new(Metrics::new(
        config.api_requests.clone().unwrap_or_default(),
    ));
    serve_metrics(config.metrics_address, metrics.clone(), &stop);
    let Some(leader) = lead(&client, config.leader_election.clone(), &stop).await? else {
        return Ok(());
    };
    let scopes = watch_scopes(&config.namespaces);
    tracing::info!(namespaces = ?scopes, "watching ChatServices");
    let controllers = scopes
        .into_iter()
        .map(|namespace| run_scope(&client, &config, namespace, metrics.clone(), &stop));
    futures::future::join_all(controllers).await;

    leader.step_down().await;
    tracing::info!("operator stopped");
    Ok(())
}

/// What each controller watches: every namespace (`None`), or each listed one. A namespaced
/// install may list, watch and write only in its namespaces, so each gets its own watches: a
/// cluster-wide watch there would be forbidden.
fn watch_scopes(namespaces: &[String]) -> Vec<Option<String>> {
    let mut namespaces = namespaces.to_vec();
    namespaces.sort();
    namespaces.dedup();
    match namespaces.is_empty() {
        true => vec![None],
        false => namespaces.into_iter().map(Some).collect(),
    }
}

/// One controller with its own watches and caches over `namespace` (all when `None`), until the
/// stop.
async fn run_scope(
    client: &Client,
    config: &OperatorConfig,
    namespace: Option<String>,
    metrics: Arc<Metrics>,
    stop: &Stop,
) {
    let own_status = OwnStatus::default();
    let (controller, stores, pods) = controller(
        client,
        config,
        namespace.as_deref(),
        &metrics,
        own_status.clone(),
    );
    let listed = controller.store();
    let context = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "chat-operator".into(),
                instance: config.instance.clone(),
            },
        ),
        metrics,
        chat_service_version: config.chat_service_version.clone(),
        operator_namespace: config.operator_namespace.clone(),
        resync: config.resync,
        stores,
        pods,
        http: probe::http_client(),
        failures: Mutex::default(),
        stopping: stop.0.subscribe(),
        custom_metrics: Default::default(),
        own_status,
    });
    let controller = controller
        .graceful_shutdown_on(stop.requested())
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
        stop.requested().await;
        if listed.wait_until_ready().now_or_never().is_some() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = controller => {}
        () = unlisted_at_stop => tracing::info!(?namespace, "stopped before the first list of ChatServices"),
    }
}

/// The Controller over the ChatServices with every trigger wired (the ChatServices, every child
/// kind, their pods, the user's referenced Secrets and ConfigMaps), and the caches its triggers fill.
fn controller(
    client: &Client,
    config: &OperatorConfig,
    ns: Option<&str>,
    metrics: &Metrics,
    own_status: OwnStatus,
) -> (Controller<ChatService>, ChildStores, Store<Compact<Pod>>) {
    // Only the operator's own objects are watched and cached. The initial lists are paged, and
    // not `any_semantic`: the API server answers a resourceVersion="0" list from its watch cache
    // in one piece whatever the limit, and ten kinds of a few thousand objects each, decoded
    // with their managedFields before they are trimmed, set the operator's peak memory on a
    // restart.
    let owned = watcher::Config::default()
        .labels(&format!("{LABEL_MANAGED_BY}={MANAGED_BY}"))
        .page_size(OWNED_PAGE_SIZE);
    let (stores, child_watches) = watch_children(client, ns, &owned, metrics);

    // The ChatServices, cached without their managedFields; the event of the operator's own
    // status write triggers nothing (crate::triggers).
    let (store, writer) = reflector::store();
    let chat_services = watcher(
        api_for::<ChatService>(client, ns),
        watcher::Config::default().any_semantic(),
    )
    .default_backoff()
    .modify(|cr: &mut ChatService| cr.managed_fields_mut().clear())
    .reflect(writer);
    let chat_services = changed_chat_services(
        chat_services,
        own_status,
        SourceCounters::new(metrics, "ChatService"),
    );
    let controller = Controller::for_stream(chat_services, store.clone()).with_config(
        kube::runtime::controller::Config::default()
            .concurrency(config.max_concurrent_reconciles)
            .debounce(DEBOUNCE),
    );
    let controller = child_watches.trigger_owners(controller);
    // Pods belong to ReplicaSets and StatefulSets, not to the ChatService: their changes reach
    // the ChatService through its label.
    let (pods, pod_changes) = cache::reflect(
        api_for::<Pod>(client, ns),
        owned,
        SourceCounters::new(metrics, "Pod"),
    );
    // The mapper reads only the labels: the trigger carries the pod's metadata, not its status.
    let pod_changes = pod_changes.map_ok(|pod| Pod {
        metadata: pod.meta().clone(),
        ..Pod::default()
    });
    let controller = controller.watches_stream(pod_changes, |pod: Pod| crate::pods::owner_of(&pod));
    let controller =
        watch_user_objects::<Secret>(controller, client, ns, store.clone(), watched_secret_names);
    let controller =
        watch_user_objects::<ConfigMap>(controller, client, ns, store, watched_config_map_names);
    (controller, stores, pods)
}

/// The user's objects of kind `K` (Secrets, ConfigMaps) that a ChatService references
/// (`referenced` names them), so that a missing one that appears later, or a change to one,
/// triggers a re-check without polling. Metadata only, and not ours (those come through the
/// owned-object watches): the data is read when a reconcile needs it.
fn watch_user_objects<K>(
    controller: Controller<ChatService>,
    client: &Client,
    namespace: Option<&str>,
    chat_services: Store<ChatService>,
    referenced: fn(&ChatService) -> BTreeSet<String>,
) -> Controller<ChatService>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let user_objects = watcher(
        api_for::<PartialObjectMeta<K>>(client, namespace),
        watcher::Config::default()
            .labels(&format!("{LABEL_MANAGED_BY}!={MANAGED_BY}"))
            .any_semantic(),
    )
    .default_backoff()
    .touched_objects();
    controller.watches_stream(user_objects, move |object: PartialObjectMeta<K>| {
        let namespace = object.namespace();
        let name = object.name_any();
        chat_services
            .state()
            .into_iter()
            .filter(|cr| cr.namespace() == namespace && referenced(cr).contains(&name))
            .map(|cr| ObjectRef::from_obj(cr.as_ref()))
            .collect::<Vec<_>>()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_listed_namespace_gets_a_controller_and_none_listed_means_all() {
        assert_eq!(watch_scopes(&[]), vec![None]);
        let listed = ["b".to_string(), "a".to_string(), "b".to_string()];
        assert_eq!(
            watch_scopes(&listed),
            vec![Some("a".to_string()), Some("b".to_string())]
        );
    }

    #[tokio::test]
    async fn a_stop_reaches_waiters_that_came_before_and_after_it() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let stop = Stop::on(async move {
            let _ = rx.await;
        });
        let early = stop.requested();
        assert!(
            early.now_or_never().is_none(),
            "no stop before the shutdown"
        );
        let early = stop.requested();
        tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), early)
            .await
            .expect("a waiter from before the stop wakes");
        stop.requested()
            .now_or_never()
            .expect("a later waiter sees it at once");
    }
}
