//! The rollout's step of a reconcile: read the step's window from the chat pods, decide with
//! [`machine::decide`], and say what the config must carry. Runs before the build, because the
//! weight it decides is rendered into the chat-service config.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::reflector::Store;

use crate::cache::Compact;

use super::machine::{self, Decision};
use super::window;
use crate::crd::{ChatService, RolloutPhase, RolloutSpec};
use crate::layout::CHAT_PORT;
use crate::names::Component;
use crate::pods;
use crate::validated::render::RolloutConfig;

/// The rollout's decision for `cr`; `None` without `spec.rollout`.
pub async fn decide(
    cr: &ChatService,
    pod_cache: &Store<Compact<Pod>>,
    http: &reqwest::Client,
    now: Timestamp,
) -> Option<Decision> {
    let spec = cr.spec.rollout.as_ref()?;
    let previous = cr.status.as_ref().and_then(|s| s.rollout.as_ref());
    let same_spec = previous.filter(|p| p.spec_digest == machine::spec_digest(spec));
    let running = same_spec
        .is_some_and(|p| matches!(p.phase, RolloutPhase::Progressing | RolloutPhase::Paused));
    let window = match (running, same_spec) {
        (true, Some(previous)) => {
            let namespace = cr.namespace().unwrap_or_default();
            let chat_pods = pods::pods_of(pod_cache, &namespace, &cr.name_any(), Component::Chat);
            let reads = chat_pods.iter().filter_map(|pod| pod_url(pod)).map(|url| {
                let http = http.clone();
                async move { window::read_pod(&http, &url).await }
            });
            let reports: Vec<_> = futures::future::join_all(reads)
                .await
                .into_iter()
                .flatten()
                .collect();
            window::merge(spec, previous.candidate_weight_percent, &reports)
        }
        _ => None,
    };
    Some(machine::decide(spec, previous, window.as_ref(), now))
}

/// The `rollout` section of the chat-service config for the decided weight.
pub fn config(spec: &RolloutSpec, decision: &Decision) -> RolloutConfig {
    RolloutConfig {
        candidate_backend: spec.candidate.backend.clone(),
        candidate_model: spec.candidate.model.clone(),
        candidate_weight_percent: u32::try_from(decision.status.candidate_weight_percent)
            .unwrap_or(0),
    }
}

/// `http://<pod IP>:<port>` of a running chat pod.
fn pod_url(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Running") {
        return None;
    }
    let ip = status.pod_ip.as_deref().filter(|ip| !ip.is_empty())?;
    Some(match ip.contains(':') {
        true => format!("http://[{ip}]:{CHAT_PORT}"),
        false => format!("http://{ip}:{CHAT_PORT}"),
    })
}
