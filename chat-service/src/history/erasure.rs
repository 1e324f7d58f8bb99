//! Erasing an end user (`DELETE /v1/users/{user}`): every session of theirs inside one principal
//! goes from every store (Redis's recent copy, the response-cache answers generated for it, the
//! idempotency records holding its answers, then its messages and session in MongoDB), and a
//! record of the erasure stays in `<collection>_erasures`: who asked (principal, request id),
//! when, and how many sessions, messages and cached answers went; never content. The end user's
//! label is kept only while the erasure is pending (the resumer needs it); a finished record
//! keeps its SHA-256.
//!
//! The record is written first, as `pending`, with a lease that the erasing replica renews after
//! every session. A replica killed mid-erasure leaves a pending record whose lease runs out; every
//! replica looks for such records at start-up and every [`RESUME_INTERVAL`], claims one by
//! renewing its lease, and finishes it. Per session the stores are erased Redis first and MongoDB
//! last, so that a session whose erasure failed half-way is still listed under the end user and
//! is erased again, whole, by the retry; the counts of a resumed erasure add up what each run
//! removed.

use std::sync::Arc;
use std::time::Duration;

use mongodb::bson::{self, Document, doc};
use mongodb::options::ReturnDocument;
use sha2::{Digest, Sha256};

use super::records::SESSION_BATCH;
use super::{HistoryError, HistoryStore};
use crate::conversation::{EndUser, Principal, SessionId, SessionKey};

/// How long a replica owns an erasure it works on without renewing its lease.
const LEASE: Duration = Duration::from_secs(10);
/// How often each replica looks for erasures whose replica stopped.
pub const RESUME_INTERVAL: Duration = Duration::from_secs(5);

const PENDING: &str = "pending";
const DONE: &str = "done";

/// What one erasure removed (all its runs together).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErasureReport {
    pub id: String,
    pub sessions: u64,
    pub messages: u64,
    pub cached_answers: u64,
}

fn lease_until() -> bson::DateTime {
    let lease = i64::try_from(LEASE.as_millis()).unwrap_or(i64::MAX);
    bson::DateTime::from_millis(
        bson::DateTime::now()
            .timestamp_millis()
            .saturating_add(lease),
    )
}

fn count(record: &Document, field: &str) -> u64 {
    match record.get(field) {
        Some(bson::Bson::Int64(n)) => u64::try_from(*n).unwrap_or(0),
        Some(bson::Bson::Int32(n)) => u64::try_from(*n).unwrap_or(0),
        Some(bson::Bson::Double(n)) => *n as u64,
        _ => 0,
    }
}

impl HistoryStore {
    /// Records the erasure of `end_user`'s sessions inside `owner`, then carries it out. An
    /// end user without sessions is erased at once, with counts of 0.
    pub async fn erase_end_user(
        &self,
        owner: &Principal,
        end_user: &EndUser,
        request_id: &str,
    ) -> Result<ErasureReport, HistoryError> {
        let id = SessionId::generate().to_string();
        let intent = doc! {
            "_id": &id,
            "state": PENDING,
            "principal": owner.as_str(),
            "end_user": end_user.as_str(),
            "end_user_sha256": hex::encode(Sha256::digest(end_user.as_str().as_bytes())),
            "request_id": request_id,
            "requested_at": bson::DateTime::now(),
            "lease_until": lease_until(),
            "sessions": 0_i64,
            "messages": 0_i64,
            "cached_answers": 0_i64,
        };
        let recorded = self
            .durable
            .bounded(self.durable.erasures.insert_one(intent))
            .await;
        self.metrics
            .store_op("mongodb", "erasure", recorded.is_ok());
        recorded?;
        self.run_erasure(&id, owner, end_user).await
    }

