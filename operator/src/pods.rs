//! What the pods of a ChatService say about themselves: the faults that waiting would not heal
//! (a container in CrashLoopBackOff, killed by the OOM killer or restarted, an image that cannot
//! be pulled, a pod the scheduler cannot place) and the workload controllers' own verdicts (a
//! Deployment past its progress deadline, a ReplicaSet that cannot create pods). They become
//! `Degraded=True` with the pod, container and the kubelet's or controller's own words.
//!
//! Pods are not the operator's children (ReplicaSets and StatefulSets own them), so they have a
//! watch cache of their own, filtered by the managed-by label that every pod template carries,
//! and trimmed to metadata and status. Each change of a pod triggers its ChatService's reconcile
//! through the `chatoperator.dev/chatservice` label.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateTerminated, ContainerStatus, Pod, PodCondition, PodStatus,
};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};

use crate::cache::{Cached, Compact, trim_meta};
use crate::crd::ChatService;
use crate::names::{Component, LABEL_CHATSERVICE, LABEL_COMPONENT};

/// A restart or OOM kill counts as a fault for this long after the container last ended.
pub const RECENT_RESTART: SignedDuration = SignedDuration::from_secs(600);

/// A pod the scheduler cannot place counts as a fault after it has waited this long.
pub const UNSCHEDULABLE_AFTER: SignedDuration = SignedDuration::from_secs(60);

/// A scheduled pod whose containers have not started (no sandbox, a volume that does not mount)
/// counts as a fault after this long.
pub const NOT_STARTING_AFTER: SignedDuration = SignedDuration::from_secs(60);

/// Waiting reasons of a container that has not been created yet.
const NOT_CREATED: [&str; 2] = ["ContainerCreating", "PodInitializing"];

/// Container waiting reasons that mean the container will not run without a change.
const STUCK_WAITING: [&str; 7] = [
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// The pod conditions the operator reads: here, and `Ready` when it picks a pod to ask.
const KEPT_CONDITIONS: [&str; 3] = ["PodScheduled", "PodReadyToStartContainers", "Ready"];

impl Cached for Pod {
    /// Only metadata and the part of the status this module, the store probe and the rollout
    /// read are kept: the spec (the largest part) is dropped, and so are the host and pod IP
    /// lists, QoS class, start time and, per container, image, image and container IDs,
    /// resources and volume mounts. What is dropped cannot trigger a reconcile either: a watch
    /// event is digested from the trimmed body ([`crate::triggers`]).
    fn trim(&mut self) {
        trim_meta(self);
        self.spec = None;
        if let Some(status) = self.status.as_mut() {
            trim_status(status);
        }
    }
}

fn trim_status(status: &mut PodStatus) {
    let PodStatus {
        phase,
        pod_ip,
        conditions,
        container_statuses,
        init_container_statuses,
        ..
    } = std::mem::take(status);
    let containers = |statuses: Option<Vec<ContainerStatus>>| {
        statuses.map(|statuses| statuses.into_iter().map(trim_container).collect())
    };
    *status = PodStatus {
        phase,
        pod_ip,
        conditions: conditions.map(|conditions| {
            conditions
                .into_iter()
                .filter(|c| KEPT_CONDITIONS.contains(&c.type_.as_str()))
                .map(|c| PodCondition {
                    last_probe_time: None,
                    observed_generation: None,
                    ..c
                })
                .collect()
        }),
        container_statuses: containers(container_statuses),
        init_container_statuses: containers(init_container_statuses),
        ..PodStatus::default()
    };
}

/// Name, state, last state and restarts ([`container_faults`]); the container ID in a
/// terminated state goes too.
fn trim_container(status: ContainerStatus) -> ContainerStatus {
    let without_id = |state: Option<ContainerState>| {
        state.map(|mut state| {
            if let Some(terminated) = state.terminated.as_mut() {
                terminated.container_id = None;
            }
            state
        })
    };
    ContainerStatus {
        name: status.name,
        state: without_id(status.state),
        last_state: without_id(status.last_state),
        restart_count: status.restart_count,
        ..ContainerStatus::default()
    }
}

/// What kind of fault; the first fault's kind is `Degraded`'s reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    CrashLoopBackOff,
    OomKilled,
    ImagePullFailed,
    ContainerConfigError,
    Restarting,
    Unschedulable,
    NotStarting,
    ProgressDeadlineExceeded,
    ReplicaFailure,
}

