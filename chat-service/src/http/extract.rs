//! Extractors whose rejections are [`AppError`]s, so that malformed requests get the API's error
//! shape instead of axum's plain-text rejections.

use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use super::AppError;

/// `axum::Json` whose rejections are [`AppError`]s, so malformed bodies get the API's error shape.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let axum::Json(value) = axum::Json::<T>::from_request(req, state).await?;
        Ok(ApiJson(value))
    }
}
