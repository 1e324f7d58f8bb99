//! Load generators. The open model sends request `i` at `start + i / rate` whatever happened to
//! the earlier ones, and measures each latency from that scheduled time, so a stall on either
//! side shows as latency instead of silently lowering the rate (no coordinated omission). The
//! closed model keeps `n` callers busy, each sending its next request when the previous answered.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// What one request saw; times are from its scheduled send time.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub ok: bool,
    pub latency: Duration,
    /// Streaming: until the first event with non-empty content.
    pub first_token: Option<Duration>,
    /// Streaming: between consecutive content events.
    pub gaps: Vec<Duration>,
    /// Content events seen (streaming).
    pub tokens: usize,
    pub error: Option<String>,
}

/// The results of one run, with percentiles in milliseconds.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    pub sent: usize,
    pub errors: usize,
    pub first_error: Option<String>,
    pub latency_ms: Vec<f64>,
    pub first_token_ms: Vec<f64>,
    pub gap_ms: Vec<f64>,
    /// How late the generator itself sent (scheduled -> spawned), a check on the generator.
    pub send_lag_ms: Vec<f64>,
    pub elapsed: Duration,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The `p`-quantile (0..=1) of unsorted values; NaN when empty.
pub fn quantile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

impl Samples {
    pub fn add(&mut self, outcome: Outcome) {
        self.sent += 1;
        if !outcome.ok {
            self.errors += 1;
            if self.first_error.is_none() {
                self.first_error = outcome.error;
            }
            return;
        }
        self.latency_ms.push(ms(outcome.latency));
        if let Some(t) = outcome.first_token {
            self.first_token_ms.push(ms(t));
        }
        self.gap_ms.extend(outcome.gaps.into_iter().map(ms));
    }

    pub fn merge(&mut self, other: Samples) {
        self.sent += other.sent;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.latency_ms.extend(other.latency_ms);
        self.first_token_ms.extend(other.first_token_ms);
        self.gap_ms.extend(other.gap_ms);
        self.send_lag_ms.extend(other.send_lag_ms);
        self.elapsed += other.elapsed;
    }

    pub fn summary(&self) -> Value {
        let q = |v: &Vec<f64>| json!({"p50": quantile(v, 0.5), "p99": quantile(v, 0.99), "max": quantile(v, 1.0), "n": v.len()});
        json!({
            "sent": self.sent,
            "errors": self.errors,
            "first_error": self.first_error,
            "latency_ms": q(&self.latency_ms),
            "first_token_ms": q(&self.first_token_ms),
            "inter_chunk_ms": q(&self.gap_ms),
            "generator_send_lag_ms": q(&self.send_lag_ms),
            "seconds": self.elapsed.as_secs_f64(),
            "rate": self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9),
        })
    }
}

/// Open model: `rate` requests per second for `duration`.
pub async fn open_loop<F, Fut>(rate: f64, duration: Duration, send: F) -> Samples
where
    F: Fn(Instant) -> Fut,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let count = (rate * duration.as_secs_f64()).round().max(1.0) as usize;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now() + Duration::from_millis(20);
    let mut tasks = Vec::with_capacity(count);
    let mut samples = Samples::default();
    for i in 0..count {
        let scheduled = start + interval.mul_f64(i as f64);
        if scheduled > Instant::now() {
            tokio::time::sleep_until(scheduled.into()).await;
        }
        samples.send_lag_ms.push(ms(Instant::now() - scheduled));
        tasks.push(tokio::spawn(send(scheduled)));
    }
    for task in tasks {
        samples.add(task.await.unwrap_or_else(|e| Outcome {
            error: Some(format!("task: {e}")),
            ..Outcome::default()
        }));
    }
    samples.elapsed = Instant::now() - start;
    samples
}