impl FaultKind {
    pub fn reason(self) -> &'static str {
        match self {
            FaultKind::CrashLoopBackOff => "CrashLoopBackOff",
            FaultKind::OomKilled => "OOMKilled",
            FaultKind::ImagePullFailed => "ImagePullFailed",
            FaultKind::ContainerConfigError => "ContainerConfigError",
            FaultKind::Restarting => "Restarting",
            FaultKind::Unschedulable => "Unschedulable",
            FaultKind::NotStarting => "PodNotStarting",
            FaultKind::ProgressDeadlineExceeded => "ProgressDeadlineExceeded",
            FaultKind::ReplicaFailure => "ReplicaFailure",
        }
    }
}

/// One fault, with a message that names the part and quotes the kubelet or controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub kind: FaultKind,
    pub message: String,
    /// The pod whose Events say more ([`FaultKind::NotStarting`]: the pod status does not).
    pub pod: Option<String>,
}

/// The cached pods of `component` of the ChatService `namespace/name`, not being deleted.
pub fn pods_of(
    pods: &Store<Compact<Pod>>,
    namespace: &str,
    name: &str,
    component: Component,
) -> Vec<Arc<Pod>> {
    pods.state()
        .into_iter()
        .filter(|pod| {
            let labels = pod.labels();
            pod.namespace().as_deref() == Some(namespace)
                && pod.meta().deletion_timestamp.is_none()
                && labels.get(LABEL_CHATSERVICE).map(String::as_str) == Some(name)
                && labels.get(LABEL_COMPONENT).map(String::as_str) == Some(component.as_str())
        })
        .filter_map(|pod| pod.expand().map(Arc::new))
        .collect()
}

/// The ChatService a pod belongs to, for the watch that triggers its reconcile.
pub fn owner_of(pod: &Pod) -> Option<ObjectRef<ChatService>> {
    let name = pod.labels().get(LABEL_CHATSERVICE)?;
    Some(ObjectRef::new(name).within(&pod.namespace()?))
}

fn since(
    time: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    now: Timestamp,
) -> Option<SignedDuration> {
    time.map(|t| now.duration_since(t.0))
}

/// The kernel's OOM killer ended the run: the kubelet's `OOMKilled`, or a container whose init
/// process was killed before the program started (runc's `StartError` says so in its message).
fn killed_by_oom(terminated: &ContainerStateTerminated) -> bool {
    terminated.reason.as_deref() == Some("OOMKilled")
        || terminated.message.as_deref().is_some_and(says_oom_killed)
}

fn says_oom_killed(message: &str) -> bool {
    message.contains("OOM-killed") || message.contains("OOMKilled")
}

