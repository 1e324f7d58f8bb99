//! A local node for the rig's control plane: what a kubelet, kube-scheduler, kube-proxy and
//! cluster DNS do, for the pods the operator defines, on a machine without a container runtime.
//!
//! - **Node and scheduling.** Registers a Ready `Node` (capacity cpu, memory, pods and, when asked,
//!   `nvidia.com/gpu`), renews its Lease in `kube-node-lease` every 10 s and its status every 30 s,
//!   and binds every unscheduled pod (default scheduler, namespaces it serves) to itself through
//!   the `binding` subresource when its nodeSelector matches and the GPUs it requests are free.
//!   Taints, affinity and topology spread are not evaluated (one node).
//! - **Pods.** Each bound pod gets a network namespace, its volumes written under the node's
//!   folder (ConfigMap, Secret, emptyDir, projected service-account token via TokenRequest,
//!   downwardAPI, a per-claim folder for PVCs, hostPath) and bind-mounted at their mountPaths in the
//!   container's own mount namespace; init containers run to completion, then each container runs
//!   as a local process (image → program: [`images`]) with the spec's command, args, env, envFrom
//!   and valueFrom read from the API server. Exits restart with back-off (1 s doubling to 20 s,
//!   shorter than the kubelet's 10 s → 5 min), counted in restartCount. Probes (httpGet,
//!   tcpSocket, exec) run against the pod IP on their periods — until a container's first success
//!   every second, so pods become Ready quickly — and drive `ready`/`started` and liveness
//!   restarts. The status (phase, IPs, conditions, container statuses) is patched as it changes.
//!   Deleting a pod: SIGTERM to the process group, its grace period, SIGKILL, local clean-up, then
//!   the Pod object is deleted with grace 0, as a kubelet does.
//! - **Networking** ([`net`]): one bridge with the pod CIDR (default 10.244.0.0/16; the bridge's
//!   address is the node IP and the pods' gateway), a veth per pod, Service ClusterIPs on a dummy
//!   interface; the [`proxy`] forwards ClusterIP:port to Ready endpoints, and every pod's
//!   `/etc/hosts` stands in for cluster DNS. The host reaches Services at ClusterIP:port and pods at
//!   their IPs.
//! - **Not enforced:** resource requests and limits (no cgroups), securityContext (runAsUser,
//!   runAsNonRoot, readOnlyRootFilesystem, capabilities, seccomp: processes run as root),
//!   NetworkPolicies. Not provided: `kubectl logs/exec` (container logs are files in the node's
//!   folder: `pods/<ns>_<pod>_<uid>/<container>.log`), ConfigMap/Secret volume updates after start,
//!   service-account token refresh (tokens last an hour), Service env vars (enableServiceLinks),
//!   UDP Services, NodePorts.
//! - **Clean-up.** Dropping [`Node`] (or SIGINT/SIGTERM to `rig node`) stops every pod, removes
//!   namespaces, links, addresses, files and the mount points it created, and deletes its Pod,
//!   Node and Lease objects. Container processes are in the rig's watchdog, so they also die when
//!   the node's process is killed; namespaces and links a killed run left behind are pruned when
//!   the next node starts (their names carry a run id; live runs are listed in
//!   `/run/chatop-node/<run>.pid`).
//!
//! Over 500 lines, knowingly: this stand-in for a kubelet is to be replaced by a real node
//! (kubelet, containerd, CNI), so it is not split further.

mod host_view;
pub mod images;
pub mod mongo_front;
pub mod net;
pub mod pods;
pub mod proxy;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node as NodeObject, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use tokio::sync::watch;

use self::images::ImageContext;
use self::net::{Cidr, HostNet};
use self::pods::{MountPoints, NodeShared};
use self::proxy::{DnsView, ServiceProxy};
use crate::{Rig, paths};

