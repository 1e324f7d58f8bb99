//! Per-caller rate limits shared by every replica through Redis.
//!
//! Algorithm: GCRA (the generic cell rate algorithm, a token bucket stored as one timestamp).
//! Each caller has one Redis key per dimension holding its "theoretical arrival time" (TAT); a
//! request is admitted when TAT − now leaves room for one more emission interval within the
//! window. Compared with a sliding log it needs O(1) memory per caller instead of one entry per
//! request, and unlike fixed windows it allows no double burst at a window boundary. The whole
//! check-and-update runs as one Lua script, so replicas cannot interleave between read and write,
//! and it reads the clock from Redis (`TIME`), so replicas' clock skew does not matter.
//!
//! Tokens are only known once a turn ends, so the token dimension is charged afterwards: a
//! request is refused while the tokens already charged reach a full window ahead of now.
//!
//! While Redis is unreachable a per-replica limiter (`governor`, same GCRA) enforces the request
//! limit locally, so each replica admits at most the limit on its own (N replicas: up to N×) and
//! the token limit is not enforced until Redis is back.
//!
//! Headers (IETF draft `RateLimit` fields, the separate-header form of draft-05): every limited
//! response carries `RateLimit-Limit` (requests per window), `RateLimit-Remaining` and
//! `RateLimit-Reset` (seconds until the request budget is whole again), plus `RateLimit-Policy`
//! (`<limit>;w=<window seconds>`); a 429 adds `Retry-After`.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::Quota;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sha2::{Digest, Sha256};

use crate::auth::ApiKeyId;
use crate::config::{RateLimitConfig, RateLimitKey};
use crate::error::AppError;
use crate::metrics::{Metrics, RateLimitedLabels};
use crate::state::SharedState;

/// A limit check must not hold a request up; past this Redis counts as down for this request.
const REDIS_TIMEOUT: Duration = Duration::from_millis(250);
/// Header naming the end user when `rateLimit.keyBy` is `user`.
pub const USER_HEADER: &str = "x-user-id";
/// The WebSocket route admits each turn on the socket, not the upgrade.
const WEBSOCKET_ROUTE: &str = "/ws/chat";
/// The local limiter forgets idle callers once it tracks this many.
const LOCAL_KEYS_BEFORE_CLEANUP: usize = 10_000;

/// KEYS[1] request TAT, KEYS[2] token TAT. ARGV: mode (`admit`|`charge`), window ms, requests
/// per window, tokens per window (0: unlimited), tokens to charge.
/// Returns {allowed, dimension (0 none, 1 requests, 2 tokens), remaining, retry-after ms, reset ms}.
const GCRA_SCRIPT: &str = r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local window = tonumber(ARGV[2])
local token_limit = tonumber(ARGV[4])
local function tat_of(key)
  local stored = tonumber(redis.call('GET', key) or '0')
  if stored < now then return now end
  return stored
end
local function store(key, tat)
  redis.call('SET', key, string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1)
end
if ARGV[1] == 'charge' then
  if token_limit > 0 then
    store(KEYS[2], tat_of(KEYS[2]) + (window / token_limit) * tonumber(ARGV[5]))
  end
  return {1, 0, 0, 0, 0}
end
local limit = tonumber(ARGV[3])
local interval = window / limit
local tat = tat_of(KEYS[1])
if token_limit > 0 then
  local token_tat = tat_of(KEYS[2])
  if token_tat - now >= window then
    local retry = token_tat - now - window + window / token_limit
    return {0, 2, 0, math.ceil(retry), math.ceil(tat - now)}
  end
end
local new_tat = tat + interval
local allow_at = new_tat - window
if allow_at > now then
  return {0, 1, 0, math.ceil(allow_at - now), math.ceil(tat - now)}
end
store(KEYS[1], new_tat)
return {1, 0, math.floor((window - (new_tat - now)) / interval), 0, math.ceil(new_tat - now)}
"#;

/// Who a request is counted against, e.g. `key:1a2b3c4d`, `user:<hash>`, `ip:10.0.0.7`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Caller(pub String);

/// The outcome of one admission check.
#[derive(Debug, Clone)]
pub struct Decision {
    pub allowed: bool,
    /// `requests` or `tokens` when refused.
    pub exhausted: &'static str,
    pub limit: u32,
    pub remaining: u64,
    pub reset_seconds: u64,
    pub retry_after_seconds: u64,
    /// `redis` or `local`.
    pub limiter: &'static str,
}

impl Decision {
    pub fn write_headers(&self, headers: &mut HeaderMap, window_seconds: u64) {
        headers.insert("ratelimit-limit", HeaderValue::from(self.limit));
        headers.insert("ratelimit-remaining", HeaderValue::from(self.remaining));
        headers.insert("ratelimit-reset", HeaderValue::from(self.reset_seconds));
        if let Ok(policy) = HeaderValue::from_str(&format!("{};w={window_seconds}", self.limit)) {
            headers.insert("ratelimit-policy", policy);
        }
    }