/// The faults of one container of `pod`, worst first.
fn container_faults(pod: &str, status: &ContainerStatus, now: Timestamp) -> Option<Fault> {
    let state = status.state.as_ref();
    let last = status
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref());
    let restarts = status.restart_count;
    let last_exit = last.map(|t| {
        format!(
            "last exit code {}{}",
            t.exit_code,
            t.reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        )
    });
    let part = format!("pod {pod}, container {}", status.name);
    if let Some(waiting) = state.and_then(|s| s.waiting.as_ref())
        && let Some(reason) = waiting.reason.as_deref()
        && STUCK_WAITING.contains(&reason)
    {
        let oom = last.is_some_and(killed_by_oom)
            || waiting.message.as_deref().is_some_and(says_oom_killed);
        let kind = match reason {
            "CrashLoopBackOff" | "RunContainerError" if oom => FaultKind::OomKilled,
            "CrashLoopBackOff" => FaultKind::CrashLoopBackOff,
            "ImagePullBackOff" | "ErrImagePull" | "InvalidImageName" => FaultKind::ImagePullFailed,
            _ => FaultKind::ContainerConfigError,
        };
        let mut message = format!("{part}: {reason}");
        if restarts > 0 {
            message.push_str(&format!(" after {restarts} restarts"));
        }
        if let Some(exit) = &last_exit {
            message.push_str(&format!(", {exit}"));
        }
        if let Some(detail) = waiting.message.as_deref().filter(|m| !m.is_empty()) {
            message.push_str(&format!(": {detail}"));
        }
        // Why the last run ended, when the runtime said (a container that never started: the
        // runtime's error, e.g. "container init was OOM-killed (memory limit too low?)").
        if let Some(detail) = last
            .and_then(|t| t.message.as_deref())
            .map(str::trim)
            .filter(|m| !m.is_empty() && !message.contains(m))
        {
            message.push_str(&format!("; last run: {detail}"));
        }
        return Some(Fault {
            kind,
            message,
            pod: None,
        });
    }
    let last = last?;
    let recent = since(last.finished_at.as_ref(), now).is_none_or(|ago| ago <= RECENT_RESTART);
    if restarts == 0 || !recent {
        return None;
    }
    let kind = if killed_by_oom(last) {
        FaultKind::OomKilled
    } else {
        FaultKind::Restarting
    };
    let mut message = format!(
        "{part}: restarted {restarts} times, {}",
        last_exit.unwrap_or_default()
    );
    if let Some(detail) = last.message.as_deref().filter(|m| !m.is_empty()) {
        message.push_str(&format!(": {}", detail.trim()));
    }
    Some(Fault {
        kind,
        message,
        pod: None,
    })
}

/// The faults of `pods`: per pod its stuck or restarted containers (init containers first), or
/// that the scheduler has not placed it for [`UNSCHEDULABLE_AFTER`].
pub fn pod_faults(pods: &[Arc<Pod>], now: Timestamp) -> Vec<Fault> {
    let mut faults = Vec::new();
    for pod in pods {
        let name = pod.name_any();
        let Some(status) = pod.status.as_ref() else {
            continue;
        };
        let containers = status
            .init_container_statuses
            .iter()
            .flatten()
            .chain(status.container_statuses.iter().flatten());
        faults.extend(containers.filter_map(|c| container_faults(&name, c, now)));
        let unscheduled = status.conditions.iter().flatten().find(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
        });
        if let Some(condition) = unscheduled {
            let waited = since(condition.last_transition_time.as_ref(), now)
                .or_else(|| since(pod.metadata.creation_timestamp.as_ref(), now));
            if waited.is_some_and(|w| w >= UNSCHEDULABLE_AFTER) {
                faults.push(Fault {
                    kind: FaultKind::Unschedulable,
                    message: format!(
                        "pod {name} cannot be scheduled: {}",
                        condition.message.as_deref().unwrap_or("no reason given")
                    ),
                    pod: None,
                });
            }
        }
        faults.extend(not_starting(&name, pod, now));
    }
    faults.sort_by_key(|f| f.kind as u8);
    faults
}

/// A pod scheduled [`NOT_STARTING_AFTER`] ago whose sandbox or containers are still not
/// created. The pod status only says `ContainerCreating`; [`explain_not_starting`] adds why.
fn not_starting(name: &str, pod: &Pod, now: Timestamp) -> Option<Fault> {
    let status = pod.status.as_ref()?;
    let conditions = status.conditions.as_deref().unwrap_or_default();
    let scheduled = conditions
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "True")?;
    let no_sandbox = conditions
        .iter()
        .any(|c| c.type_ == "PodReadyToStartContainers" && c.status == "False");
    let waiting = status
        .container_statuses
        .iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.waiting.as_ref()?.reason.as_deref())
        .find(|reason| NOT_CREATED.contains(reason));
    if !no_sandbox && waiting.is_none() {
        return None;
    }
    let waited = since(scheduled.last_transition_time.as_ref(), now)?;
    if waited < NOT_STARTING_AFTER {
        return None;
    }
    Some(Fault {
        kind: FaultKind::NotStarting,
        message: format!(
            "pod {name} has not started its containers {} s after it was scheduled ({})",
            waited.as_secs(),
            waiting.unwrap_or("no sandbox")
        ),
        pod: Some(name.to_string()),
    })
}

