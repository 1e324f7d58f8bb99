//! Host networking of the node: one Linux bridge carrying the pod CIDR (its first address is the
//! node's IP and every pod's default gateway), one network namespace + veth pair per pod, and a
//! dummy interface holding the Service ClusterIPs the proxy listens on (the bridge holds them
//! when the kernel has no `dummy` module).
//!
//! Every name carries the node's run id, so several runs never collide and what a dead run left
//! behind is found and removed at the next start ([`prune_stale`]):
//! bridge `cb-<run>`, dummy `cd-<run>`, pod namespaces `chatop-<run>-<n>`, host veth ends
//! `cv<run><n>` (interface names stop at 15 characters), hosts files `/etc/netns/chatop-<run>-<n>`.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};

/// An IPv4 prefix such as `10.244.0.0/16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Self> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, p.parse::<u8>().context("prefix length")?),
            None => (text, 32),
        };
        let addr: Ipv4Addr = addr
            .parse()
            .with_context(|| format!("{text:?} is not an IPv4 CIDR"))?;
        if prefix > 32 {
            bail!("{text:?}: prefix longer than 32");
        }
        Ok(Self { addr, prefix })
    }
    fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        }
    }
    pub fn network(&self) -> u32 {
        u32::from(self.addr) & self.mask()
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == self.network()
    }
    pub fn overlaps(&self, other: &Cidr) -> bool {
        let shorter = self.prefix.min(other.prefix);
        let m = if shorter == 0 {
            0
        } else {
            u32::MAX << (32 - shorter)
        };
        u32::from(self.addr) & m == u32::from(other.addr) & m
    }
    pub fn size(&self) -> u32 {
        if self.prefix == 0 {
            u32::MAX
        } else {
            1u32 << (32 - self.prefix)
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.network()), self.prefix)
    }
}

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
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

fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip").args(args).output();
}

fn ip_output(args: &[&str]) -> String {
    Command::new("ip")
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Folder of the live runs' pid files (one `<run>.pid` each), and of their created mount points.
pub fn registry_dir() -> PathBuf {
    std::env::var_os("CHATOP_NODE_REGISTRY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/chatop-node"))
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The run ids whose owner is alive.
fn live_runs() -> BTreeSet<String> {
    let mut live = BTreeSet::new();
    if let Ok(entries) = std::fs::read_dir(registry_dir()) {
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_some_and(|x| x == "pid")
                && let Some(run) = path.file_stem().and_then(|s| s.to_str())
                && std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|t| t.trim().parse::<u32>().ok())
                    .is_some_and(pid_alive)
            {
                live.insert(run.to_string());
            }
        }
    }
    live
}

