//! The sessions of one principal (or of one end user inside it) as records: listed in pages and
//! exported message by message, straight from MongoDB.
//!
//! A principal's sessions are found by their storage keys (`<principal>/<id>`, see
//! [`SessionKey`]), a range of `_id`s that the primary index serves, so that sessions stored
//! before sessions remembered anything else are listed too; the sessions of the shared
//! namespace (auth off, and the pre-ownership sessions) are the keys without a `/`. An end
//! user's sessions are those whose `end_users` names them, which sessions record from the turns
//! that named an end user (`user`) on. Pages are in `_id` order, so a cursor (the last session id
//! of a page) stays valid while sessions come and go.
//!
//! The export reads one page of sessions at a time and each session's messages through a
//! driver cursor, so that memory stays bounded however much a principal has stored.

use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt, TryStreamExt};
use mongodb::bson::{self, Document, doc};

use super::durable::{DurableHistory, StoredMessage};
use super::{HistoryError, HistoryStore};
use crate::conversation::{EndUser, Principal, SessionId, SessionKey};

/// Sessions read per query by the export and the erasure.
pub(super) const SESSION_BATCH: i64 = 100;

/// One session as listed.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecord {
    pub key: SessionKey,
    pub created_at: Option<bson::DateTime>,
    /// The last turn.
    pub updated_at: Option<bson::DateTime>,
    /// The end users named by the session's turns (none for sessions from before labels).
    pub end_users: Vec<String>,
}

/// What the export streams: every message of every session, then the totals.
#[derive(Debug, Clone)]
pub enum ExportItem {
    Message {
        session: SessionId,
        // Boxed: a message is over 200 bytes, the end line 16.
        message: Box<StoredMessage>,
    },
    End {
        sessions: u64,
        messages: u64,
    },
}

/// The filter of the sessions `owner` owns (ids after `after`), and of those `end_user` took
/// part in.
fn owned_sessions(
    owner: &Principal,
    end_user: Option<&EndUser>,
    after: Option<&SessionId>,
) -> Document {
    let id = if owner.is_shared() {
        let mut id = doc! { "$regex": "^[^/]+$" };
        if let Some(after) = after {
            id.insert("$gt", after.as_str());
        }
        id
    } else {
        // Principals hold no `/`, and `0` follows `/`: exactly the keys `<principal>/…`.
        let start = match after {
            Some(after) => doc! { "$gt": SessionKey::new(owner, after.clone()).as_str() },
            None => doc! { "$gt": format!("{}/", owner.as_str()) },
        };
        let mut id = start;
        id.insert("$lt", format!("{}0", owner.as_str()));
        id
    };
    let mut filter = doc! { "_id": id };
    if let Some(end_user) = end_user {
        filter.insert("end_users", end_user.as_str());
    }
    filter
}

