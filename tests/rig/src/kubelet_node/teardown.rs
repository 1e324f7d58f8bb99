//! Undoing a real node: its pods, containers, shims, mounts, network namespaces, veths, bridge,
//! cgroups and API objects; and [`leftovers`], which lists whatever of that still exists.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node as NodeObject, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};

use super::config::Layout;
use super::{BRIDGE, STATE_DIR, block_on, node_bin};

/// Cordons the node and deletes its pods, then waits (up to 60 s) until containerd runs no task:
/// the kubelet stops each sandbox, and the CNI plugin removes its veth and address.
pub fn drain_pods(admin: &Path, node: &str, layout: &Layout) -> Vec<String> {
    let (admin, name) = (admin.to_path_buf(), node.to_string());
    let deleted = block_on(async move {
        let client = crate::client_from_kubeconfig(&admin, None).await?;
        let nodes = Api::<NodeObject>::all(client.clone());
        let cordon = serde_json::json!({"spec": {"unschedulable": true}});
        let _ = nodes
            .patch(&name, &PatchParams::default(), &Patch::Merge(&cordon))
            .await;
        let pods = Api::<Pod>::all(client.clone())
            .list(&ListParams::default().fields(&format!("spec.nodeName={name}")))
            .await?;
        for pod in pods.items {
            let (Some(ns), Some(pod_name)) = (pod.metadata.namespace, pod.metadata.name) else {
                continue;
            };
            let dp = DeleteParams {
                grace_period_seconds: Some(1),
                ..Default::default()
            };
            let _ = Api::<Pod>::namespaced(client.clone(), &ns)
                .delete(&pod_name, &dp)
                .await;
        }
        anyhow::Ok(())
    });
    let mut problems = Vec::new();
    if let Err(e) = deleted {
        problems.push(format!("deleting the node's pods: {e:#}"));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let running = running_tasks(layout);
        if running.is_empty() && netns_files(layout).is_empty() {
            break;
        }
        if Instant::now() > deadline {
            problems.push(format!(
                "pods still running 60 s after deletion: {}",
                running.join(", ")
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    problems
}

fn ctr(layout: &Layout, args: &[&str]) -> Option<String> {
    let ctr = node_bin("ctr").ok()?;
    let out = Command::new(ctr)
        .arg("--address")
        .arg(layout.containerd_socket())
        .args(["-n", "k8s.io"])
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn running_tasks(layout: &Layout) -> Vec<String> {
    ctr(layout, &["tasks", "ls"])
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter(|l| l.contains("RUNNING"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

fn netns_files(layout: &Layout) -> Vec<PathBuf> {
    std::fs::read_dir(layout.state.join("containerd/netns"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Kills and deletes every container containerd still has (the kubelet is stopped by now).
pub fn remove_containers(layout: &Layout) -> Vec<String> {
    let Some(list) = ctr(layout, &["containers", "ls", "-q"]) else {
        return Vec::new();
    };
    for id in list.lines().filter(|l| !l.is_empty()) {
        let _ = ctr(layout, &["tasks", "kill", "-s", "SIGKILL", id]);
        let _ = ctr(layout, &["tasks", "delete", "-f", id]);
        let _ = ctr(layout, &["containers", "delete", id]);
    }
    Vec::new()
}

/// Processes whose command line names this node's containerd socket or state folder (its shims).
fn node_processes() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(STATE_DIR) && pid != std::process::id() {
            out.push((pid, cmdline.trim().to_string()));
        }
    }
    out
}

/// Mount points under the node's folders, deepest first.
fn node_mounts(layout: &Layout) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let dir = layout.dir.display().to_string();
    let mut mounts: Vec<String> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&dir) || m.starts_with(STATE_DIR))
        .map(str::to_string)
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    mounts.dedup();
    mounts
}

/// Veths whose master is the node's bridge.
fn bridge_ports() -> Vec<String> {
    std::fs::read_dir(format!("/sys/class/net/{BRIDGE}/brif"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// cgroup folders the kubelet made (kubepods), in every v1 hierarchy.
fn kubelet_cgroups() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return out;
    };
    for h in hierarchies.flatten() {
        for name in ["kubepods", "kubepods.slice"] {
            let path = h.path().join(name);
            if path.is_dir() {
                out.push(path);
            }
        }
    }
    out
}

fn remove_cgroup_tree(dir: &Path) -> std::io::Result<()> {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path())?;
            }
        }
    }
    std::fs::remove_dir(dir)
}

/// After containerd stopped: kills left shims, unmounts, removes network namespaces, veths, the
/// bridge, cgroups, the state folder and /var/log/containers links of the node's pods.
pub fn sweep(layout: &Layout, bridge: &str) -> Vec<String> {
    let mut problems = Vec::new();
    for (pid, cmdline) in node_processes() {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        eprintln!("[kubelet-node] killed left-over process {pid}: {cmdline}");
    }
    for mount in node_mounts(layout) {
        let ok = Command::new("umount")
            .arg(&mount)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").args(["-l", &mount]).status();
        }
    }
    for port in bridge_ports() {
        let _ = Command::new("ip").args(["link", "del", &port]).status();
    }
    if Path::new("/sys/class/net").join(bridge).exists()
        && !Command::new("ip")
            .args(["link", "del", bridge])
            .status()
            .is_ok_and(|s| s.success())
    {
        problems.push(format!("could not delete the bridge {bridge}"));
    }
    for cgroup in kubelet_cgroups() {
        if let Err(e) = remove_cgroup_tree(&cgroup) {
            problems.push(format!("removing cgroup {}: {e}", cgroup.display()));
        }
    }
    // Links the kubelet made for its pods' logs point into the node's folder.
    if let Ok(entries) = std::fs::read_dir("/var/log/containers") {
        for e in entries.flatten() {
            if std::fs::read_link(e.path()).is_ok_and(|t| t.starts_with(&layout.dir)) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir("/var/log/containers");
    }
    if let Err(e) = std::fs::remove_dir_all(STATE_DIR)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        problems.push(format!("removing {STATE_DIR}: {e}"));
    }
    // The node's folder stays for its logs; its containerd root (image layers) is large.
    let _ = std::fs::remove_dir_all(layout.dir.join("containerd-root"));
    problems
}

/// Deletes the Node and its Lease, as `kubectl delete node` would.
pub fn delete_node_objects(admin: &Path, node: &str) -> Vec<String> {
    let (admin, name) = (admin.to_path_buf(), node.to_string());
    match block_on(async move {
        let client = crate::client_from_kubeconfig(&admin, None).await?;
        let _ = Api::<Lease>::namespaced(client.clone(), "kube-node-lease")
            .delete(&name, &DeleteParams::default())
            .await;
        let _ = Api::<NodeObject>::all(client)
            .delete(&name, &DeleteParams::default())
            .await;
        anyhow::Ok(())
    }) {
        Ok(()) => Vec::new(),
        Err(e) => vec![format!("deleting the Node object: {e:#}")],
    }
}

/// What a real node left on this host: processes (containerd, shims, kubelet), mounts under
/// its state folder, network namespaces, the bridge and its veths, kubepods cgroups. Empty when
/// the node cleaned up (the sysctls and rules are compared by [`super::host::HostSnapshot`]).
pub fn leftovers(node_dir: &Path) -> Vec<String> {
    let layout = Layout {
        dir: node_dir.to_path_buf(),
        state: PathBuf::from(STATE_DIR),
    };
    let mut out = Vec::new();
    let dir = node_dir.display().to_string();
    for (pid, cmdline) in node_processes() {
        out.push(format!("process {pid}: {cmdline}"));
    }
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            if let Ok(cmdline) = std::fs::read(e.path().join("cmdline"))
                && String::from_utf8_lossy(&cmdline).contains(&dir)
            {
                out.push(format!(
                    "process {}: {}",
                    e.file_name().to_string_lossy(),
                    String::from_utf8_lossy(&cmdline).replace('\0', " ")
                ));
            }
        }
    }
    for mount in node_mounts(&layout) {
        out.push(format!("mount {mount}"));
    }
    if Path::new(STATE_DIR).exists() {
        out.push(format!("folder {STATE_DIR}"));
    }
    if Path::new("/sys/class/net").join(BRIDGE).exists() {
        out.push(format!("bridge {BRIDGE}"));
    }
    if let Ok(links) = std::fs::read_dir("/sys/class/net") {
        for l in links.flatten() {
            let name = l.file_name().to_string_lossy().into_owned();
            if name.starts_with("veth") {
                out.push(format!("veth {name}"));
            }
        }
    }
    if let Ok(nss) = std::fs::read_dir("/var/run/netns") {
        for ns in nss.flatten() {
            out.push(format!("network namespace {}", ns.path().display()));
        }
    }
    for cgroup in kubelet_cgroups() {
        out.push(format!("cgroup {}", cgroup.display()));
    }
    out
}
