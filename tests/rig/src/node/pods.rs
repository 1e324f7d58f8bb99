//! One bound Pod, run the way a kubelet would: network namespace, volumes, init containers to
//! completion, containers as local processes (restarted with back-off), probes, status, and a
//! graceful stop that ends in deleting the Pod object.
//!
//! Over 500 lines, knowingly: this stand-in for a kubelet is to be replaced by a real node
//! (kubelet, containerd, CNI), so it is not split further.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, EnvVar, Pod, Probe, Secret, ServiceAccount, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::host_view;
use super::images::{self, ExecCheck, ImageContext, Launch};
use super::net::{HostNet, PodNet};
use super::proxy::DnsView;
use crate::process::ManagedProcess;

/// What every pod worker shares with the node.
pub struct NodeShared {
    pub client: kube::Client,
    pub node_name: String,
    pub net: Arc<HostNet>,
    pub images: ImageContext,
    /// The node's folder: pod folders, logs.
    pub dir: PathBuf,
    pub dns: watch::Receiver<Arc<DnsView>>,
    pub mounts: MountPoints,
    /// An empty folder outside any mount target where each container binds the host's root
    /// before its own mounts (see `host_view`).
    pub host_view: PathBuf,
    /// ClusterIP and port of `default/kubernetes`.
    pub kubernetes_service: Mutex<Option<(String, u16)>>,
    /// Caps the grace period used when the node itself shuts down.
    pub shutdown_grace: Duration,
}

/// Mount points the node had to create on the host, reference-counted across pods and removed
/// when the last pod using them goes. Listed in the registry so a dead run's are pruned.
pub struct MountPoints {
    record: PathBuf,
    state: Mutex<HashMap<PathBuf, (usize, Vec<PathBuf>)>>,
}

impl MountPoints {
    pub fn new(record: PathBuf) -> Self {
        Self {
            record,
            state: Mutex::new(HashMap::new()),
        }
    }

    /// Makes sure `target` exists (a folder, or an empty file when `file`), creating what is
    /// missing and remembering it.
    pub fn acquire(&self, target: &Path, file: bool) -> Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((count, _)) = state.get_mut(target) {
            *count += 1;
            return Ok(());
        }
        let mut created = Vec::new();
        let mut missing = Vec::new();
        let mut p = target.to_path_buf();
        while !p.exists() {
            missing.push(p.clone());
            if !p.pop() {
                break;
            }
        }
        for m in missing.iter().rev() {
            if file && m == target {
                std::fs::write(m, b"").with_context(|| format!("creating {}", m.display()))?;
            } else {
                std::fs::create_dir(m).with_context(|| format!("creating {}", m.display()))?;
            }
            created.push(m.clone());
        }
        if !created.is_empty() {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.record)?;
            for c in &created {
                writeln!(f, "{}", c.display())?;
            }
        }
        state.insert(target.to_path_buf(), (1, created));
        Ok(())
    }

    pub fn release(&self, target: &Path) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some((count, _)) = state.get_mut(target) else {
            return;
        };
        *count -= 1;
        if *count > 0 {
            return;
        }
        let (_, created) = state.remove(target).unwrap_or_default();
        for c in created.iter().rev() {
            let _ = std::fs::remove_dir(c).or_else(|_| std::fs::remove_file(c));
        }
    }

    /// Everything still held (at shutdown).
    pub fn release_all(&self) {
        let targets: Vec<PathBuf> = self
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        for t in targets {
            loop {
                let held = self
                    .state
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains_key(&t);
                if !held {
                    break;
                }
                self.release(&t);
            }
        }
        let _ = std::fs::remove_file(&self.record);
    }
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

fn time_json(t: &Time) -> serde_json::Value {
    serde_json::to_value(t).unwrap_or_default()
}

#[derive(Debug, Clone)]
enum CState {
    Waiting {
        reason: String,
        message: String,
    },
    Running {
        started_at: Time,
    },
    Terminated {
        exit_code: i32,
        reason: String,
        started_at: Option<Time>,
        finished_at: Time,
    },
}

impl CState {
    fn json(&self) -> serde_json::Value {
        match self {
            CState::Waiting { reason, message } => {
                serde_json::json!({"waiting": {"reason": reason, "message": message}})
            }
            CState::Running { started_at } => {
                serde_json::json!({"running": {"startedAt": time_json(started_at)}})
            }
            CState::Terminated {
                exit_code,
                reason,
                started_at,
                finished_at,
            } => serde_json::json!({"terminated": {
                "exitCode": exit_code, "reason": reason,
                "startedAt": started_at.as_ref().map(time_json),
                "finishedAt": time_json(finished_at),
            }}),
        }
    }
}

#[derive(Debug, Clone)]
struct CStatus {
    name: String,
    image: String,
    state: CState,
    last: Option<CState>,
    restart_count: i32,
    ready: bool,
    started: bool,
    pid: Option<u32>,
}

impl CStatus {
    fn new(c: &Container) -> Self {
        Self {
            name: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            state: CState::Waiting {
                reason: "PodInitializing".into(),
                message: String::new(),
            },
            last: None,
            restart_count: 0,
            ready: false,
            started: false,
            pid: None,
        }
    }
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "image": self.image,
            "imageID": format!("chat-rig-local://{}", images::image_name(&self.image)),
            "containerID": self.pid.map(|p| format!("chat-rig://{p}")),
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restart_count,
            "state": self.state.json(),
            "lastState": self.last.as_ref().map(CState::json).unwrap_or_else(|| serde_json::json!({})),
        })
    }
}

#[derive(Debug, Default)]
struct PodState {
    ip: Option<Ipv4Addr>,
    start_time: Option<Time>,
    init: Vec<CStatus>,
    containers: Vec<CStatus>,
    init_done: bool,
    /// Succeeded / Failed for pods whose containers do not restart.
    final_phase: Option<&'static str>,
    /// Why the pod cannot start (volumes, network), shown on the containers.
    problem: Option<(String, String)>,
    /// Last transition time per condition type, and its status.
    transitions: BTreeMap<&'static str, (bool, Time)>,
}

type Shared = Arc<Mutex<PodState>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, PodState> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

