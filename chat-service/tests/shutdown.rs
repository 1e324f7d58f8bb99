//! SIGTERM against the real `chat-service` binary on the rig's Redis and FerretDB, with the named
//! fixture `FlakyUpstream` as a slow back end: a streamed turn that fits the grace period
//! finishes and is stored; one that does not is cut at the deadline and stored as incomplete;
//! new connections are refused from the signal on.

mod support;

use std::time::{Duration, Instant};

use chat_rig::stream::parse_sse;
use chat_service::config::Config;
use futures::StreamExt;
use serde_json::{Value, json};
use support::binary::{Binary, start_binary};
use support::flaky::{FlakyUpstream, Mode};
use support::pool::{backend, config_with};
use support::{rig, start};

/// Starts a streamed turn and returns the rest of its body once the first token is in.
async fn begin_streamed_turn(
    binary: &Binary,
    session: &str,
) -> (
    String,
    impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + use<>,
) {
    let response = reqwest::Client::new()
        .post(format!("{}/v1/chat", binary.base))
        .json(&json!({"session_id": session, "message": "Tell a long story.", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut text = String::new();
    while !text.contains("event: token") {
        text.push_str(&String::from_utf8_lossy(
            &body.next().await.unwrap().unwrap(),
        ));
    }
    (text, body)
}

/// The stored messages of `session`, read through a fresh service on the same stores.
async fn stored(config: &Config, session: &str) -> Vec<Value> {
    let rig = rig();
    let reader = start(config.clone(), rig.redis_url(), rig.mongodb_url()).await;
    reader.all_messages(session).await
}

fn connection_refused(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_millis(500),
    )
    .is_err()
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_a_slow_turn_finish_within_the_grace_period_and_refuses_new_connections() {
    // 30 tokens, 100 ms apart: about 3 s, within a 20 s grace period.
    let fixture = FlakyUpstream::start(Mode::SlowReply(30, Duration::from_millis(100))).await;
    let mut config = config_with(vec![backend("fixture", &fixture.url)]);
    config.shutdown_grace_seconds = 20;
    let binary = start_binary(config.clone()).await;
    let session = chat_rig::unique_name("drain");
    let (mut text, mut body) = begin_streamed_turn(&binary, &session).await;
    binary.terminate();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        connection_refused(binary.port),
        "a new connection was accepted after SIGTERM"
    );
    while let Some(chunk) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    let events = parse_sse(&text);
    let last = events.last().unwrap();
    assert_eq!(
        last.name, "done",
        "the turn finished after SIGTERM: {events:?}"
    );
    let log_path = binary.log.clone();
    let status = binary.exit_status(Duration::from_secs(15)).await;
    let log = std::fs::read_to_string(log_path).unwrap_or_default();
    assert!(status.success(), "exit {status:?}:\n{log}");
    let messages = stored(&config, &session).await;
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert_eq!(messages[1]["role"], "assistant");
    assert_ne!(messages[1]["incomplete"], true, "{messages:?}");
    assert_eq!(
        messages[1]["content"]
            .as_str()
            .unwrap()
            .matches("word")
            .count(),
        30
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_turn_cut_by_the_grace_deadline_is_stored_as_incomplete() {
    // Never ends on its own: only the deadline stops it.
    let fixture = FlakyUpstream::start(Mode::SlowTokens(Duration::from_millis(100))).await;
    let mut config = config_with(vec![backend("fixture", &fixture.url)]);
    config.context.max_output_tokens = 10_000;
    config.shutdown_grace_seconds = 2;
    let binary = start_binary(config.clone()).await;
    let session = chat_rig::unique_name("cut");
    let (mut text, mut body) = begin_streamed_turn(&binary, &session).await;
    let signalled = Instant::now();
    binary.terminate();
    while let Some(Ok(chunk)) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let log_path = binary.log.clone();
    let status = binary.exit_status(Duration::from_secs(15)).await;
    let exited_after = signalled.elapsed();
    let log = std::fs::read_to_string(log_path).unwrap_or_default();
    println!("grace 2 s: exited {exited_after:?} after SIGTERM");
    assert!(status.success(), "exit {status:?}:\n{log}");
    let events = parse_sse(&text);
    let last = events.last().unwrap();
    assert_eq!(last.name, "error", "{events:?}");
    assert!(last.data.contains("shutting_down"), "{}", last.data);
    let messages = stored(&config, &session).await;
    assert_eq!(messages.len(), 2, "the cut turn was stored:\n{log}");
    assert_eq!(messages[1]["role"], "assistant");
    assert_eq!(messages[1]["incomplete"], true, "{messages:?}");
    assert!(
        messages[1]["content"].as_str().unwrap().contains("word"),
        "{messages:?}"
    );
    assert!(
        exited_after < Duration::from_secs(8),
        "exited {exited_after:?} after SIGTERM with a 2 s grace period"
    );
}
