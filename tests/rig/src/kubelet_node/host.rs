//! What a real node changes on the host, recorded before it starts and put back when it stops.
//!
//! A kubelet sets kernel sysctls (`vm.overcommit_memory`, `kernel.panic`, `kernel.panic_on_oops`,
//! ...) and adds iptables/nftables chains (among them `KUBE-FIREWALL`); the bridge CNI plugin turns
//! on IP forwarding; kube-router adds ipsets. [`HostSnapshot::take`] records every writable
//! sysctl, the whole nftables rule set (iptables here is iptables-nft, so its rules are in it),
//! the ipsets and which state folders exist; [`HostSnapshot::restore`] writes back each sysctl
//! that changed, replaces the rule set with the recorded one, destroys new ipsets and removes
//! state folders that did not exist.
//! [`HostSnapshot::differences`] lists what still differs, for the test that checks `rig down`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Sysctls that change on their own, or whose read value is not what a write sets.
const VOLATILE_SYSCTLS: &[&str] = &[
    "kernel/ns_last_pid",
    "kernel/random/",
    "vm/drop_caches",
    "vm/compact_memory",
    "net/ipv4/route/flush",
    "net/ipv6/route/flush",
    "fs/binfmt_misc/",
];

/// Folders a kubelet, containerd or a CNI plugin create wherever they are configured to keep
/// their state (device-plugin sockets, shim sockets, the CNI result cache, ...).
const STATE_FOLDERS: &[&str] = &[
    "/var/lib/kubelet",
    "/var/lib/containerd",
    "/var/lib/cni",
    "/var/log/pods",
    "/var/log/containers",
    "/run/containerd",
    "/opt/containerd",
    "/etc/kubernetes",
    "/var/lib/kube-router",
];

/// The host state a node may change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSnapshot {
    /// Path under /proc/sys → value, for every readable and writable entry.
    pub sysctls: BTreeMap<String, String>,
    /// `nft list ruleset` output.
    pub nftables: String,
    /// `iptables-legacy-save` output, where that tool exists (rules outside nftables).
    pub iptables_legacy: String,
    /// Names of the kernel's ipsets (kube-router keeps NetworkPolicy peers in them).
    pub ipsets: Vec<String>,
    /// Which of [`STATE_FOLDERS`] exist.
    pub folders: BTreeMap<String, bool>,
}

fn collect_sysctls(dir: &Path, root: &Path, out: &mut BTreeMap<String, String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = entry.metadata() else { continue };
        let rel = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .display()
            .to_string();
        if VOLATILE_SYSCTLS.iter().any(|v| rel.starts_with(v)) {
            continue;
        }
        // Per-interface entries come and go with the interfaces (a pod's veth).
        if rel.contains("/conf/") || rel.contains("/neigh/") {
            let iface = rel.split('/').nth(3).unwrap_or("");
            if !matches!(iface, "all" | "default" | "lo" | "eth0") {
                continue;
            }
        }
        if meta.is_dir() {
            collect_sysctls(&path, root, out);
        } else if std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o200 != 0
            && let Ok(value) = std::fs::read_to_string(&path)
        {
            out.insert(rel, value.trim_end().to_string());
        }
    }
}

fn command_output(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ipset_names() -> Vec<String> {
    let mut names: Vec<String> = command_output("ipset", &["list", "-n"])
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    names.sort();
    names
}

fn legacy_rules() -> String {
    command_output("iptables-legacy-save", &[])
        .map(|text| {
            // Its header and footer carry the time of the dump.
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

impl HostSnapshot {
    pub fn take() -> Result<Self> {
        let root = PathBuf::from("/proc/sys");
        let mut sysctls = BTreeMap::new();
        collect_sysctls(&root, &root, &mut sysctls);
        Ok(Self {
            sysctls,
            nftables: command_output("nft", &["list", "ruleset"])
                .context("recording the host's nftables rules (Debian package nftables)")?,
            iptables_legacy: legacy_rules(),
            ipsets: ipset_names(),
            folders: STATE_FOLDERS
                .iter()
                .map(|f| (f.to_string(), Path::new(f).exists()))
                .collect(),
        })
    }

    /// Puts back every recorded sysctl that changed and the recorded rule set. Errors name what
    /// could not be restored; everything else is restored regardless.
    pub fn restore(&self) -> Result<()> {
        let mut failed = Vec::new();
        // Twice: one write can change others (net.ipv4.ip_forward sets every conf.*.forwarding).
        for pass in 0..2 {
            let now = Self::take()?;
            for (key, value) in &self.sysctls {
                if now.sysctls.get(key) != Some(value)
                    && let Err(e) = std::fs::write(Path::new("/proc/sys").join(key), value)
                    && pass == 1
                {
                    failed.push(format!("sysctl {key}={value}: {e}"));
                }
            }
        }
        let now = Self::take()?;
        if now.nftables != self.nftables {
            let saved = std::env::temp_dir().join(format!("chatop-nft-{}.nft", std::process::id()));
            let script = format!("flush ruleset\n{}", self.nftables);
            let result = std::fs::write(&saved, script)
                .context("writing the saved rule set")
                .and_then(|()| command_output("nft", &["-f", &saved.display().to_string()]));
            let _ = std::fs::remove_file(&saved);
            if let Err(e) = result {
                failed.push(format!("nftables: {e:#}"));
            }
        }
        // After the rules, which may reference them.
        for set in ipset_names() {
            if !self.ipsets.contains(&set)
                && let Err(e) = command_output("ipset", &["destroy", &set])
            {
                failed.push(format!("ipset {set}: {e:#}"));
            }
        }
        for (folder, existed) in &self.folders {
            if !existed
                && Path::new(folder).exists()
                && let Err(e) = std::fs::remove_dir_all(folder)
            {
                failed.push(format!("removing {folder}, which the node created: {e}"));
            }
        }
        if !failed.is_empty() {
            bail!("could not restore the host: {}", failed.join("; "));
        }
        Ok(())
    }

    /// What differs between `self` (before) and `after`, one line each.
    pub fn differences(&self, after: &HostSnapshot) -> Vec<String> {
        let mut out = Vec::new();
        for (key, value) in &self.sysctls {
            match after.sysctls.get(key) {
                Some(v) if v == value => {}
                Some(v) => out.push(format!("sysctl {key}: {value} before, {v} after")),
                None => out.push(format!("sysctl {key} vanished")),
            }
        }
        for key in after.sysctls.keys() {
            if !self.sysctls.contains_key(key) {
                out.push(format!("sysctl {key} appeared"));
            }
        }
        if self.nftables != after.nftables {
            out.push(format!(
                "nftables rule set differs:\n--- before\n{}\n--- after\n{}",
                self.nftables, after.nftables
            ));
        }
        if self.ipsets != after.ipsets {
            out.push(format!(
                "ipsets differ: {:?} before, {:?} after",
                self.ipsets, after.ipsets
            ));
        }
        for (folder, existed) in &self.folders {
            if after.folders.get(folder) != Some(existed) {
                out.push(format!(
                    "{folder} {} before, {} after",
                    if *existed { "existed" } else { "absent" },
                    if *existed { "absent" } else { "exists" }
                ));
            }
        }
        if self.iptables_legacy != after.iptables_legacy {
            out.push(format!(
                "legacy iptables differ:\n--- before\n{}\n--- after\n{}",
                self.iptables_legacy, after.iptables_legacy
            ));
        }
        out
    }
}
