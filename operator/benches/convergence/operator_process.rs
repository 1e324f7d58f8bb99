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

/// The operator binary the benchmark runs: `CHATOP_BENCH_OPERATOR_BIN` (e.g. an earlier build,
/// for an A/B comparison with the same benchmark) or the release build of this tree.
pub fn operator_binary() -> String {
    std::env::var("CHATOP_BENCH_OPERATOR_BIN")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_chat-operator").to_string())
}

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
        let mut cmd = Command::new(operator_binary());
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

    /// What the operator has done so far, by its own counters.
    pub async fn activity(&mut self) -> Result<Activity> {
        self.reconciles().await?;
        let text = self.metrics_text().await?;
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .map_or(0, |v| v as u64)
        };
        let triggers = text
            .lines()
            .filter_map(|l| l.strip_prefix("chatoperator_watch_events_total{source=\""))
            .filter_map(|l| {
                let (source, rest) = l.split_once("\",outcome=\"")?;
                let (outcome, value) = rest.split_once("\"} ")?;
                let value = value.trim().parse::<f64>().ok()? as u64;
                Some((format!("{source}/{outcome}"), value))
            })
            .collect();
        Ok(Activity {
            reconciles: value("chatoperator_reconciles_total"),
            status_writes: value("chatoperator_status_writes_total"),
            child_writes: value("chatoperator_child_writes_total"),
            watch_events: triggers,
        })
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

/// The operator's own counters at one moment.
#[derive(Debug, Clone, Default)]
pub struct Activity {
    pub reconciles: u64,
    pub status_writes: u64,
    pub child_writes: u64,
    /// `chatoperator_watch_events_total` as "source/outcome" (empty for an older build).
    pub watch_events: BTreeMap<String, u64>,
}

impl Activity {
    /// What happened between `before` and `self`.
    pub fn since(&self, before: &Activity) -> Activity {
        Activity {
            reconciles: self.reconciles.saturating_sub(before.reconciles),
            status_writes: self.status_writes.saturating_sub(before.status_writes),
            child_writes: self.child_writes.saturating_sub(before.child_writes),
            watch_events: self
                .watch_events
                .iter()
                .map(|(k, v)| {
                    let was = before.watch_events.get(k).copied().unwrap_or(0);
                    (k.clone(), v.saturating_sub(was))
                })
                .filter(|(_, v)| *v > 0)
                .collect(),
        }
    }

    /// Writes the operator made (status and children).
    pub fn writes(&self) -> u64 {
        self.status_writes + self.child_writes
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "reconciles": self.reconciles,
            "status_writes": self.status_writes,
            "child_writes": self.child_writes,
            "watch_events": self.watch_events,
        })
    }

    /// The watch events that triggered a reconcile, largest first, e.g. "Pod 3000, Deployment 40".
    pub fn triggers(&self) -> String {
        let mut rows: Vec<(&str, u64)> = self
            .watch_events
            .iter()
            .filter_map(|(k, v)| Some((k.strip_suffix("/trigger")?, *v)))
            .collect();
        rows.sort_by_key(|row| std::cmp::Reverse(row.1));
        let text: Vec<String> = rows.iter().map(|(k, v)| format!("{k} {v}")).collect();
        if text.is_empty() {
            "-".into()
        } else {
            text.join(", ")
        }
    }
}
