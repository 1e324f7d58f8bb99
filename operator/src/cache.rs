//! Watch caches of the operator's own children, so that a reconcile of a converged ChatService
//! reads what it needs (the children to compare with, the generated credentials, the workload
//! status, what to prune) without a single API request.
//!
//! One reflector per child kind ([`crate::children`] lists them), each filtered by the operator's
//! managed-by label, so only our objects are cached. Each object is trimmed on arrival
//! (`managedFields`, the `last-applied-configuration` annotation, and the status of kinds whose
//! status is never read), which keeps the caches small: `managedFields` alone is often larger
//! than the object. The same watch streams trigger the owning ChatService's reconcile
//! (`Controller::owns_stream`). This module is the kind-independent part.

use std::fmt::Debug;
use std::sync::Arc;

use futures::Stream;
use k8s_openapi::NamespaceResourceScope;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};

use crate::triggers::{SourceCounters, changed_objects};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops what no reconcile reads: `managedFields` and a client-side-apply copy of the object.
pub fn trim_meta<K: Resource>(object: &mut K) {
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

/// An API of `K` in `namespace`, or in all namespaces when `None`.
pub fn api_for<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// A reflector over `api` with `config`: its store, and the stream of changed objects
/// ([`crate::triggers::changed_objects`], counted in `counters`) that must be polled (by the
/// controller, as a trigger) for the store to fill.
pub fn reflect<K: Cached>(
    api: Api<K>,
    config: watcher::Config,
    counters: SourceCounters,
) -> (
    Store<K>,
    impl Stream<Item = Result<K, watcher::Error>> + Send + 'static,
) {
    let (reader, writer) = reflector::store();
    let stream = watcher(api, config)
        .default_backoff()
        .modify(K::trim)
        .reflect(writer);
    (reader, changed_objects(stream, counters))
}

/// Access to the store of one kind in a set of stores.
pub trait StoreOf<K: Cached> {
    fn store(&self) -> &Store<K>;
}

pub fn get<K: Cached>(store: &Store<K>, namespace: &str, name: &str) -> Option<Arc<K>> {
    store.get(&ObjectRef::new(name).within(namespace))
}

/// The cached object as JSON, to compare with a desired manifest.
pub fn value_of<K: Cached>(
    store: &Store<K>,
    namespace: &str,
    name: &str,
) -> Option<serde_json::Value> {
    get(store, namespace, name).and_then(|o| serde_json::to_value(o.as_ref()).ok())
}

/// Names of objects in `namespace` whose controller is the owner with `uid`.
pub fn controlled_by<K: Cached>(store: &Store<K>, namespace: &str, uid: &str) -> Vec<String> {
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

/// A watch cache stopped before its first full list.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the watch cache of the operator's children stopped")]
pub struct CacheUnavailable;
