//! Chat-service benchmark (issue 7, items 1, 2, 3 and 5).
//!
//! Runs the release `chat-service` binary as a subprocess (so its RSS and CPU time can be read
//! from `/proc/<pid>`), against the rig's Redis, FerretDB and Ollama (started here, or the standing
//! `rig up` named by `CHATOP_RIG_ENV`) and the `FixedLatencyUpstream` fixture, and measures every
//! figure beside its baseline in the same run:
//!
//! 1. added latency on the stateless OpenAI path (fixture directly vs through the service), open
//!    model at constant rates, non-streaming and streaming, and the highest rate whose added p99
//!    stays under 5 ms;
//! 2. a full turn with history (Redis + MongoDB) at saturation vs the same store operations done
//!    directly with the same crates;
//! 3. RSS idle, with 1,000 open WebSockets, and after they closed;
//! 5. the real model (Ollama, gemma3-270m) through the service vs directly.
//!
//! Run: `cargo bench -p chat-service --bench gateway` (after `tests/rig/install.sh`). Writes
//! `target/bench/chat-service.json` and prints the table. Knobs: `CHATOP_BENCH_ONLY` (comma list
//! of `latency,history,memory,model`), `CHATOP_BENCH_RATES`, `CHATOP_BENCH_SECONDS` (per rate and
//! path), `CHATOP_BENCH_HISTORY_SECONDS`, `CHATOP_BENCH_SESSIONS` (history callers),
//! `CHATOP_BENCH_WEBSOCKETS`, `CHATOP_BENCH_WEBSOCKET_CONCURRENCY` (sockets opening at once, 64;
//! each stores a first turn, which FerretDB on SQLite answers only so fast),
//! `CHATOP_BENCH_MODEL_SESSIONS`, `CHATOP_BENCH_MODEL_TURNS`,
//! `CHATOP_BENCH_MODEL_TOKENS`, `CHATOP_BENCH_SERVICE_BIN` (another build of the service, e.g. one
//! from before a change), `CHATOP_BENCH_SEQUENTIAL` (requests per side at concurrency 1),
//! `CHATOP_BENCH_PIN` (`1`: the service on the last core and this process, load generator and
//! fixture, on the others, with `taskset`; `0`: no pinning; default `1` with two cores or more).
//!
//! `CHATOP_BENCH_ONLY=instructions` (not in the default list; needs valgrind) counts the service's
//! user-space instructions per request under callgrind, the A/B figure that a busy machine does
//! not blur (`CHATOP_BENCH_INSTR_REQUESTS`, `CHATOP_BENCH_INSTR_WARMUP`).

mod load;
mod report;
mod scenarios;
mod service;
mod upstream;

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use chat_rig::{Rig, knobs, procfs};
use serde_json::json;

use report::{Report, f1};
use service::{ServiceProcess, fixture_config};
use upstream::{FixedLatencyUpstream, Shape};

const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const FIXTURE_MODEL: &str = "fixture-model";

pub struct Settings {
    pub only: Vec<String>,
    pub rates: Vec<f64>,
    pub seconds: f64,
    pub history_seconds: f64,
    pub sessions: usize,
    pub websockets: usize,
    /// WebSockets opening (and running their first turn) at once.
    pub websocket_concurrency: usize,
    pub model_sessions: usize,
    pub model_turns: usize,
    pub model_tokens: u32,
    pub sequential: usize,
}

impl Settings {
    fn from_env() -> Result<Self> {
        Ok(Self {
            only: knobs::list("CHATOP_BENCH_ONLY", "memory,latency,history,model")?,
            rates: knobs::list(
                "CHATOP_BENCH_RATES",
                "100,500,1000,2000,3000,4000,5000,6000,8000,10000",
            )?,
            seconds: knobs::get("CHATOP_BENCH_SECONDS", 4.0)?,
            history_seconds: knobs::get("CHATOP_BENCH_HISTORY_SECONDS", 8.0)?,
            sessions: knobs::get("CHATOP_BENCH_SESSIONS", 32)?,
            websockets: knobs::get("CHATOP_BENCH_WEBSOCKETS", 1000)?,
            websocket_concurrency: knobs::get("CHATOP_BENCH_WEBSOCKET_CONCURRENCY", 64)?,
            model_sessions: knobs::get("CHATOP_BENCH_MODEL_SESSIONS", 20)?,
            model_turns: knobs::get("CHATOP_BENCH_MODEL_TURNS", 5)?,
            model_tokens: knobs::get("CHATOP_BENCH_MODEL_TOKENS", 24)?,
            sequential: knobs::get("CHATOP_BENCH_SEQUENTIAL", 5000)?,
        })
    }

