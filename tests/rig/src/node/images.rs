//! Container images → local programs: the one table the node consults before it starts a
//! container. There is no container runtime and no registry here, so an image is recognised by
//! the last segment of its repository (registry, path, tag and digest are ignored) and run as the
//! local program that the image would have carried:
//!
//! | image (last repository segment) | local program | translation |
//! |---|---|---|
//! | `chat-service`  | `${CARGO_TARGET_DIR:-target}/debug/chat-service`  | entrypoint = the binary; `command`/`args` as in the spec |
//! | `chat-operator` | `${CARGO_TARGET_DIR:-target}/debug/chat-operator` | entrypoint = the binary |
//! | `redis`         | Debian's `redis-server` (`redis-cli` for exec probes) | default command `redis-server`; `sh -c "exec redis-server ..."` runs as written |
//! | `mongo`         | FerretDB 1.x (`~/.cache/chat-operator/bin/ferretdb`), SQLite back end, behind `rig mongo-front` (see `node::mongo_front`) | `mongod` flags become FerretDB flags: `--port N` → the front listens on `0.0.0.0:N`, FerretDB on `127.0.0.1:N+1`, `--dbpath P` (default `/data/db`) → `--sqlite-url=file:P/`; state in `P/.ferretdb`; exec probes calling `mongosh`/`mongo` become a wire-protocol `ping`; `MONGO_INITDB_ROOT_USERNAME/PASSWORD` become FerretDB's setup user with its (experimental) SCRAM auth, since FerretDB 1.24 refuses SCRAM otherwise |
//! | `ollama`        | the rig's `ollama` | `OLLAMA_MODELS` is forced to the installer's model store; `ollama pull M` becomes a check that M is in that store (no registry here) |
//!
//! Any other image is not pulled: the container waits with reason `ErrImagePull` and a message
//! naming the image, which the Pod status shows.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Container;

/// Where the local programs are.
#[derive(Debug, Clone)]
pub struct ImageContext {
    /// Folder with the workspace's built binaries (`chat-service`, `chat-operator`).
    pub bin_dir: PathBuf,
    /// Folder of the node's shims (`ollama`), put first on every container's PATH.
    pub shim_dir: PathBuf,
    pub ferretdb: Option<PathBuf>,
    pub ollama: Option<PathBuf>,
    pub ollama_models: Option<PathBuf>,
}

/// What a container runs: the full argv (program first), environment overrides the image
/// implies, and shell lines run inside the pod before the program (e.g. creating a data folder).
#[derive(Debug, Clone, Default)]
pub struct Launch {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub prepare: Vec<String>,
}

/// How an exec probe is run for an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecCheck {
    /// The command, run in the container's namespaces.
    Command(Vec<String>),
    /// A MongoDB wire-protocol `ping` to this port on the pod IP (the image's `mongosh` is not
    /// installed here).
    MongoPing(u16),
}

/// A failure to map an image, shown as the container's waiting reason and message.
#[derive(Debug, Clone)]
pub struct ImageError {
    pub reason: &'static str,
    pub message: String,
}

/// The last segment of an image's repository: `docker.io/library/redis:7.4-alpine` → `redis`.
pub fn image_name(image: &str) -> String {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    last.split(':').next().unwrap_or(last).to_string()
}

fn need(path: &Option<PathBuf>, what: &str) -> Result<PathBuf, ImageError> {
    path.clone().ok_or_else(|| ImageError {
        reason: "ErrImagePull",
        message: format!("{what} is not installed: run tests/rig/install.sh"),
    })
}

fn binary(dir: &Path, name: &str, image: &str) -> Result<String, ImageError> {
    let path = dir.join(name);
    if !path.is_file() {
        return Err(ImageError {
            reason: "ErrImagePull",
            message: format!(
                "image {image} maps to the local binary {} which is missing: run `cargo build -p {name}` (with the same CARGO_TARGET_DIR)",
                path.display()
            ),
        });
    }
    Ok(path.display().to_string())
}