/// Closed model: `callers` callers, each sending back to back until `duration` is over.
/// `send(caller, scheduled)` runs one request.
pub async fn closed_loop<F, Fut>(callers: usize, duration: Duration, send: F) -> Samples
where
    F: Fn(usize, Instant) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let send = Arc::new(send);
    let start = Instant::now();
    let deadline = start + duration;
    let tasks: Vec<_> = (0..callers)
        .map(|caller| {
            let send = send.clone();
            tokio::spawn(async move {
                let mut samples = Samples::default();
                while Instant::now() < deadline {
                    samples.add(send(caller, Instant::now()).await);
                }
                samples
            })
        })
        .collect();
    let mut samples = Samples::default();
    for task in tasks {
        if let Ok(s) = task.await {
            samples.merge(s);
        }
    }
    samples.elapsed = Instant::now() - start;
    samples
}

/// Whether an SSE or NDJSON piece carries a non-empty `"content":"..."` (OpenAI deltas, Ollama
/// messages and the service's own frames all spell it so); counts them.
pub fn content_events(piece: &[u8]) -> usize {
    const NEEDLE: &[u8] = b"\"content\":\"";
    let mut count = 0;
    let mut at = 0;
    while let Some(found) = piece[at..].windows(NEEDLE.len()).position(|w| w == NEEDLE) {
        let after = at + found + NEEDLE.len();
        if piece.get(after).is_some_and(|&b| b != b'"') {
            count += 1;
        }
        at = after;
    }
    count
}

/// One HTTP POST of a prepared JSON body; streaming answers are read event by event.
pub struct Target {
    pub client: reqwest::Client,
    pub url: String,
    pub body: bytes::Bytes,
    pub headers: Vec<(&'static str, String)>,
    pub stream: bool,
}

impl Target {
    pub fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(4096)
            .timeout(Duration::from_secs(900))
            .build()
            .expect("http client")
    }

    pub async fn send(self: Arc<Self>, scheduled: Instant) -> Outcome {
        let mut request = self
            .client
            .post(&self.url)
            .header("content-type", "application/json")
            .body(self.body.clone());
        for (name, value) in &self.headers {
            request = request.header(*name, value);
        }
        let fail = |error: String| Outcome {
            error: Some(error),
            latency: scheduled.elapsed(),
            ..Outcome::default()
        };
        let mut response = match request.send().await {
            Ok(r) => r,
            Err(e) => return fail(format!("send: {e}")),
        };
        if !response.status().is_success() {
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            return fail(format!("status {status}: {body:.200}"));
        }
        let mut outcome = Outcome::default();
        if !self.stream {
            return match response.bytes().await {
                // OpenAI's `"content":"..."` or the chat API's `"message":"..."`.
                Ok(body)
                    if content_events(&body) > 0
                        || body.windows(11).any(|w| w == b"\"message\":\"") =>
                {
                    Outcome {
                        ok: true,
                        latency: scheduled.elapsed(),
                        ..outcome
                    }
                }
                Ok(body) => fail(format!(
                    "no content in {:.200}",
                    String::from_utf8_lossy(&body)
                )),
                Err(e) => fail(format!("body: {e}")),
            };
        }
        let mut last: Option<Instant> = None;
        let mut finished = false;
        loop {
            match response.chunk().await {
                Ok(Some(piece)) => {
                    let now = Instant::now();
                    for _ in 0..content_events(&piece) {
                        match last {
                            None => outcome.first_token = Some(now - scheduled),
                            Some(previous) => outcome.gaps.push(now - previous),
                        }
                        last = Some(now);
                        outcome.tokens += 1;
                    }
                    // OpenAI's end marker, or Ollama's final line.
                    if piece.windows(6).any(|w| w == b"[DONE]")
                        || piece.windows(11).any(|w| w == b"\"done\":true")
                    {
                        finished = true;
                    }
                }
                Ok(None) => break,
                Err(e) => return fail(format!("stream: {e}")),
            }
        }
        if !finished || outcome.tokens == 0 {
            return fail("stream ended without a final event or without content".into());
        }
        outcome.ok = true;
        outcome.latency = scheduled.elapsed();
        outcome
    }
}
