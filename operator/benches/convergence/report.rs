//! The benchmark's results as a table on stdout (medians over the resync windows, each figure
//! beside its target and verdict) and as the JSON written to `target/bench`.

use chat_rig::procfs::{load_average, mib};
use serde_json::{Value, json};

use crate::phases::{Convergence, Restart, Settle, Window, median};
use crate::requests::{WRITE_VERBS, Writes};
use crate::{Settings, concurrency_label};

/// Everything the run measured.
pub struct Results {
    pub baseline_seconds: u64,
    pub baseline: Writes,
    pub converged: Convergence,
    pub settled: Settle,
    pub windows: Vec<Window>,
    pub restarted: Restart,
    pub idle_rss: u64,
    pub sampled_peak: u64,
    pub peak_at_convergence: u64,
    pub steady_rss: u64,
    pub peak_rss: u64,
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

/// Prints the table and returns the JSON report.
pub fn publish(settings: &Settings, results: &Results) -> Value {
    // Named as the figures are named in the table and the JSON.
    let (windows, converged, restarted) =
        (&results.windows, &results.converged, &results.restarted);
    let (baseline, baseline_seconds) = (&results.baseline, results.baseline_seconds);
    let settled = &results.settled;
    let (idle_rss, sampled_peak, steady_rss, peak_rss) = (
        results.idle_rss,
        results.sampled_peak,
        results.steady_rss,
        results.peak_rss,
    );
    let peak_at_convergence = results.peak_at_convergence;
    // Medians over the resync windows.
    let med = |f: &dyn Fn(&Window) -> f64| median(&mut windows.iter().map(f).collect::<Vec<_>>());
    let resync_writes = med(&|w| w.writes.total() as f64);
    let resync_brief = med(&|w| w.writes.brief() as f64);
    let resync_apply = med(&|w| w.writes.by_verb().get("APPLY").copied().unwrap_or(0) as f64);
    let resync_changed = med(&|w| w.changes.rv_changed() as f64);
    let resync_operator_changed = med(&|w| w.changes.operator_changed() as f64);
    let resync_reconciles = med(&|w| w.reconciles as f64);
    let resync_own = med(&|w| w.own.writes() as f64);
    let per_reconcile = resync_apply / resync_reconciles.max(1.0);
    let resync_status_writes = med(&|w| w.activity.status_writes as f64);
    // Reconciles per ChatService per minute while nothing changes: the resync alone is
    // 60 / resync_seconds.
    let per_object_minute =
        med(&|w| w.reconciles as f64 / settings.count.max(1) as f64 / (w.seconds / 60.0).max(1e-9));
    let resync_alone = 60.0 / settings.resync_seconds as f64;
    let restart_minutes = restarted.window.seconds / 60.0;

    let count = settings.count;
    let rows: Vec<(String, String, String, String)> = vec![
        (
            format!("create {count} ChatServices (16 in flight)"),
            format!("{:.1} s", converged.created_s),
            "-".into(),
            "-".into(),
        ),
        (
            "first status: earliest / median / all".into(),
            format!(
                "{:.1} / {:.1} / {:.1} s",
                converged.first_status_earliest_s,
                converged.first_status_median_s,
                converged.first_status_all_s
            ),
            "-".into(),
            "-".into(),
        ),
        (
            format!(
                "all converged (children x{} + current observedGeneration)",
                converged.children_per_chatservice
            ),
            match &converged.failure {
                None => format!("{:.1} s", converged.converged_s),
                Some(why) => why.clone(),
            },
            "<= 25 s".into(),
            verdict(converged.converged_s <= 25.0).into(),
        ),
        (
            format!(
                "settle: operator quiet (no write for 15 s) / reconciles / status writes ({} x 15 s samples in the JSON)",
                settled.samples.len()
            ),
            format!(
                "{} after {:.0} s / {} / {}",
                if settled.quiet { "yes" } else { "NO" },
                settled.seconds,
                settled.total.reconciles,
                settled.total.status_writes
            ),
            "-".into(),
            "-".into(),
        ),
        (
            "settle: watch events that triggered a reconcile, by source".into(),
            settled.total.triggers(),
            "-".into(),
            "-".into(),
        ),
        (
            "operator RSS: idle / peak (VmHWM) / steady".into(),
            format!(
                "{:.1} / {:.1} / {:.1} MiB",
                mib(idle_rss),
                mib(peak_rss),
                mib(steady_rss)
            ),
            "<= 96 MiB".into(),
            verdict(mib(peak_rss) <= 96.0).into(),
        ),
        (
            "operator peak RSS after restart (VmHWM)".into(),
            format!("{:.1} MiB", mib(restarted.peak_rss)),
            "<= 96 MiB".into(),
            verdict(mib(restarted.peak_rss) <= 96.0).into(),
        ),
        (
            format!(
                "resync ({}x, median): reconciles / seconds{}",
                windows.len(),
                if windows.iter().all(|w| w.complete) {
                    ""
                } else {
                    " (a window timed out)"
                }
            ),
            format!("{resync_reconciles:.0} / {:.1} s", med(&|w| w.seconds)),
            "-".into(),
            "-".into(),
        ),
        (
            "resync: reconciles per ChatService per minute (the resync alone)".into(),
            format!("{per_object_minute:.2} ({resync_alone:.2})"),
            format!("~{resync_alone:.2}"),
            verdict(per_object_minute <= resync_alone * 1.1).into(),
        ),
        (
            "resync: status writes (median) / triggers in window 1".into(),
            format!(
                "{resync_status_writes:.0} / {}",
                windows
                    .first()
                    .map(|w| w.activity.triggers())
                    .unwrap_or_default()
            ),
            "0".into(),
            verdict(resync_status_writes == 0.0).into(),
        ),
        (
            "resync: the operator's own write requests (its client's counter)".into(),
            format!(
                "{resync_own:.0}; window 1: {}",
                windows.first().map(|w| w.own.summary()).unwrap_or_default()
            ),
            "0".into(),
            verdict(resync_own == 0.0).into(),
        ),
        (
            "resync: write requests at kube-apiserver, all clients, all write verbs".into(),
            format!(
                "{resync_writes:.0} (APPLY {resync_apply:.0}, {per_reconcile:.1} per reconcile)"
            ),
            "-".into(),
            "-".into(),
        ),
        (
            "resync: the same, POST/PUT/PATCH/DELETE only".into(),
            format!("{resync_brief:.0}"),
            "-".into(),
            "-".into(),
        ),
        (
            "resync: API read requests (GET + LIST)".into(),
            format!(
                "{:.0} ({:.1} per reconcile)",
                med(&|w| w.reads as f64),
                med(&|w| w.reads as f64) / resync_reconciles.max(1.0)
            ),
            "-".into(),
            "-".into(),
        ),
        (
            "resync: objects changed (resourceVersion) / by the operator".into(),
            format!("{resync_changed:.0} / {resync_operator_changed:.0}"),
            "0".into(),
            verdict(resync_operator_changed == 0.0).into(),
        ),
        (
            format!(
                "restart: {} reconciles (all started by {:.1} s); the operator's own writes",
                restarted.window.reconciles, restarted.all_reconciled_s
            ),
            restarted.window.own.summary(),
            "0".into(),
            verdict(restarted.window.own.writes() == 0).into(),
        ),
        (
            format!(
                "restart: reconciles per ChatService per minute; status writes{}",
                if restarted.window.complete {
                    ""
                } else {
                    " (still writing at 300 s)"
                }
            ),
            format!(
                "{:.2} over {:.0} s; {}",
                restarted.window.reconciles as f64
                    / settings.count.max(1) as f64
                    / restart_minutes.max(1e-9),
                restarted.window.seconds,
                restarted.window.activity.status_writes
            ),
            "-".into(),
            "-".into(),
        ),
        (
            "restart: write requests at kube-apiserver, all clients".into(),
            restarted.window.writes.summary(),
            "-".into(),
            "-".into(),
        ),
        (
            "restart: objects changed (resourceVersion) / by the operator".into(),
            format!(
                "{} / {}",
                restarted.window.changes.rv_changed(),
                restarted.window.changes.operator_changed()
            ),
            "0".into(),
            verdict(restarted.window.changes.operator_changed() == 0).into(),
        ),
        (
            format!("baseline: control-plane writes in {baseline_seconds} s, no operator"),
            baseline.summary(),
            "-".into(),
            "-".into(),
        ),
    ];
    let widths = rows.iter().fold([6, 5, 6, 7], |w, r| {
        [
            w[0].max(r.0.len()),
            w[1].max(r.1.len()),
            w[2].max(r.2.len()),
            w[3].max(r.3.len()),
        ]
    });
    println!();
    println!(
        "Operator convergence: {count} ChatServices (examples/minimal.yaml) in {} namespaces, resync {} s, max concurrent reconciles {}, {} cores, load average at the end {}",
        settings.namespaces,
        settings.resync_seconds,
        concurrency_label(settings),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average()
    );
    println!(
        "| {:w0$} | {:w1$} | {:w2$} | {:w3$} |",
        "metric",
        "value",
        "target",
        "verdict",
        w0 = widths[0],
        w1 = widths[1],
        w2 = widths[2],
        w3 = widths[3]
    );
    println!(
        "|{}|{}|{}|{}|",
        "-".repeat(widths[0] + 2),
        "-".repeat(widths[1] + 2),
        "-".repeat(widths[2] + 2),
        "-".repeat(widths[3] + 2)
    );
    for r in &rows {
        println!(
            "| {:w0$} | {:w1$} | {:w2$} | {:w3$} |",
            r.0,
            r.1,
            r.2,
            r.3,
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3]
        );
    }
    println!();