/// The argv a container runs when the image's entrypoint is `entry` and its default command
/// `default_cmd` (Kubernetes semantics: `command` replaces the entrypoint and drops the default
/// command; `args` replaces the default command).
fn argv(c: &Container, entry: &[String], default_cmd: &[String]) -> Vec<String> {
    match (&c.command, &c.args) {
        (Some(cmd), args) if !cmd.is_empty() => {
            let mut v = cmd.clone();
            v.extend(args.clone().unwrap_or_default());
            v
        }
        (_, Some(args)) => {
            let mut v = entry.to_vec();
            v.extend(args.clone());
            v
        }
        _ => {
            let mut v = entry.to_vec();
            v.extend(default_cmd.iter().cloned());
            v
        }
    }
}

/// Maps a container to what runs locally.
pub fn resolve(ctx: &ImageContext, c: &Container) -> Result<Launch, ImageError> {
    let image = c.image.clone().unwrap_or_default();
    let name = image_name(&image);
    let s = |v: &str| v.to_string();
    match name.as_str() {
        "chat-service" | "chat-operator" => {
            let bin = binary(&ctx.bin_dir, &name, &image)?;
            let mut launch = Launch {
                argv: argv(c, std::slice::from_ref(&bin), &[]),
                ..Default::default()
            };
            // The image's entrypoint path, when a spec names it explicitly.
            if let Some(first) = launch.argv.first_mut()
                && (*first == format!("/{name}") || *first == name)
            {
                *first = bin;
            }
            Ok(launch)
        }
        "redis" => Ok(Launch {
            argv: argv(c, &[s("redis-server")], &[]),
            ..Default::default()
        }),
        "mongo" => {
            let ferretdb = need(&ctx.ferretdb, "FerretDB (the mongo image's stand-in)")?;
            let args = match &c.command {
                Some(cmd) if !cmd.is_empty() => {
                    let mut v = cmd.clone();
                    v.extend(c.args.clone().unwrap_or_default());
                    v
                }
                _ => c.args.clone().unwrap_or_default(),
            };
            let (port, dbpath) = mongod_flags(&args)?;
            let state = format!("{dbpath}/.ferretdb");
            let rig = binary(&ctx.bin_dir, "rig", &image)?;
            // FerretDB on loopback inside the pod; the front (see `mongo_front`) on the port.
            let upstream = format!("127.0.0.1:{}", port.wrapping_add(1).max(1024));
            let ferretdb = [
                ferretdb.display().to_string(),
                s("--handler=sqlite"),
                format!("--sqlite-url=file:{dbpath}/"),
                format!("--listen-addr={upstream}"),
                format!("--state-dir={state}"),
                s("--telemetry=disable"),
                s("--debug-addr=-"),
                s("--log-level=warn"),
            ]
            .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
            .join(" ");
            Ok(Launch {
                argv: vec![rig, s("mongo-front"), format!("0.0.0.0:{port}"), upstream],
                env: Vec::new(),
                prepare: vec![
                    format!("mkdir -p '{state}'"),
                    // The image creates this root user on first start; FerretDB 1.24 authenticates
                    // SCRAM clients (what the drivers use for such a user) only with its new auth,
                    // whose setup user is the same idea.
                    "if [ -n \"${MONGO_INITDB_ROOT_USERNAME:-}\" ]; then export FERRETDB_TEST_ENABLE_NEW_AUTH=true FERRETDB_SETUP_DATABASE=admin FERRETDB_SETUP_USERNAME=\"$MONGO_INITDB_ROOT_USERNAME\" FERRETDB_SETUP_PASSWORD=\"$MONGO_INITDB_ROOT_PASSWORD\"; fi".into(),
                    format!("{ferretdb} &"),
                ],
            })
        }
        "ollama" => {
            let ollama = need(&ctx.ollama, "ollama")?;
            let models = need(&ctx.ollama_models, "the rig's Ollama model store")?;
            // `ollama` on PATH is the node's shim (see `write_shims`), so scripts work unchanged.
            let mut v = argv(c, &[s("ollama")], &[s("serve")]);
            if v.first()
                .is_some_and(|p| p == "/bin/ollama" || p == "/usr/bin/ollama")
            {
                v[0] = s("ollama");
            }
            Ok(Launch {
                argv: v,
                env: vec![
                    (s("OLLAMA_MODELS"), models.display().to_string()),
                    // Several servers share the store: none may prune the others' blobs.
                    (s("OLLAMA_NOPRUNE"), s("1")),
                    (s("CHATOP_REAL_OLLAMA"), ollama.display().to_string()),
                ],
                prepare: Vec::new(),
            })
        }
        _ => Err(ImageError {
            reason: "ErrImagePull",
            message: format!(
                "image {image:?} has no local stand-in on this node (known: chat-service, chat-operator, redis, mongo, ollama; see tests/rig/src/node/images.rs)"
            ),
        }),
    }
}

