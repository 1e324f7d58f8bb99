//! `Idempotency-Key` on turns (see [`crate::idempotency`] for the records). The turn of a claimed
//! key runs as a task of its own, so a client that disconnects before reading the answer does
//! not cut it short: the answer is stored with the key, and the retry gets it, marked with
//! `Idempotent-Replayed: true`.

use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use tokio::sync::oneshot;

use crate::conversation::{Principal, SessionKey};
use crate::http::AppError;
use crate::idempotency::{Claim, IdempotencyKey};
use crate::state::SharedState;

pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// Set on an answer that a retry got from the record of the first request.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// The request's key, if it sent one.
pub fn key_of(headers: &HeaderMap) -> Result<Option<IdempotencyKey>, AppError> {
    headers
        .get(IDEMPOTENCY_KEY_HEADER)
        .map(|value| IdempotencyKey::parse(value.as_bytes()))
        .transpose()
        .map_err(|e| AppError::InvalidRequest(e.to_string()))
}

/// A key on a streamed turn: refused, since a replay could not be the same stream.
pub fn refuse_streaming() -> AppError {
    AppError::InvalidRequest(
        "Idempotency-Key: only turns answered as one JSON body (not streamed) are idempotent"
            .into(),
    )
}

/// Runs `turn` (which answers with the JSON body) at most once per principal and key.
pub async fn run_once<F>(
    state: &SharedState,
    principal: Principal,
    key: IdempotencyKey,
    session: SessionKey,
    fingerprint: String,
    turn: F,
) -> Result<Response, AppError>
where
    F: Future<Output = Result<serde_json::Value, AppError>> + Send + 'static,
{
    let Some(store) = &state.idempotency else {
        return Err(AppError::InvalidRequest(
            "Idempotency-Key: not available in this deployment".into(),
        ));
    };
    match store.claim(&principal, &key, &fingerprint).await? {
        Claim::Claimed => {}
        Claim::Replay(body) => {
            let mut response = axum::Json(body).into_response();
            response
                .headers_mut()
                .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
            return Ok(response);
        }
        Claim::Pending => return Err(AppError::IdempotencyInProgress),
        Claim::Mismatch => return Err(AppError::IdempotencyKeyReused),
    }
    let (answer, answered) = oneshot::channel();
    let task_state = state.clone();
    state.turns.spawn(async move {
        let result = turn.await;
        let store = task_state
            .idempotency
            .as_ref()
            .expect("checked before the claim");
        let recorded = match &result {
            Ok(body) => store.complete(&principal, &key, &session, body).await,
            // Nothing to hand back: the retry runs the turn again.
            Err(_) => store.release(&principal, &key).await,
        };
        if let Err(e) = recorded {
            tracing::warn!(error = %e, "idempotency record not updated; retries get 409 until it is");
        }
        let _ = answer.send(result);
    });
    match answered.await {
        Ok(Ok(body)) => Ok(axum::Json(body).into_response()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(AppError::Internal(
            "idempotent turn ended without an answer".into(),
        )),
    }
}
