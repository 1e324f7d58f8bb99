//! Response cache in Redis for deterministic turns (see `CacheConfig`), with identical concurrent
//! misses coalesced into one back-end call (single flight, within this replica).
//!
//! The key is SHA-256 over the model, the generation parameters and the whole context actually
//! sent (system prompt, history, new message), so the same last message after a different history
//! is a different entry. Unless `cache.shared` is set, the principal is part of the key too: one
//! caller never gets, nor can time, an answer that only another caller's context produced.
//! Answers are stored as their token chunks, so a streamed hit replays the
//! way the original streamed. An answer generated for a session is also listed in that session's
//! index set (`<prefix>:session:<key>:responses`), so that erasing the session (its DELETE, the
//! retention sweep, an end user's erasure) erases the answers its content produced; see
//! [`crate::history::RecentCache::delete`].
//!
//! Single flight is written here rather than taken from a crate: it has to hand over a streamed
//! generation's final result and release waiters when the leader fails or its client leaves,
//! which is a `watch` channel and a drop guard.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::conversation::{ContextMessage, FinishReason, Principal, Sampling, SessionKey, Usage};
use crate::history::session_redis_key;
use crate::metrics::Metrics;

const REDIS_TIMEOUT: Duration = Duration::from_millis(500);

/// A finished answer as stored in Redis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedAnswer {
    pub tokens: Vec<String>,
    pub usage: Usage,
    pub finish_reason: FinishReason,
}

type FlightResult = Option<Arc<CachedAnswer>>;

pub struct ResponseCache {
    redis: ConnectionManager,
    key_prefix: String,
    ttl_seconds: u64,
    /// One cache for all principals (`cache.shared`).
    shared: bool,
    in_flight: Mutex<HashMap<String, watch::Receiver<FlightResult>>>,
    metrics: Arc<Metrics>,
}

/// What a lookup found.
pub enum Lookup {
    /// An answer, from Redis or from an identical generation that was in flight.
    Hit(CachedAnswer),
    /// Nothing cached: this request generates, and must hand the answer to the leader.
    Miss(FlightLeader),
}

/// The one request generating an answer others wait for. Dropping it without `complete` (the
/// generation failed or its client left) releases the waiters, which then generate themselves.
pub struct FlightLeader {
    cache: Arc<ResponseCache>,
    key: String,
    /// The index set of the session the answer is generated for.
    index: Option<String>,
    result: watch::Sender<FlightResult>,
}

impl FlightLeader {
    /// Stores the answer in Redis, then wakes the waiters.
    pub async fn complete(self, answer: CachedAnswer) {
        self.cache
            .put(&self.key, self.index.as_deref(), &answer)
            .await;
        self.result.send_replace(Some(Arc::new(answer)));
    }
}

impl Drop for FlightLeader {
    fn drop(&mut self) {
        let mut in_flight = self.cache.in_flight.lock().expect("in-flight lock");
        // Only our own entry: a leader that took over after a failed one has its own.
        if in_flight
            .get(&self.key)
            .is_some_and(|receiver| receiver.same_channel(&self.result.subscribe()))
        {
            in_flight.remove(&self.key);
        }
    }
}