/// `mongod` flags the node understands; others are ignored (FerretDB has no equivalent).
fn mongod_flags(args: &[String]) -> Result<(u16, String), ImageError> {
    let mut port = 27017u16;
    let mut dbpath = "/data/db".to_string();
    let mut it = args.iter().peekable();
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) => (f, Some(v.to_string())),
            None => (a.as_str(), None),
        };
        match flag {
            "--port" => {
                let v = inline.or_else(|| it.next().cloned()).unwrap_or_default();
                port = v.parse().map_err(|_| ImageError {
                    reason: "CreateContainerConfigError",
                    message: format!("mongod --port {v:?} is not a port"),
                })?;
            }
            "--dbpath" => dbpath = inline.or_else(|| it.next().cloned()).unwrap_or(dbpath),
            _ => {}
        }
    }
    Ok((port, dbpath.trim_end_matches('/').to_string()))
}

/// How an exec probe of this container runs.
pub fn exec_check(c: &Container, command: &[String]) -> ExecCheck {
    let image = image_name(c.image.as_deref().unwrap_or_default());
    let program = command
        .first()
        .map(|p| p.rsplit('/').next().unwrap_or(p).to_string());
    if image == "mongo" && matches!(program.as_deref(), Some("mongosh" | "mongo")) {
        let args = c.args.clone().unwrap_or_default();
        let port = mongod_flags(&args).map(|(p, _)| p).unwrap_or(27017);
        return ExecCheck::MongoPing(port);
    }
    ExecCheck::Command(command.to_vec())
}

/// The node's shim programs, first on every container's PATH.
pub fn write_shims(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let ollama = dir.join("ollama");
    // `pull` cannot reach a registry here: the rig's store already holds the installer's models,
    // so a pull only checks the model is there (through the running server, as `pull` would).
    std::fs::write(
        &ollama,
        "#!/bin/sh\nreal=${CHATOP_REAL_OLLAMA:?the ollama image runs only with the rig's ollama}\n\
if [ \"$1\" = pull ]; then shift; for m in \"$@\"; do \"$real\" show \"$m\" >/dev/null || { echo \"model $m is not in the rig's model store (no registry here)\" >&2; exit 1; }; echo \"$m: present in the rig's model store\"; done; exit 0; fi\n\
exec \"$real\" \"$@\"\n",
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&ollama, std::fs::Permissions::from_mode(0o755))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_ignore_registry_tag_and_digest() {
        assert_eq!(image_name("docker.io/library/redis:7.4-alpine"), "redis");
        assert_eq!(
            image_name("ghcr.io/chatoperator/chat-service:0.1.0"),
            "chat-service"
        );
        assert_eq!(image_name("mongo@sha256:abc"), "mongo");
        assert_eq!(image_name("localhost:5000/ollama/ollama"), "ollama");
    }

    #[test]
    fn mongod_flags_become_ferretdb_flags() {
        let (port, path) = mongod_flags(&[
            "mongod".into(),
            "--port=27018".into(),
            "--dbpath".into(),
            "/d/".into(),
        ])
        .unwrap();
        assert_eq!((port, path.as_str()), (27018, "/d"));
    }
}
