//! What makes Services work on the real node: kube-proxy (nftables mode) for ClusterIPs, a
//! forwarder that lets pods reach the API server (which listens on loopback only), and CoreDNS
//! as a pod in kube-system serving `cluster.local`; kube-router enforcing NetworkPolicies.
//!
//! The API server advertises [`super::POD_GATEWAY`] as the `kubernetes` Service's endpoint;
//! [`ApiForwarder`] listens there on the API server's port and copies each connection to
//! 127.0.0.1. A kubelet's `KUBE-FIREWALL` drops packets to 127.0.0.0/8 from other sources, so
//! a pod must never be sent to loopback itself.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

use super::config::Layout;
use super::node_bin;
use crate::images::stand_ins::COREDNS_IMAGE;
use crate::process::ManagedProcess;
use crate::servers::free_port;

/// Copies TCP connections from the bridge address to the API server on loopback; stops when
/// dropped.
pub struct ApiForwarder {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiForwarder {
    pub fn start(listen: SocketAddr, upstream: SocketAddr) -> Result<Self> {
        let listener = std::net::TcpListener::bind(listen)
            .with_context(|| format!("API forwarder: binding {listen}"))?;
        listener.set_nonblocking(true)?;
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("api-forwarder".into())
            .spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    loop {
                        tokio::select! {
                            _ = &mut stop_rx => break,
                            accepted = listener.accept() => {
                                let Ok((mut client, _)) = accepted else { continue };
                                tokio::spawn(async move {
                                    if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                                    }
                                });
                            }
                        }
                    }
                });
            })?;
        Ok(Self {
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

impl Drop for ApiForwarder {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// kube-proxy in nftables mode for the node, with the admin identity. It leaves conntrack
/// sysctls alone (`maxPerCore: 0`).
pub fn start_kube_proxy(
    admin: &Path,
    layout: &Layout,
    node: &str,
    pod_cidr: &str,
) -> Result<ManagedProcess> {
    let healthz = free_port()?;
    let metrics = free_port()?;
    let config = serde_json::json!({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "nftables",
        "clientConnection": {"kubeconfig": admin},
        "hostnameOverride": node,
        "clusterCIDR": pod_cidr,
        "healthzBindAddress": format!("127.0.0.1:{healthz}"),
        "metricsBindAddress": format!("127.0.0.1:{metrics}"),
        "conntrack": {"maxPerCore": 0, "min": 0},
        "nodePortAddresses": [format!("{}/32", super::POD_GATEWAY)],
    });
    let path = layout.dir.join("kube-proxy.json");
    std::fs::write(&path, serde_json::to_string_pretty(&config)?)?;
    let mut cmd = Command::new(node_bin("kube-proxy")?);
    cmd.arg(format!("--config={}", path.display())).arg("--v=1");
    let mut proxy = ManagedProcess::spawn("kube-proxy", cmd, &layout.dir.join("kube-proxy.log"))?;
    crate::servers::wait_healthy(&mut proxy, Duration::from_secs(60), || {
        let (code, body) = crate::servers::http_get(healthz, "/healthz")?;
        if code == 200 {
            Ok(())
        } else {
            bail!("kube-proxy healthz answered {code}: {body}")
        }
    })?;
    Ok(proxy)
}

/// kube-router as the NetworkPolicy enforcer only (no routing, no service proxy, no CNI): it
/// turns each NetworkPolicy into iptables rules and ipsets on the host.
pub fn start_kube_router(admin: &Path, layout: &Layout, node: &str) -> Result<ManagedProcess> {
    let health = free_port()?;
    let mut cmd = Command::new(node_bin("kube-router")?);
    cmd.arg(format!("--kubeconfig={}", admin.display()))
        .arg(format!("--hostname-override={node}"))
        .args([
            "--run-firewall=true",
            "--run-router=false",
            "--run-service-proxy=false",
            "--enable-cni=false",
            "--enable-ipv6=false",
            "--iptables-sync-period=10s",
        ])
        .arg(format!("--health-port={health}"))
        .arg("--v=1");
    let mut router =
        ManagedProcess::spawn("kube-router", cmd, &layout.dir.join("kube-router.log"))?;
    crate::servers::wait_healthy(&mut router, Duration::from_secs(60), || {
        let (code, body) = crate::servers::http_get(health, "/healthz")?;
        if code == 200 {
            Ok(())
        } else {
            bail!("kube-router healthz answered {code}: {body}")
        }
    })?;
    Ok(router)
}

/// metrics-server on the node's bridge address (so `kubectl top` and CPU HPAs work), scraping
/// the kubelet with the admin identity, registered as the `v1beta1.metrics.k8s.io` APIService
/// through a Service without selector whose endpoint is that address.
pub fn start_metrics_server(
    admin: &Path,
    layout: &Layout,
    ca_crt: &Path,
    node_ip: &str,
) -> Result<ManagedProcess> {
    let port = free_port()?;
    let certs = layout.dir.join("metrics-server-certs");
    std::fs::create_dir_all(&certs)?;
    let mut cmd = Command::new(node_bin("metrics-server")?);
    cmd.arg(format!("--kubeconfig={}", admin.display()))
        .arg(format!("--authentication-kubeconfig={}", admin.display()))
        .arg(format!("--authorization-kubeconfig={}", admin.display()))
        .arg(format!("--bind-address={node_ip}"))
        .arg(format!("--secure-port={port}"))
        .arg(format!("--cert-dir={}", certs.display()))
        .arg(format!(
            "--kubelet-certificate-authority={}",
            ca_crt.display()
        ))
        .arg("--kubelet-preferred-address-types=InternalIP")
        .arg("--kubelet-use-node-status-port")
        .arg("--metric-resolution=10s")
        .arg("--kubelet-request-timeout=5s")
        .arg("--v=1");
    let mut server = ManagedProcess::spawn(
        "metrics-server",
        cmd,
        &layout.dir.join("metrics-server.log"),
    )?;
    let addr: SocketAddr = format!("{node_ip}:{port}").parse()?;
    crate::servers::wait_healthy(&mut server, Duration::from_secs(60), || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300))?;
        Ok(())
    })?;
    let objects = serde_json::json!([
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "metrics-server", "namespace": "kube-system"},
         "spec": {"ports": [{"name": "https", "port": 443, "targetPort": port}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "metrics-server", "namespace": "kube-system",
            "labels": {"kubernetes.io/service-name": "metrics-server"}},
         "addressType": "IPv4",
         "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
         "endpoints": [{"addresses": [node_ip], "conditions": {"ready": true}}]},
        {"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
         "metadata": {"name": "v1beta1.metrics.k8s.io"},
         "spec": {"group": "metrics.k8s.io", "version": "v1beta1",
            "service": {"name": "metrics-server", "namespace": "kube-system", "port": 443},
            // Its serving certificate is self-signed in its cert dir.
            "insecureSkipTLSVerify": true,
            "groupPriorityMinimum": 100, "versionPriority": 100}},
    ]);
    let yaml = objects
        .as_array()
        .into_iter()
        .flatten()
        .map(|o| serde_yaml::to_string(o).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("---\n");
    let file = layout.dir.join("metrics-server.yaml");
    std::fs::write(&file, yaml)?;
    kubectl(admin, &["apply", "-f", &file.display().to_string()])
        .context("rig step 'metrics-server' failed")?;
    Ok(server)
}

