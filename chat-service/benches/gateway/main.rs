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
//! `CHATOP_BENCH_WEBSOCKETS`, `CHATOP_BENCH_MODEL_SESSIONS`, `CHATOP_BENCH_MODEL_TURNS`,
//! `CHATOP_BENCH_MODEL_TOKENS`, `CHATOP_BENCH_SERVICE_BIN` (another build of the service, e.g. one
//! from before a change).

mod load;
mod upstream;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chat_rig::Rig;
use chat_rig::process::ManagedProcess;
use futures::{SinkExt, StreamExt, TryStreamExt};
use mongodb::bson::{Document, doc};
use serde_json::{Value, json};

use load::{Outcome, Samples, Target, closed_loop, open_loop, quantile};
use upstream::{FixedLatencyUpstream, Shape};

const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const FIXTURE_MODEL: &str = "fixture-model";

// ---------------------------------------------------------------------------------------------
// Settings

struct Settings {
    only: Vec<String>,
    rates: Vec<f64>,
    seconds: f64,
    history_seconds: f64,
    sessions: usize,
    websockets: usize,
    model_sessions: usize,
    model_turns: usize,
    model_tokens: u32,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v} is not valid")),
        _ => Ok(default),
    }
}

impl Settings {
    fn from_env() -> Result<Self> {
        let only: String = env_or("CHATOP_BENCH_ONLY", "memory,latency,history,model".into())?;
        let rates: String = env_or(
            "CHATOP_BENCH_RATES",
            "100,500,1000,2000,3000,4000,5000,6000,8000,10000".into(),
        )?;
        Ok(Self {
            only: only.split(',').map(|s| s.trim().to_string()).collect(),
            rates: rates
                .split(',')
                .map(|r| r.trim().parse::<f64>())
                .collect::<Result<_, _>>()
                .context("CHATOP_BENCH_RATES")?,
            seconds: env_or("CHATOP_BENCH_SECONDS", 4.0)?,
            history_seconds: env_or("CHATOP_BENCH_HISTORY_SECONDS", 8.0)?,
            sessions: env_or("CHATOP_BENCH_SESSIONS", 32)?,
            websockets: env_or("CHATOP_BENCH_WEBSOCKETS", 1000)?,
            model_sessions: env_or("CHATOP_BENCH_MODEL_SESSIONS", 20)?,
            model_turns: env_or("CHATOP_BENCH_MODEL_TURNS", 5)?,
            model_tokens: env_or("CHATOP_BENCH_MODEL_TOKENS", 24)?,
        })
    }

    fn runs(&self, part: &str) -> bool {
        self.only.iter().any(|p| p == part)
    }
}

// ---------------------------------------------------------------------------------------------
// The service as a subprocess

/// The release `chat-service` binary under the rig's watchdog, so it stops however the bench ends.
struct ServiceProcess {
    _process: ManagedProcess,
    pid: u32,
    base: String,
    log: PathBuf,
}

impl ServiceProcess {
    async fn start(name: &str, config: &str, rig: &Rig, dir: &Path) -> Result<Self> {
        let port = chat_rig::free_port()?;
        let config_path = dir.join(format!("{name}.yaml"));
        std::fs::write(&config_path, config)?;
        let log = dir.join(format!("{name}.log"));
        // Another build of the service (say, before a change) may be compared with this one.
        let binary = std::env::var_os("CHATOP_BENCH_SERVICE_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_chat-service").into());
        let mut cmd = Command::new(binary);
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
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            process.check_running()?;
            if let Ok(r) = client.get(format!("{base}/readyz")).send().await
                && r.status().is_success()
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("{name} not ready after 30 s; see {}", log.display());
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

    /// A `Vm*` line of `/proc/<pid>/status`, in MiB.
    fn vm_mib(&self, key: &str) -> f64 {
        let text =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(f64::NAN)
    }

    /// User + system CPU seconds the process has used.
    fn cpu_seconds(&self) -> f64 {
        let text = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
        // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
        let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        (ticks(11) + ticks(12)) / 100.0
    }

    async fn metric_sum(&self, client: &reqwest::Client, name: &str) -> Result<f64> {
        let text = client
            .get(format!("{}/metrics", self.base))
            .send()
            .await?
            .text()
            .await?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum())
    }
}

