//! The local test rig: real servers for the tests, on a machine with no container engine.
//!
//! [`Rig::shared`] gives every test in a process the same rig: a real kube-apiserver with
//! kube-controller-manager and etcd, redis-server, FerretDB (MongoDB wire protocol) and Ollama
//! serving a small real model. It is started once, on first use, and its processes are stopped when
//! the process exits, however it exits. When `CHATOP_RIG_ENV` names the file a running `rig up`
//! wrote, tests attach to that rig instead of starting one.
//!
//! Tests that need to stop a server start a private one ([`RedisServer::start`],
//! [`FerretDb::start`], [`OllamaServer::start`]), which stops when dropped.
//!
//! The binaries come from `tests/rig/install.sh`, which builds and caches them.
//!
//! What tests and benches share besides the servers lives in modules named for it: [`wait`]
//! (polling, and Kubernetes objects that appear, go or stay away), [`crd`] (a CRD applied and
//! served), [`stream`] (SSE and NDJSON bodies), [`knobs`] (environment settings of benches) and
//! [`procfs`] (a process's RSS and CPU time).
//!
//! [`kubelet_node`] is the rig's node, where pods really run: a real kubelet with containerd, runc,
//! kube-proxy, CoreDNS and kube-router, started beside a control plane (`rig node`).
//!
//! [`images`] builds the real node's container images with buildah (the product images from their
//! Dockerfiles, stand-ins for redis, mongo, ollama, CoreDNS and metrics-server) as OCI archives,
//! and imports them into a containerd.

mod control_plane;
pub mod crd;
pub mod images;
pub mod knobs;
pub mod kubelet_node;
pub mod paths;
pub mod process;
pub mod procfs;
pub mod servers;
pub mod stream;
pub mod tls;
pub mod wait;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ObjectMeta, PostParams};
use rand::Rng;
use serde::{Deserialize, Serialize};

pub use control_plane::ControlPlane;
pub use servers::{FerretDb, FerretTls, OllamaServer, RedisServer, free_port};
pub use wait::eventually;

/// Name of the model the installer imports into Ollama.
pub const MODEL: &str = "gemma3-270m";
/// Environment variable naming a running rig's description file (written by `rig up`).
pub const ENV_RIG_FILE: &str = "CHATOP_RIG_ENV";

/// Which servers a rig runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parts {
    pub kubernetes: bool,
    pub redis: bool,
    pub mongodb: bool,
    pub ollama: bool,
    /// A CA of the rig's own with a TLS-only redis-server (AUTH) and a TLS-only FerretDB, for
    /// clients that verify the server ([`tls::TlsStores`]); part `tls-stores`.
    #[serde(default)]
    pub tls_stores: bool,
}

impl Parts {
    pub const ALL: Parts = Parts {
        kubernetes: true,
        redis: true,
        mongodb: true,
        ollama: true,
        tls_stores: true,
    };

    /// Parses a comma-separated list such as `kubernetes,redis`.
    pub fn parse(list: &str) -> Result<Self> {
        let mut parts = Parts {
            kubernetes: false,
            redis: false,
            mongodb: false,
            ollama: false,
            tls_stores: false,
        };
        for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match name {
                "kubernetes" => parts.kubernetes = true,
                "redis" => parts.redis = true,
                "mongodb" => parts.mongodb = true,
                "ollama" => parts.ollama = true,
                "tls-stores" => parts.tls_stores = true,
                other => anyhow::bail!(
                    "unknown rig part '{other}': expected kubernetes, redis, mongodb, ollama or \
                     tls-stores"
                ),
            }
        }
        Ok(parts)
    }
}

/// Where a rig's servers answer; what `rig up` writes for other processes to attach.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RigInfo {
    /// The process that owns the servers.
    pub pid: u32,
    pub dir: PathBuf,
    pub kubeconfig: Option<PathBuf>,
    pub api_server_url: Option<String>,
    pub redis_url: Option<String>,
    pub mongodb_url: Option<String>,
    pub ollama_url: Option<String>,
    pub model: String,
    /// The CA that signs the TLS stores' certificates (part `tls-stores`); absent in files
    /// written by rigs without them.
    #[serde(default)]
    pub store_ca_file: Option<PathBuf>,
    /// `rediss://:<password>@127.0.0.1:PORT/`, verified against `store_ca_file`.
    #[serde(default)]
    pub redis_tls_url: Option<String>,
    /// `mongodb://<user>:<password>@127.0.0.1:PORT/...?tls=true...`, verified against
    /// `store_ca_file`.
    #[serde(default)]
    pub mongodb_tls_url: Option<String>,
}

struct OwnedServers {
    // Dropped in this order when a rig value is dropped (never for the shared one, whose
    // processes the watchdog stops at exit).
    _ollama: Option<OllamaServer>,
    _tls_stores: Option<tls::TlsStores>,
    _mongodb: Option<FerretDb>,
    _redis: Option<RedisServer>,
    _control_plane: Option<ControlPlane>,
}

/// A running rig (owned by this process, or attached to another's).
pub struct Rig {
    info: RigInfo,
    _owned: Option<OwnedServers>,
}

fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target")
}

/// This process's folder for rig servers and logs: `target/rig/run-<time>-<pid>`. Older runs are
/// pruned (the newest few are kept for their logs).
pub fn run_dir() -> Result<&'static Path> {
    static DIR: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = target_dir().join("rig");
        std::fs::create_dir_all(&root).map_err(|e| format!("creating {}: {e}", root.display()))?;
        prune_old_runs(&root, 6);
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let dir = root.join(format!("run-{secs}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        Ok(dir.canonicalize().unwrap_or(dir))
    })
    .as_ref()
    .map(PathBuf::as_path)
    .map_err(|e| anyhow!("{e}"))
}

fn prune_old_runs(root: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    let mut runs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("run-"))
        })
        .collect();
    // A folder whose owner still runs (a standing `rig up`, another test process) is in use.
    runs.retain(|run| !owner_alive(run));
    runs.sort();
    let excess = runs.len().saturating_sub(keep);
    for old in runs.into_iter().take(excess) {
        let _ = std::fs::remove_dir_all(old);
    }
}

/// Whether the process named in a `run-<time>-<pid>` folder name is still running.
fn owner_alive(run: &Path) -> bool {
    run.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.rsplit('-').next())
        .and_then(|pid| pid.parse::<u32>().ok())
        .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
}

/// A fresh folder under this process's run folder, for one server or test.
pub fn scratch_dir(name: &str) -> Result<PathBuf> {
    let dir = run_dir()?.join(unique_name(name));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// `prefix-xxxxxx` with six random lowercase letters and digits: a valid name for a Kubernetes
/// namespace, a MongoDB database or a Redis key prefix.
pub fn unique_name(prefix: &str) -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let suffix: String = (0..6)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect();
    format!("{prefix}-{suffix}")
}

/// A kube client for a kubeconfig file, optionally with a default namespace.
pub async fn client_from_kubeconfig(path: &Path, namespace: Option<&str>) -> Result<kube::Client> {
    let kubeconfig = kube::config::Kubeconfig::read_from(path)
        .with_context(|| format!("reading kubeconfig {}", path.display()))?;
    let mut config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .context("loading kubeconfig")?;
    if let Some(ns) = namespace {
        config.default_namespace = ns.to_string();
    }
    kube::Client::try_from(config).context("building kube client")
}

fn join<T>(handle: std::thread::ScopedJoinHandle<'_, Result<T>>) -> Result<T> {
    handle
        .join()
        .unwrap_or_else(|_| Err(anyhow!("a rig start-up thread panicked")))
}

