//! Whether the API server serves the custom metrics API that `autoscaling.inFlightRequestsPerPod`
//! needs. Kubernetes does not serve `custom.metrics.k8s.io` by itself: a metrics adapter (e.g.
//! prometheus-adapter) registers it as an APIService. Without one, the HPA only records
//! `FailedGetPodsMetric` events and never scales down; the ChatService says so in `Degraded`
//! instead (reason `MetricsUnavailable`).
//!
//! The answer is one discovery GET, which every authenticated client may send (the
//! `system:discovery` ClusterRole), kept for a minute so that converged reconciles stay free of
//! requests while an adapter is installed.

use std::time::{Duration, Instant};

use kube::Client;

/// The group version the HPA reads per-pod custom metrics from.
pub const CUSTOM_METRICS_GROUP_VERSION: &str = "custom.metrics.k8s.io/v1beta1";
/// The APIService a metrics adapter registers for it.
pub const CUSTOM_METRICS_API_SERVICE: &str = "v1beta1.custom.metrics.k8s.io";

/// How long one discovery answer is trusted.
const RECHECK: Duration = Duration::from_secs(60);

/// The last discovery answer: when it came, and the problem it showed (`None`: served).
#[derive(Default)]
pub struct CustomMetricsCheck {
    last: tokio::sync::Mutex<Option<(Instant, Option<String>)>>,
}

impl CustomMetricsCheck {
    /// Why the custom metrics API cannot be used, or `None` when it is served (or the API server
    /// could not be asked: then nothing is claimed).
    pub async fn problem(&self, client: &Client) -> Option<String> {
        let mut last = self.last.lock().await;
        if let Some((at, problem)) = last.as_ref()
            && at.elapsed() < RECHECK
        {
            return problem.clone();
        }
        let problem = match discover(client).await {
            Ok(problem) => problem,
            Err(error) => {
                tracing::warn!(%error, "could not ask the API server whether it serves {CUSTOM_METRICS_GROUP_VERSION}");
                return None;
            }
        };
        *last = Some((Instant::now(), problem.clone()));
        problem
    }
}

/// `GET /apis/custom.metrics.k8s.io/v1beta1`: 200 when an adapter serves it, 404 when no
/// APIService is registered, 503 when one is registered but its adapter does not answer.
async fn discover(client: &Client) -> Result<Option<String>, kube::Error> {
    let request = http::Request::get(format!("/apis/{CUSTOM_METRICS_GROUP_VERSION}"))
        .body(Vec::new())
        .map_err(kube::Error::HttpError)?;
    match client.request_text(request).await {
        Ok(_) => Ok(None),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            Ok(Some(missing_message("no APIService is registered for it")))
        }
        Err(kube::Error::Api(e)) if e.code == 503 => Ok(Some(missing_message(&format!(
            "APIService {CUSTOM_METRICS_API_SERVICE} is registered but unavailable ({})",
            e.message
        )))),
        Err(other) => Err(other),
    }
}

fn missing_message(why: &str) -> String {
    format!(
        "autoscaling.inFlightRequestsPerPod needs the custom metrics API, but the API server does not serve {CUSTOM_METRICS_GROUP_VERSION}: {why}. Install a metrics adapter that registers APIService {CUSTOM_METRICS_API_SERVICE} (e.g. prometheus-adapter, see examples/autoscaling.yaml); until then the HPA scales on its CPU and memory targets only (if any) and never scales down."
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_the_field_and_the_api_service() {
        let message = missing_message("no APIService is registered for it");
        assert!(message.starts_with("autoscaling.inFlightRequestsPerPod"));
        assert!(message.contains("APIService v1beta1.custom.metrics.k8s.io"));
        assert!(message.contains("custom.metrics.k8s.io/v1beta1"));
    }
}
