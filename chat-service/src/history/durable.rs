//! Every message in MongoDB, one document per message, plus one document per session that hands
//! out sequence numbers. Written without transactions (FerretDB and DocumentDB setups may lack
//! them): a turn's messages (its input, then the reply) carry a shared `turn_id`, so a failed
//! write can be undone exactly.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{self, Document, doc};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::{ClientOptions, IndexOptions, ReturnDocument, Tls, TlsOptions};
use mongodb::{Client, Collection, Database, IndexModel};
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use super::{HistoryError, NewTurn, StoredTurn};
use crate::config::{MongoHistoryConfig, RetentionConfig};
use crate::conversation::{FinishReason, Role, SessionId, SessionKey};
use crate::tools::ToolCall;

/// MongoDB's duplicate-key error code.
const DUPLICATE_KEY: i32 = 11000;
/// Sequence allocation is atomic on MongoDB; retries matter where a compatible server's `$inc`
/// is not (FerretDB on SQLite) or where two first turns race to create the session document.
/// The unique index rejects the loser, which allocates again.
const SEQUENCE_ATTEMPTS: usize = 16;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredMessage {
    pub session_id: String,
    pub seq: i64,
    pub role: Role,
    pub content: String,
    /// Assistant messages: the tools the model called.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// Tool messages: the call this is the result of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    pub model: String,
    pub turn_id: String,
    /// True when only part of the reply was generated: the client left mid-stream or the back
    /// end failed after the first token.
    #[serde(default)]
    pub incomplete: bool,
    /// Assistant messages: `stop` or `length` when complete, `error` when the back end failed
    /// mid-answer, `cancelled` when the client left. Absent on user messages and on messages
    /// stored before this field existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<FinishReason>,
    pub created_at: bson::DateTime,
    /// Set on a summary (role `system`, `seq` the negated `covers_seq`, see `summaries.rs`):
    /// the last message it summarises. Absent on the conversation's own messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub covers_seq: Option<i64>,
    /// When the server may delete this message on its own (its TTL index, see [`Expiry`]);
    /// absent where the server has no TTL indexes or no maximum age is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_at: Option<bson::DateTime>,
}

/// The server's own expiry of the history: a backstop behind the retention sweeper for when no
/// replica sweeps (scaled to zero, or failing), on servers with TTL indexes (MongoDB,
/// DocumentDB). Every message and session document carries an `expire_at` that the server's
/// TTL index deletes it at, never sooner than `after` past the session's last turn.
///
/// `after` is the maximum age plus a grace of at least the Redis copy's lifetime and two sweep
/// intervals, so the sweeper, which erases MongoDB, Redis and the cached answers together, is
/// always first while it runs, and by the time the server deletes a session on its own its
/// Redis copy has expired too. The messages' `expire_at` is written `slack` further ahead,
/// so a busy session rewrites its older messages once per `slack`, not on every turn; the
/// session document goes another `slack` after its messages, so that it never goes first
/// (a new session document would hand out sequence numbers its old messages still hold).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    pub after: Duration,
    pub slack: Duration,
}

impl Expiry {
    /// `None` when retention sets no maximum age.
    pub fn for_retention(retention: &RetentionConfig, redis_ttl_seconds: u64) -> Option<Self> {
        let max_age = retention.max_age_seconds?;
        let grace = redis_ttl_seconds.max(retention.sweep_interval_seconds.saturating_mul(2));
        let after = Duration::from_secs(max_age.saturating_add(grace));
        Some(Self {
            after,
            slack: (after / 8).max(Duration::from_secs(1)),
        })
    }
}

/// `at` plus `by`, saturating.
pub(super) fn later(at: bson::DateTime, by: Duration) -> bson::DateTime {
    let by = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
    bson::DateTime::from_millis(at.timestamp_millis().saturating_add(by))
}

/// Name of the TTL index on `expire_at`, in the messages and the sessions collection.
const EXPIRY_INDEX: &str = "expire_at_ttl";