/// Adds to each [`FaultKind::NotStarting`] fault the pod's latest Warning Event, which says why
/// (`FailedCreatePodSandBox`, `FailedMount`, ...). A failed look-up leaves the fault as it is.
pub async fn explain_not_starting(client: &kube::Client, namespace: &str, faults: &mut [Fault]) {
    use k8s_openapi::api::core::v1::Event;
    let events: kube::Api<Event> = kube::Api::namespaced(client.clone(), namespace);
    for fault in faults
        .iter_mut()
        .filter(|f| f.kind == FaultKind::NotStarting)
        .take(3)
    {
        let Some(pod) = fault.pod.as_deref() else {
            continue;
        };
        let selector = format!("involvedObject.kind=Pod,involvedObject.name={pod},type=Warning");
        let params = kube::api::ListParams::default().fields(&selector);
        let Ok(list) = events.list(&params).await else {
            continue;
        };
        let latest = list.items.into_iter().max_by_key(|e| {
            e.last_timestamp
                .as_ref()
                .map(|t| t.0)
                .or_else(|| e.event_time.as_ref().map(|t| t.0))
        });
        if let Some(event) = latest {
            fault.message.push_str(&format!(
                ": {}: {}",
                event.reason.as_deref().unwrap_or("Warning"),
                event.message.as_deref().unwrap_or_default().trim()
            ));
        }
    }
}

