//! Admission control: a bound on requests in flight, with load shedding mapped to 503. The body
//! is read before a permit is taken, under `limits.bodyReadTimeoutMs`, so that a client
//! trickling its upload holds no permit and is cut off in bounded time.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit;

use crate::http::AppError;
use crate::state::SharedState;

/// Reads the body whole (within the deadline and the size limit), then sheds load with 503 +
/// Retry-After once `limits.maxConcurrentRequests` are in flight. The permit lives as long as
/// the response body, so a stream counts until its last event.
pub async fn admit(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let limits = &state.config.limits;
    let deadline = Duration::from_millis(limits.body_read_timeout_ms);
    let limit = crate::http::body_limit(&state.config);
    // A body announced over the limit is refused before a byte of it is read.
    let announced = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    if announced.is_some_and(|length| length > limit as u64) {
        return AppError::PayloadTooLarge(format!(
            "the request body is {} bytes; the limit is {limit}",
            announced.unwrap_or_default()
        ))
        .into_response();
    }
    let body = match tokio::time::timeout(deadline, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => bytes,
        // `to_bytes` fails on the limit or on a broken connection; the latter gets no answer.
        Ok(Err(_)) => {
            return AppError::PayloadTooLarge("request body exceeds the size limit".into())
                .into_response();
        }
        Err(_) => {
            let mut response = AppError::RequestTimeout(format!(
                "the request body was not received within {} ms",
                limits.body_read_timeout_ms
            ))
            .into_response();
            // The rest of the body is still on its way: the connection cannot be reused.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return response;
        }
    };
    let Ok(permit) = state.admission.clone().try_acquire_owned() else {
        return AppError::Overloaded.into_response();
    };
    let slot = AdmissionSlot(Arc::new(Mutex::new(Some(permit))));
    let mut request = Request::from_parts(parts, Body::from(body));
    request.extensions_mut().insert(slot.clone());
    let (parts, body) = next.run(request).await.into_parts();
    let guarded = Admitted { body, _slot: slot };
    Response::from_parts(parts, Body::new(guarded))
}

/// A request's admission permit, for a handler whose work outlives its response: a WebSocket
/// takes it so that the open socket, not only its upgrade, counts as in flight.
#[derive(Clone)]
pub struct AdmissionSlot(Arc<Mutex<Option<OwnedSemaphorePermit>>>);

impl AdmissionSlot {
    /// The permit, which then no longer ends with the response.
    pub fn take(&self) -> Option<OwnedSemaphorePermit> {
        self.0.lock().expect("admission slot lock").take()
    }
}

/// Open WebSockets per caller, bounded by `limits.maxSocketsPerCaller`.
#[derive(Default)]
pub struct SocketCounts(Arc<Mutex<HashMap<String, usize>>>);

impl SocketCounts {
    /// Counts one more socket of `caller`, or `None` when it already has `cap` open.
    pub fn open(&self, caller: &str, cap: usize) -> Option<OpenSocket> {
        let mut counts = self.0.lock().expect("socket counts lock");
        let count = counts.entry(caller.to_string()).or_insert(0);
        if *count >= cap {
            return None;
        }
        *count += 1;
        Some(OpenSocket {
            counts: self.0.clone(),
            caller: caller.to_string(),
        })
    }
}

/// One counted socket; closing it (dropping this) frees its place.
pub struct OpenSocket {
    counts: Arc<Mutex<HashMap<String, usize>>>,
    caller: String,
}

impl Drop for OpenSocket {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().expect("socket counts lock");
        if let Some(count) = counts.get_mut(&self.caller) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.caller);
            }
        }
    }
}

/// A response body holding its admission permit (unless a WebSocket took it). It passes the
/// inner body's size hint on, so a JSON answer keeps its `Content-Length` instead of turning
/// into a chunked stream.
struct Admitted {
    body: Body,
    _slot: AdmissionSlot,
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