fn status_json(state: &mut PodState, host_ip: Ipv4Addr) -> serde_json::Value {
    let all_ready = !state.containers.is_empty() && state.containers.iter().all(|c| c.ready);
    let all_running = state
        .containers
        .iter()
        .all(|c| matches!(c.state, CState::Running { .. }));
    let phase = state
        .final_phase
        .unwrap_or(if state.init_done && all_running {
            "Running"
        } else {
            "Pending"
        });
    let mut conds = Vec::new();
    for (ty, ok) in [
        ("PodScheduled", true),
        ("Initialized", state.init_done),
        ("ContainersReady", all_ready),
        ("Ready", all_ready),
    ] {
        let entry = state.transitions.entry(ty).or_insert((ok, now()));
        if entry.0 != ok {
            *entry = (ok, now());
        }
        let (reason, message) = if ok {
            (None, None)
        } else if ty == "Initialized" {
            (
                Some("ContainersNotInitialized"),
                Some("containers with incomplete status: init containers".to_string()),
            )
        } else {
            let unready: Vec<&str> = state
                .containers
                .iter()
                .filter(|c| !c.ready)
                .map(|c| c.name.as_str())
                .collect();
            (
                Some("ContainersNotReady"),
                Some(format!(
                    "containers with unready status: [{}]",
                    unready.join(" ")
                )),
            )
        };
        conds.push(serde_json::json!({
            "type": ty, "status": if ok {"True"} else {"False"},
            "lastProbeTime": null,
            "lastTransitionTime": time_json(&entry.1),
            "reason": reason, "message": message,
        }));
    }
    let mut containers = state.containers.clone();
    if let Some((reason, message)) = &state.problem {
        for c in &mut containers {
            if matches!(c.state, CState::Waiting { .. }) {
                c.state = CState::Waiting {
                    reason: reason.clone(),
                    message: message.clone(),
                };
            }
        }
    }
    serde_json::json!({
        "phase": phase,
        "hostIP": host_ip.to_string(),
        "hostIPs": [{"ip": host_ip.to_string()}],
        "podIP": state.ip.map(|i| i.to_string()),
        "podIPs": state.ip.map(|i| vec![serde_json::json!({"ip": i.to_string()})]),
        "startTime": state.start_time.as_ref().map(time_json),
        "conditions": conds,
        "initContainerStatuses": state.init.iter().map(CStatus::json).collect::<Vec<_>>(),
        "containerStatuses": containers.iter().map(CStatus::json).collect::<Vec<_>>(),
    })
}

/// A volume materialised on the host.
#[derive(Debug, Clone)]
struct HostVolume {
    path: PathBuf,
}

/// One bind mount of a container.
#[derive(Debug, Clone)]
struct BindMount {
    source: PathBuf,
    target: PathBuf,
    read_only: bool,
    file: bool,
}

/// Cache of API objects read while preparing one pod.
struct Lookup<'a> {
    client: &'a kube::Client,
    ns: &'a str,
}

impl Lookup<'_> {
    async fn secret(&self, name: &str) -> Result<Option<Secret>> {
        Ok(Api::<Secret>::namespaced(self.client.clone(), self.ns)
            .get_opt(name)
            .await?)
    }
    async fn config_map(&self, name: &str) -> Result<Option<ConfigMap>> {
        Ok(Api::<ConfigMap>::namespaced(self.client.clone(), self.ns)
            .get_opt(name)
            .await?)
    }
    async fn secret_data(&self, name: &str, optional: bool) -> Result<BTreeMap<String, Vec<u8>>> {
        match self.secret(name).await? {
            Some(s) => {
                let mut out: BTreeMap<String, Vec<u8>> = s
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect();
                for (k, v) in s.string_data.unwrap_or_default() {
                    out.insert(k, v.into_bytes());
                }
                Ok(out)
            }
            None if optional => Ok(BTreeMap::new()),
            None => bail!("secret {:?} not found", name),
        }
    }
    async fn config_map_data(
        &self,
        name: &str,
        optional: bool,
    ) -> Result<BTreeMap<String, Vec<u8>>> {
        match self.config_map(name).await? {
            Some(c) => {
                let mut out: BTreeMap<String, Vec<u8>> = c
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect();
                for (k, v) in c.binary_data.unwrap_or_default() {
                    out.insert(k, v.0);
                }
                Ok(out)
            }
            None if optional => Ok(BTreeMap::new()),
            None => bail!("configmap {:?} not found", name),
        }
    }
}

/// `metadata.name`, `status.podIP`, `metadata.labels['x']` ... of a pod.
fn field_ref(pod: &Pod, path: &str, ip: Ipv4Addr, host_ip: Ipv4Addr) -> Result<String> {
    let m = &pod.metadata;
    let spec = pod.spec.as_ref();
    let keyed = |prefix: &str, map: &Option<BTreeMap<String, String>>| -> Option<String> {
        let key = path
            .strip_prefix(prefix)?
            .strip_prefix("['")?
            .strip_suffix("']")?;
        Some(map.as_ref()?.get(key).cloned().unwrap_or_default())
    };
    Ok(match path {
        "metadata.name" => m.name.clone().unwrap_or_default(),
        "metadata.namespace" => m.namespace.clone().unwrap_or_default(),
        "metadata.uid" => m.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        "status.podIP" | "status.podIPs" => ip.to_string(),
        "status.hostIP" | "status.hostIPs" => host_ip.to_string(),
        _ => keyed("metadata.labels", &m.labels)
            .or_else(|| keyed("metadata.annotations", &m.annotations))
            .ok_or_else(|| anyhow!("fieldRef {path:?} is not supported by the rig node"))?,
    })
}