/// The Deployment controller's own verdicts on `deployment` (named `what` in messages): past
/// its progress deadline, or unable to create pods (quota, admission, Pod Security).
pub fn deployment_faults(what: &str, deployment: &Deployment) -> Vec<Fault> {
    let conditions = deployment
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref());
    let mut faults = Vec::new();
    for condition in conditions.into_iter().flatten() {
        let message = condition.message.as_deref().unwrap_or("no message");
        match (condition.type_.as_str(), condition.status.as_str()) {
            ("ReplicaFailure", "True") => faults.push(Fault {
                kind: FaultKind::ReplicaFailure,
                message: format!(
                    "{what} cannot create pods ({}): {message}",
                    condition.reason.as_deref().unwrap_or("no reason")
                ),
                pod: None,
            }),
            ("Progressing", "False")
                if condition.reason.as_deref() == Some("ProgressDeadlineExceeded") =>
            {
                faults.push(Fault {
                    kind: FaultKind::ProgressDeadlineExceeded,
                    message: format!("{what} passed its progress deadline: {message}"),
                    pod: None,
                })
            }
            _ => {}
        }
    }
    faults
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn now() -> Timestamp {
        "2026-12-01T12:00:00Z".parse().unwrap()
    }

    /// A pod as the kubelet reports it (the status JSON of `kubectl get pod -o json`), as the
    /// operator's cache holds it: trimmed, so every test below also proves that the trim keeps
    /// what the fault it looks for is read from.
    fn pod(status: serde_json::Value) -> Arc<Pod> {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "chat-7d9-abc", "namespace": "team",
                         "creationTimestamp": "2026-12-01T11:00:00Z"},
            "status": status,
        }))
        .unwrap();
        Arc::new(Compact::new(pod).expand().unwrap())
    }

    /// A running chat pod as kube-apiserver v1.34 serves it (names and IDs shortened).
    fn running_chat_pod() -> Pod {
        let container = |name: &str, image: &str| {
            json!({
                "name": name, "image": image,
                "imageID": format!("{image}@sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"),
                "containerID": "containerd://4b227777d4dd1fc61c6f884f48641d02b4d121d3fd328cb08b5531fcacdabf8a",
                "ready": true, "started": true, "restartCount": 1,
                "state": {"running": {"startedAt": "2026-12-01T11:01:02Z"}},
                "lastState": {"terminated": {
                    "exitCode": 137, "reason": "OOMKilled",
                    "startedAt": "2026-12-01T11:00:30Z", "finishedAt": "2026-12-01T11:01:01Z",
                    "containerID": "containerd://ef2d127de37b942baad06145e54b0c619a1f22327b2ebbcfbec78f5564afe39d"}},
                "resources": {"limits": {"memory": "256Mi"},
                              "requests": {"cpu": "100m", "memory": "128Mi"}},
                "user": {"linux": {"uid": 65532, "gid": 65532, "supplementalGroups": [65532]}},
                "volumeMounts": [
                    {"name": "config", "mountPath": "/etc/chat-service", "readOnly": true,
                     "recursiveReadOnly": "Disabled"},
                    {"name": "kube-api-access-x2x7d",
                     "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                     "readOnly": true, "recursiveReadOnly": "Disabled"},
                ],
                "allocatedResources": {"cpu": "100m", "memory": "128Mi"},
            })
        };
        let condition = |type_: &str| {
            json!({"type": type_, "status": "True", "lastProbeTime": null,
                   "lastTransitionTime": "2026-12-01T11:01:03Z", "observedGeneration": 1})
        };
        let conditions = [
            "PodReadyToStartContainers",
            "Initialized",
            "Ready",
            "ContainersReady",
            "PodScheduled",
        ]
        .map(condition);
        serde_json::from_value(json!({
            "metadata": {"name": "chat-7d9-abc", "namespace": "team"},
            "spec": {"containers": [{"name": "chat-service", "image": "chat-service:1"}]},
            "status": {
                "phase": "Running", "qosClass": "Burstable",
                "hostIP": "10.0.0.7", "hostIPs": [{"ip": "10.0.0.7"}],
                "podIP": "10.244.0.17", "podIPs": [{"ip": "10.244.0.17"}],
                "startTime": "2026-12-01T11:00:00Z",
                "conditions": conditions,
                "initContainerStatuses": [container("wait-for-stores", "busybox:1.37")],
                "containerStatuses": [container("chat-service", "registry.example/chat-service:1.4.2")],
            },
        }))
        .unwrap()
    }

    #[test]
    fn the_cache_keeps_of_a_pod_what_is_read_and_drops_the_rest() {
        let full = running_chat_pod();
        let full_bytes = serde_json::to_string(&full).unwrap().len();
        let cached = Compact::new(full.clone());
        let trimmed = cached.expand().unwrap();
        let trimmed_bytes = serde_json::to_string(&trimmed).unwrap().len();
        println!("a running chat pod: {full_bytes} B as served, {trimmed_bytes} B cached");
        let status = trimmed.status.as_ref().unwrap();
        assert_eq!(
            (status.phase.as_deref(), status.pod_ip.as_deref()),
            (Some("Running"), Some("10.244.0.17"))
        );
        let conditions: Vec<_> = status.conditions.iter().flatten().collect();
        let types: Vec<_> = conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(
            types,
            ["PodReadyToStartContainers", "Ready", "PodScheduled"]
        );
        assert!(conditions.iter().all(|c| c.status == "True"
            && c.last_transition_time.is_some()
            && c.observed_generation.is_none()));
        let full_containers = full.status.as_ref().unwrap().container_statuses.as_ref();
        for (kept, was) in [
            (&status.container_statuses, full_containers),
            (
                &status.init_container_statuses,
                full.status
                    .as_ref()
                    .unwrap()
                    .init_container_statuses
                    .as_ref(),
            ),
        ] {
            let (kept, was) = (&kept.as_ref().unwrap()[0], &was.unwrap()[0]);
            assert_eq!(
                (&kept.name, &kept.state, kept.restart_count),
                (&was.name, &was.state, was.restart_count)
            );
            let terminated = kept
                .last_state
                .as_ref()
                .unwrap()
                .terminated
                .as_ref()
                .unwrap();
            assert_eq!(
                (terminated.exit_code, terminated.reason.as_deref()),
                (137, Some("OOMKilled"))
            );
            assert_eq!(terminated.container_id, None);
            assert!(
                kept.image_id.is_empty()
                    && kept.volume_mounts.is_none()
                    && kept.resources.is_none()
            );
        }
        assert!(trimmed.spec.is_none() && status.host_ips.is_none() && status.qos_class.is_none());
        assert!(
            trimmed_bytes * 2 < full_bytes,
            "{trimmed_bytes} B cached of {full_bytes} B"
        );
        // The faults it shows are the same as the full pod's.
        let later = "2026-12-01T11:05:00Z".parse().unwrap();
        let faults = |pod: Pod| pod_faults(&[Arc::new(pod)], later);
        assert_eq!(faults(trimmed.clone()), faults(full.clone()));
        assert_eq!(faults(trimmed)[0].kind, FaultKind::OomKilled);
    }

    #[test]
    fn a_crash_loop_names_the_pod_container_restarts_and_exit() {
        let faults = pod_faults(
            &[pod(json!({"containerStatuses": [{
                "name": "chat-service", "image": "i", "imageID": "", "ready": false,
                "restartCount": 4,
                "state": {"waiting": {"reason": "CrashLoopBackOff",
                          "message": "back-off 1m20s restarting failed container"}},
                "lastState": {"terminated": {"exitCode": 1, "reason": "Error",
                              "finishedAt": "2026-12-01T11:59:00Z"}},
            }]}))],
            now(),
        );
        assert_eq!(faults.len(), 1, "{faults:?}");
        assert_eq!(faults[0].kind, FaultKind::CrashLoopBackOff);
        assert_eq!(
            faults[0].message,
            "pod chat-7d9-abc, container chat-service: CrashLoopBackOff after 4 restarts, last exit code 1 (Error): back-off 1m20s restarting failed container"
        );
    }

    #[test]
    fn an_oom_kill_counts_while_recent_and_then_ages_out() {
        let status = json!({"containerStatuses": [{
            "name": "redis", "image": "i", "imageID": "", "ready": true, "restartCount": 1,
            "state": {"running": {"startedAt": "2026-12-01T11:58:00Z"}},
            "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled",
                          "finishedAt": "2026-12-01T11:57:59Z"}},
        }]});
        let faults = pod_faults(&[pod(status.clone())], now());
        assert_eq!(faults[0].kind, FaultKind::OomKilled, "{faults:?}");
        assert!(
            faults[0]
                .message
                .contains("restarted 1 times, last exit code 137 (OOMKilled)")
        );
        let later = now() + SignedDuration::from_secs(3600);
        assert!(pod_faults(&[pod(status)], later).is_empty());
    }

    #[test]
    fn a_container_whose_init_was_oom_killed_is_an_oom_kill_quoting_the_runtime() {
        let start_error = "failed to create containerd task: failed to create shim task: OCI \
            runtime create failed: runc create failed: unable to start container process: \
            container init was OOM-killed (memory limit too low?): unknown";
        let faults = pod_faults(
            &[pod(json!({"containerStatuses": [{
                "name": "chat-service", "image": "i", "imageID": "", "ready": false,
                "restartCount": 2,
                "state": {"waiting": {"reason": "CrashLoopBackOff",
                          "message": "back-off 20s restarting failed container"}},
                "lastState": {"terminated": {"exitCode": 128, "reason": "StartError",
                              "message": start_error,
                              "finishedAt": "2026-12-01T11:59:00Z"}},
            }]}))],
            now(),
        );
        assert_eq!(faults[0].kind, FaultKind::OomKilled, "{faults:?}");
        assert!(
            faults[0]
                .message
                .contains("last exit code 128 (StartError)")
                && faults[0]
                    .message
                    .contains("; last run: failed to create containerd task"),
            "{faults:?}"
        );
    }

    #[test]
    fn a_scheduled_pod_without_a_sandbox_after_a_minute_is_not_starting() {
        let status = |scheduled: &str| {
            json!({
                "conditions": [
                    {"type": "PodScheduled", "status": "True", "lastTransitionTime": scheduled},
                    {"type": "PodReadyToStartContainers", "status": "False",
                     "lastTransitionTime": scheduled},
                ],
                "containerStatuses": [{
                    "name": "chat-service", "image": "i", "imageID": "", "ready": false,
                    "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}},
                }],
            })
        };
        let faults = pod_faults(&[pod(status("2026-12-01T11:58:00Z"))], now());
        assert_eq!(faults.len(), 1, "{faults:?}");
        assert_eq!(faults[0].kind, FaultKind::NotStarting);
        assert_eq!(faults[0].pod.as_deref(), Some("chat-7d9-abc"));
        assert_eq!(
            faults[0].message,
            "pod chat-7d9-abc has not started its containers 120 s after it was scheduled (ContainerCreating)"
        );
        assert!(pod_faults(&[pod(status("2026-12-01T11:59:30Z"))], now()).is_empty());
    }

    #[test]
    fn a_healthy_or_merely_starting_pod_has_no_fault() {
        let starting = json!({"containerStatuses": [{
            "name": "chat-service", "image": "i", "imageID": "", "ready": false,
            "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}},
        }]});
        assert!(pod_faults(&[pod(starting)], now()).is_empty());
        assert!(pod_faults(&[pod(json!({"phase": "Pending"}))], now()).is_empty());
    }

    #[test]
    fn an_unpullable_image_and_a_long_unschedulable_pod_are_faults() {
        let faults = pod_faults(
            &[
                pod(json!({"containerStatuses": [{
                    "name": "ollama", "image": "i", "imageID": "", "ready": false,
                    "restartCount": 0,
                    "state": {"waiting": {"reason": "ImagePullBackOff",
                              "message": "Back-off pulling image \"ollama/ollama:9\""}},
                }]})),
                pod(json!({"conditions": [{
                    "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                    "message": "0/1 nodes are available: 1 Insufficient memory.",
                    "lastTransitionTime": "2026-12-01T11:50:00Z",
                }]})),
            ],
            now(),
        );
        let kinds: Vec<_> = faults.iter().map(|f| f.kind).collect();
        assert_eq!(
            kinds,
            [FaultKind::ImagePullFailed, FaultKind::Unschedulable],
            "{faults:?}"
        );
        assert!(faults[1].message.ends_with("1 Insufficient memory."));
        let fresh = pod(json!({"conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "lastTransitionTime": "2026-12-01T11:59:50Z",
        }]}));
        assert!(
            pod_faults(&[fresh], now()).is_empty(),
            "10 s is not yet a fault"
        );
    }

    #[test]
    fn deployment_conditions_become_faults() {
        let deployment: Deployment = serde_json::from_value(json!({
            "status": {"conditions": [
                {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                 "message": "ReplicaSet \"chat-7d9\" has timed out progressing."},
                {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
                 "message": "pods \"chat-7d9-x\" is forbidden: exceeded quota: pods"},
                {"type": "Available", "status": "False"},
            ]}
        }))
        .unwrap();
        let faults = deployment_faults("Deployment chat", &deployment);
        assert_eq!(faults.len(), 2);
        assert_eq!(faults[0].kind, FaultKind::ProgressDeadlineExceeded);
        assert_eq!(
            faults[1].message,
            "Deployment chat cannot create pods (FailedCreate): pods \"chat-7d9-x\" is forbidden: exceeded quota: pods"
        );
    }
}
