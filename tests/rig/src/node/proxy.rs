//! kube-proxy's and cluster DNS's roles, in user space.
//!
//! Proxy: for every Service with a ClusterIP, the ClusterIP goes on the node's dummy interface and
//! one listener per TCP port forwards each connection to a Ready endpoint of the Service's
//! EndpointSlices (round robin, the next endpoint when one refuses). An endpoint address equal to
//! the node's IP means "on the host", so it is dialled on 127.0.0.1 (this is how a selector-less
//! Service reaches a server the rig runs on loopback). `default/kubernetes` always forwards to the
//! API server the node talks to.
//!
//! DNS: no DNS server; each pod's `/etc/hosts` (bind-mounted by `ip netns exec` from
//! `/etc/netns/<ns>/hosts`) lists every Service as `<svc>.<ns>.svc.cluster.local`, `<svc>.<ns>.svc`,
//! `<svc>.<ns>` (and `<svc>` in the pod's own namespace), headless Services as their Ready pod
//! IPs, and StatefulSet pods as `<hostname>.<svc>.<ns>.svc.cluster.local`. The file is rewritten
//! in place whenever that view changes.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::net::HostNet;

pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Names → addresses, as the hosts files publish them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsView {
    /// (namespace, service name) → addresses (ClusterIP, or Ready pod IPs when headless).
    pub services: BTreeMap<(String, String), Vec<Ipv4Addr>>,
    /// (namespace, service, hostname) → pod IP, for pods with a hostname behind a headless Service.
    pub pod_names: BTreeMap<(String, String, String), Ipv4Addr>,
}

impl DnsView {
    /// The hosts file of one pod.
    pub fn hosts_file(&self, namespace: &str, pod_ip: Ipv4Addr, hostnames: &[String]) -> String {
        let mut out = String::from("# written by the chat-rig node (cluster DNS stand-in)\n");
        out.push_str("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
        out.push_str(&format!("{pod_ip}\t{}\n", hostnames.join(" ")));
        for ((ns, svc), addrs) in &self.services {
            let mut names = vec![
                format!("{svc}.{ns}.svc.{CLUSTER_DOMAIN}"),
                format!("{svc}.{ns}.svc"),
                format!("{svc}.{ns}"),
            ];
            if ns == namespace {
                names.push(svc.clone());
            }
            for a in addrs {
                out.push_str(&format!("{a}\t{}\n", names.join(" ")));
            }
        }
        for ((ns, svc, host), a) in &self.pod_names {
            out.push_str(&format!(
                "{a}\t{host}.{svc}.{ns}.svc.{CLUSTER_DOMAIN} {host}.{svc}.{ns}.svc {host}.{svc}.{ns}\n"
            ));
        }
        out
    }
}

fn ready(ep: &k8s_openapi::api::discovery::v1::Endpoint, publish_not_ready: bool) -> bool {
    publish_not_ready || ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true)
}

fn slices_of<'a>(
    slices: &'a [EndpointSlice],
    ns: &'a str,
    svc: &'a str,
) -> impl Iterator<Item = &'a EndpointSlice> {
    slices.iter().filter(move |s| {
        s.metadata.namespace.as_deref() == Some(ns)
            && s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("kubernetes.io/service-name"))
                .map(String::as_str)
                == Some(svc)
            && s.address_type == "IPv4"
    })
}

/// The DNS view of these Services and EndpointSlices.
pub fn dns_view(services: &[Service], slices: &[EndpointSlice]) -> DnsView {
    let mut view = DnsView::default();
    for s in services {
        let (Some(ns), Some(name), Some(spec)) = (&s.metadata.namespace, &s.metadata.name, &s.spec)
        else {
            continue;
        };
        let publish = spec.publish_not_ready_addresses.unwrap_or(false);
        match spec.cluster_ip.as_deref() {
            Some("None") => {
                let mut addrs = Vec::new();
                for slice in slices_of(slices, ns, name) {
                    for ep in &slice.endpoints {
                        if !ready(ep, publish) {
                            continue;
                        }
                        for a in &ep.addresses {
                            if let Ok(ip) = a.parse::<Ipv4Addr>() {
                                addrs.push(ip);
                                if let Some(h) = &ep.hostname {
                                    view.pod_names
                                        .insert((ns.clone(), name.clone(), h.clone()), ip);
                                }
                            }
                        }
                    }
                }
                addrs.sort();
                addrs.dedup();
                view.services.insert((ns.clone(), name.clone()), addrs);
            }
            Some(ip) => {
                if let Ok(ip) = ip.parse::<Ipv4Addr>() {
                    view.services.insert((ns.clone(), name.clone()), vec![ip]);
                }
            }
            None => {}
        }
    }
    view
}

