//! One endpoint (a configured back end's URL, or one address its `discoverDns` name resolves
//! to) with its in-flight limit, wait queue, breaker and health, and the [`Lease`] a request
//! holds on it while it runs.
//!
//! The counters are atomics and the breaker and health sit behind a lock of the endpoint's own,
//! so that requests on different endpoints never wait for each other. A lease is the only way
//! to count a request in flight: it takes the permit, and dropping it (however the request
//! ends, including a client that leaves) gives the permit back and the count down.

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::breaker::{Admission, Breaker};
use super::error::{EndpointError, Saturation};
use super::health::HealthTracker;
use super::protocol::{Target, chat_path};
use crate::config::{BackendConfig, Protocol, RoutingConfig};
use crate::metrics::{BackendLabels, EndpointLabels, EndpointOutcomeLabels, Metrics};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;

pub(super) struct Endpoint {
    /// `<backend>` or, for an address found by `discoverDns`, `<backend>/<ip>`.
    pub name: String,
    pub backend: String,
    pub url: String,
    /// `url` and the protocol's generation path, parsed once rather than per request.
    chat_url: reqwest::Url,
    pub protocol: Protocol,
    pub api_key: Option<String>,
    /// Models served; empty means any allowed model.
    pub models: Vec<String>,
    pub weight: u32,
    /// Reserved for `routing.fallback`.
    pub fallback: bool,
    /// Requests in flight at most (`maxInFlightPerBackend`).
    pub limit: usize,
    /// Smooth weighted round robin's running score (see `selection::strategy`); kept on the
    /// endpoint so that it lives and dies with it when discovery changes the set.
    pub round_robin: AtomicI64,
    permits: Arc<Semaphore>,
    in_flight: AtomicUsize,
    queued: AtomicUsize,
    state: Mutex<EndpointState>,
    /// This endpoint's series of `chat_backend_requests_total` (per outcome, as in
    /// [`OUTCOMES`]) and `chat_time_to_first_token_seconds`, looked up in their families once,
    /// on first use (so that a series exists only once it counted something).
    outcome_counters: [OnceLock<Counter>; OUTCOMES.len()],
    time_to_first_token: OnceLock<Histogram>,
}

/// The outcomes of `chat_backend_requests_total`.
const OUTCOMES: [&str; 6] = [
    "success",
    "error",
    "timeout",
    "throttled",
    "rejected",
    "stream_error",
];

pub(super) struct EndpointState {
    pub breaker: Breaker,
    pub health: HealthTracker,
    /// Last request or health-check error.
    pub last_error: Option<String>,
}

/// What selection needs to know about an endpoint at one instant, read under one lock.
#[derive(Debug, Clone, Copy)]
pub(super) struct Readiness {
    /// The breaker would admit a request (closed, or half-open with the probe free).
    pub available: bool,
    /// Active health checks pass.
    pub healthy: bool,
    /// Until the breaker lets a probe through; zero unless open.
    pub reopens_in: Duration,
}

/// How many requests may wait for an endpoint's permit, and for how long.
#[derive(Debug, Clone, Copy)]
pub(super) struct QueuePolicy {
    pub depth: usize,
    pub timeout: Duration,
}

impl QueuePolicy {
    pub fn new(routing: &RoutingConfig) -> Self {
        Self {
            depth: routing.queue_depth as usize,
            timeout: Duration::from_millis(routing.queue_timeout_ms),
        }
    }
}

impl Endpoint {
    /// An endpoint of the back end `config` at `url`, with the limits of `routing`.
    pub fn new(
        config: &BackendConfig,
        api_key: Option<String>,
        fallback: bool,
        routing: &RoutingConfig,
        name: String,
        url: String,
    ) -> Self {
        let limit = routing.max_in_flight_per_backend as usize;
        // The configuration was validated; an unparsable URL still fails each request, clearly.
        let chat_url = reqwest::Url::parse(&format!("{url}{}", chat_path(config.protocol)))
            .unwrap_or_else(|_| reqwest::Url::parse("http://invalid.invalid").expect("static"));
        Endpoint {
            name,
            backend: config.name.clone(),
            url,
            chat_url,
            protocol: config.protocol,
            api_key,
            models: config.models.clone(),
            weight: config.weight.max(1),
            fallback,
            limit,
            round_robin: AtomicI64::new(0),
            permits: Arc::new(Semaphore::new(limit)),
            in_flight: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            outcome_counters: Default::default(),
            time_to_first_token: OnceLock::new(),
            state: Mutex::new(EndpointState {
                breaker: Breaker::new(
                    routing.breaker_failures,
                    Duration::from_secs(routing.breaker_cooldown_seconds),
                ),
                health: HealthTracker::new(routing.healthy_threshold, routing.unhealthy_threshold),
                last_error: None,
            }),
        }
    }

