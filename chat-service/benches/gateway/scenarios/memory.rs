//! Part 3: RSS idle, with many open WebSockets that each ran one turn, and after they closed.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};

use crate::Settings;
use crate::report::{Report, f1};
use crate::service::ServiceProcess;
use crate::upstream::{FixedLatencyUpstream, Shape};

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn websocket_turn(url: String) -> Result<Socket> {
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await?;
    socket
        .send(tokio_tungstenite::tungstenite::Message::Text(
            json!({"message": "hello"}).to_string().into(),
        ))
        .await?;
    while let Some(frame) = socket.next().await {
        if let tokio_tungstenite::tungstenite::Message::Text(text) = frame? {
            let frame: Value = serde_json::from_str(text.as_str())?;
            match frame["type"].as_str() {
                Some("done") => return Ok(socket),
                Some("token") => {}
                _ => bail!("unexpected frame {frame}"),
            }
        }
    }
    bail!("socket closed before the turn finished")
}

pub async fn memory(
    service: &ServiceProcess,
    upstream: &FixedLatencyUpstream,
    settings: &Settings,
    report: &mut Report,
) -> Result<()> {
    let client = reqwest::Client::new();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = service.rss_mib();
    upstream.set_shape(Shape {
        delay: Duration::ZERO,
        chunks: 4,
        gap: Duration::ZERO,
    });
    let url = format!("{}/ws/chat", service.base.replace("http://", "ws://"));
    let started = Instant::now();
    let sockets: Vec<_> = futures::stream::iter(0..settings.websockets)
        .map(|_| websocket_turn(url.clone()))
        .buffer_unordered(settings.websocket_concurrency.max(1))
        .collect()
        .await;
    let opened = started.elapsed();
    let failed = sockets.iter().filter(|s| s.is_err()).count();
    if let Some(Err(e)) = sockets.iter().find(|s| s.is_err()) {
        eprintln!("[bench] websocket failed: {e:#}");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let open_gauge = service.metric_sum(&client, "chat_open_websockets").await?;
    let with_sockets = service.rss_mib();
    let peak_sockets = service.peak_rss_mib();
    let mut sockets: Vec<_> = sockets.into_iter().flatten().collect();
    let open = sockets.len();
    futures::future::join_all(sockets.iter_mut().map(|s| s.close(None))).await;
    drop(sockets);
    let deadline = Instant::now() + Duration::from_secs(10);
    while service.metric_sum(&client, "chat_open_websockets").await? > 0.0
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = service.rss_mib();
    eprintln!(
        "[bench] memory: idle {idle:.1} MiB, {open} sockets {with_sockets:.1} MiB (gauge {open_gauge}), after {after:.1} MiB"
    );
    report.judged(
        "RSS idle (VmRSS after start)",
        "-".into(),
        format!("{} MiB", f1(idle)),
        "-".into(),
        "<= 20 MiB",
        idle <= 20.0,
    );
    report.judged(
        &format!("RSS with {open} open WebSockets, one turn each"),
        "-".into(),
        format!("{} MiB (peak {})", f1(with_sockets), f1(peak_sockets)),
        format!(
            "{} KiB per socket",
            f1((with_sockets - idle) * 1024.0 / open.max(1) as f64)
        ),
        "<= 100 MiB",
        with_sockets <= 100.0 && failed == 0,
    );
    report.row(
        "RSS after the WebSockets closed",
        "-".into(),
        format!("{} MiB", f1(after)),
        "-".into(),
    );
    report.json.insert(
        "memory".into(),
        json!({
            "idle_rss_mib": idle,
            "websockets_requested": settings.websockets,
            "websockets_open": open,
            "websockets_failed": failed,
            "open_websockets_gauge": open_gauge,
            "seconds_to_open_and_turn": opened.as_secs_f64(),
            "rss_with_websockets_mib": with_sockets,
            "peak_rss_mib": peak_sockets,
            "rss_after_close_mib": after,
            "fixture": upstream.shape().describe(),
        }),
    );
    Ok(())
}