/// Removes the namespaces, links, hosts files and mount points of runs whose process is gone.
/// Returns what it removed, for the log.
pub fn prune_stale() -> Vec<String> {
    let live = live_runs();
    let mut removed = Vec::new();
    let run_of_ns = |ns: &str| -> Option<String> {
        let rest = ns.strip_prefix("chatop-")?;
        let (run, n) = rest.split_once('-')?;
        n.parse::<u32>().ok().map(|_| run.to_string())
    };
    let mut dead: BTreeSet<String> = BTreeSet::new();
    for line in ip_output(&["netns", "list"]).lines() {
        let ns = line.split_whitespace().next().unwrap_or_default();
        if let Some(run) = run_of_ns(ns)
            && !live.contains(&run)
        {
            ip_quiet(&["netns", "delete", ns]);
            removed.push(format!("netns {ns}"));
            dead.insert(run);
        }
    }
    if let Ok(entries) = std::fs::read_dir("/etc/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(run) = run_of_ns(&name)
                && !live.contains(&run)
            {
                let _ = std::fs::remove_dir_all(e.path());
                dead.insert(run);
            }
        }
    }
    for line in ip_output(&["-o", "link", "show"]).lines() {
        // "12: cb-abcde: <...>" or "13: cvabcde1@if2: <...>"
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or(name);
        let run = if let Some(r) = name
            .strip_prefix("cb-")
            .or_else(|| name.strip_prefix("cd-"))
        {
            Some(r.to_string())
        } else {
            name.strip_prefix("cv")
                .filter(|r| r.len() > RUN_ID_LEN)
                .map(|r| r[..RUN_ID_LEN].to_string())
        };
        if let Some(run) = run
            && run.len() == RUN_ID_LEN
            && !live.contains(&run)
        {
            ip_quiet(&["link", "delete", name]);
            removed.push(format!("link {name}"));
            dead.insert(run);
        }
    }
    // Registry entries of dead runs: their created mount points go too.
    if let Ok(entries) = std::fs::read_dir(registry_dir()) {
        for e in entries.flatten() {
            let path = e.path();
            let Some(run) = path
                .file_stem()
                .and_then(|s| s.to_str())
                .map(str::to_string)
            else {
                continue;
            };
            if live.contains(&run) {
                continue;
            }
            if path.extension().is_some_and(|x| x == "dirs") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let mut dirs: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
                // Deepest first.
                dirs.sort_by_key(|d| std::cmp::Reverse(d.len()));
                for d in dirs {
                    if std::fs::remove_dir(d).is_ok() || std::fs::remove_file(d).is_ok() {
                        removed.push(format!("mount point {d}"));
                    }
                }
            }
            if path.is_dir() {
                // A dead run's host view (see `host_view`): empty on the host.
                let _ = std::fs::remove_dir(&path);
            } else {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    removed
}

pub const RUN_ID_LEN: usize = 5;

/// Fails when `cidr` overlaps a route of the host that is not the node's own.
pub fn check_routes(what: &str, cidr: &Cidr) -> Result<()> {
    for line in ip_output(&["-4", "route", "show", "table", "all"]).lines() {
        let mut words = line.split_whitespace();
        let mut dest = words.next().unwrap_or_default();
        if matches!(dest, "local" | "broadcast" | "unicast" | "multicast") {
            dest = words.next().unwrap_or_default();
        }
        if dest == "default" || dest.is_empty() || line.contains("dev lo ") {
            continue;
        }
        let Ok(route) = Cidr::parse(dest) else {
            continue;
        };
        if route.overlaps(cidr) {
            bail!(
                "the node's {what} {cidr} overlaps the host route `{line}`; choose another range (rig node --pod-cidr / NodeOptions) or remove that route"
            );
        }
    }
    Ok(())
}

/// A pod's network: its namespace, IP and host-side veth.
#[derive(Debug, Clone)]
pub struct PodNet {
    pub netns: String,
    pub ip: Ipv4Addr,
    pub index: u32,
}

/// The node's bridge, dummy interface and address pool.
pub struct HostNet {
    pub run: String,
    pub bridge: String,
    pub dummy: String,
    pub cidr: Cidr,
    pub gateway: Ipv4Addr,
    state: Mutex<Pool>,
}

struct Pool {
    next_index: u32,
    used: BTreeSet<u32>,
    service_ips: BTreeSet<Ipv4Addr>,
}

impl HostNet {
    /// Creates the bridge (gateway = first address of `cidr`) and the dummy interface, after
    /// checking neither `cidr` nor `service_cidr` collides with a host route.
    pub fn setup(run: &str, cidr: Cidr, service_cidr: Cidr) -> Result<Self> {
        check_routes("pod CIDR", &cidr)?;
        check_routes("service CIDR", &service_cidr)?;
        if cidr.overlaps(&service_cidr) {
            bail!("the pod CIDR {cidr} overlaps the service CIDR {service_cidr}");
        }
        let gateway = Ipv4Addr::from(cidr.network() + 1);
        let net = Self {
            run: run.to_string(),
            bridge: format!("cb-{run}"),
            dummy: format!("cd-{run}"),
            cidr,
            gateway,
            state: Mutex::new(Pool {
                next_index: 1,
                used: BTreeSet::new(),
                service_ips: BTreeSet::new(),
            }),
        };
        let gw = format!("{gateway}/{}", cidr.prefix);
        let created = (|| {
            ip(&["link", "add", &net.bridge, "type", "bridge"])?;
            ip(&["addr", "add", &gw, "dev", &net.bridge])?;
            ip(&["link", "set", &net.bridge, "up"])?;
            // A dummy interface when the kernel has the module; else the bridge holds them too.
            if ip(&["link", "add", &net.dummy, "type", "dummy"]).is_ok() {
                ip(&["link", "set", &net.dummy, "up"])?;
                anyhow::Ok(net.dummy.clone())
            } else {
                anyhow::Ok(net.bridge.clone())
            }
        })();
        match created {
            Ok(holder) => Ok(Self {
                dummy: holder,
                ..net
            }),
            Err(e) => {
                net.teardown();
                Err(e)
            }
        }
    }

    /// A new namespace with a veth on the bridge, an address from the pool and a default route.
    pub fn add_pod(&self) -> Result<PodNet> {
        let (index, ip_addr) = {
            let mut pool = self.state.lock().unwrap_or_else(|p| p.into_inner());
            // Offsets 0 (network) and 1 (gateway) and the broadcast address are never pods'.
            let mut offset = 2;
            while pool.used.contains(&offset) {
                offset += 1;
            }
            if offset >= self.cidr.size() - 1 {
                bail!("the pod CIDR {} has no free address", self.cidr);
            }
            pool.used.insert(offset);
            let index = pool.next_index;
            pool.next_index += 1;
            (index, Ipv4Addr::from(self.cidr.network() + offset))
        };
        let netns = format!("chatop-{}-{index}", self.run);
        let host_veth = format!("cv{}{index}", self.run);
        let pod = PodNet {
            netns: netns.clone(),
            ip: ip_addr,
            index,
        };
        let addr = format!("{ip_addr}/{}", self.cidr.prefix);
        let gw = self.gateway.to_string();
        let result = (|| -> Result<()> {
            ip(&["netns", "add", &netns])?;
            ip(&[
                "link", "add", &host_veth, "type", "veth", "peer", "name", "eth0", "netns", &netns,
            ])?;
            ip(&["link", "set", &host_veth, "master", &self.bridge, "up"])?;
            ip(&["-n", &netns, "link", "set", "lo", "up"])?;
            ip(&["-n", &netns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &netns, "route", "add", "default", "via", &gw])?;
            Ok(())
        })();
        if let Err(e) = result {
            self.remove_pod(&pod);
            return Err(e.context(format!("creating the network of pod namespace {netns}")));
        }
        Ok(pod)
    }

    /// Deletes the pod's namespace (its veth pair goes with it) and frees its address.
    pub fn remove_pod(&self, pod: &PodNet) {
        ip_quiet(&["netns", "delete", &pod.netns]);
        ip_quiet(&["link", "delete", &format!("cv{}{}", self.run, pod.index)]);
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&pod.netns));
        let offset = u32::from(pod.ip) - self.cidr.network();
        let mut pool = self.state.lock().unwrap_or_else(|p| p.into_inner());
        pool.used.remove(&offset);
    }

    /// Puts a ClusterIP on the dummy interface so the proxy can listen on it.
    pub fn add_service_ip(&self, addr: Ipv4Addr) -> Result<()> {
        let mut pool = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if pool.service_ips.insert(addr) {
            ip(&["addr", "add", &format!("{addr}/32"), "dev", &self.dummy])?;
        }
        Ok(())
    }

    pub fn remove_service_ip(&self, addr: Ipv4Addr) {
        let mut pool = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if pool.service_ips.remove(&addr) {
            ip_quiet(&["addr", "delete", &format!("{addr}/32"), "dev", &self.dummy]);
        }
    }

    /// Removes the bridge and the dummy interface (with every ClusterIP).
    pub fn teardown(&self) {
        if self.dummy != self.bridge {
            ip_quiet(&["link", "delete", &self.dummy]);
        }
        ip_quiet(&["link", "delete", &self.bridge]);
    }

    /// The pod namespaces of this run that still exist (for the leak check in tests).
    pub fn live_namespaces(run: &str) -> Vec<String> {
        let prefix = format!("chatop-{run}-");
        ip_output(&["netns", "list"])
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&prefix))
            .map(str::to_string)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_overlap_and_contain() {
        let pods = Cidr::parse("10.244.0.0/16").unwrap();
        assert!(pods.contains("10.244.3.4".parse().unwrap()));
        assert!(!pods.contains("10.245.0.1".parse().unwrap()));
        assert!(pods.overlaps(&Cidr::parse("10.0.0.0/8").unwrap()));
        assert!(!pods.overlaps(&Cidr::parse("10.0.0.0/24").unwrap()));
        assert!(!pods.overlaps(&Cidr::parse("192.0.2.0/24").unwrap()));
        assert_eq!(pods.to_string(), "10.244.0.0/16");
    }
}
