//! The chat service against real Redis, FerretDB and Ollama (gemma3-270m, a tiny base model:
//! the tests check structure, never wording).

mod support;

use std::time::{Duration, Instant};

use chat_rig::stream::{join_tokens, parse_sse};
use chat_rig::wait::until;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::{assert_error, rig, start, start_on_rig, test_config};
use tokio_tungstenite::tungstenite::Message;

fn recent_key(service: &support::TestService, session: &str) -> String {
    format!(
        "{}:session:{session}:recent",
        service.state.config.history.redis.key_prefix
    )
}

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

#[tokio::test(flavor = "multi_thread")]
async fn history_survives_redis_flushall() {
    let rig = rig();
    let redis_server = chat_rig::RedisServer::start().unwrap();
    let service = start(test_config(rig), &redis_server.url(), rig.mongodb_url()).await;
    let (status, _, first) = service
        .post_json("/v1/chat", &json!({"message": "Remember: blue."}))
        .await;
    assert_eq!(status, 200, "{first}");
    let session = first["session_id"].as_str().unwrap().to_string();
    let client = redis::Client::open(redis_server.url()).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let key = recent_key(&service, &session);
    let cached: i64 = redis::cmd("ZCARD")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(cached, 2);
    let () = redis::cmd("FLUSHALL")
        .query_async(&mut redis)
        .await
        .unwrap();

    let (status, _, second) = service
        .post_json(
            "/v1/chat",
            &json!({"session_id": session, "message": "Which colour?"}),
        )
        .await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(
        second["context_messages"], 2,
        "context reloaded from MongoDB: {second}"
    );
    let cached: i64 = redis::cmd("ZCARD")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(cached, 4, "Redis refilled and extended");
    let ttl: i64 = redis::cmd("TTL")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(ttl > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_outage_keeps_serving_from_mongodb() {
    let rig = rig();
    let mut redis_server = chat_rig::RedisServer::start().unwrap();
    let service = start(test_config(rig), &redis_server.url(), rig.mongodb_url()).await;
    let (status, _, first) = service
        .post_json("/v1/chat", &json!({"message": "one"}))
        .await;
    assert_eq!(status, 200, "{first}");
    let session = first["session_id"].as_str().unwrap().to_string();
    redis_server.stop();
    let (status, _, second) = service
        .post_json(
            "/v1/chat",
            &json!({"session_id": session, "message": "two"}),
        )
        .await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["context_messages"], 2);
    let (status, ready) = service.get_json("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["redis"], false);
    assert!(ready["degraded"].to_string().contains("redis"), "{ready}");
    let metrics = service.metrics_text().await;
    assert!(metrics.contains("chat_redis_up 0"), "{metrics}");
    assert!(metrics.contains("store=\"redis\"") && metrics.contains("outcome=\"error\""));
}

#[tokio::test(flavor = "multi_thread")]
async fn mongodb_outage_answers_503_without_partial_turns_and_recovers() {
    let rig = rig();
    let mut mongodb = chat_rig::FerretDb::start().unwrap();
    let service = start(test_config(rig), rig.redis_url(), &mongodb.url()).await;
    let (status, _, first) = service
        .post_json("/v1/chat", &json!({"message": "before the outage"}))
        .await;
    assert_eq!(status, 200, "{first}");
    let session = first["session_id"].as_str().unwrap().to_string();

    mongodb.stop();
    // Redis still has the context, so generation runs; the turn must still not be acknowledged.
    let (status, headers, body) = service
        .post_json(
            "/v1/chat",
            &json!({"session_id": session, "message": "during the outage"}),
        )
        .await;
    assert_error(status, &body, 503, "storage_unavailable");
    assert_eq!(headers["retry-after"], "1");
    let (status, body) = service
        .get_json(&format!("/v1/sessions/{session}/messages"))
        .await;
    assert_error(status, &body, 503, "storage_unavailable");
    let (status, ready) = service.get_json("/readyz").await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["mongodb"], false);
    // A streamed turn gets no `done` event, only an error.
    let response = service
        .http
        .post(service.url("/v1/chat"))
        .json(&json!({"session_id": session, "message": "streamed during the outage", "stream": true}))
        .send()
        .await
        .unwrap();
    let events = parse_sse(&response.text().await.unwrap());
    assert_eq!(events.last().unwrap().name, "error", "{events:?}");
    assert!(events.iter().all(|e| e.name != "done"));

    mongodb.start_again().unwrap();
    let third = until("recovery", Duration::from_secs(60), || async {
        let (status, _, body) = service
            .post_json(
                "/v1/chat",
                &json!({"session_id": session, "message": "after the outage"}),
            )
            .await;
        if status == 200 {
            Ok(body)
        } else {
            Err(format!("{status}: {body}"))
        }
    })
    .await;
    assert_eq!(third["session_id"], session.as_str());
    let messages = service.all_messages(&session).await;
    let contents: Vec<&str> = messages
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(
        contents,
        ["before the outage", "after the outage"],
        "no partial turn stored"
    );
    assert_eq!(messages.len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_turns_on_one_session_store_one_hundred_messages_in_order() {
    let rig = rig();
    let mut config = test_config(rig);
    config.context.max_output_tokens = 4;
    // Ordering is under test here, not back-pressure: let all fifty through to Ollama's queue.
    config.routing.max_in_flight_per_backend = 64;
    let service = start(config, rig.redis_url(), rig.mongodb_url()).await;
    let session = chat_rig::unique_name("concurrent");
    let turns = (0..50).map(|i| {
        let http = service.http.clone();
        let url = service.url("/v1/chat");
        let session = session.clone();
        async move {
            let response = http
                .post(url)
                .json(&json!({"session_id": session, "message": format!("concurrent turn {i}")}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
        }
    });
    futures::future::join_all(turns).await;
    let messages = service.all_messages(&session).await;
    assert_eq!(messages.len(), 100);
    let seqs: Vec<i64> = messages
        .iter()
        .map(|m| m["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        (1..=100).collect::<Vec<_>>(),
        "dense, unique, ordered"
    );
    let mut seen = std::collections::BTreeSet::new();
    for pair in messages.chunks(2) {
        assert_eq!(pair[0]["role"], "user");
        assert_eq!(pair[1]["role"], "assistant");
        assert!(
            seen.insert(pair[0]["content"].as_str().unwrap().to_string()),
            "duplicate turn"
        );
    }
    assert_eq!(seen.len(), 50);
}

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
async fn delete_erases_redis_and_mongodb_copies() {
    let service = start_on_rig().await;
    let (status, _, first) = service
        .post_json("/v1/chat", &json!({"message": "forget me"}))
        .await;
    assert_eq!(status, 200);
    let session = first["session_id"].as_str().unwrap().to_string();
    let response = service
        .http
        .delete(service.url(&format!("/v1/sessions/{session}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let deleted: Value = response.json().await.unwrap();
    assert_eq!(deleted["deleted_messages"], 2);
    assert_eq!(deleted["cache_erased"], true);
    let (status, _) = service
        .get_json(&format!("/v1/sessions/{session}/messages"))
        .await;
    assert_eq!(status, 404);
    let client = redis::Client::open(rig().redis_url()).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let exists: i64 = redis::cmd("EXISTS")
        .arg(recent_key(&service, &session))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(exists, 0);
    // The next turn on that id starts from nothing.
    let (_, _, again) = service
        .post_json("/v1/chat", &json!({"session_id": session, "message": "hi"}))
        .await;
    assert_eq!(again["context_messages"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn client_leaving_mid_stream_stores_an_incomplete_turn() {
    let rig = rig();
    let mut config = test_config(rig);
    config.context.max_output_tokens = 32;
    let service = start(config, rig.redis_url(), rig.mongodb_url()).await;
    let session = chat_rig::unique_name("gone");
    let response = service
        .http
        .post(service.url("/v1/chat"))
        .json(&json!({"session_id": session, "message": "Tell me a long story about the sea.", "stream": true}))
        .send()
        .await
        .unwrap();
    let mut body = response.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("token"));
    drop(body);
    let page = until("partial turn stored", Duration::from_secs(60), || async {
        let (status, page) = service
            .get_json(&format!("/v1/sessions/{session}/messages"))
            .await;
        let stored = status == 200 && page["messages"].as_array().is_some_and(|m| m.len() == 2);
        if stored {
            Ok(page)
        } else {
            Err(format!("{status}: {page}"))
        }
    })
    .await;
    assert_eq!(page["messages"][1]["role"], "assistant");
    assert_eq!(page["messages"][1]["incomplete"], true, "{page}");
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

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_stream_lets_it_finish() {
    let rig = rig();
    let mut config = test_config(rig);
    config.context.max_output_tokens = 24;
    config.shutdown_grace_seconds = 60;
    let port = chat_rig::free_port().unwrap();
    config.listen = format!("127.0.0.1:{port}");
    let dir = chat_rig::scratch_dir("chat-service-sigterm").unwrap();
    let config_path = dir.join("config.yaml");
    std::fs::write(&config_path, serde_yaml::to_string(&config).unwrap()).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_chat-service"))
        .arg("--config")
        .arg(&config_path)
        .env("REDIS_URL", rig.redis_url())
        .env("MONGODB_URI", rig.mongodb_url())
        .env("RUST_LOG", "info")
        .stdout(std::fs::File::create(dir.join("service.log")).unwrap())
        .stderr(std::fs::File::create(dir.join("service.stderr")).unwrap())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let up = async {
        while http.get(format!("{base}/healthz")).send().await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), up)
        .await
        .expect("service started");

    let response = http
        .post(format!("{base}/v1/chat"))
        .json(&json!({"message": "Write a few sentences about rivers.", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut text = String::from_utf8_lossy(&body.next().await.unwrap().unwrap()).to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    while let Some(chunk) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    let events = parse_sse(&text);
    assert_eq!(
        events.last().unwrap().name,
        "done",
        "the stream finished after SIGTERM: {events:?}"
    );
    let exited = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .unwrap();
    let log = std::fs::read_to_string(dir.join("service.log")).unwrap_or_default();
    let status =
        exited.unwrap_or_else(|| panic!("chat-service did not exit after SIGTERM:\n{log}"));
    assert!(status.success(), "exit {status:?}:\n{log}");
    // Structured logs, and no message content at info level.
    assert!(log.contains("\"shutdown requested; draining\""), "{log}");
    assert!(
        log.lines()
            .all(|l| serde_json::from_str::<Value>(l).is_ok()),
        "{log}"
    );
    assert!(
        !log.contains("rivers"),
        "message content leaked into the logs"
    );
    assert!(
        http.get(format!("{base}/healthz")).send().await.is_err(),
        "no longer accepting"
    );
}
