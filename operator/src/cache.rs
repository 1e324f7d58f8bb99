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
//!
//! ## Compact entries
//!
//! A cached child is a [`Compact`]: its metadata as a typed value (what the store indexes and
//! the owner lookups read) and everything else as the JSON text of the trimmed object. A
//! reconcile reads a child as JSON (to compare it with the desired manifest) or parses the few
//! it needs typed (workload status, generated credentials), so nothing is lost by not keeping
//! the typed struct, and the typed struct is the expensive form: a chat Deployment as the API
//! server returns it (defaults filled in, status) takes about 23 KB of heap typed (124
//! allocations: every `Option` of a pod spec is inline, every string its own allocation)
//! against 4 KB of JSON text plus 2.4 KB of metadata. At 1,000 ChatServices with 15 children
//! each, that difference is most of the operator's memory (docs/BENCHMARKS.md).

use std::borrow::Cow;
use std::fmt::Debug;
use std::marker::PhantomData;

use futures::{Stream, TryStreamExt};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::Value;

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

/// A cached child of kind `K`: its metadata typed, the rest as compact JSON text (see the module
/// docs).
pub struct Compact<K> {
    metadata: ObjectMeta,
    body: Box<str>,
    kind: PhantomData<fn() -> K>,
}

impl<K> Clone for Compact<K> {
    fn clone(&self) -> Self {
        Self {
            metadata: self.metadata.clone(),
            body: self.body.clone(),
            kind: PhantomData,
        }
    }
}

impl<K> Debug for Compact<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compact")
            .field("metadata", &self.metadata)
            .field("body", &self.body)
            .finish()
    }
}

impl<K: Cached> Compact<K> {
    /// `object`, trimmed ([`Cached::trim`]) and made compact.
    pub fn new(mut object: K) -> Self {
        object.trim();
        let metadata = std::mem::take(object.meta_mut());
        // Serializing a Kubernetes object cannot fail; an empty body would read as "no such
        // child" and cost one (no-op) apply.
        let body = serde_json::to_string(&object).unwrap_or_default();
        Self {
            metadata,
            body: body.into_boxed_str(),
            kind: PhantomData,
        }
    }

    /// The object as its own type.
    pub fn expand(&self) -> Option<K> {
        let mut object: K = serde_json::from_str(&self.body).ok()?;
        *object.meta_mut() = self.metadata.clone();
        Some(object)
    }

    /// The object as JSON.
    pub fn to_value(&self) -> Option<Value> {
        let mut value: Value = serde_json::from_str(&self.body).ok()?;
        let metadata = serde_json::to_value(&self.metadata).ok()?;
        value.as_object_mut()?.insert("metadata".into(), metadata);
        Some(value)
    }
}

/// What a watch event of a child is digested by ([`crate::triggers`]): the metadata and the
/// body text, as two fields. Not the object's own JSON shape; [`Compact::to_value`] is that.
impl<K> Serialize for Compact<K> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut out = serializer.serialize_struct("Compact", 2)?;
        out.serialize_field("metadata", &self.metadata)?;
        out.serialize_field("body", &*self.body)?;
        out.end()
    }
}

impl<K: Resource<DynamicType = ()>> Resource for Compact<K> {
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        K::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        K::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        K::version(dt)
    }

    fn api_version(dt: &()) -> Cow<'_, str> {
        K::api_version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        K::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// A watch event of `K` as one of its compact entries.