pub struct DurableHistory {
    database: Database,
    pub(super) messages: Collection<StoredMessage>,
    pub(super) sessions: Collection<Document>,
    /// `<collection>_erasures`: end-user erasures, pending and done (see `erasure.rs`).
    pub(super) erasures: Collection<Document>,
    /// Made before the first write; holds whether the server keeps the TTL indexes of
    /// `expiry` (false too when there is no `expiry`).
    indexes: OnceCell<bool>,
    expiry: Option<Expiry>,
    /// `history_ttl_index`: 1 with the TTL indexes in place, 0 when the server refused them.
    ttl_gauge: prometheus_client::metrics::gauge::Gauge,
    pub(super) timeout: Duration,
    /// Serialises the writes of one session within this replica, so that its turns do not fight
    /// over sequence numbers; across replicas the unique index and retries keep order.
    pub(super) session_locks: SessionLocks,
}

#[derive(Default)]
pub(super) struct SessionLocks {
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl SessionLocks {
    pub(super) async fn lock(&self, session: &SessionKey) -> SessionGuard<'_> {
        let lock = {
            let mut locks = self.locks.lock().expect("session lock table poisoned");
            locks
                .entry(session.as_str().to_string())
                .or_default()
                .clone()
        };
        let guard = lock.clone().lock_owned().await;
        SessionGuard {
            locks: self,
            session: session.as_str().to_string(),
            lock,
            guard: Some(guard),
        }
    }
}

pub(super) struct SessionGuard<'a> {
    locks: &'a SessionLocks,
    session: String,
    lock: Arc<tokio::sync::Mutex<()>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut locks = self
            .locks
            .locks
            .lock()
            .expect("session lock table poisoned");
        // Two references left: the table's and ours. Nobody else waits, so forget the session.
        if Arc::strong_count(&self.lock) == 2 {
            locks.remove(&self.session);
        }
    }
}

/// A driver error for an operation cut by [`DurableHistory::bounded`].
fn timed_out(timeout: Duration) -> mongodb::error::Error {
    mongodb::error::Error::custom(format!("mongodb did not answer within {timeout:?}"))
}

fn unavailable(e: mongodb::error::Error) -> HistoryError {
    HistoryError::Unavailable(e.to_string())
}

pub(crate) fn is_duplicate_key(error: &mongodb::error::Error) -> bool {
    match error.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(e)) => e.code == DUPLICATE_KEY,
        ErrorKind::InsertMany(e) => e
            .write_errors
            .as_ref()
            .is_some_and(|errors| errors.iter().any(|w| w.code == DUPLICATE_KEY)),
        ErrorKind::Command(e) => e.code == DUPLICATE_KEY,
        _ => false,
    }
}

impl DurableHistory {
    /// Creates the client (which connects lazily); indexes are made before the first write.
    pub async fn connect(
        uri: &str,
        config: &MongoHistoryConfig,
    ) -> Result<Self, mongodb::error::Error> {
        let timeout = Duration::from_millis(config.timeout_ms);
        let mut options = ClientOptions::parse(uri).await?;
        options.server_selection_timeout = Some(timeout);
        options.connect_timeout = Some(timeout);
        if let Some(tls) = &config.tls {
            // Verification stays on: only the trust anchors change (DocumentDB's CA bundle).
            options.tls = Some(Tls::Enabled(
                TlsOptions::builder()
                    .ca_file_path(PathBuf::from(&tls.ca_file))
                    .build(),
            ));
        }
        if let Some(retry_writes) = config.retry_writes {
            options.retry_writes = Some(retry_writes);
        }
        options
            .app_name
            .get_or_insert_with(|| "chat-service".into());
        let client = Client::with_options(options)?;
        let database = client.database(&config.database);
        Ok(Self {
            messages: database.collection(&config.collection),
            sessions: database.collection(&format!("{}_sessions", config.collection)),
            erasures: database.collection(&format!("{}_erasures", config.collection)),
            database,
            indexes: OnceCell::new(),
            expiry: None,
            ttl_gauge: Default::default(),
            timeout,
            session_locks: SessionLocks::default(),
        })
    }

