//! Slow and greedy clients against the service's own listener (`chat_service::server::serve`,
//! what the binary runs) over the rig's real Redis and FerretDB, driven by raw TCP clients that
//! trickle their headers or body, stay idle, or open more connections than allowed.

mod support;

use std::time::{Duration, Instant};

use support::listener::start_listener;
use support::{rig, test_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the server closes the connection (or resets it); returns what it sent.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Option<String> {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let read_all = async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    };
    tokio::time::timeout(within, read_all).await.ok()?;
    Some(String::from_utf8_lossy(&received).into_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn headers_trickled_one_line_at_a_time_are_cut_within_the_header_timeout() {
    let mut config = test_config(rig());
    config.limits.header_read_timeout_ms = 1_000;
    let served = start_listener(config).await;
    let mut client = TcpStream::connect(served.address).await.unwrap();
    let started = Instant::now();
    client
        .write_all(b"GET /healthz HTTP/1.1\r\n")
        .await
        .unwrap();
    // One header line every 200 ms for up to 10 s, as the slowloris attack does.
    let mut cut_after = None;
    for i in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let line = format!("x-trickle-{i}: still here\r\n");
        if client.write_all(line.as_bytes()).await.is_err() {
            cut_after = Some(started.elapsed());
            break;
        }
        let mut probe = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(1), client.read(&mut probe)).await
        {
            cut_after = Some(started.elapsed());
            break;
        }
    }
    let cut_after = cut_after.expect("a client trickling headers for 10 s was never cut off");
    println!("trickled headers cut after {cut_after:?} (header timeout 1 s)");
    assert!(
        cut_after >= Duration::from_millis(900) && cut_after < Duration::from_secs(3),
        "cut after {cut_after:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let mut config = test_config(rig());
    config.limits.idle_timeout_ms = 1_500;
    let served = start_listener(config).await;
    let mut client = TcpStream::connect(served.address).await.unwrap();
    client
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 1024];
    let n = client.read(&mut first).await.unwrap();
    assert!(
        String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&first[..n])
    );
    let idle_from = Instant::now();
    let rest = read_until_closed(&mut client, Duration::from_secs(10)).await;
    let closed_after = idle_from.elapsed();
    assert!(
        rest.is_some(),
        "an idle keep-alive connection was still open after 10 s"
    );
    println!("idle connection closed after {closed_after:?} (idle timeout 1.5 s)");
    assert!(
        closed_after >= Duration::from_millis(1_300) && closed_after < Duration::from_secs(4),
        "closed after {closed_after:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trickled_body_is_cut_with_408_and_holds_no_admission_permit() {
    let mut config = test_config(rig());
    config.limits.max_concurrent_requests = 1;
    config.limits.body_read_timeout_ms = 1_500;
    let served = start_listener(config).await;
    let mut trickler = TcpStream::connect(served.address).await.unwrap();
    let started = Instant::now();
    trickler
        .write_all(
            b"POST /v1/chat HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: 400\r\n\r\n{\"message\":\"",
        )
        .await
        .unwrap();
    let trickle = tokio::spawn(async move {
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if trickler.write_all(b"a").await.is_err() {
                break;
            }
        }
        trickler
    });
    // While the body trickles in, the one admission permit is free for others.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let http = reqwest::Client::new();
    let admitted = http
        .get(format!("http://{}/v1/models", served.address))
        .send()
        .await
        .unwrap();
    let status = admitted.status().as_u16();
    let body = admitted.text().await.unwrap();
    assert_eq!(
        status, 200,
        "another request at maxConcurrentRequests 1 while a body trickles: {body}"
    );
    assert_eq!(served.state.admission.available_permits(), 1);

    let mut trickler = trickle.await.unwrap();
    let answer = read_until_closed(&mut trickler, Duration::from_secs(5))
        .await
        .expect("the trickling client's connection was closed");
    let cut_after = started.elapsed();
    println!("trickled body answered and closed after {cut_after:?} (body timeout 1.5 s)");
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "expected 408, got: {answer}"
    );
    assert!(answer.contains("\"request_timeout\""), "{answer}");
    assert!(
        cut_after < Duration::from_secs(4),
        "cut after {cut_after:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_beyond_the_cap_wait_until_one_closes() {
    let mut config = test_config(rig());
    config.limits.max_connections = 2;
    let served = start_listener(config).await;
    let request = b"GET /healthz HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n";
    let held = [
        TcpStream::connect(served.address).await.unwrap(),
        TcpStream::connect(served.address).await.unwrap(),
    ];
    // Let the server accept both before the third arrives.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut third = TcpStream::connect(served.address).await.unwrap();
    third.write_all(request).await.unwrap();
    let mut buffer = [0u8; 1024];
    let early = tokio::time::timeout(Duration::from_secs(1), third.read(&mut buffer)).await;
    assert!(
        early.is_err(),
        "a third connection at maxConnections 2 was served: {:?}",
        early.map(|r| r.map(|n| String::from_utf8_lossy(&buffer[..n]).into_owned()))
    );
    drop(held);
    let answer = read_until_closed(&mut third, Duration::from_secs(5))
        .await
        .expect("the queued connection is served once a slot frees");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// Sends one request on `client` and reads its response head (and what follows in the same read).
async fn exchange(client: &mut TcpStream, request: &[u8]) -> String {
    client.write_all(request).await.unwrap();
    let mut buffer = vec![0u8; 16 * 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), client.read(&mut buffer))
        .await
        .expect("no response within 10 s")
        .unwrap();
    String::from_utf8_lossy(&buffer[..n]).to_lowercase()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_response_sent_before_its_body_was_read_says_connection_close() {
    let served = start_listener(test_config(rig())).await;

    // A body that was read (a bad JSON turn) keeps the connection alive for the next request.
    let mut client = TcpStream::connect(served.address).await.unwrap();
    let bad = b"POST /v1/chat HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: 3\r\n\r\n{\"m";
    let head = exchange(&mut client, bad).await;
    assert!(head.starts_with("http/1.1 400"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    let head = exchange(&mut client, b"GET /healthz HTTP/1.1\r\nhost: test\r\n\r\n").await;
    assert!(
        head.starts_with("http/1.1 200"),
        "the connection was not kept alive: {head}"
    );

    // A body announced far over the limit is refused unread: the client must not reuse the socket.
    let mut client = TcpStream::connect(served.address).await.unwrap();
    let huge = b"POST /v1/chat HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: 200000\r\n\r\n{\"message\":\"yyyy";
    let head = exchange(&mut client, huge).await;
    assert!(head.starts_with("http/1.1 413"), "{head}");
    assert!(
        head.contains("connection: close"),
        "413 without connection: close: {head}"
    );

    // A route that never reads its body (404 for a POST) says the same.
    let mut client = TcpStream::connect(served.address).await.unwrap();
    let stray = b"POST /no/such/route HTTP/1.1\r\nhost: test\r\ncontent-length: 5\r\n\r\nhello";
    let head = exchange(&mut client, stray).await;
    assert!(head.starts_with("http/1.1 404"), "{head}");
    assert!(
        head.contains("connection: close"),
        "404 without connection: close: {head}"
    );

    // And a pooled client alternating refused bodies with plain requests never hits a closed socket.
    let http = reqwest::Client::new();
    let base = format!("http://{}", served.address);
    for round in 0..20 {
        let refused = http
            .post(format!("{base}/v1/chat"))
            .header("content-type", "application/json")
            .body(format!("{{\"message\":\"{}\"}}", "y".repeat(200_000)))
            .send()
            .await;
        assert_eq!(
            refused
                .map(|r| r.status().as_u16())
                .map_err(|e| e.to_string()),
            Ok(413),
            "round {round}"
        );
        let plain = http.get(format!("{base}/no/such/route")).send().await;
        assert_eq!(
            plain
                .map(|r| r.status().as_u16())
                .map_err(|e| e.to_string()),
            Ok(404),
            "round {round}: the next request on the pool failed"
        );
    }
}
