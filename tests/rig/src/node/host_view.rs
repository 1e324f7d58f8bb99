//! The host as it was before a container's own mounts: what keeps the host paths a container
//! needs reachable when one of its volume mounts covers them.
//!
//! A container here is a host process in a private mount namespace whose pod volumes are bind
//! mounted over host paths. A mount over `/tmp` (the emptyDir most pods have there) hides
//! everything the host keeps under `/tmp`, and when the workspace lives there (a clone under
//! `/tmp`), that is the node's folder with every other volume's source, the node's shims and the
//! program itself. So the start script first binds the host's root at the node's *view* folder,
//! outside any mount target, and every later reference to a host path goes through that view:
//! mount sources always, the program, the shims folder and the image's path settings when a mount
//! covers them. The order of the mounts can then never hide what the container needs.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// Shell lines that bind the host's root at `view`, privately, so the container's mounts that
/// follow do not show through it.
pub fn bind_lines(view: &Path) -> String {
    let view = quote(view);
    format!("mount --rbind / {view}\nmount --make-rprivate {view}\n")
}

/// Fails when a mount target would cover the view itself (a pod mounting over the node's
/// registry folder): then nothing could be reached through it.
pub fn check(view: &Path, targets: &[PathBuf]) -> Result<()> {
    let view = real(view);
    if let Some(target) = targets.iter().find(|t| view.starts_with(real(t))) {
        bail!(
            "volume mount {} would cover the node's host view {}; mount it elsewhere",
            target.display(),
            view.display()
        );
    }
    Ok(())
}

/// `path` as the container's start script can reach it: through the view.
pub fn through_view(view: &Path, path: &Path) -> PathBuf {
    let real = real(path);
    view.join(real.strip_prefix("/").unwrap_or(&real))
}

/// `path` unchanged when no mount target covers it, else through the view: a program keeps its
/// usual path in `ps` and logs unless a mount hides it.
pub fn reachable(view: &Path, targets: &[PathBuf], path: &Path) -> PathBuf {
    if !path.is_absolute() {
        return path.to_path_buf();
    }
    let real = real(path);
    if targets.iter().any(|t| real.starts_with(self::real(t))) {
        through_view(view, path)
    } else {
        path.to_path_buf()
    }
}

/// A `PATH`-like list with each entry made [`reachable`].
pub fn reachable_list(view: &Path, targets: &[PathBuf], list: &str) -> String {
    list.split(':')
        .map(|entry| {
            reachable(view, targets, Path::new(entry))
                .display()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join(":")
}

/// The path with symbolic links and `..` resolved as far as it exists (a mount follows them).
fn real(path: &Path) -> PathBuf {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name.to_owned());
                existing = parent.to_path_buf();
            }
            _ => return path.to_path_buf(),
        }
    }
    let mut out = existing.canonicalize().unwrap_or(existing);
    for name in rest.iter().rev() {
        out.push(name);
    }
    out
}

fn quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_covered_paths_go_through_the_view() {
        let view = Path::new("/run/chatop-node/abcde.host");
        let targets = [PathBuf::from("/tmp"), PathBuf::from("/etc/chat-service")];
        assert_eq!(
            reachable(
                view,
                &targets,
                Path::new("/tmp/clone/target/debug/chat-service")
            ),
            view.join("tmp/clone/target/debug/chat-service")
        );
        assert_eq!(
            reachable(view, &targets, Path::new("/usr/bin/redis-server")),
            Path::new("/usr/bin/redis-server")
        );
        assert_eq!(
            reachable(view, &targets, Path::new("redis-server")),
            Path::new("redis-server")
        );
        assert_eq!(
            reachable_list(view, &targets, "/tmp/node/bin:/usr/bin"),
            format!("{}:/usr/bin", view.join("tmp/node/bin").display())
        );
    }

    #[test]
    fn a_mount_over_the_view_is_refused() {
        let view = Path::new("/run/chatop-node/abcde.host");
        assert!(check(view, &[PathBuf::from("/tmp")]).is_ok());
        assert!(check(view, &[PathBuf::from("/run")]).is_err());
    }
}
