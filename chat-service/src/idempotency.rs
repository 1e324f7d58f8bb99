//! Idempotent turns: a client that sends `Idempotency-Key` with a turn may send the same request
//! again (its connection broke, it never read the answer) and gets the first answer back instead
//! of a second generation and a second stored turn.
//!
//! One MongoDB document per principal and key, claimed by inserting it (the `_id` is unique, so
//! of two replicas racing on one key exactly one wins), then completed with the answer once the
//! turn is stored. A retry that finds the claim still pending is told to come back (409); one
//! with another body under the same key is refused (422). The claim is released when the turn
//! fails before anything was stored, so that the retry runs it. Records are not expired here
//! (FerretDB has no TTL indexes); a deployment on MongoDB may add a TTL index on `created_at`.

use std::time::Duration;

use mongodb::bson::{self, Document, doc};
use mongodb::{Collection, Database};
use sha2::{Digest, Sha256};

use crate::conversation::{Principal, SessionKey};
use crate::history::HistoryError;

/// Longest accepted key; UUIDs and ULIDs fit many times over.
pub const MAX_KEY_BYTES: usize = 255;

/// A key as a client sent it: 1 to 255 visible ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("Idempotency-Key must be 1 to 255 visible ASCII characters")]
pub struct InvalidIdempotencyKey;

impl IdempotencyKey {
    pub fn parse(raw: &[u8]) -> Result<Self, InvalidIdempotencyKey> {
        let valid =
            (1..=MAX_KEY_BYTES).contains(&raw.len()) && raw.iter().all(u8::is_ascii_graphic);
        match std::str::from_utf8(raw) {
            Ok(text) if valid => Ok(Self(text.to_string())),
            _ => Err(InvalidIdempotencyKey),
        }
    }
}

/// What claiming a key found.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// Nobody used the key: this request runs the turn.
    Claimed,
    /// The turn ran before: its answer, as the JSON body first sent.
    Replay(serde_json::Value),
    /// The first request with this key is still running.
    Pending,
    /// The key was used for a different request.
    Mismatch,
}

/// Digest of what makes two requests "the same": the route and the parsed body.
pub fn fingerprint(route: &str, body: &impl serde::Serialize) -> String {
    let mut digest = Sha256::new();
    digest.update(route.as_bytes());
    digest.update([0]);
    digest.update(serde_json::to_vec(body).expect("request bodies serialise"));
    hex::encode(digest.finalize())
}

pub struct IdempotencyStore {
    records: Collection<Document>,
    timeout: Duration,
}

const PENDING: &str = "pending";
const DONE: &str = "done";

impl IdempotencyStore {
    /// Records in `<collection>` of `database`; every operation gives up after `timeout`.
    pub fn new(database: &Database, collection: &str, timeout: Duration) -> Self {
        Self {
            records: database.collection(collection),
            timeout,
        }
    }

    /// Principals contain no `/` (see [`Principal`]), so this is unique per principal and key.
    fn id(principal: &Principal, key: &IdempotencyKey) -> String {
        format!("{}/{}", principal.as_str(), key.0)
    }

    async fn bounded<T>(
        &self,
        operation: impl IntoFuture<Output = Result<T, mongodb::error::Error>>,
    ) -> Result<T, HistoryError> {
        match tokio::time::timeout(self.timeout, operation).await {
            Ok(result) => result.map_err(|e| HistoryError::Unavailable(e.to_string())),
            Err(_) => Err(HistoryError::Unavailable(format!(
                "mongodb did not answer within {:?}",
                self.timeout
            ))),
        }
    }

    pub async fn claim(
        &self,
        principal: &Principal,
        key: &IdempotencyKey,
        fingerprint: &str,
    ) -> Result<Claim, HistoryError> {
        let id = Self::id(principal, key);
        let record = doc! {
            "_id": &id,
            "fingerprint": fingerprint,
            "state": PENDING,
            "created_at": bson::DateTime::now(),
        };
        let inserted = tokio::time::timeout(self.timeout, self.records.insert_one(record)).await;
        match inserted {
            Ok(Ok(_)) => return Ok(Claim::Claimed),
            Ok(Err(e)) if crate::history::is_duplicate_key(&e) => {}
            Ok(Err(e)) => return Err(HistoryError::Unavailable(e.to_string())),
            Err(_) => {
                return Err(HistoryError::Unavailable(format!(
                    "mongodb did not answer within {:?}",
                    self.timeout
                )));
            }
        }
        let existing = self
            .bounded(self.records.find_one(doc! { "_id": &id }))
            .await?;
        // Released between our insert and this read: the retry is the client's to make.
        let Some(existing) = existing else {
            return Ok(Claim::Pending);
        };
        if existing.get_str("fingerprint").ok() != Some(fingerprint) {
            return Ok(Claim::Mismatch);
        }
        match (existing.get_str("state"), existing.get_str("response")) {
            (Ok(DONE), Ok(response)) => serde_json::from_str(response)
                .map(Claim::Replay)
                .map_err(|e| HistoryError::Inconsistent(format!("stored answer: {e}"))),
            _ => Ok(Claim::Pending),
        }
    }

    /// Keeps the answer for retries, with the session it belongs to, so that erasing the session
    /// erases the answer too.
    pub async fn complete(
        &self,
        principal: &Principal,
        key: &IdempotencyKey,
        session: &SessionKey,
        response: &serde_json::Value,
    ) -> Result<(), HistoryError> {
        let update = doc! { "$set": {
            "state": DONE,
            "response": response.to_string(),
            "session": session.as_str(),
        } };
        self.bounded(
            self.records
                .update_one(doc! { "_id": Self::id(principal, key) }, update),
        )
        .await
        .map(|_| ())
    }

    /// Deletes the records holding answers of `session`; how many.
    pub async fn forget_session(&self, session: &SessionKey) -> Result<u64, HistoryError> {
        self.bounded(
            self.records
                .delete_many(doc! { "session": session.as_str() }),
        )
        .await
        .map(|deleted| deleted.deleted_count)
    }

    /// Gives the key back after a turn that stored nothing, so that a retry runs it.
    pub async fn release(
        &self,
        principal: &Principal,
        key: &IdempotencyKey,
    ) -> Result<(), HistoryError> {
        self.bounded(
            self.records
                .delete_one(doc! { "_id": Self::id(principal, key), "state": PENDING }),
        )
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_short_visible_ascii() {
        assert!(IdempotencyKey::parse(b"0f8fad5b-d9cb-469f-a165-70867728950e").is_ok());
        assert!(IdempotencyKey::parse(&[b'k'; MAX_KEY_BYTES]).is_ok());
        for bad in [
            &b""[..],
            &[b'k'; MAX_KEY_BYTES + 1],
            b"a b",
            b"a\r\nb",
            "ä".as_bytes(),
        ] {
            assert_eq!(
                IdempotencyKey::parse(bad),
                Err(InvalidIdempotencyKey),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_fingerprint_tells_bodies_and_routes_apart() {
        let body = serde_json::json!({"message": "hi"});
        let same = fingerprint("/v1/chat", &body);
        assert_eq!(
            same,
            fingerprint("/v1/chat", &serde_json::json!({"message": "hi"}))
        );
        assert_ne!(
            same,
            fingerprint("/v1/chat", &serde_json::json!({"message": "ho"}))
        );
        assert_ne!(same, fingerprint("/v1/chat/completions", &body));
    }
}
