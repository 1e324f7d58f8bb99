//! Per-caller rate limits at the edge: who a request counts against, the 429, and the
//! `RateLimit-*` headers (IETF draft `RateLimit` fields, the separate-header form of draft-05).
//! The limiter itself is [`crate::rate_limit`].

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::auth::ApiKeyId;
use crate::config::RateLimitKey;
use crate::http::AppError;
use crate::rate_limit::{Caller, Decision};
use crate::state::SharedState;

/// Header naming the end user when `rateLimit.keyBy` is `user`.
pub const USER_HEADER: &str = "x-user-id";
/// The WebSocket route admits each turn on the socket, not the upgrade.
const WEBSOCKET_ROUTE: &str = "/ws/chat";

/// `RateLimit-Limit` (requests per window), `RateLimit-Remaining`, `RateLimit-Reset` (seconds
/// until the request budget is whole again) and `RateLimit-Policy` (`<limit>;w=<window>`).
pub fn write_headers(decision: &Decision, headers: &mut HeaderMap, window_seconds: u64) {
    headers.insert("ratelimit-limit", HeaderValue::from(decision.limit));
    headers.insert("ratelimit-remaining", HeaderValue::from(decision.remaining));
    headers.insert("ratelimit-reset", HeaderValue::from(decision.reset_seconds));
    if let Ok(policy) = HeaderValue::from_str(&format!("{};w={window_seconds}", decision.limit)) {
        headers.insert("ratelimit-policy", policy);
    }
}

fn client_ip(request: &Request) -> String {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(address)| address.ip().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// The caller a request counts against, per `rateLimit.keyBy`.
fn caller_of(request: &Request, key_by: RateLimitKey) -> Caller {
    match key_by {
        RateLimitKey::ApiKey => {
            if let Some(ApiKeyId(id)) = request.extensions().get::<ApiKeyId>() {
                return Caller(format!("key:{id}"));
            }
        }
        RateLimitKey::User => {
            if let Some(user) = request.headers().get(USER_HEADER).filter(|v| !v.is_empty()) {
                // Hashed: the header is client text, the Redis key must stay short and plain.
                let digest = Sha256::digest(user.as_bytes());
                return Caller(format!("user:{}", hex::encode(&digest[..8])));
            }
        }
        RateLimitKey::ClientIp => {}
    }
    Caller(format!("ip:{}", client_ip(request)))
}

/// Refuses requests over the caller's budget with 429 before any work is done; runs after
/// authentication so that it can count per API key.
pub async fn limit(State(state): State<SharedState>, mut request: Request, next: Next) -> Response {
    let Some(limiter) = &state.rate_limiter else {
        return next.run(request).await;
    };
    let caller = caller_of(&request, state.config.rate_limit.key_by);
    request.extensions_mut().insert(caller.clone());
    let websocket = request
        .extensions()
        .get::<MatchedPath>()
        .is_some_and(|p| p.as_str() == WEBSOCKET_ROUTE);
    if websocket {
        return next.run(request).await;
    }
    let decision = limiter.admit(&caller).await;
    let mut response = if decision.allowed {
        next.run(request).await
    } else {
        AppError::from(decision.refusal()).into_response()
    };
    write_headers(&decision, response.headers_mut(), limiter.window_seconds());
    response
}
