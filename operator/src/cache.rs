//! Watch caches of the operator's own children, so that a reconcile of a converged ChatService
//! reads what it needs (the children to compare with, the generated credentials, the workload
//! status, what to prune) without a single API request.
//!
//! One reflector per child kind, each filtered by the operator's managed-by label, so only our
//! objects are cached. Each object is trimmed on arrival (`managedFields`, the
//! `last-applied-configuration` annotation, and the status of kinds whose status is never read),
//! which keeps the caches small: `managedFields` alone is often larger than the object.
//! The same watch streams trigger the owning ChatService's reconcile (`Controller::owns_stream`).

use std::fmt::Debug;
use std::sync::Arc;

use futures::{FutureExt, Stream};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::{Ingress, NetworkPolicy};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::build::ChildKind;
use crate::error::{Error, Result};

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops what no reconcile reads: `managedFields` and a client-side-apply copy of the object.
fn trim_meta<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
}

/// A child kind the operator caches.
pub trait Cached:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + Debug
    + Serialize
    + DeserializeOwned
    + Send
    + Sync
    + 'static
{
    /// Trims an object before it is cached (see the module docs).
    fn trim(&mut self) {
        trim_meta(self);
    }
}

impl Cached for ServiceAccount {}
impl Cached for Secret {}
impl Cached for ConfigMap {}
impl Cached for NetworkPolicy {}
impl Cached for Ingress {}
// Workload status is what the ChatService status is computed from: kept.
impl Cached for Deployment {}
impl Cached for StatefulSet {}
impl Cached for Service {
    fn trim(&mut self) {
        trim_meta(self);
        self.status = None;
    }
}
impl Cached for HorizontalPodAutoscaler {
    fn trim(&mut self) {
        trim_meta(self);
        self.status = None;
    }
}
impl Cached for PodDisruptionBudget {
    fn trim(&mut self) {
        trim_meta(self);
        self.status = None;
    }
}

/// A reflector over `api` with `config`: its store, and the stream of touched objects that must
/// be polled (by the controller, as a trigger) for the store to fill.
pub fn reflect<K: Cached>(
    api: Api<K>,
    config: watcher::Config,
) -> (
    Store<K>,
    impl Stream<Item = Result<K, watcher::Error>> + Send + 'static,
) {
    let (reader, writer) = reflector::store();
    let stream = watcher(api, config)
        .default_backoff()
        .modify(K::trim)
        .reflect(writer)
        .touched_objects();
    (reader, stream)
}

/// One store per child kind.
#[derive(Clone)]
pub struct ChildStores {
    pub service_accounts: Store<ServiceAccount>,
    pub secrets: Store<Secret>,
    pub config_maps: Store<ConfigMap>,
    pub services: Store<Service>,
    pub stateful_sets: Store<StatefulSet>,
    pub deployments: Store<Deployment>,
    pub hpas: Store<HorizontalPodAutoscaler>,
    pub pdbs: Store<PodDisruptionBudget>,
    pub network_policies: Store<NetworkPolicy>,
    pub ingresses: Store<Ingress>,
}

fn get<K: Cached>(store: &Store<K>, namespace: &str, name: &str) -> Option<Arc<K>> {
    store.get(&ObjectRef::new(name).within(namespace))
}

/// The cached object as JSON, to compare with a desired manifest.
fn value_of<K: Cached>(store: &Store<K>, namespace: &str, name: &str) -> Option<serde_json::Value> {
    get(store, namespace, name).and_then(|o| serde_json::to_value(o.as_ref()).ok())
}

/// Names of objects in `namespace` whose controller is the owner with `uid`.
fn controlled_by<K: Cached>(store: &Store<K>, namespace: &str, uid: &str) -> Vec<String> {
    store
        .state_filter(|o| {
            o.meta().namespace.as_deref() == Some(namespace)
                && o.owner_references()
                    .iter()
                    .any(|r| r.uid == uid && r.controller == Some(true))
        })
        .iter()
        .map(|o| o.name_any())
        .collect()
}

/// Dispatches a generic store operation to the store of `kind`.
macro_rules! by_kind {
    ($stores:expr, $kind:expr, $f:ident ( $($arg:expr),* )) => {
        match $kind {
            ChildKind::ServiceAccount => $f(&$stores.service_accounts, $($arg),*),
            ChildKind::Secret => $f(&$stores.secrets, $($arg),*),
            ChildKind::ConfigMap => $f(&$stores.config_maps, $($arg),*),
            ChildKind::Service => $f(&$stores.services, $($arg),*),
            ChildKind::StatefulSet => $f(&$stores.stateful_sets, $($arg),*),
            ChildKind::Deployment => $f(&$stores.deployments, $($arg),*),
            ChildKind::HorizontalPodAutoscaler => $f(&$stores.hpas, $($arg),*),
            ChildKind::PodDisruptionBudget => $f(&$stores.pdbs, $($arg),*),
            ChildKind::NetworkPolicy => $f(&$stores.network_policies, $($arg),*),
            ChildKind::Ingress => $f(&$stores.ingresses, $($arg),*),
        }
    };
}

impl ChildStores {
    /// Waits until every store has had its first full list, so that a reconcile never mistakes
    /// "not listed yet" for "missing" (which would re-apply every child after a restart).
    pub async fn wait_until_ready(&self) -> Result<()> {
        let ready = futures::future::try_join_all([
            self.service_accounts.wait_until_ready().boxed(),
            self.secrets.wait_until_ready().boxed(),
            self.config_maps.wait_until_ready().boxed(),
            self.services.wait_until_ready().boxed(),
            self.stateful_sets.wait_until_ready().boxed(),
            self.deployments.wait_until_ready().boxed(),
            self.hpas.wait_until_ready().boxed(),
            self.pdbs.wait_until_ready().boxed(),
            self.network_policies.wait_until_ready().boxed(),
            self.ingresses.wait_until_ready().boxed(),
        ]);
        ready.await.map(|_| ()).map_err(|_| Error::CacheUnavailable)
    }

    /// The cached child as JSON, when there is one.
    pub fn value(&self, kind: ChildKind, namespace: &str, name: &str) -> Option<serde_json::Value> {
        by_kind!(self, kind, value_of(namespace, name))
    }

    /// Names of the cached children of `kind` whose controller is the owner with `uid`.
    pub fn controlled_by(&self, kind: ChildKind, namespace: &str, uid: &str) -> Vec<String> {
        by_kind!(self, kind, controlled_by(namespace, uid))
    }

    pub fn secret(&self, namespace: &str, name: &str) -> Option<Arc<Secret>> {
        get(&self.secrets, namespace, name)
    }

    pub fn deployment(&self, namespace: &str, name: &str) -> Option<Arc<Deployment>> {
        get(&self.deployments, namespace, name)
    }

    pub fn stateful_set(&self, namespace: &str, name: &str) -> Option<Arc<StatefulSet>> {
        get(&self.stateful_sets, namespace, name)
    }

    /// Objects cached, over all kinds (for the operator's metrics and logs).
    pub fn len(&self) -> usize {
        ChildKind::ALL
            .iter()
            .map(|kind| by_kind!(self, *kind, store_len()))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn store_len<K: Cached>(store: &Store<K>) -> usize {
    store.state().len()
}