/// Kubernetes' `$(VAR)` expansion (`$$` escapes); unknown references stay as written.
fn expand(text: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => out.push_str(&format!("$({name})")),
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// A container's environment from the pod spec (envFrom, then env in order).
async fn container_env(
    lookup: &Lookup<'_>,
    pod: &Pod,
    c: &Container,
    ip: Ipv4Addr,
    host_ip: Ipv4Addr,
) -> Result<Vec<(String, String)>> {
    let mut env: Vec<(String, String)> = Vec::new();
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let data = if let Some(r) = &from.config_map_ref {
            lookup
                .config_map_data(&r.name, r.optional.unwrap_or(false))
                .await?
        } else if let Some(r) = &from.secret_ref {
            lookup
                .secret_data(&r.name, r.optional.unwrap_or(false))
                .await?
        } else {
            BTreeMap::new()
        };
        for (k, v) in data {
            env.push((format!("{prefix}{k}"), text(v)));
        }
    }
    for var in c.env.iter().flatten() {
        let EnvVar {
            name,
            value,
            value_from,
            ..
        } = var;
        let v = if let Some(v) = value {
            expand(v, &env)
        } else if let Some(from) = value_from {
            if let Some(r) = &from.secret_key_ref {
                let optional = r.optional.unwrap_or(false);
                let data = lookup.secret_data(&r.name, optional).await?;
                match data.get(&r.key) {
                    Some(v) => text(v.clone()),
                    None if optional => continue,
                    None => bail!("couldn't find key {} in Secret {}", r.key, r.name),
                }
            } else if let Some(r) = &from.config_map_key_ref {
                let optional = r.optional.unwrap_or(false);
                let data = lookup.config_map_data(&r.name, optional).await?;
                match data.get(&r.key) {
                    Some(v) => text(v.clone()),
                    None if optional => continue,
                    None => bail!("couldn't find key {} in ConfigMap {}", r.key, r.name),
                }
            } else if let Some(r) = &from.field_ref {
                field_ref(pod, &r.field_path, ip, host_ip)?
            } else if let Some(r) = &from.resource_field_ref {
                // Not enforced here (see the node docs); report the declared value.
                let res = c.resources.as_ref();
                let (kind, resource) = r.resource.split_once('.').unwrap_or(("", &r.resource));
                let q = match kind {
                    "limits" => res.and_then(|r| r.limits.as_ref()),
                    _ => res.and_then(|r| r.requests.as_ref()),
                }
                .and_then(|m| m.get(resource))
                .map(|q| q.0.clone());
                q.unwrap_or_else(|| "0".into())
            } else {
                String::new()
            }
        } else {
            String::new()
        };
        env.push((name.clone(), v));
    }
    Ok(env)
}

fn write_files(dir: &Path, files: &BTreeMap<String, Vec<u8>>, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for (rel, data) in files {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, data)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Keys → files, honouring `items` (key → path) when given.
fn select_items(
    data: BTreeMap<String, Vec<u8>>,
    items: &Option<Vec<k8s_openapi::api::core::v1::KeyToPath>>,
    optional: bool,
) -> Result<BTreeMap<String, Vec<u8>>> {
    match items {
        None => Ok(data),
        Some(items) => {
            let mut out = BTreeMap::new();
            for it in items {
                match data.get(&it.key) {
                    Some(v) => {
                        out.insert(it.path.clone(), v.clone());
                    }
                    None if optional => {}
                    None => bail!("key {:?} is missing", it.key),
                }
            }
            Ok(out)
        }
    }
}

async fn token_for(
    client: &kube::Client,
    pod: &Pod,
    audience: Option<String>,
    expiration: Option<i64>,
) -> Result<String> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audience.map(|a| vec![a]).unwrap_or_default(),
            expiration_seconds: Some(expiration.unwrap_or(3607)),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let api = Api::<ServiceAccount>::namespaced(client.clone(), &ns);
    let answer: TokenRequest = api
        .create_subresource("token", &sa, &PostParams::default(), &request)
        .await
        .with_context(|| format!("TokenRequest for service account {ns}/{sa}"))?;
    answer
        .status
        .map(|s| s.token)
        .ok_or_else(|| anyhow!("TokenRequest for {ns}/{sa} returned no token"))
}

/// Writes every volume of the pod under `pod_dir/volumes/<name>`.
async fn prepare_volumes(
    shared: &NodeShared,
    pod: &Pod,
    pod_dir: &Path,
    ip: Ipv4Addr,
) -> Result<HashMap<String, HostVolume>> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let lookup = Lookup {
        client: &shared.client,
        ns: &ns,
    };
    let mut out = HashMap::new();
    let volumes: Vec<Volume> = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    for v in volumes {
        let dir = pod_dir.join("volumes").join(&v.name);
        std::fs::create_dir_all(&dir)?;
        let ctx = |e: anyhow::Error| e.context(format!("volume {:?}", v.name));
        if v.empty_dir.is_some() {
            // Nothing to write: an empty folder that lives as long as the pod.
        } else if let Some(cm) = &v.config_map {
            let optional = cm.optional.unwrap_or(false);
            let data = lookup
                .config_map_data(&cm.name, optional)
                .await
                .map_err(ctx)?;
            let files = select_items(data, &cm.items, optional).map_err(ctx)?;
            write_files(&dir, &files, cm.default_mode.unwrap_or(0o644) as u32)?;
        } else if let Some(sec) = &v.secret {
            let optional = sec.optional.unwrap_or(false);
            let name = sec.secret_name.clone().unwrap_or_default();
            let data = lookup.secret_data(&name, optional).await.map_err(ctx)?;
            let files = select_items(data, &sec.items, optional).map_err(ctx)?;
            write_files(&dir, &files, sec.default_mode.unwrap_or(0o644) as u32)?;
        } else if let Some(proj) = &v.projected {
            let mut files = BTreeMap::new();
            for src in proj.sources.iter().flatten() {
                if let Some(t) = &src.service_account_token {
                    let token = token_for(
                        &shared.client,
                        pod,
                        t.audience.clone(),
                        t.expiration_seconds,
                    )
                    .await
                    .map_err(ctx)?;
                    files.insert(t.path.clone(), token.into_bytes());
                }
                if let Some(cm) = &src.config_map {
                    let optional = cm.optional.unwrap_or(false);
                    let data = lookup
                        .config_map_data(&cm.name, optional)
                        .await
                        .map_err(ctx)?;
                    files.extend(select_items(data, &cm.items, optional).map_err(ctx)?);
                }
                if let Some(sec) = &src.secret {
                    let optional = sec.optional.unwrap_or(false);
                    let data = lookup.secret_data(&sec.name, optional).await.map_err(ctx)?;
                    files.extend(select_items(data, &sec.items, optional).map_err(ctx)?);
                }
                if let Some(d) = &src.downward_api {
                    for item in d.items.iter().flatten() {
                        if let Some(f) = &item.field_ref {
                            let value = field_ref(pod, &f.field_path, ip, shared.net.gateway)?;
                            files.insert(item.path.clone(), value.into_bytes());
                        }
                    }
                }
            }
            write_files(&dir, &files, proj.default_mode.unwrap_or(0o644) as u32)?;
        } else if let Some(d) = &v.downward_api {
            let mut files = BTreeMap::new();
            for item in d.items.iter().flatten() {
                if let Some(f) = &item.field_ref {
                    let value = field_ref(pod, &f.field_path, ip, shared.net.gateway)?;
                    files.insert(item.path.clone(), value.into_bytes());
                }
            }
            write_files(&dir, &files, 0o644)?;
        } else if let Some(claim) = &v.persistent_volume_claim {
            // No provisioner: a claim is a folder of the node's that outlives the pod (like a
            // local-path volume), so a StatefulSet pod finds its data again after a restart.
            let data = shared.dir.join("claims").join(&ns).join(&claim.claim_name);
            std::fs::create_dir_all(&data)?;
            let _ = std::fs::remove_dir(&dir);
            out.insert(v.name.clone(), HostVolume { path: data });
            continue;
        } else if let Some(host) = &v.host_path {
            let _ = std::fs::remove_dir(&dir);
            out.insert(
                v.name.clone(),
                HostVolume {
                    path: PathBuf::from(&host.path),
                },
            );
            continue;
        } else {
            bail!(
                "volume {:?}: this volume type is not supported by the rig node (emptyDir, configMap, secret, projected, downwardAPI, persistentVolumeClaim, hostPath are)",
                v.name
            );
        }
        out.insert(v.name.clone(), HostVolume { path: dir });
    }
    Ok(out)
}

