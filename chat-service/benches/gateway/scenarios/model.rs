//! Part 5: the real model (Ollama, gemma3-270m) through the service vs directly.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use chat_rig::Rig;
use futures::StreamExt;
use serde_json::{Value, json};

use crate::Settings;
use crate::load::{Outcome, Target, quantile};
use crate::report::Report;
use crate::service::ServiceProcess;

use chat_rig::procfs;
use chat_rig::stream::NdjsonLines;

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
    let mut lines = NdjsonLines::new();
    let mut last: Option<Instant> = None;
    while let Some(piece) = bytes.next().await {
        let Ok(piece) = piece else {
            outcome.error = Some("stream broke".into());
            return (outcome, reply);
        };
        let now = Instant::now();
        for parsed in lines.push(&piece) {
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

pub async fn model(rig: &Rig, dir: &Path, settings: &Settings, report: &mut Report) -> Result<()> {
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
            procfs::load_average()
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
