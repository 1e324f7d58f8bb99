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

/// Prefix of the WebSocket subprotocol that carries a key, for browsers, which cannot set
/// headers on a WebSocket: `Sec-WebSocket-Protocol: chatop, chatop.key.<key>`.
pub const KEY_SUBPROTOCOL_PREFIX: &str = "chatop.key.";
/// Query parameters that look like a key: refused, since URLs end up in access logs and
/// browser history.
const KEY_QUERY_PARAMETERS: [&str; 5] = ["api_key", "apikey", "key", "access_token", "token"];

/// The key a request presents: `Authorization: Bearer <key>`, `x-api-key: <key>` or the
/// WebSocket subprotocol `chatop.key.<key>`.
fn presented_key(request: &Request) -> Option<&str> {
    let headers = request.headers();
    let from_subprotocol = headers
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .and_then(|protocols| {
            protocols
                .split(',')
                .find_map(|p| p.trim().strip_prefix(KEY_SUBPROTOCOL_PREFIX))
        });
    if from_subprotocol.is_some() {
        return from_subprotocol;
    }
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
    let key_in_url = request.uri().query().is_some_and(|query| {
        query.split('&').any(|pair| {
            let name = pair.split('=').next().unwrap_or_default();
            KEY_QUERY_PARAMETERS.contains(&name.to_ascii_lowercase().as_str())
        })
    });
    if key_in_url {
        return AppError::InvalidRequest(
            "API keys are not accepted in the URL (URLs are logged); send `Authorization: Bearer`, `x-api-key`, or on a WebSocket the subprotocol `chatop.key.<key>`".into(),
        )
        .into_response();
    }
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
