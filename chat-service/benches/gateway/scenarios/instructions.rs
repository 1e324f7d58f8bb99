//! Instructions per request (`CHATOP_BENCH_ONLY=instructions`): the service under callgrind,
//! which counts the user-space instructions every thread of it executes. Unlike CPU time the
//! count does not depend on what else the machine runs, so two builds (`CHATOP_BENCH_SERVICE_BIN`)
//! can be compared on a busy machine (repeated runs of one build differ by under 1 %).
//!
//! The fixture answers at once (8 words, no pauses): the same stateless `POST
//! /v1/chat/completions` the latency part sends, non-streaming and streamed, one request at a
//! time on one keep-alive connection. Per mode: `CHATOP_BENCH_INSTR_WARMUP` requests (default
//! 100) that are not counted (connection pools, lazy statics, the allocator's arenas), the
//! counters zeroed, `CHATOP_BENCH_INSTR_REQUESTS` (default 500) counted, and a dump. Kernel time
//! (TCP, wake-ups) is not in the figure: that is what the open-model CPU figures add.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chat_rig::{Rig, knobs};
use serde_json::json;

use crate::load::Target;
use crate::report::Report;
use crate::service::{ServiceProcess, fixture_config};
use crate::upstream::{FixedLatencyUpstream, Shape};

pub async fn instructions(
    rig: &Rig,
    dir: &Path,
    upstream: &FixedLatencyUpstream,
    report: &mut Report,
) -> Result<()> {
    let warmup: usize = knobs::get("CHATOP_BENCH_INSTR_WARMUP", 100)?;
    let requests: usize = knobs::get("CHATOP_BENCH_INSTR_REQUESTS", 500)?;
    if requests == 0 {
        bail!("CHATOP_BENCH_INSTR_REQUESTS must be at least 1");
    }
    for tool in ["valgrind", "callgrind_control"] {
        if Command::new(tool).arg("--version").output().is_err() {
            bail!("the instructions part needs `{tool}` (Debian's valgrind package) on PATH");
        }
    }
    upstream.set_shape(Shape {
        delay: Duration::ZERO,
        chunks: 8,
        gap: Duration::ZERO,
    });
    let out = dir.join("callgrind.out");
    let wrapper = [
        "valgrind".to_string(),
        "--tool=callgrind".into(),
        "--instr-atstart=no".into(),
        format!("--callgrind-out-file={}", out.display()),
    ];
    let unique = chat_rig::unique_name("bench-instr");
    // Under valgrind the service starts some ten times slower than alone.
    let service = ServiceProcess::start_under(
        "chat-service-callgrind",
        &fixture_config(upstream, &unique, 0),
        rig,
        dir,
        &wrapper,
        Duration::from_secs(300),
    )
    .await?;
    eprintln!(
        "[bench] chat-service under callgrind, pid {} log {}",
        service.pid,
        service.log.display()
    );
    control(service.pid, "--instr=on")?;
    let mut figures = serde_json::Map::new();
    for stream in [false, true] {
        let mode = if stream { "streamed" } else { "non-streaming" };
        let target = Arc::new(Target {
            client: Target::client(),
            url: format!("{}/v1/chat/completions", service.base),
            body: crate::scenarios::latency::completion_body(stream),
            headers: vec![],
            stream,
        });
        sequential(&target, warmup).await?;
        control(service.pid, "--zero")?;
        let started = Instant::now();
        sequential(&target, requests).await?;
        let seconds = started.elapsed().as_secs_f64();
        let before = dumps(&out)?;
        control(service.pid, "--dump")?;
        let dump = new_dump(&out, &before).await?;
        let total = total_instructions(&dump)?;
        let per_request = total as f64 / requests as f64;
        eprintln!(
            "[bench] callgrind, {mode}: {total} instructions over {requests} requests ({per_request:.0} per request, {seconds:.1} s under valgrind), dump {}",
            dump.display()
        );
        report.row(
            &format!("user-space instructions per {mode} request (callgrind, concurrency 1)"),
            "-".into(),
            format!("{per_request:.0} ({requests} requests, {warmup} warm-up)"),
            "-".into(),
        );
        figures.insert(
            mode.into(),
            json!({
                "requests": requests,
                "warmup": warmup,
                "instructions": total,
                "per_request": per_request,
                "dump": dump,
            }),
        );
    }
    report.json.insert("instructions".into(), figures.into());
    Ok(())
}

/// `n` requests one after the other; any failure ends the part (a count over failed requests
/// would compare error paths).
async fn sequential(target: &Arc<Target>, n: usize) -> Result<()> {
    for i in 0..n {
        let outcome = target.clone().send(Instant::now()).await;
        if let Some(error) = outcome.error {
            bail!("request {i} of {n} through the service under callgrind failed: {error}");
        }
    }
    Ok(())
}

fn control(pid: u32, what: &str) -> Result<()> {
    let output = Command::new("callgrind_control")
        .arg(what)
        .arg(pid.to_string())
        .output()
        .context("running callgrind_control")?;
    if !output.status.success() {
        bail!(
            "callgrind_control {what} {pid} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// The dump files callgrind has written for `out` (`out.1`, `out.2`, ...).
fn dumps(out: &Path) -> Result<Vec<PathBuf>> {
    let dir = out.parent().context("callgrind output has no folder")?;
    let prefix = format!(
        "{}.",
        out.file_name().context("no file name")?.to_string_lossy()
    );
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)?.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            found.push(entry.path());
        }
    }
    Ok(found)
}

/// The dump that `--dump` wrote (callgrind_control returns before the file is complete: wait
/// for its totals line).
async fn new_dump(out: &Path, before: &[PathBuf]) -> Result<PathBuf> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for path in dumps(out)? {
            if !before.contains(&path) && total_instructions(&path).is_ok() {
                return Ok(path);
            }
        }
        if Instant::now() > deadline {
            bail!(
                "callgrind wrote no complete dump next to {} within 60 s",
                out.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The first event (Ir, instructions executed) of a dump's `summary:` or `totals:` line.
fn total_instructions(dump: &Path) -> Result<u64> {
    let text = std::fs::read_to_string(dump)?;
    text.lines()
        .find_map(|line| {
            line.strip_prefix("summary:")
                .or_else(|| line.strip_prefix("totals:"))
        })
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no summary line in {}", dump.display()))
}
