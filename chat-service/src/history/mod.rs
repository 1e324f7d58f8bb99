//! Conversation history: the recent messages of each session in Redis (fast, bounded, may vanish)
//! and every message in MongoDB (durable, the source of truth).
//!
//! When Redis fails to take a turn, or to erase a session, its copy of that session may lack a
//! stored turn or hold an erased one: the session is then marked stale, and its next context
//! comes from MongoDB, which also replaces the copy. The mark is kept by this replica; another
//! replica that serves the session meanwhile reads the copy until it expires (`ttlSeconds`).
//!
//! The rest of the service sees [`SessionHistory`]; [`HistoryStore`] is the real one over both
//! stores, [`MemoryHistory`] (tests only) the test double that lets the HTTP layer be tested
//! without them.

mod durable;
mod erasure;
#[cfg(test)]
mod memory;
mod recent;
mod records;
mod summaries;

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

pub(crate) use durable::is_duplicate_key;
pub use durable::{DurableHistory, Expiry, StoredMessage};
pub use erasure::{ErasureReport, RESUME_INTERVAL, spawn_erasure_resumer};
#[cfg(test)]
pub use memory::MemoryHistory;
pub use recent::{RecentCache, session_redis_key};
pub use records::{ExportItem, SessionRecord};
pub use summaries::{NewSummary, StoredSummary};

use crate::config::RetentionConfig;
use crate::conversation::{ContextMessage, EndUser, FinishReason, Role, SessionKey};
use crate::idempotency::IdempotencyStore;
use crate::metrics::Metrics;
use crate::tools::ToolCall;

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// MongoDB (the durable store) cannot be reached or refused the operation.
    #[error("history store unavailable: {0}")]
    Unavailable(String),
    /// The store answered with something it should never hold.
    #[error("history store inconsistent: {0}")]
    Inconsistent(String),
}

/// A message as cached in Redis: enough to rebuild a context, ordered by `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentMessage {
    pub seq: i64,
    pub role: Role,
    pub content: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl From<StoredMessage> for RecentMessage {
    fn from(m: StoredMessage) -> Self {
        RecentMessage {
            seq: m.seq,
            role: m.role,
            content: m.content,
            tool_calls: m.tool_calls,
            tool_call_id: m.tool_call_id,
        }
    }
}

impl From<RecentMessage> for ContextMessage {
    fn from(m: RecentMessage) -> Self {
        ContextMessage {
            role: m.role,
            content: m.content,
            tool_calls: m.tool_calls,
            tool_call_id: m.tool_call_id,
        }
    }
}

/// A finished (or interrupted) turn to store.
#[derive(Debug, Clone, Copy)]
pub struct NewTurn<'a> {
    /// The turn's new messages: the user's, or the results of the tools called last turn.
    pub input: &'a [ContextMessage],
    /// The end user the turn is for; the session remembers every one (`end_users`).
    pub end_user: Option<&'a EndUser>,
    pub reply: &'a str,
    /// The tools the model called in its reply.
    pub tool_calls: &'a [ToolCall],
    pub model: &'a str,
    /// The assistant message's; `error` or `cancelled` when `incomplete`.
    pub finish_reason: &'a FinishReason,
    pub incomplete: bool,
}

impl NewTurn<'_> {
    /// The turn's messages as stored from sequence number `first_seq` on: its input, then the
    /// reply.
    pub fn messages(
        &self,
        session: &SessionKey,
        first_seq: i64,
        turn_id: &str,
        now: mongodb::bson::DateTime,
    ) -> Vec<StoredMessage> {
        let stored = |seq, message: &ContextMessage, finish: Option<&FinishReason>| StoredMessage {
            session_id: session.as_str().to_string(),
            seq,
            role: message.role,
            content: message.content.clone(),
            tool_calls: message.tool_calls.clone(),
            tool_call_id: message.tool_call_id.clone(),
            model: self.model.to_string(),
            turn_id: turn_id.to_string(),
            incomplete: finish.is_some() && self.incomplete,
            finish_reason: finish.cloned(),
            created_at: now,
            covers_seq: None,
            expire_at: None,
        };
        let reply = ContextMessage {
            tool_calls: self.tool_calls.to_vec(),
            ..ContextMessage::new(Role::Assistant, self.reply)
        };
        let mut messages: Vec<StoredMessage> = (first_seq..)
            .zip(self.input)
            .map(|(seq, message)| stored(seq, message, None))
            .collect();
        messages.push(stored(
            first_seq + self.input.len() as i64,
            &reply,
            Some(self.finish_reason),
        ));
        messages
    }
}

