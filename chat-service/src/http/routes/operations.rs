//! Probes, metrics, the model list and the API description.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

use crate::http::ApiDoc;
use crate::state::SharedState;

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelEntry>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelEntry {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// How the service counts this model's prompt tokens for the context budget: `tokenizer`
    /// (its own, from `context.tokenizers`) or `estimate` (about 4 bytes per token).
    pub token_counting: crate::tokens::TokenCounting,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    pub status: &'static str,
    pub mongodb: bool,
    pub redis: bool,
    /// Why MongoDB is unreachable (the driver's error: refused, TLS verification, auth), so
    /// that the operator can name the store and the cause in its conditions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mongodb_error: Option<String>,
    /// Why Redis is unreachable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_error: Option<String>,
    pub backends: Vec<BackendReadiness>,
    /// Conditions that do not make the service unready but degrade it.
    pub degraded: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BackendReadiness {
    pub name: String,
    pub healthy: bool,
}

#[utoipa::path(
    get,
    path = "/v1/models",
    responses(
        (status = 200, body = ModelList),
        (status = 401, description = "Missing or unknown API key (when auth is enabled)", body = crate::http::ErrorBody),
        (status = 429, description = "Rate limit exceeded; see Retry-After", body = crate::http::ErrorBody),
        (status = 503, description = "Overloaded; see Retry-After", body = crate::http::ErrorBody),
    )
)]
pub async fn list_models(State(state): State<SharedState>) -> axum::Json<ModelList> {
    axum::Json(ModelList {
        object: "list",
        data: state
            .allowed_models
            .iter()
            .map(|id| ModelEntry {
                id: id.clone(),
                object: "model",
                created: 0,
                owned_by: "chat-service",
                token_counting: state.tokens.counting(id),
            })
            .collect(),
    })
}

#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "The process is alive")))]
pub async fn healthz() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

#[utoipa::path(
    get,
    path = "/readyz",
    responses(
        (status = 200, description = "MongoDB reachable and at least one back end healthy", body = Readiness),
        (status = 503, description = "Not ready", body = Readiness),
    )
)]
pub async fn readyz(State(state): State<SharedState>) -> Response {
    // Back-end health comes from the pool's active checks and breakers, not from probing the
    // back ends on every readiness check.
    let stores = state.history.health().await;
    let pool = state.backends.status();
    let backends: Vec<(String, bool)> = pool
        .backends
        .iter()
        .map(|b| {
            let ready = b.healthy && b.breaker != crate::backend::BreakerState::Open;
            (b.name.clone(), ready)
        })
        .collect();
    let mut degraded = Vec::new();
    if !stores.redis {
        let reason = stores.redis_error.as_deref().unwrap_or("no answer");
        degraded.push(format!(
            "redis unreachable ({reason}): history is served from mongodb"
        ));
    }
    for (name, healthy) in &backends {
        if !healthy {
            degraded.push(format!("back end `{name}` unhealthy"));
        }
    }
    // Readiness is about this pod: without MongoDB no turn can be stored. Back ends are shared
    // by every replica, so failing readiness on them would take all pods out of the Service at
    // once and turn clear 503 answers (with Retry-After) into refused connections; their state
    // is reported in `degraded`, on /v1/backends and in the operator's BackendsReady instead.
    let ready = stores.mongodb;
    let body = Readiness {
        status: if ready { "ready" } else { "not_ready" },
        mongodb: stores.mongodb,
        redis: stores.redis,
        mongodb_error: stores.mongodb_error,
        redis_error: stores.redis_error,
        backends: backends
            .into_iter()
            .map(|(name, healthy)| BackendReadiness { name, healthy })
            .collect(),
        degraded,
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text exposition")))]
pub async fn metrics(State(state): State<SharedState>) -> Response {
    state.backends.export_gauges();
    // Read from the admission semaphore at scrape time, so the gauge cannot drift from the
    // permits really held.
    let in_flight = state
        .config
        .limits
        .max_concurrent_requests
        .saturating_sub(state.admission.available_permits());
    state
        .metrics
        .requests_in_flight
        .set(i64::try_from(in_flight).unwrap_or(i64::MAX));
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

/// Every LLM endpoint with its health, breaker, load and last error. Unauthenticated like
/// `/readyz` and `/metrics`; the shape is the contract documented in [`crate::backend`].
#[utoipa::path(
    get,
    path = "/v1/backends",
    responses((status = 200, description = "Endpoints and their state", body = crate::backend::PoolStatus))
)]
pub async fn backends(State(state): State<SharedState>) -> axum::Json<crate::backend::PoolStatus> {
    axum::Json(state.backends.status())
}

/// The document of [`ApiDoc`], with this deployment's allow-list as the values of every `model`
/// field, so that clients and generated tests know which models are valid here.
pub async fn openapi_json(
    State(state): State<SharedState>,
) -> axum::Json<utoipa::openapi::OpenApi> {
    let mut doc = ApiDoc::openapi();
    list_allowed_models(&mut doc, &state.allowed_models);
    axum::Json(doc)
}

fn list_allowed_models(doc: &mut utoipa::openapi::OpenApi, models: &[String]) {
    use utoipa::openapi::{RefOr, Schema};
    let Some(components) = doc.components.as_mut() else {
        return;
    };
    for request in ["ChatRequest", "CompletionRequest"] {
        if let Some(RefOr::T(Schema::Object(object))) = components.schemas.get_mut(request)
            && let Some(RefOr::T(Schema::Object(model))) = object.properties.get_mut("model")
        {
            model.enum_values = Some(models.iter().map(|m| serde_json::json!(m)).collect());
        }
    }
}

/// A self-contained page listing the operations of the OpenAPI document (no external assets, so
/// it works in air-gapped clusters).
pub async fn docs_page() -> Html<String> {
    let doc = ApiDoc::openapi();
    let mut rows = String::new();
    for (path, item) in &doc.paths.paths {
        let operations = [
            ("GET", &item.get),
            ("POST", &item.post),
            ("PUT", &item.put),
            ("DELETE", &item.delete),
        ];
        for (method, operation) in operations {
            if let Some(operation) = operation {
                let summary = operation
                    .summary
                    .clone()
                    .or_else(|| operation.description.clone())
                    .unwrap_or_default();
                rows.push_str(&format!(
                    "<tr><td><code>{method}</code></td><td><code>{}</code></td><td>{}</td></tr>\n",
                    escape(path),
                    escape(&summary)
                ));
            }
        }
    }
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title} API</title></head><body>\
         <h1>{title} {version}</h1><p>{description}</p>\
         <p>Machine-readable: <a href=\"/openapi.json\">/openapi.json</a></p>\
         <table border=\"1\" cellpadding=\"4\"><tr><th>Method</th><th>Path</th><th>Summary</th></tr>\n{rows}</table></body></html>",
        title = escape(&doc.info.title),
        version = escape(&doc.info.version),
        description = escape(doc.info.description.as_deref().unwrap_or_default()),
    ))
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
