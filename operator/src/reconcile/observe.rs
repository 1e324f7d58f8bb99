//! Observe: what the children report after the apply step. Workload status comes from the apply
//! response when there is one (fresher) or else the watch cache; the pods' and the workload
//! controllers' faults come from the pod cache and the workloads' conditions ([`crate::pods`]);
//! the chat pods' view of their back ends is asked for once some of them serve, and of their
//! stores from one chat pod directly, ready or not.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use serde::de::DeserializeOwned;

use super::apply::Applied;
use crate::cache::{Compact, StoreOf};
use crate::children::{Child, ChildKind, ChildStores};
use crate::layout::CHAT_PORT;
use crate::names::Component;
use crate::pods;
use crate::probe;
use crate::status::{Observed, WorkloadState};
use crate::validated::{Mongodb, Redis, ValidatedChatService};

/// The child `namespace/name` of kind `K` as the apply step returned it, or as cached when it
/// was not applied.
fn current<K>(applied: &Applied, stores: &ChildStores, namespace: &str, name: String) -> Option<K>
where
    K: Child + DeserializeOwned,
    ChildStores: StoreOf<K>,
{
    match applied.get(&(K::KIND, name.clone())) {
        Some(object) => object.clone().try_parse::<K>().ok(),
        None => stores.get::<K>(namespace, &name),
    }
}

/// What the children of `cs` report, and (when chat pods are available) what the chat service
/// says of its back ends.
pub async fn observe(
    cs: &ValidatedChatService,
    applied: &Applied,
    stores: &ChildStores,
    pod_cache: &Store<Compact<Pod>>,
    http: &reqwest::Client,
) -> Observed {
    let names = &cs.names;
    let deployment = |name| current::<Deployment>(applied, stores, &cs.namespace, name);
    let stateful_set = |name| current::<StatefulSet>(applied, stores, &cs.namespace, name);
    let mut observed = Observed {
        chat: deployment(names.chat()).map(|d| deployment_state(&d)),
        redis: match cs.redis {
            Redis::Managed(_) => deployment(names.redis()).map(|d| deployment_state(&d)),
            Redis::External(_) => None,
        },
        mongodb: match cs.mongodb {
            Mongodb::Managed(_) => stateful_set(names.mongodb()).map(|s| statefulset_state(&s)),
            Mongodb::External(_) => None,
        },
        ollama: cs
            .ollama
            .as_ref()
            .and_then(|_| stateful_set(names.ollama()))
            .map(|s| statefulset_state(&s)),
        endpoint: Some(cs.endpoint()),
        connection_secret: Some(names.connection_secret()),
        backends: None,
        stores: None,
        apply_failures: Vec::new(),
        metrics_unavailable: None,
        faults: Vec::new(),
    };
    let now = Timestamp::now();
    let pods_of = |component| pods::pods_of(pod_cache, &cs.namespace, &cs.name, component);
    let chat_pods = pods_of(Component::Chat);
    if let Some(chat) = deployment(names.chat()) {
        let what = format!("Deployment {}", names.chat());
        observed
            .faults
            .extend(pods::deployment_faults(&what, &chat));
    }
    observed.faults.extend(pods::pod_faults(&chat_pods, now));
    if matches!(cs.redis, Redis::Managed(_)) {
        if let Some(redis) = deployment(names.redis()) {
            let what = format!("Deployment {}", names.redis());
            observed
                .faults
                .extend(pods::deployment_faults(&what, &redis));
        }
        observed
            .faults
            .extend(pods::pod_faults(&pods_of(Component::Redis), now));
    }
    if matches!(cs.mongodb, Mongodb::Managed(_)) {
        observed
            .faults
            .extend(pods::pod_faults(&pods_of(Component::Mongodb), now));
    }
    if cs.ollama.is_some() {
        observed
            .faults
            .extend(pods::pod_faults(&pods_of(Component::Ollama), now));
    }
    observed.stores = ask_a_chat_pod(http, &chat_pods).await;
    let chat_service = match applied.get(&(ChildKind::Service, names.chat())) {
        Some(object) => serde_json::to_value(object).ok(),
        None => stores.value(ChildKind::Service, &cs.namespace, &names.chat()),
    };
    if observed.chat.is_some_and(|c| c.available > 0)
        && let Some(url) = chat_service.as_ref().and_then(probe::service_url)
    {
        observed.backends = Some(probe::read_backends(http, &url).await);
    }
    observed
}