    /// Lets the server expire the history too, where it has TTL indexes (see [`Expiry`]);
    /// `gauge` tells which it did.
    pub fn with_expiry(
        mut self,
        expiry: Option<Expiry>,
        gauge: prometheus_client::metrics::gauge::Gauge,
    ) -> Self {
        self.expiry = expiry;
        self.ttl_gauge = gauge;
        self
    }

    /// The expiry the server enforces: `None` until the indexes are made, and where the server
    /// refused its TTL indexes.
    pub(super) fn server_expiry(&self) -> Option<Expiry> {
        if self.indexes.get() == Some(&true) {
            self.expiry
        } else {
            None
        }
    }

    /// The database the history lives in, for records that belong next to it.
    pub fn database(&self) -> &Database {
        &self.database
    }

    /// Gives up after the configured timeout: the driver bounds connecting and server
    /// selection, not an operation on a server that stopped answering, which would otherwise
    /// hold the turn, and the session's write lock, for as long as the server stays stopped.
    pub(super) async fn bounded<T>(
        &self,
        operation: impl IntoFuture<Output = Result<T, mongodb::error::Error>>,
    ) -> Result<T, HistoryError> {
        tokio::time::timeout(self.timeout, operation.into_future())
            .await
            .unwrap_or_else(|_| Err(timed_out(self.timeout)))
            .map_err(unavailable)
    }

    /// Makes the indexes the history needs, once; the retention sweeper calls it at start-up,
    /// so that a server without TTL indexes is found before the first turn.
    pub(super) async fn ensure_indexes(&self) -> Result<(), HistoryError> {
        self.indexes
            .get_or_try_init(|| async {
                let index = IndexModel::builder()
                    .keys(doc! { "session_id": 1, "seq": 1 })
                    .options(
                        IndexOptions::builder()
                            .unique(true)
                            .name("session_id_seq_unique".to_string())
                            .build(),
                    )
                    .build();
                self.bounded(self.messages.create_index(index)).await?;
                if self.expiry.is_none() {
                    return Ok(false);
                }
                let made = tokio::time::timeout(self.timeout, self.create_expiry_indexes())
                    .await
                    .unwrap_or_else(|_| Err(timed_out(self.timeout)));
                match made {
                    Ok(()) => {
                        self.ttl_gauge.set(1);
                        tracing::info!(
                            index = EXPIRY_INDEX,
                            "retention: the MongoDB server expires idle sessions too (TTL indexes), behind the sweeper"
                        );
                        Ok(true)
                    }
                    // The server answered and refused (FerretDB: NotImplemented): it has no TTL
                    // indexes. A transport failure or timeout is tried again on the next write.
                    Err(e) if matches!(e.kind.as_ref(), ErrorKind::Command(_)) => {
                        self.ttl_gauge.set(0);
                        tracing::warn!(
                            error = %e,
                            "retention: the MongoDB server has no TTL indexes; the sweeper alone enforces maxAgeSeconds"
                        );
                        Ok(false)
                    }
                    Err(e) => Err(unavailable(e)),
                }
            })
            .await
            .map(|_| ())
    }

    async fn create_expiry_indexes(&self) -> Result<(), mongodb::error::Error> {
        let index = || {
            IndexModel::builder()
                .keys(doc! { "expire_at": 1 })
                .options(
                    IndexOptions::builder()
                        .expire_after(Duration::ZERO)
                        .name(EXPIRY_INDEX.to_string())
                        .build(),
                )
                .build()
        };
        self.messages.create_index(index()).await?;
        self.sessions.create_index(index()).await?;
        Ok(())
    }

