//! Part 1: added latency on the stateless OpenAI path, the fixture directly vs through the
//! service: at concurrency 1 (sequential requests on a fixture that answers at once, so the
//! difference is the service's own time), then open model at constant rates, non-streaming and
//! streaming, each rate warmed up at that rate, with the service's and the bench's own CPU time
//! per request, and the highest rate whose added p99 stays under 5 ms.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use serde_json::{Value, json};

use crate::load::{Samples, Target, open_loop, quantile};
use crate::report::{Report, f2, signed};
use crate::service::ServiceProcess;
use crate::upstream::{FixedLatencyUpstream, Shape};
use crate::{FIXTURE_MODEL, Settings};

use chat_rig::procfs;

pub fn completion_body(stream: bool) -> bytes::Bytes {
    json!({
        "model": FIXTURE_MODEL,
        "messages": [{"role": "user", "content": "Say something short."}],
        "max_tokens": 16,
        "stream": stream,
    })
    .to_string()
    .into()
}

struct RatePoint {
    rate: f64,
    direct: Samples,
    service: Samples,
    service_cpu_us_per_request: f64,
    /// This process (load generator and fixture) during the service runs: if it is near a
    /// whole core, the frontier is the generator's, not the service's.
    bench_cpu_us_per_request: f64,
}

impl RatePoint {
    fn added(&self, pick: fn(&Samples) -> &Vec<f64>, p: f64) -> f64 {
        quantile(pick(&self.service), p) - quantile(pick(&self.direct), p)
    }

    fn error_rate(&self) -> f64 {
        (self.direct.errors + self.service.errors) as f64
            / (self.direct.sent + self.service.sent).max(1) as f64
    }

    fn primary(stream: bool) -> fn(&Samples) -> &Vec<f64> {
        if stream {
            |s| &s.first_token_ms
        } else {
            |s| &s.latency_ms
        }
    }

    fn within_frontier(&self, stream: bool) -> bool {
        self.added(Self::primary(stream), 0.99) < 5.0 && self.error_rate() < 0.001
    }

    fn json(&self) -> Value {
        json!({
            "rate": self.rate,
            "direct": self.direct.summary(),
            "service": self.service.summary(),
            "service_cpu_us_per_request": self.service_cpu_us_per_request,
            "bench_cpu_us_per_request": self.bench_cpu_us_per_request,
        })
    }
}