/// Port CoreDNS listens on inside its pod: 53, as in a real cluster, because NetworkPolicies
/// (the operator's among them) allow DNS by the pod's port 53. As user 65532 without
/// NET_BIND_SERVICE it may bind it because the pod sets the safe sysctl
/// `net.ipv4.ip_unprivileged_port_start` to 53.
const COREDNS_PORT: u16 = 53;

fn coredns_manifests(cluster_dns: &str) -> String {
    let corefile = format!(
        ".:{COREDNS_PORT} {{\n    errors\n    health :8080\n    ready :8181\n    kubernetes cluster.local in-addr.arpa ip6.arpa {{\n        pods insecure\n        fallthrough in-addr.arpa ip6.arpa\n    }}\n    cache 30\n    loadbalance\n}}\n"
    );
    let objects = serde_json::json!([
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "coredns", "namespace": "kube-system"}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "system:coredns"},
         "rules": [
            {"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"], "verbs": ["list", "watch"]},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "system:coredns"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
         "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}]},
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": "coredns", "namespace": "kube-system"},
         "data": {"Corefile": corefile}},
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": "coredns", "namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}},
         "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"k8s-app": "kube-dns"}},
            "template": {
                "metadata": {"labels": {"k8s-app": "kube-dns"}},
                "spec": {
                    "serviceAccountName": "coredns",
                    "dnsPolicy": "Default",
                    "priorityClassName": "system-cluster-critical",
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                        "seccompProfile": {"type": "RuntimeDefault"},
                        "sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "53"}]},
                    "containers": [{
                        "name": "coredns", "image": COREDNS_IMAGE, "imagePullPolicy": "Never",
                        "args": ["-conf", "/etc/coredns/Corefile"],
                        "ports": [
                            {"name": "dns", "containerPort": COREDNS_PORT, "protocol": "UDP"},
                            {"name": "dns-tcp", "containerPort": COREDNS_PORT, "protocol": "TCP"},
                        ],
                        "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": true}],
                        "livenessProbe": {"httpGet": {"path": "/health", "port": 8080}, "periodSeconds": 10},
                        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}, "periodSeconds": 2},
                        "resources": {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
                        "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]}},
                    }],
                    "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
                },
            },
         }},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}},
         "spec": {
            "clusterIP": cluster_dns,
            "selector": {"k8s-app": "kube-dns"},
            "ports": [
                {"name": "dns", "port": 53, "targetPort": COREDNS_PORT, "protocol": "UDP"},
                {"name": "dns-tcp", "port": 53, "targetPort": COREDNS_PORT, "protocol": "TCP"},
            ],
         }},
    ]);
    objects
        .as_array()
        .into_iter()
        .flatten()
        .map(|o| serde_yaml::to_string(o).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("---\n")
}