    /// The `expire_at` the turn's new messages get. When the one the session's messages carry
    /// (`messages_expire_at` in its document) is less than `expiry.after` away, it moves
    /// `slack` further and every message of the session is rewritten with it, the messages
    /// first: a crash in between leaves the old value in the session document, and the next
    /// turn writes again.
    async fn extend_expiry(
        &self,
        session: &SessionKey,
        session_doc: &Document,
        expiry: Expiry,
    ) -> Result<bson::DateTime, HistoryError> {
        let due = later(bson::DateTime::now(), expiry.after);
        if let Ok(current) = session_doc.get_datetime("messages_expire_at")
            && *current >= due
        {
            return Ok(*current);
        }
        let renewed = later(due, expiry.slack);
        let session_goes = later(renewed, expiry.slack);
        self.bounded(self.messages.update_many(
            doc! { "session_id": session.as_str() },
            doc! { "$set": { "expire_at": renewed } },
        ))
        .await?;
        self.bounded(self.sessions.update_one(
            doc! { "_id": session.as_str() },
            doc! { "$set": { "messages_expire_at": renewed, "expire_at": session_goes } },
        ))
        .await?;
        Ok(renewed)
    }

    /// Stores the turn's messages under consecutive sequence numbers; returns them as stored.
    pub async fn append_turn(
        &self,
        session: &SessionKey,
        turn: &NewTurn<'_>,
    ) -> Result<(StoredTurn, Vec<StoredMessage>), HistoryError> {
        let end_user = turn.end_user;
        let count = turn.input.len() as i64 + 1;
        self.ensure_indexes().await?;
        let _session_lock = self.session_locks.lock(session).await;
        let turn_id = SessionId::generate().to_string();
        for attempt in 0..SEQUENCE_ATTEMPTS {
            if attempt > 0 {
                // Spread out writers from other replicas that collided on the same number.
                let jitter = rand::random::<u64>() % (5 * attempt as u64 + 5);
                tokio::time::sleep(Duration::from_millis(jitter)).await;
            }
            let now = bson::DateTime::now();
            let mut update = doc! {
                "$inc": { "next_seq": count },
                "$set": { "updated_at": now },
                "$setOnInsert": { "created_at": now },
            };
            if let Some(end_user) = end_user {
                update.insert("$addToSet", doc! { "end_users": end_user.as_str() });
            }
            let allocate = self
                .sessions
                .find_one_and_update(doc! { "_id": session.as_str() }, update)
                .upsert(true)
                .return_document(ReturnDocument::After);
            let allocated = tokio::time::timeout(self.timeout, allocate.into_future())
                .await
                .unwrap_or_else(|_| Err(timed_out(self.timeout)));
            let session_doc = match allocated {
                Ok(doc) => doc,
                // Two first turns of a new session both tried to insert its document.
                Err(e) if is_duplicate_key(&e) => continue,
                Err(e) => return Err(unavailable(e)),
            }
            .ok_or_else(|| {
                HistoryError::Inconsistent("upsert returned no session document".into())
            })?;
            let next = match session_doc.get("next_seq") {
                Some(bson::Bson::Int64(n)) => *n,
                Some(bson::Bson::Int32(n)) => i64::from(*n),
                Some(bson::Bson::Double(n)) => *n as i64,
                other => {
                    return Err(HistoryError::Inconsistent(format!(
                        "session next_seq is {other:?}"
                    )));
                }
            };
            let stored = StoredTurn {
                user_seq: next - count + 1,
                assistant_seq: next,
            };
            let mut documents = turn.messages(session, stored.user_seq, &turn_id, now);
            if let Some(expiry) = self.server_expiry() {
                let expire_at = self.extend_expiry(session, &session_doc, expiry).await?;
                for message in &mut documents {
                    message.expire_at = Some(expire_at);
                }
            }
            let inserted = tokio::time::timeout(
                self.timeout,
                self.messages
                    .insert_many(&documents)
                    .ordered(true)
                    .into_future(),
            )
            .await
            .unwrap_or_else(|_| Err(timed_out(self.timeout)));
            match inserted {
                Ok(_) => return Ok((stored, documents)),
                Err(e) => {
                    // Whatever part of this turn landed goes again: a turn is all its messages
                    // or none.
                    let undo = self
                        .bounded(self.messages.delete_many(
                            doc! { "session_id": session.as_str(), "turn_id": turn_id.as_str() },
                        ))
                        .await;
                    if let Err(undo_error) = undo {
                        tracing::error!(error = %undo_error, turn_id, "could not undo a partial turn");
                    }
                    if !is_duplicate_key(&e) {
                        return Err(unavailable(e));
                    }
                    tracing::debug!("sequence number taken, allocating another");
                }
            }
        }
        Err(HistoryError::Inconsistent(
            "could not allocate a sequence number".into(),
        ))
    }