/// How the node runs.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Node object name (default `rig-node`).
    pub name: String,
    pub pod_cidr: String,
    /// Must match the API server's `--service-cluster-ip-range`.
    pub service_cidr: String,
    /// Only pods of these namespaces are scheduled and run; empty: all namespaces.
    pub namespaces: Vec<String>,
    /// `nvidia.com/gpu` capacity (0: the resource is not advertised).
    pub gpus: u32,
    pub cpu: String,
    pub memory: String,
    pub max_pods: u32,
    /// Folder of the workspace's binaries (default `${CARGO_TARGET_DIR:-<workspace>/target}/debug`).
    pub bin_dir: Option<PathBuf>,
    /// The node's folder (default: a fresh one under the rig's run folder).
    pub dir: Option<PathBuf>,
    /// Longest grace period a pod gets when the node itself stops.
    pub shutdown_grace: Duration,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            name: "rig-node".into(),
            pod_cidr: "10.244.0.0/16".into(),
            service_cidr: "10.0.0.0/24".into(),
            namespaces: Vec::new(),
            gpus: 0,
            cpu: "8".into(),
            memory: "32Gi".into(),
            max_pods: 110,
            bin_dir: None,
            dir: None,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// The workspace's `target/debug` (or `$CARGO_TARGET_DIR/debug`).
pub fn default_bin_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let target = if target.is_relative() {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(target)
    } else {
        target
    };
    target.join("debug")
}

/// What a started node reports.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub name: String,
    pub run_id: String,
    /// The bridge address: the node's InternalIP and every pod's gateway.
    pub node_ip: Ipv4Addr,
    pub dir: PathBuf,
}

/// A running node; stops and cleans up when dropped.
pub struct Node {
    info: NodeInfo,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Node {
    /// Starts a node for the rig's control plane.
    pub fn start(rig: &Rig, options: NodeOptions) -> Result<Node> {
        Self::start_with_kubeconfig(rig.kubeconfig_path(), options)
    }

    /// Starts a node for the API server `kubeconfig` names (admin identity).
    pub fn start_with_kubeconfig(kubeconfig: &Path, options: NodeOptions) -> Result<Node> {
        let kubeconfig = kubeconfig.to_path_buf();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<NodeInfo>>();
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("rig-node".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                rt.block_on(run(kubeconfig, options, ready_tx, shutdown_rx));
            })?;
        match ready_rx.recv() {
            Ok(Ok(info)) => Ok(Node {
                info,
                shutdown: Some(shutdown_tx),
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(anyhow!("the node's thread ended during start-up"))
            }
        }
    }

    pub fn info(&self) -> &NodeInfo {
        &self.info
    }

    /// Pod network namespaces of this node that exist right now.
    pub fn live_pod_namespaces(&self) -> Vec<String> {
        HostNet::live_namespaces(&self.info.run_id)
    }

    /// Stops every pod and cleans up (what dropping does), waiting for it.
    pub fn stop(mut self) {
        self.shutdown_now();
    }

    fn shutdown_now(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shutdown_now();
    }
}

struct PodHandle {
    ns: String,
    name: String,
    stop: watch::Sender<Option<Duration>>,
    stopping: bool,
    task: tokio::task::JoinHandle<()>,
    gpus: u32,
}

fn run_id() -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    use rand::Rng;
    let mut rng = rand::rng();
    // Starts with a letter: it is part of interface names.
    let mut s = String::from((b'a' + rng.random_range(0..26u8)) as char);
    s.extend((1..net::RUN_ID_LEN).map(|_| CHARS[rng.random_range(0..CHARS.len())] as char));
    s
}

fn api_server_addr(kubeconfig: &Path) -> Result<SocketAddr> {
    let config = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let server = config
        .clusters
        .first()
        .and_then(|c| c.cluster.as_ref())
        .and_then(|c| c.server.clone())
        .ok_or_else(|| anyhow!("kubeconfig {} names no server", kubeconfig.display()))?;
    let hostport = server
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let hostport = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:443")
    };
    hostport
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| anyhow!("cannot resolve the API server {server}"))
}

