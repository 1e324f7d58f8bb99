//! Metric cardinality: requests with made-up methods, paths, models and header values must not
//! add series to `/metrics` (each label takes a value from a fixed set, never client text), and
//! the memory behind them stays flat. The request count defaults to 3,000; set
//! `CHATOP_CARDINALITY_REQUESTS` (e.g. 100000) for a longer run by hand.

mod support;

use futures::StreamExt;
use reqwest::Method;
use serde_json::json;
use support::{TestService, start_on_rig};

/// One request of kind `kind % 5` with the random part `n`: every kind hits the same labels
/// whatever `n` is.
async fn hostile_request(service: &TestService, kind: usize, n: u64) -> u16 {
    let http = &service.http;
    let request = match kind % 5 {
        // A made-up method on a made-up path.
        0 => http.request(
            Method::from_bytes(format!("M{n}").as_bytes()).unwrap(),
            service.url(&format!("/made/up/{n}")),
        ),
        // A made-up method on a real route.
        1 => http.request(
            Method::from_bytes(format!("X{n}").as_bytes()).unwrap(),
            service.url("/v1/models"),
        ),
        // A made-up path under the API prefix.
        2 => http.get(service.url(&format!("/v1/nothing-{n}/here"))),
        // A model that is not allowed.
        3 => http
            .post(service.url("/v1/chat"))
            .json(&json!({"message": "hi", "model": format!("model-{n}")})),
        // Random header values on a real route.
        _ => http
            .get(service.url("/v1/models"))
            .header("x-user-id", format!("user-{n}"))
            .header("x-request-id", format!("req-{n}"))
            .header("user-agent", format!("agent-{n}")),
    };
    request.send().await.unwrap().status().as_u16()
}

/// Series in the Prometheus text: every sample line.
fn series(metrics: &str) -> Vec<String> {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            line.rsplit_once(' ')
                .map_or(line, |(name, _)| name)
                .to_string()
        })
        .collect()
}

fn resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn send(service: &TestService, from: u64, count: u64) {
    futures::stream::iter(from..from + count)
        .map(|n| hostile_request(service, n as usize, rand::random::<u64>() ^ n))
        .buffer_unordered(32)
        .for_each(|status| async move {
            assert!(status < 500, "a hostile request got {status}");
        })
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn made_up_methods_paths_and_models_add_no_metric_series() {
    let requests: u64 = std::env::var("CHATOP_CARDINALITY_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000);
    let service = start_on_rig().await;
    // Every kind once (twice), so that the label sets they map to exist before counting.
    send(&service, 0, 10).await;
    // The scrape itself is a request: its own series exist from the second scrape on.
    service.metrics_text().await;
    let before_text = service.metrics_text().await;
    let before = series(&before_text);
    let rss_before = resident_kib();

    send(&service, 10, requests).await;

    let after_text = service.metrics_text().await;
    let after = series(&after_text);
    let rss_after = resident_kib();
    let added: Vec<&String> = after.iter().filter(|s| !before.contains(s)).collect();
    println!(
        "{requests} hostile requests: {} -> {} series, /metrics {} -> {} bytes, \
         RSS {rss_before} -> {rss_after} KiB",
        before.len(),
        after.len(),
        before_text.len(),
        after_text.len()
    );
    assert!(
        added.is_empty(),
        "{} new series, e.g. {:?}",
        added.len(),
        &added[..added.len().min(5)]
    );
    assert_eq!(before.len(), after.len());
    assert_eq!(
        service
            .http
            .get(service.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}
