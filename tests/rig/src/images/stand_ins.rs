//! Stand-in images, under exactly the names the operator (and the node's manifests) use, for
//! images no registry here serves. Each one is the runtime base plus one layer of what this
//! machine has in their place, laid out where the real image has it, so the pod specs the
//! operator writes run unchanged:
//!
//! | image | what it holds | entrypoint / cmd |
//! |---|---|---|
//! | [`REDIS_IMAGE`] | Debian's redis-server and redis-cli with their libraries; busybox for the `sh -c` the operator's command and probe use | cmd `redis-server` |
//! | [`MONGO_IMAGE`] | FerretDB 1.x (SQLite) behind [`super::mongo`]'s front, which is also `mongod`, `mongosh` and `docker-entrypoint.sh` | `docker-entrypoint.sh mongod` |
//! | [`OLLAMA_IMAGE`] | the rig's Ollama and its model store (gemma3-270m, smollm2:135m); `/bin/ollama` wraps it so that `ollama pull` copies a model from that store (no registry here); busybox for the operator's pull script | `/bin/ollama serve` |
//! | [`COREDNS_IMAGE`] | CoreDNS at `/coredns` | `/coredns` |
//! | [`METRICS_SERVER_IMAGE`] | metrics-server at `/metrics-server` | `/metrics-server` |

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use super::base::{
    BASE_PACKAGES, ImageConfig, User, candidate_versions, extract_packages, finish_root,
    layer_image, library_packages, runtime_base_of,
};
use super::{
    Archives, RECIPE_VERSION, archive_path, cache_key, remove_image, run, save, sha256_file, strip,
    temporary_tag, work_dir,
};

/// The operator's default Redis image (`DEFAULT_REDIS_IMAGE`).
pub const REDIS_IMAGE: &str = "docker.io/library/redis:7.4-alpine";
/// The operator's default MongoDB image (`DEFAULT_MONGODB_IMAGE`).
pub const MONGO_IMAGE: &str = "docker.io/library/mongo:7.0";
/// The operator's default Ollama image (`DEFAULT_OLLAMA_IMAGE`).
pub const OLLAMA_IMAGE: &str = "docker.io/ollama/ollama:0.12.6";
/// CoreDNS, as the node's cluster DNS runs it (version of tests/rig/install.sh).
pub const COREDNS_IMAGE: &str = "registry.k8s.io/coredns/coredns:v1.12.4";
/// metrics-server, as the node runs it (version of tests/rig/install.sh).
pub const METRICS_SERVER_IMAGE: &str = "registry.k8s.io/metrics-server/metrics-server:v0.8.0";

/// The Debian package whose static busybox gives the stand-ins that run shell scripts a shell.
const BUSYBOX_PACKAGE: &str = "busybox-static";

/// Where the ollama stand-in keeps the models `ollama pull` copies from.
pub const OLLAMA_IMAGE_STORE: &str = "/usr/share/ollama/models";

/// The uid the official redis and mongo images' users have (and the operator runs them as).
const STORE_UID: u32 = 999;

