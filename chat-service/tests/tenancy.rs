//! Tenancy: sessions and cached answers belong to the principal that made them (an API key, or
//! the end user a trusted proxy names). Two API keys against the rig's real Redis, FerretDB and
//! Ollama, over REST, Server-Sent Events, WebSocket and the OpenAI-compatible API.

mod support;

use chat_rig::stream::parse_sse;
use chat_service::config::Config;
use chat_service::conversation::{
    ContextMessage, FinishReason, Principal, Role, SessionId, SessionKey,
};
use chat_service::history::NewTurn;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::{TestService, rig, start_with_api_keys, test_config};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const KEY_A: &str = "tenancy-key-a-0123456789";
const KEY_B: &str = "tenancy-key-b-9876543210";
/// Both keys, named, as the key file or `CHAT_API_KEYS` lists them.
const KEYS: &str = "team-a tenancy-key-a-0123456789, team-b tenancy-key-b-9876543210";

fn auth_config() -> Config {
    let mut config = test_config(rig());
    config.auth.enabled = true;
    config
}

async fn start_with_keys(config: Config) -> TestService {
    let rig = rig();
    start_with_api_keys(config, rig.redis_url(), rig.mongodb_url(), Some(KEYS)).await
}

/// A request with `key`, answered as (status, body as JSON).
async fn call(
    service: &TestService,
    key: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut request = service
        .http
        .request(method, service.url(path))
        .bearer_auth(key);
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
    (status, body)
}

async fn messages_of(service: &TestService, key: &str, session: &str) -> (u16, Value) {
    let path = format!("/v1/sessions/{session}/messages");
    call(service, key, reqwest::Method::GET, &path, None).await
}

async fn delete(service: &TestService, key: &str, session: &str) -> (u16, Value) {
    let path = format!("/v1/sessions/{session}");
    call(service, key, reqwest::Method::DELETE, &path, None).await
}

