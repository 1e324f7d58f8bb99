//! Selection over real endpoints at addresses nothing answers on: breakers, health and limits
//! are set through the endpoints' own state, so no request is ever sent.

use std::collections::HashMap;

use super::*;
use crate::backend::endpoint::{Lease, QueuePolicy};
use crate::metrics::Metrics;

fn routing(strategy: Strategy) -> RoutingConfig {
    RoutingConfig {
        strategy,
        max_in_flight_per_backend: 4,
        breaker_failures: 1,
        breaker_cooldown_seconds: 30,
        unhealthy_threshold: 1,
        affinity_load_factor_percent: 125,
        ..RoutingConfig::default()
    }
}

fn fleet(routing: &RoutingConfig, members: &[(&str, u32)]) -> Vec<Arc<Endpoint>> {
    members
        .iter()
        .map(|&(name, weight)| Endpoint::unreachable(name, weight, routing))
        .collect()
}

fn open_breaker(endpoint: &Endpoint) {
    assert!(endpoint.state().breaker.on_failure(Instant::now()));
}

fn fail_health_check(endpoint: &Endpoint) {
    endpoint.record_health_check(Some("health check: status 500".into()));
}

/// Leases `count` of the endpoint's permits; they count in flight until dropped.
fn hold(endpoint: &Arc<Endpoint>, count: usize, metrics: &Arc<Metrics>) -> Vec<Lease> {
    (0..count)
        .map(|_| {
            endpoint
                .try_lease(Instant::now(), metrics)
                .expect("a free permit")
        })
        .collect()
}

fn free_pick(selector: &Selector, endpoints: &[Arc<Endpoint>], session: Option<&str>) -> String {
    match selector.pick(endpoints.to_vec(), session, Instant::now()) {
        Ok(Pick::Free(endpoint)) => endpoint.name.clone(),
        Ok(Pick::Queue(endpoint)) => panic!(
            "expected a free endpoint, got the queue of {}",
            endpoint.name
        ),
        Err(refusal) => panic!("expected a free endpoint, got {refusal:?}"),
    }
}

fn counts(
    selector: &Selector,
    endpoints: &[Arc<Endpoint>],
    session: Option<&str>,
    picks: usize,
) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..picks {
        *counts
            .entry(free_pick(selector, endpoints, session))
            .or_insert(0) += 1;
    }
    counts
}

#[test]
fn round_robin_takes_turns_evenly() {
    let routing = routing(Strategy::RoundRobin);
    let endpoints = fleet(&routing, &[("a", 1), ("b", 1), ("c", 1)]);
    let selector = Selector::new(&routing);
    let first: Vec<String> = (0..3)
        .map(|_| free_pick(&selector, &endpoints, None))
        .collect();
    assert_eq!(first, ["a", "b", "c"]);
    let counts = counts(&selector, &endpoints, None, 30);
    assert_eq!(
        counts,
        HashMap::from([("a".into(), 10), ("b".into(), 10), ("c".into(), 10)])
    );
}

#[test]
fn round_robin_gives_each_endpoint_its_weight_interleaved() {
    let routing = routing(Strategy::RoundRobin);
    let endpoints = fleet(&routing, &[("heavy", 3), ("light", 1)]);
    let selector = Selector::new(&routing);
    let sequence: Vec<String> = (0..8)
        .map(|_| free_pick(&selector, &endpoints, None))
        .collect();
    assert_eq!(
        sequence,
        [
            "heavy", "heavy", "light", "heavy", "heavy", "heavy", "light", "heavy"
        ]
    );
    let counts = counts(&selector, &endpoints, None, 400);
    assert_eq!((counts["heavy"], counts["light"]), (300, 100));
}

#[test]
fn round_robin_skips_open_breakers_failed_checks_and_endpoints_at_their_limit() {
    let routing = routing(Strategy::RoundRobin);
    let metrics = Arc::new(Metrics::new());
    let endpoints = fleet(
        &routing,
        &[
            ("a", 1),
            ("open", 1),
            ("unhealthy", 1),
            ("full", 1),
            ("e", 1),
        ],
    );
    open_breaker(&endpoints[1]);
    fail_health_check(&endpoints[2]);
    let _held = hold(&endpoints[3], 4, &metrics);
    let selector = Selector::new(&routing);
    let counts = counts(&selector, &endpoints, None, 20);
    assert_eq!(counts, HashMap::from([("a".into(), 10), ("e".into(), 10)]));
}

#[test]
fn when_every_check_fails_the_endpoints_are_tried_anyway() {
    let routing = routing(Strategy::RoundRobin);
    let endpoints = fleet(&routing, &[("a", 1), ("b", 1)]);
    endpoints.iter().for_each(|e| fail_health_check(e));
    let selector = Selector::new(&routing);
    let counts = counts(&selector, &endpoints, None, 10);
    assert_eq!(counts, HashMap::from([("a".into(), 5), ("b".into(), 5)]));
}

#[test]
fn least_in_flight_picks_the_least_loaded_per_unit_of_weight() {
    let routing = routing(Strategy::LeastInFlight);
    let metrics = Arc::new(Metrics::new());
    let selector = Selector::new(&routing);
    let endpoints = fleet(&routing, &[("busy", 1), ("idle", 1)]);
    let _busy = hold(&endpoints[0], 3, &metrics);
    let _idle = hold(&endpoints[1], 1, &metrics);
    assert_eq!(counts(&selector, &endpoints, None, 50)["idle"], 50);
    // 3 in flight on weight 4 is lighter than 2 on weight 1.
    let endpoints = fleet(&routing, &[("big", 4), ("small", 1)]);
    let _big = hold(&endpoints[0], 3, &metrics);
    let _small = hold(&endpoints[1], 2, &metrics);
    assert_eq!(counts(&selector, &endpoints, None, 50)["big"], 50);
}

