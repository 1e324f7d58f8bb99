//! The recent messages of each session in Redis: a sorted set scored by sequence number, so that
//! concurrent turns land in order and re-adding a message is idempotent; trimmed to a bound and
//! expiring after the configured idle time.

use std::time::Duration;

use redis::aio::ConnectionManager;

use super::RecentMessage;
use crate::config::RedisHistoryConfig;
use crate::conversation::SessionKey;

#[derive(Debug, thiserror::Error)]
pub enum RecentCacheError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
}

pub struct RecentCache {
    connection: ConnectionManager,
    /// The client behind `connection`, for one direct connection attempt when a ping fails: the
    /// manager reconnects in the background, so its own error is only the timeout, not why
    /// (refused, TLS verification, AUTH).
    diagnosis: Option<redis::Client>,
    key_prefix: String,
    capacity: i64,
    ttl_seconds: i64,
    /// `history.redis.timeoutMs`: Redis must never hold a turn up; past this, the operation
    /// counts as failed.
    timeout: Duration,
}

impl RecentCache {
    /// On the service's one Redis connection, which connects lazily: the service starts, and
    /// serves from MongoDB, while Redis is down.
    pub fn new(connection: ConnectionManager, config: &RedisHistoryConfig) -> Self {
        Self {
            connection,
            diagnosis: None,
            key_prefix: config.key_prefix.clone(),
            capacity: i64::from(config.recent_messages),
            ttl_seconds: i64::try_from(config.ttl_seconds).unwrap_or(i64::MAX),
            timeout: Duration::from_millis(config.timeout_ms),
        }
    }

    pub fn capacity(&self) -> i64 {
        self.capacity
    }

    /// `<prefix>:session:<key>:recent`.
    pub fn key(&self, session: &SessionKey) -> String {
        session_redis_key(&self.key_prefix, session, "recent")
    }

    pub async fn load(&self, session: &SessionKey) -> Result<Vec<RecentMessage>, RecentCacheError> {
        let key = self.key(session);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .zrange(&key, 0, -1)
            .expire(&key, self.ttl_seconds)
            .ignore();
        let mut connection = self.connection.clone();
        let (members,): (Vec<String>,) = self.bounded(pipe.query_async(&mut connection)).await?;
        Ok(members
            .iter()
            .filter_map(|m| serde_json::from_str(m).ok())
            .collect())
    }

    pub async fn add(
        &self,
        session: &SessionKey,
        messages: &[RecentMessage],
    ) -> Result<(), RecentCacheError> {
        let key = self.key(session);
        let items = scored(messages);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .zadd_multiple(&key, &items)
            .ignore()
            // Keep the `capacity` highest sequence numbers.
            .zremrangebyrank(&key, 0, -(self.capacity as isize + 1))
            .ignore()
            .expire(&key, self.ttl_seconds)
            .ignore();
        let mut connection = self.connection.clone();
        self.bounded(pipe.query_async::<()>(&mut connection)).await
    }

    /// Makes `messages` the whole copy, dropping whatever else it held.
    pub async fn replace(
        &self,
        session: &SessionKey,
        messages: &[RecentMessage],
    ) -> Result<(), RecentCacheError> {
        let key = self.key(session);
        let items = scored(messages);
        let mut pipe = redis::pipe();
        pipe.atomic().del(&key).ignore();
        if !items.is_empty() {
            pipe.zadd_multiple(&key, &items)
                .ignore()
                .zremrangebyrank(&key, 0, -(self.capacity as isize + 1))
                .ignore()
                .expire(&key, self.ttl_seconds)
                .ignore();
        }
        let mut connection = self.connection.clone();
        self.bounded(pipe.query_async::<()>(&mut connection)).await
    }

