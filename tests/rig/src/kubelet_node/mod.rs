//! A real node for the rig's control plane: containerd 2 with runc, a kubelet registered under
//! its own client certificate (`system:node:<name>` in `system:nodes`, so the API server's Node
//! authorizer and NodeRestriction apply), kube-scheduler, kube-proxy in nftables mode, a bridge
//! CNI network for the pods, kube-router enforcing NetworkPolicies, metrics-server (on the
//! bridge address, so `kubectl top` works), and CoreDNS as a pod in kube-system serving `cluster.local`
//! ([`services`]); a default StorageClass whose claims get hostPath volumes ([`volumes`]).
//!
//! Start-up order: record the host ([`host::HostSnapshot`]), create the bridge (its address,
//! [`POD_GATEWAY`], is the node IP, where the API server reaches the kubelet and pods reach the
//! API server through a forwarder), start containerd, import the node's images ([`images`]),
//! start the kubelet and wait until its Node is Ready, then the scheduler, kube-proxy and
//! CoreDNS. A component that fails names itself and its log, and everything started so far is
//! stopped and cleaned up.
//!
//! Stopping ([`KubeletNode::stop`], or dropping it): the node is cordoned and its pods are
//! deleted, so that the kubelet stops their sandboxes (and the CNI plugin removes their veths);
//! then the kubelet, kube-proxy and containerd stop, leftover shims are killed, mounts under the
//! node's folders are unmounted, network namespaces, the bridge and the kubelet's cgroups are
//! removed, the Node object is deleted, and every sysctl, nftables rule and state folder is put
//! back as recorded. [`leftovers`] lists what would remain, for the test that checks this.
//!
//! Needs root. Binaries: containerd, ctr, containerd-shim-runc-v2, kubelet, kube-scheduler,
//! kube-proxy, kube-router, metrics-server, coredns from the installer's cache (or `CHATOP_NODE_BIN_DIR`), Debian's runc and
//! containernetworking-plugins, buildah, gcc and busybox-static for the images.

mod config;
pub mod host;
pub mod images;
pub mod services;
mod teardown;
pub mod volumes;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::Node as NodeObject;
use kube::api::Api;

use self::config::{Ca, KubeletSettings, Layout};
use self::host::HostSnapshot;
use crate::process::ManagedProcess;
use crate::servers::{free_port, log_tail};
use crate::{Rig, paths};

pub use self::teardown::leftovers;

/// The bridge every pod's veth is attached to; its address is the node IP.
pub const BRIDGE: &str = "chatop-cni0";
/// The bridge's address: the node IP, every pod's gateway, and the address the API server
/// advertises for the `kubernetes` Service (see [`services::ApiForwarder`]).
pub const POD_GATEWAY: &str = "10.246.0.1";
/// containerd's state folder (sockets, shim bundles, network namespaces).
pub const STATE_DIR: &str = "/run/chatop-kubelet";

/// How the node runs.
#[derive(Debug, Clone)]
pub struct KubeletNodeOptions {
    /// Node object name (default `rig-node`).
    pub name: String,
    /// The pods' network, on [`BRIDGE`]; its first address is the gateway and node IP.
    pub pod_cidr: String,
    pub gateway: String,
    /// ClusterIP of cluster DNS (inside the API server's service range 10.0.0.0/24).
    pub cluster_dns: String,
    /// The node's folder (default: a fresh one under the rig's run folder).
    pub dir: Option<PathBuf>,
}

impl Default for KubeletNodeOptions {
    fn default() -> Self {
        Self {
            name: "rig-node".into(),
            // Not podman's 10.88.0.0/16.
            pod_cidr: "10.246.0.0/16".into(),
            gateway: POD_GATEWAY.into(),
            cluster_dns: "10.0.0.10".into(),
            dir: None,
        }
    }
}

/// A binary of the node: the installer's cache, else `CHATOP_NODE_BIN_DIR`.
pub fn node_bin(name: &str) -> Result<PathBuf> {
    if let Ok(path) = paths::cached_bin(name) {
        return Ok(path);
    }
    if let Some(dir) = std::env::var_os("CHATOP_NODE_BIN_DIR") {
        let path = PathBuf::from(dir).join(name);
        if path.is_file() {
            return Ok(path);
        }
    }
    bail!(
        "the real node needs {name}: run tests/rig/install.sh (or point CHATOP_NODE_BIN_DIR at a folder holding it)"
    )
}

