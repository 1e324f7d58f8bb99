//! The [`BackendPool`]: every endpoint with its limits, queue, breaker and health, and the path
//! of one generation through them.
//!
//! A turn asks for a model. The candidates are the endpoints serving it (`models` empty = any),
//! minus those already tried in this turn, minus open breakers, preferring endpoints whose
//! health checks pass (if none pass, the others are tried rather than failing outright). The
//! strategy picks among candidates below their in-flight limit; when all are at the limit the
//! request waits in the shortest endpoint queue (bounded by `queueDepth` and `queueTimeoutMs`).
//! Failures before the first token are retried on another endpoint while `maxAttempts` and the
//! retry budget allow. When no endpoint can take the request (queues full, breakers open) the
//! turn goes to `routing.fallback` if configured, else it is refused with 503 and Retry-After.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::balance::{self, Candidate, SmoothWrr};
use super::budget::RetryBudget;
use super::discovery::{self, Resolver, SystemResolver};
use super::health::{Admission, Breaker, BreakerState, HealthTracker};
use super::protocol::{self, Target};
use super::{BackendError, Chunk, ChunkStream, Generation, GenerationRequest};
use crate::config::{BackendConfig, Config, FallbackConfig, Protocol, RoutingConfig, Strategy};
use crate::http::AppError;
use crate::metrics::{BackendLabels, EndpointLabels, EndpointOutcomeLabels, Metrics, ShedLabels};

/// Longest a health check or a DNS resolution may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Re-selections after losing a race for a permit or a probe before giving up.
const SELECTION_ROUNDS: usize = 16;

/// `GET /v1/backends`; see the module docs of [`crate::backend`] for the contract.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolStatus {
    /// Endpoints that are healthy and whose breaker is not open.
    pub ready: usize,
    pub total: usize,
    pub backends: Vec<EndpointStatus>,
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

struct Endpoint {
    name: String,
    backend: String,
    url: String,
    protocol: Protocol,
    api_key: Option<String>,
    models: Vec<String>,
    weight: u32,
    fallback: bool,
    limit: usize,
    permits: Arc<Semaphore>,
    in_flight: AtomicUsize,
    queued: AtomicUsize,
    state: Mutex<EndpointState>,
}

struct EndpointState {
    breaker: Breaker,
    health: HealthTracker,
    last_error: Option<String>,
}

impl Endpoint {
    fn state(&self) -> std::sync::MutexGuard<'_, EndpointState> {
        self.state.lock().expect("endpoint state poisoned")
    }

    fn serves(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }

    fn labels(&self) -> EndpointLabels {
        EndpointLabels {
            backend: self.backend.clone(),
            endpoint: self.name.clone(),
        }
    }

    fn status(&self, now: Instant) -> EndpointStatus {
        let state = self.state();
        EndpointStatus {
            name: self.name.clone(),
            backend: self.backend.clone(),
            url: self.url.clone(),
            protocol: match self.protocol {
                Protocol::Ollama => "ollama",
                Protocol::Openai => "openai",
            },
            models: self.models.clone(),
            weight: self.weight,
            fallback: self.fallback,
            healthy: state.health.healthy(),
            breaker: state.breaker.state(now),
            in_flight: self.in_flight.load(Ordering::SeqCst),
            queued: self.queued.load(Ordering::SeqCst),
            max_in_flight: self.limit,
            consecutive_failures: state.breaker.consecutive_failures(),
            last_error: state.last_error.clone(),
        }
    }
}

/// One configured back end and its current endpoints.
struct Group {
    config: BackendConfig,
    api_key: Option<String>,
    url: reqwest::Url,
    fallback: bool,
    /// Host and port to resolve, for `discoverDns`.
    discover: Option<(String, u16)>,
    endpoints: Vec<Arc<Endpoint>>,
}

/// Which endpoints a turn may use.
#[derive(Clone, Copy)]
enum Route<'a> {
    Regular,
    Fallback { backend: Option<&'a str> },
}

