//! The files a real node runs from: containerd's config, the CNI network, the kubelet's config,
//! its kubeconfig and its certificates (signed by the rig's CA).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};

use super::images::PAUSE_IMAGE;
use crate::control_plane::issue_cert;

/// Where a node keeps what it runs from.
pub struct Layout {
    /// The node's folder under the rig's run folder (logs, configs, kubelet and containerd roots).
    pub dir: PathBuf,
    /// containerd's state (sockets, shim bundles, network namespaces): short, under /run, since
    /// a unix socket path has at most 107 bytes.
    pub state: PathBuf,
}

impl Layout {
    pub fn containerd_socket(&self) -> PathBuf {
        self.state.join("containerd.sock")
    }
    pub fn containerd_config(&self) -> PathBuf {
        self.dir.join("containerd.toml")
    }
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dir.join("cni-conf")
    }
    pub fn kubelet_root(&self) -> PathBuf {
        self.dir.join("kubelet")
    }
    pub fn pod_logs(&self) -> PathBuf {
        self.dir.join("pod-logs")
    }
    pub fn pki(&self) -> PathBuf {
        self.dir.join("pki")
    }
}

/// The rig's CA, found beside the certificate the admin kubeconfig names.
pub struct Ca {
    pub crt: PathBuf,
    pub key: PathBuf,
}

impl Ca {
    pub fn from_kubeconfig(kubeconfig: &Path) -> Result<Self> {
        let config = kube::config::Kubeconfig::read_from(kubeconfig)?;
        let crt = config
            .clusters
            .first()
            .and_then(|c| c.cluster.as_ref())
            .and_then(|c| c.certificate_authority.clone())
            .map(PathBuf::from)
            .ok_or_else(|| {
                anyhow!(
                    "kubeconfig {} names no certificate-authority file",
                    kubeconfig.display()
                )
            })?;
        let key = crt.with_extension("key");
        if !key.is_file() {
            anyhow::bail!(
                "the node signs its kubelet's certificates with the rig's CA key, expected at {}",
                key.display()
            );
        }
        Ok(Self { crt, key })
    }
}

pub fn containerd_config(layout: &Layout, runc: &Path, cni_bin: &Path) -> String {
    let q = |p: &Path| format!("'{}'", p.display());
    format!(
        r#"version = 3
root = {root}
state = {state}

[grpc]
  address = {socket}

[plugins.'io.containerd.internal.v1.opt']
  path = {opt}

[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'overlayfs'
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = '{PAUSE_IMAGE}'

[plugins.'io.containerd.cri.v1.runtime']
  # This sandbox refuses a negative oom_score_adj; without this every sandbox fails with
  # "can't get final child's PID from pipe".
  restrict_oom_score_adj = true
  # Network namespaces under the state folder, so clean-up finds them all.
  netns_mounts_under_state_dir = true
  enable_cdi = false
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = 'runc'
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = 'io.containerd.runc.v2'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = {runc}
        Root = {runc_root}
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = [{cni_bin}]
    conf_dir = {cni_conf}

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = '127.0.0.1'
  stream_server_port = '0'
"#,
        root = q(&layout.dir.join("containerd-root")),
        state = q(&layout.state.join("containerd")),
        socket = q(&layout.containerd_socket()),
        runc = q(runc),
        runc_root = q(&layout.state.join("runc")),
        opt = q(&layout.dir.join("containerd-opt")),
        cni_bin = q(cni_bin),
        cni_conf = q(&layout.cni_conf_dir()),
    )
}

/// One bridge network for every pod, addresses from host-local IPAM, the gateway on the bridge.
pub fn cni_conflist(layout: &Layout, bridge: &str, pod_cidr: &str, gateway: &str) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "chat-rig",
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": pod_cidr, "gateway": gateway}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": layout.dir.join("cni-ipam"),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": true}},
        ],
    })
    .to_string()
}

