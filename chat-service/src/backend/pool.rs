//! The [`BackendPool`]: the path of one turn through the endpoints (lease, attempt, failover,
//! fallback), and the loops that keep the endpoints current (health checks, discovery).
//!
//! A turn asks for a model. The [`Selector`] proposes an endpoint among those the route allows;
//! the lease takes its permit, or a place in its queue (bounded by `queueDepth` and
//! `queueTimeoutMs`) when every candidate is at its limit. Failures before the first token are
//! retried on another endpoint while `maxAttempts` and the retry budget allow. When no endpoint
//! can take the turn (queues full, breakers open) it goes to `routing.fallback` if configured,
//! else it is refused with [`BackendError::Saturated`] or [`BackendError::CircuitOpen`], which
//! tell how long to wait.
//!
//! The request path reads the endpoint table's snapshot without a lock and chooses on the
//! endpoints' own state; the one lock every turn takes is the retry budget's, for a few
//! arithmetic operations.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::task::AbortHandle;

use super::budget::RetryBudget;
use super::discovery::{self, Discovery, Resolver, SystemResolver};
use super::endpoint::{Lease, QueuePolicy};
use super::error::{BackendError, EndpointError, PoolStartError, Saturation};
use super::generation::{Chunk, ChunkStream, Generation, GenerationRequest};
use super::health;
use super::protocol;
use super::rollout::{RolloutReport, Side, SideCounters, Split};
use super::selection::{NoEndpoint, Pick, Selector};
use super::status::{EndpointGauges, PoolStatus};
use super::table::{Backend, EndpointTable, Route};
use crate::config::{Config, FallbackConfig, RoutingConfig};
use crate::metrics::{Metrics, ShedLabels};

/// Re-selections after losing a race for a permit or a probe before giving up.
const SELECTION_ROUNDS: usize = 16;
/// How long a turn refused for saturation is told to wait.
const SATURATED_RETRY_AFTER: Duration = Duration::from_secs(1);

pub struct BackendPool {
    inner: Arc<PoolInner>,
    /// The health-check and discovery loops; they end with the pool.
    tasks: Vec<AbortHandle>,
}

struct PoolInner {
    client: reqwest::Client,
    routing: RoutingConfig,
    fallback: Option<FallbackConfig>,
    table: EndpointTable,
    selector: Selector,
    queue: QueuePolicy,
    budget: Mutex<RetryBudget>,
    discovery: Discovery,
    gauges: EndpointGauges,
    metrics: Arc<Metrics>,
    /// `rollout`: the split of new sessions between the current side and the candidate.
    split: Option<Split>,
}

impl Drop for BackendPool {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// How a routed attempt sequence ended without a generation.
enum RunError {
    /// Nothing could take the turn before any attempt: the fallback applies.
    Refused(BackendError),
    /// Attempts were made and failed, or the request cannot be served at all.
    Failed(BackendError),
}
use RunError::{Failed, Refused};

impl BackendPool {
    /// Builds the endpoints (resolving `discoverDns` names once) and starts the health-check
    /// and discovery loops, which end with the pool. `api_keys` holds, per back end in order,
    /// the key read from its `apiKeyEnv`.
    pub async fn new(
        config: &Config,
        api_keys: Vec<Option<String>>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, PoolStartError> {
        Self::with_resolver(config, api_keys, metrics, Arc::new(SystemResolver)).await
    }

    pub async fn with_resolver(
        config: &Config,
        api_keys: Vec<Option<String>>,
        metrics: Arc<Metrics>,
        resolver: Arc<dyn Resolver>,
    ) -> Result<Self, PoolStartError> {
        let routing = config.routing.clone();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(routing.connect_timeout_ms))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()?;
        let table = EndpointTable::new(configured_backends(config, api_keys), &routing);
        let inner = Arc::new(PoolInner {
            client,
            fallback: routing.fallback.clone(),
            table,
            selector: Selector::new(&routing),
            queue: QueuePolicy::new(&routing),
            budget: Mutex::new(RetryBudget::new(
                routing.retry_budget_percent,
                routing.retry_budget_min_per_second,
                Instant::now(),
            )),
            discovery: Discovery::new(resolver),
            gauges: EndpointGauges::default(),
            metrics,
            split: config
                .rollout
                .clone()
                .map(|rollout| Split::new(rollout, config.models.default.clone())),
            routing,
        });
        inner.refresh_discovery().await;
        let tasks = inner.start_loops();
        Ok(Self { inner, tasks })
    }

