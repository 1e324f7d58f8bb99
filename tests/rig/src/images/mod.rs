//! Container images for the rig's real node, built with buildah on this machine, which reaches no
//! image registry.
//!
//! - The product images come from the repository's own `chat-service/Dockerfile` and
//!   `operator/Dockerfile`, with two build arguments: `RUNTIME_BASE`, a distroless-like base
//!   assembled from Debian packages ([`base`]), and `BINARY_FROM`, an image holding the binary
//!   built on the host (a debug build, stripped) in place of the Dockerfile's Rust builder stage.
//!   Every other line is the one users build with `docker build`.
//! - Stand-in images ([`stand_ins`]) carry, under exactly the names the operator defaults to, what
//!   this machine has in their place: Debian's redis-server, FerretDB behind a MongoDB front,
//!   the rig's Ollama with its models; and CoreDNS and metrics-server, which run as pods.
//!
//! Each image is written once as an OCI archive under `~/.cache/chat-operator/images/`, named by
//! a hash of everything that goes into it, so a second call with the same inputs costs a few
//! hashes. [`import`] loads archives into a containerd for the kubelet (`ctr images import`).

pub mod base;
pub mod mongo;
pub mod stand_ins;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Version of the image recipes in this module: part of every cache key, so a change here
/// rebuilds the images.
const RECIPE_VERSION: &str = "1";

/// The chat-service image the operator deploys by default (`default_chat_image`).
pub const CHAT_SERVICE_IMAGE: &str = concat!(
    "ghcr.io/chatoperator/chat-service:",
    env!("CARGO_PKG_VERSION")
);
/// The operator image the chart deploys by default (repository + appVersion).
pub const CHAT_OPERATOR_IMAGE: &str = concat!(
    "ghcr.io/chatoperator/chat-operator:",
    env!("CARGO_PKG_VERSION")
);

/// The host binaries the product images carry.
#[derive(Debug, Clone)]
pub struct ProductBinaries {
    pub chat_service: PathBuf,
    pub chat_operator: PathBuf,
}

impl ProductBinaries {
    /// `chat-service` and `chat-operator` in a Cargo profile folder such as `target/debug`.
    pub fn in_dir(dir: &Path) -> Result<Self> {
        Ok(ProductBinaries {
            chat_service: built_binary(dir, "chat-service", "chat-service")?,
            chat_operator: built_binary(dir, "chat-operator", "chat-operator")?,
        })
    }
}

/// `dir/name`, or an error naming the cargo command that builds it.
pub fn built_binary(dir: &Path, name: &str, package: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "the image needs {} but it is missing: run `cargo build -p {package} --bin {name}` (same CARGO_TARGET_DIR)",
            path.display()
        );
    }
    Ok(path)
}

/// The Cargo profile folder this process was built into (`target/debug` for a test binary in
/// `target/debug/deps`), where the workspace's binaries are.
pub fn cargo_profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut dir = exe
        .parent()
        .context("the running executable has no folder")?
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    Ok(dir)
}

/// Image name → OCI archive.
pub type Archives = BTreeMap<String, PathBuf>;

/// Builds (or finds in the cache) the chat-service and chat-operator images from their
/// Dockerfiles; returns [`CHAT_SERVICE_IMAGE`] and [`CHAT_OPERATOR_IMAGE`] → archive.
pub fn product_images(binaries: &ProductBinaries) -> Result<Archives> {
    let base = base::runtime_base()?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut archives = Archives::new();
    for (image, dockerfile, binary, name) in [
        (
            CHAT_SERVICE_IMAGE,
            workspace.join("chat-service/Dockerfile"),
            &binaries.chat_service,
            "chat-service",
        ),
        (
            CHAT_OPERATOR_IMAGE,
            workspace.join("operator/Dockerfile"),
            &binaries.chat_operator,
            "chat-operator",
        ),
    ] {
        let archive = dockerfile_image(&base, image, &dockerfile, binary, name)?;
        archives.insert(image.to_string(), archive);
    }
    Ok(archives)
}

/// Every image the node needs that is not built from a changing binary of the workspace, plus the
/// product images: name → archive.
pub fn all_images(binaries: &ProductBinaries, mongo_standin: &Path) -> Result<Archives> {
    let mut archives = product_images(binaries)?;
    archives.extend(stand_ins::stand_in_images(mongo_standin)?);
    Ok(archives)
}