fn mounts_of(c: &Container, volumes: &HashMap<String, HostVolume>) -> Result<Vec<BindMount>> {
    let mut out = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let vol = volumes
            .get(&m.name)
            .ok_or_else(|| anyhow!("volumeMount {:?} names no volume of the pod", m.name))?;
        let source = match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) => {
                let p = vol.path.join(sub);
                if !p.exists() {
                    std::fs::create_dir_all(&p)?;
                }
                p
            }
            None => vol.path.clone(),
        };
        out.push(BindMount {
            file: source.is_file(),
            source,
            target: PathBuf::from(&m.mount_path),
            read_only: m.read_only.unwrap_or(false),
        });
    }
    // Parents before children.
    out.sort_by_key(|m| m.target.components().count());
    Ok(out)
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// What one container needs to start: argv, env, mounts.
struct Prepared {
    launch: Launch,
    env: Vec<(String, String)>,
    mounts: Vec<BindMount>,
}

const BASE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Everything before the process: env from the API server, the image mapping, the mounts.
async fn prepare_container(
    shared: &NodeShared,
    pod: &Pod,
    c: &Container,
    volumes: &HashMap<String, HostVolume>,
    ip: Ipv4Addr,
) -> std::result::Result<Prepared, (String, String)> {
    let launch =
        images::resolve(&shared.images, c).map_err(|e| (e.reason.to_string(), e.message))?;
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let lookup = Lookup {
        client: &shared.client,
        ns: &ns,
    };
    let config_err =
        |e: anyhow::Error| ("CreateContainerConfigError".to_string(), format!("{e:#}"));
    let mut env = vec![
        (
            "PATH".to_string(),
            format!("{}:{BASE_PATH}", shared.images.shim_dir.display()),
        ),
        ("HOME".to_string(), "/".to_string()),
        ("HOSTNAME".to_string(), hostname(pod)),
    ];
    if let Some((host, port)) = shared
        .kubernetes_service
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
    {
        env.extend([
            ("KUBERNETES_SERVICE_HOST".into(), host.clone()),
            ("KUBERNETES_SERVICE_PORT".into(), port.to_string()),
            ("KUBERNETES_SERVICE_PORT_HTTPS".into(), port.to_string()),
            ("KUBERNETES_PORT".into(), format!("tcp://{host}:{port}")),
        ]);
    }
    env.extend(
        container_env(&lookup, pod, c, ip, shared.net.gateway)
            .await
            .map_err(config_err)?,
    );
    env.extend(launch.env.clone());
    let mut launch = launch;
    launch.argv = launch.argv.iter().map(|a| expand(a, &env)).collect();
    let mounts = mounts_of(c, volumes).map_err(config_err)?;
    reach_past_mounts(
        &shared.host_view,
        Prepared {
            launch,
            env,
            mounts,
        },
    )
    .map_err(config_err)
}

/// Points the program, `PATH` and the image's path settings through the host view where one of
/// the container's mounts covers them (mount sources always go through it: see `start_script`).
fn reach_past_mounts(view: &Path, mut p: Prepared) -> Result<Prepared> {
    let targets: Vec<PathBuf> = p.mounts.iter().map(|m| m.target.clone()).collect();
    host_view::check(view, &targets)?;
    if let Some(program) = p.launch.argv.first_mut() {
        *program = host_view::reachable(view, &targets, Path::new(program))
            .display()
            .to_string();
    }
    let image_env: Vec<String> = p.launch.env.iter().map(|(k, _)| k.clone()).collect();
    for (key, value) in &mut p.env {
        if key == "PATH" {
            *value = host_view::reachable_list(view, &targets, value);
        } else if image_env.contains(key) {
            *value = host_view::reachable(view, &targets, Path::new(value.as_str()))
                .display()
                .to_string();
        }
    }
    Ok(p)
}

fn hostname(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.hostname.clone())
        .or_else(|| pod.metadata.name.clone())
        .unwrap_or_default()
}

/// The container's start script: UTS name, the host view, bind mounts (sources through the
/// view, so an earlier mount cannot hide a later one's source), image preparations, working
/// folder.
fn start_script(pod: &Pod, c: &Container, p: &Prepared, view: &Path) -> String {
    let mut s = String::from("set -e\n");
    let name: String = hostname(pod).chars().take(63).collect();
    s.push_str(&format!("hostname {}\n", quote(&name)));
    s.push_str(&host_view::bind_lines(view));
    for m in &p.mounts {
        let (src, dst) = (
            quote(
                &host_view::through_view(view, &m.source)
                    .display()
                    .to_string(),
            ),
            quote(&m.target.display().to_string()),
        );
        s.push_str(&format!("mount --bind {src} {dst}\n"));
        if m.read_only {
            s.push_str(&format!("mount -o remount,bind,ro {dst}\n"));
        }
    }
    for line in &p.launch.prepare {
        s.push_str(line);
        s.push('\n');
    }
    let wd = c.working_dir.clone().unwrap_or_else(|| "/".into());
    s.push_str(&format!("cd {}\nexec \"$@\"\n", quote(&wd)));
    s
}

/// A running container process and what the probes need.
struct Running {
    process: Arc<Mutex<ManagedProcess>>,
    pid: u32,
}

