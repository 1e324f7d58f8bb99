//! Which watch events trigger a reconcile. A watch reports every write to an object, and most
//! writes to the operator's children change nothing the operator reads: kube-controller-manager
//! rewrites the status of PodDisruptionBudgets, HPAs and Services (dropped from the caches,
//! never read), and the ChatService's own status write comes back as an event of its own. At
//! 1,000 ChatServices each of those was a reconcile (docs/BENCHMARKS.md, "Operator
//! convergence"). So each event's object is digested as cached (trimmed, without its
//! `resourceVersion`) and passed on only when the digest differs from the last one seen for that
//! object; a deletion always passes (a deleted child must be re-created). The ChatService stream
//! additionally skips a status that is the one the operator itself last wrote ([`OwnStatus`]).
//!
//! Every event is counted by source and outcome (`chatoperator_watch_events_total`), which is how
//! one tells a reconcile loop of ours from a control plane working through its backlog.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

use crate::crd::{ChatService, ChatServiceStatus};
use crate::metrics::Metrics;

/// A digest of `value` (its JSON), stable within one process.
pub fn digest<T: Serialize + ?Sized>(value: &T) -> u64 {
    let mut hasher = DefaultHasher::new();
    // Serializing a Kubernetes object into bytes cannot fail; an empty digest would only cost a
    // reconcile.
    serde_json::to_vec(value)
        .unwrap_or_default()
        .hash(&mut hasher);
    hasher.finish()
}

/// A digest of a cached object without its `resourceVersion` (which moves with every write).
fn content_digest<K: Resource + Serialize>(object: &K) -> u64 {
    let mut value = serde_json::to_value(object).unwrap_or_default();
    if let Some(meta) = value.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.remove("resourceVersion");
    }
    digest(&value)
}

/// Key of an object in the digest maps: its uid (a re-created object is a new one).
fn key_of<K: Resource>(object: &K) -> u64 {
    let mut hasher = DefaultHasher::new();
    object.meta().uid.hash(&mut hasher);
    object.namespace().hash(&mut hasher);
    object.name_any().hash(&mut hasher);
    hasher.finish()
}

/// The counters of one watch source.
#[derive(Clone)]
pub struct SourceCounters {
    passed: Counter,
    unchanged: Counter,
}

impl SourceCounters {
    pub fn new(metrics: &Metrics, source: &str) -> Self {
        Self {
            passed: metrics.watch_event(source, "trigger"),
            unchanged: metrics.watch_event(source, "unchanged"),
        }
    }
}