pub async fn latency(
    service: &ServiceProcess,
    upstream: &FixedLatencyUpstream,
    settings: &Settings,
    report: &mut Report,
) -> Result<()> {
    let client = reqwest::Client::new();
    let store_ops_before = service.request_store_operations(&client).await?;
    if settings.sequential > 0 {
        sequential(service, upstream, settings, report).await?;
    }
    let shape = Shape {
        delay: Duration::from_millis(20),
        chunks: 8,
        gap: Duration::from_millis(2),
    };
    upstream.set_shape(shape);
    let mut modes = serde_json::Map::new();
    for stream in [false, true] {
        let mode = if stream { "streaming" } else { "non-streaming" };
        let target = |base: &str| {
            Arc::new(Target {
                client: Target::client(),
                url: format!("{base}/v1/chat/completions"),
                body: completion_body(stream),
                headers: vec![],
                stream,
            })
        };
        let direct = target(&upstream.url());
        let via = target(&service.base);
        // Warm both connection pools and the service.
        for t in [&direct, &via] {
            let t = t.clone();
            open_loop(500.0, Duration::from_secs(1), move |s| t.clone().send(s)).await;
        }
        let mut points: Vec<RatePoint> = Vec::new();
        for &rate in &settings.rates {
            let per_path = settings.seconds.max(1500.0 / rate);
            let half = Duration::from_secs_f64(per_path / 2.0);
            // Warm-up at the rate measured: connection pools, the service's allocator and its
            // runtime's threads reach that rate's steady state before anything counts.
            for t in [&direct, &via] {
                let t = t.clone();
                open_loop(rate, Duration::from_secs(1), move |s| t.clone().send(s)).await;
            }
            let mut point = RatePoint {
                rate,
                direct: Samples::default(),
                service: Samples::default(),
                service_cpu_us_per_request: 0.0,
                bench_cpu_us_per_request: 0.0,
            };
            let mut cpu = 0.0;
            let mut bench_cpu = 0.0;
            let bench_pid = std::process::id();
            // Baseline and service alternate, twice, so that drift in the machine's load falls
            // on both.
            for _ in 0..2 {
                let d = direct.clone();
                point
                    .direct
                    .merge(open_loop(rate, half, move |s| d.clone().send(s)).await);
                let v = via.clone();
                let before = service.cpu_seconds();
                let bench_before = procfs::cpu_seconds(bench_pid).unwrap_or(0.0);
                point
                    .service
                    .merge(open_loop(rate, half, move |s| v.clone().send(s)).await);
                cpu += service.cpu_seconds() - before;
                bench_cpu += procfs::cpu_seconds(bench_pid).unwrap_or(0.0) - bench_before;
            }
            point.service_cpu_us_per_request = cpu * 1e6 / point.service.sent.max(1) as f64;
            point.bench_cpu_us_per_request = bench_cpu * 1e6 / point.service.sent.max(1) as f64;
            let primary = RatePoint::primary(stream);
            eprintln!(
                "[bench] {mode} {rate} rps: added p50 {:.2} ms p99 {:.2} ms, errors {}/{} (first: {:?}), service CPU {:.0} us/request, bench CPU {:.0} us/request, load {}",
                point.added(primary, 0.5),
                point.added(primary, 0.99),
                point.direct.errors + point.service.errors,
                point.direct.sent + point.service.sent,
                point
                    .service
                    .first_error
                    .as_ref()
                    .or(point.direct.first_error.as_ref()),
                point.service_cpu_us_per_request,
                point.bench_cpu_us_per_request,
                procfs::load_average(),
            );
            let beyond = rate > 2000.0 && !point.within_frontier(stream);
            points.push(point);
            if beyond {
                break;
            }
        }
        let frontier = points
            .iter()
            .take_while(|p| p.within_frontier(stream) || p.rate <= 2000.0)
            .filter(|p| p.within_frontier(stream))
            .map(|p| p.rate)
            .fold(0.0, f64::max);
        let primary = RatePoint::primary(stream);
        let what = if stream {
            "time to first token"
        } else {
            "latency"
        };
        for p in &points {
            let (p50, p99) = (p.added(primary, 0.5), p.added(primary, 0.99));
            let cell = |s: &Samples| {
                format!(
                    "p50 {} / p99 {} ms, err {}",
                    f2(quantile(primary(s), 0.5)),
                    f2(quantile(primary(s), 0.99)),
                    s.errors
                )
            };
            let metric = format!("{mode} {what} @ {} rps", p.rate);
            let added = format!("p50 {} / p99 {} ms", signed(p50), signed(p99));
            let service_cell = format!(
                "{}; CPU {:.0} us/req (bench {:.0})",
                cell(&p.service),
                p.service_cpu_us_per_request,
                p.bench_cpu_us_per_request
            );
            if p.rate == 6000.0 && !stream {
                report.judged(
                    &metric,
                    cell(&p.direct),
                    service_cell,
                    added,
                    "added p99 <= 1 ms",
                    p99 <= 1.0 && p.error_rate() < 0.001,
                );
            } else if p.rate == 2000.0 {
                let target = if stream { 160.0 } else { 80.0 };
                report.judged(
                    &metric,
                    cell(&p.direct),
                    service_cell,
                    added,
                    &format!("service CPU <= {target:.0} us/req"),
                    p.service_cpu_us_per_request <= target,
                );
            } else {
                report.row(&metric, cell(&p.direct), service_cell, added);
            }
            if stream {
                let gaps = |s: &Samples| {
                    format!(
                        "p50 {} / p99 {} ms",
                        f2(quantile(&s.gap_ms, 0.5)),
                        f2(quantile(&s.gap_ms, 0.99))
                    )
                };
                report.row(
                    &format!("  inter-chunk gap @ {} rps", p.rate),
                    gaps(&p.direct),
                    gaps(&p.service),
                    format!(
                        "p50 {} / p99 {} ms",
                        signed(p.added(|s| &s.gap_ms, 0.5)),
                        signed(p.added(|s| &s.gap_ms, 0.99))
                    ),
                );
            }
        }
        let cpu = points
            .iter()
            .map(|p| p.service_cpu_us_per_request)
            .collect::<Vec<_>>();
        report.row(
            &format!("{mode}: service CPU per request (median over rates)"),
            "-".into(),
            format!("{:.0} us", quantile(&cpu, 0.5)),
            "-".into(),
        );
        let frontier_target = if stream { 4000.0 } else { 8000.0 };
        report.judged(
            &format!("{mode}: frontier (highest rate, added p99 < 5 ms, errors < 0.1%)"),
            "-".into(),
            format!("{frontier} rps"),
            "-".into(),
            &format!(">= {frontier_target} rps"),
            frontier >= frontier_target,
        );
        modes.insert(
            mode.into(),
            json!({
                "frontier_rps": frontier,
                "points": points.iter().map(RatePoint::json).collect::<Vec<_>>(),
            }),
        );
    }
    let store_ops = service.request_store_operations(&client).await? - store_ops_before;
    report.judged(
        "stateless path: history store operations during the runs",
        "-".into(),
        format!("{store_ops}"),
        "-".into(),
        "0",
        store_ops == 0.0,
    );
    report.json.insert(
        "added_latency".into(),
        json!({
            "fixture": format!("FixedLatencyUpstream: {}", shape.describe()),
            "path": "POST /v1/chat/completions without x-session-id or user (stateless)",
            "history_store_operations": store_ops,
            "modes": modes,
        }),
    );
    Ok(())
}