fn spawn_container(
    shared: &NodeShared,
    pod: &Pod,
    net: &PodNet,
    c: &Container,
    p: &Prepared,
    pod_dir: &Path,
) -> Result<Running> {
    for m in &p.mounts {
        shared.mounts.acquire(&m.target, m.file)?;
    }
    let script = pod_dir.join(format!("start-{}.sh", c.name));
    std::fs::write(&script, start_script(pod, c, p, &shared.host_view))?;
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns", "exec", &net.netns, "unshare", "--uts", "--", "/bin/sh",
    ])
    .arg(&script)
    .args(&p.launch.argv)
    .env_clear()
    .envs(p.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let log = pod_dir.join(format!("{}.log", c.name));
    let process = ManagedProcess::spawn(
        &format!(
            "{}/{}",
            pod.metadata.name.as_deref().unwrap_or_default(),
            c.name
        ),
        cmd,
        &log,
    );
    let process = match process {
        Ok(p) => p,
        Err(e) => {
            for m in &p.mounts {
                shared.mounts.release(&m.target);
            }
            return Err(e);
        }
    };
    let pid = process.pid().unwrap_or_default();
    Ok(Running {
        process: Arc::new(Mutex::new(process)),
        pid,
    })
}

fn release_mounts(shared: &NodeShared, p: &Prepared) {
    for m in &p.mounts {
        shared.mounts.release(&m.target);
    }
}

/// Waits for the process to end; `None` when `stop` came first.
async fn wait_exit(
    running: &Running,
    stop: &mut watch::Receiver<Option<Duration>>,
    kill: &mut watch::Receiver<bool>,
) -> Option<i32> {
    loop {
        if let Some(status) = running
            .process
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .try_exit()
        {
            use std::os::unix::process::ExitStatusExt;
            return Some(status.code().unwrap_or(128 + status.signal().unwrap_or(9)));
        }
        if stop.borrow().is_some() {
            return None;
        }
        if *kill.borrow() {
            return Some(137);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {},
            _ = stop.changed() => {},
            _ = kill.changed() => {},
        }
    }
}

async fn stop_process(running: &Running, grace: Duration) {
    let p = running.process.clone();
    let _ = tokio::task::spawn_blocking(move || {
        p.lock()
            .unwrap_or_else(|p| p.into_inner())
            .stop_with_grace(grace)
    })
    .await;
}

fn port_of(c: &Container, port: &IntOrString) -> Option<u16> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).ok(),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .or_else(|| name.parse().ok()),
    }
}

/// A MongoDB `ping` (OP_MSG) answered with ok: 1.
async fn mongo_ping(addr: (Ipv4Addr, u16)) -> Result<()> {
    let mut doc = Vec::new();
    doc.extend([0u8; 4]);
    doc.push(0x10);
    doc.extend(b"ping\0");
    doc.extend(1i32.to_le_bytes());
    doc.push(0x02);
    doc.extend(b"$db\0");
    doc.extend(6i32.to_le_bytes());
    doc.extend(b"admin\0");
    doc.push(0);
    let len = doc.len() as i32;
    doc[..4].copy_from_slice(&len.to_le_bytes());
    let mut msg = Vec::new();
    let total = 16 + 4 + 1 + doc.len() as i32;
    msg.extend(total.to_le_bytes());
    msg.extend(1i32.to_le_bytes());
    msg.extend(0i32.to_le_bytes());
    msg.extend(2013i32.to_le_bytes());
    msg.extend(0u32.to_le_bytes());
    msg.push(0);
    msg.extend(doc);
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(&msg).await?;
    let mut buf = vec![0u8; 512];
    let n = s.read(&mut buf).await?;
    let reply = &buf[..n];
    // "ok" as a double 1.0.
    let needle = [b"\x01ok\0".as_slice(), &1f64.to_le_bytes()].concat();
    if n > 16 && reply.windows(needle.len()).any(|w| w == needle.as_slice()) {
        Ok(())
    } else {
        bail!("ping not ok")
    }
}

async fn probe_once(
    probe: &Probe,
    c: &Container,
    ip: Ipv4Addr,
    pid: u32,
    env: &[(String, String)],
) -> Result<()> {
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
    let attempt = async {
        if let Some(h) = &probe.http_get {
            let port = port_of(c, &h.port).ok_or_else(|| anyhow!("probe port {:?}", h.port))?;
            let host: Ipv4Addr = h.host.as_deref().and_then(|h| h.parse().ok()).unwrap_or(ip);
            let mut s = TcpStream::connect((host, port)).await?;
            let path = h.path.clone().unwrap_or_else(|| "/".into());
            let mut req = format!(
                "GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.34\r\n"
            );
            for hd in h.http_headers.iter().flatten() {
                req.push_str(&format!("{}: {}\r\n", hd.name, hd.value));
            }
            req.push_str("\r\n");
            s.write_all(req.as_bytes()).await?;
            let mut buf = vec![0u8; 64];
            let n = s.read(&mut buf).await?;
            let head = String::from_utf8_lossy(&buf[..n]);
            let code: u16 = head
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| anyhow!("not an HTTP answer"))?;
            if (200..400).contains(&code) {
                Ok(())
            } else {
                bail!("HTTP probe failed with statuscode: {code}")
            }
        } else if let Some(t) = &probe.tcp_socket {
            let port = port_of(c, &t.port).ok_or_else(|| anyhow!("probe port {:?}", t.port))?;
            TcpStream::connect((ip, port)).await?;
            Ok(())
        } else if let Some(e) = &probe.exec {
            match images::exec_check(c, e.command.as_deref().unwrap_or_default()) {
                ExecCheck::MongoPing(port) => mongo_ping((ip, port)).await,
                ExecCheck::Command(argv) => {
                    let status = tokio::process::Command::new("nsenter")
                        .args(["-t", &pid.to_string(), "-m", "-n", "-u", "--"])
                        .args(&argv)
                        .env_clear()
                        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                        .stdin(std::process::Stdio::null())
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .kill_on_drop(true)
                        .status()
                        .await?;
                    if status.success() {
                        Ok(())
                    } else {
                        bail!("exec probe {argv:?} exited with {status}")
                    }
                }
            }
        } else if probe.grpc.is_some() {
            bail!("gRPC probes are not supported by the rig node")
        } else {
            Ok(())
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| anyhow!("probe timed out after {timeout:?}"))?
}

#[derive(Clone, Copy, PartialEq)]
enum ProbeKind {
    Startup,
    Readiness,
    Liveness,
}