    async fn run_erasure(
        &self,
        id: &str,
        owner: &Principal,
        end_user: &EndUser,
    ) -> Result<ErasureReport, HistoryError> {
        loop {
            // Erased sessions leave the listing, so each batch starts from the first.
            let batch = self
                .durable
                .list_sessions(owner, Some(end_user), None, SESSION_BATCH)
                .await?;
            if batch.is_empty() {
                break;
            }
            for record in batch {
                if let Some(delay) = self.fault_erase_delay {
                    tokio::time::sleep(delay).await;
                }
                let (messages, cached_answers) = self.erase_session_everywhere(&record.key).await?;
                let progress = doc! {
                    "$inc": {
                        "sessions": 1_i64,
                        "messages": i64::try_from(messages).unwrap_or(i64::MAX),
                        "cached_answers": i64::try_from(cached_answers).unwrap_or(i64::MAX),
                    },
                    "$set": { "lease_until": lease_until() },
                };
                self.durable
                    .bounded(
                        self.durable
                            .erasures
                            .update_one(doc! { "_id": id }, progress),
                    )
                    .await?;
            }
        }
        let finish = doc! {
            "$set": { "state": DONE, "completed_at": bson::DateTime::now() },
            "$unset": { "end_user": "", "lease_until": "" },
        };
        let record = self
            .durable
            .bounded(
                self.durable
                    .erasures
                    .find_one_and_update(doc! { "_id": id }, finish)
                    .return_document(ReturnDocument::After),
            )
            .await?
            .ok_or_else(|| HistoryError::Inconsistent(format!("erasure record {id} vanished")))?;
        Ok(ErasureReport {
            id: id.to_string(),
            sessions: count(&record, "sessions"),
            messages: count(&record, "messages"),
            cached_answers: count(&record, "cached_answers"),
        })
    }

    /// One session from every store, in the order the module docs give; the messages and
    /// cached answers it removed. Any store failing fails the session, which stays listed.
    async fn erase_session_everywhere(
        &self,
        session: &SessionKey,
    ) -> Result<(u64, u64), HistoryError> {
        let redis = |e: super::recent::RecentCacheError| HistoryError::Unavailable(e.to_string());
        let cached_answers = self.recent.delete(session).await.map_err(redis)?;
        if let Some(idempotency) = &self.idempotency {
            idempotency.forget_session(session).await?;
        }
        let messages = self.durable.delete(session).await?;
        // A turn that landed in between may have refilled the copy; its messages are gone now.
        if self.recent.delete(session).await.is_err() {
            self.set_stale(session, true);
        }
        Ok((messages, cached_answers))
    }

    /// Finishes every pending erasure whose lease ran out (its replica stopped); how many.
    pub async fn resume_erasures(&self) -> Result<u64, HistoryError> {
        let mut resumed = 0;
        loop {
            let claim = doc! {
                "$set": { "lease_until": lease_until() },
                "$inc": { "resumed": 1_i64 },
            };
            let claimed = self
                .durable
                .bounded(
                    self.durable
                        .erasures
                        .find_one_and_update(
                            doc! { "state": PENDING, "lease_until": { "$lt": bson::DateTime::now() } },
                            claim,
                        )
                        .return_document(ReturnDocument::After),
                )
                .await?;
            let Some(record) = claimed else {
                return Ok(resumed);
            };
            let (Ok(id), Ok(owner), Some(end_user)) = (
                record.get_str("_id"),
                record.get_str("principal"),
                record
                    .get_str("end_user")
                    .ok()
                    .and_then(|u| EndUser::parse(u).ok()),
            ) else {
                return Err(HistoryError::Inconsistent(format!(
                    "pending erasure record without its subject: {:?}",
                    record.get("_id")
                )));
            };
            let owner = Principal::from_stored(owner);
            let report = self.run_erasure(id, &owner, &end_user).await?;
            tracing::info!(
                erasure = %report.id,
                sessions = report.sessions,
                messages = report.messages,
                "finished an erasure that a stopped replica had begun"
            );
            resumed += 1;
        }
    }
}

/// Runs [`HistoryStore::resume_erasures`] now and every [`RESUME_INTERVAL`] for as long as
/// `history` is alive.
pub fn spawn_erasure_resumer(history: &Arc<HistoryStore>) {
    let history = Arc::downgrade(history);
    tokio::spawn(async move {
        loop {
            let Some(store) = history.upgrade() else {
                return;
            };
            let resumed = store.resume_erasures().await;
            store
                .metrics
                .store_op("mongodb", "erasure", resumed.is_ok());
            if let Err(e) = resumed {
                tracing::warn!(error = %e, "pending erasures not resumed; trying again later");
            }
            drop(store);
            tokio::time::sleep(RESUME_INTERVAL).await;
        }
    });
}