/// Sequence numbers the messages of a stored turn received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredTurn {
    /// The first of the turn's input messages.
    pub user_seq: i64,
    pub assistant_seq: i64,
}

/// What erasing a session removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Erased {
    /// Messages deleted from the durable store.
    pub messages: u64,
    /// False when the recent-message cache was unreachable; its copy then expires on its own.
    pub cache_erased: bool,
    /// Response-cache answers generated for the session that went with it.
    pub cached_answers: u64,
}

/// Whether each store answers, for `/readyz`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct StoreHealth {
    pub mongodb: bool,
    pub redis: bool,
    /// Why MongoDB did not answer (the driver's error, e.g. a certificate the CA does not sign).
    pub mongodb_error: Option<String>,
    /// Why Redis did not answer.
    pub redis_error: Option<String>,
}

pub type HistoryFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The stored history of sessions, as turns and handlers use it.
pub trait SessionHistory: Send + Sync {
    /// The last messages of a session that may go into its next context, oldest first, with
    /// their positions (`seq`).
    fn recent_messages<'a>(
        &'a self,
        session: &'a SessionKey,
    ) -> HistoryFuture<'a, Result<Vec<RecentMessage>, HistoryError>>;

    /// The session's summary that covers the most of it (see [`crate::summary`]); none for
    /// stores that keep no summaries.
    fn latest_summary<'a>(
        &'a self,
        _session: &'a SessionKey,
    ) -> HistoryFuture<'a, Result<Option<StoredSummary>, HistoryError>> {
        Box::pin(std::future::ready(Ok(None)))
    }

    /// Claims the session's next summary call for the turn whose user message has `turn_seq`:
    /// true at most once per `every_turns` turns of the session, across replicas.
    fn claim_summary<'a>(
        &'a self,
        _session: &'a SessionKey,
        _turn_seq: i64,
        _every_turns: u32,
    ) -> HistoryFuture<'a, Result<bool, HistoryError>> {
        Box::pin(std::future::ready(Ok(false)))
    }

    /// Stores a summary; returns false when the messages it covers were erased meanwhile (the
    /// summary then goes too).
    fn store_summary<'a>(
        &'a self,
        _session: &'a SessionKey,
        _summary: &'a NewSummary,
    ) -> HistoryFuture<'a, Result<bool, HistoryError>> {
        Box::pin(std::future::ready(Ok(false)))
    }

    /// Stores all messages of a turn (its input and the reply), or none.
    fn append_turn<'a>(
        &'a self,
        session: &'a SessionKey,
        turn: NewTurn<'a>,
    ) -> HistoryFuture<'a, Result<StoredTurn, HistoryError>>;

    /// Up to `limit` messages with `seq > after_seq`, oldest first.
    fn page<'a>(
        &'a self,
        session: &'a SessionKey,
        after_seq: i64,
        limit: i64,
    ) -> HistoryFuture<'a, Result<Vec<StoredMessage>, HistoryError>>;

    fn delete<'a>(
        &'a self,
        session: &'a SessionKey,
    ) -> HistoryFuture<'a, Result<Erased, HistoryError>>;

    fn session_exists<'a>(
        &'a self,
        session: &'a SessionKey,
    ) -> HistoryFuture<'a, Result<bool, HistoryError>>;

    fn health(&self) -> HistoryFuture<'_, StoreHealth>;
}