fn kubectl(admin: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(crate::paths::cached_bin("kubectl")?)
        .arg(format!("--kubeconfig={}", admin.display()))
        .args(args)
        .output()
        .context("running kubectl")?;
    if !out.status.success() {
        bail!(
            "kubectl {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Applies CoreDNS and waits (up to 90 s) until its Deployment is available.
pub fn deploy_coredns(admin: &Path, layout: &Layout, cluster_dns: &str) -> Result<()> {
    let file = layout.dir.join("coredns.yaml");
    std::fs::write(&file, coredns_manifests(cluster_dns))?;
    kubectl(admin, &["apply", "-f", &file.display().to_string()])
        .context("rig step 'coredns' failed")?;
    kubectl(
        admin,
        &[
            "-n",
            "kube-system",
            "rollout",
            "status",
            "deployment/coredns",
            "--timeout=90s",
        ],
    )
    .map_err(|e| {
        let pods =
            kubectl(admin, &["-n", "kube-system", "get", "pods", "-o", "wide"]).unwrap_or_default();
        let logs = kubectl(
            admin,
            &[
                "-n",
                "kube-system",
                "logs",
                "deployment/coredns",
                "--tail=20",
            ],
        )
        .unwrap_or_default();
        anyhow!(
            "rig step 'coredns' failed: {e:#}\n{pods}\nits log:\n{logs}\nkubelet log: {}",
            layout.dir.join("kubelet.log").display()
        )
    })?;
    Ok(())
}