fn compact_event<K: Cached>(event: watcher::Event<K>) -> watcher::Event<Compact<K>> {
    use watcher::Event;
    match event {
        Event::Apply(object) => Event::Apply(Compact::new(object)),
        Event::InitApply(object) => Event::InitApply(Compact::new(object)),
        Event::Delete(object) => Event::Delete(Compact::new(object)),
        Event::Init => Event::Init,
        Event::InitDone => Event::InitDone,
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

/// A reflector over `api` with `config`: its store of compact entries, and the stream of
/// changed objects ([`crate::triggers::changed_objects`], counted in `counters`) that must be
/// polled (by the controller, as a trigger) for the store to fill.
pub fn reflect<K: Cached>(
    api: Api<K>,
    config: watcher::Config,
    counters: SourceCounters,
) -> (
    Store<Compact<K>>,
    impl Stream<Item = Result<Compact<K>, watcher::Error>> + Send + 'static,
) {
    let (reader, writer) = reflector::store();
    let stream = watcher(api, config)
        .default_backoff()
        .map_ok(compact_event)
        .reflect(writer);
    (reader, changed_objects(stream, counters))
}

/// Access to the store of one kind in a set of stores.
pub trait StoreOf<K: Cached> {
    fn store(&self) -> &Store<Compact<K>>;
}

/// The cached object `namespace/name`, as its own type.
pub fn get<K: Cached>(store: &Store<Compact<K>>, namespace: &str, name: &str) -> Option<K> {
    entry(store, namespace, name)?.expand()
}

/// The cached entry `namespace/name`.
fn entry<K: Cached>(
    store: &Store<Compact<K>>,
    namespace: &str,
    name: &str,
) -> Option<std::sync::Arc<Compact<K>>> {
    store.get(&ObjectRef::new(name).within(namespace))
}

/// The cached object as JSON, to compare with a desired manifest.
pub fn value_of<K: Cached>(
    store: &Store<Compact<K>>,
    namespace: &str,
    name: &str,
) -> Option<Value> {
    entry(store, namespace, name)?.to_value()
}

/// Names of objects in `namespace` whose controller is the owner with `uid`.
pub fn controlled_by<K: Cached>(
    store: &Store<Compact<K>>,
    namespace: &str,
    uid: &str,
) -> Vec<String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::Deployment;

    fn deployment() -> Deployment {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "demo-chat",
                "namespace": "apps",
                "labels": {"app.kubernetes.io/managed-by": "chat-operator"},
                "annotations": {LAST_APPLIED: "{}", "chatoperator.dev/spec-hash": "abc"},
                "managedFields": [{"manager": "chat-operator", "operation": "Apply"}],
                "ownerReferences": [{"apiVersion": "chatoperator.dev/v1alpha1", "kind": "ChatService",
                    "name": "demo", "uid": "u-1", "controller": true}],
            },
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "chat"}},
                "template": {"spec": {"containers": [{"name": "chat", "image": "chat:1",
                    "imagePullPolicy": "IfNotPresent"}]}},
            },
            "status": {"observedGeneration": 1, "readyReplicas": 1},
        }))
        .expect("a valid Deployment")
    }

    #[test]
    fn a_compact_entry_reads_back_as_the_trimmed_object() {
        let mut trimmed = deployment();
        trimmed.trim();
        let entry = Compact::new(deployment());
        assert_eq!(entry.expand(), Some(trimmed.clone()));
        assert_eq!(
            entry.to_value(),
            Some(serde_json::to_value(&trimmed).expect("JSON"))
        );
        assert!(entry.meta().managed_fields.is_none());
        assert!(!entry.annotations().contains_key(LAST_APPLIED));
        assert_eq!(entry.owner_references()[0].uid, "u-1");
        assert!(!entry.body.contains("managedFields") && entry.body.contains("readyReplicas"));
    }

    #[test]
    fn a_compact_entry_is_addressed_as_its_kind() {
        let entry = Compact::new(deployment());
        assert_eq!(Compact::<Deployment>::kind(&()), "Deployment");
        assert_eq!(Compact::<Deployment>::api_version(&()), "apps/v1");
        assert_eq!(Compact::<Deployment>::plural(&()), "deployments");
        assert_eq!(
            ObjectRef::from_obj(&entry),
            ObjectRef::new("demo-chat").within("apps")
        );
    }
}
