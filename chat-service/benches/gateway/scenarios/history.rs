//! Part 2: a full turn with history (Redis + MongoDB) at saturation vs the same store operations
//! done directly with the same crates.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use chat_rig::Rig;
use futures::TryStreamExt;
use mongodb::bson::{Document, doc};
use serde_json::{Value, json};

use crate::load::{Outcome, Samples, Target, closed_loop, quantile};
use crate::report::{Report, f2};
use crate::service::ServiceProcess;
use crate::upstream::{FixedLatencyUpstream, Shape};
use crate::{FIXTURE_MODEL, Settings};

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

pub async fn history(
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
