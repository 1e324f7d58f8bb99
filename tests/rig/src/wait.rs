//! Waiting in tests: poll until something holds, and when it never does, fail saying what was
//! seen instead. [`eventually`] polls any check; [`until`] also carries what each look saw into
//! the panic. The Kubernetes helpers watch one object through the caller's `Api` (so they work for
//! any kind, typed or dynamic, namespaced or not) and on timeout panic with the object's last
//! state — deletion timestamp, finalizers, owners, `status.conditions` — and the Events recorded
//! about it, which is usually the reason.

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::core::v1::Event;
use kube::Api;
use kube::api::ListParams;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// How often the helpers look again.
pub const POLL: Duration = Duration::from_millis(200);

/// Polls `check` until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    until(what, timeout, || {
        let look = check();
        async move { look.await.ok_or_else(String::new) }
    })
    .await
}

/// Polls `check` until it returns `Ok`; each `Err` says what that look saw, and the last one is in
/// the panic after `timeout`.
pub async fn until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let seen = match check().await {
            Ok(v) => return v,
            Err(seen) => seen,
        };
        if tokio::time::Instant::now() >= deadline {
            if seen.is_empty() {
                panic!("timed out after {} s waiting for {what}", timeout.as_secs());
            }
            panic!(
                "timed out after {} s waiting for {what}; last seen: {seen}",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// What a Kubernetes object type needs for these helpers.
pub trait Object:
    kube::Resource + Clone + DeserializeOwned + Serialize + Debug + Send + Sync + 'static
{
}
impl<K> Object for K where
    K: kube::Resource + Clone + DeserializeOwned + Serialize + Debug + Send + Sync + 'static
{
}

/// Waits until `name` exists; returns it.
pub async fn until_exists<K: Object>(api: &Api<K>, name: &str, timeout: Duration) -> K {
    until_object(api, name, "to exist", timeout, |object| {
        Some(object.clone())
    })
    .await
}

/// Waits until `check` accepts `name` (returning what the caller wants from it). `what` finishes
/// the sentence "waiting for <object> ...", e.g. "to report Ready=True".
pub async fn until_object<K, T, F>(
    api: &Api<K>,
    name: &str,
    what: &str,
    timeout: Duration,
    mut check: F,
) -> T
where
    K: Object,
    F: FnMut(&K) -> Option<T>,
{
    watch(api, name, what, timeout, |object| match object {
        Some(object) => check(object).ok_or_else(|| Seen::Object(describe(object))),
        None => Err(Seen::Missing),
    })
    .await
}

/// Waits until `name` no longer exists (deleted and, if it had finalizers, released).
pub async fn until_gone<K: Object>(api: &Api<K>, name: &str, timeout: Duration) {
    watch(api, name, "to be gone", timeout, |object| match object {
        Some(object) => Err(Seen::Object(describe(object))),
        None => Ok(()),
    })
    .await
}

/// Reads `name` until `look` accepts what it finds; on timeout panics with the last look and the
/// Events about the object.
async fn watch<K, T, F>(api: &Api<K>, name: &str, what: &str, timeout: Duration, mut look: F) -> T
where
    K: Object,
    F: FnMut(Option<&K>) -> Result<T, Seen>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match api.get_opt(name).await {
            Ok(object) => match look(object.as_ref()) {
                Ok(found) => return found,
                Err(seen) => seen,
            },
            Err(e) => Seen::Error(e.to_string()),
        };
        if tokio::time::Instant::now() >= deadline {
            let events = events_about(api, name).await;
            panic!(
                "timed out after {} s waiting for {} {what}; last seen: {last}\n{events}",
                timeout.as_secs(),
                subject(api, name)
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Asserts that `name` does not exist now nor at any look during `period` (a zero period looks
/// once). Panics with the object, if it shows up.
pub async fn absent_for<K: Object>(api: &Api<K>, name: &str, period: Duration) {
    let subject = subject(api, name);
    let deadline = tokio::time::Instant::now() + period;
    loop {
        match api.get_opt(name).await {
            Ok(None) => {}
            Ok(Some(object)) => panic!(
                "{subject} must not exist, but it does: {}",
                describe(&object)
            ),
            Err(e) => panic!("reading {subject}: {e}"),
        }
        if tokio::time::Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `status.conditions` of any object, as `type=status (reason: message)` lines; empty when it has
/// none.
pub fn conditions<K: Serialize>(object: &K) -> Vec<String> {
    let value = serde_json::to_value(object).unwrap_or_default();
    value
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .map(|conditions| {
            conditions
                .iter()
                .map(|c| {
                    let field = |name: &str| c[name].as_str().unwrap_or_default().to_string();
                    let mut line = format!("{}={}", field("type"), field("status"));
                    let (reason, message) = (field("reason"), field("message"));
                    if !reason.is_empty() || !message.is_empty() {
                        line.push_str(&format!(" ({reason}: {message})"));
                    }
                    line
                })
                .collect()
        })
        .unwrap_or_default()
}

enum Seen {
    Missing,
    Error(String),
    Object(String),
}

impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Seen::Missing => f.write_str("not found"),
            Seen::Error(e) => write!(f, "an error reading it: {e}"),
            Seen::Object(o) => f.write_str(o),
        }
    }
}

fn subject<K: kube::Resource>(api: &Api<K>, name: &str) -> String {
    format!("{}/{name}", api.resource_url())
}

/// The parts of an object's state that explain why a wait did not end.
fn describe<K: Serialize>(object: &K) -> String {
    let value = serde_json::to_value(object).unwrap_or_default();
    let meta = &value["metadata"];
    let mut parts = Vec::new();
    if let Some(rv) = meta["resourceVersion"].as_str() {
        parts.push(format!("resourceVersion {rv}"));
    }
    if let Some(at) = meta["deletionTimestamp"].as_str() {
        parts.push(format!("deleting since {at}"));
    }
    if let Some(finalizers) = meta["finalizers"].as_array().filter(|f| !f.is_empty()) {
        parts.push(format!("finalizers {finalizers:?}"));
    }
    if let Some(owners) = meta["ownerReferences"].as_array().filter(|o| !o.is_empty()) {
        let owners: Vec<String> = owners
            .iter()
            .map(|o| {
                format!(
                    "{}/{}",
                    o["kind"].as_str().unwrap_or("?"),
                    o["name"].as_str().unwrap_or("?")
                )
            })
            .collect();
        parts.push(format!("owned by {}", owners.join(", ")));
    }
    let conditions = conditions(object);
    if conditions.is_empty() {
        parts.push("no conditions".into());
    } else {
        parts.push(format!("conditions [{}]", conditions.join("; ")));
    }
    parts.join(", ")
}

/// The Events recorded about `name` in the Api's namespace (all namespaces for a cluster-scoped
/// Api), oldest first, one a line.
async fn events_about<K: kube::Resource + Clone>(api: &Api<K>, name: &str) -> String {
    let client = api.clone().into_client();
    let events: Api<Event> = match api.namespace() {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let params = ListParams::default().fields(&format!("involvedObject.name={name}"));
    match events.list(&params).await {
        Err(e) => format!("(its Events could not be listed: {e})"),
        Ok(list) if list.items.is_empty() => "no Events about it".into(),
        Ok(list) => {
            let mut lines: Vec<(String, String)> = list
                .items
                .iter()
                .map(|e| {
                    let at = e
                        .last_timestamp
                        .as_ref()
                        .map(|t| format!("{:?}", t.0))
                        .or_else(|| e.event_time.as_ref().map(|t| format!("{:?}", t.0)))
                        .unwrap_or_default();
                    let line = format!(
                        "  {} {} {}: {} (x{})",
                        e.type_.as_deref().unwrap_or("?"),
                        e.involved_object.kind.as_deref().unwrap_or("?"),
                        e.reason.as_deref().unwrap_or("?"),
                        e.message.as_deref().unwrap_or(""),
                        e.count.unwrap_or(1)
                    );
                    (at, line)
                })
                .collect();
            lines.sort();
            let lines: Vec<String> = lines.into_iter().map(|(_, l)| l).collect();
            format!("Events about it:\n{}", lines.join("\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn conditions_read_any_kind_with_reason_and_message() {
        let object = json!({"status": {"conditions": [
            {"type": "Ready", "status": "False", "reason": "WaitingForPods", "message": "0/1"},
            {"type": "ConfigValid", "status": "True"},
        ]}});
        assert_eq!(
            conditions(&object),
            ["Ready=False (WaitingForPods: 0/1)", "ConfigValid=True"]
        );
        assert!(conditions(&json!({"metadata": {}})).is_empty());
    }

    #[test]
    fn an_object_is_described_by_what_keeps_it_alive() {
        let object = json!({"metadata": {
            "resourceVersion": "7",
            "deletionTimestamp": "2026-12-01T10:00:00Z",
            "finalizers": ["chatoperator.dev/cleanup"],
            "ownerReferences": [{"kind": "ChatService", "name": "chat"}],
        }});
        let text = describe(&object);
        for part in [
            "deleting since",
            "chatoperator.dev/cleanup",
            "ChatService/chat",
            "no conditions",
        ] {
            assert!(text.contains(part), "{part} missing from {text}");
        }
    }

    #[tokio::test]
    #[should_panic(expected = "last seen: 3 of 5")]
    async fn until_names_the_last_look_when_it_times_out() {
        until("five", Duration::from_millis(300), || async {
            Err::<(), _>("3 of 5".to_string())
        })
        .await;
    }

    #[tokio::test]
    async fn eventually_returns_the_first_value_found() {
        let mut looks = 0;
        let found = eventually("the third look", Duration::from_secs(5), || {
            looks += 1;
            let n = looks;
            async move { (n == 3).then_some(n) }
        })
        .await;
        assert_eq!(found, 3);
    }
}