    pub fn error(&self) -> AppError {
        AppError::RateLimited {
            what: self.exhausted,
            retry_after_seconds: self.retry_after_seconds.max(1),
        }
    }
}

type LocalLimiter = governor::RateLimiter<
    Caller,
    DefaultKeyedStateStore<Caller>,
    DefaultClock,
    StateInformationMiddleware,
>;

pub struct RateLimiter {
    config: RateLimitConfig,
    key_prefix: String,
    redis: ConnectionManager,
    script: redis::Script,
    local: LocalLimiter,
    metrics: Arc<Metrics>,
}

fn ceil_seconds(ms: i64) -> u64 {
    u64::try_from(ms.max(0)).unwrap_or(0).div_ceil(1000)
}

impl RateLimiter {
    /// Connects lazily, like the history cache, so a Redis outage only switches to local limits.
    pub fn new(
        redis_url: &str,
        key_prefix: &str,
        config: &RateLimitConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(redis_url)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let redis = ConnectionManager::new_lazy_with_config(client, manager_config)?;
        let limit = NonZeroU32::new(config.requests_per_window).unwrap_or(NonZeroU32::MIN);
        let period = Duration::from_millis(config.window_seconds * 1000 / u64::from(limit.get()))
            .max(Duration::from_nanos(1));
        let quota = Quota::with_period(period)
            .expect("period is positive")
            .allow_burst(limit);
        Ok(Self {
            config: config.clone(),
            key_prefix: key_prefix.to_string(),
            redis,
            script: redis::Script::new(GCRA_SCRIPT),
            local: governor::RateLimiter::keyed(quota).with_middleware(),
            metrics,
        })
    }

    fn keys(&self, caller: &Caller) -> [String; 2] {
        let base = format!("{}:ratelimit:{}", self.key_prefix, caller.0);
        [format!("{base}:requests"), format!("{base}:tokens")]
    }

    async fn run_script(
        &self,
        caller: &Caller,
        mode: &str,
        tokens: u64,
    ) -> Result<Vec<i64>, String> {
        let [requests_key, tokens_key] = self.keys(caller);
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(requests_key)
            .key(tokens_key)
            .arg(mode)
            .arg(self.config.window_seconds * 1000)
            .arg(self.config.requests_per_window)
            .arg(self.config.tokens_per_window)
            .arg(tokens);
        let mut connection = self.redis.clone();
        match tokio::time::timeout(REDIS_TIMEOUT, invocation.invoke_async(&mut connection)).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err(format!("redis did not answer within {REDIS_TIMEOUT:?}")),
        }
    }

    /// Admits or refuses one request of `caller`, counting it when admitted.
    pub async fn admit(&self, caller: &Caller) -> Decision {
        let decision = match self.run_script(caller, "admit", 0).await {
            Ok(reply) if reply.len() == 5 => Decision {
                allowed: reply[0] == 1,
                exhausted: if reply[1] == 2 { "tokens" } else { "requests" },
                limit: self.config.requests_per_window,
                remaining: u64::try_from(reply[2]).unwrap_or(0),
                retry_after_seconds: ceil_seconds(reply[3]),
                reset_seconds: ceil_seconds(reply[4]),
                limiter: "redis",
            },
            other => {
                if let Err(e) = other {
                    tracing::warn!(error = %e, "rate limit in Redis unavailable; limiting locally");
                }
                self.admit_locally(caller)
            }
        };
        if !decision.allowed {
            self.metrics
                .rate_limited
                .get_or_create(&RateLimitedLabels {
                    exhausted: decision.exhausted,
                    limiter: decision.limiter,
                })
                .inc();
        }
        decision
    }

    fn admit_locally(&self, caller: &Caller) -> Decision {
        if self.local.len() > LOCAL_KEYS_BEFORE_CLEANUP {
            self.local.retain_recent();
        }
        let window = self.config.window_seconds;
        match self.local.check_key(caller) {
            Ok(snapshot) => Decision {
                allowed: true,
                exhausted: "requests",
                limit: self.config.requests_per_window,
                remaining: u64::from(snapshot.remaining_burst_capacity()),
                reset_seconds: window,
                retry_after_seconds: 0,
                limiter: "local",
            },
            Err(not_until) => Decision {
                allowed: false,
                exhausted: "requests",
                limit: self.config.requests_per_window,
                remaining: 0,
                reset_seconds: window,
                retry_after_seconds: not_until
                    .wait_time_from(DefaultClock::default().now())
                    .as_secs()
                    + 1,
                limiter: "local",
            },
        }
    }

    /// Charges the tokens a finished turn used; best effort, since the turn has happened.
    pub async fn charge_tokens(&self, caller: &Caller, tokens: u64) {
        if self.config.tokens_per_window == 0 || tokens == 0 {
            return;
        }
        if let Err(e) = self.run_script(caller, "charge", tokens).await {
            tracing::warn!(error = %e, "could not charge tokens to the rate limit");
        }
    }

    pub fn window_seconds(&self) -> u64 {
        self.config.window_seconds
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
        decision.error().into_response()
    };
    decision.write_headers(response.headers_mut(), limiter.window_seconds());
    response
}
