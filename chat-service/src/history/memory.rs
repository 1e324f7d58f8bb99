//! A test double of [`SessionHistory`] in process memory, so that the HTTP layer can be tested
//! without Redis and MongoDB. It keeps the contract the handlers rely on (sequence numbers from
//! 1, pages after a sequence number, a session exists once a turn was stored) and nothing more.

use std::collections::HashMap;
use std::sync::Mutex;

use mongodb::bson;

use super::{
    Erased, HistoryError, HistoryFuture, NewTurn, RecentMessage, SessionHistory, StoreHealth,
    StoredMessage, StoredTurn,
};
use crate::conversation::SessionKey;

#[derive(Default)]
pub struct MemoryHistory {
    sessions: Mutex<HashMap<String, Vec<StoredMessage>>>,
}

impl MemoryHistory {
    fn with_session<T>(
        &self,
        session: &SessionKey,
        f: impl FnOnce(&mut Vec<StoredMessage>) -> T,
    ) -> T {
        let mut sessions = self.sessions.lock().expect("memory history lock");
        f(sessions.entry(session.as_str().to_string()).or_default())
    }

    fn ready<'a, T: Send + 'a>(value: T) -> HistoryFuture<'a, T> {
        Box::pin(std::future::ready(value))
    }
}

impl SessionHistory for MemoryHistory {
    fn recent_messages<'a>(
        &'a self,
        session: &'a SessionKey,
    ) -> HistoryFuture<'a, Result<Vec<RecentMessage>, HistoryError>> {
        let messages = self.with_session(session, |messages| {
            messages
                .iter()
                .map(|m| RecentMessage::from(m.clone()))
                .collect()
        });
        Self::ready(Ok(messages))
    }

    fn append_turn<'a>(
        &'a self,
        session: &'a SessionKey,
        turn: NewTurn<'a>,
    ) -> HistoryFuture<'a, Result<StoredTurn, HistoryError>> {
        let stored = self.with_session(session, |messages| {
            let first = messages.last().map_or(0, |m| m.seq) + 1;
            let added = turn.messages(
                session,
                first,
                &format!("turn-{first}"),
                bson::DateTime::now(),
            );
            let stored = StoredTurn {
                user_seq: first,
                assistant_seq: added.last().expect("a turn has a reply").seq,
            };
            messages.extend(added);
            stored
        });
        Self::ready(Ok(stored))
    }

    fn page<'a>(
        &'a self,
        session: &'a SessionKey,
        after_seq: i64,
        limit: i64,
    ) -> HistoryFuture<'a, Result<Vec<StoredMessage>, HistoryError>> {
        let page = self.with_session(session, |messages| {
            messages
                .iter()
                .filter(|m| m.seq > after_seq)
                .take(usize::try_from(limit).unwrap_or(0))
                .cloned()
                .collect()
        });
        Self::ready(Ok(page))
    }

    fn delete<'a>(
        &'a self,
        session: &'a SessionKey,
    ) -> HistoryFuture<'a, Result<Erased, HistoryError>> {
        let removed = self
            .sessions
            .lock()
            .expect("memory history lock")
            .remove(session.as_str())
            .map_or(0, |messages| messages.len() as u64);
        Self::ready(Ok(Erased {
            cached_answers: 0,
            messages: removed,
            cache_erased: true,
        }))
    }

    fn session_exists<'a>(
        &'a self,
        session: &'a SessionKey,
    ) -> HistoryFuture<'a, Result<bool, HistoryError>> {
        let exists = self
            .sessions
            .lock()
            .expect("memory history lock")
            .get(session.as_str())
            .is_some_and(|messages| !messages.is_empty());
        Self::ready(Ok(exists))
    }

    fn health(&self) -> HistoryFuture<'_, StoreHealth> {
        Self::ready(StoreHealth {
            mongodb: true,
            redis: true,
            mongodb_error: None,
            redis_error: None,
        })
    }
}
