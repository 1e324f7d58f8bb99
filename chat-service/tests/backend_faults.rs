//! How the back-end pool survives failing back ends: failover, circuit breakers, failures after
//! the first token, the retry budget, queues, the fallback and timeouts. Real Ollamas (the rig's
//! and a second one a test starts) where a back end must generate; the named fixture
//! `FlakyUpstream` where one must misbehave on command. Redis and MongoDB are the rig's.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_service::config::{FallbackConfig, Strategy};
use serde_json::{Value, json};
use support::flaky::{FlakyUpstream, Mode, REPLY};
use support::pool::{
    backend, backends_status, chat, chat_streamed, config_with, endpoint, serve, successes,
    wait_for_endpoint,
};
use support::{OllamaCallCountingProxy, metric_value, rig};

#[tokio::test(flavor = "multi_thread")]
async fn stopping_one_of_two_ollamas_under_load_fails_no_turn_that_was_not_streaming_yet() {
    let rig = rig();
    let model = rig.model().to_string();
    let mut second = tokio::task::spawn_blocking(move || {
        let mut server = chat_rig::OllamaServer::start().map_err(|e| format!("{e:#}"))?;
        server.load_model(&model).map_err(|e| format!("{e:#}"))?;
        Ok::<_, String>(server)
    })
    .await
    .unwrap()
    .expect("a second real Ollama");
    let mut config = config_with(vec![
        backend("first", rig.ollama_url()),
        backend("second", &second.url()),
    ]);
    config.routing.strategy = Strategy::LeastInFlight;
    config.context.max_output_tokens = 8;
    // JSON turns ask for whole answers, so those in flight on the stopped back end have not
    // started for their client and fail over too, all at the same moment: this test is about
    // failover, not about the retry budget (which has its own test), so the budget does not
    // ration them.
    config.routing.retry_budget_min_per_second = 1_000;
    let service = Arc::new(serve(config).await);

    // 8 sessions x 4 turns; odd sessions stream (SSE), even ones wait for JSON.
    let load = (0..8).map(|s| {
        let service = service.clone();
        tokio::spawn(async move {
            let session = chat_rig::unique_name("load");
            let mut results = Vec::new();
            for turn in 0..4 {
                let body = json!({"session_id": session, "message": format!("Say one word. ({turn})"), "stream": s % 2 == 1});
                if s % 2 == 1 {
                    let (status, tokens, last, data) = chat_streamed(&service, body).await;
                    results.push((status, !tokens.is_empty(), last, data));
                } else {
                    let (status, _, value) = chat(&service, body).await;
                    let code = value["error"]["code"].as_str().unwrap_or("done").to_string();
                    results.push((status, false, code, value.to_string()));
                }
            }
            results
        })
    });
    let load: Vec<_> = load.collect();
    // Stop the second Ollama once it has served a few turns, while the load is running.
    chat_rig::eventually(
        "the second Ollama serves",
        Duration::from_secs(300),
        || async { (successes(&service, "second", "second").await >= 3.0).then_some(()) },
    )
    .await;
    let before_stop = backends_status(&service).await;
    let in_flight_at_stop = endpoint(&before_stop, "second")["inFlight"].clone();
    let served_by_second_before = successes(&service, "second", "second").await;
    let served_by_first_before = successes(&service, "first", "first").await;
    let stopped_at = Instant::now();
    tokio::task::spawn_blocking(move || {
        second.stop();
        second
    })
    .await
    .unwrap();
    println!("second Ollama stopped in {:?}", stopped_at.elapsed());

    let mut ok = 0;
    let mut failed_mid_stream = 0;
    for task in load {
        for (status, had_tokens, last, data) in task.await.unwrap() {
            match (status, last.as_str()) {
                (200, "done") => ok += 1,
                // Already streaming from the stopped back end: an explicit error event after
                // tokens. A JSON turn never is (its answer comes whole), so it always fails over.
                (200, "error") if had_tokens && data.contains("generation_interrupted") => {
                    failed_mid_stream += 1
                }
                other => panic!("a turn failed that was not streaming yet: {other:?} {data}"),
            }
        }
    }
    let served_by_first_after = successes(&service, "first", "first").await;
    let after = backends_status(&service).await;
    println!(
        "32 turns: {ok} ok, {failed_mid_stream} broken mid-stream (in flight on `second` at stop: \
         {in_flight_at_stop}); before the stop first served {served_by_first_before}, second \
         {served_by_second_before}; after it first served {} more; second: {}",
        served_by_first_after - served_by_first_before,
        endpoint(&after, "second")
    );
    assert_eq!(ok + failed_mid_stream, 32);
    // Every broken turn had its first token from the stopped back end.
    let metrics = service.metrics_text().await;
    let broken_on_second = metric_value(
        &metrics,
        r#"chat_backend_requests_total{backend="second",endpoint="second",outcome="stream_error"}"#,
    );
    assert_eq!(failed_mid_stream as f64, broken_on_second);
    assert!(
        served_by_first_after > served_by_first_before,
        "the first took over"
    );
    let second_status = endpoint(&after, "second");
    assert!(second_status["lastError"].is_string(), "{second_status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn breaker_opens_after_failures_and_closes_through_half_open_after_cooldown() {
    let flaky = FlakyUpstream::start(Mode::Fail500).await;
    // The healthy side is the fixture too, answering at once: with a real model behind it, a
    // failover turn on a loaded machine outlasted the cooldown, and the breaker was half-open
    // before the test could see it open.
    let steady = FlakyUpstream::start(Mode::Healthy).await;
    let mut config = config_with(vec![
        backend("flaky", &flaky.url),
        backend("steady", &steady.url),
    ]);
    config.routing.strategy = Strategy::RoundRobin;
    config.routing.breaker_failures = 3;
    config.routing.breaker_cooldown_seconds = 15;
    config.context.max_output_tokens = 4;
    let service = serve(config).await;

    // Round robin sends every other turn to `flaky` first; each fails over to Ollama.
    let mut turns = 0;
    while flaky.chat_calls() < 3 {
        let (status, _, body) = chat(&service, json!({"message": format!("Hi {turns}")})).await;
        assert_eq!(status, 200, "{body}");
        turns += 1;
        assert!(turns <= 6, "round robin reaches `flaky` every other turn");
    }
    // The third failure opened the breaker.
    let opened_by = Instant::now();
    let status = backends_status(&service).await;
    let flaky_status = endpoint(&status, "flaky");
    assert_eq!(flaky_status["breaker"], "open", "{status}");
    assert_eq!(flaky_status["consecutiveFailures"], 3);
    assert!(
        flaky_status["lastError"].as_str().unwrap().contains("500"),
        "{flaky_status}"
    );
    assert_eq!(status["ready"], 1);
    assert_eq!(status["total"], 2);
    let metrics = service.metrics_text().await;
    assert!(
        metrics.contains(r#"chat_backend_breaker_state{backend="flaky",endpoint="flaky"} 2"#),
        "{metrics}"
    );
    // While open, traffic avoids it.
    for i in 0..2 {
        let (status, _, body) = chat(&service, json!({"message": format!("Again {i}")})).await;
        assert_eq!(status, 200, "{body}");
    }
    if opened_by.elapsed() < Duration::from_secs(15) {
        assert_eq!(flaky.chat_calls(), 3, "an open breaker takes no traffic");
    }
    let opened_at = opened_by;

    flaky.set_mode(Mode::Healthy).await;
    wait_for_endpoint(&service, "flaky", "breaker half-open", |e| {
        e["breaker"] == "halfOpen"
    })
    .await;
    let half_open_after = opened_at.elapsed();
    // The next turns probe it (round robin reaches it within two); the probe succeeds.
    let mut probes = 0;
    while flaky.chat_calls() == 3 && probes < 4 {
        let (status, _, body) = chat(&service, json!({"message": "probe"})).await;
        assert_eq!(status, 200, "{body}");
        probes += 1;
    }
    assert_eq!(
        flaky.chat_calls(),
        4,
        "exactly one probe reached the fixture"
    );
    let status = backends_status(&service).await;
    let flaky_status = endpoint(&status, "flaky");
    assert_eq!(flaky_status["breaker"], "closed", "{flaky_status}");
    assert_eq!(flaky_status["consecutiveFailures"], 0);
    assert_eq!(status["ready"], 2);
    println!(
        "breaker open after 3 failures; half-open after {half_open_after:?} (cooldown 15 s); \
         closed by the probe after {probes} more turn(s), {:?} after opening",
        opened_at.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn failure_after_the_first_token_ends_the_stream_with_an_error_and_stores_the_partial_reply()
{
    let flaky = FlakyUpstream::start(Mode::FailAfterTokens(3)).await;
    let service = serve(config_with(vec![backend("flaky", &flaky.url)])).await;
    let session = chat_rig::unique_name("broken");

    // SSE: three tokens, then an explicit `error` event and no `done`.
    let (status, tokens, last, data) = chat_streamed(
        &service,
        json!({"session_id": session, "message": "first question", "stream": true}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(tokens, REPLY[..3].concat());
    assert_eq!(last, "error", "{data}");
    let error: Value = serde_json::from_str(&data).unwrap();
    assert_eq!(error["error"]["code"], "generation_interrupted", "{error}");

    let messages = service.all_messages(&session).await;
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert_eq!(messages[0]["role"], "user");
    assert_eq!(messages[0]["content"], "first question");
    assert_eq!(messages[0]["incomplete"], false);
    assert_eq!(messages[1]["role"], "assistant");
    assert_eq!(messages[1]["content"], REPLY[..3].concat());
    assert_eq!(messages[1]["incomplete"], true);
    assert_eq!(messages[1]["finish_reason"], "error");

    // JSON: 502 naming the interruption; the turn is stored the same way.
    let (status, _, body) = chat(
        &service,
        json!({"session_id": session, "message": "second question"}),
    )
    .await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "generation_interrupted");
    let messages = service.all_messages(&session).await;
    assert_eq!(messages.len(), 4);
    assert_eq!(messages[3]["finish_reason"], "error");

    // OpenAI streaming: the error as a data chunk and no [DONE].
    let response = service
        .http
        .post(service.url("/v1/chat/completions"))
        .header("x-session-id", &session)
        .json(&json!({"model": rig().model(), "stream": true, "messages": [{"role": "user", "content": "third"}]}))
        .send()
        .await
        .unwrap();
    let text = response.text().await.unwrap();
    assert!(text.contains("generation_interrupted"), "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
    assert_eq!(service.all_messages(&session).await.len(), 6);
    let metrics = service.metrics_text().await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"chat_backend_requests_total{backend="flaky",endpoint="flaky",outcome="stream_error"}"#
        ),
        3.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_retry_budget_bounds_upstream_attempts_when_every_backend_fails() {
    let upstreams = [
        FlakyUpstream::start(Mode::Fail500).await,
        FlakyUpstream::start(Mode::Fail500).await,
        FlakyUpstream::start(Mode::Fail500).await,
    ];
    let mut config = config_with(
        upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| backend(&format!("down{i}"), &u.url))
            .collect(),
    );
    config.routing.max_attempts = 3;
    // Breakers would also stop the storm; keep them out of the way to measure the budget alone.
    config.routing.breaker_failures = 100_000;
    config.routing.retry_budget_percent = 20;
    config.routing.retry_budget_min_per_second = 0;
    let service = serve(config).await;
    let turns = 50;
    for i in 0..turns {
        let (status, headers, body) = chat(&service, json!({"message": format!("m{i}")})).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "backend_unavailable");
        assert!(headers.contains_key("retry-after"));
    }
    let attempts: usize = upstreams.iter().map(FlakyUpstream::chat_calls).sum();
    let metrics = service.metrics_text().await;
    let exhausted = metric_value(&metrics, "chat_backend_retry_budget_exhausted_total");
    let retries = metric_value(&metrics, "chat_backend_retries_total");
    println!(
        "{turns} turns, 3 back ends all failing, maxAttempts 3: {attempts} upstream attempts \
         ({retries} retries, {exhausted} refused by the budget); without a budget {}",
        turns * 3
    );
    // First attempts + the initial burst of 10 + 20% of the turns.
    assert!(attempts <= turns + 10 + turns / 5, "{attempts}");
    assert!(attempts >= turns);
    assert!(exhausted > 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_or_open_breakers_answer_503_with_retry_after() {
    // Queue full: one in flight, one queued, the third is refused.
    let slow = FlakyUpstream::start(Mode::Healthy).await;
    slow.set_latency(Duration::from_secs(2));
    let mut config = config_with(vec![backend("slow", &slow.url)]);
    config.routing.max_in_flight_per_backend = 1;
    config.routing.queue_depth = 1;
    config.routing.queue_timeout_ms = 30_000;
    let service = Arc::new(serve(config).await);
    let spawn_turn = |message: &'static str| {
        let service = service.clone();
        tokio::spawn(async move { chat(&service, json!({"message": message})).await })
    };
    let first = spawn_turn("first");
    wait_for_endpoint(&service, "slow", "one in flight", |e| e["inFlight"] == 1).await;
    let second = spawn_turn("second");
    wait_for_endpoint(&service, "slow", "one queued", |e| e["queued"] == 1).await;
    let (status, headers, body) = chat(&service, json!({"message": "third"})).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "backend_overloaded");
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(first.await.unwrap().0, 200);
    assert_eq!(second.await.unwrap().0, 200, "the queued turn was served");
    assert_eq!(slow.chat_calls(), 2);
    let metrics = service.metrics_text().await;
    assert_eq!(
        metric_value(&metrics, r#"chat_backend_shed_total{reason="queue_full"}"#),
        1.0
    );

    // Every breaker open: refused at once, told when to come back.
    let broken = FlakyUpstream::start(Mode::Fail500).await;
    let mut config = config_with(vec![backend("broken", &broken.url)]);
    config.routing.breaker_failures = 1;
    config.routing.breaker_cooldown_seconds = 30;
    let service = serve(config).await;
    let (status, _, body) = chat(&service, json!({"message": "opens it"})).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "backend_unavailable");
    let (status, headers, body) = chat(&service, json!({"message": "refused"})).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "backend_circuit_open");
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((25..=30).contains(&retry_after), "{retry_after}");
    assert_eq!(broken.chat_calls(), 1, "an open breaker is not called");
    // The pod stays in its Service: callers get this clear 503, not a refused connection, and
    // the operator can still read /v1/backends into BackendsReady.
    let (status, ready) = service.get_json("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert!(
        ready["degraded"].to_string().contains("unhealthy"),
        "{ready}"
    );
    let (status, backends) = service.get_json("/v1/backends").await;
    assert_eq!(
        (status, backends["ready"].as_u64()),
        (200, Some(0)),
        "{backends}"
    );
    println!("queue full -> 503 Retry-After 1; breakers open -> 503 Retry-After {retry_after}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_fallback_serves_when_every_regular_endpoint_is_saturated_or_open() {
    let rig = rig();
    let spare = OllamaCallCountingProxy::start(rig.ollama_url()).await;
    let broken = FlakyUpstream::start(Mode::Refuse).await;
    let mut config = config_with(vec![
        backend("broken", &broken.url),
        backend("spare", &spare.url),
    ]);
    config.routing.breaker_failures = 1;
    config.routing.breaker_cooldown_seconds = 600;
    config.routing.fallback = Some(FallbackConfig {
        backend: Some("spare".into()),
        model: None,
    });
    let service = serve(config).await;
    // Refused connection: `spare` takes no regular traffic, so the turn fails and opens the breaker.
    let (status, _, body) = chat(&service, json!({"message": "opens it"})).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        spare.chat_calls(),
        0,
        "the fallback takes no regular traffic"
    );
    let (status, _, body) = chat(&service, json!({"message": "served by the fallback"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(spare.chat_calls(), 1);
    let status = backends_status(&service).await;
    assert_eq!(endpoint(&status, "spare")["fallback"], true);
    let metrics = service.metrics_text().await;
    assert_eq!(metric_value(&metrics, "chat_backend_fallbacks_total"), 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hanging_backend_times_out_before_the_first_token_and_fails_over() {
    // `firstTokenTimeoutMs` applies to every attempt, so the back end that answers is a healthy
    // fixture too: a real Ollama shared with the other tests cannot promise 1.5 s.
    let hang = FlakyUpstream::start(Mode::Hang).await;
    let healthy = FlakyUpstream::start(Mode::Healthy).await;
    let mut config = config_with(vec![
        backend("hang", &hang.url),
        backend("healthy", &healthy.url),
    ]);
    config.routing.strategy = Strategy::RoundRobin;
    config.routing.first_token_timeout_ms = 1_500;
    let service = serve(config).await;
    let started = Instant::now();
    // Streaming: a non-streamed answer has no first token to time (the next test).
    let (status, tokens, last, data) =
        chat_streamed(&service, json!({"message": "who answers?", "stream": true})).await;
    assert_eq!((status, last.as_str()), (200, "done"), "{data}");
    assert_eq!(tokens, REPLY.concat());
    let elapsed = started.elapsed();
    assert_eq!(hang.chat_calls(), 1);
    assert_eq!(healthy.chat_calls(), 1);
    assert!(elapsed >= Duration::from_millis(1_500), "{elapsed:?}");
    let metrics = service.metrics_text().await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"chat_backend_requests_total{backend="hang",endpoint="hang",outcome="timeout"}"#
        ),
        1.0
    );
    println!(
        "hanging back end: failed over after the 1.5 s first-token timeout, answered in {elapsed:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_whole_answer_on_a_hanging_backend_fails_over_after_the_total_timeout() {
    // A JSON client's turn asks the back end for a whole answer, which has no first token
    // before its last: the attempt is bounded by `totalTimeoutMs`, not `firstTokenTimeoutMs`.
    let hang = FlakyUpstream::start(Mode::Hang).await;
    let healthy = FlakyUpstream::start(Mode::Healthy).await;
    let mut config = config_with(vec![
        backend("hang", &hang.url),
        backend("healthy", &healthy.url),
    ]);
    config.routing.strategy = Strategy::RoundRobin;
    config.routing.first_token_timeout_ms = 500;
    config.routing.total_timeout_ms = 2_000;
    let service = serve(config).await;
    let started = Instant::now();
    let (status, _, body) = chat(&service, json!({"message": "who answers?"})).await;
    let elapsed = started.elapsed();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["message"], REPLY.concat(), "{body}");
    assert_eq!((hang.chat_calls(), healthy.chat_calls()), (1, 1));
    assert!(
        !hang.recorded()[0].stream && !healthy.recorded()[0].stream,
        "both attempts asked for a whole answer"
    );
    assert!(elapsed >= Duration::from_millis(2_000), "{elapsed:?}");
    let metrics = service.metrics_text().await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"chat_backend_requests_total{backend="hang",endpoint="hang",outcome="timeout"}"#
        ),
        1.0
    );
}