    /// Replaces the DNS resolver (tests simulate pods coming and going) and re-resolves now.
    pub async fn set_resolver(&self, resolver: Arc<dyn Resolver>) {
        self.inner.discovery.set_resolver(resolver);
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
    /// or refuses when nothing can take the turn.
    ///
    /// During a rollout the turn goes to its session's side of the split (stateless requests
    /// are split by request id); only when that side cannot serve it does it try the other,
    /// so that the turn is not lost, and the failure counts against its own side.
    pub async fn start(&self, request: &GenerationRequest<'_>) -> Result<Generation, BackendError> {
        let inner = &self.inner;
        inner
            .budget
            .lock()
            .expect("budget poisoned")
            .deposit(Instant::now());
        let key = request.session_id.unwrap_or(request.request_id);
        let split = inner.split.as_ref();
        let Some((split, side)) = split.and_then(|s| s.side(key, request.model).map(|d| (s, d)))
        else {
            return inner.serve(request, request.model, Route::Regular).await;
        };
        let started = Instant::now();
        let error = match inner.serve_side(split, side, request).await {
            Ok(generation) => return Ok(counted(generation, split, side, started)),
            Err(error) => error,
        };
        split.counters(side).failed();
        let other = side.other();
        if other == Side::Candidate && split.config.candidate_weight_percent == 0 {
            // Rolled back (or not started): the candidate takes no turn, not even a failed one.
            return Err(error);
        }
        tracing::warn!(?side, %error, "this session's side of the rollout failed; trying the other");
        match inner.serve_side(split, other, request).await {
            Ok(generation) => Ok(counted(generation, split, other, started)),
            Err(_) => {
                split.counters(other).failed();
                Err(error)
            }
        }
    }

    /// Every endpoint's state, for `GET /v1/backends`.
    pub fn status(&self) -> PoolStatus {
        let mut status = PoolStatus::of(&self.inner.table.all(), Instant::now());
        status.rollout = self.rollout();
        status
    }

    /// The rollout's split and what each side served since this process started.
    pub fn rollout(&self) -> Option<RolloutReport> {
        self.inner.split.as_ref().map(Split::report)
    }

    /// Sets the per-endpoint gauges from the current state; called when `/metrics` is scraped,
    /// so the gauges are never stale and endpoints that are gone disappear.
    pub fn export_gauges(&self) {
        let inner = &self.inner;
        inner
            .gauges
            .export(&inner.table.all(), &inner.metrics, Instant::now());
    }
}

/// The configured back ends with their keys, fallback reservation and discovery target.
fn configured_backends(config: &Config, api_keys: Vec<Option<String>>) -> Vec<Backend> {
    let fallback_backend = config
        .routing
        .fallback
        .as_ref()
        .and_then(|f| f.backend.as_deref());
    let candidate_backend = config
        .rollout
        .as_ref()
        .and_then(|r| r.candidate_backend.as_deref());
    config
        .backends
        .iter()
        .zip(api_keys)
        .map(|(backend, api_key)| {
            let url = reqwest::Url::parse(backend.url.trim_end_matches('/'))
                .unwrap_or_else(|_| reqwest::Url::parse("http://invalid.invalid").unwrap());
            let discover = backend
                .discover_dns
                .as_deref()
                .map(|dns| discovery::target(dns, &url));
            Backend {
                config: backend.clone(),
                api_key,
                url,
                fallback: fallback_backend == Some(backend.name.as_str()),
                candidate: candidate_backend == Some(backend.name.as_str()),
                discover,
            }
        })
        .collect()
}

impl PoolInner {
    fn start_loops(self: &Arc<Self>) -> Vec<AbortHandle> {
        let mut tasks = Vec::new();
        let health_every = Duration::from_secs(self.routing.health_check_interval_seconds);
        tasks.push(spawn_loop(
            self,
            Duration::ZERO,
            health_every,
            |inner| async move {
                inner.check_health().await;
            },
        ));
        if self.table.backends().iter().any(|b| b.discover.is_some()) {
            // The first resolution was made at start-up.
            let every = Duration::from_secs(self.routing.discovery_interval_seconds);
            tasks.push(spawn_loop(self, every, every, |inner| async move {
                inner.refresh_discovery().await;
            }));
        }
        tasks
    }

