//! Token accounting that cannot be dodged, on the rig's real Redis and FerretDB with the named
//! fixture `FlakyUpstream` as the back end (it reports fixed usage, answers slowly on command,
//! breaks streams, and records when the service closes a stream): concurrent turns on three
//! replicas against one budget, a client leaving mid-stream, a back end failing mid-answer.

mod support;

use std::time::{Duration, Instant};

use chat_service::config::{Config, RateLimitKey};
use futures::StreamExt;
use serde_json::{Value, json};
use support::flaky::{FlakyUpstream, Mode};
use support::pool::{backend, config_with};
use support::{charged_tokens, rig, start};

const WINDOW_SECONDS: u64 = 3_600;

fn budget_config(fixture: &FlakyUpstream, tokens_per_window: u64) -> Config {
    let mut config = config_with(vec![backend("fixture", &fixture.url)]);
    config.rate_limit.enabled = true;
    config.rate_limit.requests_per_window = 10_000;
    config.rate_limit.tokens_per_window = tokens_per_window;
    // Long, so that the budget does not refill noticeably while a test runs.
    config.rate_limit.window_seconds = WINDOW_SECONDS;
    config.rate_limit.key_by = RateLimitKey::User;
    config
}

#[tokio::test(flavor = "multi_thread")]
async fn sixty_concurrent_turns_on_three_replicas_overshoot_the_token_budget_by_at_most_one_turn() {
    const BUDGET: u64 = 300;
    let fixture = FlakyUpstream::start(Mode::Healthy).await;
    // Every turn is still running when the last one asks for its tokens.
    fixture.set_latency(Duration::from_millis(1_500));
    let config = budget_config(&fixture, BUDGET);
    let max_output_tokens = config.context.max_output_tokens;
    let rig = rig();
    let replicas = [
        start(config.clone(), rig.redis_url(), rig.mongodb_url()).await,
        start(config.clone(), rig.redis_url(), rig.mongodb_url()).await,
        start(config, rig.redis_url(), rig.mongodb_url()).await,
    ];
    let user = chat_rig::unique_name("spender");
    let turns = (0..60).map(|i| {
        let replica = &replicas[i % 3];
        let user = user.clone();
        async move {
            let response = replica
                .http
                .post(replica.url("/v1/chat"))
                .header("x-user-id", user)
                .json(&json!({"message": "Count to three."}))
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap();
            (status, body)
        }
    });
    let results = futures::future::join_all(turns).await;
    let mut answered = 0;
    let mut refused = 0;
    let mut used_tokens = 0u64;
    let mut largest_turn = 0u64;
    for (status, body) in &results {
        match status {
            200 => {
                answered += 1;
                let total = body["usage"]["total_tokens"].as_u64().unwrap();
                used_tokens += total;
                largest_turn = largest_turn.max(total);
            }
            429 => {
                refused += 1;
                assert_eq!(body["error"]["code"], "rate_limited", "{body}");
                assert!(
                    body["error"]["message"]
                        .as_str()
                        .unwrap()
                        .contains("tokens"),
                    "{body}"
                );
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    let overshoot = used_tokens.saturating_sub(BUDGET);
    let charged = charged_tokens(&replicas[0], &user).await;
    println!(
        "3 replicas, 60 concurrent turns, budget {BUDGET} tokens: {answered} answered, \
         {refused} refused, {used_tokens} tokens used (largest turn {largest_turn}), \
         overshoot {overshoot}, {charged:.1} charged in Redis after refunds"
    );
    assert!(answered >= 1, "the first turn fits an untouched budget");
    // One turn's reservation is its prompt estimate plus max_tokens.
    let one_turn = largest_turn.max(u64::from(max_output_tokens) + 20);
    assert!(
        overshoot <= one_turn,
        "{used_tokens} tokens used against a budget of {BUDGET}: overshoot {overshoot} > one turn ({one_turn})"
    );
    assert!(
        (charged - used_tokens as f64).abs() <= 2.0 + answered as f64,
        "after refunds Redis holds what was used: charged {charged:.1}, used {used_tokens}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_leaving_mid_stream_is_charged_and_the_upstream_request_is_closed() {
    let fixture = FlakyUpstream::start(Mode::SlowTokens(Duration::from_millis(200))).await;
    let mut config = budget_config(&fixture, 1_000);
    config.context.max_output_tokens = 500;
    let rig = rig();
    let service = start(config, rig.redis_url(), rig.mongodb_url()).await;
    let user = chat_rig::unique_name("leaver");
    let response = service
        .http
        .post(service.url("/v1/chat"))
        .header("x-user-id", &user)
        .json(&json!({"message": "Talk forever.", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut seen = String::new();
    while seen.matches("event: token").count() < 3 {
        seen.push_str(&String::from_utf8_lossy(
            &body.next().await.unwrap().unwrap(),
        ));
    }
    let left_at = Instant::now();
    drop(body);
    let closed = chat_rig::eventually(
        "the fixture sees its stream closed",
        Duration::from_secs(10),
        || async { fixture.closed_streams().first().copied() },
    )
    .await;
    let (closed_at, tokens_sent) = closed;
    let cancelled_after = closed_at.saturating_duration_since(left_at);
    println!(
        "upstream closed {cancelled_after:?} after the client left, {tokens_sent} tokens sent"
    );
    assert!(
        cancelled_after < Duration::from_secs(2),
        "{cancelled_after:?}"
    );
    // The partial turn is charged: prompt estimate plus the tokens generated.
    let charged = chat_rig::eventually(
        "the partial turn is settled",
        Duration::from_secs(10),
        || async {
            let charged = charged_tokens(&service, &user).await;
            // Settled: no longer the whole reservation (prompt + 500).
            (charged > 0.0 && charged < 300.0).then_some(charged)
        },
    )
    .await;
    println!("client left after 3 tokens: {charged:.1} tokens charged");
    assert!(
        charged >= 3.0 + 4.0,
        "charged {charged:.1}: less than the 3 tokens seen plus the prompt"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_back_end_failing_after_the_first_token_is_charged_for_what_it_generated() {
    let fixture = FlakyUpstream::start(Mode::FailAfterTokens(3)).await;
    let config = budget_config(&fixture, 1_000);
    let rig = rig();
    let service = start(config, rig.redis_url(), rig.mongodb_url()).await;
    let user = chat_rig::unique_name("broken");
    let response = service
        .http
        .post(service.url("/v1/chat"))
        .header("x-user-id", &user)
        .json(&json!({"message": "Say something."}))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "generation_interrupted", "{body}");
    let charged = charged_tokens(&service, &user).await;
    println!("back end failed after 3 tokens: {charged:.1} tokens charged");
    assert!(
        (7.0..100.0).contains(&charged),
        "charged {charged:.1}: expected prompt estimate + 3 generated"
    );
}