    /// Erases the session's copy and the response-cache answers generated for it (listed in
    /// its index, see [`crate::cache`]); returns how many answers went.
    pub async fn delete(&self, session: &SessionKey) -> Result<u64, RecentCacheError> {
        let mut connection = self.connection.clone();
        let index = session_redis_key(&self.key_prefix, session, "responses");
        let mut members = redis::cmd("SMEMBERS");
        members.arg(&index);
        let answers: Vec<String> = self.bounded(members.query_async(&mut connection)).await?;
        let mut cmd = redis::cmd("DEL");
        cmd.arg(self.key(session)).arg(&index).arg(&answers);
        self.bounded(cmd.query_async::<()>(&mut connection)).await?;
        Ok(answers.len() as u64)
    }

    async fn bounded<T>(
        &self,
        operation: impl Future<Output = Result<T, redis::RedisError>>,
    ) -> Result<T, RecentCacheError> {
        match tokio::time::timeout(self.timeout, operation).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(RecentCacheError::Timeout(self.timeout)),
        }
    }

    /// Lets [`RecentCache::ping`] say why Redis is unreachable, by connecting with `client` (the
    /// one `connection` was made from) once a ping fails.
    pub fn with_diagnosis(mut self, client: redis::Client) -> Self {
        self.diagnosis = Some(client);
        self
    }

    /// `Err` carries the reason, for `/readyz`.
    pub async fn ping(&self) -> Result<(), String> {
        let mut connection = self.connection.clone();
        let cmd = redis::cmd("PING");
        let error = match self
            .bounded(cmd.query_async::<String>(&mut connection))
            .await
        {
            Ok(_) => return Ok(()),
            Err(error) => error.to_string(),
        };
        let Some(client) = &self.diagnosis else {
            return Err(error);
        };
        let attempt = async {
            let mut direct = client.get_multiplexed_async_connection().await?;
            redis::cmd("PING").query_async::<String>(&mut direct).await
        };
        match tokio::time::timeout(self.timeout * 2, attempt).await {
            Ok(Err(cause)) => Err(format!("{error}; connecting: {cause}")),
            _ => Err(error),
        }
    }
}

/// `<prefix>:session:<key>:<what>`, the session's storage key escaped so that keys stay
/// unambiguous (`/` and `.` of principals become `%2F`, `%2E`).
pub fn session_redis_key(prefix: &str, session: &SessionKey, what: &str) -> String {
    let mut escaped = String::with_capacity(session.as_str().len());
    for c in session.as_str().chars() {
        if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
            escaped.push(c);
        } else {
            escaped.push_str(&format!("%{:02X}", c as u32));
        }
    }
    format!("{prefix}:session:{escaped}:{what}")
}

/// Messages as sorted-set members scored by their sequence number.
fn scored(messages: &[RecentMessage]) -> Vec<(i64, String)> {
    messages
        .iter()
        .map(|m| {
            (
                m.seq,
                serde_json::to_string(m).expect("plain struct serialises"),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversation::{Principal, SessionId};

    #[tokio::test]
    async fn keys_are_per_session_under_the_prefix() {
        let redis = crate::state::redis_connection("redis://127.0.0.1:9").unwrap();
        let config = RedisHistoryConfig {
            key_prefix: "chat-a".into(),
            ..RedisHistoryConfig::default()
        };
        let cache = RecentCache::new(redis, &config);
        let session = SessionKey::new(&Principal::shared(), SessionId::parse("s-1_x").unwrap());
        assert_eq!(cache.key(&session), "chat-a:session:s-1_x:recent");
        assert_eq!(cache.capacity(), i64::from(config.recent_messages));
    }

    #[tokio::test]
    async fn an_unreachable_redis_is_an_error_not_a_hang() {
        let redis = crate::state::redis_connection("redis://127.0.0.1:9").unwrap();
        let cache = RecentCache::new(redis, &RedisHistoryConfig::default());
        let session = SessionKey::new(&Principal::api_key("a"), SessionId::generate());
        assert!(cache.load(&session).await.is_err());
        assert!(cache.ping().await.is_err());
    }
}