    async fn refresh_discovery(&self) {
        self.discovery.refresh(&self.table, &self.routing).await;
    }

    async fn check_health(&self) {
        let endpoints = self.table.all();
        let checks = endpoints.iter().map(|endpoint| async move {
            let error = health::check(&self.client, &endpoint.target()).await;
            endpoint.record_health_check(error);
        });
        futures::future::join_all(checks).await;
    }

    /// The turn on `route` for `model`, or on `routing.fallback` when nothing could take it.
    async fn serve(
        &self,
        request: &GenerationRequest<'_>,
        model: &str,
        route: Route<'_>,
    ) -> Result<Generation, BackendError> {
        match self.run(request, model, route).await {
            Ok(generation) => Ok(generation),
            Err(Failed(error)) => Err(error),
            Err(Refused(refusal)) => self.fall_back(request, refusal).await,
        }
    }

    /// The turn on one side of the rollout's split.
    async fn serve_side(
        &self,
        split: &Split,
        side: Side,
        request: &GenerationRequest<'_>,
    ) -> Result<Generation, BackendError> {
        let route = match (side, &split.config.candidate_backend) {
            (Side::Candidate, Some(_)) => Route::Candidate,
            _ => Route::Regular,
        };
        self.serve(request, split.model(side, request.model), route)
            .await
    }

    /// The turn on `routing.fallback`, when the regular endpoints refused it.
    async fn fall_back(
        &self,
        request: &GenerationRequest<'_>,
        refusal: BackendError,
    ) -> Result<Generation, BackendError> {
        let Some(fallback) = &self.fallback else {
            return Err(refusal);
        };
        self.metrics.backend_fallbacks.inc();
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
        match self.run(request, model, route).await {
            Ok(mut generation) => {
                generation.fallback = true;
                Ok(generation)
            }
            Err(Refused(error) | Failed(error)) => Err(error),
        }
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
            if attempt > 0 && !self.may_retry() {
                break;
            }
            // Read only by the next lease, so written only when there will be one: a turn that
            // succeeds at once allocates nothing for failover.
            let endpoint = lease.endpoint().clone();
            match self.attempt(lease, model, request).await {
                Ok(generation) => return Ok(generation),
                Err(e) => {
                    let name = endpoint.name.clone();
                    attempted.insert(name.clone());
                    tracing::warn!(endpoint = %name, error = %e, attempt, "back end failed before the first token");
                    timed_out |= e.is_timeout();
                    failures.push(format!("{name}: {e}"));
                    if !e.retryable() {
                        break;
                    }
                }
            }
        }
        let detail = failures.join("; ");
        Err(Failed(if timed_out {
            BackendError::Timeout(detail)
        } else {
            BackendError::Unavailable(detail)
        }))
    }

    /// Takes a retry from the budget, counting the outcome.
    fn may_retry(&self) -> bool {
        let allowed = self
            .budget
            .lock()
            .expect("budget poisoned")
            .try_withdraw(Instant::now());
        if allowed {
            self.metrics.backend_retries.inc();
        } else {
            self.metrics.backend_retry_budget_exhausted.inc();
            tracing::warn!("retry budget exhausted; not failing over");
        }
        allowed
    }

