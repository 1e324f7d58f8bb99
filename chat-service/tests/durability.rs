//! What the chat service keeps when things go wrong: store outages, a flushed Redis, concurrent
//! turns on one session, erasure, a client that leaves mid-stream and SIGTERM mid-stream; against
//! real Redis, FerretDB and Ollama.

mod support;

use std::time::{Duration, Instant};

use chat_rig::stream::parse_sse;
use chat_rig::wait::until;
use futures::StreamExt;
use serde_json::{Value, json};
use support::{assert_error, rig, start, start_on_rig, test_config};

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
    let key = service.recent_key(&session);
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
        .arg(service.recent_key(&session))
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
