//! Admission control: a bound on requests in flight, with load shedding mapped to 503. The body
//! is read before a permit is taken, under `limits.bodyReadTimeoutMs`, so that a client
//! trickling its upload holds no permit and is cut off in bounded time.

use std::pin::Pin;
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
    let request = Request::from_parts(parts, Body::from(body));
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
