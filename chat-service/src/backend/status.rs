//! What the pool reports: the `GET /v1/backends` document (its contract is in the docs of
//! [`crate::backend`]) and the per-endpoint gauges, both read from the endpoints when asked, so
//! neither is ever stale.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use super::breaker::BreakerState;
use super::endpoint::Endpoint;
use super::rollout::RolloutReport;
use crate::config::Protocol;
use crate::metrics::{EndpointLabels, Metrics};

/// `GET /v1/backends`; see the module docs of [`crate::backend`] for the contract.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolStatus {
    /// Endpoints that are healthy and whose breaker is not open.
    pub ready: usize,
    pub total: usize,
    pub backends: Vec<EndpointStatus>,
    /// The rollout's split and each side's figures since this pod started; absent without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutReport>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointStatus {
    /// `<backend>` or, for an address found by `discoverDns`, `<backend>/<ip>`.
    pub name: String,
    pub backend: String,
    pub url: String,
    /// `ollama` or `openai`.
    pub protocol: &'static str,
    /// Models served; empty means any allowed model.
    pub models: Vec<String>,
    pub weight: u32,
    /// Reserved for `routing.fallback`.
    pub fallback: bool,
    pub healthy: bool,
    pub breaker: BreakerState,
    pub in_flight: usize,
    pub queued: usize,
    pub max_in_flight: usize,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
}

impl EndpointStatus {
    fn of(endpoint: &Endpoint, now: Instant) -> Self {
        let state = endpoint.state();
        EndpointStatus {
            name: endpoint.name.clone(),
            backend: endpoint.backend.clone(),
            url: endpoint.url.clone(),
            protocol: match endpoint.protocol {
                Protocol::Ollama => "ollama",
                Protocol::Openai => "openai",
            },
            models: endpoint.models.clone(),
            weight: endpoint.weight,
            fallback: endpoint.fallback,
            healthy: state.health.healthy(),
            breaker: state.breaker.state(now),
            in_flight: endpoint.in_flight(),
            queued: endpoint.queued(),
            max_in_flight: endpoint.limit,
            consecutive_failures: state.breaker.consecutive_failures(),
            last_error: state.last_error.clone(),
        }
    }

    /// Counted in `ready`, and in the operator's `BackendsReady`.
    pub fn ready(&self) -> bool {
        self.healthy && self.breaker != BreakerState::Open
    }
}

impl PoolStatus {
    pub(super) fn of(endpoints: &[Arc<Endpoint>], now: Instant) -> Self {
        let backends: Vec<EndpointStatus> = endpoints
            .iter()
            .map(|e| EndpointStatus::of(e, now))
            .collect();
        PoolStatus {
            ready: backends.iter().filter(|b| b.ready()).count(),
            total: backends.len(),
            backends,
            rollout: None,
        }
    }
}

/// The per-endpoint gauges (`chat_backend_up`, `_breaker_state`, `_in_flight`, `_queued`).
#[derive(Default)]
pub(super) struct EndpointGauges {
    /// Label sets exported last time, to remove those of endpoints that are gone.
    exported: Mutex<HashSet<EndpointLabels>>,
}

impl EndpointGauges {
    /// Sets the gauges from the endpoints' current state and removes those of endpoints that
    /// are gone; called when `/metrics` is scraped.
    pub fn export(&self, endpoints: &[Arc<Endpoint>], metrics: &Metrics, now: Instant) {
        let mut current = HashSet::new();
        for endpoint in endpoints {
            let status = EndpointStatus::of(endpoint, now);
            let labels = endpoint.labels();
            metrics
                .backend_up
                .get_or_create(&labels)
                .set(i64::from(status.healthy));
            metrics
                .backend_breaker_state
                .get_or_create(&labels)
                .set(status.breaker.gauge());
            metrics
                .backend_in_flight
                .get_or_create(&labels)
                .set(status.in_flight as i64);
            metrics
                .backend_queued
                .get_or_create(&labels)
                .set(status.queued as i64);
            current.insert(labels);
        }
        let mut exported = self.exported.lock().expect("exported gauges poisoned");
        for gone in exported.difference(&current) {
            metrics.backend_up.remove(gone);
            metrics.backend_breaker_state.remove(gone);
            metrics.backend_in_flight.remove(gone);
            metrics.backend_queued.remove(gone);
        }
        *exported = current;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RoutingConfig;

    #[test]
    fn ready_counts_healthy_endpoints_with_a_breaker_not_open() {
        let routing = RoutingConfig {
            breaker_failures: 1,
            unhealthy_threshold: 1,
            ..RoutingConfig::default()
        };
        let endpoints: Vec<Arc<Endpoint>> = ["a", "b", "c"]
            .iter()
            .map(|name| Endpoint::unreachable(name, 1, &routing))
            .collect();
        endpoints[1].state().breaker.on_failure(Instant::now());
        endpoints[2].record_health_check(Some("health check: status 503".into()));
        let status = PoolStatus::of(&endpoints, Instant::now());
        assert_eq!((status.ready, status.total), (1, 3));
        assert_eq!(status.backends[1].breaker, BreakerState::Open);
        assert_eq!(status.backends[1].consecutive_failures, 1);
        assert!(!status.backends[2].healthy);
        assert_eq!(
            status.backends[2].last_error.as_deref(),
            Some("health check: status 503")
        );
    }

    #[test]
    fn gauges_of_endpoints_that_are_gone_disappear() {
        let routing = RoutingConfig::default();
        let metrics = Metrics::new();
        let gauges = EndpointGauges::default();
        let a = Endpoint::unreachable("pods/10.0.0.1", 1, &routing);
        let b = Endpoint::unreachable("pods/10.0.0.2", 1, &routing);
        gauges.export(&[a.clone(), b], &metrics, Instant::now());
        assert!(metrics.encode().contains(r#"endpoint="pods/10.0.0.2""#));
        gauges.export(&[a], &metrics, Instant::now());
        let text = metrics.encode();
        assert!(text.contains(r#"endpoint="pods/10.0.0.1""#), "{text}");
        assert!(!text.contains(r#"endpoint="pods/10.0.0.2""#), "{text}");
    }
}
