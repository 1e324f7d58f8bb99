//! Summaries of sessions in MongoDB, next to the messages they summarise: a summary is a
//! message of the session (role `system`, `covers_seq` the last message it covers) whose `seq`
//! is the negated `covers_seq`. Negative sequence numbers keep summaries out of every read of
//! the conversation (contexts, pages, trimming), make two replicas storing the same summary
//! collide on the unique index instead of storing it twice, and order summaries so that the
//! first is the one that covers the most. Erasing a session's messages erases its summaries
//! with them; retention's expiry takes them however recent they are.
//!
//! The per-session bound on summary calls is a claim on the session document
//! (`summary_turn_seq`, the turn that last called), taken with one conditional update so that
//! replicas share it.

use mongodb::bson::{self, doc};

use super::HistoryError;
use super::durable::{DurableHistory, StoredMessage, is_duplicate_key};
use crate::conversation::{Role, SessionId, SessionKey};

/// A stored summary, as contexts use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSummary {
    /// The last message it summarises: every message up to this `seq` is in it.
    pub covers_seq: i64,
    pub content: String,
}

/// A summary to store.
#[derive(Debug, Clone)]
pub struct NewSummary {
    pub covers_seq: i64,
    pub content: String,
    /// The model that wrote it.
    pub model: String,
}

impl DurableHistory {
    pub async fn latest_summary(
        &self,
        session: &SessionKey,
    ) -> Result<Option<StoredSummary>, HistoryError> {
        let found = self
            .bounded(
                self.messages
                    .find_one(doc! { "session_id": session.as_str(), "seq": { "$lt": 0 } })
                    .sort(doc! { "seq": 1 }),
            )
            .await?;
        Ok(found.map(|message| StoredSummary {
            covers_seq: message.covers_seq.unwrap_or(-message.seq),
            content: message.content,
        }))
    }

    pub async fn claim_summary(
        &self,
        session: &SessionKey,
        turn_seq: i64,
        every_turns: u32,
    ) -> Result<bool, HistoryError> {
        // A turn is two sequence numbers.
        let last_allowed = turn_seq - 2 * i64::from(every_turns);
        let claimed = self
            .bounded(self.sessions.update_one(
                doc! {
                    "_id": session.as_str(),
                    "$or": [
                        { "summary_turn_seq": { "$exists": false } },
                        { "summary_turn_seq": { "$lte": last_allowed } },
                    ],
                },
                doc! { "$set": { "summary_turn_seq": turn_seq } },
            ))
            .await?;
        Ok(claimed.modified_count == 1)
    }

    /// Stores `summary` and removes the ones it supersedes. A summary stored while the session
    /// is erased must not outlive it: the erasure deletes the messages first, so a summary
    /// that finds no message from its last covered one on (retention trimming keeps the newest)
    /// right after it landed is deleted again; one that landed before the erasure's delete
    /// went with the rest.
    pub async fn store_summary(
        &self,
        session: &SessionKey,
        summary: &NewSummary,
    ) -> Result<bool, HistoryError> {
        let seq = -summary.covers_seq;
        let message = StoredMessage {
            session_id: session.as_str().to_string(),
            seq,
            role: Role::System,
            content: summary.content.clone(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            model: summary.model.clone(),
            turn_id: SessionId::generate().to_string(),
            incomplete: false,
            finish_reason: None,
            created_at: bson::DateTime::now(),
            covers_seq: Some(summary.covers_seq),
            // Written right after a turn: as late as that turn's messages, before the session
            // document (see `Expiry`) unless the summary call took longer than `slack`.
            expire_at: self
                .server_expiry()
                .map(|expiry| super::durable::later(bson::DateTime::now(), expiry.after)),
        };
        let inserted = tokio::time::timeout(
            self.timeout,
            std::future::IntoFuture::into_future(self.messages.insert_one(message)),
        )
        .await;
        match inserted {
            Ok(Ok(_)) => {}
            // Another replica stored the summary of the same messages.
            Ok(Err(e)) if is_duplicate_key(&e) => {}
            Ok(Err(e)) => return Err(HistoryError::Unavailable(e.to_string())),
            Err(_) => {
                return Err(HistoryError::Unavailable(format!(
                    "mongodb did not answer within {:?}",
                    self.timeout
                )));
            }
        }
        let covered = self
            .bounded(self.messages.count_documents(
                doc! { "session_id": session.as_str(), "seq": { "$gte": summary.covers_seq } },
            ))
            .await?;
        if covered == 0 {
            self.bounded(
                self.messages
                    .delete_one(doc! { "session_id": session.as_str(), "seq": seq }),
            )
            .await?;
            return Ok(false);
        }
        self.bounded(self.messages.delete_many(doc! {
            "session_id": session.as_str(),
            "seq": { "$lt": 0, "$gt": seq },
        }))
        .await?;
        Ok(true)
    }
}
