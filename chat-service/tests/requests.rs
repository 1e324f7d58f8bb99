//! Requests at the edge of the chat service: bad input and its JSON errors, load shedding, the
//! operational endpoints, and the overhead of one turn against Ollama directly; against real
//! Redis, FerretDB and Ollama.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{assert_error, rig, start, start_on_rig, test_config};

#[tokio::test(flavor = "multi_thread")]
async fn bad_inputs_get_their_status_and_json_error() {
    let service = start_on_rig().await;
    let cases: Vec<(Value, u16, &str, Option<&str>)> = vec![
        (json!({}), 400, "invalid_json", Some("message")),
        (json!({"message": 5}), 400, "invalid_json", Some("message")),
        (
            json!({"message": "hi", "session_id": {"$gt": ""}}),
            400,
            "invalid_json",
            Some("session_id"),
        ),
        (
            json!({"message": "hi", "session_id": "../etc/passwd"}),
            400,
            "invalid_session_id",
            None,
        ),
        (
            json!({"message": "hi", "model": "gpt-17"}),
            400,
            "model_not_allowed",
            Some("gpt-17"),
        ),
        (
            json!({"message": "x".repeat(4000)}),
            413,
            "payload_too_large",
            None,
        ),
        (
            json!({"message": "   "}),
            400,
            "invalid_request",
            Some("message"),
        ),
        (
            json!({"message": "hi", "extra": 1}),
            400,
            "invalid_json",
            Some("extra"),
        ),
    ];
    for (body, status, code, mentions) in cases {
        let (got, headers, error) = service.post_json("/v1/chat", &body).await;
        assert_error(got, &error, status, code);
        assert!(headers.contains_key("x-request-id"));
        if let Some(word) = mentions {
            assert!(
                error["error"]["message"].as_str().unwrap().contains(word),
                "{error}"
            );
        }
    }
    let response = service
        .http
        .post(service.url("/v1/chat"))
        .header("content-type", "application/json")
        .body("{\"message\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "invalid_json");
    // A body far over the limit is refused before parsing.
    let huge = json!({"message": "y".repeat(200_000)});
    let (status, _, error) = service.post_json("/v1/chat", &huge).await;
    assert_error(status, &error, 413, "payload_too_large");

    let response = service
        .http
        .get(service.url("/no/such/route"))
        .send()
        .await
        .unwrap();
    assert!(response.headers().contains_key("x-request-id"));
    let status = response.status().as_u16();
    assert_error(status, &response.json().await.unwrap(), 404, "not_found");
    let (status, error) = service.get_json("/v1/sessions/bad%20id/messages").await;
    assert_error(status, &error, 400, "invalid_session_id");
    let (status, error) = service
        .get_json(&format!(
            "/v1/sessions/{}/messages",
            chat_rig::unique_name("none")
        ))
        .await;
    assert_error(status, &error, 404, "not_found");
    let response = service
        .http
        .delete(service.url(&format!("/v1/sessions/{}", chat_rig::unique_name("none"))))
        .send()
        .await
        .unwrap();
    assert_error(
        response.status().as_u16(),
        &response.json().await.unwrap(),
        404,
        "not_found",
    );
    let (status, error) = service
        .get_json("/v1/sessions/abc/messages?cursor=-3")
        .await;
    assert_error(status, &error, 400, "invalid_request");
    let (status, error) = service
        .get_json("/v1/sessions/abc/messages?limit=100000")
        .await;
    assert_error(status, &error, 400, "invalid_request");
    let (status, _, error) = service
        .post_json(
            "/v1/chat/completions",
            &json!({"model": rig().model(), "messages": [{"role": "assistant", "content": "x"}]}),
        )
        .await;
    assert_error(status, &error, 400, "invalid_request");
    let (status, _, error) = service
        .post_json(
            "/v1/chat/completions",
            &json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    assert_error(status, &error, 400, "model_not_allowed");
    let response = service
        .http
        .put(service.url("/v1/chat"))
        .send()
        .await
        .unwrap();
    assert_error(
        response.status().as_u16(),
        &response.json().await.unwrap(),
        405,
        "method_not_allowed",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrency_limit_sheds_load_with_503_and_retry_after() {
    let rig = rig();
    let mut config = test_config(rig);
    config.limits.max_concurrent_requests = 1;
    config.context.max_output_tokens = 24;
    let service = start(config, rig.redis_url(), rig.mongodb_url()).await;
    // A streamed turn holds the only permit until its last byte: once its first bytes arrive the
    // slot is certainly taken, so the next request must be shed (no race between the two).
    let mut busy = service
        .http
        .post(service.url("/v1/chat"))
        .json(&json!({"message": "take your time", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(busy.status(), 200);
    let first = tokio::time::timeout(Duration::from_secs(120), busy.chunk())
        .await
        .expect("the streamed turn starts")
        .unwrap();
    assert!(first.is_some_and(|c| !c.is_empty()));
    let (status, headers, body) = service
        .post_json("/v1/chat", &json!({"message": "me too"}))
        .await;
    assert_eq!(status, 503, "{body}");
    assert_error(503, &body, 503, "overloaded");
    assert_eq!(headers["retry-after"], "1");
    // The held turn still completes.
    let mut rest = String::new();
    while let Some(chunk) = busy.chunk().await.unwrap() {
        rest.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(rest.contains("event: done"), "stream ended: {rest}");
    // Probes are never shed.
    assert_eq!(service.get_json("/healthz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn operational_endpoints_describe_the_service() {
    let service = start_on_rig().await;
    let (status, _, _) = service
        .post_json("/v1/chat", &json!({"message": "count me"}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(service.get_json("/healthz").await.0, 200);
    let (status, ready) = service.get_json("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["status"], "ready");
    let metrics = service.metrics_text().await;
    for name in [
        "chat_http_requests_total{",
        "chat_http_request_duration_seconds_bucket{",
        "chat_time_to_first_token_seconds_bucket{",
        "chat_tokens_total{",
        "chat_history_store_operations_total{",
        "chat_open_websockets ",
    ] {
        assert!(metrics.contains(name), "missing {name} in\n{metrics}");
    }
    assert!(metrics.contains("route=\"/v1/chat\""));
    let (status, openapi) = service.get_json("/openapi.json").await;
    assert_eq!(status, 200);
    for path in [
        "/v1/chat",
        "/v1/chat/completions",
        "/ws/chat",
        "/v1/sessions/{id}/messages",
        "/readyz",
    ] {
        assert!(
            openapi["paths"].get(path).is_some(),
            "{path} missing from the OpenAPI document"
        );
    }
    let docs = service
        .http
        .get(service.url("/docs"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(docs.contains("/v1/chat/completions"));
}

#[tokio::test(flavor = "multi_thread")]
async fn one_turn_through_the_service_versus_directly_to_ollama() {
    let service = start_on_rig().await;
    let rig = rig();
    let prompt = "Say hello.";
    // Warm both paths once, then time the second run of each.
    let direct = || async {
        let started = Instant::now();
        let response = service
            .http
            .post(format!("{}/api/chat", rig.ollama_url()))
            .json(
                &json!({"model": rig.model(), "stream": false, "options": {"num_predict": 12},
                          "messages": [{"role": "user", "content": prompt}]}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        (started.elapsed(), body["eval_count"].as_u64().unwrap_or(0))
    };
    let through = || async {
        let started = Instant::now();
        let (status, _, body) = service
            .post_json("/v1/chat", &json!({"message": prompt}))
            .await;
        assert_eq!(status, 200);
        (
            started.elapsed(),
            body["usage"]["completion_tokens"].as_u64().unwrap_or(0),
        )
    };
    direct().await;
    through().await;
    let mut direct_times = Vec::new();
    let mut service_times = Vec::new();
    for _ in 0..3 {
        direct_times.push(direct().await);
        service_times.push(through().await);
    }
    eprintln!("[timing] direct to ollama: {direct_times:?}");
    eprintln!("[timing] through chat-service: {service_times:?}");
}