    pub fn state(&self) -> MutexGuard<'_, EndpointState> {
        self.state.lock().expect("endpoint state poisoned")
    }

    /// This endpoint's `chat_time_to_first_token_seconds` (labelled by back end).
    pub fn time_to_first_token(&self, metrics: &Metrics) -> &Histogram {
        self.time_to_first_token.get_or_init(|| {
            metrics
                .time_to_first_token
                .get_or_create(&BackendLabels {
                    backend: self.name.clone(),
                })
                .clone()
        })
    }

    pub fn serves(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }

    pub fn labels(&self) -> EndpointLabels {
        EndpointLabels {
            backend: self.backend.clone(),
            endpoint: self.name.clone(),
        }
    }

    pub fn target(&self) -> Target<'_> {
        Target {
            base_url: &self.url,
            chat_url: &self.chat_url,
            protocol: self.protocol,
            api_key: self.api_key.as_deref(),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// At its in-flight limit: a request would have to wait.
    pub fn full(&self) -> bool {
        self.permits.available_permits() == 0
    }

    pub fn readiness(&self, now: Instant) -> Readiness {
        let state = self.state();
        Readiness {
            available: state.breaker.available(now),
            healthy: state.health.healthy(),
            reopens_in: state.breaker.reopens_in(now),
        }
    }

    /// Records one active health check: `None` passed, else its error.
    pub fn record_health_check(&self, error: Option<String>) {
        let mut state = self.state();
        if let Some(healthy) = state.health.record(error.is_none()) {
            tracing::warn!(endpoint = %self.name, healthy, error = error.as_deref(), "endpoint health changed");
        }
        if error.is_some() {
            state.last_error = error;
        }
    }

    /// A lease now, if a permit is free and the breaker admits the request; `None` when another
    /// request took the last permit or the half-open probe first.
    pub fn try_lease(self: &Arc<Self>, now: Instant, metrics: &Arc<Metrics>) -> Option<Lease> {
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        let admission = self.state().breaker.admit(now)?;
        Some(Lease::new(self.clone(), permit, admission, metrics.clone()))
    }

    /// Waits in this endpoint's queue for a permit. `Ok(None)` when the permit came but the
    /// breaker opened meanwhile (the caller chooses again).
    pub async fn wait_for_lease(
        self: &Arc<Self>,
        queue: QueuePolicy,
        metrics: &Arc<Metrics>,
    ) -> Result<Option<Lease>, Saturation> {
        let Some(slot) = QueueSlot::take(&self.queued, queue.depth) else {
            return Err(Saturation::QueueFull);
        };
        let permit =
            tokio::time::timeout(queue.timeout, self.permits.clone().acquire_owned()).await;
        drop(slot);
        let permit = match permit {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) | Err(_) => return Err(Saturation::QueueTimeout),
        };
        let admission = self.state().breaker.admit(Instant::now());
        Ok(admission.map(|admission| Lease::new(self.clone(), permit, admission, metrics.clone())))
    }
}

/// A place in an endpoint's queue, given back when dropped: also when the waiting turn is
/// dropped (its client left), which would otherwise leave the slot taken for good and the
/// queue looking fuller than it is.
struct QueueSlot<'a>(&'a AtomicUsize);

impl<'a> QueueSlot<'a> {
    fn take(queued: &'a AtomicUsize, depth: usize) -> Option<Self> {
        let slot = QueueSlot(queued);
        (queued.fetch_add(1, Ordering::SeqCst) < depth).then_some(slot)
    }
}

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An endpoint's permit for one request: counts it in flight until dropped, and reports the
/// request's outcome to the endpoint's breaker and to `chat_backend_requests_total`.
pub(super) struct Lease {
    endpoint: Arc<Endpoint>,
    admission: Admission,
    metrics: Arc<Metrics>,
    settled: bool,
    _permit: OwnedSemaphorePermit,
}

impl Lease {
    fn new(
        endpoint: Arc<Endpoint>,
        permit: OwnedSemaphorePermit,
        admission: Admission,
        metrics: Arc<Metrics>,
    ) -> Self {
        endpoint.in_flight.fetch_add(1, Ordering::SeqCst);
        Self {
            endpoint,
            admission,
            metrics,
            settled: false,
            _permit: permit,
        }
    }

    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    fn count(&self, outcome: &'static str) {
        let resolve = || {
            self.metrics
                .backend_requests
                .get_or_create(&EndpointOutcomeLabels {
                    backend: self.endpoint.backend.clone(),
                    endpoint: self.endpoint.name.clone(),
                    outcome,
                })
                .clone()
        };
        match OUTCOMES.iter().position(|o| *o == outcome) {
            Some(i) => self.endpoint.outcome_counters[i].get_or_init(resolve).inc(),
            None => resolve().inc(),
        };
    }

    /// The first token arrived.
    pub fn succeeded(&mut self) {
        self.settled = true;
        self.endpoint.state().breaker.on_success();
        self.count("success");
    }

    /// The request failed, before its first token or (`mid_stream`) after.
    pub fn failed(&mut self, error: &EndpointError, mid_stream: bool) {
        self.settled = true;
        let mut state = self.endpoint.state();
        state.last_error = Some(error.to_string());
        if error.counts_against_endpoint() {
            if state.breaker.on_failure(Instant::now()) {
                tracing::warn!(
                    endpoint = %self.endpoint.name,
                    failures = state.breaker.consecutive_failures(),
                    "circuit breaker opened"
                );
            }
        } else if self.admission == Admission::Probe {
            state.breaker.release_probe();
        }
        drop(state);
        self.count(if mid_stream {
            "stream_error"
        } else {
            error.outcome()
        });
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::SeqCst);
        if !self.settled && self.admission == Admission::Probe {
            self.endpoint.state().breaker.release_probe();
        }
    }
}

#[cfg(test)]
impl Endpoint {
    /// An endpoint of the back end `name` at an address nothing answers on (TEST-NET-1):
    /// selection and leases never touch the network.
    pub fn unreachable(name: &str, weight: u32, routing: &RoutingConfig) -> Arc<Self> {
        let config = BackendConfig {
            name: name.into(),
            url: "http://192.0.2.1:11434".into(),
            protocol: Protocol::Ollama,
            weight,
            api_key_env: None,
            discover_dns: None,
            models: vec![],
        };
        let url = config.url.clone();
        Arc::new(Endpoint::new(
            &config,
            None,
            false,
            routing,
            name.into(),
            url,
        ))
    }
}

#[cfg(test)]
mod tests;
