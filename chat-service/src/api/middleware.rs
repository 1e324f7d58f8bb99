//! Request id, timing, metrics and admission control around every request.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use crate::error::AppError;
use crate::metrics::{RequestLabels, RouteLabels};
use crate::state::SharedState;

pub const REQUEST_ID_HEADER: &str = "x-request-id";
pub const PROCESS_TIME_HEADER: &str = "x-process-time";

/// The id of the current request: the caller's `x-request-id` when it is sane, else a new one.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

fn acceptable_request_id(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 128
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

pub async fn observe(
    State(state): State<SharedState>,
    mut request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let request_id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| acceptable_request_id(v))
        .map(str::to_string)
        .unwrap_or_else(|| crate::history::SessionId::generate().to_string());
    request
        .extensions_mut()
        .insert(RequestId(request_id.clone()));
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = request.method().to_string();
    let span = tracing::info_span!("request", request_id = %request_id, %method, %route);

    let mut response = next.run(request).instrument(span.clone()).await;

    let elapsed = started.elapsed();
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        headers.insert(REQUEST_ID_HEADER, value);
    }
    if let Ok(value) = HeaderValue::from_str(&format!("{:.6}", elapsed.as_secs_f64())) {
        headers.insert(PROCESS_TIME_HEADER, value);
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
    span.in_scope(|| {
        tracing::info!(
            status,
            elapsed_ms = elapsed.as_secs_f64() * 1000.0,
            "response"
        )
    });
    response
}

/// Sheds load with 503 + Retry-After once `limits.maxConcurrentRequests` are in flight. The
/// permit lives as long as the response body, so a stream counts until its last event.
pub async fn admit(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    let Ok(permit) = state.admission.clone().try_acquire_owned() else {
        return AppError::Overloaded.into_response();
    };
    let (parts, body) = next.run(request).await.into_parts();
    let guarded = Admitted {
        body,
        _permit: permit,
    };
    Response::from_parts(parts, Body::new(guarded))
}

/// A response body holding its admission permit. It passes the inner body's size hint on, so a
/// JSON answer keeps its `Content-Length` instead of turning into a chunked stream.
struct Admitted {
    body: Body,
    _permit: OwnedSemaphorePermit,
}

impl http_body::Body for Admitted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
