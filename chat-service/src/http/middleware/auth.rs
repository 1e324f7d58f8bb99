//! Authentication of the API routes by key (see [`crate::auth`] for how keys are kept).

use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::http::AppError;
use crate::metrics::ApiKeyLabels;
use crate::state::SharedState;

/// Header carrying the key when `Authorization: Bearer` is not used.
pub const API_KEY_HEADER: &str = "x-api-key";

/// The key a request presents: `Authorization: Bearer <key>` or `x-api-key: <key>`.
fn presented_key(request: &Request) -> Option<&str> {
    let headers = request.headers();
    if let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let (scheme, key) = value.split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| key.trim());
    }
    headers.get(API_KEY_HEADER).and_then(|v| v.to_str().ok())
}

/// Rejects requests without a valid key before any body is read or store touched, so that a
/// flood of bad keys costs one hash and a few comparisons each.
pub async fn authenticate(
    State(state): State<SharedState>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(keys) = &state.api_keys else {
        return next.run(request).await;
    };
    match presented_key(&request).and_then(|key| keys.verify(key)) {
        Some(id) => {
            state
                .metrics
                .api_key_requests
                .get_or_create(&ApiKeyLabels {
                    key_id: id.0.clone(),
                })
                .inc();
            request.extensions_mut().insert(id);
            next.run(request).await
        }
        None => {
            state.metrics.auth_rejected.inc();
            let mut response = AppError::Unauthorized.into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }
}
