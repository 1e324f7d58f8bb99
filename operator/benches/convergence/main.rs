//! Benchmark (not a test): the operator at scale, issue 7 item 4.
//!
//! Against the rig's real kube-apiserver and kube-controller-manager (started by this benchmark,
//! stopped when it ends), the release `chat-operator` binary runs as a subprocess. The benchmark
//! creates N ChatServices (default 500, like `examples/minimal.yaml`: managed Redis and MongoDB,
//! one external back end) spread over M namespaces, then measures:
//!
//! * time until every ChatService has a status, and until every one has all its children and a
//!   status whose `observedGeneration` is current ("converged");
//! * the operator's peak RSS (`VmHWM` in `/proc/<pid>/status`);
//! * the writes one full resync of the converged objects makes, twice over: the write requests
//!   kube-apiserver received (its own `apiserver_request_total`, before and after) and the objects
//!   that actually changed (resourceVersions of every ChatService and child, before and after);
//! * the same after an operator restart (a restart re-lists and re-reconciles everything).
//!
//! Run: `cargo bench -p chat-operator --bench convergence` (after `tests/rig/install.sh`).
//! Knobs (environment): `CHATOP_BENCH_CHATSERVICES` (500), `CHATOP_BENCH_NAMESPACES` (10),
//! `CHATOP_BENCH_RESYNC_SECONDS` (30), `CHATOP_BENCH_RESYNC_WINDOWS` (3),
//! `CHATOP_BENCH_MAX_CONCURRENT_RECONCILES` (the operator's default), `CHATOP_BENCH_OPERATOR_BIN`
//! (another operator binary, for A/B runs with the same benchmark).
//! What does not meet its target is reported in the table, not raised as an error. With `CHATOP_RIG_ENV`
//! set it attaches to a standing `rig up` instead of starting a control plane.
//! Output: a table on stdout and `target/bench/operator-convergence.json`.

mod objects;
mod operator_process;
mod phases;
mod report;
mod requests;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use chat_rig::{Parts, Rig, knobs};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ObjectMeta, PostParams};
use serde_json::Value;

use operator_process::OperatorProcess;
use phases::{create_and_converge, restart, resync_window, settle, widen_service_ips};
use report::Results;
use requests::idle_baseline;

const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const RUN_LABEL: &str = "bench.chatoperator.dev/run";

pub struct Settings {
    pub count: usize,
    pub namespaces: usize,
    pub resync_seconds: u64,
    pub windows: usize,
    /// `--max-concurrent-reconciles` for the operator; its default when unset.
    pub concurrency: Option<u16>,
}

impl Settings {
    fn from_env() -> Result<Self> {
        Ok(Self {
            count: knobs::get("CHATOP_BENCH_CHATSERVICES", 500)?,
            namespaces: knobs::get("CHATOP_BENCH_NAMESPACES", 10usize)?.max(1),
            resync_seconds: knobs::get("CHATOP_BENCH_RESYNC_SECONDS", 30u64)?.max(1),
            windows: knobs::get("CHATOP_BENCH_RESYNC_WINDOWS", 3usize)?.max(1),
            concurrency: knobs::optional("CHATOP_BENCH_MAX_CONCURRENT_RECONCILES")?,
        })
    }
}

fn concurrency_label(settings: &Settings) -> String {
    match settings.concurrency {
        Some(n) => n.to_string(),
        None => format!(
            "{} (default)",
            chat_operator::controller::DEFAULT_MAX_CONCURRENT_RECONCILES
        ),
    }
}