/// Sessions the retention sweep looks at per query.
const SWEEP_BATCH: i64 = 100;

/// The history in Redis (recent messages) and MongoDB (all of them).
pub struct HistoryStore {
    recent: RecentCache,
    durable: DurableHistory,
    metrics: Arc<Metrics>,
    retention: RetentionConfig,
    /// Storage keys of sessions whose Redis copy must not be trusted (see the module docs).
    stale: Mutex<HashSet<String>>,
    /// The `Idempotency-Key` records, whose stored answers go with their session.
    idempotency: Option<IdempotencyStore>,
    /// Fault injection for tests only (`CHAT_SERVICE_FAULT_ERASE_DELAY_MS`): a pause before
    /// each session of an end-user erasure, so that a test can kill the service mid-erasure.
    fault_erase_delay: Option<std::time::Duration>,
}

impl HistoryStore {
    pub fn new(recent: RecentCache, durable: DurableHistory, metrics: Arc<Metrics>) -> Self {
        Self {
            recent,
            durable,
            metrics,
            retention: RetentionConfig::default(),
            stale: Mutex::new(HashSet::new()),
            idempotency: None,
            fault_erase_delay: None,
        }
    }

    /// Erasing a session also erases the `Idempotency-Key` records holding its answers.
    pub fn with_idempotency(mut self, idempotency: IdempotencyStore) -> Self {
        self.idempotency = Some(idempotency);
        self
    }

    /// Fault injection (tests only): pauses `delay` before each session an end-user erasure
    /// erases.
    pub fn with_fault_erase_delay(mut self, delay: Option<std::time::Duration>) -> Self {
        self.fault_erase_delay = delay;
        self
    }

    /// Enforces `retention`: message counts after each stored turn here, session age by
    /// [`HistoryStore::sweep_expired`] (see [`spawn_sweeper`]).
    pub fn with_retention(mut self, retention: RetentionConfig) -> Self {
        self.retention = retention;
        self
    }

    /// Erases every session idle for longer than `retention.maxAgeSeconds` from MongoDB and
    /// Redis; returns how many went. Safe to run in every replica at once.
    pub async fn sweep_expired(&self) -> Result<u64, HistoryError> {
        let Some(max_age) = self.retention.max_age_seconds else {
            return Ok(0);
        };
        let age_ms = i64::try_from(max_age.saturating_mul(1000)).unwrap_or(i64::MAX);
        let cutoff = mongodb::bson::DateTime::from_millis(
            mongodb::bson::DateTime::now()
                .timestamp_millis()
                .saturating_sub(age_ms),
        );
        let mut expired = 0;
        loop {
            let idle = self
                .durable
                .sessions_idle_since(cutoff, SWEEP_BATCH)
                .await?;
            let mut progressed = false;
            for storage in &idle {
                let Some(session) = SessionKey::from_storage(storage) else {
                    tracing::warn!(session = %storage, "a stored session key the service cannot read; left alone");
                    continue;
                };
                if self.durable.expire(&session, cutoff).await?.is_some() {
                    progressed = true;
                    expired += 1;
                    if let Err(e) = self.recent.delete(&session).await {
                        tracing::warn!(error = %e, "redis unavailable; an expired session's copy lives until its TTL");
                        self.set_stale(&session, true);
                    }
                    self.forget_idempotent_answers(&session).await;
                }
            }
            if (idle.len() as i64) < SWEEP_BATCH || !progressed {
                return Ok(expired);
            }
        }
    }

    fn is_stale(&self, session: &SessionKey) -> bool {
        self.stale
            .lock()
            .expect("stale set lock")
            .contains(session.as_str())
    }

    fn set_stale(&self, session: &SessionKey, stale: bool) {
        let mut set = self.stale.lock().expect("stale set lock");
        if stale {
            set.insert(session.as_str().to_string());
        } else {
            set.remove(session.as_str());
        }
    }