/// Runs the container's probes until aborted: sets started/ready, and asks for a restart (via
/// `kill`) when liveness or startup fails its threshold.
async fn probe_loop(
    state: Shared,
    index: usize,
    c: Container,
    ip: Ipv4Addr,
    pid: u32,
    env: Vec<(String, String)>,
    kill: watch::Sender<bool>,
) {
    let started_at = Instant::now();
    let probe = async |p: &Probe, kind: ProbeKind| {
        run_probe(&state, index, p, kind, &c, ip, pid, &env, started_at, &kill).await
    };
    if let Some(p) = &c.startup_probe
        && !probe(p, ProbeKind::Startup).await
    {
        return;
    }
    lock(&state).containers[index].started = true;
    if c.readiness_probe.is_none() {
        lock(&state).containers[index].ready = true;
    }
    let readiness = async {
        if let Some(p) = &c.readiness_probe {
            probe(p, ProbeKind::Readiness).await;
        }
    };
    let liveness = async {
        if let Some(p) = &c.liveness_probe {
            probe(p, ProbeKind::Liveness).await;
        }
    };
    tokio::join!(readiness, liveness);
}

/// One probe's loop; returns (for a startup probe) once it succeeded, `false` when it gave up.
#[allow(clippy::too_many_arguments)]
async fn run_probe(
    state: &Shared,
    index: usize,
    p: &Probe,
    kind: ProbeKind,
    c: &Container,
    ip: Ipv4Addr,
    pid: u32,
    env: &[(String, String)],
    started_at: Instant,
    kill: &watch::Sender<bool>,
) -> bool {
    let delay = Duration::from_secs(p.initial_delay_seconds.unwrap_or(0).max(0) as u64);
    let period = Duration::from_secs(p.period_seconds.unwrap_or(10).max(1) as u64);
    let success_threshold = p.success_threshold.unwrap_or(1).max(1);
    let failure_threshold = p.failure_threshold.unwrap_or(3).max(1);
    let elapsed = started_at.elapsed();
    if delay > elapsed {
        tokio::time::sleep(delay - elapsed).await;
    }
    let (mut ok_run, mut fail_run) = (0, 0);
    let mut ever_ok = false;
    loop {
        let result = probe_once(p, c, ip, pid, env).await;
        match result {
            Ok(()) => {
                ok_run += 1;
                fail_run = 0;
                ever_ok = true;
                if ok_run >= success_threshold {
                    match kind {
                        ProbeKind::Startup => return true,
                        ProbeKind::Readiness => lock(state).containers[index].ready = true,
                        ProbeKind::Liveness => {}
                    }
                }
            }
            Err(_) => {
                fail_run += 1;
                ok_run = 0;
                if fail_run >= failure_threshold {
                    match kind {
                        ProbeKind::Readiness => lock(state).containers[index].ready = false,
                        ProbeKind::Startup | ProbeKind::Liveness => {
                            let _ = kill.send(true);
                            return false;
                        }
                    }
                }
            }
        }
        // Until the first success, probe every second: a readiness period of 5 s would otherwise
        // add up to 5 s to every pod start in the tests (documented in the node's module docs).
        let wait = if !ever_ok && kind != ProbeKind::Liveness {
            Duration::from_secs(1).min(period)
        } else {
            period
        };
        tokio::time::sleep(wait).await;
    }
}

fn backoff(restarts: i32) -> Duration {
    // Kubernetes doubles from 10 s up to 5 min; the rig uses 1 s up to 20 s so tests stay quick.
    Duration::from_secs((1u64 << restarts.clamp(0, 5) as u32).min(20))
}

/// Supervises one app container until `stop`: start, probes, restart with back-off.
#[allow(clippy::too_many_arguments)] // one task per container owns all of these
async fn supervise(
    shared: Arc<NodeShared>,
    state: Shared,
    pod: Pod,
    net: PodNet,
    index: usize,
    c: Container,
    volumes: HashMap<String, HostVolume>,
    pod_dir: PathBuf,
    mut stop: watch::Receiver<Option<Duration>>,
) {
    let policy = pod
        .spec
        .as_ref()
        .and_then(|s| s.restart_policy.clone())
        .unwrap_or_else(|| "Always".into());
    loop {
        if stop.borrow().is_some() {
            return;
        }
        let prepared = match prepare_container(&shared, &pod, &c, &volumes, net.ip).await {
            Ok(p) => p,
            Err((reason, message)) => {
                lock(&state).containers[index].state = CState::Waiting { reason, message };
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {},
                    _ = stop.changed() => {},
                }
                continue;
            }
        };
        let running = match spawn_container(&shared, &pod, &net, &c, &prepared, &pod_dir) {
            Ok(r) => r,
            Err(e) => {
                lock(&state).containers[index].state = CState::Waiting {
                    reason: "RunContainerError".into(),
                    message: format!("{e:#}"),
                };
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {},
                    _ = stop.changed() => {},
                }
                continue;
            }
        };
        let started_at = now();
        {
            let mut s = lock(&state);
            let cs = &mut s.containers[index];
            cs.state = CState::Running {
                started_at: started_at.clone(),
            };
            cs.pid = Some(running.pid);
            cs.ready = false;
            cs.started = false;
        }
        let (kill_tx, mut kill_rx) = watch::channel(false);
        let probes = tokio::spawn(probe_loop(
            state.clone(),
            index,
            c.clone(),
            net.ip,
            running.pid,
            prepared.env.clone(),
            kill_tx,
        ));
        let exit = wait_exit(&running, &mut stop, &mut kill_rx).await;
        probes.abort();
        let grace = (*stop.borrow()).unwrap_or(Duration::from_secs(5));
        stop_process(&running, grace).await;
        release_mounts(&shared, &prepared);
        let code = exit.unwrap_or(143);
        let terminated = CState::Terminated {
            exit_code: code,
            // Stopped by the node (no exit of its own) or exited 0.
            reason: if exit.is_none() || code == 0 {
                "Completed".into()
            } else {
                "Error".into()
            },
            started_at: Some(started_at),
            finished_at: now(),
        };
        let restarts = {
            let mut s = lock(&state);
            let cs = &mut s.containers[index];
            cs.ready = false;
            cs.started = false;
            cs.pid = None;
            cs.state = terminated.clone();
            cs.restart_count
        };
        if exit.is_none() {
            return;
        }
        let restart = match policy.as_str() {
            "Never" => false,
            "OnFailure" => code != 0,
            _ => true,
        };
        if !restart {
            let mut s = lock(&state);
            let done = s
                .containers
                .iter()
                .all(|c| matches!(c.state, CState::Terminated { .. }));
            if done {
                let failed = s.containers.iter().any(
                    |c| matches!(c.state, CState::Terminated { exit_code, .. } if exit_code != 0),
                );
                s.final_phase = Some(if failed { "Failed" } else { "Succeeded" });
            }
            return;
        }
        let wait = backoff(restarts);
        {
            let mut s = lock(&state);
            let cs = &mut s.containers[index];
            cs.last = Some(terminated);
            cs.restart_count += 1;
            cs.state = CState::Waiting {
                reason: "CrashLoopBackOff".into(),
                message: format!(
                    "back-off {}s restarting failed container={} pod={}",
                    wait.as_secs(),
                    c.name,
                    pod.metadata.name.as_deref().unwrap_or_default()
                ),
            };
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {},
            _ = stop.changed() => {},
        }
    }
}