/// Why no endpoint could be leased.
enum NoEndpoint {
    /// No endpoint (not yet tried in this turn) serves the model.
    NotServed,
    /// Every candidate has its breaker open; the earliest reopens after this long.
    AllOpen(Duration),
    /// Every candidate is at its limit and the queue is full or the wait timed out.
    Saturated(&'static str),
}

struct PoolInner {
    client: reqwest::Client,
    routing: RoutingConfig,
    fallback: Option<FallbackConfig>,
    groups: RwLock<Vec<Group>>,
    wrr: Mutex<SmoothWrr>,
    budget: Mutex<RetryBudget>,
    resolver: RwLock<Arc<dyn Resolver>>,
    /// Held for a whole discovery refresh, so that a slow, older resolution never lands after
    /// (and overwrites) a newer one.
    refreshing: tokio::sync::Mutex<()>,
    metrics: Arc<Metrics>,
    /// Label sets of the per-endpoint gauges, to remove those of endpoints that are gone.
    exported: Mutex<HashSet<EndpointLabels>>,
}

pub struct BackendPool {
    inner: Arc<PoolInner>,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for BackendPool {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// An endpoint's permit for one request; counts it in flight until dropped, and reports the
/// request's outcome to the endpoint's breaker.
struct Lease {
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

    fn count(&self, outcome: &'static str) {
        self.metrics
            .backend_requests
            .get_or_create(&EndpointOutcomeLabels {
                backend: self.endpoint.backend.clone(),
                endpoint: self.endpoint.name.clone(),
                outcome,
            })
            .inc();
    }

    /// The first token arrived.
    fn succeeded(&mut self) {
        self.settled = true;
        self.endpoint.state().breaker.on_success();
        self.count("success");
    }

    fn failed(&mut self, error: &BackendError, mid_stream: bool) {
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

impl BackendPool {
    /// Builds the endpoints (resolving `discoverDns` names once) and starts the health-check
    /// and discovery loops, which end with the pool. `api_keys` holds, per back end in order,
    /// the key read from its `apiKeyEnv`.
    pub async fn new(
        config: &Config,
        api_keys: Vec<Option<String>>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, reqwest::Error> {
        Self::with_resolver(config, api_keys, metrics, Arc::new(SystemResolver)).await
    }

    pub async fn with_resolver(
        config: &Config,
        api_keys: Vec<Option<String>>,
        metrics: Arc<Metrics>,
        resolver: Arc<dyn Resolver>,
    ) -> Result<Self, reqwest::Error> {
        let routing = config.routing.clone();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(routing.connect_timeout_ms))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()?;
        let fallback_backend = routing.fallback.as_ref().and_then(|f| f.backend.clone());
        let mut groups = Vec::new();
        for (backend, api_key) in config.backends.iter().zip(api_keys) {
            let url = reqwest::Url::parse(backend.url.trim_end_matches('/'))
                .unwrap_or_else(|_| reqwest::Url::parse("http://invalid.invalid").unwrap());
            let fallback = fallback_backend.as_deref() == Some(backend.name.as_str());
            let discover = backend
                .discover_dns
                .as_deref()
                .map(|dns| discovery::target(dns, &url));
            let mut group = Group {
                config: backend.clone(),
                api_key,
                url,
                fallback,
                discover,
                endpoints: Vec::new(),
            };
            // Until (or unless) the name resolves, the URL itself is the endpoint.
            group.endpoints = vec![Arc::new(new_endpoint(
                &group,
                &routing,
                backend.name.clone(),
                backend.url.trim_end_matches('/').to_string(),
            ))];
            groups.push(group);
        }
        let inner = Arc::new(PoolInner {
            client,
            budget: Mutex::new(RetryBudget::new(
                routing.retry_budget_percent,
                routing.retry_budget_min_per_second,
                Instant::now(),
            )),
            fallback: routing.fallback.clone(),
            routing,
            groups: RwLock::new(groups),
            wrr: Mutex::new(SmoothWrr::default()),
            resolver: RwLock::new(resolver),
            refreshing: tokio::sync::Mutex::new(()),
            metrics,
            exported: Mutex::new(HashSet::new()),
        });
        inner.refresh_discovery().await;
        let mut tasks = Vec::new();
        let health_every = Duration::from_secs(inner.routing.health_check_interval_seconds);
        tasks.push(spawn_loop(
            &inner,
            Duration::ZERO,
            health_every,
            |inner| async move {
                inner.check_health().await;
            },
        ));
        if inner.has_discovery() {
            // The first resolution was just made above.
            let every = Duration::from_secs(inner.routing.discovery_interval_seconds);
            tasks.push(spawn_loop(&inner, every, every, |inner| async move {
                inner.refresh_discovery().await;
            }));
        }
        Ok(Self { inner, tasks })
    }

    /// Replaces the DNS resolver (tests simulate pods coming and going) and re-resolves now.
    pub async fn set_resolver(&self, resolver: Arc<dyn Resolver>) {
        *self.inner.resolver.write().expect("resolver lock poisoned") = resolver;
        self.inner.refresh_discovery().await;
    }

    /// Resolves every `discoverDns` name now rather than at the next interval.
    pub async fn refresh_discovery(&self) {
        self.inner.refresh_discovery().await;
    }

    /// Runs the active health checks now rather than at the next interval.
    pub async fn check_health(&self) {
        self.inner.check_health().await;
    }

    /// Starts a generation: picks an endpoint, fails over before the first token, falls back
    /// or refuses with 503 when nothing can take the turn.
    pub async fn start(&self, request: &GenerationRequest<'_>) -> Result<Generation, AppError> {
        let inner = &self.inner;
        inner
            .budget
            .lock()
            .expect("budget poisoned")
            .deposit(Instant::now());
        match inner.run(request, request.model, Route::Regular).await {
            Err(Refused(refusal)) => match &inner.fallback {
                Some(fallback) => {
                    inner.metrics.backend_fallbacks.inc();
                    let model = fallback.model.as_deref().unwrap_or(request.model);
                    tracing::warn!(
                        reason = %refusal,
                        fallback_backend = fallback.backend.as_deref(),
                        fallback_model = model,
                        "no regular endpoint can take the turn; using the fallback"
                    );
                    let route = Route::Fallback {
                        backend: fallback.backend.as_deref(),
                    };
                    match inner.run(request, model, route).await {
                        Ok(mut generation) => {
                            generation.fallback = true;
                            Ok(generation)
                        }
                        Err(Refused(error) | Failed(error)) => Err(error),
                    }
                }
                None => Err(refusal),
            },
            Err(Failed(error)) => Err(error),
            Ok(generation) => Ok(generation),
        }
    }

    /// Every endpoint's state, for `GET /v1/backends`.
    pub fn status(&self) -> PoolStatus {
        let now = Instant::now();
        let backends: Vec<EndpointStatus> = self
            .inner
            .endpoints()
            .iter()
            .map(|e| e.status(now))
            .collect();
        PoolStatus {
            ready: backends
                .iter()
                .filter(|b| b.healthy && b.breaker != BreakerState::Open)
                .count(),
            total: backends.len(),
            backends,
        }
    }

    /// Sets the per-endpoint gauges from the current state; called when `/metrics` is scraped,
    /// so the gauges are never stale and endpoints that are gone disappear.
    pub fn export_gauges(&self) {
        let inner = &self.inner;
        let metrics = &inner.metrics;
        let now = Instant::now();
        let mut current = HashSet::new();
        for endpoint in inner.endpoints() {
            let status = endpoint.status(now);
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
        let mut exported = inner.exported.lock().expect("exported poisoned");
        for gone in exported.difference(&current) {
            metrics.backend_up.remove(gone);
            metrics.backend_breaker_state.remove(gone);
            metrics.backend_in_flight.remove(gone);
            metrics.backend_queued.remove(gone);
        }
        *exported = current;
    }
}

/// How a routed attempt sequence ended without a generation.
enum RunError {
    /// Nothing could take the turn before any attempt: the fallback applies.
    Refused(AppError),
    /// Attempts were made and failed, or the request cannot be served at all.
    Failed(AppError),
}
use RunError::{Failed, Refused};

/// Runs `body` after `first`, then every `every`, while the pool lives.
fn spawn_loop<F, Fut>(
    inner: &Arc<PoolInner>,
    first: Duration,
    every: Duration,
    mut body: F,
) -> tokio::task::AbortHandle
where
    F: FnMut(Arc<PoolInner>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let weak: Weak<PoolInner> = Arc::downgrade(inner);
    let task = tokio::spawn(async move {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + first, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let Some(inner) = weak.upgrade() else { return };
            body(inner).await;
        }
    });
    task.abort_handle()
}

fn new_endpoint(group: &Group, routing: &RoutingConfig, name: String, url: String) -> Endpoint {
    let limit = routing.max_in_flight_per_backend as usize;
    Endpoint {
        name,
        backend: group.config.name.clone(),
        url,
        protocol: group.config.protocol,
        api_key: group.api_key.clone(),
        models: group.config.models.clone(),
        weight: group.config.weight.max(1),
        fallback: group.fallback,
        limit,
        permits: Arc::new(Semaphore::new(limit)),
        in_flight: AtomicUsize::new(0),
        queued: AtomicUsize::new(0),
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

impl PoolInner {
    fn endpoints(&self) -> Vec<Arc<Endpoint>> {
        self.groups
            .read()
            .expect("groups poisoned")
            .iter()
            .flat_map(|g| g.endpoints.iter().cloned())
            .collect()
    }

    fn has_discovery(&self) -> bool {
        self.groups
            .read()
            .expect("groups poisoned")
            .iter()
            .any(|g| g.discover.is_some())
    }

    /// Endpoints a route allows for a model.
    fn routable(&self, model: &str, route: Route<'_>) -> Vec<Arc<Endpoint>> {
        self.groups
            .read()
            .expect("groups poisoned")
            .iter()
            .filter(|g| match route {
                Route::Regular | Route::Fallback { backend: None } => !g.fallback,
                Route::Fallback {
                    backend: Some(name),
                } => g.config.name == name,
            })
            .flat_map(|g| g.endpoints.iter().filter(|e| e.serves(model)).cloned())
            .collect()
    }

    async fn refresh_discovery(&self) {
        let _one_at_a_time = self.refreshing.lock().await;
        let targets: Vec<(String, String, u16)> = self
            .groups
            .read()
            .expect("groups poisoned")
            .iter()
            .filter_map(|g| {
                g.discover
                    .as_ref()
                    .map(|(host, port)| (g.config.name.clone(), host.clone(), *port))
            })
            .collect();
        if targets.is_empty() {
            return;
        }
        let resolver = self
            .resolver
            .read()
            .expect("resolver lock poisoned")
            .clone();
        for (backend, host, port) in targets {
            let resolved = tokio::time::timeout(PROBE_TIMEOUT, resolver.resolve(&host, port)).await;
            let addresses = match resolved {
                Ok(Ok(addresses)) if !addresses.is_empty() => discovery::normalise(addresses),
                Ok(Ok(_)) => {
                    tracing::warn!(%backend, %host, "discoverDns resolved to no address; keeping the last endpoints");
                    continue;
                }
                Ok(Err(e)) => {
                    tracing::warn!(%backend, %host, error = %e, "discoverDns did not resolve; keeping the last endpoints");
                    continue;
                }
                Err(_) => {
                    tracing::warn!(%backend, %host, "discoverDns timed out; keeping the last endpoints");
                    continue;
                }
            };
            let mut groups = self.groups.write().expect("groups poisoned");
            let Some(group) = groups.iter_mut().find(|g| g.config.name == backend) else {
                continue;
            };
            let endpoints: Vec<Arc<Endpoint>> = addresses
                .into_iter()
                .map(|ip| {
                    let (name, url) = discovery::endpoint_for(&backend, &group.url, ip, port);
                    group
                        .endpoints
                        .iter()
                        .find(|e| e.name == name)
                        .cloned()
                        .unwrap_or_else(|| Arc::new(new_endpoint(group, &self.routing, name, url)))
                })
                .collect();
            let before: Vec<&str> = group.endpoints.iter().map(|e| e.name.as_str()).collect();
            let after: Vec<&str> = endpoints.iter().map(|e| e.name.as_str()).collect();
            if before != after {
                tracing::info!(%backend, ?before, ?after, "discovered endpoints changed");
            }
            group.endpoints = endpoints;
            drop(groups);
            let alive: HashSet<String> = self
                .endpoints()
                .into_iter()
                .map(|e| e.name.clone())
                .collect();
            self.wrr
                .lock()
                .expect("wrr poisoned")
                .retain(|name| alive.contains(name));
        }
    }

    async fn check_health(&self) {
        let endpoints = self.endpoints();
        let checks = endpoints.iter().map(|endpoint| async move {
            let path = protocol::health_path(endpoint.protocol);
            let mut request = self
                .client
                .get(format!("{}{path}", endpoint.url))
                .timeout(PROBE_TIMEOUT);
            if let Some(key) = &endpoint.api_key {
                request = request.bearer_auth(key);
            }
            let error = match request.send().await {
                Ok(response) if response.status().is_success() => None,
                Ok(response) => Some(format!("health check: status {}", response.status())),
                Err(e) => Some(format!("health check: {e}")),
            };
            let mut state = endpoint.state();
            if let Some(healthy) = state.health.record(error.is_none()) {
                tracing::warn!(endpoint = %endpoint.name, healthy, error = error.as_deref(), "endpoint health changed");
            }
            if error.is_some() {
                state.last_error = error;
            }
        });
        futures::future::join_all(checks).await;
    }

    /// Attempts on up to `maxAttempts` distinct endpoints of `route` for `model`.
    async fn run(
        &self,
        request: &GenerationRequest<'_>,
        model: &str,
        route: Route<'_>,
    ) -> Result<Generation, RunError> {
        let mut attempted: HashSet<String> = HashSet::new();
        let mut failures: Vec<String> = Vec::new();
        let mut timed_out = false;
        for attempt in 0..self.routing.max_attempts {
            let lease = match self
                .lease(model, route, request.session_id, &attempted)
                .await
            {
                Ok(lease) => lease,
                Err(refusal) if attempt == 0 => return Err(self.refusal(refusal, model)),
                // Nothing left to fail over to: report what failed.
                Err(_) => break,
            };
            if attempt > 0 {
                let allowed = self
                    .budget
                    .lock()
                    .expect("budget poisoned")
                    .try_withdraw(Instant::now());
                if !allowed {
                    self.metrics.backend_retry_budget_exhausted.inc();
                    tracing::warn!("retry budget exhausted; not failing over");
                    break;
                }
                self.metrics.backend_retries.inc();
            }
            let name = lease.endpoint.name.clone();
            attempted.insert(name.clone());
            match self.attempt(lease, model, request).await {
                Ok(generation) => return Ok(generation),
                Err(e) => {
                    tracing::warn!(endpoint = %name, error = %e, attempt, "back end failed before the first token");
                    timed_out |= matches!(e, BackendError::FirstTokenTimeout(_)) || e.is_timeout();
                    failures.push(format!("{name}: {e}"));
                    if !e.retryable() {
                        break;
                    }
                }
            }
        }
        let detail = failures.join("; ");
        Err(Failed(if timed_out {
            AppError::BackendTimeout(detail)
        } else {
            AppError::BackendUnavailable(detail)
        }))
    }

    fn refusal(&self, refusal: NoEndpoint, model: &str) -> RunError {
        match refusal {
            NoEndpoint::NotServed => Failed(AppError::BackendUnavailable(format!(
                "no back end serves model `{model}`"
            ))),
            NoEndpoint::AllOpen(reopens_in) => {
                self.shed("breakers_open");
                Refused(AppError::BackendCircuitOpen {
                    retry_after_seconds: reopens_in.as_secs_f64().ceil().max(1.0) as u64,
                })
            }
            NoEndpoint::Saturated(reason) => {
                self.shed(reason);
                Refused(AppError::BackendOverloaded {
                    detail: reason.replace('_', " "),
                    retry_after_seconds: 1,
                })
            }
        }
    }

    fn shed(&self, reason: &'static str) {
        self.metrics
            .backend_shed
            .get_or_create(&ShedLabels { reason })
            .inc();
    }

    /// One attempt: the request up to its first chunk, within `firstTokenTimeoutMs`.
    async fn attempt(
        &self,
        mut lease: Lease,
        model: &str,
        request: &GenerationRequest<'_>,
    ) -> Result<Generation, BackendError> {
        let first_token_timeout = Duration::from_millis(self.routing.first_token_timeout_ms);
        let total_timeout = Duration::from_millis(self.routing.total_timeout_ms);
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + total_timeout;
        let endpoint = lease.endpoint.clone();
        let target = Target {
            base_url: &endpoint.url,
            protocol: endpoint.protocol,
            api_key: endpoint.api_key.as_deref(),
        };
        let first = async {
            let mut stream = protocol::open(
                &self.client,
                &target,
                model,
                request,
                deadline,
                total_timeout,
            )
            .await?;
            match stream.next().await {
                Some(first) => Ok((first?, stream)),
                None => Err(BackendError::Truncated),
            }
        };
        let outcome = match tokio::time::timeout(first_token_timeout, first).await {
            Ok(result) => result,
            Err(_) => Err(BackendError::FirstTokenTimeout(first_token_timeout)),
        };
        match outcome {
            Ok((first, rest)) => {
                lease.succeeded();
                self.metrics
                    .time_to_first_token
                    .get_or_create(&BackendLabels {
                        backend: endpoint.name.clone(),
                    })
                    .observe(started.elapsed().as_secs_f64());
                Ok(Generation {
                    backend: endpoint.name.clone(),
                    model: model.to_string(),
                    fallback: false,
                    first,
                    rest: leased(rest, lease),
                })
            }
            Err(e) => {
                lease.failed(&e, false);
                Err(e)
            }
        }
    }

    /// Leases an endpoint: a permit below its in-flight limit, else a place in a queue.
    async fn lease(
        &self,
        model: &str,
        route: Route<'_>,
        session: Option<&str>,
        attempted: &HashSet<String>,
    ) -> Result<Lease, NoEndpoint> {
        for _ in 0..SELECTION_ROUNDS {
            let now = Instant::now();
            let fresh: Vec<Arc<Endpoint>> = self
                .routable(model, route)
                .into_iter()
                .filter(|e| !attempted.contains(&e.name))
                .collect();
            if fresh.is_empty() {
                return Err(NoEndpoint::NotServed);
            }
            let closed: Vec<Arc<Endpoint>> = fresh
                .iter()
                .filter(|e| e.state().breaker.available(now))
                .cloned()
                .collect();
            if closed.is_empty() {
                let reopens_in = fresh
                    .iter()
                    .map(|e| e.state().breaker.reopens_in(now))
                    .min()
                    .unwrap_or_default();
                return Err(NoEndpoint::AllOpen(reopens_in));
            }
            let healthy: Vec<Arc<Endpoint>> = closed
                .iter()
                .filter(|e| e.state().health.healthy())
                .cloned()
                .collect();
            // When every check fails, try the endpoints anyway: checks can be wrong, requests
            // and breakers decide.
            let pool = if healthy.is_empty() { closed } else { healthy };
            let candidates: Vec<Candidate<'_>> = pool
                .iter()
                .map(|e| Candidate {
                    name: &e.name,
                    weight: e.weight,
                    in_flight: e.in_flight.load(Ordering::SeqCst),
                    full: e.permits.available_permits() == 0,
                })
                .collect();
            if let Some(index) = self.choose(&candidates, session) {
                let endpoint = pool[index].clone();
                let Ok(permit) = endpoint.permits.clone().try_acquire_owned() else {
                    continue;
                };
                let Some(admission) = endpoint.state().breaker.admit(now) else {
                    continue;
                };
                return Ok(Lease::new(
                    endpoint,
                    permit,
                    admission,
                    self.metrics.clone(),
                ));
            }
            // Every candidate is at its limit: wait in the shortest queue (ties: the preferred).
            let order: Vec<usize> = match (self.routing.strategy, session) {
                (Strategy::SessionAffinity, Some(key)) => {
                    balance::rendezvous_order(key, &candidates)
                }
                _ => (0..pool.len()).collect(),
            };
            let endpoint = order
                .iter()
                .map(|&i| &pool[i])
                .min_by_key(|e| e.queued.load(Ordering::SeqCst))
                .cloned()
                .expect("candidates are not empty");
            let depth = self.routing.queue_depth as usize;
            if endpoint.queued.fetch_add(1, Ordering::SeqCst) >= depth {
                endpoint.queued.fetch_sub(1, Ordering::SeqCst);
                return Err(NoEndpoint::Saturated("queue_full"));
            }
            let wait = Duration::from_millis(self.routing.queue_timeout_ms);
            let permit = tokio::time::timeout(wait, endpoint.permits.clone().acquire_owned()).await;
            endpoint.queued.fetch_sub(1, Ordering::SeqCst);
            let permit = match permit {
                Ok(Ok(permit)) => permit,
                Ok(Err(_)) | Err(_) => return Err(NoEndpoint::Saturated("queue_timeout")),
            };
            let admission = endpoint.state().breaker.admit(Instant::now());
            if let Some(admission) = admission {
                return Ok(Lease::new(
                    endpoint,
                    permit,
                    admission,
                    self.metrics.clone(),
                ));
            }
        }
        Err(NoEndpoint::Saturated("contention"))
    }

    /// The strategy's pick among candidates below their limit; `None` when all are full.
    fn choose(&self, candidates: &[Candidate<'_>], session: Option<&str>) -> Option<usize> {
        if let (Strategy::SessionAffinity, Some(key)) = (self.routing.strategy, session) {
            let factor = f64::from(self.routing.affinity_load_factor_percent) / 100.0;
            return balance::bounded_load(key, candidates, factor);
        }
        let open: Vec<usize> = (0..candidates.len())
            .filter(|&i| !candidates[i].full)
            .collect();
        let subset: Vec<Candidate<'_>> = open.iter().map(|&i| candidates[i].clone()).collect();
        let pick = match self.routing.strategy {
            Strategy::RoundRobin => self.wrr.lock().expect("wrr poisoned").pick(&subset),
            Strategy::LeastInFlight | Strategy::SessionAffinity => {
                balance::power_of_two(&subset, &mut rand::rng())
            }
        };
        pick.map(|i| open[i])
    }
}

/// The rest of a generation, holding the endpoint's lease until it ends or is dropped, and
/// reporting a failure after the first token to the endpoint's breaker.
fn leased(rest: ChunkStream, mut lease: Lease) -> ChunkStream {
    Box::pin(async_stream::stream! {
        let mut rest = rest;
        while let Some(item) = rest.next().await {
            let last = match &item {
                Ok(Chunk::Token(_)) => false,
                Ok(Chunk::Done { .. }) => true,
                Err(e) => {
                    lease.failed(e, true);
                    true
                }
            };
            yield item;
            if last {
                break;
            }
        }
        drop(lease);
    })
}