    /// The last `limit` messages, oldest first.
    pub async fn last_messages(
        &self,
        session: &SessionKey,
        limit: i64,
    ) -> Result<Vec<StoredMessage>, HistoryError> {
        let mut messages: Vec<StoredMessage> = self
            .bounded(async {
                // Summaries have negative sequence numbers and are read on their own.
                self.messages
                    .find(doc! { "session_id": session.as_str(), "seq": { "$gt": 0 } })
                    .sort(doc! { "seq": -1 })
                    .limit(limit)
                    .await?
                    .try_collect()
                    .await
            })
            .await?;
        messages.reverse();
        Ok(messages)
    }

    /// Messages with `seq > after_seq`, oldest first.
    pub async fn page(
        &self,
        session: &SessionKey,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<StoredMessage>, HistoryError> {
        self.bounded(async {
            self.messages
                .find(doc! { "session_id": session.as_str(), "seq": { "$gt": after_seq.max(0) } })
                .sort(doc! { "seq": 1 })
                .limit(limit)
                .await?
                .try_collect()
                .await
        })
        .await
    }

    pub async fn session_exists(&self, session: &SessionKey) -> Result<bool, HistoryError> {
        let found = self
            .bounded(self.sessions.find_one(doc! { "_id": session.as_str() }))
            .await?;
        Ok(found.is_some())
    }

    /// Storage keys of up to `limit` sessions whose last turn is older than `cutoff`.
    pub async fn sessions_idle_since(
        &self,
        cutoff: bson::DateTime,
        limit: i64,
    ) -> Result<Vec<String>, HistoryError> {
        let found: Vec<Document> = self
            .bounded(async {
                self.sessions
                    .find(doc! { "updated_at": { "$lt": cutoff } })
                    .projection(doc! { "_id": 1 })
                    .limit(limit)
                    .await?
                    .try_collect()
                    .await
            })
            .await?;
        Ok(found
            .iter()
            .filter_map(|d| d.get_str("_id").ok().map(str::to_string))
            .collect())
    }

    /// Erases a session for the retention sweep, only if its last turn is still older than
    /// `cutoff`: the session document goes first and only while idle, so a turn that arrives
    /// meanwhile keeps the session (its allocation recreates the document) and its messages
    /// (newer than `cutoff`, so not deleted). Returns the messages deleted, `None` when the
    /// session turned out to be in use.
    pub async fn expire(
        &self,
        session: &SessionKey,
        cutoff: bson::DateTime,
    ) -> Result<Option<u64>, HistoryError> {
        let _session_lock = self.session_locks.lock(session).await;
        let gone = self
            .bounded(
                self.sessions
                    .delete_one(doc! { "_id": session.as_str(), "updated_at": { "$lt": cutoff } }),
            )
            .await?;
        if gone.deleted_count == 0 {
            return Ok(None);
        }
        let deleted = self
            // Summaries go with the session however recent they are.
            .bounded(self.messages.delete_many(doc! {
                "session_id": session.as_str(),
                "$or": [{ "created_at": { "$lt": cutoff } }, { "seq": { "$lt": 0 } }],
            }))
            .await?;
        Ok(Some(deleted.deleted_count))
    }

    /// Deletes the messages of a session older than its newest `keep` (the last stored one has
    /// `newest_seq`).
    pub async fn trim(
        &self,
        session: &SessionKey,
        newest_seq: i64,
        keep: u32,
    ) -> Result<u64, HistoryError> {
        let deleted = self
            .bounded(self.messages.delete_many(doc! {
                "session_id": session.as_str(),
                // The session's summary (negative `seq`) stays: it is one message, and the
                // context needs it most once the messages it covers are gone.
                "seq": { "$gt": 0, "$lte": newest_seq - i64::from(keep) },
            }))
            .await?;
        Ok(deleted.deleted_count)
    }

    /// Deletes the messages first, so a crash in between leaves a session document that the
    /// next delete removes, never orphaned messages.
    pub async fn delete(&self, session: &SessionKey) -> Result<u64, HistoryError> {
        let deleted = self
            .bounded(
                self.messages
                    .delete_many(doc! { "session_id": session.as_str() }),
            )
            .await?;
        self.bounded(self.sessions.delete_one(doc! { "_id": session.as_str() }))
            .await?;
        Ok(deleted.deleted_count)
    }

    /// `Err` carries the reason (the driver's, with the TLS or authentication failure in it),
    /// for `/readyz`.
    pub async fn ping(&self) -> Result<(), String> {
        let ping = self.database.run_command(doc! { "ping": 1 });
        let bound = ping_bound(self.timeout);
        match tokio::time::timeout(bound, ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer to ping within {bound:?}")),
        }
    }
}

/// How long `/readyz` waits for a ping. The driver gives up selecting a server after `timeout`
/// with an error that says why (an untrusted certificate, a refused login); a bound of exactly
/// `timeout` raced that error and, on a busy node, replaced it with a bare "no answer". Half as
/// long again lets the driver's reason arrive first; the bound itself then only catches a server
/// that was selected and went quiet.
fn ping_bound(timeout: Duration) -> Duration {
    timeout + timeout / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retention(max_age: Option<u64>, sweep: u64) -> RetentionConfig {
        RetentionConfig {
            max_age_seconds: max_age,
            max_messages_per_session: None,
            sweep_interval_seconds: sweep,
        }
    }

    /// A server that closes every connection it accepts (a narrow stand-in: no MongoDB is
    /// needed to see which error `/readyz` gets when the driver cannot talk to one).
    fn closing_server() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for connection in listener.incoming() {
                drop(connection);
            }
        });
        port
    }

    #[tokio::test]
    async fn a_failed_ping_carries_the_drivers_reason_not_a_bare_timeout() {
        let port = closing_server();
        let config: MongoHistoryConfig =
            serde_json::from_value(serde_json::json!({ "timeoutMs": 300 })).unwrap();
        let uri = format!("mongodb://127.0.0.1:{port}/?directConnection=true");
        let history = DurableHistory::connect(&uri, &config).await.unwrap();
        // Many at once: the race this guards against went the wrong way only on a busy node.
        let pings = (0..200).map(|_| history.ping());
        for reason in futures::future::join_all(pings).await {
            let reason = reason.unwrap_err();
            assert!(
                !reason.starts_with("no answer") && reason.contains(&format!("{port}")),
                "the reason names the server and what went wrong with it: {reason}"
            );
        }
    }

    #[test]
    fn the_server_expires_nothing_before_the_redis_copy_and_two_sweeps_are_past() {
        assert_eq!(Expiry::for_retention(&retention(None, 300), 3600), None);
        // The Redis copy lives longer than two sweeps.
        let expiry = Expiry::for_retention(&retention(Some(86_400), 300), 3600).unwrap();
        assert_eq!(expiry.after, Duration::from_secs(86_400 + 3600));
        assert_eq!(expiry.slack, Duration::from_secs((86_400 + 3600) / 8));
        // Two sweeps take longer than the Redis copy lives.
        let expiry = Expiry::for_retention(&retention(Some(600), 3600), 60).unwrap();
        assert_eq!(expiry.after, Duration::from_secs(600 + 7200));
        // A second at least between rewrites of a session's messages.
        let expiry = Expiry::for_retention(&retention(Some(1), 1), 1).unwrap();
        assert_eq!(expiry.after, Duration::from_secs(3));
        assert_eq!(expiry.slack, Duration::from_secs(1));
    }
}