/// One stand-in: what goes into its layer.
#[derive(Debug, Default)]
struct Recipe {
    image: &'static str,
    /// Debian packages unpacked into the layer.
    packages: Vec<String>,
    /// busybox (from Debian's busybox-static) in /bin, with a link per applet: sh, grep, sleep...
    busybox: bool,
    /// Host file → path in the image; binaries with debug sections are stripped.
    files: Vec<(PathBuf, &'static str)>,
    /// Symbolic link in the image → its target.
    links: Vec<(&'static str, &'static str)>,
    /// Folder in the image → its owner.
    dirs: Vec<(&'static str, u32)>,
    /// A folder copied whole (hard links where possible): host → path in the image.
    trees: Vec<(PathBuf, &'static str)>,
    /// Executable scripts: path in the image → text.
    scripts: Vec<(&'static str, &'static str)>,
    users: Vec<User>,
    config: ImageConfig,
}

/// Builds (or finds cached) every stand-in; `mongo_standin` is the `mongo-standin` binary of
/// this crate (`CARGO_BIN_EXE_mongo-standin` in its tests, `target/debug/mongo-standin` else).
pub fn stand_in_images(mongo_standin: &Path) -> Result<Archives> {
    let cached = crate::paths::cached_bin;
    let recipes = vec![
        redis()?,
        mongo(cached("ferretdb")?, mongo_standin.to_path_buf()),
        ollama(cached("ollama")?, crate::paths::ollama_models()?)?,
        single_binary(COREDNS_IMAGE, cached("coredns")?, "/coredns"),
        single_binary(
            METRICS_SERVER_IMAGE,
            cached("metrics-server")?,
            "/metrics-server",
        ),
    ];
    // One look-up of every package version (apt-cache reads its whole cache each time).
    let mut packages: Vec<&str> = BASE_PACKAGES.to_vec();
    packages.push(BUSYBOX_PACKAGE);
    for recipe in &recipes {
        packages.extend(recipe.packages.iter().map(String::as_str));
    }
    packages.sort_unstable();
    packages.dedup();
    let versions = candidate_versions(&packages)?;
    let base = runtime_base_of(&versions)?;
    let mut archives = Archives::new();
    for recipe in recipes {
        let archive = build(&recipe, &base, &versions)
            .with_context(|| format!("building {}", recipe.image))?;
        archives.insert(recipe.image.to_string(), archive);
    }
    Ok(archives)
}

/// Only the CoreDNS stand-in ([`COREDNS_IMAGE`]), for the node, which runs it as its cluster DNS
/// before any other stand-in is needed: name → archive.
pub fn coredns_image() -> Result<Archives> {
    let recipe = single_binary(
        COREDNS_IMAGE,
        crate::paths::cached_bin("coredns")?,
        "/coredns",
    );
    let versions = candidate_versions(BASE_PACKAGES)?;
    let base = runtime_base_of(&versions)?;
    let archive =
        build(&recipe, &base, &versions).with_context(|| format!("building {}", recipe.image))?;
    Ok(Archives::from([(recipe.image.to_string(), archive)]))
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = vec![(
        "PATH".to_string(),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
    )];
    env.extend(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

fn redis() -> Result<Recipe> {
    let server = Path::new("/usr/bin/redis-server");
    let cli = Path::new("/usr/bin/redis-cli");
    let server = crate::paths::redis_server().unwrap_or_else(|_| server.to_path_buf());
    let mut packages = vec!["redis-tools".to_string(), "redis-server".to_string()];
    packages.extend(library_packages(&[&server, cli])?);
    Ok(Recipe {
        image: REDIS_IMAGE,
        packages,
        busybox: true,
        dirs: vec![("data", STORE_UID)],
        users: vec![User {
            name: "redis",
            id: STORE_UID,
            home: "/data",
        }],
        config: ImageConfig {
            user: Some(format!("{STORE_UID}:{STORE_UID}")),
            env: env(&[]),
            cmd: vec!["redis-server".into()],
            workdir: Some("/data".into()),
            ports: vec![6379],
            ..Default::default()
        },
        ..Default::default()
    })
}

fn mongo(ferretdb: PathBuf, standin: PathBuf) -> Recipe {
    Recipe {
        image: MONGO_IMAGE,
        files: vec![
            (ferretdb, "usr/local/bin/ferretdb"),
            (standin, "usr/local/bin/mongo-standin"),
        ],
        links: vec![
            ("usr/local/bin/mongod", "mongo-standin"),
            ("usr/local/bin/mongosh", "mongo-standin"),
            ("usr/local/bin/mongo", "mongo-standin"),
            ("usr/local/bin/docker-entrypoint.sh", "mongo-standin"),
        ],
        dirs: vec![("data/db", STORE_UID), ("data/configdb", STORE_UID)],
        users: vec![User {
            name: "mongodb",
            id: STORE_UID,
            home: "/data/db",
        }],
        config: ImageConfig {
            user: Some(format!("{STORE_UID}:{STORE_UID}")),
            env: env(&[]),
            entrypoint: vec!["docker-entrypoint.sh".into()],
            cmd: vec!["mongod".into()],
            ports: vec![27017],
            ..Default::default()
        },
        ..Default::default()
    }
}

/// `/bin/ollama`: the real binary, except `pull`, which copies the model's manifest and blobs
/// from the image's store into `$OLLAMA_MODELS` (what a pull from a registry leaves there).
const OLLAMA_WRAPPER: &str = r#"#!/bin/sh
# The ollama stand-in image: the rig's Ollama; `pull` copies from the models baked into this image,
# since no registry is reachable.
real=/usr/lib/ollama/ollama
store=/usr/share/ollama/models
[ "${1:-}" = pull ] || exec "$real" "$@"
shift
dest=${OLLAMA_MODELS:-${HOME:-/root}/.ollama/models}
for model in "$@"; do
  name=${model%%:*}
  tag=latest
  case $model in *:*) tag=${model#*:} ;; esac
  manifest=manifests/registry.ollama.ai/library/$name/$tag
  if [ ! -f "$store/$manifest" ]; then
    echo "pull $model: not in this image's model store $store (no registry here); it has: $(cd "$store/manifests/registry.ollama.ai/library" && for m in */*; do printf '%s ' "${m%/*}:${m#*/}"; done)" >&2
    exit 1
  fi
  mkdir -p "$dest/blobs" "$dest/${manifest%/*}"
  for digest in $(grep -o 'sha256:[0-9a-f]*' "$store/$manifest"); do
    blob=sha256-${digest#sha256:}
    [ -f "$dest/blobs/$blob" ] || cp "$store/blobs/$blob" "$dest/blobs/$blob.partial"
    [ -f "$dest/blobs/$blob" ] || mv "$dest/blobs/$blob.partial" "$dest/blobs/$blob"
  done
  cp "$store/$manifest" "$dest/$manifest"
  echo "pulled $model from the image's model store"
done
"#;

fn ollama(ollama: PathBuf, models: PathBuf) -> Result<Recipe> {
    Ok(Recipe {
        image: OLLAMA_IMAGE,
        packages: library_packages(&[&ollama])?,
        busybox: true,
        files: vec![(ollama, "usr/lib/ollama/ollama")],
        trees: vec![(models, "usr/share/ollama/models")],
        scripts: vec![("bin/ollama", OLLAMA_WRAPPER)],
        config: ImageConfig {
            env: env(&[("OLLAMA_HOST", "0.0.0.0:11434")]),
            entrypoint: vec!["/bin/ollama".into()],
            cmd: vec!["serve".into()],
            ports: vec![11434],
            ..Default::default()
        },
        ..Default::default()
    })
}

fn single_binary(image: &'static str, binary: PathBuf, at: &'static str) -> Recipe {
    Recipe {
        image,
        files: vec![(binary, &at[1..])],
        config: ImageConfig {
            entrypoint: vec![at.to_string()],
            ..Default::default()
        },
        ..Default::default()
    }
}

/// The archive of a recipe, built when the cache lacks it.
fn build(recipe: &Recipe, base: &str, all_versions: &BTreeMap<String, String>) -> Result<PathBuf> {
    let mut packages: Vec<&str> = recipe.packages.iter().map(String::as_str).collect();
    if recipe.busybox {
        packages.push(BUSYBOX_PACKAGE);
    }
    let versions: BTreeMap<String, String> = packages
        .iter()
        .map(|p| {
            all_versions
                .get(*p)
                .map(|v| (p.to_string(), v.clone()))
                .with_context(|| format!("no version of {p} was looked up"))
        })
        .collect::<Result<_>>()?;
    let work = work_dir(&super::file_stem(recipe.image))?;
    let result = (|| {
        let root = work.join("root");
        std::fs::create_dir_all(&root)?;
        // Inputs are hashed as they are on the host, so that a cached image costs only hashes.
        let mut key_parts: Vec<Vec<u8>> = vec![
            RECIPE_VERSION.into(),
            recipe.image.into(),
            base.into(),
            format!("{versions:?}").into(),
            format!(
                "{:?} {:?} {:?} {:?} {:?}",
                recipe.links, recipe.dirs, recipe.scripts, recipe.users, recipe.config
            )
            .into(),
        ];
        for (host, at) in &recipe.files {
            key_parts.push(format!("{at} {}", sha256_file(host)?).into());
        }
        for (host, at) in &recipe.trees {
            key_parts.push(format!("{at} {}", tree_fingerprint(host)?).into());
        }
        let parts: Vec<&[u8]> = key_parts.iter().map(Vec::as_slice).collect();
        let key = cache_key(&parts)?;
        let archive = archive_path(recipe.image, &key)?;
        if archive.is_file() {
            return Ok(archive);
        }
        extract_packages(&versions, &root)?;
        for (host, at) in &recipe.files {
            let dest = root.join(at);
            std::fs::create_dir_all(dest.parent().context("a file path has a folder")?)?;
            if has_debug_info(host)? {
                strip(host, &dest)?;
            } else {
                std::fs::copy(host, &dest)
                    .with_context(|| format!("copying {}", host.display()))?;
            }
        }
        if recipe.busybox {
            link_busybox(&root)?;
        }
        for (host, at) in &recipe.trees {
            let dest = root.join(at);
            std::fs::create_dir_all(dest.parent().context("a tree path has a folder")?)?;
            run(
                Command::new("cp").arg("-al").arg(host).arg(&dest),
                &format!("copying {}", host.display()),
            )?;
        }
        for (at, text) in &recipe.scripts {
            use std::os::unix::fs::PermissionsExt;
            let dest = root.join(at);
            std::fs::create_dir_all(dest.parent().context("a script path has a folder")?)?;
            std::fs::write(&dest, text)?;
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755))?;
        }
        for (at, target) in &recipe.links {
            let dest = root.join(at);
            std::fs::create_dir_all(dest.parent().context("a link path has a folder")?)?;
            std::os::unix::fs::symlink(target, &dest)?;
        }
        for (at, owner) in &recipe.dirs {
            let dir = root.join(at);
            std::fs::create_dir_all(&dir)?;
            std::os::unix::fs::chown(&dir, Some(*owner), Some(*owner))?;
        }
        finish_root(&root, &recipe.users)?;
        let built = temporary_tag(&super::file_stem(recipe.image), &key);
        layer_image(base, &root, &recipe.config, &built)?;
        let saved = save(&built, recipe.image, &archive);
        remove_image(&built);
        saved?;
        Ok(archive)
    })();
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// A link in /bin for every busybox applet that the layer does not already have.
fn link_busybox(root: &Path) -> Result<()> {
    let busybox = root.join("bin/busybox");
    let list = run(
        Command::new(&busybox).arg("--list"),
        "listing busybox's applets",
    )?;
    for applet in list.lines().map(str::trim).filter(|a| !a.is_empty()) {
        let link = root.join("bin").join(applet);
        if std::fs::symlink_metadata(&link).is_err()
            && std::fs::symlink_metadata(root.join("usr/bin").join(applet)).is_err()
        {
            std::os::unix::fs::symlink("busybox", &link)?;
        }
    }
    Ok(())
}

/// Whether an ELF file still has its debug sections (a `cargo build` binary does; Go binaries
/// built with `-s -w` do not).
fn has_debug_info(path: &Path) -> Result<bool> {
    let out = run(
        Command::new("readelf").arg("-S").arg(path),
        &format!("reading the sections of {}", path.display()),
    )?;
    Ok(out.contains(".debug_") || out.contains(".symtab"))
}

/// Names and sizes of every file in a tree: enough for a model store, whose blobs are named by
/// their sha256.
fn tree_fingerprint(dir: &Path) -> Result<String> {
    let out = run(
        Command::new("find")
            .arg(dir)
            .args(["-type", "f", "-printf", "%P %s\n"]),
        &format!("listing {}", dir.display()),
    )?;
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort();
    Ok(lines.join("\n"))
}