fn gpu_request(pod: &Pod) -> u32 {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .filter_map(|c| c.resources.as_ref())
        .filter_map(|r| r.limits.as_ref().or(r.requests.as_ref()))
        .filter_map(|m| m.get("nvidia.com/gpu"))
        .filter_map(|q| q.0.parse::<u32>().ok())
        .sum()
}

struct Runner {
    shared: Arc<NodeShared>,
    options: NodeOptions,
    info: NodeInfo,
    pods: HashMap<String, PodHandle>,
    dns_tx: watch::Sender<Arc<DnsView>>,
    proxy: ServiceProxy,
    labels: BTreeMap<String, String>,
    unschedulable_noted: HashSet<String>,
}

async fn run(
    kubeconfig: PathBuf,
    options: NodeOptions,
    ready: std::sync::mpsc::Sender<Result<NodeInfo>>,
    shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    let mut runner = match setup(&kubeconfig, options).await {
        Ok(r) => r,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(runner.info.clone()));
    let mut shutdown = shutdown;
    let mut last_heartbeat = Instant::now();
    let mut last_status = Instant::now();
    loop {
        if let Err(e) = runner.sync_services().await {
            eprintln!("[node] services: {e:#}");
        }
        if let Err(e) = runner.sync_pods().await {
            eprintln!("[node] pods: {e:#}");
        }
        if last_heartbeat.elapsed() > Duration::from_secs(10) {
            if let Err(e) = runner.renew_lease().await {
                eprintln!("[node] lease: {e:#}");
            }
            last_heartbeat = Instant::now();
        }
        if last_status.elapsed() > Duration::from_secs(30) {
            if let Err(e) = runner.patch_node_status().await {
                eprintln!("[node] node status: {e:#}");
            }
            last_status = Instant::now();
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {},
            _ = &mut shutdown => break,
        }
    }
    runner.shutdown().await;
}

async fn setup(kubeconfig: &Path, options: NodeOptions) -> Result<Runner> {
    let pruned = tokio::task::spawn_blocking(net::prune_stale).await?;
    if !pruned.is_empty() {
        eprintln!("[node] pruned what dead runs left: {}", pruned.join(", "));
    }
    let run = run_id();
    let registry = net::registry_dir();
    std::fs::create_dir_all(&registry)
        .with_context(|| format!("creating {}", registry.display()))?;
    std::fs::write(
        registry.join(format!("{run}.pid")),
        std::process::id().to_string(),
    )?;
    let cidr = Cidr::parse(&options.pod_cidr)?;
    let service_cidr = Cidr::parse(&options.service_cidr)?;
    let hostnet = {
        let run = run.clone();
        tokio::task::spawn_blocking(move || HostNet::setup(&run, cidr, service_cidr)).await?
    };
    let hostnet = match hostnet {
        Ok(n) => Arc::new(n),
        Err(e) => {
            let _ = std::fs::remove_file(registry.join(format!("{run}.pid")));
            return Err(e.context("setting up the node's network"));
        }
    };
    let result = async {
        let dir = match &options.dir {
            Some(d) => d.clone(),
            None => crate::scratch_dir(&format!("node-{run}"))?,
        };
        std::fs::create_dir_all(&dir)?;
        let shim_dir = dir.join("bin");
        images::write_shims(&shim_dir)?;
        let images = ImageContext {
            bin_dir: options.bin_dir.clone().unwrap_or_else(default_bin_dir),
            shim_dir,
            ferretdb: paths::cached_bin("ferretdb").ok(),
            ollama: paths::cached_bin("ollama").ok(),
            ollama_models: paths::ollama_models().ok(),
        };
        let host_view = registry.join(format!("{run}.host"));
        std::fs::create_dir_all(&host_view)
            .with_context(|| format!("creating {}", host_view.display()))?;
        let client = crate::client_from_kubeconfig(kubeconfig, None).await?;
        let api_server = api_server_addr(kubeconfig)?;
        let (dns_tx, dns_rx) = watch::channel(Arc::new(DnsView::default()));
        let shared = Arc::new(NodeShared {
            client,
            node_name: options.name.clone(),
            net: hostnet.clone(),
            images,
            dir: dir.clone(),
            dns: dns_rx,
            mounts: MountPoints::new(registry.join(format!("{run}.dirs"))),
            host_view,
            kubernetes_service: Mutex::new(None),
            shutdown_grace: options.shutdown_grace,
        });
        let labels = BTreeMap::from([
            ("kubernetes.io/hostname".to_string(), options.name.clone()),
            ("kubernetes.io/os".to_string(), "linux".to_string()),
            (
                "kubernetes.io/arch".to_string(),
                std::env::consts::ARCH
                    .replace("x86_64", "amd64")
                    .replace("aarch64", "arm64"),
            ),
            ("chatoperator.dev/rig-node".to_string(), "true".to_string()),
        ]);
        let info = NodeInfo {
            name: options.name.clone(),
            run_id: run.clone(),
            node_ip: hostnet.gateway,
            dir,
        };
        let runner = Runner {
            proxy: ServiceProxy::new(hostnet.clone(), api_server),
            shared,
            options,
            info,
            pods: HashMap::new(),
            dns_tx,
            labels,
            unschedulable_noted: HashSet::new(),
        };
        runner.register().await?;
        anyhow::Ok(runner)
    }
    .await;
    if result.is_err() {
        hostnet.teardown();
        let _ = std::fs::remove_file(registry.join(format!("{run}.pid")));
    }
    result
}