    /// Redis first; on a miss (or Redis down) MongoDB, then Redis is refilled so the next turn
    /// is fast again.
    async fn load_recent(&self, session: &SessionKey) -> Result<Vec<RecentMessage>, HistoryError> {
        let stale = self.is_stale(session);
        if !stale {
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
        }
        let limit = self.recent.capacity();
        let loaded = self.durable.last_messages(session, limit).await;
        self.metrics.store_op("mongodb", "load", loaded.is_ok());
        let messages: Vec<RecentMessage> = loaded?.into_iter().map(RecentMessage::from).collect();
        if stale {
            let replaced = self.recent.replace(session, &messages).await;
            self.observe_redis("refill", replaced.is_ok());
            if replaced.is_ok() {
                self.set_stale(session, false);
            }
        } else if !messages.is_empty() {
            let refilled = self.recent.add(session, &messages).await;
            self.observe_redis("refill", refilled.is_ok());
        }
        Ok(messages)
    }

    /// MongoDB first, since only that makes the turn durable; Redis after, best effort.
    async fn store_turn(
        &self,
        session: &SessionKey,
        turn: NewTurn<'_>,
    ) -> Result<StoredTurn, HistoryError> {
        let stored = self.durable.append_turn(session, &turn).await;
        self.metrics.store_op("mongodb", "append", stored.is_ok());
        let (stored, messages) = stored?;
        let recent: Vec<RecentMessage> = messages.into_iter().map(RecentMessage::from).collect();
        let cached = self.recent.add(session, &recent).await;
        if let Err(e) = &cached {
            tracing::warn!(error = %e, "redis unavailable, turn stored in mongodb only; its copy is stale");
            self.set_stale(session, true);
        }
        self.observe_redis("append", cached.is_ok());
        if let Some(keep) = self.retention.max_messages_per_session {
            let trimmed = self.durable.trim(session, stored.assistant_seq, keep).await;
            self.metrics.store_op("mongodb", "trim", trimmed.is_ok());
            if let Err(e) = trimmed {
                // The next turn trims again; the turn itself is stored.
                tracing::warn!(error = %e, "could not trim the session to its retention");
            }
        }
        Ok(stored)
    }

    async fn erase(&self, session: &SessionKey) -> Result<Erased, HistoryError> {
        let deleted = self.durable.delete(session).await;
        self.metrics.store_op("mongodb", "delete", deleted.is_ok());
        let messages = deleted?;
        let cache = self.recent.delete(session).await;
        self.observe_redis("delete", cache.is_ok());
        if let Err(e) = &cache {
            tracing::warn!(error = %e, "redis unavailable; its copy is stale until replaced");
            self.set_stale(session, true);
        }
        self.forget_idempotent_answers(session).await;
        Ok(Erased {
            messages,
            cache_erased: cache.is_ok(),
            cached_answers: cache.as_ref().copied().unwrap_or(0),
        })
    }

    /// Best effort for a session deleted or expired on its own (an end-user erasure checks).
    async fn forget_idempotent_answers(&self, session: &SessionKey) {
        if let Some(idempotency) = &self.idempotency
            && let Err(e) = idempotency.forget_session(session).await
        {
            tracing::warn!(error = %e, "idempotency records of an erased session are left");
        }
    }

    fn observe_redis(&self, operation: &'static str, ok: bool) {
        self.metrics.store_op("redis", operation, ok);
        self.metrics.redis_up.set(i64::from(ok));
    }
}