fn system_bin(name: &str, package: &str) -> Result<PathBuf> {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        let path = Path::new(dir).join(name);
        if path.is_file() {
            return Ok(path);
        }
    }
    bail!("the real node needs {name} (Debian package {package})")
}

/// What a started node reports.
#[derive(Debug, Clone)]
pub struct KubeletNodeInfo {
    pub name: String,
    pub node_ip: String,
    pub dir: PathBuf,
    pub containerd_socket: PathBuf,
    pub kubelet_kubeconfig: PathBuf,
    pub kubelet_log: PathBuf,
    pub containerd_log: PathBuf,
    /// Seconds from start to a Ready Node.
    pub bring_up: Duration,
}

/// A running node; stops, cleans up and restores the host when dropped.
pub struct KubeletNode {
    info: KubeletNodeInfo,
    admin_kubeconfig: PathBuf,
    layout: Layout,
    host: Option<HostSnapshot>,
    kubelet: Option<ManagedProcess>,
    containerd: Option<ManagedProcess>,
    scheduler: Option<ManagedProcess>,
    kube_proxy: Option<ManagedProcess>,
    kube_router: Option<ManagedProcess>,
    metrics_server: Option<ManagedProcess>,
    api_forwarder: Option<services::ApiForwarder>,
    provisioner: Option<volumes::Provisioner>,
    containerd_spec: Option<Spawn>,
    kubelet_spec: Option<Spawn>,
    kubelet_healthz: u16,
}

/// How to start one of the node's daemons again (for restarts).
struct Spawn {
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
    path: String,
    log: PathBuf,
}

impl Spawn {
    fn spawn(&self) -> Result<ManagedProcess> {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args).env("PATH", &self.path);
        ManagedProcess::spawn(self.name, cmd, &self.log)
    }
}

/// Runs `f` on a current-thread runtime of its own (callers may be inside another runtime).
fn block_on<T: Send + 'static>(
    f: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(f)
    })
    .join()
    .map_err(|_| anyhow!("a node helper thread panicked"))?
}