/// One turn on the WebSocket with `key` in the upgrade request; the `done` frame.
async fn websocket_turn(service: &TestService, key: &str, session: &str) -> Value {
    let url = service.url("/ws/chat").replace("http://", "ws://");
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let frame = json!({"message": "over the socket", "session_id": session});
    socket
        .send(Message::Text(frame.to_string().into()))
        .await
        .unwrap();
    loop {
        let Message::Text(text) = socket.next().await.expect("frame").unwrap() else {
            continue;
        };
        let frame: Value = serde_json::from_str(&text).unwrap();
        match frame["type"].as_str() {
            Some("token") => {}
            Some("done") => return frame,
            _ => panic!("unexpected frame: {frame}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn another_keys_session_answers_like_one_that_does_not_exist() {
    let service = start_with_keys(auth_config()).await;
    let id = "tenancy-shared-id";
    // What B gets for this id while nobody has used it: the body every later answer must equal.
    let (status, unknown_read) = messages_of(&service, KEY_B, id).await;
    assert_eq!(status, 404, "{unknown_read}");
    let (status, unknown_delete) = delete(&service, KEY_B, id).await;
    assert_eq!(status, 404, "{unknown_delete}");

    // A makes the session over REST.
    let turn = json!({"session_id": id, "message": "A's secret is 4711."});
    let (status, first) = call(
        &service,
        KEY_A,
        reqwest::Method::POST,
        "/v1/chat",
        Some(&turn),
    )
    .await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["session_id"], id);

    // B can neither read nor delete it, and cannot tell it exists.
    assert_eq!(
        messages_of(&service, KEY_B, id).await,
        (404, unknown_read.clone())
    );
    assert_eq!(
        delete(&service, KEY_B, id).await,
        (404, unknown_delete.clone())
    );
    let (status, page) = messages_of(&service, KEY_A, id).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["messages"].as_array().unwrap().len(), 2, "{page}");

    // B "continuing" the id starts B's own session: none of A's messages in its context.
    let turn = json!({"session_id": id, "message": "What is the secret?"});
    let (status, continued) = call(
        &service,
        KEY_B,
        reqwest::Method::POST,
        "/v1/chat",
        Some(&turn),
    )
    .await;
    assert_eq!(status, 200, "{continued}");
    assert_eq!(
        continued["context_messages"], 0,
        "B saw A's history: {continued}"
    );

    // Server-Sent Events: B's second turn sees B's first turn only.
    let response = service
        .http
        .post(service.url("/v1/chat"))
        .bearer_auth(KEY_B)
        .json(&json!({"session_id": id, "message": "streamed", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let events = parse_sse(&response.text().await.unwrap());
    let done = events.last().expect("events").json();
    assert_eq!(done["context_messages"], 2, "{done}");

    // WebSocket: same, B's third turn sees B's two.
    let done = websocket_turn(&service, KEY_B, id).await;
    assert_eq!(done["context_messages"], 4, "{done}");

    // A's history is untouched by all of B's turns, and B's holds B's six messages.
    let (_, page) = messages_of(&service, KEY_A, id).await;
    let contents: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(contents.len(), 2, "{page}");
    assert_eq!(contents[0], "A's secret is 4711.");
    let (_, page) = messages_of(&service, KEY_B, id).await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 6, "{page}");
    assert!(!page.to_string().contains("4711"), "{page}");

    // A deletes A's session; B's of the same id survives.
    let (status, deleted) = delete(&service, KEY_A, id).await;
    assert_eq!(status, 200, "{deleted}");
    assert_eq!(deleted["deleted_messages"], 2);
    let (status, _) = messages_of(&service, KEY_B, id).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openai_user_field_is_an_end_user_inside_the_key() {
    let service = start_with_keys(auth_config()).await;
    let user = "tenancy-alice";
    let completion = |content: &str| {
        json!({
            "model": rig().model(),
            "user": user,
            "messages": [{"role": "user", "content": content}],
        })
    };
    for (key, content) in [(KEY_A, "A's alice speaks"), (KEY_B, "B's alice speaks")] {
        let body = completion(content);
        let (status, answer) = call(
            &service,
            key,
            reqwest::Method::POST,
            "/v1/chat/completions",
            Some(&body),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
    }
    for (key, own) in [(KEY_A, "A's alice speaks"), (KEY_B, "B's alice speaks")] {
        let (status, page) = messages_of(&service, key, user).await;
        assert_eq!(status, 200, "{page}");
        let messages = page["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 2, "two histories, not one shared: {page}");
        assert_eq!(messages[0]["content"], own, "{page}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cached_answer_is_not_served_to_another_key() {
    let mut config = auth_config();
    config.cache.enabled = true;
    let service = start_with_keys(config).await;
    // A fresh session per turn, so the whole context (and so the cache key) repeats.
    let turn = json!({"message": "Name a colour. tenancy-cache", "temperature": 0.0});
    let ask = |key: &'static str| {
        let service = &service;
        let turn = &turn;
        async move { call(service, key, reqwest::Method::POST, "/v1/chat", Some(turn)).await }
    };
    let (status, first) = ask(KEY_A).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["cached"], false, "{first}");
    let (_, again) = ask(KEY_A).await;
    assert_eq!(again["cached"], true, "A's own repeat is a hit: {again}");
    let (status, other) = ask(KEY_B).await;
    assert_eq!(status, 200, "{other}");
    assert_eq!(other["cached"], false, "B got A's cached answer: {other}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cache_marked_shared_serves_every_key() {
    let mut config = auth_config();
    config.cache.enabled = true;
    config.cache.shared = true;
    let service = start_with_keys(config).await;
    let turn = json!({"message": "Name a fruit. tenancy-shared-cache", "temperature": 0.0});
    let (status, first) = call(
        &service,
        KEY_A,
        reqwest::Method::POST,
        "/v1/chat",
        Some(&turn),
    )
    .await;
    assert_eq!(status, 200, "{first}");
    let (_, other) = call(
        &service,
        KEY_B,
        reqwest::Method::POST,
        "/v1/chat",
        Some(&turn),
    )
    .await;
    assert_eq!(other["cached"], true, "{other}");
}

/// A turn through the "proxy" (this test, from 127.0.0.1) naming `user`.
async fn turn_as(service: &TestService, user: Option<&str>, session: &str) -> (u16, Value) {
    let mut request = service
        .http
        .post(service.url("/v1/chat"))
        .bearer_auth(KEY_A)
        .json(&json!({"session_id": session, "message": "hello from behind the proxy"}));
    if let Some(user) = user {
        request = request.header("x-forwarded-user", user);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn only_a_trusted_proxy_names_the_owner() {
    let session = "tenancy-proxy";
    // Not trusted: the header is ignored, both "users" are key A.
    let service = start_with_keys(auth_config()).await;
    let (status, first) = turn_as(&service, Some("mallory"), session).await;
    assert_eq!(status, 200, "{first}");
    let (status, _) = messages_of(&service, KEY_A, session).await;
    assert_eq!(status, 200, "an untrusted header must not move the session");

    // Trusted: each named user has a namespace of their own, apart from the key's.
    let mut config = auth_config();
    config.auth.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
    config.history = service.state.config.history.clone();
    let service = start_with_keys(config).await;
    let (status, done) = turn_as(&service, Some("alice"), session).await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(
        done["context_messages"], 0,
        "alice saw the key's session: {done}"
    );
    let read = |user: &'static str| {
        let service = &service;
        async move {
            service
                .http
                .get(service.url(&format!("/v1/sessions/{session}/messages")))
                .bearer_auth(KEY_A)
                .header("x-forwarded-user", user)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(read("alice").await, 200);
    assert_eq!(read("bob").await, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_from_before_ownership_stay_with_the_configured_owner() {
    let mut config = auth_config();
    config.auth.legacy_sessions_owner = Some("team-a".into());
    let service = start_with_keys(config).await;
    // A session as the service stored it before sessions had owners: under its bare id.
    let legacy = SessionKey::new(&Principal::shared(), SessionId::parse("legacy-1").unwrap());
    assert_eq!(legacy.as_str(), "legacy-1");
    service
        .state
        .history
        .append_turn(
            &legacy,
            NewTurn {
                end_user: None,
                input: &[ContextMessage::new(Role::User, "stored long ago")],
                reply: "indeed",
                tool_calls: &[],
                model: rig().model(),
                finish_reason: &FinishReason::Stop,
                incomplete: false,
            },
        )
        .await
        .unwrap();
    let (status, page) = messages_of(&service, KEY_A, "legacy-1").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["messages"][0]["content"], "stored long ago");
    let (status, _) = messages_of(&service, KEY_B, "legacy-1").await;
    assert_eq!(
        status, 404,
        "only the configured owner reaches legacy sessions"
    );
}