    json!({
        "benchmark": "operator-convergence",
        "settings": {
            "chatservices": count,
            "namespaces": settings.namespaces,
            "resync_seconds": settings.resync_seconds,
            "resync_windows": settings.windows,
            "max_concurrent_reconciles": concurrency_label(settings),
            "load_average_at_end": load_average(),
            "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "operator_binary": crate::operator_process::operator_binary(),
            "write_verbs": WRITE_VERBS,
        },
        "convergence": {
            "create_s": converged.created_s,
            "first_status_earliest_s": converged.first_status_earliest_s,
            "first_status_median_s": converged.first_status_median_s,
            "first_status_all_s": converged.first_status_all_s,
            "converged_s": converged.converged_s,
            "children_per_chatservice": converged.children_per_chatservice,
            "polls": converged.polls,
            "current_at_end": converged.current,
            "failure": converged.failure,
            "target_s": 25,
        },
        "settle": {
            "seconds": settled.seconds,
            "quiet": settled.quiet,
            "total": settled.total.json(),
            "samples": settled.samples.iter().map(|(t, a)| json!({"at_s": t, "activity": a.json()})).collect::<Vec<_>>(),
        },
        "rss": {
            "idle_bytes": idle_rss,
            "peak_bytes": peak_rss,
            "peak_at_convergence_bytes": peak_at_convergence,
            "peak_sampled_during_convergence_bytes": sampled_peak,
            "steady_bytes": steady_rss,
            "restart_peak_bytes": restarted.peak_rss,
            "target_bytes": 96 * 1048576,
        },
        "resync": {
            "windows": windows.iter().map(Window::json).collect::<Vec<_>>(),
            "median_operator_own_write_requests": resync_own,
            "median_write_requests": resync_writes,
            "median_post_put_patch_delete": resync_brief,
            "median_apply": resync_apply,
            "median_objects_changed": resync_changed,
            "median_objects_changed_by_operator": resync_operator_changed,
            "median_reconciles": resync_reconciles,
            "median_status_writes": resync_status_writes,
            "median_reconciles_per_chatservice_per_minute": per_object_minute,
        },
        "restart": {
            "all_reconciled_s": restarted.all_reconciled_s,
            "window": restarted.window.json(),
        },
        "baseline_no_operator": {"seconds": baseline_seconds, "write_requests": baseline.json()},
    })
}
