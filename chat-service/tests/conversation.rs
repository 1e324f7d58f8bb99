//! Conversations through every transport the chat service offers (REST, SSE, WebSocket, the
//! OpenAI-compatible API and the official `openai` Python client), against real Redis, FerretDB and
//! Ollama (gemma3-270m, a tiny base model: the tests check structure, never wording).

mod support;

use chat_rig::stream::{join_tokens, parse_sse};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::{metric_value, rig, start_on_rig};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread")]
async fn rest_conversation_second_turn_sees_the_first() {
    let service = start_on_rig().await;
    let response = service
        .http
        .post(service.url("/v1/chat"))
        .header("x-request-id", "test-rest-1")
        .json(&json!({"message": "My name is Ada. Remember it."}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "test-rest-1");
    assert!(response.headers().contains_key("x-process-time"));
    let first: Value = response.json().await.unwrap();
    let session = first["session_id"].as_str().unwrap().to_string();
    assert_eq!(first["model"], rig().model());
    assert_eq!(first["cached"], false);
    assert_eq!(first["context_messages"], 0);
    assert!(
        first["usage"]["completion_tokens"].as_u64().unwrap() > 0,
        "{first}"
    );

    let (status, _, second) = service
        .post_json(
            "/v1/chat",
            &json!({"session_id": session, "message": "What is my name?"}),
        )
        .await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["session_id"], session.as_str());
    // The stored first turn (two messages) went into the second turn's context...
    assert_eq!(second["context_messages"], 2, "{second}");
    // ...and the model saw it: the prompt grew by at least the first turn's text.
    let first_prompt = first["usage"]["prompt_tokens"].as_u64().unwrap();
    let second_prompt = second["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        second_prompt > first_prompt + 5,
        "{first_prompt} -> {second_prompt}"
    );

    let messages = service.all_messages(&session).await;
    let roles: Vec<&str> = messages
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
    let seqs: Vec<i64> = messages
        .iter()
        .map(|m| m["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4]);
    assert_eq!(messages[0]["content"], "My name is Ada. Remember it.");
    assert_eq!(messages[1]["content"], first["message"]);
}

/// History reads of the service so far, by store: Redis's recent copy, MongoDB's messages,
/// MongoDB's summaries.
async fn history_reads(service: &support::TestService) -> [f64; 3] {
    let metrics = service.metrics_text().await;
    let read = |store: &str, operation: &str| {
        ["ok", "error"]
            .iter()
            .map(|outcome| {
                metric_value(
                    &metrics,
                    &format!(
                        "chat_history_store_operations_total{{store=\"{store}\",operation=\"{operation}\",outcome=\"{outcome}\"}}"
                    ),
                )
            })
            .sum::<f64>()
    };
    [
        read("redis", "load"),
        read("mongodb", "load"),
        read("mongodb", "summary_load"),
    ]
}

/// A session whose id the service generates has no history, so its first turn reads none (REST
/// and WebSocket); every turn of a session the client names, even one never used, still does.
#[tokio::test(flavor = "multi_thread")]
async fn a_session_the_service_starts_reads_no_history_on_its_first_turn() {
    let service = start_on_rig().await;
    let (status, _, first) = service
        .post_json("/v1/chat", &json!({"message": "Hello there."}))
        .await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["context_messages"], 0, "{first}");
    let session = first["session_id"].as_str().unwrap().to_string();
    assert_eq!(
        history_reads(&service).await,
        [0.0, 0.0, 0.0],
        "a new session read history"
    );

    // The next turn reads the stored first one (from Redis, which the first turn filled).
    let (status, _, second) = service
        .post_json(
            "/v1/chat",
            &json!({"session_id": session, "message": "And again."}),
        )
        .await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["context_messages"], 2, "{second}");
    assert_eq!(history_reads(&service).await, [1.0, 0.0, 0.0]);

    // A client-named id may be an existing session: read, Redis first, then MongoDB.
    let (status, _, named) = service
        .post_json(
            "/v1/chat",
            &json!({"session_id": "named-by-the-client", "message": "Hi."}),
        )
        .await;
    assert_eq!(status, 200, "{named}");
    assert_eq!(history_reads(&service).await, [2.0, 1.0, 0.0]);

    // WebSocket: the connection's first turn starts a session and reads nothing; its second
    // turn continues that session and reads it.
    let url = service.url("/ws/chat").replace("http://", "ws://");
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    for (turn, expected) in [(0, [2.0, 1.0, 0.0]), (1, [3.0, 1.0, 0.0])] {
        socket
            .send(Message::Text(
                json!({"message": format!("turn {turn}")})
                    .to_string()
                    .into(),
            ))
            .await
            .unwrap();
        let done = loop {
            let Message::Text(text) = socket.next().await.expect("frame").unwrap() else {
                continue;
            };
            let frame: Value = serde_json::from_str(&text).unwrap();
            match frame["type"].as_str().unwrap() {
                "token" => {}
                "done" => break frame,
                other => panic!("unexpected frame {other}: {frame}"),
            }
        };
        assert_eq!(done["context_messages"], 2 * turn, "{done}");
        assert_eq!(
            history_reads(&service).await,
            expected,
            "after socket turn {turn}"
        );
    }
    // Every turn was stored all the same.
    assert_eq!(service.all_messages(&session).await.len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_conversation_streams_tokens_then_a_final_event() {
    let service = start_on_rig().await;
    let mut session = String::new();
    for (turn, message) in ["Hello there.", "And again."].iter().enumerate() {
        let mut body = json!({"message": message, "stream": true});
        if turn > 0 {
            body["session_id"] = json!(session);
        }
        let response = service
            .http
            .post(service.url("/v1/chat"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        let events = parse_sse(&response.text().await.unwrap());
        let tokens: String = join_tokens(&events);
        let last = events.last().expect("events");
        assert_eq!(last.name, "done", "{events:?}");
        let done = last.json();
        assert_eq!(
            done["message"],
            tokens.as_str(),
            "the final event repeats the streamed text"
        );
        assert_eq!(done["context_messages"], 2 * turn, "{done}");
        session = done["session_id"].as_str().unwrap().to_string();
    }
    assert_eq!(service.all_messages(&session).await.len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_runs_many_turns_on_one_connection() {
    let service = start_on_rig().await;
    let url = service.url("/ws/chat").replace("http://", "ws://");
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut session = String::new();
    for turn in 0..2 {
        socket
            .send(Message::Text(
                json!({"message": format!("turn {turn}")})
                    .to_string()
                    .into(),
            ))
            .await
            .unwrap();
        let mut tokens = 0;
        let done = loop {
            let frame = socket.next().await.expect("frame").unwrap();
            let Message::Text(text) = frame else { continue };
            let frame: Value = serde_json::from_str(&text).unwrap();
            match frame["type"].as_str().unwrap() {
                "token" => tokens += 1,
                "done" => break frame,
                other => panic!("unexpected frame {other}: {frame}"),
            }
        };
        assert!(tokens > 0);
        assert_eq!(done["context_messages"], 2 * turn, "{done}");
        if turn == 0 {
            session = done["session_id"].as_str().unwrap().to_string();
        } else {
            assert_eq!(
                done["session_id"],
                session.as_str(),
                "the connection keeps its session"
            );
        }
        assert!(done["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    }
    socket
        .send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    // A bad frame: an error frame, then a close with code 1007 and a reason.
    socket
        .send(Message::Text("{not json".into()))
        .await
        .unwrap();
    let mut saw_pong = false;
    let mut saw_error = false;
    loop {
        match socket.next().await {
            Some(Ok(Message::Pong(_))) => saw_pong = true,
            // The server's keep-alive pings; the client library answers them.
            Some(Ok(Message::Ping(_))) => {}
            Some(Ok(Message::Text(text))) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(frame["type"], "error");
                assert_eq!(frame["error"]["code"], "invalid_json");
                saw_error = true;
            }
            Some(Ok(Message::Close(Some(close)))) => {
                assert_eq!(u16::from(close.code), 1007);
                assert!(close.reason.starts_with("invalid_json"), "{}", close.reason);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(saw_pong && saw_error);
    assert_eq!(service.all_messages(&session).await.len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_frame_larger_than_the_read_buffer_arrives_whole() {
    let service = start_on_rig().await;
    let url = service.url("/ws/chat").replace("http://", "ws://");
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    // JSON whitespace makes the frame 6 KiB, past the server's 4 KiB read buffer but within the
    // frame limit (twice `maxMessageBytes` plus 4 KiB).
    let frame = format!(r#"{{"message": "Hello there"{}}}"#, " ".repeat(6 * 1024));
    socket.send(Message::Text(frame.into())).await.unwrap();
    let done = loop {
        let frame = socket.next().await.expect("frame").unwrap();
        let Message::Text(text) = frame else { continue };
        let frame: Value = serde_json::from_str(&text).unwrap();
        match frame["type"].as_str().unwrap() {
            "token" => {}
            "done" => break frame,
            other => panic!("unexpected frame {other}: {frame}"),
        }
    };
    assert!(
        done["usage"]["completion_tokens"].as_u64().unwrap() > 0,
        "{done}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn openai_endpoint_keeps_sessions_and_streams() {
    let service = start_on_rig().await;
    let session = chat_rig::unique_name("oai");
    let model = rig().model();
    let response = service
        .http
        .post(service.url("/v1/chat/completions"))
        .header("x-session-id", &session)
        .json(&json!({"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi, I am Bob."}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-context-messages"], "0");
    // A JSON answer is sent whole, with its length, not as a chunked stream (the admission
    // permit that rides on the body must not hide the size).
    let length: usize = response.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(response.headers().get("transfer-encoding").is_none());
    let bytes = response.bytes().await.unwrap();
    assert_eq!(bytes.len(), length);
    let completion: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(completion["object"], "chat.completion");
    assert_eq!(completion["choices"][0]["message"]["role"], "assistant");
    assert!(completion["usage"]["total_tokens"].as_u64().unwrap() > 0);

    // Second turn selects the session by `user`, streaming with usage.
    let response = service
        .http
        .post(service.url("/v1/chat/completions"))
        .json(&json!({
            "model": model, "stream": true, "user": session, "max_tokens": 8,
            "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "Who am I?"}]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let events = parse_sse(&response.text().await.unwrap());
    assert_eq!(events.last().unwrap().data, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| e.json())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["x_context_messages"], 2, "{usage_chunk}");
    assert!(
        usage_chunk["usage"]["prompt_tokens"].as_u64().unwrap()
            > completion["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    assert_eq!(service.all_messages(&session).await.len(), 4);

    // Without a session: stateless, the client's messages are the context, nothing is stored.
    let response = service
        .http
        .post(service.url("/v1/chat/completions"))
        .json(&json!({"model": model, "max_tokens": 4, "messages": [
            {"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"}, {"role": "user", "content": "Three"}
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("x-session-id").is_none());
    let (status, models) = service.get_json("/v1/models").await;
    assert_eq!(status, 200);
    assert_eq!(models["data"][0]["id"], model);
}

#[tokio::test(flavor = "multi_thread")]
async fn official_openai_python_client_talks_to_the_service() {
    let python = support::python();
    let import = std::process::Command::new(&python)
        .args(["-c", "import openai"])
        .output();
    match import {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "{} cannot import `openai` (pip package `openai` needed): {}",
            python.display(),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!("cannot run {}: {e}", python.display()),
    }
    let service = start_on_rig().await;
    let session = chat_rig::unique_name("sdk");
    let script = r#"
import json, sys
from openai import OpenAI
base, model, session = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=base + "/v1", api_key="unused")
first = client.chat.completions.with_raw_response.create(
    model=model, max_tokens=8, user=session,
    messages=[{"role": "user", "content": "Hello, my name is Eve."}])
first_headers = first.headers
first = first.parse()
stream = client.chat.completions.create(
    model=model, max_tokens=8, stream=True, user=session,
    stream_options={"include_usage": True},
    messages=[{"role": "user", "content": "What is my name?"}])
text, usage = "", None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
    if chunk.usage:
        usage = chunk.usage
try:
    client.chat.completions.create(model="not-allowed", messages=[{"role": "user", "content": "x"}])
    bad = None
except Exception as e:
    bad = {"status": getattr(e, "status_code", None), "type": type(e).__name__}
models = [m.id for m in client.models.list()]
print(json.dumps({
    "first_context": first_headers.get("x-context-messages"),
    "first_content": first.choices[0].message.content,
    "first_prompt": first.usage.prompt_tokens,
    "second_text": text,
    "second_prompt": usage.prompt_tokens if usage else None,
    "bad": bad,
    "models": models,
}))
"#;
    let base = service.base.clone();
    let model = rig().model().to_string();
    let session_arg = session.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&python)
            .args(["-c", script, &base, &model, &session_arg])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "python client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(result["first_context"], "0");
    assert!(
        result["second_prompt"].as_u64().unwrap() > result["first_prompt"].as_u64().unwrap(),
        "{result}"
    );
    assert_eq!(result["bad"]["status"], 400, "{result}");
    assert_eq!(result["models"][0], rig().model());
    let messages = service.all_messages(&session).await;
    assert_eq!(messages.len(), 4);
    assert_eq!(messages[3]["content"], result["second_text"]);
}