pub struct KubeletSettings<'a> {
    pub node_ip: &'a str,
    pub port: u16,
    pub healthz_port: u16,
    pub cluster_dns: &'a str,
}

pub fn kubelet_config(layout: &Layout, ca: &Ca, s: &KubeletSettings) -> Result<String> {
    let pki = layout.pki();
    let config = serde_json::json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        // This machine has cgroup v1 and no systemd managing cgroups.
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": false,
        "failSwapOn": false,
        "containerRuntimeEndpoint": format!("unix://{}", layout.containerd_socket().display()),
        "address": s.node_ip,
        "port": s.port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": s.healthz_port,
        "tlsCertFile": pki.join("kubelet-serving.crt"),
        "tlsPrivateKeyFile": pki.join("kubelet-serving.key"),
        "authentication": {
            "x509": {"clientCAFile": ca.crt},
            "anonymous": {"enabled": false},
            "webhook": {"enabled": false},
        },
        // Only clients with a certificate of the rig's CA get here (the API server, as admin).
        "authorization": {"mode": "AlwaysAllow"},
        "clusterDomain": "cluster.local",
        "clusterDNS": [s.cluster_dns],
        "podLogsDir": layout.pod_logs(),
        "volumePluginDir": layout.dir.join("volume-plugins"),
        "resolvConf": "/etc/resolv.conf",
        // Imported images cannot be pulled again: never collect them.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "50Mi", "nodefs.available": "2%", "imagefs.available": "2%"},
        "maxPods": 110,
        "serializeImagePulls": false,
        "rotateCertificates": false,
        "serverTLSBootstrap": false,
        "nodeStatusUpdateFrequency": "5s",
        "syncFrequency": "10s",
        "fileCheckFrequency": "10s",
        "shutdownGracePeriod": "0s",
    });
    Ok(serde_json::to_string_pretty(&config)?)
}

/// The kubelet's client certificate (system:node:<name> in system:nodes, as the Node authorizer
/// expects), its serving certificate, and a kubeconfig with the former. Returns the kubeconfig.
pub fn kubelet_identity(
    layout: &Layout,
    ca: &Ca,
    node: &str,
    node_ip: &str,
    server: &str,
) -> Result<PathBuf> {
    let pki = layout.pki();
    std::fs::create_dir_all(&pki)?;
    issue_cert(
        &pki,
        &ca.crt,
        &ca.key,
        "kubelet-client",
        &format!("/O=system:nodes/CN=system:node:{node}"),
        "extendedKeyUsage=clientAuth\n",
    )
    .context("issuing the kubelet's client certificate")?;
    issue_cert(
        &pki,
        &ca.crt,
        &ca.key,
        "kubelet-serving",
        &format!("/CN={node}"),
        &format!("subjectAltName=IP:{node_ip},DNS:{node}\nextendedKeyUsage=serverAuth\n"),
    )
    .context("issuing the kubelet's serving certificate")?;
    let kubeconfig = layout.dir.join("kubelet.kubeconfig");
    let config = serde_json::json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "rig", "cluster": {"server": server, "certificate-authority": ca.crt}}],
        "users": [{"name": format!("system:node:{node}"), "user": {
            "client-certificate": pki.join("kubelet-client.crt"),
            "client-key": pki.join("kubelet-client.key"),
        }}],
        "contexts": [{"name": "rig", "context": {"cluster": "rig", "user": format!("system:node:{node}")}}],
        "current-context": "rig",
    });
    std::fs::write(&kubeconfig, serde_yaml::to_string(&config)?)?;
    Ok(kubeconfig)
}

/// The API server URL the admin kubeconfig names.
pub fn server_url(kubeconfig: &Path) -> Result<String> {
    let config = kube::config::Kubeconfig::read_from(kubeconfig)?;
    config
        .clusters
        .first()
        .and_then(|c| c.cluster.as_ref())
        .and_then(|c| c.server.clone())
        .ok_or_else(|| anyhow!("kubeconfig {} names no server", kubeconfig.display()))
}
