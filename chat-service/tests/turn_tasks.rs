//! Where a turn runs: a stateless turn (OpenAI API without a session, no token budget) inside
//! the client's own request, with no task and no channel; a session's turn as a task of its own
//! that outlives a client who leaves, so its partial reply is still stored. Either way a client
//! leaving closes the upstream request at once. The back end is the named fixture
//! `FlakyUpstream` in `SlowTokens` mode, which records when the service closed its stream.

mod support;

use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use support::flaky::{FlakyUpstream, Mode};
use support::pool::{backend, config_with, serve};
use support::rig;

/// Reads `response` until `count` token events went by, and returns the rest of the body.
async fn after_tokens(
    response: reqwest::Response,
    count: usize,
) -> impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> {
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut seen = String::new();
    while seen.matches(" word").count() < count {
        seen.push_str(&String::from_utf8_lossy(
            &body.next().await.unwrap().unwrap(),
        ));
    }
    body
}

#[tokio::test(flavor = "multi_thread")]
async fn stateless_turns_run_in_the_request_and_session_turns_in_a_task_that_outlives_the_client() {
    let fixture = FlakyUpstream::start(Mode::SlowTokens(Duration::from_millis(100))).await;
    let mut config = config_with(vec![backend("slow", &fixture.url)]);
    config.context.max_output_tokens = 500;
    let service = serve(config).await;

    let stateless = service
        .http
        .post(service.url("/v1/chat/completions"))
        .json(&json!({"model": rig().model(), "stream": true,
            "messages": [{"role": "user", "content": "Talk forever."}]}))
        .send()
        .await
        .unwrap();
    let body = after_tokens(stateless, 2).await;
    assert_eq!(
        service.state.turns.len(),
        0,
        "a stateless turn runs in its request, not as a task"
    );
    drop(body);
    chat_rig::eventually(
        "the stateless turn's upstream stream is closed",
        Duration::from_secs(2),
        || async { (fixture.closed_streams().len() == 1).then_some(()) },
    )
    .await;

    let session = chat_rig::unique_name("leaver");
    let with_history = service
        .http
        .post(service.url("/v1/chat"))
        .json(&json!({"session_id": session, "message": "Talk forever.", "stream": true}))
        .send()
        .await
        .unwrap();
    let body = after_tokens(with_history, 2).await;
    assert_eq!(
        service.state.turns.len(),
        1,
        "a session's turn runs as its own task"
    );
    drop(body);
    chat_rig::eventually(
        "the session turn's upstream stream is closed",
        Duration::from_secs(2),
        || async { (fixture.closed_streams().len() == 2).then_some(()) },
    )
    .await;
    let stored = chat_rig::eventually(
        "the partial turn is stored after the client left",
        Duration::from_secs(10),
        || async {
            // 404 until the turn's task stored it.
            let (status, page) = service
                .get_json(&format!("/v1/sessions/{session}/messages"))
                .await;
            let messages = page["messages"].as_array().cloned().unwrap_or_default();
            (status == 200 && messages.len() == 2).then_some(messages)
        },
    )
    .await;
    assert_eq!(stored[1]["incomplete"], true, "{stored:?}");
    assert!(
        stored[1]["content"].as_str().unwrap().contains(" word"),
        "{stored:?}"
    );
}
