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
//! Tokens are reserved before a turn calls a back end (prompt estimate + `max_tokens`) and the
//! unused part refunded afterwards, so concurrent turns on every replica draw from one budget: a
//! reservation that does not fit is refused (429) unless the budget is untouched, so N concurrent
//! turns overshoot a window's budget by at most one turn. A request is also refused up front while
//! the tokens charged reach a full window ahead of now.
//!
//! While Redis is unreachable a per-replica limiter (`governor`, same GCRA) enforces the request
//! limit locally, so each replica admits at most the limit on its own (N replicas: up to N×) and
//! the token limit is not enforced until Redis is back.
//!
//! Who a request counts against, and the `RateLimit-*` headers of a decision, are the HTTP
//! layer's (its `rate_limit` middleware).

use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::Quota;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use redis::aio::ConnectionManager;

use crate::config::RateLimitConfig;
use crate::metrics::{Metrics, RateLimitedLabels};

/// A limit check must not hold a request up; past this Redis counts as down for this request.
const REDIS_TIMEOUT: Duration = Duration::from_millis(250);
/// The local limiter forgets idle callers once it tracks this many.
const LOCAL_KEYS_BEFORE_CLEANUP: usize = 10_000;

/// KEYS[1] request TAT, KEYS[2] token TAT. ARGV: mode (`admit`|`reserve`|`charge`|`refund`),
/// window ms, requests per window, tokens per window (0: unlimited), tokens to reserve, charge or
/// refund.
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
if ARGV[1] == 'reserve' then
  if token_limit <= 0 then return {1, 0, 0, 0, 0} end
  local token_tat = tat_of(KEYS[2])
  local cost = (window / token_limit) * tonumber(ARGV[5])
  -- An untouched budget admits one turn even if it costs more than the whole window.
  if token_tat > now and token_tat - now + cost > window then
    local retry = math.min(token_tat - now + cost - window, token_tat - now)
    return {0, 2, 0, math.ceil(retry), math.ceil(token_tat - now)}
  end
  store(KEYS[2], token_tat + cost)
  return {1, 0, 0, 0, 0}
end
if ARGV[1] == 'refund' then
  if token_limit > 0 then
    local token_tat = tat_of(KEYS[2]) - (window / token_limit) * tonumber(ARGV[5])
    if token_tat > now then
      store(KEYS[2], token_tat)
    else
      redis.call('DEL', KEYS[2])
    end
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

/// The budget a refused request found spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dimension {
    Requests,
    Tokens,
}

impl Dimension {
    pub fn as_str(self) -> &'static str {
        match self {
            Dimension::Requests => "requests",
            Dimension::Tokens => "tokens",
        }
    }
}

