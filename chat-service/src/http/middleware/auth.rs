//! Authentication of the API routes by key (see [`crate::auth`] for how keys are kept), and the
//! [`Principal`] every API request acts for, which owns the sessions it makes.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::auth::ApiKeyId;
use crate::config::AuthConfig;
use crate::conversation::Principal;
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

/// Whom a request acts for: the end user a trusted proxy names, else the key's id (the
/// configured owner of pre-ownership sessions gets the shared namespace they live in), else,
/// with auth off, the shared namespace.
fn principal_of(request: &Request, config: &AuthConfig, key: Option<&ApiKeyId>) -> Principal {
    let from_trusted_proxy = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .is_some_and(|ConnectInfo(peer)| config.trusted_proxies.contains(&peer.ip()));
    if from_trusted_proxy
        && let Some(user) = request
            .headers()
            .get(config.user_header.as_str())
            .and_then(|v| v.to_str().ok())
            .filter(|user| !user.is_empty())
    {
        return Principal::proxy_user(user);
    }
    match key {
        Some(ApiKeyId(id)) if config.legacy_sessions_owner.as_deref() != Some(id) => {
            Principal::api_key(id)
        }
        _ => Principal::shared(),
    }
}

/// Rejects requests without a valid key before any body is read or store touched, so that a
/// flood of bad keys costs one hash and a few comparisons each.
pub async fn authenticate(
    State(state): State<SharedState>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(keys) = &state.api_keys else {
        let principal = principal_of(&request, &state.config.auth, None);
        request.extensions_mut().insert(principal);
        return next.run(request).await;
    };
    match presented_key(&request).and_then(|key| keys.verify(key)) {
        Some(id) => {
            let principal = principal_of(&request, &state.config.auth, Some(&id));
            request.extensions_mut().insert(principal);
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
