//! WebSocket limits with a real client (tokio-tungstenite) against the service's own listener on
//! the rig's real Redis, FerretDB and Ollama: admission and the per-caller socket cap, rate limits
//! on every turn, frame size, idle timeout, and how a key may (and may not) be presented.

mod support;

use std::time::Duration;

use chat_service::config::{Config, RateLimitKey};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::listener::{Served, start_listener_with_keys};
use support::{rig, test_config};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const KEY_A: &str = "ws-key-a-0123456789abcdef";
const KEY_B: &str = "ws-key-b-0123456789abcdef";

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

fn with_auth(mut config: Config) -> Config {
    config.auth.enabled = true;
    config
}

async fn serve_with_keys(config: Config) -> Served {
    start_listener_with_keys(config, Some(&format!("{KEY_A}\n{KEY_B}\n"))).await
}

/// Connects the way a browser can: the key as a subprotocol next to `chatop`.
async fn connect(served: &Served, key: &str) -> Socket {
    let mut request = format!("ws://{}/ws/chat", served.address)
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        format!("chatop, chatop.key.{key}").parse().unwrap(),
    );
    let (socket, response) = tokio_tungstenite::connect_async(request)
        .await
        .expect("WebSocket upgrade");
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "chatop",
        "the server selects `chatop` and never echoes the key"
    );
    socket
}

/// The close code the server ends the socket with, within `within`.
async fn close_code(socket: &mut Socket, within: Duration) -> (u16, String) {
    let wait = async {
        while let Some(message) = socket.next().await {
            match message {
                Ok(Message::Close(Some(frame))) => {
                    return (u16::from(frame.code), frame.reason.to_string());
                }
                Ok(Message::Close(None)) => return (1005, String::new()),
                Ok(_) => {}
                Err(e) => return (0, format!("connection broke without a close frame: {e}")),
            }
        }
        (0, "stream ended without a close frame".into())
    };
    tokio::time::timeout(within, wait)
        .await
        .expect("the server closed the socket in time")
}

#[tokio::test(flavor = "multi_thread")]
async fn open_sockets_hold_admission_and_one_over_the_per_caller_cap_is_closed_1013() {
    let mut config = with_auth(test_config(rig()));
    config.limits.max_concurrent_requests = 3;
    config.limits.max_sockets_per_caller = 2;
    let served = serve_with_keys(config).await;
    let first = connect(&served, KEY_A).await;
    let second = connect(&served, KEY_A).await;
    let mut third = connect(&served, KEY_A).await;
    let (code, reason) = close_code(&mut third, Duration::from_secs(5)).await;
    assert_eq!(code, 1013, "{reason}");
    assert!(reason.contains("too many open sockets"), "{reason}");

    // Key B is counted apart; with its socket all three admission permits are held.
    let other = connect(&served, KEY_B).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let http = reqwest::Client::new();
    let models = format!("http://{}/v1/models", served.address);
    let shed = http.get(&models).bearer_auth(KEY_B).send().await.unwrap();
    assert_eq!(
        shed.status(),
        503,
        "three open sockets at maxConcurrentRequests 3 leave no permit"
    );
    drop(first);
    let admitted = async {
        loop {
            let response = http.get(&models).bearer_auth(KEY_B).send().await.unwrap();
            if response.status() == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), admitted)
        .await
        .expect("closing a socket frees its permit");
    drop((second, other));
}

#[tokio::test(flavor = "multi_thread")]
async fn every_turn_on_a_socket_counts_against_the_rate_limit() {
    let mut config = with_auth(test_config(rig()));
    config.rate_limit.enabled = true;
    config.rate_limit.requests_per_window = 2;
    config.rate_limit.window_seconds = 60;
    config.rate_limit.key_by = RateLimitKey::ApiKey;
    let served = serve_with_keys(config).await;
    let mut socket = connect(&served, KEY_A).await;
    for turn in 0..2 {
        socket
            .send(Message::text(json!({"message": "Say hi."}).to_string()))
            .await
            .unwrap();
        loop {
            let frame = socket.next().await.expect("a frame").unwrap();
            let Message::Text(text) = frame else { continue };
            let frame: Value = serde_json::from_str(&text).unwrap();
            match frame["type"].as_str() {
                Some("token") => {}
                Some("done") => break,
                _ => panic!("turn {turn}: {frame}"),
            }
        }
    }
    socket
        .send(Message::text(json!({"message": "Say hi."}).to_string()))
        .await
        .unwrap();
    // The server pings every 20 s; a slow Ollama can make the turns take that long.
    let frame = loop {
        match socket.next().await.expect("a frame").unwrap() {
            Message::Ping(_) | Message::Pong(_) => {}
            frame => break frame,
        }
    };
    let Message::Text(text) = frame else {
        panic!("expected an error frame, got {frame:?}")
    };
    let frame: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(frame["type"], "error", "{frame}");
    assert_eq!(frame["error"]["code"], "rate_limited", "{frame}");
    let (code, reason) = close_code(&mut socket, Duration::from_secs(5)).await;
    assert_eq!(
        code, 1013,
        "a rate-limited turn closes with try-again-later: {reason}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frame_over_the_limit_is_refused_1009_from_its_header_alone() {
    let mut config = with_auth(test_config(rig()));
    config.limits.max_message_bytes = 2_048;
    let served = serve_with_keys(config).await;
    let mut socket = connect(&served, KEY_A).await;
    // A masked text frame announcing 1 MiB; none of the payload is ever sent.
    let mut header = vec![0x81u8, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 20).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    let raw = match socket.get_mut() {
        MaybeTlsStream::Plain(stream) => stream,
        _ => unreachable!("plain ws://"),
    };
    raw.write_all(&header).await.unwrap();
    raw.flush().await.unwrap();
    let (code, reason) = close_code(&mut socket, Duration::from_secs(5)).await;
    assert_eq!(code, 1009, "{reason}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_socket_without_messages_is_closed_after_the_idle_timeout() {
    let mut config = with_auth(test_config(rig()));
    config.limits.websocket_idle_timeout_ms = 1_000;
    let served = serve_with_keys(config).await;
    let mut socket = connect(&served, KEY_A).await;
    let started = std::time::Instant::now();
    let (code, reason) = close_code(&mut socket, Duration::from_secs(5)).await;
    let after = started.elapsed();
    assert_eq!(code, 1000, "{reason}");
    assert!(reason.contains("idle"), "{reason}");
    assert!(
        after >= Duration::from_millis(900),
        "closed after {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_in_the_url_is_refused_with_a_clear_error() {
    let served = serve_with_keys(with_auth(test_config(rig()))).await;
    let request = format!("ws://{}/ws/chat?api_key={KEY_A}", served.address)
        .into_client_request()
        .unwrap();
    let error = tokio_tungstenite::connect_async(request)
        .await
        .expect_err("a key in the URL is refused");
    let tokio_tungstenite::tungstenite::Error::Http(response) = error else {
        panic!("expected an HTTP refusal, got {error}")
    };
    assert_eq!(response.status(), 400);
    let body: Value = serde_json::from_slice(response.body().as_deref().unwrap_or_default())
        .expect("a JSON error");
    assert_eq!(body["error"]["code"], "invalid_request", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not accepted in the URL"),
        "{body}"
    );
    // Without any key: 401, as for every API route.
    let request = format!("ws://{}/ws/chat", served.address)
        .into_client_request()
        .unwrap();
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401)
        }
        other => panic!("expected 401, got {other:?}"),
    }
}