fn node_ready(kubeconfig: &Path, name: &str) -> Result<bool> {
    let (kubeconfig, name) = (kubeconfig.to_path_buf(), name.to_string());
    block_on(async move {
        let client = crate::client_from_kubeconfig(&kubeconfig, None).await?;
        let node = Api::<NodeObject>::all(client).get_opt(&name).await?;
        Ok(node
            .and_then(|n| n.status)
            .and_then(|s| s.conditions)
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True"))
    })
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (Debian package iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl KubeletNode {
    /// Starts a node for the rig's control plane.
    pub fn start(rig: &Rig, options: KubeletNodeOptions) -> Result<Self> {
        Self::start_with_kubeconfig(rig.kubeconfig_path(), options)
    }

    /// Starts a node for the API server `kubeconfig` names (admin identity, CA key beside the CA).
    pub fn start_with_kubeconfig(kubeconfig: &Path, options: KubeletNodeOptions) -> Result<Self> {
        let started = Instant::now();
        if !Path::new("/sys/class/net").exists() || not_root() {
            bail!("the real node needs root (bridges, mounts, cgroups)");
        }
        if Path::new("/sys/class/net").join(BRIDGE).exists() || Path::new(STATE_DIR).exists() {
            bail!(
                "a real node already runs on this host, or a killed one left {BRIDGE} / {STATE_DIR} behind: stop it (rig down) or remove them"
            );
        }
        let ca = Ca::from_kubeconfig(kubeconfig)?;
        let server = config::server_url(kubeconfig)?;
        let bins = NodeBins::find()?;
        let dir = match &options.dir {
            Some(d) => d.clone(),
            None => crate::scratch_dir("kubelet-node")?,
        };
        std::fs::create_dir_all(&dir)?;
        let layout = Layout {
            dir: dir.canonicalize()?,
            state: PathBuf::from(STATE_DIR),
        };
        let host = HostSnapshot::take().context("recording the host before the node starts")?;
        std::fs::write(layout.dir.join("host-before.nft"), &host.nftables)?;
        let mut node = KubeletNode {
            info: KubeletNodeInfo {
                name: options.name.clone(),
                node_ip: options.gateway.clone(),
                containerd_socket: layout.containerd_socket(),
                kubelet_kubeconfig: layout.dir.join("kubelet.kubeconfig"),
                kubelet_log: layout.dir.join("kubelet.log"),
                containerd_log: layout.dir.join("containerd.log"),
                dir: layout.dir.clone(),
                bring_up: Duration::ZERO,
            },
            admin_kubeconfig: kubeconfig.to_path_buf(),
            layout,
            host: Some(host),
            kubelet: None,
            containerd: None,
            scheduler: None,
            kube_proxy: None,
            kube_router: None,
            metrics_server: None,
            api_forwarder: None,
            provisioner: None,
            containerd_spec: None,
            kubelet_spec: None,
            kubelet_healthz: 0,
        };
        // On any error `node` is dropped here, which stops and undoes what did start.
        node.bring_up(&options, &ca, &server, &bins)?;
        node.info.bring_up = started.elapsed();
        eprintln!(
            "[kubelet-node] {} Ready in {:.1} s ({})",
            options.name,
            node.info.bring_up.as_secs_f64(),
            node.info.dir.display()
        );
        Ok(node)
    }

    fn bring_up(
        &mut self,
        options: &KubeletNodeOptions,
        ca: &Ca,
        server: &str,
        bins: &NodeBins,
    ) -> Result<()> {
        let layout = &self.layout;
        std::fs::create_dir_all(&layout.state)?;
        for d in [
            layout.cni_conf_dir(),
            layout.kubelet_root(),
            layout.pod_logs(),
        ] {
            std::fs::create_dir_all(d)?;
        }
        let prefix = options
            .pod_cidr
            .split('/')
            .nth(1)
            .ok_or_else(|| anyhow!("pod CIDR {} has no prefix length", options.pod_cidr))?;
        ip(&["link", "add", BRIDGE, "type", "bridge"]).context("creating the pod bridge")?;
        ip(&[
            "addr",
            "add",
            &format!("{}/{prefix}", options.gateway),
            "dev",
            BRIDGE,
        ])?;
        ip(&["link", "set", BRIDGE, "up"])?;
        let api_port = server
            .rsplit(':')
            .next()
            .and_then(|p| p.trim_end_matches('/').parse::<u16>().ok())
            .ok_or_else(|| anyhow!("no port in the API server URL {server}"))?;
        self.api_forwarder = Some(services::ApiForwarder::start(
            format!("{}:{api_port}", options.gateway).parse()?,
            ([127, 0, 0, 1], api_port).into(),
        )?);
        let layout = &self.layout;

        std::fs::write(
            layout.containerd_config(),
            config::containerd_config(layout, &bins.runc, &bins.cni),
        )?;
        std::fs::write(
            layout.cni_conf_dir().join("10-chat-rig.conflist"),
            config::cni_conflist(layout, BRIDGE, &options.pod_cidr, &options.gateway),
        )?;
        // The shim is found on PATH.
        let path = format!(
            "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            bins.shim.parent().unwrap_or(Path::new("/")).display()
        );
        self.containerd_spec = Some(Spawn {
            name: "containerd",
            program: bins.containerd.clone(),
            args: vec![
                "--config".into(),
                layout.containerd_config().display().to_string(),
            ],
            path: path.clone(),
            log: self.info.containerd_log.clone(),
        });
        self.spawn_containerd()?;
        let socket = self.layout.containerd_socket();
        images::import_all(&bins.ctr, &socket, &self.layout.dir.join("images"))
            .context("rig step 'node images' failed")?;

        let layout = &self.layout;
        let kubeconfig =
            config::kubelet_identity(layout, ca, &options.name, &options.gateway, server)?;
        let settings = KubeletSettings {
            node_ip: &options.gateway,
            port: free_port()?,
            healthz_port: free_port()?,
            cluster_dns: &options.cluster_dns,
        };
        let kubelet_config = layout.dir.join("kubelet-config.json");
        std::fs::write(
            &kubelet_config,
            config::kubelet_config(layout, ca, &settings)?,
        )?;
        self.kubelet_spec = Some(Spawn {
            name: "kubelet",
            program: bins.kubelet.clone(),
            args: vec![
                format!("--config={}", kubelet_config.display()),
                format!("--kubeconfig={}", kubeconfig.display()),
                format!("--root-dir={}", layout.kubelet_root().display()),
                format!("--cert-dir={}", layout.pki().display()),
                format!("--node-ip={}", options.gateway),
                format!("--hostname-override={}", options.name),
                "--node-labels=chatoperator.dev/rig-node=true".into(),
                "--v=1".into(),
            ],
            path,
            log: self.info.kubelet_log.clone(),
        });
        self.kubelet_healthz = settings.healthz_port;
        self.spawn_kubelet()?;
        self.scheduler = Some(start_scheduler(&self.admin_kubeconfig, &self.layout.dir)?);
        self.kube_proxy = Some(services::start_kube_proxy(
            &self.admin_kubeconfig,
            &self.layout,
            &options.name,
            &options.pod_cidr,
        )?);
        self.kube_router = Some(services::start_kube_router(
            &self.admin_kubeconfig,
            &self.layout,
            &options.name,
        )?);
        self.metrics_server = Some(services::start_metrics_server(
            &self.admin_kubeconfig,
            &self.layout,
            &ca.crt,
            &options.gateway,
        )?);
        self.provisioner = Some(volumes::Provisioner::start(
            &self.admin_kubeconfig,
            &self.layout.dir.join("volumes"),
        )?);
        services::deploy_coredns(&self.admin_kubeconfig, &self.layout, &options.cluster_dns)?;
        Ok(())
    }

    pub fn info(&self) -> &KubeletNodeInfo {
        &self.info
    }

    /// Loads image archives ([`crate::images`]) into the node's containerd, where the kubelet
    /// finds them (pods name them with `imagePullPolicy: IfNotPresent` or `Never`).
    pub fn import_images(&self, archives: &crate::images::Archives) -> Result<()> {
        crate::images::import(
            &node_bin("ctr")?,
            &self.layout.containerd_socket(),
            archives,
        )
        .context("rig step 'import images' failed")
    }

    fn spawn_containerd(&mut self) -> Result<()> {
        let spec = self
            .containerd_spec
            .as_ref()
            .ok_or_else(|| anyhow!("containerd was never configured"))?;
        let mut containerd = spec.spawn()?;
        let socket = self.layout.containerd_socket();
        let ctr = node_bin("ctr")?;
        crate::servers::wait_healthy(&mut containerd, Duration::from_secs(30), || {
            let out = Command::new(&ctr)
                .arg("--address")
                .arg(&socket)
                .arg("version")
                .output()?;
            if out.status.success() {
                Ok(())
            } else {
                bail!("{}", String::from_utf8_lossy(&out.stderr).trim())
            }
        })?;
        self.containerd = Some(containerd);
        Ok(())
    }

    /// Starts the kubelet and waits for its health endpoint and a Ready Node.
    fn spawn_kubelet(&mut self) -> Result<()> {
        let spec = self
            .kubelet_spec
            .as_ref()
            .ok_or_else(|| anyhow!("the kubelet was never configured"))?;
        let mut kubelet = spec.spawn()?;
        let (admin, name, healthz) = (
            self.admin_kubeconfig.clone(),
            self.info.name.clone(),
            self.kubelet_healthz,
        );
        crate::servers::wait_healthy(&mut kubelet, Duration::from_secs(90), || {
            let (code, body) = crate::servers::http_get(healthz, "/healthz")?;
            if code != 200 {
                bail!("kubelet healthz answered {code}: {body}");
            }
            if node_ready(&admin, &name)? {
                Ok(())
            } else {
                bail!("Node {name} is not Ready yet")
            }
        })?;
        self.kubelet = Some(kubelet);
        Ok(())
    }

    /// Stops containerd (its shims, and so the pods, keep running) and starts it again.
    pub fn restart_containerd(&mut self) -> Result<()> {
        if let Some(mut containerd) = self.containerd.take() {
            containerd.stop();
        }
        self.spawn_containerd()
    }

    /// Stops the kubelet (the pods keep running) and starts it again.
    pub fn restart_kubelet(&mut self) -> Result<()> {
        if let Some(mut kubelet) = self.kubelet.take() {
            kubelet.stop();
        }
        self.spawn_kubelet()
    }

    /// Stops every pod and component, cleans up and restores the host (what dropping does);
    /// returns what could not be undone.
    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        let Some(host) = self.host.take() else {
            return Ok(());
        };
        // No new pod is bound while the node drains.
        if let Some(mut scheduler) = self.scheduler.take() {
            scheduler.stop();
        }
        let mut problems =
            teardown::drain_pods(&self.admin_kubeconfig, &self.info.name, &self.layout);
        if let Some(mut kubelet) = self.kubelet.take() {
            kubelet.stop();
        }
        if let Some(mut proxy) = self.kube_proxy.take() {
            proxy.stop();
        }
        if let Some(mut router) = self.kube_router.take() {
            router.stop();
        }
        if let Some(mut metrics) = self.metrics_server.take() {
            metrics.stop();
        }
        self.api_forwarder = None;
        self.provisioner = None;
        problems.extend(volumes::delete_all(&self.admin_kubeconfig));
        problems.extend(teardown::remove_containers(&self.layout));
        if let Some(mut containerd) = self.containerd.take() {
            containerd.stop();
        }
        problems.extend(teardown::sweep(&self.layout, BRIDGE));
        problems.extend(teardown::delete_node_objects(
            &self.admin_kubeconfig,
            &self.info.name,
        ));
        if let Err(e) = host.restore() {
            problems.push(format!("{e:#}"));
        }
        if problems.is_empty() {
            eprintln!("[kubelet-node] {} stopped; host restored", self.info.name);
            Ok(())
        } else {
            bail!(
                "stopping the node left problems (kubelet log {}, containerd log {}): {}\nkubelet's last lines:\n{}",
                self.info.kubelet_log.display(),
                self.info.containerd_log.display(),
                problems.join("; "),
                log_tail(&self.info.kubelet_log, 10)
            )
        }
    }
}

impl Drop for KubeletNode {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            eprintln!("[kubelet-node] {e:#}");
        }
    }
}

