//! The application state: one struct, created once at start-up, shared as an `Arc`, and the
//! errors of creating it.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::ApiKeys;
use crate::backend::BackendPool;
use crate::cache::ResponseCache;
use crate::config::{Config, ConfigError, Secrets, StoreTlsConfig};
use crate::history::{DurableHistory, Expiry, HistoryStore, RecentCache, SessionHistory};
use crate::idempotency::IdempotencyStore;
use crate::metrics::Metrics;
use crate::rate_limit::RateLimiter;
use crate::tokens::TokenCounter;

pub type SharedState = Arc<AppState>;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("redis client: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis TLS: {0}")]
    RedisTls(String),
    #[error("mongodb client: {0}")]
    Mongo(#[from] mongodb::error::Error),
    #[error("back-end pool: {0}")]
    Backends(#[from] crate::backend::PoolStartError),
    #[error(transparent)]
    ApiKeys(#[from] crate::auth::KeyFileError),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokens::TokenizerError),
}

/// Bounds every Redis command on a connection made without a configured timeout; callers with
/// a tighter budget (the rate limiter) add their own. Redis must never hold a turn up.
const REDIS_TIMEOUT: Duration = Duration::from_millis(500);

/// The one Redis connection of the service, shared by the recent-history cache, the response
/// cache and the rate limiter. It connects lazily and reconnects by itself, so the service starts,
/// and degrades instead of failing, while Redis is down.
pub fn redis_connection(url: &str) -> Result<ConnectionManager, redis::RedisError> {
    manage(redis::Client::open(url)?, REDIS_TIMEOUT)
}

/// The Redis client for `url`, with the server verified against the CA file of `tls` when set
/// (already checked to hold PEM by `Config::load`). `tls` needs a `rediss://` URL: a CA for a
/// clear-text URL would send the AUTH token unprotected while the config claims TLS, so it is
/// refused.
pub fn redis_client(
    url: &str,
    tls: Option<&StoreTlsConfig>,
) -> Result<redis::Client, StartupError> {
    let Some(tls) = tls else {
        return Ok(redis::Client::open(url)?);
    };
    if !url.starts_with("rediss://") {
        return Err(StartupError::RedisTls(
            "history.redis.tls.caFile is set but the Redis URL (from history.redis.urlEnv) is not \
             rediss://, so the connection would not use TLS"
                .into(),
        ));
    }
    let root_cert = std::fs::read(&tls.ca_file)
        .map_err(|e| StartupError::RedisTls(format!("cannot read CA file {}: {e}", tls.ca_file)))?;
    let certificates = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(root_cert),
    };
    Ok(redis::Client::build_with_tls(url, certificates)?)
}

/// The shared connection of [`redis_connection`] over `client`, with `timeout` (from
/// `history.redis.timeoutMs`) as its connect and response timeout.
pub fn manage(
    client: redis::Client,
    timeout: Duration,
) -> Result<ConnectionManager, redis::RedisError> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(200));
    ConnectionManager::new_lazy_with_config(client, config)
}

/// Fault injection for tests only: milliseconds an end-user erasure pauses before each session,
/// so that a test can kill the service mid-erasure (chat-service/tests/erasure_restart.rs).
pub const FAULT_ERASE_DELAY_ENV: &str = "CHAT_SERVICE_FAULT_ERASE_DELAY_MS";

fn fault_erase_delay() -> Option<Duration> {
    let millis = std::env::var(FAULT_ERASE_DELAY_ENV).ok()?.parse().ok()?;
    tracing::warn!(
        millis,
        "fault injection on: end-user erasures pause before each session"
    );
    Some(Duration::from_millis(millis))
}

/// What the state is built from besides the config: the connections to the stores and the
/// secrets that are not connection strings. [`AppState::new`] makes them from [`Secrets`]; tests
/// hand in a test double of the history.
pub struct StateParts {
    pub metrics: Arc<Metrics>,
    pub redis: ConnectionManager,
    pub history: Arc<dyn SessionHistory>,
    /// The same history as the store it is, for listing, export and end-user erasure; `None`
    /// (tests without stores) refuses those routes.
    pub records: Option<Arc<HistoryStore>>,
    /// Records of `Idempotency-Key` turns; `None` refuses the header (tests without stores).
    pub idempotency: Option<IdempotencyStore>,
    /// Per back end, in config order.
    pub backend_api_keys: Vec<Option<String>>,
    /// Content of [`crate::config::ENV_API_KEYS`], when set.
    pub api_keys: Option<String>,
}

