//! The application state: one struct, created once at start-up, shared as an `Arc`.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::ApiKeys;
use crate::backend::BackendPool;
use crate::cache::ResponseCache;
use crate::config::{Config, ConfigError, Secrets};
use crate::error::AppError;
use crate::history::{DurableHistory, HistoryStore, RecentCache};
use crate::metrics::Metrics;
use crate::rate_limit::RateLimiter;

pub type SharedState = Arc<AppState>;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("redis client: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("mongodb client: {0}")]
    Mongo(#[from] mongodb::error::Error),
    #[error("http client: {0}")]
    Http(#[from] reqwest::Error),
    #[error(transparent)]
    ApiKeys(#[from] crate::auth::KeyFileError),
}

pub struct AppState {
    pub config: Config,
    pub allowed_models: Vec<String>,
    pub history: HistoryStore,
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
    /// Cancelled on SIGTERM: WebSockets finish their current turn and close.
    pub shutdown: CancellationToken,
    /// Turns run as tasks so that a client leaving does not lose the turn; shutdown waits on them.
    pub turns: TaskTracker,
}

impl AppState {
    /// Builds the clients; none connects here, so the service starts while a store is down and
    /// reports it in `/readyz`. `config` is trusted to be valid: `Config::load` and
    /// `Config::from_yaml` validated it, and a config built in code is checked with
    /// `Config::validate` by whoever built it.
    pub async fn new(config: Config, secrets: Secrets) -> Result<SharedState, StartupError> {
        let metrics = Arc::new(Metrics::new());
        let recent = RecentCache::new(&secrets.redis_url, &config.history.redis)?;
        let durable =
            DurableHistory::connect(&secrets.mongodb_uri, &config.history.mongodb).await?;
        let backends = BackendPool::new(&config, secrets.backend_api_keys, metrics.clone()).await?;
        let api_keys = if config.auth.enabled {
            let keys = ApiKeys::load(&config.auth, secrets.api_keys.as_deref())?;
            keys.watch();
            Some(keys)
        } else {
            None
        };
        let key_prefix = &config.history.redis.key_prefix;
        let rate_limiter = config
            .rate_limit
            .enabled
            .then(|| {
                RateLimiter::new(
                    &secrets.redis_url,
                    key_prefix,
                    &config.rate_limit,
                    metrics.clone(),
                )
            })
            .transpose()?;
        let cache = config
            .cache
            .enabled
            .then(|| {
                ResponseCache::new(
                    &secrets.redis_url,
                    key_prefix,
                    config.cache.ttl_seconds,
                    metrics.clone(),
                )
                .map(Arc::new)
            })
            .transpose()?;
        Ok(Arc::new(Self {
            api_keys,
            rate_limiter,
            cache,
            allowed_models: config.allowed_models(),
            history: HistoryStore::new(recent, durable, metrics.clone()),
            backends,
            admission: Arc::new(Semaphore::new(config.limits.max_concurrent_requests)),
            metrics,
            shutdown: CancellationToken::new(),
            turns: TaskTracker::new(),
            config,
        }))
    }

    /// The requested model if allowed, else the default.
    pub fn resolve_model(&self, requested: Option<&str>) -> Result<String, AppError> {
        match requested {
            None | Some("") => Ok(self.config.models.default.clone()),
            Some(model) if self.allowed_models.iter().any(|m| m == model) => Ok(model.to_string()),
            Some(model) => Err(AppError::ModelNotAllowed(model.chars().take(100).collect())),
        }
    }

    pub fn check_message(&self, message: &str) -> Result<(), AppError> {
        if message.len() > self.config.limits.max_message_bytes {
            return Err(AppError::PayloadTooLarge(format!(
                "message is {} bytes, the limit is {}",
                message.len(),
                self.config.limits.max_message_bytes
            )));
        }
        if message.trim().is_empty() {
            return Err(AppError::InvalidRequest(
                "message: must not be empty".into(),
            ));
        }
        Ok(())
    }

    /// Checks an optional sampling temperature; 0 makes a turn deterministic (and cacheable).
    pub fn check_temperature(&self, temperature: Option<f32>) -> Result<(), AppError> {
        match temperature {
            Some(t) if !(0.0..=2.0).contains(&t) => Err(AppError::InvalidRequest(
                "temperature: must be between 0 and 2".into(),
            )),
            _ => Ok(()),
        }
    }
}