impl ResponseCache {
    /// On the service's one Redis connection.
    pub fn new(
        redis: ConnectionManager,
        key_prefix: &str,
        ttl_seconds: u64,
        shared: bool,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            redis,
            key_prefix: key_prefix.to_string(),
            ttl_seconds,
            shared,
            in_flight: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// `<prefix>:response:<sha256>` of the principal (unless shared), the model, parameters and
    /// full context.
    pub fn key(
        &self,
        principal: &Principal,
        model: &str,
        max_tokens: u32,
        temperature: f32,
        sampling: &Sampling,
        messages: &[ContextMessage],
    ) -> String {
        let owner = if self.shared { "" } else { principal.as_str() };
        let material = serde_json::json!({
            "principal": owner,
            "model": model,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "sampling": sampling,
            "messages": messages,
        });
        let digest = Sha256::digest(material.to_string().as_bytes());
        format!("{}:response:{}", self.key_prefix, hex::encode(digest))
    }

    async fn get(&self, key: &str) -> Option<CachedAnswer> {
        let mut connection = self.redis.clone();
        let mut command = redis::cmd("GET");
        command.arg(key);
        let stored = tokio::time::timeout(
            REDIS_TIMEOUT,
            command.query_async::<Option<String>>(&mut connection),
        )
        .await;
        match stored {
            Ok(Ok(Some(text))) => serde_json::from_str(&text).ok(),
            Ok(Ok(None)) => None,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "response cache unavailable");
                None
            }
            Err(_) => None,
        }
    }

    /// The entry and its place in the session's index in one transaction, so that an erasure
    /// of the session sees both or neither.
    async fn put(&self, key: &str, index: Option<&str>, answer: &CachedAnswer) {
        let mut connection = self.redis.clone();
        let ttl = self.ttl_seconds.max(1);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .set_ex(
                key,
                serde_json::to_string(answer).expect("plain struct serialises"),
                ttl,
            )
            .ignore();
        if let Some(index) = index {
            pipe.sadd(index, key)
                .ignore()
                .expire(index, i64::try_from(ttl).unwrap_or(i64::MAX))
                .ignore();
        }
        match tokio::time::timeout(REDIS_TIMEOUT, pipe.query_async::<()>(&mut connection)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "answer not cached"),
            Err(_) => tracing::warn!("answer not cached: redis timed out"),
        }
    }

    /// `<prefix>:session:<key>:responses`: the cached answers generated for `session`.
    pub fn index_key(&self, session: &SessionKey) -> String {
        session_redis_key(&self.key_prefix, session, "responses")
    }

    /// Redis first; on a miss, joins an identical generation already running here, or becomes
    /// the one that runs it (for `session`, whose index then lists the answer).
    pub async fn lookup(self: &Arc<Self>, key: &str, session: Option<&SessionKey>) -> Lookup {
        let index = session.map(|session| self.index_key(session));
        if let Some(answer) = self.get(key).await {
            self.metrics.cache_hits.inc();
            return Lookup::Hit(answer);
        }
        let joined = {
            let mut in_flight = self.in_flight.lock().expect("in-flight lock");
            match in_flight.get(key) {
                Some(receiver) => Err(receiver.clone()),
                None => {
                    let (sender, receiver) = watch::channel(None);
                    in_flight.insert(key.to_string(), receiver);
                    Ok(FlightLeader {
                        cache: self.clone(),
                        key: key.to_string(),
                        index: index.clone(),
                        result: sender,
                    })
                }
            }
        };
        match joined {
            Ok(leader) => {
                // A leader may have stored its answer between our GET and taking the lock.
                if let Some(answer) = self.get(key).await {
                    self.metrics.cache_hits.inc();
                    leader.result.send_replace(Some(Arc::new(answer.clone())));
                    return Lookup::Hit(answer);
                }
                self.metrics.cache_misses.inc();
                return Lookup::Miss(leader);
            }
            Err(mut receiver) => {
                if let Ok(answer) = receiver.wait_for(Option::is_some).await
                    && let Some(answer) = answer.as_ref()
                {
                    self.metrics.cache_coalesced.inc();
                    return Lookup::Hit(answer.as_ref().clone());
                }
            }
        }
        // The leader failed or its client left: generate without waiting again.
        self.metrics.cache_misses.inc();
        let (result, _) = watch::channel(None);
        Lookup::Miss(FlightLeader {
            cache: self.clone(),
            key: key.to_string(),
            index,
            result,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversation::Role;

    #[tokio::test]
    async fn the_key_covers_principal_model_parameters_and_the_whole_context() {
        let redis = crate::state::redis_connection("redis://127.0.0.1:9").unwrap();
        let metrics = Arc::new(Metrics::new());
        let cache = ResponseCache::new(redis.clone(), "p", 60, false, metrics.clone());
        let shared_cache = ResponseCache::new(redis, "p", 60, true, metrics);
        let (a, b) = (Principal::api_key("a"), Principal::api_key("b"));
        let plain = Sampling::default();
        let seeded = Sampling {
            seed: Some(7),
            ..Sampling::default()
        };
        let context = [
            ContextMessage::new(Role::User, "a"),
            ContextMessage::new(Role::User, "same last"),
        ];
        let key = cache.key(&a, "m", 16, 0.0, &plain, &context);
        assert!(key.starts_with("p:response:"));
        assert_eq!(key, cache.key(&a, "m", 16, 0.0, &plain, &context));
        let other_history = [
            ContextMessage::new(Role::User, "b"),
            ContextMessage::new(Role::User, "same last"),
        ];
        for different in [
            cache.key(&b, "m", 16, 0.0, &plain, &context),
            cache.key(&a, "other-model", 16, 0.0, &plain, &context),
            cache.key(&a, "m", 17, 0.0, &plain, &context),
            cache.key(&a, "m", 16, 0.5, &plain, &context),
            cache.key(&a, "m", 16, 0.0, &seeded, &context),
            cache.key(&a, "m", 16, 0.0, &plain, &other_history),
            cache.key(&a, "m", 16, 0.0, &plain, &context[1..]),
        ] {
            assert_ne!(key, different);
        }
        assert_eq!(
            shared_cache.key(&a, "m", 16, 0.0, &plain, &context),
            shared_cache.key(&b, "m", 16, 0.0, &plain, &context),
            "a shared cache serves every principal"
        );
    }

    #[test]
    fn cached_answers_keep_the_finish_reason_text() {
        let answer = CachedAnswer {
            tokens: vec!["he".into(), "llo".into()],
            usage: Usage::new(2, 2),
            finish_reason: FinishReason::Length,
        };
        let stored = serde_json::to_value(&answer).unwrap();
        assert_eq!(stored["finish_reason"], "length");
        assert_eq!(
            serde_json::from_value::<CachedAnswer>(stored).unwrap(),
            answer
        );
    }
}