    pub fn runs(&self, part: &str) -> bool {
        self.only.iter().any(|p| p == part)
    }
}

async fn bench(rig: &Rig, settings: &Settings, dir: &Path) -> Result<Report> {
    let mut report = Report::default();
    let load_before = procfs::load_average();
    let upstream = FixedLatencyUpstream::start(
        FIXTURE_MODEL,
        Shape {
            delay: Duration::ZERO,
            chunks: 4,
            gap: Duration::ZERO,
        },
        2,
    )?;
    let needs_fixture_service = ["memory", "latency", "history"]
        .iter()
        .any(|p| settings.runs(p));
    if needs_fixture_service {
        let unique = chat_rig::unique_name("bench");
        let service = ServiceProcess::start(
            "chat-service",
            &fixture_config(&upstream, &unique, settings.websockets),
            rig,
            dir,
        )
        .await?;
        eprintln!(
            "[bench] chat-service pid {} log {}",
            service.pid,
            service.log.display()
        );
        if settings.runs("memory") {
            scenarios::memory::memory(&service, &upstream, settings, &mut report).await?;
        }
        if settings.runs("latency") {
            scenarios::latency::latency(&service, &upstream, settings, &mut report).await?;
        }
        report.row(
            "RSS at the end of the fixture runs (peak VmHWM)",
            "-".into(),
            format!(
                "{} MiB (peak {})",
                f1(service.rss_mib()),
                f1(service.peak_rss_mib())
            ),
            "-".into(),
        );
    }
    if settings.runs("history") {
        // A fresh process on empty stores, as the raw side starts on an empty database.
        let unique = chat_rig::unique_name("bench-history");
        let service = ServiceProcess::start(
            "chat-service-history",
            &fixture_config(&upstream, &unique, settings.websockets),
            rig,
            dir,
        )
        .await?;
        scenarios::history::history(&service, &upstream, rig, settings, &mut report).await?;
    }
    if settings.runs("instructions") {
        scenarios::instructions::instructions(rig, dir, &upstream, &mut report).await?;
    }
    if settings.runs("model") {
        scenarios::model::model(rig, dir, settings, &mut report).await?;
    }
    report.json.insert(
        "machine".into(),
        json!({
            "cores": service::cores(),
            "loadavg_before": load_before,
            "loadavg_after": procfs::load_average(),
            "pinning": service::pinning().map_or("not pinned".to_string(), |p| p.describe()),
        }),
    );
    Ok(report)
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; a harness listing (`--list`) gets nothing.
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let settings = Settings::from_env()?;
    // Before any thread exists, so that every thread of this process (load generator, fixture,
    // rig clients) inherits the mask.
    service::pin_this_process()?;
    let parts = if settings.runs("model") {
        "redis,mongodb,ollama"
    } else {
        "redis,mongodb"
    };
    let rig = Rig::attach_or_start("bench-gateway", chat_rig::Parts::parse(parts)?)?;
    let dir = chat_rig::scratch_dir("bench-gateway")?;
    eprintln!("[bench] logs and configs in {}", dir.display());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = runtime.block_on(bench(&rig, &settings, &dir));
    drop(runtime);
    let mut report = report?;
    let table = report.table();
    let machine = &report.json["machine"];
    println!(
        "\nchat-service benchmark, {} cores, {}, load average before {} / after {}\n{table}",
        machine["cores"],
        machine["pinning"].as_str().unwrap_or("-"),
        machine["loadavg_before"],
        machine["loadavg_after"]
    );
    report.json.insert("table".into(), json!(table));
    let out_dir = Path::new(WORKSPACE).join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let out = out_dir.join("chat-service.json");
    std::fs::write(&out, serde_json::to_string_pretty(&report.json)?)?;
    println!("results: {}", out.canonicalize().unwrap_or(out).display());
    drop(rig);
    Ok(())
}
