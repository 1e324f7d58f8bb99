//! Named stand-in for the kubelet, and only for it: the shared rig has no node, so this plays
//! the kubelet for the chat pods of one ChatService. Every pod the Deployment's ReplicaSet
//! creates gets a real chat service, in this process, started from the ConfigMap as the pod
//! would mount it and listening on a loopback address of its own on the chat port; the pod's
//! status is then written as a kubelet would (Running, Ready, its IP), so that the ReplicaSet
//! controller rolls the Deployment on a config change and the operator reads the pod's
//! `/v1/backends` at that IP. A deleted pod has its service stopped (in-flight turns finish).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chat_config::{Config, Secrets};
use chat_operator::layout::CHAT_PORT;
use chat_rig::Rig;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// A chat pod this stand-in runs.
#[derive(Clone)]
pub struct RunningPod {
    pub url: String,
    /// `rollout.candidateWeightPercent` of the config it started with.
    pub weight: Option<u32>,
    stop: CancellationToken,
}

pub struct PodRunner {
    stop: CancellationToken,
    /// By pod name, in creation order of the names the ReplicaSets chose.
    pub pods: Arc<Mutex<Vec<(String, RunningPod)>>>,
}

impl Drop for PodRunner {
    fn drop(&mut self) {
        self.stop.cancel();
        for (_, pod) in self.pods.lock().unwrap().iter() {
            pod.stop.cancel();
        }
    }
}

impl PodRunner {
    pub fn start(admin: Client, ns: &str, name: &str) -> Self {
        let stop = CancellationToken::new();
        let pods: Arc<Mutex<Vec<(String, RunningPod)>>> = Arc::default();
        let (ns, name) = (ns.to_string(), name.to_string());
        // A /16 of loopback addresses of its own, so parallel tests never share a port.
        let prefix = format!("127.{}.{}", 1 + rand_byte() % 250, rand_byte());
        let (task_stop, task_pods) = (stop.clone(), pods.clone());
        tokio::spawn(async move {
            let mut next = 1u32;
            while !task_stop.is_cancelled() {
                if let Err(e) = sync(&admin, &ns, &name, &prefix, &mut next, &task_pods).await {
                    eprintln!("pod runner: {e}");
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        Self { stop, pods }
    }

    /// The newest running pod: where the chat Service would send a new connection.
    pub fn newest(&self) -> Option<RunningPod> {
        self.pods.lock().unwrap().last().map(|(_, p)| p.clone())
    }
}

fn rand_byte() -> u8 {
    (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        % 251) as u8
}

async fn sync(
    admin: &Client,
    ns: &str,
    name: &str,
    prefix: &str,
    next: &mut u32,
    running: &Mutex<Vec<(String, RunningPod)>>,
) -> Result<(), String> {
    let api: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let selector =
        format!("chatoperator.dev/chatservice={name},app.kubernetes.io/component=chat-service");
    let list = api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|e| format!("listing pods: {e}"))?;
    let live: Vec<String> = list
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| p.name_any())
        .collect();
    running.lock().unwrap().retain(|(pod, running)| {
        let keep = live.contains(pod);
        if !keep {
            running.stop.cancel();
        }
        keep
    });
    for pod in live {
        if running.lock().unwrap().iter().any(|(p, _)| *p == pod) {
            continue;
        }
        let ip = format!("{prefix}.{next}");
        *next += 1;
        let started = start_service(admin, ns, name, &ip).await?;
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let status = json!({"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "startTime": now,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                {"type": "Ready", "status": "True", "lastTransitionTime": now}],
            "containerStatuses": [{"name": "chat-service", "image": "chat-service", "imageID": "",
                "ready": true, "started": true, "restartCount": 0,
                "state": {"running": {"startedAt": now}}}],
        }});
        api.patch_status(&pod, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .map_err(|e| format!("writing the status of pod {pod}: {e}"))?;
        running.lock().unwrap().push((pod, started));
    }
    Ok(())
}

/// A real chat service on `ip`:CHAT_PORT with the config the ConfigMap holds now.
async fn start_service(
    admin: &Client,
    ns: &str,
    name: &str,
    ip: &str,
) -> Result<RunningPod, String> {
    let map = Api::<ConfigMap>::namespaced(admin.clone(), ns)
        .get(&format!("{name}-config"))
        .await
        .map_err(|e| format!("reading the config: {e}"))?;
    let text = map
        .data
        .unwrap_or_default()
        .remove("config.yaml")
        .unwrap_or_default();
    let config = Config::from_yaml(&text).map_err(|e| format!("the rendered config: {e}"))?;
    let rig = Rig::shared();
    let secrets = Secrets {
        redis_url: rig.redis_url().into(),
        mongodb_uri: rig.mongodb_url().into(),
        backend_api_keys: config.backends.iter().map(|_| None).collect(),
        api_keys: None,
    };
    let weight = config.rollout.as_ref().map(|r| r.candidate_weight_percent);
    let limits = chat_service::server::ConnectionLimits::from(&config.limits);
    let state = chat_service::AppState::new(config, secrets)
        .await
        .map_err(|e| format!("starting the chat service: {e}"))?;
    let listener = tokio::net::TcpListener::bind((ip, CHAT_PORT as u16))
        .await
        .map_err(|e| format!("binding {ip}: {e}"))?;
    let stop = CancellationToken::new();
    tokio::spawn(chat_service::server::serve(
        listener,
        chat_service::router(state),
        limits,
        stop.clone(),
    ));
    Ok(RunningPod {
        url: format!("http://{ip}:{CHAT_PORT}"),
        weight,
        stop,
    })
}

/// The weights of the pods running now, oldest first (for failure messages).
pub fn weights(pods: &Mutex<Vec<(String, RunningPod)>>) -> BTreeMap<String, Option<u32>> {
    pods.lock()
        .unwrap()
        .iter()
        .map(|(name, pod)| (name.clone(), pod.weight))
        .collect()
}
