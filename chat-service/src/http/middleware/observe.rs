//! Timing and metrics of every request, the access log (`accessLog`, off by default: a line per
//! request is a formatted write per request), and the one place where failed requests are
//! logged: [`AppError`](crate::http::AppError) responses carry their internal detail in an
//! [`ErrorReport`] extension, which is logged here and removed before the response leaves.
//!
//! No label takes client text as it came: the route is the matched template (`unmatched`
//! otherwise) and the method one of a fixed set (`other` otherwise), so made-up methods and paths
//! cannot grow `/metrics` or the memory behind it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

use super::request_id::RequestId;
use crate::http::error::ErrorReport;
use crate::metrics::{RequestLabels, RouteLabels};
use crate::state::SharedState;

pub const PROCESS_TIME_HEADER: &str = "x-process-time";

/// The method as a metric label: the standard methods by name, anything else `other`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

pub async fn observe(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let request_id = request
        .extensions()
        .get::<RequestId>()
        .map(|id| id.0.clone())
        .unwrap_or_default();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = method_label(request.method());
    // Plain `&str`s, not `%` (Display): the span's fields are written when it is created, for
    // every request, and a `&str` is written as it is, without the formatting machinery.
    let span = tracing::info_span!(
        "request",
        request_id = request_id.as_str(),
        method,
        route = route.as_str()
    );

    let mut response = next.run(request).instrument(span.clone()).await;

    let elapsed = started.elapsed();
    if let Some(report) = response.extensions_mut().remove::<ErrorReport>() {
        span.in_scope(
            || tracing::warn!(code = report.code, detail = %report.detail, "request failed"),
        );
    }
    if let Ok(value) = HeaderValue::from_str(&format!("{:.6}", elapsed.as_secs_f64())) {
        response.headers_mut().insert(PROCESS_TIME_HEADER, value);
    }
    let status = response.status().as_u16();
    state
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            route: route.clone(),
            method,
            status,
        })
        .inc();
    state
        .metrics
        .request_duration
        .get_or_create(&RouteLabels { route })
        .observe(elapsed.as_secs_f64());
    let access_log = &state.config.access_log;
    if access_log.enabled && sampled(access_log.sample_every) {
        span.in_scope(|| {
            tracing::info!(
                target: "access",
                status,
                elapsed_ms = elapsed.as_secs_f64() * 1000.0,
                "response"
            )
        });
    } else {
        span.in_scope(|| {
            tracing::debug!(
                status,
                elapsed_ms = elapsed.as_secs_f64() * 1000.0,
                "response"
            )
        });
    }
    response
}

/// One request in `every`, counted across the process.
fn sampled(every: u32) -> bool {
    static REQUESTS: AtomicU64 = AtomicU64::new(0);
    every <= 1
        || REQUESTS
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(u64::from(every))
}