/// The objects of a watch (after its reflector) whose content changed, and every deletion.
pub fn changed_objects<K, S>(
    events: S,
    counters: SourceCounters,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource + Serialize + Send + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    let mut seen: HashMap<u64, u64> = HashMap::new();
    events.flat_map(move |event| {
        let mut out = Vec::new();
        match event {
            Err(e) => out.push(Err(e)),
            Ok(watcher::Event::Apply(object) | watcher::Event::InitApply(object)) => {
                let digest = content_digest(&object);
                if seen.insert(key_of(&object), digest) == Some(digest) {
                    counters.unchanged.inc();
                } else {
                    counters.passed.inc();
                    out.push(Ok(object));
                }
            }
            Ok(watcher::Event::Delete(object)) => {
                seen.remove(&key_of(&object));
                counters.passed.inc();
                out.push(Ok(object));
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
        }
        futures::stream::iter(out)
    })
}

/// The status the operator last wrote to each ChatService (a digest of it), so that the watch
/// event of its own status write does not trigger another reconcile; a status written by anyone
/// else still does (and is put right).
#[derive(Clone, Default)]
pub struct OwnStatus(Arc<Mutex<HashMap<String, u64>>>);

impl OwnStatus {
    /// Records `status` as about to be written to the ChatService with `uid`.
    pub fn writing(&self, uid: &str, status: &ChatServiceStatus) {
        let mut map = self.0.lock().expect("own status lock");
        map.insert(uid.to_string(), digest(status));
    }

    fn is_own(&self, uid: &str, status: Option<&ChatServiceStatus>) -> bool {
        let map = self.0.lock().expect("own status lock");
        status.is_some_and(|s| map.get(uid) == Some(&digest(s)))
    }

    fn forget(&self, uid: &str) {
        self.0.lock().expect("own status lock").remove(uid);
    }
}

/// The ChatServices (after their reflector) whose spec or metadata changed, or whose status is
/// not the one the operator last wrote. Deletions are not passed on: the garbage collector
/// removes the children.
pub fn changed_chat_services<S>(
    events: S,
    own: OwnStatus,
    counters: SourceCounters,
) -> impl Stream<Item = Result<ChatService, watcher::Error>> + Send + 'static
where
    S: Stream<Item = Result<watcher::Event<ChatService>, watcher::Error>> + Send + 'static,
{
    let mut seen: HashMap<u64, u64> = HashMap::new();
    events.flat_map(move |event| {
        let mut out = Vec::new();
        match event {
            Err(e) => out.push(Err(e)),
            Ok(watcher::Event::Apply(cr) | watcher::Event::InitApply(cr)) => {
                let mut without_status = serde_json::to_value(&cr).unwrap_or_default();
                if let Some(object) = without_status.as_object_mut() {
                    object.remove("status");
                    if let Some(meta) = object.get_mut("metadata").and_then(|m| m.as_object_mut()) {
                        meta.remove("resourceVersion");
                    }
                }
                let digest = digest(&without_status);
                let uid = cr.uid().unwrap_or_default();
                let same = seen.insert(key_of(&cr), digest) == Some(digest);
                if same && own.is_own(&uid, cr.status.as_ref()) {
                    counters.unchanged.inc();
                } else {
                    counters.passed.inc();
                    out.push(Ok(cr));
                }
            }
            Ok(watcher::Event::Delete(cr)) => {
                seen.remove(&key_of(&cr));
                own.forget(&cr.uid().unwrap_or_default());
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
        }
        futures::stream::iter(out)
    })
}

#[cfg(test)]
mod tests {
    use futures::executor::block_on;
    use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetStatus};

    use super::*;

    fn pdb(resource_version: &str, disruptions_allowed: Option<i32>) -> PodDisruptionBudget {
        let mut pdb = PodDisruptionBudget::default();
        pdb.metadata.name = Some("chat".into());
        pdb.metadata.namespace = Some("team".into());
        pdb.metadata.uid = Some("u1".into());
        pdb.metadata.resource_version = Some(resource_version.into());
        pdb.status = disruptions_allowed.map(|n| PodDisruptionBudgetStatus {
            disruptions_allowed: n,
            ..Default::default()
        });
        pdb
    }

    fn passed<K: Resource + Serialize + Send + 'static>(
        events: Vec<watcher::Event<K>>,
    ) -> Vec<String> {
        let metrics = Metrics::default();
        let stream = changed_objects(
            futures::stream::iter(events.into_iter().map(Ok)),
            SourceCounters::new(&metrics, "test"),
        );
        block_on(stream.collect::<Vec<_>>())
            .into_iter()
            .map(|o| o.unwrap().resource_version().unwrap_or_default())
            .collect()
    }

    #[test]
    fn a_write_that_changes_nothing_cached_does_not_pass_and_a_deletion_always_does() {
        use watcher::Event::{Apply, Delete, InitApply};
        // The status was dropped from the cache (trimmed before this stream), so two writes
        // that differ only in it and in the resourceVersion look the same.
        let out = passed(vec![
            InitApply(pdb("1", None)),
            Apply(pdb("2", None)),
            Apply(pdb("3", Some(0))),
            Apply(pdb("4", Some(0))),
            Delete(pdb("5", Some(0))),
        ]);
        assert_eq!(out, ["1", "3", "5"]);
    }

    #[test]
    fn the_operators_own_status_does_not_pass_and_anyone_elses_does() {
        use watcher::Event::Apply;
        let cr = |rv: &str, ready: Option<bool>| {
            let mut cr = crate::fixtures::chat_service(crate::fixtures::MINIMAL);
            cr.metadata.uid = Some("u1".into());
            cr.metadata.resource_version = Some(rv.into());
            cr.status = ready.map(|ready| ChatServiceStatus {
                observed_generation: Some(if ready { 1 } else { 2 }),
                ..Default::default()
            });
            cr
        };
        let own = OwnStatus::default();
        let metrics = Metrics::default();
        let ours = cr("2", Some(true));
        own.writing("u1", ours.status.as_ref().unwrap());
        let events = vec![
            Apply(cr("1", None)),
            Apply(ours),
            Apply(cr("3", Some(false))),
        ];
        let stream = changed_chat_services(
            futures::stream::iter(events.into_iter().map(Ok)),
            own,
            SourceCounters::new(&metrics, "ChatService"),
        );
        let out: Vec<String> = block_on(stream.collect::<Vec<_>>())
            .into_iter()
            .map(|o| o.unwrap().resource_version().unwrap_or_default())
            .collect();
        assert_eq!(out, ["1", "3"], "the echo of our own write is skipped");
        let text = metrics.encode();
        assert!(
            text.contains(
                "chatoperator_watch_events_total{source=\"ChatService\",outcome=\"unchanged\"} 1"
            ),
            "{text}"
        );
    }
}