/// kube-scheduler with the admin identity, serving its health on a free loopback port.
fn start_scheduler(admin: &Path, dir: &Path) -> Result<ManagedProcess> {
    let port = free_port()?;
    let mut cmd = Command::new(node_bin("kube-scheduler")?);
    cmd.arg(format!("--kubeconfig={}", admin.display()))
        .arg(format!("--authentication-kubeconfig={}", admin.display()))
        .arg(format!("--authorization-kubeconfig={}", admin.display()))
        .arg("--bind-address=127.0.0.1")
        .arg(format!("--secure-port={port}"))
        .arg("--leader-elect=false")
        .arg("--v=1");
    let mut scheduler =
        ManagedProcess::spawn("kube-scheduler", cmd, &dir.join("kube-scheduler.log"))?;
    crate::servers::wait_healthy(&mut scheduler, Duration::from_secs(60), || {
        std::net::TcpStream::connect_timeout(
            &format!("127.0.0.1:{port}").parse()?,
            Duration::from_millis(300),
        )?;
        Ok(())
    })?;
    Ok(scheduler)
}

fn not_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u != "0"))
        })
        .unwrap_or(true)
}

struct NodeBins {
    containerd: PathBuf,
    shim: PathBuf,
    ctr: PathBuf,
    kubelet: PathBuf,
    runc: PathBuf,
    cni: PathBuf,
}

impl NodeBins {
    fn find() -> Result<Self> {
        let containerd = node_bin("containerd")?;
        let shim = node_bin("containerd-shim-runc-v2")?;
        let cni = PathBuf::from("/usr/lib/cni");
        for plugin in ["bridge", "host-local", "loopback", "portmap"] {
            if !cni.join(plugin).is_file() {
                bail!(
                    "the real node needs the CNI plugin {} (Debian package containernetworking-plugins)",
                    cni.join(plugin).display()
                );
            }
        }
        Ok(Self {
            containerd,
            shim,
            ctr: node_bin("ctr")?,
            kubelet: node_bin("kubelet")?,
            runc: system_bin("runc", "runc")?,
            cni,
        })
    }
}