pub struct AppState {
    pub config: Config,
    pub allowed_models: Vec<String>,
    pub history: Arc<dyn SessionHistory>,
    /// See [`StateParts::records`].
    pub records: Option<Arc<HistoryStore>>,
    /// Records of `Idempotency-Key` turns, next to the history.
    pub idempotency: Option<IdempotencyStore>,
    pub backends: BackendPool,
    pub metrics: Arc<Metrics>,
    /// Accepted API keys; `None` when `auth` is off.
    pub api_keys: Option<Arc<ApiKeys>>,
    /// Shared per-caller limits; `None` when `rateLimit` is off.
    pub rate_limiter: Option<RateLimiter>,
    /// Response cache; `None` when `cache` is off.
    pub cache: Option<Arc<ResponseCache>>,
    /// Admission control: a request that finds no permit is shed with 503.
    pub admission: Arc<Semaphore>,
    /// Open WebSockets per caller.
    pub open_sockets: crate::http::middleware::admission::SocketCounts,
    /// Cancelled on SIGTERM: WebSockets finish their current turn and close.
    pub shutdown: CancellationToken,
    /// Cancelled when the shutdown grace period is over: running turns stop and are stored as
    /// incomplete.
    pub turn_deadline: CancellationToken,
    /// Turns run as tasks so that a client leaving does not lose the turn; shutdown waits on them.
    pub turns: TaskTracker,
    /// Counts context tokens per model (its tokenizer, else the estimate).
    pub tokens: TokenCounter,
}

impl AppState {
    /// Builds the clients; none connects here, so the service starts while a store is down and
    /// reports it in `/readyz`. `config` is trusted to be valid: `Config::load` and
    /// `Config::from_yaml` validated it, and a config built in code is checked with
    /// `Config::validate` by whoever built it.
    pub async fn new(config: Config, secrets: Secrets) -> Result<SharedState, StartupError> {
        let metrics = Arc::new(Metrics::new());
        let redis_timeout = Duration::from_millis(config.history.redis.timeout_ms);
        let redis_client = redis_client(&secrets.redis_url, config.history.redis.tls.as_ref())?;
        let redis = manage(redis_client.clone(), redis_timeout)?;
        // Redis never holds more of a session than retention keeps.
        let mut recent_config = config.history.redis.clone();
        if let Some(keep) = config.history.retention.max_messages_per_session {
            recent_config.recent_messages = recent_config.recent_messages.min(keep);
        }
        let recent = RecentCache::new(redis.clone(), &recent_config).with_diagnosis(redis_client);
        let durable = DurableHistory::connect(&secrets.mongodb_uri, &config.history.mongodb)
            .await?
            .with_expiry(
                Expiry::for_retention(&config.history.retention, config.history.redis.ttl_seconds),
                metrics.history_ttl_index.clone(),
            );
        let mongodb = &config.history.mongodb;
        let idempotency = IdempotencyStore::new(
            durable.database(),
            &format!("{}_idempotency", mongodb.collection),
            Duration::from_millis(mongodb.timeout_ms),
        );
        let history_idempotency = IdempotencyStore::new(
            durable.database(),
            &format!("{}_idempotency", mongodb.collection),
            Duration::from_millis(mongodb.timeout_ms),
        );
        let history = Arc::new(
            HistoryStore::new(recent, durable, metrics.clone())
                .with_retention(config.history.retention.clone())
                .with_idempotency(history_idempotency)
                .with_fault_erase_delay(fault_erase_delay()),
        );
        crate::history::spawn_sweeper(&history);
        crate::history::spawn_erasure_resumer(&history);
        let parts = StateParts {
            metrics,
            redis,
            history: history.clone(),
            records: Some(history),
            idempotency: Some(idempotency),
            backend_api_keys: secrets.backend_api_keys,
            api_keys: secrets.api_keys,
        };
        Self::from_parts(config, parts).await
    }

    /// The state over stores that already exist; `config` is trusted to be valid, as for
    /// [`AppState::new`].
    pub async fn from_parts(
        config: Config,
        parts: StateParts,
    ) -> Result<SharedState, StartupError> {
        let StateParts {
            metrics,
            redis,
            history,
            records,
            idempotency,
            backend_api_keys,
            api_keys,
        } = parts;
        let tokens = TokenCounter::load(&config.context)?;
        let backends = BackendPool::new(&config, backend_api_keys, metrics.clone()).await?;
        let api_keys = if config.auth.enabled {
            let keys = ApiKeys::load(&config.auth, api_keys.as_deref())?;
            keys.watch();
            Some(keys)
        } else {
            None
        };
        let key_prefix = &config.history.redis.key_prefix;
        let rate_limiter = config.rate_limit.enabled.then(|| {
            RateLimiter::new(
                redis.clone(),
                key_prefix,
                &config.rate_limit,
                metrics.clone(),
            )
        });
        let cache = config.cache.enabled.then(|| {
            Arc::new(ResponseCache::new(
                redis,
                key_prefix,
                // No cached answer outlives the history it came from.
                config
                    .history
                    .retention
                    .max_age_seconds
                    .map_or(config.cache.ttl_seconds, |age| {
                        age.min(config.cache.ttl_seconds)
                    }),
                config.cache.shared,
                metrics.clone(),
            ))
        });
        Ok(Arc::new(Self {
            api_keys,
            rate_limiter,
            cache,
            allowed_models: config.allowed_models(),
            history,
            records,
            idempotency,
            backends,
            admission: Arc::new(Semaphore::new(config.limits.max_concurrent_requests)),
            open_sockets: Default::default(),
            metrics,
            shutdown: CancellationToken::new(),
            turn_deadline: CancellationToken::new(),
            turns: TaskTracker::new(),
            tokens,
            config,
        }))
    }
}