struct Listener {
    backends: Arc<RwLock<Vec<SocketAddr>>>,
    task: JoinHandle<()>,
}

/// The node's Service proxy.
pub struct ServiceProxy {
    net: Arc<HostNet>,
    api_server: SocketAddr,
    listeners: HashMap<SocketAddr, Listener>,
}

impl ServiceProxy {
    pub fn new(net: Arc<HostNet>, api_server: SocketAddr) -> Self {
        Self {
            net,
            api_server,
            listeners: HashMap::new(),
        }
    }

    /// Brings listeners and backends in line with the Services and EndpointSlices.
    pub async fn sync(&mut self, services: &[Service], slices: &[EndpointSlice]) {
        let mut wanted: HashMap<SocketAddr, Vec<SocketAddr>> = HashMap::new();
        for s in services {
            let (Some(ns), Some(name), Some(spec)) =
                (&s.metadata.namespace, &s.metadata.name, &s.spec)
            else {
                continue;
            };
            let Some(cluster_ip) = spec
                .cluster_ip
                .as_deref()
                .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            for port in spec.ports.iter().flatten() {
                if port.protocol.as_deref().unwrap_or("TCP") != "TCP" {
                    continue;
                }
                let Ok(p) = u16::try_from(port.port) else {
                    continue;
                };
                let front = SocketAddr::from((cluster_ip, p));
                let mut backends = Vec::new();
                if ns == "default" && name == "kubernetes" {
                    backends.push(self.api_server);
                } else {
                    for slice in slices_of(slices, ns, name) {
                        let Some(ep_port) = slice
                            .ports
                            .iter()
                            .flatten()
                            .find(|sp| sp.name == port.name)
                            .and_then(|sp| sp.port)
                            .and_then(|p| u16::try_from(p).ok())
                        else {
                            continue;
                        };
                        for ep in &slice.endpoints {
                            if !ready(ep, false) {
                                continue;
                            }
                            for a in &ep.addresses {
                                if let Ok(mut ip) = a.parse::<Ipv4Addr>() {
                                    // The node's own IP is the host: its servers may be on loopback.
                                    if ip == self.net.gateway {
                                        ip = Ipv4Addr::LOCALHOST;
                                    }
                                    backends.push(SocketAddr::from((ip, ep_port)));
                                }
                            }
                        }
                    }
                }
                backends.sort();
                backends.dedup();
                wanted.insert(front, backends);
            }
        }
        // Gone Services: stop listening, release their ClusterIPs.
        let gone: Vec<SocketAddr> = self
            .listeners
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for front in gone {
            if let Some(l) = self.listeners.remove(&front) {
                l.task.abort();
            }
            if !self.listeners.keys().any(|k| k.ip() == front.ip())
                && let std::net::IpAddr::V4(ip) = front.ip()
            {
                self.net.remove_service_ip(ip);
            }
        }
        for (front, backends) in wanted {
            if let Some(l) = self.listeners.get(&front) {
                let mut b = l.backends.write().unwrap_or_else(|p| p.into_inner());
                if *b != backends {
                    *b = backends;
                }
                continue;
            }
            let std::net::IpAddr::V4(ip) = front.ip() else {
                continue;
            };
            if let Err(e) = self.net.add_service_ip(ip) {
                eprintln!("[node] proxy: {e:#}");
                continue;
            }
            let listener = match TcpListener::bind(front).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("[node] proxy: cannot listen on {front}: {e}");
                    continue;
                }
            };
            let shared = Arc::new(RwLock::new(backends));
            let task = tokio::spawn(serve(listener, shared.clone()));
            self.listeners.insert(
                front,
                Listener {
                    backends: shared,
                    task,
                },
            );
        }
    }

    /// Stops every listener and releases every ClusterIP.
    pub fn shutdown(&mut self) {
        for (front, l) in self.listeners.drain() {
            l.task.abort();
            if let std::net::IpAddr::V4(ip) = front.ip() {
                self.net.remove_service_ip(ip);
            }
        }
    }
}

async fn serve(listener: TcpListener, backends: Arc<RwLock<Vec<SocketAddr>>>) {
    let next = Arc::new(AtomicUsize::new(0));
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let backends = backends.clone();
        let next = next.clone();
        tokio::spawn(async move {
            let list = backends.read().unwrap_or_else(|p| p.into_inner()).clone();
            if list.is_empty() {
                return; // Closed at once, like a Service without endpoints.
            }
            let start = next.fetch_add(1, Ordering::Relaxed);
            for i in 0..list.len() {
                let target = list[(start + i) % list.len()];
                let Ok(Ok(mut outbound)) =
                    tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(target)).await
                else {
                    continue;
                };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                return;
            }
        });
    }
}