/// [`all_images`] for the binaries in a Cargo profile folder such as `target/debug`
/// (`chat-service`, `chat-operator` and this crate's `mongo-standin`).
pub fn workspace_images(profile_dir: &Path) -> Result<Archives> {
    let binaries = ProductBinaries::in_dir(profile_dir)?;
    let standin = built_binary(profile_dir, "mongo-standin", "chat-rig")?;
    all_images(&binaries, &standin)
}

/// Loads each archive into the containerd at `address` (namespace `k8s.io`, where the kubelet's
/// CRI looks), and checks that the image is listed under its name afterwards.
pub fn import(ctr: &Path, address: &Path, archives: &Archives) -> Result<()> {
    for (name, archive) in archives {
        let mut cmd = Command::new(ctr);
        cmd.arg("--address")
            .arg(address)
            .args(["-n", "k8s.io", "images", "import", "--local"])
            .arg(archive);
        run(
            &mut cmd,
            &format!("importing {name} from {}", archive.display()),
        )?;
    }
    let mut list = Command::new(ctr);
    list.arg("--address")
        .arg(address)
        .args(["-n", "k8s.io", "images", "list", "-q"]);
    let listed = run(&mut list, "listing containerd's images")?;
    for name in archives.keys() {
        if !listed.lines().any(|l| l.trim() == name) {
            bail!(
                "containerd at {} does not list {name} after importing it; it lists:\n{listed}",
                address.display()
            );
        }
    }
    Ok(())
}

/// Builds `image` from a Dockerfile with the runtime base and the host binary passed in.
fn dockerfile_image(
    base: &str,
    image: &str,
    dockerfile: &Path,
    binary: &Path,
    name: &str,
) -> Result<PathBuf> {
    let dockerfile_text =
        std::fs::read(dockerfile).with_context(|| format!("reading {}", dockerfile.display()))?;
    // The binary as built (stripping happens only on a cache miss).
    let key = cache_key(&[
        RECIPE_VERSION.as_bytes(),
        image.as_bytes(),
        base.as_bytes(),
        &dockerfile_text,
        sha256_file(binary)?.as_bytes(),
    ])?;
    let archive = archive_path(image, &key)?;
    if archive.is_file() {
        return Ok(archive);
    }
    let work = work_dir(name)?;
    let built = build_from_dockerfile(base, image, dockerfile, binary, name, &key, &work, &archive);
    let _ = std::fs::remove_dir_all(&work);
    built?;
    Ok(archive)
}

/// The cache miss of [`dockerfile_image`], in the scratch folder `work`.
#[allow(clippy::too_many_arguments)]
fn build_from_dockerfile(
    base: &str,
    image: &str,
    dockerfile: &Path,
    binary: &Path,
    name: &str,
    key: &str,
    work: &Path,
    archive: &Path,
) -> Result<()> {
    let stripped = work.join(name);
    strip(binary, &stripped)?;
    // The binary as an image of its own (`/out/<name>`, where the builder stage puts it), named for
    // the BINARY_FROM argument.
    let binary_image = format!("localhost/chatop/binary-{name}:{key}");
    let layer = work.join("binary-layer");
    std::fs::create_dir_all(layer.join("out"))?;
    std::fs::rename(&stripped, layer.join("out").join(name))?;
    let container = buildah_from("scratch")?;
    let result = (|| {
        run(
            Command::new("buildah")
                .args(["copy", "-q", &container])
                .arg(layer.join("out"))
                .arg("/out"),
            "copying the binary into its image",
        )?;
        commit(&container, &binary_image)
    })();
    remove_container(&container);
    result?;
    // An empty context: the stages built here copy nothing from it (the builder stage, which
    // copies the workspace, is skipped).
    let context = work.join("context");
    std::fs::create_dir_all(&context)?;
    let built = temporary_tag(name, key);
    let bud = run(
        Command::new("buildah")
            .args([
                "bud",
                "--isolation",
                "chroot",
                "--pull=never",
                "--layers=false",
            ])
            .args(["--build-arg", &format!("RUNTIME_BASE={base}")])
            .args(["--build-arg", &format!("BINARY_FROM={binary_image}")])
            .arg("-f")
            .arg(dockerfile)
            .args(["-t", &built])
            .arg(&context),
        &format!("buildah bud -f {}", dockerfile.display()),
    );
    remove_image(&binary_image);
    bud?;
    let saved = save(&built, image, archive);
    remove_image(&built);
    saved
}