#[test]
fn session_affinity_keeps_a_session_home_and_moves_it_only_while_the_home_is_down() {
    let routing = routing(Strategy::SessionAffinity);
    let endpoints = fleet(&routing, &[("a", 1), ("b", 1), ("c", 1)]);
    let selector = Selector::new(&routing);
    let session = Some("session-7");
    let home = free_pick(&selector, &endpoints, session);
    assert_eq!(counts(&selector, &endpoints, session, 20)[&home], 20);
    let homes: std::collections::HashSet<String> = (0..60)
        .map(|s| free_pick(&selector, &endpoints, Some(&format!("session-{s}"))))
        .collect();
    assert_eq!(homes.len(), 3, "sessions spread over every endpoint");

    let home_endpoint = endpoints.iter().find(|e| e.name == home).unwrap();
    open_breaker(home_endpoint);
    let second = free_pick(&selector, &endpoints, session);
    assert_ne!(second, home);
    assert_eq!(
        counts(&selector, &endpoints, session, 20)[&second],
        20,
        "the second choice is stable too"
    );
    home_endpoint.state().breaker.on_success();
    assert_eq!(free_pick(&selector, &endpoints, session), home, "back home");
    fail_health_check(home_endpoint);
    assert_eq!(free_pick(&selector, &endpoints, session), second);
}

#[test]
fn session_affinity_spills_above_the_load_bound_and_when_the_home_is_full() {
    let mut routing = routing(Strategy::SessionAffinity);
    routing.max_in_flight_per_backend = 3;
    let metrics = Arc::new(Metrics::new());
    let endpoints = fleet(&routing, &[("x", 1), ("y", 1)]);
    let selector = Selector::new(&routing);
    let session = Some("session-42");
    let home = free_pick(&selector, &endpoints, session);
    let (home_endpoint, other) = if endpoints[0].name == home {
        (&endpoints[0], &endpoints[1])
    } else {
        (&endpoints[1], &endpoints[0])
    };
    // bound = ceil(1.25 * (in flight + 1) / 2): with 1 on the home it is 2, the home keeps it.
    let mut held = hold(home_endpoint, 1, &metrics);
    assert_eq!(free_pick(&selector, &endpoints, session), home);
    // With 2 the bound is still 2: the session spills to its next endpoint.
    held.extend(hold(home_endpoint, 1, &metrics));
    assert_eq!(free_pick(&selector, &endpoints, session), other.name);
    // The other one is as loaded now (bound 4): home again, until the home is full.
    held.extend(hold(other, 2, &metrics));
    assert_eq!(free_pick(&selector, &endpoints, session), home);
    held.extend(hold(home_endpoint, 1, &metrics));
    assert!(home_endpoint.full());
    assert_eq!(free_pick(&selector, &endpoints, session), other.name);
    drop(held);
    assert_eq!(free_pick(&selector, &endpoints, session), home);
}

#[test]
fn stateless_requests_under_session_affinity_go_to_the_least_loaded() {
    let routing = routing(Strategy::SessionAffinity);
    let metrics = Arc::new(Metrics::new());
    let endpoints = fleet(&routing, &[("busy", 1), ("idle", 1)]);
    let _busy = hold(&endpoints[0], 2, &metrics);
    let selector = Selector::new(&routing);
    assert_eq!(counts(&selector, &endpoints, None, 30)["idle"], 30);
}

#[test]
fn nothing_to_choose_from_is_not_served_and_all_open_says_when_to_retry() {
    let routing = routing(Strategy::RoundRobin);
    let selector = Selector::new(&routing);
    assert_eq!(
        selector.pick(Vec::new(), None, Instant::now()).err(),
        Some(NoEndpoint::NotServed)
    );
    let endpoints = fleet(&routing, &[("a", 1), ("b", 1)]);
    endpoints.iter().for_each(|e| open_breaker(e));
    match selector.pick(endpoints, None, Instant::now()).err() {
        Some(NoEndpoint::AllOpen(reopens_in)) => {
            assert!(reopens_in > Duration::from_secs(29), "{reopens_in:?}");
            assert!(reopens_in <= Duration::from_secs(30), "{reopens_in:?}");
        }
        other => panic!("expected AllOpen, got {other:?}"),
    }
}

#[tokio::test]
async fn when_every_endpoint_is_full_the_request_queues_at_the_shortest_queue() {
    let mut routing = routing(Strategy::RoundRobin);
    routing.max_in_flight_per_backend = 1;
    let metrics = Arc::new(Metrics::new());
    let endpoints = fleet(&routing, &[("a", 1), ("b", 1)]);
    let _held: Vec<Lease> = endpoints
        .iter()
        .flat_map(|e| hold(e, 1, &metrics))
        .collect();
    let selector = Selector::new(&routing);
    let queue_of =
        |endpoints: &[Arc<Endpoint>]| match selector.pick(endpoints.to_vec(), None, Instant::now())
        {
            Ok(Pick::Queue(endpoint)) => endpoint.name.clone(),
            Ok(Pick::Free(endpoint)) => panic!("{} is at its limit", endpoint.name),
            Err(refusal) => panic!("{refusal:?}"),
        };
    assert_eq!(queue_of(&endpoints), "a", "a tie goes to the first");
    let waiting = {
        let a = endpoints[0].clone();
        let metrics = metrics.clone();
        let queue = QueuePolicy {
            depth: 4,
            timeout: Duration::from_secs(30),
        };
        tokio::spawn(async move { a.wait_for_lease(queue, &metrics).await.is_ok() })
    };
    while endpoints[0].queued() == 0 {
        tokio::task::yield_now().await;
    }
    assert_eq!(queue_of(&endpoints), "b");
    waiting.abort();
}