impl Runner {
    fn node_status(&self) -> serde_json::Value {
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        );
        let now = serde_json::to_value(now).unwrap_or_default();
        let mut capacity = serde_json::json!({
            "cpu": self.options.cpu, "memory": self.options.memory,
            "pods": self.options.max_pods.to_string(), "ephemeral-storage": "100Gi",
        });
        if self.options.gpus > 0 {
            capacity["nvidia.com/gpu"] = self.options.gpus.to_string().into();
        }
        let cond = |ty: &str, status: &str, reason: &str, message: &str| {
            serde_json::json!({"type": ty, "status": status, "reason": reason, "message": message,
                "lastHeartbeatTime": now, "lastTransitionTime": now})
        };
        serde_json::json!({
            "capacity": capacity, "allocatable": capacity,
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "not measured by the rig node"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "not measured by the rig node"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "not measured by the rig node"),
                cond("Ready", "True", "KubeletReady", "chat-rig node is posting ready status"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": self.info.node_ip.to_string()},
                {"type": "Hostname", "address": self.options.name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {
                "machineID": "", "systemUUID": "", "bootID": self.info.run_id,
                "kernelVersion": "", "osImage": "chat-rig local node",
                "containerRuntimeVersion": "chat-rig://local-processes",
                "kubeletVersion": "v1.34.0-chat-rig", "kubeProxyVersion": "",
                "operatingSystem": "linux", "architecture": self.labels["kubernetes.io/arch"],
            },
        })
    }