fn fixture_config(upstream: &FixedLatencyUpstream, unique: &str) -> String {
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
models:
  default: {FIXTURE_MODEL}
history:
  redis:
    keyPrefix: {unique}
  mongodb:
    database: {unique}
"#,
        url = upstream.url()
    )
}

// ---------------------------------------------------------------------------------------------
// The report

struct Row {
    metric: String,
    baseline: String,
    service: String,
    added: String,
    target: String,
    verdict: String,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    json: serde_json::Map<String, Value>,
}

impl Report {
    fn row(&mut self, metric: &str, baseline: String, service: String, added: String) {
        self.rows.push(Row {
            metric: metric.into(),
            baseline,
            service,
            added,
            target: "-".into(),
            verdict: "-".into(),
        });
    }

    fn judged(
        &mut self,
        metric: &str,
        baseline: String,
        service: String,
        added: String,
        target: &str,
        met: bool,
    ) {
        self.rows.push(Row {
            metric: metric.into(),
            baseline,
            service,
            added,
            target: target.into(),
            verdict: if met { "met" } else { "MISSED" }.into(),
        });
    }

    fn table(&self) -> String {
        let header = [
            "metric",
            "baseline",
            "chat-service",
            "added / ratio",
            "target",
            "verdict",
        ];
        let cells: Vec<[&str; 6]> = self
            .rows
            .iter()
            .map(|r| {
                [
                    r.metric.as_str(),
                    &r.baseline,
                    &r.service,
                    &r.added,
                    &r.target,
                    &r.verdict,
                ]
            })
            .collect();
        let widths: Vec<usize> = (0..6)
            .map(|i| {
                cells
                    .iter()
                    .map(|c| c[i].chars().count())
                    .chain([header[i].len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |c: &[&str]| {
            let cols: Vec<String> = c
                .iter()
                .zip(&widths)
                .map(|(v, w)| format!("{v:<w$}"))
                .collect();
            format!("| {} |\n", cols.join(" | "))
        };
        let mut out = line(&header);
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        out.push_str(&format!("|-{}-|\n", rule.join("-|-")));
        for c in &cells {
            out.push_str(&line(c));
        }
        out
    }
}

fn f1(v: f64) -> String {
    format!("{v:.1}")
}

fn f2(v: f64) -> String {
    format!("{v:.2}")
}

fn signed(v: f64) -> String {
    format!("{v:+.2}")
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// 3. Memory

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn websocket_turn(url: String) -> Result<Socket> {
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await?;
    socket
        .send(tokio_tungstenite::tungstenite::Message::Text(
            json!({"message": "hello"}).to_string().into(),
        ))
        .await?;
    while let Some(frame) = socket.next().await {
        if let tokio_tungstenite::tungstenite::Message::Text(text) = frame? {
            let frame: Value = serde_json::from_str(text.as_str())?;
            match frame["type"].as_str() {
                Some("done") => return Ok(socket),
                Some("token") => {}
                _ => bail!("unexpected frame {frame}"),
            }
        }
    }
    bail!("socket closed before the turn finished")
}

async fn memory(
    service: &ServiceProcess,
    upstream: &FixedLatencyUpstream,
    settings: &Settings,
    report: &mut Report,
) -> Result<()> {
    let client = reqwest::Client::new();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = service.vm_mib("VmRSS");
    upstream.set_shape(Shape {
        delay: Duration::ZERO,
        chunks: 4,
        gap: Duration::ZERO,
    });
    let url = format!("{}/ws/chat", service.base.replace("http://", "ws://"));
    let started = Instant::now();
    let sockets: Vec<_> = futures::stream::iter(0..settings.websockets)
        .map(|_| websocket_turn(url.clone()))
        .buffer_unordered(64)
        .collect()
        .await;
    let opened = started.elapsed();
    let failed = sockets.iter().filter(|s| s.is_err()).count();
    if let Some(Err(e)) = sockets.iter().find(|s| s.is_err()) {
        eprintln!("[bench] websocket failed: {e:#}");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let open_gauge = service.metric_sum(&client, "chat_open_websockets").await?;
    let with_sockets = service.vm_mib("VmRSS");
    let peak_sockets = service.vm_mib("VmHWM");
    let mut sockets: Vec<_> = sockets.into_iter().flatten().collect();
    let open = sockets.len();
    futures::future::join_all(sockets.iter_mut().map(|s| s.close(None))).await;
    drop(sockets);
    let deadline = Instant::now() + Duration::from_secs(10);
    while service.metric_sum(&client, "chat_open_websockets").await? > 0.0
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = service.vm_mib("VmRSS");
    eprintln!(
        "[bench] memory: idle {idle:.1} MiB, {open} sockets {with_sockets:.1} MiB (gauge {open_gauge}), after {after:.1} MiB"
    );
    report.judged(
        "RSS idle (VmRSS after start)",
        "-".into(),
        format!("{} MiB", f1(idle)),
        "-".into(),
        "<= 20 MiB",
        idle <= 20.0,
    );
    report.judged(
        &format!("RSS with {open} open WebSockets, one turn each"),
        "-".into(),
        format!("{} MiB (peak {})", f1(with_sockets), f1(peak_sockets)),
        format!(
            "{} KiB per socket",
            f1((with_sockets - idle) * 1024.0 / open.max(1) as f64)
        ),
        "<= 100 MiB",
        with_sockets <= 100.0 && failed == 0,
    );
    report.row(
        "RSS after the WebSockets closed",
        "-".into(),
        format!("{} MiB", f1(after)),
        "-".into(),
    );
    report.json.insert(
        "memory".into(),
        json!({
            "idle_rss_mib": idle,
            "websockets_requested": settings.websockets,
            "websockets_open": open,
            "websockets_failed": failed,
            "open_websockets_gauge": open_gauge,
            "seconds_to_open_and_turn": opened.as_secs_f64(),
            "rss_with_websockets_mib": with_sockets,
            "peak_rss_mib": peak_sockets,
            "rss_after_close_mib": after,
            "fixture": upstream.shape().describe(),
        }),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 1. Added latency on the stateless path

fn completion_body(stream: bool) -> bytes::Bytes {
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
        })
    }
}

async fn latency(
    service: &ServiceProcess,
    upstream: &FixedLatencyUpstream,
    settings: &Settings,
    report: &mut Report,
) -> Result<()> {
    let shape = Shape {
        delay: Duration::from_millis(20),
        chunks: 8,
        gap: Duration::from_millis(2),
    };
    upstream.set_shape(shape);
    let client = reqwest::Client::new();
    let store_ops_before = service
        .metric_sum(&client, "chat_history_store_operations")
        .await?;
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
            let mut point = RatePoint {
                rate,
                direct: Samples::default(),
                service: Samples::default(),
                service_cpu_us_per_request: 0.0,
            };
            let mut cpu = 0.0;
            // Baseline and service alternate, twice, so that drift in the machine's load falls
            // on both.
            for _ in 0..2 {
                let d = direct.clone();
                point
                    .direct
                    .merge(open_loop(rate, half, move |s| d.clone().send(s)).await);
                let v = via.clone();
                let before = service.cpu_seconds();
                point
                    .service
                    .merge(open_loop(rate, half, move |s| v.clone().send(s)).await);
                cpu += service.cpu_seconds() - before;
            }
            point.service_cpu_us_per_request = cpu * 1e6 / point.service.sent.max(1) as f64;
            let primary = RatePoint::primary(stream);
            eprintln!(
                "[bench] {mode} {rate} rps: added p50 {:.2} ms p99 {:.2} ms, errors {}/{} (first: {:?}), service CPU {:.0} us/request, load {}",
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
                loadavg(),
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
            if p.rate == 500.0 {
                report.judged(
                    &metric,
                    cell(&p.direct),
                    cell(&p.service),
                    added,
                    "added p50 <= 0.5, p99 <= 2 ms",
                    p50 <= 0.5 && p99 <= 2.0 && p.error_rate() == 0.0,
                );
            } else {
                report.row(&metric, cell(&p.direct), cell(&p.service), added);
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
        report.judged(
            &format!("{mode}: frontier (highest rate, added p99 < 5 ms, errors < 0.1%)"),
            "-".into(),
            format!("{frontier} rps"),
            "-".into(),
            ">= 5000 rps",
            frontier >= 5000.0,
        );
        modes.insert(
            mode.into(),
            json!({
                "frontier_rps": frontier,
                "points": points.iter().map(RatePoint::json).collect::<Vec<_>>(),
            }),
        );
    }
    let store_ops = service
        .metric_sum(&client, "chat_history_store_operations")
        .await?
        - store_ops_before;
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

// ---------------------------------------------------------------------------------------------
// 2. Full turn with history vs the raw store operations

/// The store operations of one turn as the service does them (history/recent.rs and
/// history/durable.rs), done directly with the same crates and the same settings.
struct RawStores {
    redis: redis::aio::ConnectionManager,
    messages: mongodb::Collection<Document>,
    sessions: mongodb::Collection<Document>,
    prefix: String,
}

impl RawStores {
    async fn connect(rig: &Rig, unique: &str) -> Result<Self> {
        let client = redis::Client::open(rig.redis_url())?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_millis(500)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let redis = redis::aio::ConnectionManager::new_with_config(client, config).await?;
        let mut options = mongodb::options::ClientOptions::parse(rig.mongodb_url()).await?;
        options.server_selection_timeout = Some(Duration::from_secs(3));
        let mongo = mongodb::Client::with_options(options)?;
        let database = mongo.database(unique);
        let messages = database.collection::<Document>("messages");
        messages
            .create_index(
                mongodb::IndexModel::builder()
                    .keys(doc! {"session_id": 1, "seq": 1})
                    .options(
                        mongodb::options::IndexOptions::builder()
                            .unique(true)
                            .build(),
                    )
                    .build(),
            )
            .await?;
        Ok(Self {
            redis,
            messages,
            sessions: database.collection("messages_sessions"),
            prefix: unique.to_string(),
        })
    }

    async fn turn(&self, session: &str) -> Result<()> {
        let key = format!("{}:session:{session}:recent", self.prefix);
        let mut redis = self.redis.clone();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .zrange(&key, 0, -1)
            .expire(&key, 3600)
            .ignore();
        let (members,): (Vec<String>,) = pipe.query_async(&mut redis).await?;
        let recent: Vec<Value> = members
            .iter()
            .filter_map(|m| serde_json::from_str(m).ok())
            .collect();
        if recent.is_empty() {
            let _older: Vec<Document> = self
                .messages
                .find(doc! {"session_id": session})
                .sort(doc! {"seq": -1})
                .limit(20)
                .await?
                .try_collect()
                .await?;
        }
        let now = mongodb::bson::DateTime::now();
        let allocated = self
            .sessions
            .find_one_and_update(
                doc! {"_id": session},
                doc! {"$inc": {"next_seq": 2_i64}, "$set": {"updated_at": now}, "$setOnInsert": {"created_at": now}},
            )
            .upsert(true)
            .return_document(mongodb::options::ReturnDocument::After)
            .await?
            .context("no session document")?;
        let next = allocated.get_i64("next_seq")?;
        let message = |seq: i64, role: &str, content: &str| {
            doc! {"session_id": session, "seq": seq, "role": role, "content": content,
            "model": FIXTURE_MODEL, "turn_id": "raw", "incomplete": false, "created_at": now}
        };
        let reply = "w0 w1 w2 w3 ";
        self.messages
            .insert_many([
                message(next - 1, "user", "hello there"),
                message(next, "assistant", reply),
            ])
            .ordered(true)
            .await?;
        let items = [
            (
                next - 1,
                json!({"seq": next - 1, "role": "user", "content": "hello there"}).to_string(),
            ),
            (
                next,
                json!({"seq": next, "role": "assistant", "content": reply}).to_string(),
            ),
        ];
        let mut pipe = redis::pipe();
        pipe.atomic()
            .zadd_multiple(&key, &items)
            .ignore()
            .zremrangebyrank(&key, 0, -21)
            .ignore()
            .expire(&key, 3600)
            .ignore();
        pipe.query_async::<()>(&mut redis).await?;
        Ok(())
    }
}

async fn history(
    service: &ServiceProcess,
    upstream: &FixedLatencyUpstream,
    rig: &Rig,
    settings: &Settings,
    report: &mut Report,
) -> Result<()> {
    upstream.set_shape(Shape {
        delay: Duration::ZERO,
        chunks: 4,
        gap: Duration::ZERO,
    });
    let raw = Arc::new(RawStores::connect(rig, &chat_rig::unique_name("bench-raw")).await?);
    let client = Target::client();
    let slice = Duration::from_secs_f64(settings.history_seconds / 2.0);
    let callers = settings.sessions;
    let mut direct = Samples::default();
    let mut via = Samples::default();
    let mut cpu = 0.0;
    for round in 0..2 {
        let r = raw.clone();
        direct.merge(
            closed_loop(callers, slice, move |caller, started| {
                let r = r.clone();
                async move {
                    match r.turn(&format!("raw-{round}-{caller}")).await {
                        Ok(()) => Outcome {
                            ok: true,
                            latency: started.elapsed(),
                            ..Outcome::default()
                        },
                        Err(e) => Outcome {
                            error: Some(format!("{e:#}")),
                            ..Outcome::default()
                        },
                    }
                }
            })
            .await,
        );
        let c = client.clone();
        let url = format!("{}/v1/chat", service.base);
        let before = service.cpu_seconds();
        via.merge(
            closed_loop(callers, slice, move |caller, started| {
                let target = Arc::new(Target {
                    client: c.clone(),
                    url: url.clone(),
                    body: json!({"session_id": format!("svc-{round}-{caller}"), "message": "hello there"})
                        .to_string()
                        .into(),
                    headers: vec![],
                    stream: false,
                });
                target.send(started)
            })
            .await,
        );
        cpu += service.cpu_seconds() - before;
    }
    let rate = |s: &Samples| (s.sent - s.errors) as f64 / s.elapsed.as_secs_f64();
    let (raw_rate, service_rate) = (rate(&direct), rate(&via));
    let ratio = service_rate / raw_rate;
    eprintln!(
        "[bench] history: raw {raw_rate:.0}/s, service {service_rate:.0}/s ({:.0} %), errors {} / {} ({:?} {:?})",
        ratio * 100.0,
        direct.errors,
        via.errors,
        direct.first_error,
        via.first_error
    );
    let cell = |s: &Samples| {
        format!(
            "{:.0} turns/s; p50 {} / p99 {} ms; err {}",
            rate(s),
            f2(quantile(&s.latency_ms, 0.5)),
            f2(quantile(&s.latency_ms, 0.99)),
            s.errors
        )
    };
    report.judged(
        &format!("full turn with history, {callers} sessions, closed loop"),
        cell(&direct),
        cell(&via),
        format!("{:.0} % of raw", ratio * 100.0),
        ">= 80 %",
        ratio >= 0.8 && via.errors == 0,
    );
    report.row(
        "  service CPU per turn",
        "-".into(),
        format!("{:.0} us", cpu * 1e6 / via.sent.max(1) as f64),
        "-".into(),
    );
    report.json.insert(
        "history".into(),
        json!({
            "fixture": "FixedLatencyUpstream: 0 ms, 4 chunks, 0 ms apart",
            "callers": callers,
            "raw": direct.summary(),
            "service": via.summary(),
            "raw_turns_per_s": raw_rate,
            "service_turns_per_s": service_rate,
            "ratio": ratio,
            "service_cpu_us_per_turn": cpu * 1e6 / via.sent.max(1) as f64,
        }),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5. The real model

const PROMPTS: [&str; 5] = [
    "Tell me about the sea.",
    "What do birds eat?",
    "Describe a mountain village.",
    "Why is the sky blue?",
    "Write one line about autumn.",
];

/// One streamed turn straight to Ollama's `/api/chat`; returns what it saw and the reply text.
async fn ollama_turn(
    client: &reqwest::Client,
    url: &str,
    body: Value,
    scheduled: Instant,
) -> (Outcome, String) {
    let mut outcome = Outcome::default();
    let mut reply = String::new();
    let response = match client.post(url).json(&body).send().await {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => {
            outcome.error = Some(format!("status {}", r.status()));
            return (outcome, reply);
        }
        Err(e) => {
            outcome.error = Some(e.to_string());
            return (outcome, reply);
        }
    };
    let mut bytes = response.bytes_stream();
    let mut buffer = Vec::new();
    let mut last: Option<Instant> = None;
    while let Some(piece) = bytes.next().await {
        let Ok(piece) = piece else {
            outcome.error = Some("stream broke".into());
            return (outcome, reply);
        };
        let now = Instant::now();
        buffer.extend_from_slice(&piece);
        while let Some(end) = buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            let Ok(parsed) = serde_json::from_slice::<Value>(&line) else {
                continue;
            };
            let content = parsed["message"]["content"].as_str().unwrap_or("");
            if !content.is_empty() {
                reply.push_str(content);
                match last {
                    None => outcome.first_token = Some(now - scheduled),
                    Some(previous) => outcome.gaps.push(now - previous),
                }
                last = Some(now);
                outcome.tokens += 1;
            }
            if parsed["done"] == true {
                outcome.ok = outcome.tokens > 0;
            }
        }
    }
    outcome.latency = scheduled.elapsed();
    (outcome, reply)
}

#[derive(Default)]
struct ModelSide {
    first_token_ms: Vec<f64>,
    tokens_per_s: Vec<f64>,
    tokens: usize,
    errors: usize,
    first_error: Option<String>,
    seconds: f64,
}

impl ModelSide {
    fn add(&mut self, outcome: &Outcome) {
        if !outcome.ok {
            self.errors += 1;
            if self.first_error.is_none() {
                self.first_error = Some(
                    outcome
                        .error
                        .clone()
                        .unwrap_or_else(|| "no final event".into()),
                );
            }
            return;
        }
        if let Some(t) = outcome.first_token {
            self.first_token_ms.push(t.as_secs_f64() * 1000.0);
        }
        self.tokens += outcome.tokens;
        let streaming: Duration = outcome.gaps.iter().sum();
        if !outcome.gaps.is_empty() && !streaming.is_zero() {
            self.tokens_per_s
                .push(outcome.gaps.len() as f64 / streaming.as_secs_f64());
        }
    }

    fn json(&self) -> Value {
        json!({
            "first_token_ms": {"p50": quantile(&self.first_token_ms, 0.5), "p90": quantile(&self.first_token_ms, 0.9), "max": quantile(&self.first_token_ms, 1.0)},
            "tokens_per_s_per_stream": {"p50": quantile(&self.tokens_per_s, 0.5), "p10": quantile(&self.tokens_per_s, 0.1)},
            "tokens": self.tokens,
            "errors": self.errors,
            "first_error": self.first_error,
            "seconds": self.seconds,
            "aggregate_tokens_per_s": self.tokens as f64 / self.seconds.max(1e-9),
        })
    }
}

async fn model(rig: &Rig, dir: &Path, settings: &Settings, report: &mut Report) -> Result<()> {
    let unique = chat_rig::unique_name("bench-model");
    let max_tokens = settings.model_tokens;
    let config = format!(
        r#"
backends:
  - name: ollama
    url: {url}
    protocol: ollama
models:
  default: {model}
history:
  redis:
    keyPrefix: {unique}
  mongodb:
    database: {unique}
context:
  maxOutputTokens: {max_tokens}
# Every session's turn waits its turn, as it does when sent to Ollama directly: without these the
# pool's defaults (8 in flight, 30 s in the queue) shed turns with 503 once Ollama falls behind.
routing:
  firstTokenTimeoutMs: 600000
  totalTimeoutMs: 600000
  maxInFlightPerBackend: 64
  queueTimeoutMs: 600000
"#,
        url = rig.ollama_url(),
        model = rig.model(),
    );
    let service = ServiceProcess::start("chat-service-ollama", &config, rig, dir).await?;
    let client = Target::client();
    let sessions = settings.model_sessions;
    let mut histories: Vec<Vec<Value>> = vec![Vec::new(); sessions];
    let (mut direct, mut via) = (ModelSide::default(), ModelSide::default());
    let ollama_url = format!("{}/api/chat", rig.ollama_url());
    let session_prefix = chat_rig::unique_name("m");
    // Rounds interleave the two paths: every session's turn k through the service and the same
    // turn k straight to Ollama, one after the other, so that both see the same machine load.
    for turn in 0..settings.model_turns {
        let prompt = PROMPTS[turn % PROMPTS.len()];
        // The side that goes second may find its prompt prefix in Ollama's KV cache, so the
        // order alternates from turn to turn.
        let service_first = turn % 2 == 0;
        for service_side in [service_first, !service_first] {
            if service_side {
                let started = Instant::now();
                let outcomes = futures::future::join_all((0..sessions).map(|s| {
                    let target = Arc::new(Target {
                        client: client.clone(),
                        url: format!("{}/v1/chat/completions", service.base),
                        body: json!({
                            "model": rig.model(), "stream": true, "max_tokens": max_tokens, "temperature": 0,
                            "messages": [{"role": "user", "content": prompt}],
                        })
                        .to_string()
                        .into(),
                        headers: vec![("x-session-id", format!("{session_prefix}-{s}"))],
                        stream: true,
                    });
                    target.send(Instant::now())
                }))
                .await;
                via.seconds += started.elapsed().as_secs_f64();
                outcomes.iter().for_each(|o| via.add(o));
            } else {
                let started = Instant::now();
                let outcomes = futures::future::join_all(histories.iter().map(|history| {
                    let mut messages = history.clone();
                    messages.push(json!({"role": "user", "content": prompt}));
                    let body = json!({
                        "model": rig.model(), "stream": true, "messages": messages,
                        "options": {"num_predict": max_tokens, "temperature": 0},
                    });
                    ollama_turn(&client, &ollama_url, body, Instant::now())
                }))
                .await;
                direct.seconds += started.elapsed().as_secs_f64();
                for (history, (outcome, reply)) in histories.iter_mut().zip(outcomes) {
                    direct.add(&outcome);
                    history.push(json!({"role": "user", "content": prompt}));
                    history.push(json!({"role": "assistant", "content": reply}));
                }
            }
        }
        eprintln!(
            "[bench] model turn {}: service TTFT p50 {:.0} ms, direct {:.0} ms; errors {:?} {:?}; load {}",
            turn + 1,
            quantile(&via.first_token_ms, 0.5),
            quantile(&direct.first_token_ms, 0.5),
            via.first_error,
            direct.first_error,
            loadavg()
        );
    }
    let ttft = |s: &ModelSide| {
        format!(
            "p50 {:.0} / p90 {:.0} ms",
            quantile(&s.first_token_ms, 0.5),
            quantile(&s.first_token_ms, 0.9)
        )
    };
    report.row(
        &format!(
            "real model ({}): {sessions} sessions x {} turns, time to first token",
            rig.model(),
            settings.model_turns
        ),
        ttft(&direct),
        ttft(&via),
        format!(
            "p50 {:+.0} ms",
            quantile(&via.first_token_ms, 0.5) - quantile(&direct.first_token_ms, 0.5)
        ),
    );
    let tps = |s: &ModelSide| {
        format!(
            "{:.1} per stream (p50); {:.1} aggregate; err {}",
            quantile(&s.tokens_per_s, 0.5),
            s.tokens as f64 / s.seconds,
            s.errors
        )
    };
    report.row(
        &format!("  tokens/s ({max_tokens} max tokens, temperature 0)"),
        tps(&direct),
        tps(&via),
        format!(
            "{:.0} % per stream",
            100.0 * quantile(&via.tokens_per_s, 0.5) / quantile(&direct.tokens_per_s, 0.5)
        ),
    );
    report.json.insert(
        "real_model".into(),
        json!({
            "model": rig.model(),
            "sessions": sessions,
            "turns": settings.model_turns,
            "max_tokens": max_tokens,
            "direct_ollama": direct.json(),
            "service": via.json(),
            "service_log": service.log,
        }),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------

async fn bench(rig: &Rig, settings: &Settings, dir: &Path) -> Result<Report> {
    let mut report = Report::default();
    let load_before = loadavg();
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
            &fixture_config(&upstream, &unique),
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
            memory(&service, &upstream, settings, &mut report).await?;
        }
        if settings.runs("latency") {
            latency(&service, &upstream, settings, &mut report).await?;
        }
        report.row(
            "RSS at the end of the fixture runs (peak VmHWM)",
            "-".into(),
            format!(
                "{} MiB (peak {})",
                f1(service.vm_mib("VmRSS")),
                f1(service.vm_mib("VmHWM"))
            ),
            "-".into(),
        );
    }
    if settings.runs("history") {
        // A fresh process on empty stores, as the raw side starts on an empty database.
        let unique = chat_rig::unique_name("bench-history");
        let service = ServiceProcess::start(
            "chat-service-history",
            &fixture_config(&upstream, &unique),
            rig,
            dir,
        )
        .await?;
        history(&service, &upstream, rig, settings, &mut report).await?;
    }
    if settings.runs("model") {
        model(rig, dir, settings, &mut report).await?;
    }
    report.json.insert(
        "machine".into(),
        json!({
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
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
    let parts = if settings.runs("model") {
        "redis,mongodb,ollama"
    } else {
        "redis,mongodb"
    };
    let rig = match std::env::var_os(chat_rig::ENV_RIG_FILE) {
        Some(file) => Rig::attach(Path::new(&file))?,
        None => Rig::start(
            &chat_rig::run_dir()?.join("bench-gateway"),
            chat_rig::Parts::parse(parts)?,
        )?,
    };
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
        "\nchat-service benchmark, {} cores, load average before {} / after {}\n{table}",
        machine["cores"], machine["loadavg_before"], machine["loadavg_after"]
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
