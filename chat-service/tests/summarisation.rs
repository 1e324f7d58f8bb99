//! Summarisation of dropped context (`context.summarisation`) against the rig's real Redis,
//! FerretDB and the real Gemma model in its Ollama. What the model is sent is read at the named
//! fixture `support::OllamaCallCountingProxy` (the real requests): over thirty turns of one
//! session every context stays within `maxContextTokens`, a summary is stored in MongoDB and
//! sent in later turns' contexts, summary calls stay within one per `everyTurns` turns, their
//! tokens are charged to the caller's budget, and another caller never sees it. A summary call
//! that fails (a mock of that one call at the proxy) or times out leaves plain trimming: every
//! turn is still answered and stored.

mod support;

use std::time::{Duration, Instant};

use chat_service::config::{BackendConfig, Config, RateLimitKey};
use chat_service::context::SUMMARY_HEADING;
use chat_service::tokens::{FRAMING_TOKENS, estimate};
use mongodb::bson::doc;
use serde_json::{Value, json};
use support::records::{Stores, call};
use support::{
    OllamaCallCountingProxy, TestService, charged_tokens, metric_value, rig, start_with_api_keys,
};

const BUDGET: u32 = 300;
const EVERY_TURNS: u32 = 5;
/// Recognisable in the requests at the proxy: only summary calls carry it.
const PROMPT: &str = "You write summaries. Summarise the conversation below in two short \
                      sentences, keeping every number the user mentioned.";
const WINDOW_SECONDS: u64 = 2_592_000;
const TOKENS_PER_WINDOW: u64 = 50_000;
const ALICE_KEY: &str = "alice-key-0123456789";
const BOB_KEY: &str = "bob-key-0123456789ab";

fn config(backend_url: &str) -> Config {
    let mut config = support::test_config(rig());
    config.backends = vec![BackendConfig::ollama("ollama", backend_url)];
    config.context.max_context_tokens = BUDGET;
    config.context.max_output_tokens = 24;
    let summarisation = &mut config.context.summarisation;
    summarisation.enabled = true;
    summarisation.every_turns = EVERY_TURNS;
    summarisation.max_summary_tokens = 64;
    summarisation.prompt = PROMPT.into();
    // Gemma on two shared cores: a 64-token summary took 47 s while a build ran (0.7 tokens/s,
    // its threads starved). The timeout's own path is a test of its own below.
    summarisation.timeout_ms = 300_000;
    // A long window and a budget well above what the test spends (about 13,000 tokens), so
    // that it refills slowly: TOKENS_PER_WINDOW / WINDOW_SECONDS = 0.02 tokens/s, which the
    // check of what was charged adds back for the time the test ran.
    config.rate_limit.enabled = true;
    config.rate_limit.requests_per_window = 10_000;
    config.rate_limit.tokens_per_window = TOKENS_PER_WINDOW;
    config.rate_limit.window_seconds = WINDOW_SECONDS;
    config.rate_limit.key_by = RateLimitKey::User;
    config.auth.enabled = true;
    config.validate().expect("a valid config");
    config
}

async fn serve(config: Config) -> TestService {
    let rig = rig();
    start_with_api_keys(
        config,
        rig.redis_url(),
        rig.mongodb_url(),
        Some(&format!("alice {ALICE_KEY},bob {BOB_KEY}")),
    )
    .await
}

fn is_summary_call(body: &Value) -> bool {
    body["messages"][0]["content"] == PROMPT
}

/// The service's own count of a request's context (bytes/4 plus framing per message), which
/// is what `maxContextTokens` bounds.
fn context_tokens(body: &Value) -> u32 {
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| estimate(m["content"].as_str().unwrap()) + FRAMING_TOKENS)
        .sum()
}

fn system_message(body: &Value) -> &str {
    match body["messages"][0]["role"].as_str() {
        Some("system") => body["messages"][0]["content"].as_str().unwrap(),
        _ => "",
    }
}

/// One turn for `user` with `key`; its usage's total tokens. The user goes in the body (whose
/// sessions) and in `x-user-id` (whose budget: `rateLimit.keyBy: user` reads the header).
async fn turn(service: &TestService, key: &str, user: &str, session: &str, message: &str) -> u64 {
    let body = json!({"session_id": session, "user": user, "message": message});
    let response = reqwest::Client::new()
        .post(format!("{}/v1/chat", service.base))
        .bearer_auth(key)
        .header("x-user-id", user)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let answer: Value = response.json().await.unwrap_or_default();
    assert_eq!(status, 200, "{message}: {answer}");
    eprintln!("{session}: {message:?} answered, usage {}", answer["usage"]);
    answer["usage"]["total_tokens"].as_u64().unwrap()
}

