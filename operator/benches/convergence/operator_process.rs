//! The release `chat-operator` binary as a subprocess of the benchmark, and what it reports:
//! its reconcile and request counters from `/metrics`, its RSS from `/proc`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chat_rig::process::ManagedProcess;
use chat_rig::procfs;

use crate::Settings;

/// The release `chat-operator` binary, run with the rig's admin kubeconfig. It runs under the
/// rig's watchdog, so it is stopped however the benchmark ends.
pub struct OperatorProcess {
    pub process: ManagedProcess,
    pub pid: u32,
    pub metrics: SocketAddr,
    pub started: Instant,
}

impl OperatorProcess {
    pub fn start(kubeconfig: &Path, settings: &Settings, log: &Path) -> Result<Self> {
        let metrics: SocketAddr = ([127, 0, 0, 1], chat_rig::free_port()?).into();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_chat-operator"));
        cmd.arg("--disable-leader-election")
            .arg(format!("--metrics-address={metrics}"))
            .arg(format!("--resync-seconds={}", settings.resync_seconds))
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,kube=warn");
        // The operator's own default unless the knob is set (also not from the environment).
        cmd.env_remove("MAX_CONCURRENT_RECONCILES");
        if let Some(n) = settings.concurrency {
            cmd.arg(format!("--max-concurrent-reconciles={n}"));
        }
        let process = ManagedProcess::spawn("chat-operator", cmd, log)?;
        let pid = process.pid().context("chat-operator has no pid")?;
        Ok(Self {
            process,
            pid,
            metrics,
            started: Instant::now(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Resident set size now, in bytes (0 once the process is gone).
    pub fn rss(&self) -> u64 {
        procfs::current(self.pid).unwrap_or(0)
    }

    /// The highest resident set size so far (`VmHWM`), in bytes.
    pub fn peak_rss(&self) -> u64 {
        procfs::peak(self.pid).unwrap_or(0)
    }

    pub async fn metrics_text(&self) -> Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.metrics).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: operator\r\nConnection: close\r\n\r\n")
            .await?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await?;
        Ok(text)
    }

    /// `chatoperator_reconciles_total`, once the metrics server answers.
    pub async fn reconciles(&mut self) -> Result<u64> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.process.check_running()?;
            if let Ok(text) = self.metrics_text().await
                && let Some(n) = text
                    .lines()
                    .find_map(|l| l.strip_prefix("chatoperator_reconciles_total "))
                    .and_then(|v| v.trim().parse::<f64>().ok())
            {
                return Ok(n as u64);
            }
            if Instant::now() > deadline {
                bail!("the operator's /metrics did not answer within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `chatoperator_api_requests_total` by method: the operator's own requests, counted on its
    /// client (kube-apiserver's counter sums every client, kube-controller-manager included).
    pub async fn own_requests(&mut self) -> Result<BTreeMap<String, u64>> {
        self.reconciles().await?; // up and serving
        let text = self.metrics_text().await?;
        Ok(text
            .lines()
            .filter_map(|l| l.strip_prefix("chatoperator_api_requests_total{method=\""))
            .filter_map(|l| {
                let (method, value) = l.split_once("\"} ")?;
                Some((method.to_string(), value.trim().parse::<f64>().ok()? as u64))
            })
            .collect())
    }

    /// SIGTERM, up to 30 s for a graceful exit, then SIGKILL. Returns the peak RSS.
    pub fn stop(mut self) -> u64 {
        let peak = self.peak_rss();
        self.process.stop_with_grace(Duration::from_secs(30));
        peak
    }
}