/// Runs one init container to success (restarting on failure unless the policy is Never).
/// `Ok(false)`: stopped, or failed for good.
#[allow(clippy::too_many_arguments)]
async fn run_init(
    shared: &Arc<NodeShared>,
    state: &Shared,
    pod: &Pod,
    net: &PodNet,
    index: usize,
    c: &Container,
    volumes: &HashMap<String, HostVolume>,
    pod_dir: &Path,
    stop: &mut watch::Receiver<Option<Duration>>,
) -> bool {
    let never = pod.spec.as_ref().and_then(|s| s.restart_policy.as_deref()) == Some("Never");
    loop {
        if stop.borrow().is_some() {
            return false;
        }
        let prepared = match prepare_container(shared, pod, c, volumes, net.ip).await {
            Ok(p) => p,
            Err((reason, message)) => {
                lock(state).init[index].state = CState::Waiting { reason, message };
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {},
                    _ = stop.changed() => {},
                }
                continue;
            }
        };
        let running = match spawn_container(shared, pod, net, c, &prepared, pod_dir) {
            Ok(r) => r,
            Err(e) => {
                lock(state).init[index].state = CState::Waiting {
                    reason: "RunContainerError".into(),
                    message: format!("{e:#}"),
                };
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
        };
        let started_at = now();
        lock(state).init[index].state = CState::Running {
            started_at: started_at.clone(),
        };
        let (_kill_tx, mut kill_rx) = watch::channel(false);
        let exit = wait_exit(&running, stop, &mut kill_rx).await;
        stop_process(&running, Duration::from_secs(2)).await;
        release_mounts(shared, &prepared);
        let Some(code) = exit else {
            return false;
        };
        let terminated = CState::Terminated {
            exit_code: code,
            reason: if code == 0 { "Completed" } else { "Error" }.into(),
            started_at: Some(started_at),
            finished_at: now(),
        };
        let wait = {
            let mut s = lock(state);
            let cs = &mut s.init[index];
            if code == 0 {
                cs.state = terminated;
                cs.ready = true;
                return true;
            }
            if never {
                cs.state = terminated;
                s.final_phase = Some("Failed");
                return false;
            }
            cs.last = Some(terminated);
            let wait = backoff(cs.restart_count);
            cs.restart_count += 1;
            cs.state = CState::Waiting {
                reason: "CrashLoopBackOff".into(),
                message: format!(
                    "back-off {}s restarting failed init container {}",
                    wait.as_secs(),
                    c.name
                ),
            };
            wait
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {},
            _ = stop.changed() => {},
        }
    }
}

/// Patches the pod's status whenever it changes (and every 30 s), until `done`.
async fn status_loop(
    shared: Arc<NodeShared>,
    ns: String,
    name: String,
    state: Shared,
    mut done: watch::Receiver<bool>,
) {
    let api = Api::<Pod>::namespaced(shared.client.clone(), &ns);
    let mut last = serde_json::Value::Null;
    let mut last_sent = Instant::now();
    loop {
        let status = status_json(&mut lock(&state), shared.net.gateway);
        if status != last || last_sent.elapsed() > Duration::from_secs(30) {
            let patch = serde_json::json!({"status": status});
            match api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    last = status;
                    last_sent = Instant::now();
                }
                Err(kube::Error::Api(e)) if e.code == 404 => return,
                Err(e) => eprintln!("[node] status of pod {ns}/{name}: {e}"),
            }
        }
        if *done.borrow() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(300)) => {},
            _ = done.changed() => {},
        }
    }
}

/// Rewrites the pod's hosts file (in place: the container sees it through a bind mount)
/// whenever the DNS view changes.
async fn hosts_loop(
    mut dns: watch::Receiver<Arc<DnsView>>,
    path: PathBuf,
    ns: String,
    ip: Ipv4Addr,
    names: Vec<String>,
) {
    loop {
        let text = dns.borrow_and_update().hosts_file(&ns, ip, &names);
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            let _ = write_in_place(&path, &text);
        }
        if dns.changed().await.is_err() {
            return;
        }
    }
}

fn write_in_place(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    f.write_all(text.as_bytes())
}

fn pod_hostnames(pod: &Pod) -> Vec<String> {
    let host = hostname(pod);
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let mut names = Vec::new();
    if let Some(sub) = pod.spec.as_ref().and_then(|s| s.subdomain.clone()) {
        names.push(format!(
            "{host}.{sub}.{ns}.svc.{}",
            super::proxy::CLUSTER_DOMAIN
        ));
    }
    names.push(host);
    names
}

