//! Prometheus metrics of the reconciler and the small HTTP server for `/metrics` and `/healthz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchEventLabels {
    /// The watch: `ChatService`, a child kind, `Pod` or `Secret` (the user's).
    pub source: String,
    /// `trigger` (a reconcile was asked for) or `unchanged` (nothing the operator reads changed).
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The HTTP method (a server-side apply is a `PATCH`), or `WATCH` for a watch.
    pub method: String,
}

/// The operator's own requests to the API server, counted on its client. kube-apiserver's
/// `apiserver_request_total` cannot tell clients apart, and kube-controller-manager writes too
/// (Events about pods that never start, workload status), so this is how one proves that a
/// resync of converged ChatServices writes nothing.
#[derive(Clone, Debug, Default)]
pub struct ApiRequests(Family<RequestLabels, Counter>);

impl ApiRequests {
    /// A client for `config` whose every request is counted here.
    pub fn client(&self, config: kube::Config) -> kube::Result<kube::Client> {
        self.limited_client(config, 0)
    }

    /// A client for `config` whose every request is counted here, with at most
    /// `max_in_flight` requests other than watches in flight at once (0: no cap; see
    /// [`crate::in_flight`]).
    pub fn limited_client(
        &self,
        config: kube::Config,
        max_in_flight: usize,
    ) -> kube::Result<kube::Client> {
        let family = self.0.clone();
        let count =
            tower::util::MapRequestLayer::new(move |request: http::Request<kube::client::Body>| {
                let watch = request
                    .uri()
                    .query()
                    .is_some_and(|q| q.split('&').any(|p| p == "watch=true"));
                let method = if watch {
                    "WATCH".to_string()
                } else {
                    request.method().to_string()
                };
                family.get_or_create(&RequestLabels { method }).inc();
                request
            });
        Ok(kube::client::ClientBuilder::try_from(config)?
            .with_layer(&count)
            .with_layer(&crate::in_flight::LimitInFlightLayer::new(max_in_flight))
            .build())
    }
}

/// Reconcile counters and timings, shared by all reconciles.
pub struct Metrics {
    registry: Registry,
    pub reconciles: Counter,
    pub failures: Family<FailureLabels, Counter>,
    pub duration: Histogram,
    /// ChatService status writes (each one a changed status).
    pub status_writes: Counter,
    /// Children applied or deleted (each one a difference from the cache).
    pub child_writes: Counter,
    watch_events: Family<WatchEventLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(ApiRequests::default())
    }
}

impl Metrics {
    /// Metrics that include `api_requests` (counted by the client [`ApiRequests::client`] made).
    pub fn new(api_requests: ApiRequests) -> Self {
        let mut registry = Registry::with_prefix("chatoperator");
        let reconciles = Counter::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let duration = Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]);
        registry.register("reconciles", "Reconciles started", reconciles.clone());
        registry.register(
            "reconcile_failures",
            "Reconciles that failed, by error label",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            duration.clone(),
        );
        let status_writes = Counter::default();
        registry.register(
            "status_writes",
            "ChatService status writes (the status had changed)",
            status_writes.clone(),
        );
        let child_writes = Counter::default();
        registry.register(
            "child_writes",
            "Children applied or pruned (they differed from the cache)",
            child_writes.clone(),
        );
        let watch_events = Family::<WatchEventLabels, Counter>::default();
        registry.register(
            "watch_events",
            "Watch events by source, and whether they triggered a reconcile",
            watch_events.clone(),
        );
        registry.register(
            "api_requests",
            "Requests the operator sent to the API server, by method (WATCH for watches)",
            api_requests.0,
        );
        Self {
            registry,
            reconciles,
            failures,
            duration,
            status_writes,
            child_writes,
            watch_events,
        }
    }

    /// The counter of watch events from `source` with `outcome`.
    pub fn watch_event(&self, source: &str, outcome: &str) -> Counter {
        self.watch_events
            .get_or_create(&WatchEventLabels {
                source: source.into(),
                outcome: outcome.into(),
            })
            .clone()
    }
}

impl Metrics {
    pub fn observe(&self, elapsed: Duration, failure: Option<&'static str>) {
        self.duration.observe(elapsed.as_secs_f64());
        if let Some(reason) = failure {
            self.failures
                .get_or_create(&FailureLabels {
                    reason: reason.into(),
                })
                .inc();
        }
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

async fn metrics_text(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.encode(),
    )
}

pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { (StatusCode::OK, "ok") }))
        .with_state(metrics)
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    address: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    tracing::info!(%address, "serving /metrics and /healthz");
    axum::serve(listener, router(metrics))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_counted_by_label() {
        let metrics = Metrics::default();
        metrics.reconciles.inc();
        metrics.observe(Duration::from_millis(20), Some("kube"));
        let text = metrics.encode();
        assert!(text.contains("chatoperator_reconciles_total 1"), "{text}");
        assert!(
            text.contains("chatoperator_reconcile_failures_total{reason=\"kube\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("chatoperator_reconcile_duration_seconds_count 1"),
            "{text}"
        );
    }
}