    async fn register(&self) -> Result<()> {
        let api = Api::<NodeObject>::all(self.shared.client.clone());
        let node = serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.options.name, "labels": self.labels},
            "spec": {"podCIDR": self.options.pod_cidr, "podCIDRs": [self.options.pod_cidr]},
        });
        let node: NodeObject = serde_json::from_value(node)?;
        match api.create(&PostParams::default(), &node).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let patch = serde_json::json!({"metadata": {"labels": self.labels}});
                api.patch(
                    &self.options.name,
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await?;
            }
            Err(e) => return Err(e).context("registering the Node"),
        }
        self.patch_node_status().await?;
        self.renew_lease().await
    }

    async fn patch_node_status(&self) -> Result<()> {
        let api = Api::<NodeObject>::all(self.shared.client.clone());
        let patch = serde_json::json!({"status": self.node_status()});
        api.patch_status(
            &self.options.name,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
        Ok(())
    }

    async fn renew_lease(&self) -> Result<()> {
        let api = Api::<Lease>::namespaced(self.shared.client.clone(), "kube-node-lease");
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
            k8s_openapi::jiff::Timestamp::now(),
        );
        let lease = serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": self.options.name, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": self.options.name, "leaseDurationSeconds": 40, "renewTime": now},
        });
        api.patch(
            &self.options.name,
            &PatchParams::apply("chat-rig-node").force(),
            &Patch::Apply(&lease),
        )
        .await?;
        Ok(())
    }

    fn serves(&self, ns: &str) -> bool {
        self.options.namespaces.is_empty() || self.options.namespaces.iter().any(|n| n == ns)
    }

    async fn sync_services(&mut self) -> Result<()> {
        let client = self.shared.client.clone();
        let services = Api::<Service>::all(client.clone())
            .list(&ListParams::default())
            .await?
            .items;
        let slices = Api::<EndpointSlice>::all(client)
            .list(&ListParams::default())
            .await?
            .items;
        if let Some(k) = services.iter().find(|s| {
            s.metadata.namespace.as_deref() == Some("default")
                && s.metadata.name.as_deref() == Some("kubernetes")
        }) {
            let spec = k.spec.clone().unwrap_or_default();
            if let (Some(ip), Some(port)) = (
                spec.cluster_ip,
                spec.ports.and_then(|p| p.first().map(|p| p.port)),
            ) {
                *self
                    .shared
                    .kubernetes_service
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some((ip, port as u16));
            }
        }
        self.proxy.sync(&services, &slices).await;
        let view = proxy::dns_view(&services, &slices);
        self.dns_tx.send_if_modified(|old| {
            if **old == view {
                false
            } else {
                *old = Arc::new(view);
                true
            }
        });
        Ok(())
    }

    fn gpus_in_use(&self) -> u32 {
        self.pods
            .values()
            .filter(|h| !h.stopping)
            .map(|h| h.gpus)
            .sum()
    }

    async fn schedule(&mut self, pod: &Pod) -> Result<()> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let spec = pod.spec.clone().unwrap_or_default();
        let mut reason = None;
        for (k, v) in spec.node_selector.iter().flatten() {
            if self.labels.get(k) != Some(v) {
                reason = Some(format!(
                    "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector ({k}={v})"
                ));
            }
        }
        let gpus = gpu_request(pod);
        if reason.is_none() && gpus > self.options.gpus.saturating_sub(self.gpus_in_use()) {
            reason = Some(format!(
                "0/1 nodes are available: 1 Insufficient nvidia.com/gpu (requested {gpus}, node has {})",
                self.options.gpus
            ));
        }
        let api = Api::<Pod>::namespaced(self.shared.client.clone(), &ns);
        if let Some(message) = reason {
            let key = format!(
                "{ns}/{name}/{}",
                pod.metadata.resource_version.clone().unwrap_or_default()
            );
            if self.unschedulable_noted.insert(key) {
                let patch = serde_json::json!({"status": {"conditions": [{
                    "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
                }]}});
                api.patch_status(&name, &PatchParams::default(), &Patch::Strategic(&patch))
                    .await?;
            }
            return Ok(());
        }
        let binding = serde_json::json!({
            "apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": name, "namespace": ns},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.options.name},
        });
        let _: serde_json::Value = match api
            .create_subresource("binding", &name, &PostParams::default(), &binding)
            .await
        {
            Ok(v) => v,
            // Already bound or gone meanwhile: the next pass sees the new state.
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => return Ok(()),
            Err(kube::Error::SerdeError(_)) => serde_json::Value::Null,
            Err(e) => return Err(e).context(format!("binding pod {ns}/{name}")),
        };
        Ok(())
    }

    async fn sync_pods(&mut self) -> Result<()> {
        let pods = Api::<Pod>::all(self.shared.client.clone())
            .list(&ListParams::default())
            .await?
            .items;
        let mut seen = HashSet::new();
        for pod in pods {
            let ns = pod.metadata.namespace.clone().unwrap_or_default();
            if !self.serves(&ns) {
                continue;
            }
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            let spec = pod.spec.clone().unwrap_or_default();
            let deleting = pod.metadata.deletion_timestamp.is_some();
            match spec.node_name.as_deref() {
                None => {
                    let ours = spec
                        .scheduler_name
                        .as_deref()
                        .is_none_or(|s| s == "default-scheduler");
                    if ours && !deleting {
                        self.schedule(&pod).await?;
                    }
                }
                Some(n) if n == self.options.name => {
                    seen.insert(uid.clone());
                    let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
                    if deleting {
                        let grace = Duration::from_secs(
                            pod.metadata
                                .deletion_grace_period_seconds
                                .unwrap_or(30)
                                .max(0) as u64,
                        );
                        match self.pods.get_mut(&uid) {
                            Some(h) if !h.stopping => {
                                h.stopping = true;
                                let _ = h.stop.send(Some(grace));
                            }
                            Some(_) => {}
                            None => {
                                let name = pod.metadata.name.clone().unwrap_or_default();
                                let dp = DeleteParams {
                                    grace_period_seconds: Some(0),
                                    ..Default::default()
                                };
                                let _ = Api::<Pod>::namespaced(self.shared.client.clone(), &ns)
                                    .delete(&name, &dp)
                                    .await;
                            }
                        }
                    } else if !self.pods.contains_key(&uid)
                        && !matches!(phase.as_deref(), Some("Succeeded" | "Failed"))
                    {
                        let (tx, rx) = watch::channel(None);
                        let task = tokio::spawn(pods::run_pod(
                            self.shared.clone(),
                            pod.clone(),
                            rx,
                            Arc::new(AtomicBool::new(true)),
                        ));
                        self.pods.insert(
                            uid,
                            PodHandle {
                                ns,
                                name: pod.metadata.name.clone().unwrap_or_default(),
                                stop: tx,
                                stopping: false,
                                task,
                                gpus: gpu_request(&pod),
                            },
                        );
                    }
                }
                Some(_) => {}
            }
        }
        // Pods whose object vanished (force-deleted): stop them at once.
        for (uid, h) in self.pods.iter_mut() {
            if !seen.contains(uid) && !h.stopping {
                h.stopping = true;
                let _ = h.stop.send(Some(Duration::from_secs(1)));
            }
        }
        self.pods.retain(|_, h| !h.task.is_finished());
        Ok(())
    }

    async fn shutdown(mut self) {
        let cap = self.options.shutdown_grace;
        for h in self.pods.values_mut() {
            if !h.stopping {
                h.stopping = true;
                let _ = h.stop.send(Some(cap));
            } else {
                // Already stopping with the pod's own grace: cap it.
                let _ = h.stop.send(Some(cap));
            }
        }
        for (_, h) in self.pods.drain() {
            if tokio::time::timeout(cap + Duration::from_secs(20), h.task)
                .await
                .is_err()
            {
                eprintln!("[node] pod {}/{} did not stop in time", h.ns, h.name);
            }
        }
        self.proxy.shutdown();
        self.shared.mounts.release_all();
        let client = self.shared.client.clone();
        let _ = Api::<Lease>::namespaced(client.clone(), "kube-node-lease")
            .delete(&self.options.name, &DeleteParams::default())
            .await;
        let _ = Api::<NodeObject>::all(client)
            .delete(&self.options.name, &DeleteParams::default())
            .await;
        self.shared.net.teardown();
        // Empty on the host: the containers bound into it in their own mount namespaces.
        let _ = std::fs::remove_dir(&self.shared.host_view);
        let _ = std::fs::remove_file(net::registry_dir().join(format!("{}.pid", self.info.run_id)));
        eprintln!("[node] {} stopped and cleaned up", self.options.name);
    }
}
