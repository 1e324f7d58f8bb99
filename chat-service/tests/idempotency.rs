//! `Idempotency-Key` on `POST /v1/chat`, against the rig's real Redis, FerretDB and Ollama: a
//! retry gets the first answer and stores nothing twice, also when the client hung up before
//! reading the answer (a lost acknowledgement); the same key with another body is refused.

mod support;

use std::time::{Duration, Instant};

use chat_service::config::BackendConfig;
use serde_json::{Value, json};
use support::{OllamaCallCountingProxy, TestService, assert_error, rig, start, test_config};
use tokio::io::AsyncWriteExt;

async fn post_with_key(service: &TestService, key: &str, body: &Value) -> reqwest::Response {
    service
        .http
        .post(service.url("/v1/chat"))
        .header("idempotency-key", key)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// Sends the turn over a raw connection and hangs up, once Ollama got the generation, without
/// reading a byte of the answer.
async fn send_and_hang_up(
    service: &TestService,
    proxy: &OllamaCallCountingProxy,
    key: &str,
    body: &Value,
) {
    let address = service.base.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
    let body = body.to_string();
    let request = format!(
        "POST /v1/chat HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/json\r\n\
         idempotency-key: {key}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    let started = Instant::now();
    while proxy.chat_calls() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the turn never reached Ollama"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(socket);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_after_a_lost_answer_gets_it_and_nothing_is_stored_twice() {
    let rig = rig();
    let proxy = OllamaCallCountingProxy::start(rig.ollama_url()).await;
    let mut config = test_config(rig);
    config.backends = vec![BackendConfig::ollama("ollama", &proxy.url)];
    let service = start(config, rig.redis_url(), rig.mongodb_url()).await;
    let session = "idempotent-turn";
    let body = json!({"session_id": session, "message": "Count to three."});
    send_and_hang_up(&service, &proxy, "retry-key-1", &body).await;

    // The retry: told to come back while the first still runs, then the first's answer.
    let started = Instant::now();
    let (headers, answer) = loop {
        let response = post_with_key(&service, "retry-key-1", &body).await;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let value: Value = response.json().await.unwrap();
        if status == 409 {
            assert_error(status, &value, 409, "idempotency_in_progress");
            assert!(headers.contains_key("retry-after"), "{headers:?}");
            assert!(
                started.elapsed() < Duration::from_secs(300),
                "still running: {value}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        }
        assert_eq!(status, 200, "{value}");
        break (headers, value);
    };
    assert_eq!(headers["idempotent-replayed"], "true", "{answer}");
    assert_eq!(answer["session_id"], session);

    // Again: the same answer, still one generation and one stored turn.
    let response = post_with_key(&service, "retry-key-1", &body).await;
    assert_eq!(response.status(), 200);
    let again: Value = response.json().await.unwrap();
    assert_eq!(again, answer);
    assert_eq!(proxy.chat_calls(), 1, "the retries generated again");
    let messages = service.all_messages(session).await;
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert_eq!(messages[1]["content"], answer["message"]);

    // The key belongs to that request: another body under it is refused, and stores nothing.
    let other = json!({"session_id": session, "message": "Something else."});
    let response = post_with_key(&service, "retry-key-1", &other).await;
    let status = response.status().as_u16();
    let value: Value = response.json().await.unwrap();
    assert_error(status, &value, 422, "idempotency_key_reused");
    assert_eq!(service.all_messages(session).await.len(), 2);
    assert_eq!(proxy.chat_calls(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_that_cannot_be_honoured_are_refused() {
    let rig = rig();
    let service = start(test_config(rig), rig.redis_url(), rig.mongodb_url()).await;
    let streamed = json!({"message": "hi", "stream": true});
    let response = post_with_key(&service, "stream-key", &streamed).await;
    let status = response.status().as_u16();
    assert_error(
        status,
        &response.json().await.unwrap(),
        400,
        "invalid_request",
    );
    let response = post_with_key(&service, &"k".repeat(256), &json!({"message": "hi"})).await;
    let status = response.status().as_u16();
    assert_error(
        status,
        &response.json().await.unwrap(),
        400,
        "invalid_request",
    );
    let response = service
        .http
        .post(service.url("/v1/chat/completions"))
        .header("idempotency-key", "openai-key")
        .json(&json!({"model": rig.model(), "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    assert_error(
        status,
        &response.json().await.unwrap(),
        400,
        "invalid_request",
    );
}