impl fmt::Display for Dimension {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request refused because the caller's budget is spent for now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rate limit exceeded: {dimension} per window; retry after {retry_after_seconds} s")]
pub struct RateLimited {
    pub dimension: Dimension,
    /// At least 1.
    pub retry_after_seconds: u64,
}

/// The outcome of one admission check.
#[derive(Debug, Clone)]
pub struct Decision {
    pub allowed: bool,
    /// What is spent when refused (`Requests` when allowed).
    pub exhausted: Dimension,
    pub limit: u32,
    pub remaining: u64,
    pub reset_seconds: u64,
    pub retry_after_seconds: u64,
    /// `redis` or `local`.
    pub limiter: &'static str,
}

impl Decision {
    /// The refusal to answer a request this decision did not allow.
    pub fn refusal(&self) -> RateLimited {
        RateLimited {
            dimension: self.exhausted,
            retry_after_seconds: self.retry_after_seconds.max(1),
        }
    }
}

/// Tokens held from a caller's budget while a turn runs; see [`RateLimiter::settle`].
#[derive(Debug)]
pub struct TokenReservation {
    caller: Caller,
    reserved: u64,
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
    /// On the service's one Redis connection, which connects lazily, so a Redis outage only
    /// switches to local limits.
    pub fn new(
        redis: ConnectionManager,
        key_prefix: &str,
        config: &RateLimitConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        let limit = NonZeroU32::new(config.requests_per_window).unwrap_or(NonZeroU32::MIN);
        let period = Duration::from_millis(config.window_seconds * 1000 / u64::from(limit.get()))
            .max(Duration::from_nanos(1));
        let quota = Quota::with_period(period)
            .expect("period is positive")
            .allow_burst(limit);
        Self {
            config: config.clone(),
            key_prefix: key_prefix.to_string(),
            redis,
            script: redis::Script::new(GCRA_SCRIPT),
            local: governor::RateLimiter::keyed(quota).with_middleware(),
            metrics,
        }
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
                exhausted: if reply[1] == 2 {
                    Dimension::Tokens
                } else {
                    Dimension::Requests
                },
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
                    exhausted: decision.exhausted.as_str(),
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
                exhausted: Dimension::Requests,
                limit: self.config.requests_per_window,
                remaining: u64::from(snapshot.remaining_burst_capacity()),
                reset_seconds: window,
                retry_after_seconds: 0,
                limiter: "local",
            },
            Err(not_until) => Decision {
                allowed: false,
                exhausted: Dimension::Requests,
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

    /// Reserves `tokens` of `caller`'s token budget for a turn about to call a back end; `None`
    /// when tokens are not limited. While Redis is unreachable the turn goes ahead with nothing
    /// reserved (the token limit is not enforced then) and is charged afterwards if it can be.
    pub async fn reserve_tokens(
        &self,
        caller: &Caller,
        tokens: u64,
    ) -> Result<Option<TokenReservation>, RateLimited> {
        if self.config.tokens_per_window == 0 {
            return Ok(None);
        }
        let reserved = match self.run_script(caller, "reserve", tokens).await {
            Ok(reply) if reply.len() == 5 && reply[0] == 0 => {
                self.metrics
                    .rate_limited
                    .get_or_create(&RateLimitedLabels {
                        exhausted: Dimension::Tokens.as_str(),
                        limiter: "redis",
                    })
                    .inc();
                return Err(RateLimited {
                    dimension: Dimension::Tokens,
                    retry_after_seconds: ceil_seconds(reply[3]).max(1),
                });
            }
            Ok(_) => tokens,
            Err(e) => {
                tracing::warn!(error = %e, "could not reserve tokens; the turn goes ahead");
                0
            }
        };
        Ok(Some(TokenReservation {
            caller: caller.clone(),
            reserved,
        }))
    }

    /// Settles a reservation with the tokens the turn used: the unused part is refunded, usage
    /// beyond it (a prompt longer than estimated) is charged. Best effort: the turn happened.
    pub async fn settle(&self, reservation: TokenReservation, used: u64) {
        let TokenReservation { caller, reserved } = reservation;
        let (mode, tokens) = if used >= reserved {
            ("charge", used - reserved)
        } else {
            ("refund", reserved - used)
        };
        if tokens == 0 {
            return;
        }
        if let Err(e) = self.run_script(&caller, mode, tokens).await {
            tracing::warn!(error = %e, mode, "could not settle the token reservation");
        }
    }

    pub fn window_seconds(&self) -> u64 {
        self.config.window_seconds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(requests_per_window: u32) -> RateLimiter {
        let config = RateLimitConfig {
            enabled: true,
            requests_per_window,
            window_seconds: 60,
            ..RateLimitConfig::default()
        };
        let redis = crate::state::redis_connection("redis://127.0.0.1:9").unwrap();
        RateLimiter::new(redis, "p", &config, Arc::new(Metrics::new()))
    }

    #[tokio::test]
    async fn without_redis_each_caller_gets_the_request_limit_locally() {
        let limiter = limiter(2);
        let alice = Caller("ip:10.0.0.1".into());
        let bob = Caller("ip:10.0.0.2".into());
        for remaining in [1, 0] {
            let decision = limiter.admit(&alice).await;
            assert!(decision.allowed);
            assert_eq!(decision.limiter, "local");
            assert_eq!(decision.remaining, remaining);
        }
        let refused = limiter.admit(&alice).await;
        assert!(!refused.allowed);
        let refusal = refused.refusal();
        assert_eq!(refusal.dimension, Dimension::Requests);
        assert!((1..=60).contains(&refusal.retry_after_seconds));
        assert!(
            limiter.admit(&bob).await.allowed,
            "callers are counted apart"
        );
    }

    #[test]
    fn a_refusal_asks_for_at_least_a_second() {
        let decision = Decision {
            allowed: false,
            exhausted: Dimension::Tokens,
            limit: 1,
            remaining: 0,
            reset_seconds: 0,
            retry_after_seconds: 0,
            limiter: "redis",
        };
        assert_eq!(
            decision.refusal(),
            RateLimited {
                dimension: Dimension::Tokens,
                retry_after_seconds: 1
            }
        );
        assert_eq!(
            decision.refusal().to_string(),
            "rate limit exceeded: tokens per window; retry after 1 s"
        );
    }
}