impl Rig {
    /// The rig shared by every test of this process (see the crate docs). Panics, with the step
    /// that failed and its log, when the rig cannot start: a test that needs it cannot run.
    pub fn shared() -> &'static Rig {
        static SHARED: OnceLock<std::result::Result<Rig, String>> = OnceLock::new();
        let rig = SHARED.get_or_init(|| {
            // Started on a thread of its own: callers are often inside an async runtime.
            std::thread::spawn(|| match std::env::var_os(ENV_RIG_FILE) {
                Some(file) => Rig::attach(Path::new(&file)),
                None => run_dir().and_then(|dir| Rig::start(&dir.join("shared"), Parts::ALL)),
            })
            .join()
            .map_err(|_| "the rig's start-up thread panicked".to_string())
            .and_then(|r| r.map_err(|e| format!("{e:#}")))
        });
        match rig {
            Ok(rig) => rig,
            Err(e) => panic!("the test rig is not available: {e}"),
        }
    }

    /// The standing rig `CHATOP_RIG_ENV` names, else one of this process's own with `parts`, in
    /// the run folder's `name` (stopped when the value is dropped): for a bench or a test binary
    /// that needs only some servers.
    pub fn attach_or_start(name: &str, parts: Parts) -> Result<Rig> {
        match std::env::var_os(ENV_RIG_FILE) {
            Some(file) => Rig::attach(Path::new(&file)),
            None => Rig::start(&run_dir()?.join(name), parts),
        }
    }

    /// Attaches to the rig a `rig up` process described in `file`.
    pub fn attach(file: &Path) -> Result<Rig> {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading the rig description {}", file.display()))?;
        let info: RigInfo = serde_json::from_str(&text)
            .with_context(|| format!("parsing the rig description {}", file.display()))?;
        if !Path::new(&format!("/proc/{}", info.pid)).exists() {
            anyhow::bail!(
                "the rig described in {} (pid {}) is not running",
                file.display(),
                info.pid
            );
        }
        Ok(Rig { info, _owned: None })
    }

    /// Starts the chosen servers in `dir`, in parallel; on any failure stops what started and
    /// returns an error naming the step and its log.
    pub fn start(dir: &Path, parts: Parts) -> Result<Rig> {
        std::fs::create_dir_all(dir)?;
        let started = Instant::now();
        let (control_plane, redis, mongodb, ollama, tls_stores) = std::thread::scope(|s| {
            let cp = s.spawn(|| {
                parts
                    .kubernetes
                    .then(|| ControlPlane::start(&dir.join("kubernetes")))
                    .transpose()
            });
            let redis = s.spawn(|| {
                parts
                    .redis
                    .then(|| RedisServer::start_in(&dir.join("redis")))
                    .transpose()
            });
            let mongodb = s.spawn(|| {
                parts
                    .mongodb
                    .then(|| FerretDb::start_in(&dir.join("ferretdb")))
                    .transpose()
            });
            let ollama = s.spawn(|| {
                parts
                    .ollama
                    .then(|| -> Result<OllamaServer> {
                        let mut server = OllamaServer::start_in(&dir.join("ollama"))?;
                        server.load_model(MODEL)?;
                        Ok(server)
                    })
                    .transpose()
            });
            let tls_stores = s.spawn(|| {
                parts
                    .tls_stores
                    .then(|| tls::TlsStores::start(&dir.join("tls-stores")))
                    .transpose()
            });
            (
                join(cp),
                join(redis),
                join(mongodb),
                join(ollama),
                join(tls_stores),
            )
        });
        // Any error drops (and so stops) the servers that did start.
        let (control_plane, redis, mongodb, ollama, tls_stores) =
            (control_plane?, redis?, mongodb?, ollama?, tls_stores?);
        let info = RigInfo {
            pid: std::process::id(),
            dir: dir.to_path_buf(),
            kubeconfig: control_plane.as_ref().map(|c| c.kubeconfig.clone()),
            api_server_url: control_plane.as_ref().map(|c| c.url.clone()),
            redis_url: redis.as_ref().map(RedisServer::url),
            mongodb_url: mongodb.as_ref().map(FerretDb::url),
            ollama_url: ollama.as_ref().map(OllamaServer::url),
            model: MODEL.to_string(),
            store_ca_file: tls_stores.as_ref().map(|t| t.ca.ca_file.clone()),
            redis_tls_url: tls_stores.as_ref().map(|t| t.redis.url()),
            mongodb_tls_url: tls_stores.as_ref().map(|t| t.mongodb.url()),
        };
        eprintln!(
            "[rig] up in {:.1} s: {}",
            started.elapsed().as_secs_f64(),
            dir.display()
        );
        Ok(Rig {
            info,
            _owned: Some(OwnedServers {
                _ollama: ollama,
                _tls_stores: tls_stores,
                _mongodb: mongodb,
                _redis: redis,
                _control_plane: control_plane,
            }),
        })
    }

    pub fn info(&self) -> &RigInfo {
        &self.info
    }

    fn part<'a>(&self, value: &'a Option<impl AsRef<str>>, part: &str) -> &'a str {
        value
            .as_ref()
            .map(AsRef::as_ref)
            .unwrap_or_else(|| panic!("this rig was started without {part}"))
    }

    pub fn kubeconfig_path(&self) -> &Path {
        self.info
            .kubeconfig
            .as_deref()
            .expect("this rig was started without kubernetes")
    }

    pub fn api_server_url(&self) -> &str {
        self.part(&self.info.api_server_url, "kubernetes")
    }

    /// A client with the rig's admin identity (group system:masters).
    pub async fn kube_client(&self) -> kube::Client {
        client_from_kubeconfig(self.kubeconfig_path(), None)
            .await
            .expect("kube client for the rig's API server")
    }

    /// A fresh namespace named `prefix-xxxxxx`, and an admin client whose default namespace it is.
    pub async fn test_namespace(&self, prefix: &str) -> (kube::Client, String) {
        let name = unique_name(prefix);
        let client = client_from_kubeconfig(self.kubeconfig_path(), Some(&name))
            .await
            .expect("kube client for the rig's API server");
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("creating test namespace {name}: {e}"));
        (client, name)
    }

    /// `redis://127.0.0.1:PORT/`; tests keep apart by key prefix ([`unique_name`]).
    pub fn redis_url(&self) -> &str {
        self.part(&self.info.redis_url, "redis")
    }

    /// `mongodb://127.0.0.1:PORT/`; tests keep apart by database ([`unique_name`]).
    pub fn mongodb_url(&self) -> &str {
        self.part(&self.info.mongodb_url, "mongodb")
    }

    /// The CA file clients verify the TLS stores against.
    pub fn store_ca_file(&self) -> &Path {
        self.info
            .store_ca_file
            .as_deref()
            .expect("this rig was started without part tls-stores")
    }

    /// The TLS-only Redis, with its AUTH password; verify it against [`Rig::store_ca_file`].
    pub fn redis_tls_url(&self) -> &str {
        self.part(&self.info.redis_tls_url, "tls-stores")
    }

    /// The TLS-only FerretDB, with user and password; verify it against [`Rig::store_ca_file`].
    pub fn mongodb_tls_url(&self) -> &str {
        self.part(&self.info.mongodb_tls_url, "tls-stores")
    }

    /// Ollama's base URL (native API under `/api`).
    pub fn ollama_url(&self) -> &str {
        self.part(&self.info.ollama_url, "ollama")
    }

    /// Ollama's OpenAI-compatible API base (`.../v1`).
    pub fn openai_url(&self) -> String {
        format!("{}/v1", self.ollama_url())
    }

    pub fn model(&self) -> &str {
        &self.info.model
    }
}