    fn refusal(&self, refusal: NoEndpoint, model: &str) -> RunError {
        match refusal {
            NoEndpoint::NotServed => Failed(BackendError::Unavailable(format!(
                "no back end serves model `{model}`"
            ))),
            NoEndpoint::AllOpen(reopens_in) => {
                self.shed("breakers_open");
                Refused(BackendError::CircuitOpen {
                    retry_after: reopens_in,
                })
            }
            NoEndpoint::Saturated(reason) => {
                self.shed(reason.label());
                Refused(BackendError::Saturated {
                    reason,
                    retry_after: SATURATED_RETRY_AFTER,
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

    /// Leases an endpoint for one attempt: the selector's pick, leased at once when it is below
    /// its limit, else after waiting in its queue. Chooses again when another request took the
    /// permit or the half-open probe first.
    async fn lease(
        &self,
        model: &str,
        route: Route<'_>,
        session: Option<&str>,
        attempted: &HashSet<String>,
    ) -> Result<Lease, NoEndpoint> {
        for _ in 0..SELECTION_ROUNDS {
            let now = Instant::now();
            let endpoints = self.table.routable(model, route, attempted);
            let leased = match self.selector.pick(endpoints, session, now)? {
                Pick::Free(endpoint) => endpoint.try_lease(now, &self.metrics),
                Pick::Queue(endpoint) => endpoint
                    .wait_for_lease(self.queue, &self.metrics)
                    .await
                    .map_err(NoEndpoint::Saturated)?,
            };
            if let Some(lease) = leased {
                return Ok(lease);
            }
        }
        Err(NoEndpoint::Saturated(Saturation::Contention))
    }

    /// One attempt: the request up to its first chunk, within `firstTokenTimeoutMs` when it
    /// streams, else within `totalTimeoutMs`.
    async fn attempt(
        &self,
        mut lease: Lease,
        model: &str,
        request: &GenerationRequest<'_>,
    ) -> Result<Generation, EndpointError> {
        let first_token_timeout = Duration::from_millis(self.routing.first_token_timeout_ms);
        let total_timeout = Duration::from_millis(self.routing.total_timeout_ms);
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + total_timeout;
        let endpoint = lease.endpoint().clone();
        let target = endpoint.target();
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
                None => Err(EndpointError::Truncated),
            }
        };
        // A whole (non-streamed) answer has no first token before its last: its attempt is
        // bounded by the total timeout only, so a back end that hangs is failed over after
        // `totalTimeoutMs`, not `firstTokenTimeoutMs`. Turns that stream keep the first-token
        // timeout (see `GenerationRequest::stream`).
        let (limit, timed_out): (Duration, fn(Duration) -> EndpointError) = if request.stream {
            (first_token_timeout, EndpointError::FirstTokenTimeout)
        } else {
            (total_timeout, EndpointError::TotalTimeout)
        };
        let outcome = match tokio::time::timeout(limit, first).await {
            Ok(result) => result,
            Err(_) => Err(timed_out(limit)),
        };
        match outcome {
            Ok((first, rest)) => {
                lease.succeeded();
                endpoint
                    .time_to_first_token(&self.metrics)
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
}

/// The rest of a generation, holding the endpoint's lease until it ends or is dropped, and
/// reporting a failure after the first token to the endpoint's breaker.
fn leased(rest: ChunkStream, mut lease: Lease) -> ChunkStream {
    Box::pin(async_stream::stream! {
        let mut rest = rest;
        while let Some(item) = rest.next().await {
            let last = match &item {
                Ok(Chunk::Token(_) | Chunk::ToolCalls(_)) => false,
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

/// Counts a generation of `side` that started at `started`: its first token now, then its end
/// (tokens and time) or its failure mid-answer. A generation dropped before its end (the
/// client left) counts no turn.
fn counted(mut generation: Generation, split: &Split, side: Side, started: Instant) -> Generation {
    let counters: Arc<SideCounters> = split.counters(side).clone();
    counters.first_token(started.elapsed());
    if let Chunk::Done { usage, .. } = &generation.first {
        counters.finished(u64::from(usage.completion_tokens), started.elapsed());
        return generation;
    }
    let rest = std::mem::replace(&mut generation.rest, Box::pin(futures::stream::empty()));
    generation.rest = Box::pin(async_stream::stream! {
        let mut rest = rest;
        while let Some(item) = rest.next().await {
            match &item {
                Ok(Chunk::Done { usage, .. }) => {
                    counters.finished(u64::from(usage.completion_tokens), started.elapsed());
                }
                Err(_) => counters.failed(),
                Ok(Chunk::Token(_) | Chunk::ToolCalls(_)) => {}
            }
            yield item;
        }
    });
    generation
}

/// Runs `body` after `first`, then every `every`, while the pool lives.
fn spawn_loop<F, Fut>(
    inner: &Arc<PoolInner>,
    first: Duration,
    every: Duration,
    mut body: F,
) -> AbortHandle
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
