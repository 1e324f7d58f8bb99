//! What the chat service itself reports about its LLM back ends: `GET /v1/backends` on the chat
//! Service, read into the `BackendsReady` condition. The chat pods run active health checks and
//! circuit breakers against every back end, so their view is the one that matters; the operator
//! only asks once per reconcile, through the Service's cluster IP, with a short timeout.
//!
//! The stores are different: a chat pod that cannot reach MongoDB is not ready, so it is not
//! behind its Service. Their state is read from one chat pod directly (`GET /readyz` on its pod
//! IP), which answers with what it sees of Redis and MongoDB, ready or not.

use std::time::Duration;

use serde::Deserialize;

/// Path of the chat service's back-end status endpoint.
pub const BACKENDS_PATH: &str = "/v1/backends";
const TIMEOUT: Duration = Duration::from_secs(2);

/// The chat service's answer, or why there was none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendReport {
    /// `ready` of `total` back-end endpoints pass health checks with a closed circuit.
    Counts { ready: u32, total: u32 },
    /// The status endpoint could not be read (the operator runs outside the cluster network,
    /// the pods are restarting, ...). Nothing is concluded from this alone.
    Unreachable(String),
}

#[derive(Deserialize)]
struct Counts {
    ready: u32,
    total: u32,
}

/// Path of the chat service's readiness endpoint.
pub const READINESS_PATH: &str = "/readyz";

/// What one chat pod sees of its stores (`GET /readyz`, answered with 200 or 503).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreReport {
    Seen {
        /// The pod that answered.
        pod: String,
        redis: Result<(), String>,
        mongodb: Result<(), String>,
    },
    /// No chat pod could be asked, or none answered; nothing is concluded from this alone.
    Unreachable(String),
}

#[derive(Deserialize)]
struct Readiness {
    redis: bool,
    mongodb: bool,
    #[serde(default)]
    redis_error: Option<String>,
    #[serde(default)]
    mongodb_error: Option<String>,
}

fn store_state(ok: bool, error: Option<String>) -> Result<(), String> {
    match ok {
        true => Ok(()),
        false => Err(error.unwrap_or_else(|| "no answer".into())),
    }
}

/// Asks the chat pod `pod` at `base_url` (`http://<pod IP>:<port>`) what it sees of its stores.
pub async fn read_stores(client: &reqwest::Client, pod: &str, base_url: &str) -> StoreReport {
    let url = format!("{base_url}{READINESS_PATH}");
    let response = match client.get(&url).send().await {
        Ok(r) => r,
        Err(e) => return StoreReport::Unreachable(format!("pod {pod} at {url}: {e}")),
    };
    let status = response.status();
    match response.json::<Readiness>().await {
        Ok(r) => StoreReport::Seen {
            pod: pod.to_string(),
            redis: store_state(r.redis, r.redis_error),
            mongodb: store_state(r.mongodb, r.mongodb_error),
        },
        Err(e) => StoreReport::Unreachable(format!(
            "pod {pod} at {url}: HTTP {status}, unexpected answer: {e}"
        )),
    }
}

pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(TIMEOUT)
        .connect_timeout(TIMEOUT)
        .build()
        .expect("a plain HTTP client always builds")
}

/// The base URL of a chat Service (a whole Service object as JSON) as the API server reports it
/// (`http://<clusterIP>:<port>`), or `None` while it has no cluster IP.
pub fn service_url(service: &serde_json::Value) -> Option<String> {
    let spec = service.get("spec")?;
    let ip = spec.get("clusterIP")?.as_str()?;
    if ip.is_empty() || ip == "None" {
        return None;
    }
    let port = spec.get("ports")?.get(0)?.get("port")?.as_u64()?;
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    };
    Some(format!("http://{host}:{port}"))
}

/// Asks the chat service behind `base_url` for its back-end counts.
pub async fn read_backends(client: &reqwest::Client, base_url: &str) -> BackendReport {
    let url = format!("{base_url}{BACKENDS_PATH}");
    let response = match client.get(&url).send().await {
        Ok(r) => r,
        Err(e) => return BackendReport::Unreachable(format!("{url}: {e}")),
    };
    if !response.status().is_success() {
        return BackendReport::Unreachable(format!("{url}: HTTP {}", response.status()));
    }
    match response.json::<Counts>().await {
        Ok(c) => BackendReport::Counts {
            ready: c.ready,
            total: c.total,
        },
        Err(e) => BackendReport::Unreachable(format!("{url}: unexpected answer: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(spec: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "chat"}, "spec": spec,
        })
    }

    #[test]
    fn service_url_uses_the_cluster_ip_and_first_port() {
        let s = service(serde_json::json!({"clusterIP": "10.0.0.7", "ports": [{"port": 80}]}));
        assert_eq!(service_url(&s).as_deref(), Some("http://10.0.0.7:80"));
        let v6 = service(serde_json::json!({"clusterIP": "fd00::7", "ports": [{"port": 80}]}));
        assert_eq!(service_url(&v6).as_deref(), Some("http://[fd00::7]:80"));
        let headless = service(serde_json::json!({"clusterIP": "None", "ports": [{"port": 80}]}));
        assert_eq!(service_url(&headless), None);
        assert_eq!(service_url(&service(serde_json::json!({}))), None);
    }

    #[tokio::test]
    async fn a_closed_port_is_reported_unreachable_not_unhealthy() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let report = read_backends(&http_client(), &format!("http://127.0.0.1:{port}")).await;
        assert!(
            matches!(&report, BackendReport::Unreachable(why) if why.contains("/v1/backends")),
            "{report:?}"
        );
    }
}
