//! Traffic policy against the rig's real Redis, FerretDB and Ollama: API keys, rate limits shared
//! by two replicas, and the response cache with single-flight coalescing.

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_rig::stream::{join_tokens, parse_sse};
use chat_rig::wait::until;
use chat_service::config::{Config, RateLimitKey};
use futures::StreamExt;
use serde_json::{Value, json};
use support::{OllamaCallCountingProxy, metric_value, rig, start, test_config};

const VALID_KEY: &str = "test-key-0123456789abcdef";

fn key_file(contents: &str) -> PathBuf {
    let dir = chat_rig::scratch_dir("chat-api-keys").unwrap();
    let file = dir.join(chat_rig::unique_name("keys"));
    std::fs::write(&file, contents).unwrap();
    file
}

fn with_auth(mut config: Config, file: &std::path::Path) -> Config {
    config.auth.enabled = true;
    config.auth.api_keys_file = Some(file.display().to_string());
    config
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limit_holds_across_two_replicas_sharing_redis() {
    let rig = rig();
    let file = key_file(&format!("{VALID_KEY}\n"));
    let mut config = with_auth(test_config(rig), &file);
    config.rate_limit.enabled = true;
    config.rate_limit.requests_per_window = 5;
    config.rate_limit.window_seconds = 60;
    config.rate_limit.key_by = RateLimitKey::ApiKey;
    // Same key prefix and Redis: two replicas of one service.
    let replicas = [
        start(config.clone(), rig.redis_url(), rig.mongodb_url()).await,
        start(config, rig.redis_url(), rig.mongodb_url()).await,
    ];
    let requests = (0..20).map(|i| {
        let replica = &replicas[i % 2];
        replica
            .http
            .get(replica.url("/v1/models"))
            .bearer_auth(VALID_KEY)
            .send()
    });
    let responses = futures::future::join_all(requests).await;
    let mut admitted = 0;
    let mut refused = 0;
    for response in responses {
        let response = response.unwrap();
        let headers = response.headers().clone();
        assert_eq!(headers["ratelimit-limit"], "5");
        assert_eq!(headers["ratelimit-policy"], "5;w=60");
        match response.status().as_u16() {
            200 => admitted += 1,
            429 => {
                refused += 1;
                let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
                assert!((1..=60).contains(&retry_after), "{retry_after}");
                assert_eq!(headers["ratelimit-remaining"], "0");
                let body: Value = response.json().await.unwrap();
                assert_eq!(body["error"]["code"], "rate_limited", "{body}");
            }
            other => panic!("unexpected status {other}"),
        }
    }
    println!("two replicas, limit 5 per 60 s: {admitted} admitted, {refused} refused of 20");
    assert_eq!(admitted, 5, "together the replicas admit exactly the limit");
    let refused_in_metrics: f64 = {
        let mut sum = 0.0;
        for replica in &replicas {
            sum += metric_value(
                &replica.metrics_text().await,
                r#"chat_rate_limited_total{exhausted="requests",limiter="redis"}"#,
            );
        }
        sum
    };
    assert_eq!(refused_in_metrics, 15.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limit_falls_back_to_a_local_limiter_when_redis_is_down() {
    let rig = rig();
    let mut config = test_config(rig);
    config.rate_limit.enabled = true;
    config.rate_limit.requests_per_window = 3;
    config.rate_limit.window_seconds = 60;
    config.rate_limit.key_by = RateLimitKey::User;
    // Nothing listens on port 1: every Redis call fails at once.
    let service = start(config, "redis://127.0.0.1:1/", rig.mongodb_url()).await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let response = service
            .http
            .get(service.url("/v1/models"))
            .header("x-user-id", "alice")
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429, 429]);
    // Another user has a budget of their own.
    let other = service
        .http
        .get(service.url("/v1/models"))
        .header("x-user-id", "bob")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200);
    let text = service.metrics_text().await;
    assert_eq!(
        metric_value(
            &text,
            r#"chat_rate_limited_total{exhausted="requests",limiter="local"}"#
        ),
        3.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn token_budget_is_charged_after_a_turn_and_then_refuses() {
    let rig = rig();
    let mut config = test_config(rig);
    config.rate_limit.enabled = true;
    config.rate_limit.requests_per_window = 100;
    // Less than any one turn's prompt plus completion, so one turn spends the budget.
    config.rate_limit.tokens_per_window = 5;
    config.rate_limit.window_seconds = 60;
    config.rate_limit.key_by = RateLimitKey::User;
    let service = start(config, rig.redis_url(), rig.mongodb_url()).await;
    let send = || {
        service
            .http
            .post(service.url("/v1/chat"))
            .header("x-user-id", "token-spender")
            .json(&json!({"message": "Hi."}))
            .send()
    };
    let first = send().await.unwrap();
    assert_eq!(first.status(), 200);
    let second = send().await.unwrap();
    assert_eq!(second.status(), 429);
    assert!(second.headers().contains_key("retry-after"));
    let body: Value = second.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tokens"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_api_keys_are_rejected_cheaply_and_keys_reload() {
    let rig = rig();
    let proxy = OllamaCallCountingProxy::start(rig.ollama_url()).await;
    let file = key_file(&format!("# accepted keys\n{VALID_KEY}\n"));
    let mut config = with_auth(test_config(rig), &file);
    config.backends[0].url = proxy.url.clone();
    let service = Arc::new(start(config, rig.redis_url(), rig.mongodb_url()).await);

    const FLOOD: usize = 2_000;
    let started = Instant::now();
    let statuses: Vec<(u16, String)> = futures::stream::iter(0..FLOOD)
        .map(|i| {
            let service = service.clone();
            async move {
                let mut request = service
                    .http
                    .post(service.url("/v1/chat"))
                    .json(&json!({"message": "hello"}));
                request = match i % 3 {
                    0 => request.bearer_auth(format!("bad-key-{i}")),
                    1 => request.header("x-api-key", &VALID_KEY[..VALID_KEY.len() - 1]),
                    _ => request,
                };
                let response = request.send().await.unwrap();
                (response.status().as_u16(), response.text().await.unwrap())
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let elapsed = started.elapsed();
    let rate = FLOOD as f64 / elapsed.as_secs_f64();
    println!(
        "{FLOOD} bad-key requests rejected in {:.2} s: {rate:.0} requests/s",
        elapsed.as_secs_f64()
    );
    for (status, body) in &statuses {
        assert_eq!(*status, 401, "{body}");
        let body: Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            body,
            json!({"error": {
                "code": "unauthorized",
                "message": "a valid API key is required",
                "type": "authentication_error",
                "param": null,
            }})
        );
    }
    assert_eq!(
        proxy.chat_calls(),
        0,
        "no bad-key request reached the back end"
    );
    let text = service.metrics_text().await;
    assert_eq!(
        metric_value(&text, "chat_auth_rejected_total"),
        FLOOD as f64
    );
    // The only store operations are the background look for pending erasures (every replica
    // makes it at start and every few seconds), never one for a request. Every series exists
    // from start-up at 0; a counted operation is one above 0.
    let request_operations: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("chat_history_store_operations_total{"))
        .filter(|l| !l.contains(r#"operation="erasure""#))
        .filter(|l| !l.ends_with(" 0"))
        .collect();
    assert!(
        request_operations.is_empty(),
        "no bad-key request touched a store: {request_operations:?}"
    );

    // A valid key passes and is visible in metrics only by its id.
    let ok = service
        .http
        .get(service.url("/v1/models"))
        .header("x-api-key", VALID_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let key_id = chat_service::auth::key_id(VALID_KEY);
    let text = service.metrics_text().await;
    assert_eq!(
        metric_value(
            &text,
            &format!(r#"chat_api_key_requests_total{{key_id="{key_id}"}}"#)
        ),
        1.0
    );
    assert!(!text.contains(VALID_KEY));

    // Rotating the Secret file: the new key is accepted and the old one refused, no restart.
    std::fs::write(&file, "rotated-key-abcdef\n").unwrap();
    let status = |key: &'static str| {
        let service = service.clone();
        async move {
            service
                .http
                .get(service.url("/v1/models"))
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let rotated = "the key file to be reloaded";
    until(rotated, Duration::from_secs(15), || async {
        match status("rotated-key-abcdef").await {
            200 => Ok(()),
            other => Err(format!("the new key answered {other}")),
        }
    })
    .await;
    assert_eq!(status(VALID_KEY).await, 401);
}

async fn cached_chat(
    service: &support::TestService,
    session: Option<&str>,
    message: &str,
) -> Value {
    let mut body = json!({"message": message, "temperature": 0});
    if let Some(session) = session {
        body["session_id"] = json!(session);
    }
    let (status, _, value) = service.post_json("/v1/chat", &body).await;
    assert_eq!(status, 200, "{value}");
    value
}

#[tokio::test(flavor = "multi_thread")]
async fn cache_hits_on_a_repeat_and_misses_when_the_history_differs() {
    let rig = rig();
    let proxy = OllamaCallCountingProxy::start(rig.ollama_url()).await;
    let mut config = test_config(rig);
    config.backends[0].url = proxy.url.clone();
    config.cache.enabled = true;
    config.cache.ttl_seconds = 120;
    let service = start(config, rig.redis_url(), rig.mongodb_url()).await;
    const QUESTION: &str = "Name a colour.";

    let first = cached_chat(&service, None, QUESTION).await;
    assert_eq!(first["cached"], false);
    assert_eq!(proxy.chat_calls(), 1);

    // Same context in another session: a hit, and the turn is still recorded in its history.
    let repeat = cached_chat(&service, None, QUESTION).await;
    assert_eq!(repeat["cached"], true, "{repeat}");
    assert_eq!(repeat["message"], first["message"]);
    assert_eq!(proxy.chat_calls(), 1, "a hit does not go upstream");
    let session = repeat["session_id"].as_str().unwrap();
    let stored = service.all_messages(session).await;
    assert_eq!(stored.len(), 2);
    assert_eq!(stored[0]["content"], QUESTION);
    assert_eq!(stored[1]["content"], repeat["message"]);

    // Same last message after a different history: a different context, so a miss.
    let opener = cached_chat(&service, None, "Hello, I like tea.").await;
    assert_eq!(proxy.chat_calls(), 2);
    let after_history = cached_chat(
        &service,
        Some(opener["session_id"].as_str().unwrap()),
        QUESTION,
    )
    .await;
    assert_eq!(after_history["cached"], false, "{after_history}");
    assert_eq!(after_history["context_messages"], 2);
    assert_eq!(proxy.chat_calls(), 3);

    // A non-deterministic request bypasses the cache.
    let (status, _, sampled) = service
        .post_json("/v1/chat", &json!({"message": QUESTION}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(sampled["cached"], false);
    assert_eq!(proxy.chat_calls(), 4);

    // A hit replays as a stream: token events, then `done` with `cached: true`.
    let response = service
        .http
        .post(service.url("/v1/chat"))
        .json(&json!({"message": QUESTION, "temperature": 0, "stream": true}))
        .send()
        .await
        .unwrap();
    let events = parse_sse(&response.text().await.unwrap());
    let streamed: String = join_tokens(&events);
    let last = events.last().unwrap();
    assert_eq!(last.name, "done");
    let done = last.json();
    assert_eq!(done["cached"], true, "{done}");
    assert_eq!(streamed, first["message"].as_str().unwrap());
    assert_eq!(proxy.chat_calls(), 4);

    // A streamed miss is cached once complete, then answers a plain repeat.
    let response = service
        .http
        .post(service.url("/v1/chat"))
        .json(&json!({"message": "Name a fruit.", "temperature": 0, "stream": true}))
        .send()
        .await
        .unwrap();
    let events = parse_sse(&response.text().await.unwrap());
    let done: Value = events.last().unwrap().json();
    assert_eq!(done["cached"], false);
    assert_eq!(proxy.chat_calls(), 5);
    let repeat = cached_chat(&service, None, "Name a fruit.").await;
    assert_eq!(repeat["cached"], true);
    assert_eq!(repeat["message"], done["message"]);
    assert_eq!(proxy.chat_calls(), 5);

    let text = service.metrics_text().await;
    assert_eq!(metric_value(&text, "chat_cache_hits_total"), 3.0);
    assert_eq!(metric_value(&text, "chat_cache_misses_total"), 4.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn identical_concurrent_misses_make_one_upstream_call() {
    let rig = rig();
    let proxy = OllamaCallCountingProxy::start(rig.ollama_url()).await;
    let mut config = test_config(rig);
    config.backends[0].url = proxy.url.clone();
    config.cache.enabled = true;
    let service = start(config, rig.redis_url(), rig.mongodb_url()).await;
    const CONCURRENT: usize = 6;
    let message = format!("Say one word. ({})", chat_rig::unique_name("q"));
    let answers =
        futures::future::join_all((0..CONCURRENT).map(|_| cached_chat(&service, None, &message)))
            .await;
    println!(
        "{CONCURRENT} identical concurrent requests -> {} upstream call(s)",
        proxy.chat_calls()
    );
    assert_eq!(proxy.chat_calls(), 1);
    let generated = answers.iter().filter(|a| a["cached"] == false).count();
    assert_eq!(
        generated, 1,
        "one leader generated, the others were coalesced"
    );
    for answer in &answers {
        assert_eq!(answer["message"], answers[0]["message"]);
        let stored = service
            .all_messages(answer["session_id"].as_str().unwrap())
            .await;
        assert_eq!(
            stored.len(),
            2,
            "every coalesced turn is in its own history"
        );
    }
    let text = service.metrics_text().await;
    assert_eq!(
        metric_value(&text, "chat_cache_coalesced_total"),
        (CONCURRENT - 1) as f64
    );
}
