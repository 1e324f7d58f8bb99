//! What the back-end pool tests share: configs with the rig's stores, the service's own view of
//! its back ends (`/v1/backends`, metrics), and one-turn requests.

use std::time::Duration;

use chat_rig::stream::{join_tokens, parse_sse};
use chat_service::config::{BackendConfig, Config};
use serde_json::Value;

use super::{TestService, metric_value, rig, start, test_config};

pub fn backend(name: &str, url: &str) -> BackendConfig {
    BackendConfig::ollama(name, url)
}

/// The rig's stores with these back ends; active health checks only at start-up, so that
/// breakers and requests alone decide unless a test says otherwise.
pub fn config_with(backends: Vec<BackendConfig>) -> Config {
    let mut config = test_config(rig());
    config.backends = backends;
    config.routing.health_check_interval_seconds = 3600;
    config
}

pub async fn serve(config: Config) -> TestService {
    let rig = rig();
    start(config, rig.redis_url(), rig.mongodb_url()).await
}

pub async fn backends_status(service: &TestService) -> Value {
    let (status, body) = service.get_json("/v1/backends").await;
    assert_eq!(status, 200, "{body}");
    body
}

pub fn endpoint<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("no endpoint {name} in {status}"))
}

pub async fn successes(service: &TestService, backend: &str, endpoint: &str) -> f64 {
    metric_value(
        &service.metrics_text().await,
        &format!(
            r#"chat_backend_requests_total{{backend="{backend}",endpoint="{endpoint}",outcome="success"}}"#
        ),
    )
}

pub async fn chat(service: &TestService, body: Value) -> (u16, reqwest::header::HeaderMap, Value) {
    service.post_json("/v1/chat", &body).await
}

/// Polls `/v1/backends` until `check` holds for the endpoint.
pub async fn wait_for_endpoint(
    service: &TestService,
    name: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    chat_rig::eventually(what, Duration::from_secs(60), || async {
        let status = backends_status(service).await;
        let endpoint = endpoint(&status, name).clone();
        check(&endpoint).then_some(endpoint)
    })
    .await
}

/// One streamed turn: (status, token text, name of the last event, its data).
pub async fn chat_streamed(service: &TestService, body: Value) -> (u16, String, String, String) {
    let response = service
        .http
        .post(service.url("/v1/chat"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    if status != 200 {
        return (status, String::new(), "http".into(), text);
    }
    let events = parse_sse(&text);
    let last = events.last().cloned().unwrap_or_default();
    (status, join_tokens(&events), last.name, last.data)
}
