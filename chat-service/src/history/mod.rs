//! Conversation history: the recent messages of each session in Redis (fast, bounded, may vanish)
//! and every message in MongoDB (durable, the source of truth).

mod durable;
mod recent;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use durable::{DurableHistory, StoredMessage};
pub use recent::RecentCache;

use crate::error::AppError;
use crate::metrics::Metrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One message of a context, as the back ends receive it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextMessage {
    pub role: Role,
    pub content: String,
}

/// A message as cached in Redis: enough to rebuild a context, ordered by `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentMessage {
    pub seq: i64,
    pub role: Role,
    pub content: String,
}

/// A session id that matched `^[A-Za-z0-9_-]{1,64}$`; only such values reach Redis keys and
/// MongoDB filters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionId(String);

impl SessionId {
    pub fn parse(raw: &str) -> Result<Self, AppError> {
        let valid = !raw.is_empty()
            && raw.len() <= 64
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if valid {
            Ok(SessionId(raw.to_string()))
        } else {
            Err(AppError::InvalidSessionId)
        }
    }

    pub fn generate() -> Self {
        let bytes: [u8; 16] = rand::random();
        SessionId(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Sequence numbers the two messages of a stored turn received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredTurn {
    pub user_seq: i64,
    pub assistant_seq: i64,
}

/// Whether each store answers, for `/readyz`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct StoreHealth {
    pub mongodb: bool,
    pub redis: bool,
}

pub struct HistoryStore {
    recent: RecentCache,
    durable: DurableHistory,
    metrics: Arc<Metrics>,
}

impl HistoryStore {
    pub fn new(recent: RecentCache, durable: DurableHistory, metrics: Arc<Metrics>) -> Self {
        Self {
            recent,
            durable,
            metrics,
        }
    }

    /// The last messages of a session, oldest first. Redis first; on a miss (or Redis down)
    /// MongoDB, then Redis is refilled so the next turn is fast again.
    pub async fn recent_messages(
        &self,
        session: &SessionId,
    ) -> Result<Vec<RecentMessage>, AppError> {
        match self.recent.load(session).await {
            Ok(messages) if !messages.is_empty() => {
                self.observe_redis("load", true);
                return Ok(messages);
            }
            Ok(_) => self.observe_redis("load", true),
            Err(e) => {
                self.observe_redis("load", false);
                tracing::warn!(error = %e, "redis unavailable, loading context from mongodb");
            }
        }
        let limit = self.recent.capacity();
        let loaded = self.durable.last_messages(session, limit).await;
        self.metrics.store_op("mongodb", "load", loaded.is_ok());
        let messages: Vec<RecentMessage> = loaded?
            .into_iter()
            .map(|m| RecentMessage {
                seq: m.seq,
                role: m.role,
                content: m.content,
            })
            .collect();
        if !messages.is_empty() {
            let refilled = self.recent.add(session, &messages).await;
            self.observe_redis("refill", refilled.is_ok());
        }
        Ok(messages)
    }

    /// Stores a finished (or interrupted) turn: MongoDB first, since only that makes it durable;
    /// Redis after, best effort. `finish_reason` is the assistant message's (`error` or
    /// `cancelled` when `incomplete`).
    pub async fn append_turn(
        &self,
        session: &SessionId,
        user: &str,
        reply: &str,
        model: &str,
        finish_reason: &str,
        incomplete: bool,
    ) -> Result<StoredTurn, AppError> {
        let stored = self
            .durable
            .append_turn(session, user, reply, model, finish_reason, incomplete)
            .await;
        self.metrics.store_op("mongodb", "append", stored.is_ok());
        let stored = stored?;
        let cached = self
            .recent
            .add(
                session,
                &[
                    RecentMessage {
                        seq: stored.user_seq,
                        role: Role::User,
                        content: user.to_string(),
                    },
                    RecentMessage {
                        seq: stored.assistant_seq,
                        role: Role::Assistant,
                        content: reply.to_string(),
                    },
                ],
            )
            .await;
        if let Err(e) = &cached {
            tracing::warn!(error = %e, "redis unavailable, turn stored in mongodb only");
        }
        self.observe_redis("append", cached.is_ok());
        Ok(stored)
    }

    pub async fn page(
        &self,
        session: &SessionId,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<StoredMessage>, AppError> {
        let page = self.durable.page(session, after_seq, limit).await;
        self.metrics.store_op("mongodb", "page", page.is_ok());
        page
    }

    /// Erases both copies. Returns (messages deleted in MongoDB, whether Redis was erased).
    pub async fn delete(&self, session: &SessionId) -> Result<(u64, bool), AppError> {
        let deleted = self.durable.delete(session).await;
        self.metrics.store_op("mongodb", "delete", deleted.is_ok());
        let deleted = deleted?;
        let cache = self.recent.delete(session).await;
        self.observe_redis("delete", cache.is_ok());
        if let Err(e) = &cache {
            tracing::warn!(error = %e, "redis unavailable; its copy expires with its TTL");
        }
        Ok((deleted, cache.is_ok()))
    }

    pub async fn session_exists(&self, session: &SessionId) -> Result<bool, AppError> {
        self.durable.session_exists(session).await
    }

    pub async fn health(&self) -> StoreHealth {
        let (mongodb, redis) = tokio::join!(self.durable.ping(), self.recent.ping());
        self.observe_redis("ping", redis);
        StoreHealth { mongodb, redis }
    }

    fn observe_redis(&self, operation: &'static str, ok: bool) {
        self.metrics.store_op("redis", operation, ok);
        self.metrics.redis_up.set(i64::from(ok));
    }
}
