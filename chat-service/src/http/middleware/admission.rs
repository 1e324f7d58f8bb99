//! Admission control: a bound on requests in flight, with load shedding mapped to 503.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit;

use crate::http::AppError;
use crate::state::SharedState;

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