/// A name for an image while it is built here; the archive carries the real name.
fn temporary_tag(name: &str, key: &str) -> String {
    format!("localhost/chatop/build-{name}:{key}-{}", std::process::id())
}

/// `buildah from --pull=never IMAGE`: a working container's name.
fn buildah_from(image: &str) -> Result<String> {
    let out = run(
        Command::new("buildah").args(["from", "--pull=never", image]),
        &format!("buildah from {image}"),
    )?;
    Ok(out.trim().to_string())
}

fn commit(container: &str, image: &str) -> Result<()> {
    run(
        Command::new("buildah").args(["commit", "-q", container, image]),
        &format!("committing {image}"),
    )
    .map(drop)
}

fn remove_container(container: &str) {
    let _ = Command::new("buildah").args(["rm", container]).output();
}

fn remove_image(image: &str) {
    // Forced: `buildah bud` leaves a working container on an image used only by `COPY --from`.
    let _ = Command::new("buildah").args(["rmi", "-f", image]).output();
}

/// Whether buildah's store has `image`.
fn image_exists(image: &str) -> bool {
    Command::new("buildah")
        .args(["inspect", "--type", "image", image])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Writes the store's `built` as an OCI archive at `archive`, under the name `image`; the
/// archive appears only once complete.
fn save(built: &str, image: &str, archive: &Path) -> Result<()> {
    let partial = archive.with_extension(format!("partial-{}", std::process::id()));
    let _ = std::fs::remove_file(&partial);
    run(
        Command::new("buildah").args([
            "push",
            "-q",
            built,
            &format!("oci-archive:{}:{image}", partial.display()),
        ]),
        &format!("saving {image} as an OCI archive"),
    )?;
    std::fs::rename(&partial, archive)
        .with_context(|| format!("moving the archive into {}", archive.display()))?;
    prune_older_archives(image, archive);
    Ok(())
}

/// `~/.cache/chat-operator/images/<image as a file name>-<key>.tar`.
fn archive_path(image: &str, key: &str) -> Result<PathBuf> {
    let dir = crate::paths::cache_dir().join("images");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir.join(format!("{}-{key}.tar", file_stem(image))))
}

fn file_stem(image: &str) -> String {
    image
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// Archives of `image` built from other inputs are out of date: removed to keep the disk free.
fn prune_older_archives(image: &str, keep: &Path) {
    let prefix = format!("{}-", file_stem(image));
    let Some(dir) = keep.parent() else { return };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path != keep && name.starts_with(&prefix) && name.ends_with(".tar") {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A fresh scratch folder for one build, under the image cache.
fn work_dir(name: &str) -> Result<PathBuf> {
    let dir = crate::paths::cache_dir()
        .join("images/work")
        .join(crate::unique_name(name));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// A debug binary without its debug sections (a fraction of the size; still a debug build).
fn strip(from: &Path, to: &Path) -> Result<()> {
    run(
        Command::new("strip").arg("-o").arg(to).arg(from),
        &format!("stripping {}", from.display()),
    )
    .map(drop)
}

/// The hex sha256 of a file (coreutils' `sha256sum`: fast even when this crate is a debug build).
fn sha256_file(path: &Path) -> Result<String> {
    let out = run(
        Command::new("sha256sum").arg(path),
        &format!("hashing {}", path.display()),
    )?;
    out.split_whitespace()
        .next()
        .map(str::to_string)
        .with_context(|| format!("sha256sum printed nothing for {}", path.display()))
}

/// A short hash of the parts (length-prefixed, so parts cannot run into each other).
fn cache_key(parts: &[&[u8]]) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running sha256sum (coreutils)")?;
    let mut stdin = child.stdin.take().context("sha256sum's stdin")?;
    for part in parts {
        stdin.write_all(&(part.len() as u64).to_le_bytes())?;
        stdin.write_all(part)?;
    }
    drop(stdin);
    let out = child.wait_with_output()?;
    let hex: String = String::from_utf8_lossy(&out.stdout)
        .chars()
        .take(16)
        .collect();
    if !out.status.success() || hex.len() != 16 {
        bail!("sha256sum failed ({})", out.status);
    }
    Ok(hex)
}

/// Runs a command to completion; its stdout, or an error with `what`, the command line and the
/// end of its stderr.
fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("{what}: cannot run {cmd:?}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "{what}: {cmd:?} failed ({}):\n{}",
            out.status,
            tail.join("\n")
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