async fn bench(rig: &Rig, settings: &Settings, logs: &Path) -> Result<Value> {
    let admin = rig.kube_client().await;
    let crd = std::fs::read_to_string(format!("{WORKSPACE}/crds/chatservice.yaml"))?;
    chat_rig::crd::install(&admin, &serde_yaml::from_str(&crd)?, "chat-operator-bench")
        .await
        .context("installing crds/chatservice.yaml")?;
    let run = chat_rig::unique_name("conv");
    let namespaces: Vec<String> = (0..settings.namespaces)
        .map(|i| chat_rig::unique_name(&format!("bench{i:02}")))
        .collect();
    for ns in &namespaces {
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(ns.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(admin.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .with_context(|| format!("creating namespace {ns}"))?;
    }
    widen_service_ips(&admin).await?;
    let namespace_set: BTreeSet<String> = namespaces.iter().cloned().collect();
    let kubeconfig = rig.kubeconfig_path().to_path_buf();

    // Baseline: what the control plane writes with no operator running.
    let baseline_seconds = settings.resync_seconds.min(30);
    eprintln!("[bench] {baseline_seconds} s idle baseline (no operator)");
    let baseline = idle_baseline(&admin, baseline_seconds).await?;

    // 1. Converge.
    let mut operator = OperatorProcess::start(&kubeconfig, settings, &logs.join("operator-1.log"))?;
    operator.reconciles().await?; // up and serving
    let idle_rss = operator.rss();
    let mut sampled_peak = idle_rss;
    eprintln!(
        "[bench] operator up (pid {}), creating {} ChatServices in {} namespaces",
        operator.pid(),
        settings.count,
        settings.namespaces
    );
    let converged = create_and_converge(
        &admin,
        settings,
        &run,
        &namespaces,
        &mut operator,
        &mut sampled_peak,
    )
    .await?;
    let peak_at_convergence = operator.peak_rss();
    eprintln!(
        "[bench] converged in {:.1} s; peak RSS so far {:.1} MiB",
        converged.converged_s,
        chat_rig::procfs::mib(peak_at_convergence)
    );

    // 2. Settle (kube-controller-manager reports workload status, the operator follows).
    let settled = settle(
        &mut operator,
        Duration::from_secs(15),
        // kube-controller-manager creates the ReplicaSets and pods at its own client rate limit
        // (20 requests/s by default), and the ChatService status rightly follows each workload
        // status it writes: minutes for 500 ChatServices on a busy machine.
        Duration::from_secs(300),
    )
    .await?;
    eprintln!(
        "[bench] quiet={} after {:.0} s: {} reconciles, {} status writes; triggers {}",
        settled.quiet,
        settled.seconds,
        settled.total.reconciles,
        settled.total.status_writes,
        settled.total.triggers()
    );

    // 3. Periodic resyncs of the converged objects.
    let mut windows = Vec::new();
    for i in 0..settings.windows {
        let window = resync_window(
            &admin,
            &run,
            &namespace_set,
            &mut operator,
            settings.count,
            Duration::from_secs(settings.resync_seconds * 3 + 60),
        )
        .await?;
        eprintln!(
            "[bench] resync {}: {} reconciles in {:.1} s, write requests {}, objects changed {}",
            i + 1,
            window.reconciles,
            window.seconds,
            window.writes.summary(),
            window.changes.summary()
        );
        windows.push(window);
    }
    let steady_rss = operator.rss();
    let peak_rss = operator.stop();

    // 4. Restart.
    eprintln!("[bench] restarting the operator");
    let restarted = restart(
        &admin,
        &run,
        &namespace_set,
        settings,
        &kubeconfig,
        &logs.join("operator-2.log"),
    )
    .await?;
    eprintln!(
        "[bench] restart: {} reconciles, write requests {}, objects changed {}",
        restarted.window.reconciles,
        restarted.window.writes.summary(),
        restarted.window.changes.summary()
    );
    let results = Results {
        baseline_seconds,
        baseline,
        converged,
        settled,
        windows,
        restarted,
        idle_rss,
        sampled_peak,
        peak_at_convergence,
        steady_rss,
        peak_rss,
    };
    Ok(report::publish(settings, &results))
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; `cargo test --benches` would pass nothing useful either.
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let settings = Settings::from_env()?;
    let rig = Rig::attach_or_start("bench-convergence", Parts::parse("kubernetes")?)?;
    let logs: PathBuf = chat_rig::scratch_dir("bench-convergence-logs")?;
    eprintln!("[bench] operator logs in {}", logs.display());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(bench(&rig, &settings, &logs));
    drop(runtime);
    let result = result?;
    let out_dir = Path::new(WORKSPACE).join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let out = out_dir.join("operator-convergence.json");
    std::fs::write(&out, serde_json::to_string_pretty(&result)?)?;
    println!("results: {}", out.canonicalize().unwrap_or(out).display());
    // The rig (if this process started it) stops here, on drop.
    drop(rig);
    Ok(())
}
