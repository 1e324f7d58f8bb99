//! Lease and queue accounting on an endpoint nothing listens on: no request is ever sent.

use super::*;
use crate::backend::breaker::BreakerState;

fn routing(max_in_flight: u32) -> RoutingConfig {
    RoutingConfig {
        max_in_flight_per_backend: max_in_flight,
        breaker_failures: 1,
        breaker_cooldown_seconds: 0,
        ..RoutingConfig::default()
    }
}

fn requests(metrics: &Metrics, endpoint: &Endpoint, outcome: &'static str) -> u64 {
    metrics
        .backend_requests
        .get_or_create(&EndpointOutcomeLabels {
            backend: endpoint.backend.clone(),
            endpoint: endpoint.name.clone(),
            outcome,
        })
        .get()
}

#[test]
fn leases_count_in_flight_up_to_the_limit_and_give_it_back_on_drop() {
    let metrics = Arc::new(Metrics::new());
    let endpoint = Endpoint::unreachable("a", 1, &routing(2));
    let now = Instant::now();
    let first = endpoint.try_lease(now, &metrics).expect("a free permit");
    let second = endpoint.try_lease(now, &metrics).expect("a free permit");
    assert_eq!(endpoint.in_flight(), 2);
    assert!(endpoint.full());
    assert!(endpoint.try_lease(now, &metrics).is_none(), "at the limit");
    drop(first);
    assert_eq!(endpoint.in_flight(), 1);
    assert!(!endpoint.full());
    let third = endpoint
        .try_lease(now, &metrics)
        .expect("the permit came back");
    drop((second, third));
    assert_eq!(endpoint.in_flight(), 0);
}

#[test]
fn a_failure_opens_the_breaker_and_a_success_closes_it() {
    let metrics = Arc::new(Metrics::new());
    let routing = RoutingConfig {
        breaker_failures: 2,
        breaker_cooldown_seconds: 60,
        ..RoutingConfig::default()
    };
    let endpoint = Endpoint::unreachable("a", 1, &routing);
    let now = Instant::now();
    let mut lease = endpoint.try_lease(now, &metrics).unwrap();
    lease.failed(&EndpointError::Truncated, false);
    drop(lease);
    // A 4xx refusal says nothing about the endpoint: it does not count towards the breaker.
    let mut lease = endpoint.try_lease(now, &metrics).unwrap();
    let refused = EndpointError::Status {
        status: 400,
        body: String::new(),
    };
    lease.failed(&refused, false);
    drop(lease);
    assert_eq!(endpoint.state().breaker.state(now), BreakerState::Closed);
    let mut lease = endpoint.try_lease(now, &metrics).unwrap();
    lease.failed(&EndpointError::Truncated, true);
    drop(lease);
    assert_eq!(endpoint.state().breaker.state(now), BreakerState::Open);
    assert!(endpoint.try_lease(now, &metrics).is_none(), "open breaker");
    assert_eq!(requests(&metrics, &endpoint, "error"), 1);
    assert_eq!(requests(&metrics, &endpoint, "rejected"), 1);
    assert_eq!(requests(&metrics, &endpoint, "stream_error"), 1);
    assert_eq!(
        endpoint.state().last_error.as_deref(),
        Some("stream ended without a final message")
    );
    assert_eq!(endpoint.in_flight(), 0);
}

#[test]
fn an_abandoned_probe_lets_the_next_request_probe() {
    let metrics = Arc::new(Metrics::new());
    let endpoint = Endpoint::unreachable("a", 1, &routing(4));
    let now = Instant::now();
    let mut lease = endpoint.try_lease(now, &metrics).unwrap();
    lease.failed(&EndpointError::Truncated, false);
    drop(lease);
    // Cooldown 0: half-open at once, one probe at a time.
    let probe = endpoint.try_lease(now, &metrics).expect("the probe");
    assert!(endpoint.try_lease(now, &metrics).is_none(), "one probe");
    drop(probe);
    let mut probe = endpoint.try_lease(now, &metrics).expect("probe again");
    probe.succeeded();
    drop(probe);
    assert_eq!(endpoint.state().breaker.state(now), BreakerState::Closed);
    assert_eq!(requests(&metrics, &endpoint, "success"), 1);
}

#[tokio::test]
async fn the_queue_refuses_beyond_its_depth_and_times_out() {
    let metrics = Arc::new(Metrics::new());
    let endpoint = Endpoint::unreachable("a", 1, &routing(1));
    let held = endpoint.try_lease(Instant::now(), &metrics).unwrap();
    let no_queue = QueuePolicy {
        depth: 0,
        timeout: Duration::from_secs(5),
    };
    assert_eq!(
        endpoint.wait_for_lease(no_queue, &metrics).await.err(),
        Some(Saturation::QueueFull)
    );
    let short = QueuePolicy {
        depth: 1,
        timeout: Duration::from_millis(20),
    };
    assert_eq!(
        endpoint.wait_for_lease(short, &metrics).await.err(),
        Some(Saturation::QueueTimeout)
    );
    assert_eq!(endpoint.queued(), 0);
    // Released while waiting: the waiter gets the permit.
    let patient = QueuePolicy {
        depth: 1,
        timeout: Duration::from_secs(5),
    };
    let waiter = {
        let endpoint = endpoint.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move { endpoint.wait_for_lease(patient, &metrics).await })
    };
    while endpoint.queued() == 0 {
        tokio::task::yield_now().await;
    }
    drop(held);
    let lease = waiter.await.unwrap().unwrap().expect("breaker closed");
    assert_eq!((endpoint.in_flight(), endpoint.queued()), (1, 0));
    drop(lease);
    assert_eq!(endpoint.in_flight(), 0);
}

#[tokio::test]
async fn a_waiter_that_is_dropped_gives_its_queue_slot_back() {
    let metrics = Arc::new(Metrics::new());
    let endpoint = Endpoint::unreachable("a", 1, &routing(1));
    let _held = endpoint.try_lease(Instant::now(), &metrics).unwrap();
    let queue = QueuePolicy {
        depth: 1,
        timeout: Duration::from_secs(30),
    };
    let waiter = {
        let endpoint = endpoint.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move { endpoint.wait_for_lease(queue, &metrics).await.is_ok() })
    };
    while endpoint.queued() == 0 {
        tokio::task::yield_now().await;
    }
    waiter.abort();
    assert!(waiter.await.unwrap_err().is_cancelled());
    assert_eq!(endpoint.queued(), 0);
    assert_eq!(
        endpoint
            .wait_for_lease(
                QueuePolicy {
                    timeout: Duration::from_millis(10),
                    ..queue
                },
                &metrics
            )
            .await
            .err(),
        Some(Saturation::QueueTimeout),
        "the slot is free again: the next waiter queues rather than being refused"
    );
}