impl SessionHistory for HistoryStore {
    fn recent_messages<'a>(
        &'a self,
        session: &'a SessionKey,
    ) -> HistoryFuture<'a, Result<Vec<RecentMessage>, HistoryError>> {
        Box::pin(self.load_recent(session))
    }

    fn latest_summary<'a>(
        &'a self,
        session: &'a SessionKey,
    ) -> HistoryFuture<'a, Result<Option<StoredSummary>, HistoryError>> {
        Box::pin(async move {
            let found = self.durable.latest_summary(session).await;
            self.metrics
                .store_op("mongodb", "summary_load", found.is_ok());
            found
        })
    }

    fn claim_summary<'a>(
        &'a self,
        session: &'a SessionKey,
        turn_seq: i64,
        every_turns: u32,
    ) -> HistoryFuture<'a, Result<bool, HistoryError>> {
        Box::pin(async move {
            let claimed = self
                .durable
                .claim_summary(session, turn_seq, every_turns)
                .await;
            self.metrics
                .store_op("mongodb", "summary_claim", claimed.is_ok());
            claimed
        })
    }

    fn store_summary<'a>(
        &'a self,
        session: &'a SessionKey,
        summary: &'a NewSummary,
    ) -> HistoryFuture<'a, Result<bool, HistoryError>> {
        Box::pin(async move {
            let stored = self.durable.store_summary(session, summary).await;
            self.metrics
                .store_op("mongodb", "summary_store", stored.is_ok());
            stored
        })
    }

    fn append_turn<'a>(
        &'a self,
        session: &'a SessionKey,
        turn: NewTurn<'a>,
    ) -> HistoryFuture<'a, Result<StoredTurn, HistoryError>> {
        Box::pin(self.store_turn(session, turn))
    }

    fn page<'a>(
        &'a self,
        session: &'a SessionKey,
        after_seq: i64,
        limit: i64,
    ) -> HistoryFuture<'a, Result<Vec<StoredMessage>, HistoryError>> {
        Box::pin(async move {
            let page = self.durable.page(session, after_seq, limit).await;
            self.metrics.store_op("mongodb", "page", page.is_ok());
            page
        })
    }

    fn delete<'a>(
        &'a self,
        session: &'a SessionKey,
    ) -> HistoryFuture<'a, Result<Erased, HistoryError>> {
        Box::pin(self.erase(session))
    }

    fn session_exists<'a>(
        &'a self,
        session: &'a SessionKey,
    ) -> HistoryFuture<'a, Result<bool, HistoryError>> {
        Box::pin(self.durable.session_exists(session))
    }

    fn health(&self) -> HistoryFuture<'_, StoreHealth> {
        Box::pin(async move {
            let (mongodb, redis) = tokio::join!(self.durable.ping(), self.recent.ping());
            self.observe_redis("ping", redis.is_ok());
            StoreHealth {
                mongodb: mongodb.is_ok(),
                redis: redis.is_ok(),
                mongodb_error: mongodb.err(),
                redis_error: redis.err(),
            }
        })
    }
}

/// Runs [`HistoryStore::sweep_expired`] every `retention.sweepIntervalSeconds` (with up to 10 %
/// jitter, so replicas spread out) for as long as `history` is alive; nothing when no maximum
/// age is set.
pub fn spawn_sweeper(history: &Arc<HistoryStore>) {
    if history.retention.max_age_seconds.is_none() {
        return;
    }
    let interval = std::time::Duration::from_secs(history.retention.sweep_interval_seconds);
    let history = Arc::downgrade(history);
    tokio::spawn(async move {
        // Finds out at start-up whether the server expires sessions too (`history_ttl_index`);
        // a failure here is retried before the first write.
        if let Some(history) = history.upgrade()
            && let Err(e) = history.durable.ensure_indexes().await
        {
            tracing::warn!(error = %e, "could not make the history's indexes yet; trying again before the first write");
        }
        loop {
            let jitter = interval.mul_f64(rand::random::<f64>() * 0.1);
            tokio::time::sleep(interval + jitter).await;
            let Some(history) = history.upgrade() else {
                return;
            };
            let swept = history.sweep_expired().await;
            history.metrics.store_op("mongodb", "sweep", swept.is_ok());
            match swept {
                Ok(0) => {}
                Ok(expired) => tracing::info!(expired, "retention: expired sessions erased"),
                Err(e) => tracing::warn!(error = %e, "retention sweep failed; trying again later"),
            }
        }
    });
}
