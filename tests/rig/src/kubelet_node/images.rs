//! The node's own images, built offline with buildah (`FROM scratch`) and imported into
//! containerd with `ctr`: no registry is reachable.
//!
//! - [`PAUSE_IMAGE`]: the sandbox image containerd's config names; a static C program that
//!   sleeps until SIGINT/SIGTERM and reaps children (the pause container's whole job).
//! - [`TOOLBOX_IMAGE`]: Debian's static busybox as user 65532, for the node's own tests
//!   (`kubectl exec`, logs, a read-only root file system).
//!
//! CoreDNS runs from the stand-in image [`crate::images::stand_ins::COREDNS_IMAGE`] (one builder
//! for it). Each archive is cached under `~/.cache/chat-operator/images`, keyed by a hash of its inputs.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::paths;

pub const PAUSE_IMAGE: &str = "localhost/chat-rig/pause:1";
pub const TOOLBOX_IMAGE: &str = "localhost/chat-rig/toolbox:1";

const PAUSE_C: &str = r#"#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
static void quit(int s) { (void)s; _exit(0); }
static void reap(int s) { (void)s; while (waitpid(-1, 0, WNOHANG) > 0) {} }
int main(void) {
  signal(SIGINT, quit);
  signal(SIGTERM, quit);
  signal(SIGCHLD, reap);
  for (;;) pause();
}
"#;

fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("{what}: cannot run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({:?}): {}{}",
            cmd,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// One file to put into an image: source on the host, path in the image.
struct ImageFile {
    source: PathBuf,
    target: &'static str,
}

/// Builds `name` from scratch with `files`, `user` and `entrypoint` unless a cached archive with
/// the same inputs exists; returns the OCI archive's path.
fn build_cached(
    name: &str,
    files: &[ImageFile],
    symlinks: &[(String, String)],
    entrypoint: &[&str],
    user: &str,
) -> Result<PathBuf> {
    let mut hasher = DefaultHasher::new();
    (name, symlinks, entrypoint, user).hash(&mut hasher);
    for f in files {
        let meta = std::fs::metadata(&f.source)
            .with_context(|| format!("image {name} needs {}", f.source.display()))?;
        (f.target, meta.len(), meta.modified().ok()).hash(&mut hasher);
    }
    let dir = paths::cache_dir().join("images");
    std::fs::create_dir_all(&dir)?;
    let file_name = name.replace(['/', ':'], "_");
    let archive = dir.join(format!("{file_name}-{:016x}.tar", hasher.finish()));
    if archive.is_file() {
        return Ok(archive);
    }
    let what = format!("building image {name} with buildah");
    let ctr = run(Command::new("buildah").args(["from", "scratch"]), &what)?;
    let result = (|| {
        for f in files {
            run(
                Command::new("buildah")
                    .args(["copy", &ctr])
                    .arg(&f.source)
                    .arg(f.target),
                &what,
            )?;
        }
        if !symlinks.is_empty() {
            let mount = run(Command::new("buildah").args(["mount", &ctr]), &what)?;
            for (link, target) in symlinks {
                let path = Path::new(&mount).join(link.trim_start_matches('/'));
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::os::unix::fs::symlink(target, &path)
                    .with_context(|| format!("{what}: linking {link}"))?;
            }
            run(Command::new("buildah").args(["umount", &ctr]), &what)?;
        }
        let entry = serde_json::to_string(entrypoint)?;
        run(
            Command::new("buildah").args(["config", "--entrypoint", &entry, "--user", user, &ctr]),
            &what,
        )?;
        let tmp = archive.with_extension("tmp");
        run(
            Command::new("buildah").args([
                "commit",
                "-q",
                &ctr,
                &format!("oci-archive:{}:{name}", tmp.display()),
            ]),
            &what,
        )?;
        std::fs::rename(&tmp, &archive)?;
        anyhow::Ok(())
    })();
    let _ = Command::new("buildah").args(["rm", &ctr]).output();
    result?;
    Ok(archive)
}

fn pause_archive(work: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(work)?;
    let source = work.join("pause.c");
    let binary = work.join("pause");
    std::fs::write(&source, PAUSE_C)?;
    run(
        Command::new("gcc")
            .args(["-static", "-O2", "-o"])
            .arg(&binary)
            .arg(&source),
        "compiling the pause program (gcc, static glibc)",
    )?;
    // The binary's mtime changes on every build; hash the source instead by naming it.
    let stable = paths::cache_dir().join("images/pause-src");
    std::fs::create_dir_all(&stable)?;
    let cached_binary = stable.join("pause");
    if std::fs::read(stable.join("pause.c")).ok().as_deref() != Some(PAUSE_C.as_bytes())
        || !cached_binary.is_file()
    {
        std::fs::copy(&binary, &cached_binary)?;
        std::fs::write(stable.join("pause.c"), PAUSE_C)?;
    }
    build_cached(
        PAUSE_IMAGE,
        &[ImageFile {
            source: cached_binary,
            target: "/pause",
        }],
        &[],
        &["/pause"],
        "65535:65535",
    )
}

fn toolbox_archive() -> Result<PathBuf> {
    let busybox = PathBuf::from("/usr/bin/busybox");
    if !busybox.is_file() {
        bail!("the node's toolbox image needs /usr/bin/busybox (Debian package busybox-static)");
    }
    let links: Vec<(String, String)> = [
        "sh", "cat", "echo", "id", "sleep", "touch", "ls", "wget", "nc", "httpd", "nslookup",
        "timeout",
    ]
    .iter()
    .map(|tool| (format!("/bin/{tool}"), "busybox".to_string()))
    .collect();
    build_cached(
        TOOLBOX_IMAGE,
        &[ImageFile {
            source: busybox,
            target: "/bin/busybox",
        }],
        &links,
        &["/bin/sh"],
        "65532:65532",
    )
}

/// Builds (or takes from the cache) the node's images and imports them into the containerd at
/// `address`, in its `k8s.io` namespace.
pub fn import_all(ctr: &Path, address: &Path, work: &Path) -> Result<()> {
    let mut archives = crate::images::stand_ins::coredns_image()?;
    archives.insert(PAUSE_IMAGE.to_string(), pause_archive(work)?);
    archives.insert(TOOLBOX_IMAGE.to_string(), toolbox_archive()?);
    crate::images::import(ctr, address, &archives)
}