/// Generations the service has in flight at its back end, from `/metrics`.
async fn in_flight(service: &TestService) -> f64 {
    service
        .metrics_text()
        .await
        .lines()
        .filter(|line| {
            line.starts_with("chat_backend_in_flight{") || line.starts_with("chat_backend_queued{")
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until the summary calls the last turns started are over: nothing in flight at the
/// back end for two seconds (a call due after a turn is spawned before the turn answers and
/// reaches the back end within milliseconds).
async fn settle(service: &TestService) {
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut idle_since: Option<Instant> = None;
    loop {
        if in_flight(service).await == 0.0 {
            if idle_since.get_or_insert_with(Instant::now).elapsed() >= Duration::from_secs(2) {
                return;
            }
        } else {
            idle_since = None;
        }
        assert!(
            Instant::now() < deadline,
            "summary calls still running after 600 s: {}",
            service.metrics_text().await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn message(turn: usize) -> String {
    format!(
        "Note {turn}: the code for box {turn} is {}. Reply briefly.",
        1000 + turn * 37
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn thirty_turns_stay_within_budget_with_a_stored_summary_reused_and_charged() {
    const TURNS: usize = 30;
    let proxy = OllamaCallCountingProxy::start(rig().ollama_url()).await;
    let config = config(&proxy.url);
    let service = serve(config.clone()).await;
    let user = chat_rig::unique_name("alice");
    let session = chat_rig::unique_name("long");
    let started = Instant::now();
    let mut turn_usage = 0;
    for n in 0..TURNS {
        turn_usage += turn(&service, ALICE_KEY, &user, &session, &message(n)).await;
    }
    settle(&service).await;
    let summary_calls_in_thirty = proxy
        .chat_bodies()
        .iter()
        .filter(|b| is_summary_call(b))
        .count();

    // The summary is in MongoDB, next to the messages, which all stay.
    let stores = Stores::of(&config).await;
    let storage_key = format!("k.alice/{session}");
    let summaries = stores
        .find("", doc! { "session_id": &storage_key, "seq": { "$lt": 0 } })
        .await;
    let log = format!(
        "summary calls: {summary_calls_in_thirty}; metrics: {}",
        service.metrics_text().await
    );
    assert_eq!(
        summaries.len(),
        1,
        "one summary, the latest, is kept; {log}"
    );
    let summary = &summaries[0];
    let content = summary.get_str("content").unwrap().to_string();
    let covers = summary.get_i64("covers_seq").unwrap();
    assert_eq!(summary.get_str("role").unwrap(), "system");
    assert!(!content.is_empty() && covers > 0, "{summary}");
    let (status, page) = call(
        &service.base,
        Some(ALICE_KEY),
        reqwest::Method::GET,
        &format!("/v1/sessions/{session}/messages?limit=100"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{page}");
    let listed = page["messages"].as_array().unwrap();
    assert_eq!(
        listed.len(),
        2 * TURNS,
        "every turn stored, no summary among them: {page}"
    );

    // One more turn: its context carries the stored summary.
    turn_usage += turn(&service, ALICE_KEY, &user, &session, &message(TURNS)).await;
    let bodies = proxy.chat_bodies();
    let turns: Vec<&Value> = bodies.iter().filter(|b| !is_summary_call(b)).collect();
    assert_eq!(turns.len(), TURNS + 1, "one generation per turn");
    let sizes: Vec<u32> = turns.iter().map(|b| context_tokens(b)).collect();
    assert!(
        sizes.iter().all(|&size| size <= BUDGET),
        "every context sent must stay within {BUDGET} tokens: {sizes:?}"
    );
    assert!(
        sizes.iter().any(|&size| size > BUDGET / 2),
        "the conversation must come near the budget to show anything: {sizes:?}"
    );
    let last = system_message(turns[TURNS]);
    assert!(
        last.contains(SUMMARY_HEADING) && last.contains(&content),
        "the turn after the summary was stored must send it; sent {last:?}, stored {content:?}"
    );
    let with_summary = turns
        .iter()
        .filter(|b| system_message(b).contains(SUMMARY_HEADING))
        .count();
    assert!(
        with_summary >= 5,
        "later turns send a summary: {with_summary} of {}",
        TURNS + 1
    );

    // At most one summary call per EVERY_TURNS turns.
    let bound = TURNS.div_ceil(EVERY_TURNS as usize);
    assert!(
        (1..=bound).contains(&summary_calls_in_thirty),
        "{summary_calls_in_thirty} summary calls in {TURNS} turns, at most {bound}"
    );

    // The summaries' tokens are charged to the caller, on top of the turns'.
    settle(&service).await;
    let text = service.metrics_text().await;
    let model = rig().model();
    let counted: f64 = ["in", "out"]
        .iter()
        .map(|d| {
            metric_value(
                &text,
                &format!("chat_tokens_total{{model=\"{model}\",direction=\"{d}\"}}"),
            )
        })
        .sum();
    let summary_tokens = counted - turn_usage as f64;
    let charged = charged_tokens(&service, &user).await;
    assert!(
        summary_tokens > 0.0,
        "counted {counted}, turns {turn_usage}"
    );
    // The budget refilled by at most this much since the first turn was charged.
    let refilled =
        started.elapsed().as_secs_f64() * TOKENS_PER_WINDOW as f64 / WINDOW_SECONDS as f64;
    assert!(
        charged < counted + 20.0 && charged > counted - 20.0 - refilled,
        "charged {charged} (refilled at most {refilled:.1} since the first turn) must be the \
         turns' {turn_usage} plus the summaries' {summary_tokens}"
    );

    // Another caller with the same session id has a session of its own: no summary in it.
    let bob = chat_rig::unique_name("bob");
    turn(
        &service,
        BOB_KEY,
        &bob,
        &session,
        "What is the code for box 3?",
    )
    .await;
    let bodies = proxy.chat_bodies();
    let bobs = bodies.iter().rev().find(|b| !is_summary_call(b)).unwrap();
    let sent = serde_json::to_string(bobs).unwrap();
    assert!(
        !sent.contains(SUMMARY_HEADING) && !sent.contains(&content) && !sent.contains("Note 1:"),
        "bob's context must hold nothing of alice's session: {sent}"
    );

    // Erasing the session erases its summary.
    let (status, erased) = call(
        &service.base,
        Some(ALICE_KEY),
        reqwest::Method::DELETE,
        &format!("/v1/sessions/{session}"),
        None,
    )
    .await;
    assert!(status == 200 || status == 204, "{status}: {erased}");
    settle(&service).await;
    let left = stores.count("", doc! { "session_id": &storage_key }).await;
    assert_eq!(left, 0, "the session's messages and summary are gone");
}

/// Twelve turns with a summary due every other turn, whose every call fails as `fail` makes it.
async fn turns_with_failing_summaries(proxy: &OllamaCallCountingProxy, config: Config) -> String {
    const TURNS: usize = 12;
    let service = serve(config.clone()).await;
    let user = chat_rig::unique_name("carol");
    let session = chat_rig::unique_name("failing");
    for n in 0..TURNS {
        turn(&service, ALICE_KEY, &user, &session, &message(n)).await;
    }
    settle(&service).await;
    let bodies = proxy.chat_bodies();
    let turns: Vec<&Value> = bodies.iter().filter(|b| !is_summary_call(b)).collect();
    assert_eq!(turns.len(), TURNS, "one generation per turn");
    let sizes: Vec<u32> = turns.iter().map(|b| context_tokens(b)).collect();
    assert!(
        sizes.iter().all(|&size| size <= BUDGET),
        "plain trimming keeps every context within {BUDGET} tokens: {sizes:?}"
    );
    assert!(
        turns
            .iter()
            .all(|b| !system_message(b).contains(SUMMARY_HEADING)),
        "no summary was written, so none is sent"
    );
    let stores = Stores::of(&config).await;
    let storage_key = format!("k.alice/{session}");
    assert_eq!(
        stores
            .count("", doc! { "session_id": &storage_key, "seq": { "$lt": 0 } })
            .await,
        0,
        "no summary stored"
    );
    assert_eq!(
        stores
            .count("", doc! { "session_id": &storage_key, "seq": { "$gt": 0 } })
            .await,
        2 * TURNS as u64,
        "every turn stored"
    );
    service.metrics_text().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_summary_call_falls_back_to_trimming() {
    let proxy =
        OllamaCallCountingProxy::start_failing_calls_containing(rig().ollama_url(), PROMPT).await;
    let mut config = config(&proxy.url);
    config.context.summarisation.every_turns = 2;
    let metrics = turns_with_failing_summaries(&proxy, config).await;
    let failed = metric_value(&metrics, "chat_summaries_total{outcome=\"failed\"}");
    let attempted = proxy
        .chat_bodies()
        .iter()
        .filter(|b| is_summary_call(b))
        .count();
    assert!(
        failed >= 1.0 && attempted >= 1,
        "summary calls must have been made and failed: {attempted} at the proxy; {metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_summary_call_past_its_timeout_falls_back_to_trimming() {
    let proxy = OllamaCallCountingProxy::start(rig().ollama_url()).await;
    let mut config = config(&proxy.url);
    config.context.summarisation.every_turns = 2;
    // No model answers within a millisecond.
    config.context.summarisation.timeout_ms = 1;
    let metrics = turns_with_failing_summaries(&proxy, config).await;
    let timed_out = metric_value(&metrics, "chat_summaries_total{outcome=\"timeout\"}");
    assert!(
        timed_out >= 1.0,
        "summary calls must have timed out: {metrics}"
    );
}