/// Added latency at concurrency 1: one request at a time, non-streaming, on a fixture that
/// answers at once (8 chunks' worth of words, no pauses), so the difference between the two
/// sides is the service's own time per request. The sides alternate in four blocks.
async fn sequential(
    service: &ServiceProcess,
    upstream: &FixedLatencyUpstream,
    settings: &Settings,
    report: &mut Report,
) -> Result<()> {
    upstream.set_shape(Shape {
        delay: Duration::ZERO,
        chunks: 8,
        gap: Duration::ZERO,
    });
    let target = |base: &str| {
        Arc::new(Target {
            client: Target::client(),
            url: format!("{base}/v1/chat/completions"),
            body: completion_body(false),
            headers: vec![],
            stream: false,
        })
    };
    let direct = target(&upstream.url());
    let via = target(&service.base);
    let block = settings.sequential.div_ceil(2);
    let run = |t: Arc<Target>, n: usize| async move {
        let mut samples = Samples::default();
        for _ in 0..n {
            samples.add(t.clone().send(std::time::Instant::now()).await);
        }
        samples
    };
    // Warm-up, then direct / service / direct / service.
    run(direct.clone(), 500).await;
    run(via.clone(), 500).await;
    let (mut d, mut v) = (Samples::default(), Samples::default());
    let mut cpu = 0.0;
    for _ in 0..2 {
        d.merge(run(direct.clone(), block).await);
        let before = service.cpu_seconds();
        v.merge(run(via.clone(), block).await);
        cpu += service.cpu_seconds() - before;
    }
    let us = |s: &Samples, p: f64| quantile(&s.latency_ms, p) * 1000.0;
    let (p50, p99) = (us(&v, 0.5) - us(&d, 0.5), us(&v, 0.99) - us(&d, 0.99));
    let cpu_us = cpu * 1e6 / v.sent.max(1) as f64;
    eprintln!(
        "[bench] concurrency 1: added p50 {p50:.0} us p99 {p99:.0} us over {} requests per side, service CPU {cpu_us:.0} us/request, load {}",
        v.sent,
        procfs::load_average()
    );
    let cell = |s: &Samples| {
        format!(
            "p50 {:.0} / p99 {:.0} us, err {}",
            us(s, 0.5),
            us(s, 0.99),
            s.errors
        )
    };
    report.judged(
        &format!(
            "non-streaming, concurrency 1 ({} sequential requests per side)",
            v.sent
        ),
        cell(&d),
        format!("{}; CPU {cpu_us:.0} us/req", cell(&v)),
        format!("p50 {p50:+.0} / p99 {p99:+.0} us"),
        "added p50 <= 60, p99 <= 150 us",
        p50 <= 60.0 && p99 <= 150.0 && d.errors + v.errors == 0,
    );
    report.json.insert(
        "concurrency_1".into(),
        json!({
            "fixture": "FixedLatencyUpstream: 8 chunks' words at once",
            "direct": d.summary(),
            "service": v.summary(),
            "added_p50_us": p50,
            "added_p99_us": p99,
            "service_cpu_us_per_request": cpu_us,
        }),
    );
    Ok(())
}
