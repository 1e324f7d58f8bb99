//! The `chat-service` binary under test, run as a subprocess (so its RSS and CPU time can be read
//! from `/proc`), and the config that points it at the fixture upstream; and the CPU pinning
//! that keeps the bench's own work (load generator, fixture) off the service's core, so that a
//! frontier is the service's and not the machine's.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chat_rig::Rig;
use chat_rig::process::ManagedProcess;
use chat_rig::procfs;

use crate::FIXTURE_MODEL;
use crate::upstream::FixedLatencyUpstream;

/// The release `chat-service` binary under the rig's watchdog, so it stops however the bench ends.
pub struct ServiceProcess {
    pub _process: ManagedProcess,
    pub pid: u32,
    pub base: String,
    pub log: PathBuf,
}

impl ServiceProcess {
    pub async fn start(name: &str, config: &str, rig: &Rig, dir: &Path) -> Result<Self> {
        Self::start_under(name, config, rig, dir, &[], Duration::from_secs(30)).await
    }

    /// As [`start`](Self::start), with the service run by `wrapper` (say, `valgrind ...`, which
    /// runs it in its own process, so the pid stays the service's) and `ready_within` for its
    /// `/readyz`.
    pub async fn start_under(
        name: &str,
        config: &str,
        rig: &Rig,
        dir: &Path,
        wrapper: &[String],
        ready_within: Duration,
    ) -> Result<Self> {
        let port = chat_rig::free_port()?;
        let config_path = dir.join(format!("{name}.yaml"));
        std::fs::write(&config_path, config)?;
        let log = dir.join(format!("{name}.log"));
        // Another build of the service (say, before a change) may be compared with this one.
        let binary = std::env::var_os("CHATOP_BENCH_SERVICE_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_chat-service").into());
        // taskset and the wrapper exec what follows them: the pid stays the service's.
        let mut argv: Vec<std::ffi::OsString> = Vec::new();
        if let Some(pin) = pinning() {
            argv.extend([
                "taskset".into(),
                "-c".into(),
                pin.service.to_string().into(),
            ]);
        }
        argv.extend(wrapper.iter().map(Into::into));
        argv.push(binary);
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        cmd.arg("--config")
            .arg(&config_path)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .env("REDIS_URL", rig.redis_url())
            .env("MONGODB_URI", rig.mongodb_url())
            .env_remove("RUST_LOG");
        let mut process = ManagedProcess::spawn(name, cmd, &log)?;
        let pid = process.pid().context("chat-service has no pid")?;
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        let deadline = Instant::now() + ready_within;
        loop {
            process.check_running()?;
            if let Ok(r) = client.get(format!("{base}/readyz")).send().await
                && r.status().is_success()
            {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{name} not ready after {} s; see {}",
                    ready_within.as_secs(),
                    log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Self {
            _process: process,
            pid,
            base,
            log,
        })
    }

    /// Resident set size now, in MiB (NaN once the process is gone).
    pub fn rss_mib(&self) -> f64 {
        procfs::current(self.pid).map_or(f64::NAN, procfs::mib)
    }

    /// The highest resident set size so far (`VmHWM`), in MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        procfs::peak(self.pid).map_or(f64::NAN, procfs::mib)
    }

    /// User + system CPU seconds the process has used.
    pub fn cpu_seconds(&self) -> f64 {
        procfs::cpu_seconds(self.pid).unwrap_or(0.0)
    }

    pub async fn metric_sum(&self, client: &reqwest::Client, name: &str) -> Result<f64> {
        self.metric_sum_where(client, name, |_| true).await
    }

    /// As [`metric_sum`](Self::metric_sum), over the samples whose line passes `keep`.
    pub async fn metric_sum_where(
        &self,
        client: &reqwest::Client,
        name: &str,
        keep: impl Fn(&str) -> bool,
    ) -> Result<f64> {
        let text = client
            .get(format!("{}/metrics", self.base))
            .send()
            .await?
            .text()
            .await?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with(name) && keep(l))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum())
    }

    /// Store operations that requests made: the background look for pending erasures and the
    /// retention sweeper run on their own clocks whatever the traffic, so they are left out.
    pub async fn request_store_operations(&self, client: &reqwest::Client) -> Result<f64> {
        self.metric_sum_where(client, "chat_history_store_operations", |line| {
            !line.contains("operation=\"erasure\"") && !line.contains("operation=\"sweep\"")
        })
        .await
    }
}

/// Which cores the service and the bench run on.
#[derive(Debug, Clone, Copy)]
pub struct Pinning {
    /// The service's core; the bench process takes cores `0..service`.
    pub service: usize,
}

impl Pinning {
    pub fn describe(&self) -> String {
        format!(
            "service pinned to core {}, load generator and fixture to cores 0-{}",
            self.service,
            self.service - 1
        )
    }
}

/// The machine's cores as this process saw them before it pinned itself (after, it sees only
/// its own).
pub fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// `CHATOP_BENCH_PIN`: on by default with two cores or more.
pub fn pinning() -> Option<Pinning> {
    let cores = cores();
    // A value that does not parse is reported by `pin_this_process`, which runs first.
    let wanted = chat_rig::knobs::get("CHATOP_BENCH_PIN", u8::from(cores >= 2)).unwrap_or(0);
    (wanted != 0 && cores >= 2).then_some(Pinning { service: cores - 1 })
}

/// Pins this process (all its threads so far, and so all it starts later) to the cores the
/// service does not use.
pub fn pin_this_process() -> Result<()> {
    chat_rig::knobs::get("CHATOP_BENCH_PIN", 0u8)?;
    let Some(pin) = pinning() else {
        return Ok(());
    };
    let status = Command::new("taskset")
        .args(["-a", "-p", "-c", &format!("0-{}", pin.service - 1)])
        .arg(std::process::id().to_string())
        .stdout(std::process::Stdio::null())
        .status()
        .context("taskset (util-linux) is needed for CHATOP_BENCH_PIN=1")?;
    if !status.success() {
        bail!("taskset could not pin the bench: {status}");
    }
    Ok(())
}

/// `websockets`: how many the memory part opens; the socket limits stay 1,100 up to 1,000 (the
/// default run), and leave 100 spare above that.
pub fn fixture_config(upstream: &FixedLatencyUpstream, unique: &str, websockets: usize) -> String {
    let sockets = (websockets + 100).max(1100);
    format!(
        r#"
backends:
  - name: fixture
    url: {url}
    protocol: openai
# The fixture stands for one large OpenAI-compatible server, not an Ollama pod: the per-back-end
# in-flight limit (8 by default) would otherwise queue the load in the pool and measure the
# back-pressure instead of the gateway. The service-wide limit (512 in flight) still applies.
routing:
  maxInFlightPerBackend: 1024
# The memory part opens 1,000 WebSockets (CHATOP_BENCH_WEBSOCKETS) from one client address, and
# each open socket holds a place of maxConcurrentRequests (512 by default) and of its caller's
# maxSocketsPerCaller.
limits:
  maxSocketsPerCaller: {sockets}
  maxConcurrentRequests: {sockets}
models:
  default: {FIXTURE_MODEL}
history:
  redis:
    keyPrefix: {unique}
  mongodb:
    database: {unique}
"#,
        url = upstream.url(),
    )
}