/// Runs a pod until `stop` carries a grace period; then stops it, cleans up everything local and
/// (unless `keep_object`) deletes the Pod object.
pub async fn run_pod(
    shared: Arc<NodeShared>,
    pod: Pod,
    mut stop: watch::Receiver<Option<Duration>>,
    delete_object: Arc<std::sync::atomic::AtomicBool>,
) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let state: Shared = Arc::new(Mutex::new(PodState {
        start_time: Some(now()),
        init: spec
            .init_containers
            .iter()
            .flatten()
            .map(CStatus::new)
            .collect(),
        containers: spec.containers.iter().map(CStatus::new).collect(),
        init_done: spec.init_containers.as_ref().is_none_or(|i| i.is_empty()),
        ..Default::default()
    }));
    for c in &mut lock(&state).containers {
        c.state = CState::Waiting {
            reason: "ContainerCreating".into(),
            message: String::new(),
        };
    }
    let (done_tx, done_rx) = watch::channel(false);
    let status_task = tokio::spawn(status_loop(
        shared.clone(),
        ns.clone(),
        name.clone(),
        state.clone(),
        done_rx,
    ));
    let pod_dir = shared
        .dir
        .join("pods")
        .join(format!("{ns}_{name}_{}", uid.get(..8).unwrap_or(&uid)));

    // Network.
    let net_result = {
        let net = shared.net.clone();
        tokio::task::spawn_blocking(move || net.add_pod())
            .await
            .map_err(|e| anyhow!("{e}"))
            .and_then(|r| r)
    };
    let podnet = match net_result {
        Ok(n) => Some(n),
        Err(e) => {
            lock(&state).problem = Some(("NetworkNotReady".into(), format!("{e:#}")));
            None
        }
    };
    let mut hosts_task = None;
    let mut tasks = Vec::new();
    if let Some(net) = &podnet {
        lock(&state).ip = Some(net.ip);
        let etc = Path::new("/etc/netns").join(&net.netns);
        let prepared = std::fs::create_dir_all(&etc).and_then(|_| {
            std::fs::write(
                etc.join("resolv.conf"),
                format!(
                    "# no DNS server: names come from /etc/hosts (chat-rig node)\nnameserver 127.0.0.1\nsearch {ns}.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:1 timeout:1 attempts:1\n"
                ),
            )?;
            let text = shared.dns.borrow().hosts_file(&ns, net.ip, &pod_hostnames(&pod));
            write_in_place(&etc.join("hosts"), &text)
        });
        if let Err(e) = prepared {
            lock(&state).problem = Some(("NetworkNotReady".into(), format!("/etc/netns: {e}")));
        }
        hosts_task = Some(tokio::spawn(hosts_loop(
            shared.dns.clone(),
            etc.join("hosts"),
            ns.clone(),
            net.ip,
            pod_hostnames(&pod),
        )));

        // Volumes, retried until they can be written (a Secret may appear later).
        let volumes = loop {
            if stop.borrow().is_some() {
                break None;
            }
            match prepare_volumes(&shared, &pod, &pod_dir, net.ip).await {
                Ok(v) => {
                    lock(&state).problem = None;
                    break Some(v);
                }
                Err(e) => {
                    lock(&state).problem = Some((
                        "ContainerCreating".into(),
                        format!("MountVolume.SetUp failed: {e:#}"),
                    ));
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {},
                        _ = stop.changed() => {},
                    }
                }
            }
        };
        if let Some(volumes) = volumes {
            let mut initialised = true;
            for (i, c) in spec.init_containers.iter().flatten().enumerate() {
                if !run_init(
                    &shared, &state, &pod, net, i, c, &volumes, &pod_dir, &mut stop,
                )
                .await
                {
                    initialised = false;
                    break;
                }
            }
            if initialised {
                lock(&state).init_done = true;
                for (i, c) in spec.containers.iter().enumerate() {
                    tasks.push(tokio::spawn(supervise(
                        shared.clone(),
                        state.clone(),
                        pod.clone(),
                        net.clone(),
                        i,
                        c.clone(),
                        volumes.clone(),
                        pod_dir.clone(),
                        stop.clone(),
                    )));
                }
            }
        }
    }

    // Until told to stop.
    while stop.borrow().is_none() {
        if stop.changed().await.is_err() {
            break;
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    if let Some(t) = hosts_task {
        t.abort();
    }
    let _ = done_tx.send(true);
    let _ = status_task.await;
    if let Some(net) = &podnet {
        let n = shared.net.clone();
        let net = net.clone();
        let _ = tokio::task::spawn_blocking(move || n.remove_pod(&net)).await;
    }
    // CHATOP_NODE_KEEP_POD_DIRS=1 keeps each pod's folder (container logs included) for a post-mortem.
    if std::env::var_os("CHATOP_NODE_KEEP_POD_DIRS").is_none() {
        let _ = std::fs::remove_dir_all(&pod_dir);
    }
    if delete_object.load(std::sync::atomic::Ordering::SeqCst) {
        let api = Api::<Pod>::namespaced(shared.client.clone(), &ns);
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..Default::default()
        };
        match api.delete(&name, &dp).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => eprintln!("[node] deleting pod {ns}/{name}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_references_like_kubernetes() {
        let env = vec![("A".to_string(), "x".to_string())];
        assert_eq!(expand("$(A)-$(B)-$$(A)", &env), "x-$(B)-$(A)");
    }

    /// The layout of a clone under `/tmp` (issue 12): the node's folder, and so every volume
    /// source, and the program all live under a folder that the pod's emptyDir covers. The start
    /// script runs for real in a private mount and UTS namespace (as root, like the node), and the
    /// program must see the config volume's file and an empty emptyDir.
    #[test]
    fn a_mount_over_the_folder_holding_the_sources_and_the_program_hides_neither() {
        let root = crate::scratch_dir("host-view").unwrap();
        let covered = root.join("tmp");
        let clone = covered.join("clone");
        let config = clone.join("node/pods/p/volumes/config");
        let empty = clone.join("node/pods/p/volumes/tmp");
        let program = clone.join("target/debug/show");
        let config_target = root.join("etc/chat-service");
        let view = root.join("view");
        for dir in [
            &config,
            &empty,
            &config_target,
            &view,
            program.parent().unwrap(),
        ] {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(config.join("config.yaml"), "from the config volume\n").unwrap();
        std::fs::write(
            &program,
            "#!/bin/sh\ncat \"$1/config.yaml\"\nls -A \"$2\" | wc -l\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mount = |source: &Path, target: &Path| BindMount {
            source: source.to_path_buf(),
            target: target.to_path_buf(),
            read_only: false,
            file: false,
        };
        let mut mounts = vec![mount(&config, &config_target), mount(&empty, &covered)];
        mounts.sort_by_key(|m| m.target.components().count());
        assert_eq!(
            mounts[0].target, covered,
            "the emptyDir is mounted first, as on the node"
        );
        let prepared = reach_past_mounts(
            &view,
            Prepared {
                launch: Launch {
                    argv: vec![
                        program.display().to_string(),
                        config_target.display().to_string(),
                        covered.display().to_string(),
                    ],
                    ..Default::default()
                },
                env: vec![("PATH".into(), BASE_PATH.into())],
                mounts,
            },
        )
        .unwrap();
        let pod: Pod =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "host-view"}})).unwrap();
        let script = root.join("start.sh");
        std::fs::write(
            &script,
            start_script(&pod, &Container::default(), &prepared, &view),
        )
        .unwrap();
        let out = Command::new("unshare")
            .args([
                "--mount",
                "--uts",
                "--propagation",
                "slave",
                "--",
                "/bin/sh",
            ])
            .arg(&script)
            .args(&prepared.launch.argv)
            .env_clear()
            .envs(prepared.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("unshare (util-linux) runs");
        assert!(
            out.status.success(),
            "the start script failed (it needs root, like the node): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "from the config volume\n0\n"
        );
        // The host's folders are untouched: nothing was mounted outside the namespace.
        assert!(program.is_file() && std::fs::read_dir(&view).unwrap().next().is_none());
    }
}