impl DurableHistory {
    /// Up to `limit` sessions of `owner` (of `end_user` in it, if given) with ids after `after`,
    /// in id order.
    pub async fn list_sessions(
        &self,
        owner: &Principal,
        end_user: Option<&EndUser>,
        after: Option<&SessionId>,
        limit: i64,
    ) -> Result<Vec<SessionRecord>, HistoryError> {
        let found: Vec<Document> = self
            .bounded(async {
                self.sessions
                    .find(owned_sessions(owner, end_user, after))
                    .sort(doc! { "_id": 1 })
                    .limit(limit)
                    .await?
                    .try_collect()
                    .await
            })
            .await?;
        Ok(found
            .iter()
            .filter_map(|session| {
                let key = SessionKey::from_storage(session.get_str("_id").ok()?)?;
                Some(SessionRecord {
                    key,
                    created_at: session.get_datetime("created_at").ok().copied(),
                    updated_at: session.get_datetime("updated_at").ok().copied(),
                    end_users: session
                        .get_array("end_users")
                        .map(|users| {
                            users
                                .iter()
                                .filter_map(|u| u.as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default(),
                })
            })
            .collect())
    }

    /// A session's messages in order, as the driver reads them (a batch at a time).
    async fn messages_of(
        &self,
        session: &SessionKey,
    ) -> Result<mongodb::Cursor<StoredMessage>, HistoryError> {
        self.bounded(
            self.messages
                .find(doc! { "session_id": session.as_str() })
                .sort(doc! { "seq": 1 }),
        )
        .await
    }
}

impl HistoryStore {
    /// See [`DurableHistory::list_sessions`].
    pub async fn list_sessions(
        &self,
        owner: &Principal,
        end_user: Option<&EndUser>,
        after: Option<&SessionId>,
        limit: i64,
    ) -> Result<Vec<SessionRecord>, HistoryError> {
        let listed = self
            .durable
            .list_sessions(owner, end_user, after, limit)
            .await;
        self.metrics.store_op("mongodb", "list", listed.is_ok());
        listed
    }

    /// Every message of `owner`'s sessions (of `end_user`'s, if given), session by session in
    /// id order and each in sequence order, then [`ExportItem::End`]. An error ends the stream.
    pub fn export(
        self: Arc<Self>,
        owner: Principal,
        end_user: Option<EndUser>,
    ) -> impl Stream<Item = Result<ExportItem, HistoryError>> + Send + 'static {
        async_stream::try_stream! {
            let (mut sessions, mut messages) = (0_u64, 0_u64);
            let mut after: Option<SessionId> = None;
            loop {
                let page = self
                    .list_sessions(&owner, end_user.as_ref(), after.as_ref(), SESSION_BATCH)
                    .await?;
                for record in &page {
                    let mut cursor = self.durable.messages_of(&record.key).await?;
                    sessions += 1;
                    while let Some(message) = next_bounded(&mut cursor, self.durable.timeout).await? {
                        messages += 1;
                        yield ExportItem::Message {
                            session: record.key.id().clone(),
                            message: Box::new(message),
                        };
                    }
                }
                if (page.len() as i64) < SESSION_BATCH {
                    break;
                }
                after = page.last().map(|record| record.key.id().clone());
            }
            yield ExportItem::End { sessions, messages };
        }
    }
}

/// The cursor's next message, within the MongoDB timeout (a batch may have to be fetched).
async fn next_bounded(
    cursor: &mut mongodb::Cursor<StoredMessage>,
    timeout: Duration,
) -> Result<Option<StoredMessage>, HistoryError> {
    match tokio::time::timeout(timeout, cursor.next()).await {
        Ok(None) => Ok(None),
        Ok(Some(message)) => message
            .map(Some)
            .map_err(|e| HistoryError::Unavailable(e.to_string())),
        Err(_) => Err(HistoryError::Unavailable(format!(
            "mongodb did not answer within {timeout:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_principal_owns_the_keys_under_its_prefix_only() {
        let owner = Principal::api_key("team-a");
        let filter = owned_sessions(&owner, None, None);
        let id = filter.get_document("_id").unwrap();
        assert_eq!(id.get_str("$gt").unwrap(), "k.team-a/");
        assert_eq!(id.get_str("$lt").unwrap(), "k.team-a0");
        let after = SessionId::parse("chat-7").unwrap();
        let user = EndUser::parse("eve@example.com").unwrap();
        let filter = owned_sessions(&owner, Some(&user), Some(&after));
        let id = filter.get_document("_id").unwrap();
        assert_eq!(id.get_str("$gt").unwrap(), "k.team-a/chat-7");
        assert_eq!(filter.get_str("end_users").unwrap(), "eve@example.com");
        // The shared namespace is the keys without a principal.
        let shared = owned_sessions(&Principal::shared(), None, None);
        let id = shared.get_document("_id").unwrap();
        assert_eq!(id.get_str("$regex").unwrap(), "^[^/]+$");
        // "k.team-a" < "k.team-a/x" < "k.team-a0", and a longer principal falls outside.
        for (key, inside) in [
            ("k.team-a/x", true),
            ("k.team-ab/x", false),
            ("k.team-a%2Fb/x", false),
        ] {
            assert_eq!(key > "k.team-a/" && key < "k.team-a0", inside, "{key}");
        }
    }
}
