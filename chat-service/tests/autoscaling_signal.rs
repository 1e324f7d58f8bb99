//! The per-pod series the operator's HPA averages, `chat_requests_in_flight`, scraped from
//! `/metrics` while turns run and after they finish. The upstream is the named `FlakyUpstream`
//! fixture with a fixed latency, so the turns are slow for a known time; the stores are the
//! rig's.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use support::flaky::{FlakyUpstream, Mode};
use support::metric_value;
use support::pool::{backend, chat, config_with, serve};

const GAUGE: &str = "chat_requests_in_flight";

#[tokio::test(flavor = "multi_thread")]
async fn requests_in_flight_rises_during_slow_turns_and_returns_to_zero() {
    let slow = FlakyUpstream::start(Mode::Healthy).await;
    slow.set_latency(Duration::from_secs(3));
    let mut config = config_with(vec![backend("slow", &slow.url)]);
    config.routing.max_in_flight_per_backend = 8;
    let service = Arc::new(serve(config).await);
    let before = service.metrics_text().await;
    assert!(
        before.lines().any(|l| l.starts_with(&format!("{GAUGE} "))),
        "the HPA's series is exported before any request:\n{before}"
    );
    assert_eq!(metric_value(&before, GAUGE), 0.0);

    let turns: Vec<_> = (0..3)
        .map(|i| {
            let service = service.clone();
            tokio::spawn(
                async move { chat(&service, json!({"message": format!("slow {i}")})).await },
            )
        })
        .collect();
    // The fixture holds each answer 3 s; all three are admitted well within that.
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut during = 0.0;
    while Instant::now() < deadline {
        during = metric_value(&service.metrics_text().await, GAUGE);
        if during == 3.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(during, 3.0, "three slow turns in flight, seen on /metrics");
    for turn in turns {
        let (status, _, body) = turn.await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let after = service.metrics_text().await;
    assert_eq!(metric_value(&after, GAUGE), 0.0, "{after}");
}