/// What a running chat pod (a ready one first) sees of its stores; `None` when no chat pod has
/// an IP yet.
async fn ask_a_chat_pod(
    http: &reqwest::Client,
    chat_pods: &[std::sync::Arc<Pod>],
) -> Option<probe::StoreReport> {
    let ready = |pod: &Pod| {
        pod.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    };
    let running = |pod: &&std::sync::Arc<Pod>| {
        pod.status.as_ref().is_some_and(|s| {
            s.phase.as_deref() == Some("Running")
                && s.pod_ip.as_deref().is_some_and(|ip| !ip.is_empty())
        })
    };
    let pod = chat_pods
        .iter()
        .filter(running)
        .max_by_key(|pod| ready(pod))?;
    let ip = pod.status.as_ref()?.pod_ip.clone()?;
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip
    };
    Some(probe::read_stores(http, &pod.name_any(), &format!("http://{host}:{CHAT_PORT}")).await)
}

/// Workload state of a Deployment.
pub fn deployment_state(deployment: &Deployment) -> WorkloadState {
    let generation = deployment.metadata.generation;
    let spec_replicas = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let status = deployment.status.clone().unwrap_or_default();
    WorkloadState {
        desired: spec_replicas,
        ready: status.ready_replicas.unwrap_or(0),
        updated: status.updated_replicas.unwrap_or(0),
        available: status.available_replicas.unwrap_or(0),
        observed_latest: status.observed_generation.is_some()
            && status.observed_generation >= generation,
    }
}

/// Workload state of a StatefulSet.
pub fn statefulset_state(sts: &StatefulSet) -> WorkloadState {
    let generation = sts.metadata.generation;
    let spec_replicas = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let status = sts.status.clone().unwrap_or_default();
    WorkloadState {
        desired: spec_replicas,
        ready: status.ready_replicas.unwrap_or(0),
        updated: status.updated_replicas.unwrap_or(0),
        available: status.available_replicas.unwrap_or(0),
        observed_latest: status.observed_generation.is_some()
            && status.observed_generation >= generation,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::{
        DeploymentSpec, DeploymentStatus, StatefulSetSpec, StatefulSetStatus,
    };

    use super::*;

    #[test]
    fn a_deployment_is_current_once_its_controller_saw_the_generation() {
        let mut deployment = Deployment {
            spec: Some(DeploymentSpec {
                replicas: Some(3),
                ..Default::default()
            }),
            status: Some(DeploymentStatus {
                observed_generation: Some(1),
                ready_replicas: Some(2),
                updated_replicas: Some(3),
                available_replicas: Some(2),
                ..Default::default()
            }),
            ..Default::default()
        };
        deployment.metadata.generation = Some(2);
        let state = deployment_state(&deployment);
        assert_eq!(
            (state.desired, state.ready, state.updated, state.available),
            (3, 2, 3, 2)
        );
        assert!(!state.observed_latest);
        deployment.metadata.generation = Some(1);
        assert!(deployment_state(&deployment).observed_latest);
    }

    #[test]
    fn a_stateful_set_without_status_has_nothing_ready() {
        let sts = StatefulSet {
            spec: Some(StatefulSetSpec::default()),
            status: Some(StatefulSetStatus::default()),
            ..Default::default()
        };
        let state = statefulset_state(&sts);
        assert_eq!(state.desired, 1, "an unset replica count defaults to one");
        assert!(!state.observed_latest && !state.is_ready());
    }
}
