//! Extractors whose rejections are [`AppError`]s, so that malformed requests get the API's error
//! shape instead of axum's plain-text rejections.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, header};
use bytes::Bytes;
use serde::de::DeserializeOwned;

use super::AppError;

/// `axum::Json` whose rejections are [`AppError`]s, so malformed bodies get the API's error shape.
///
/// A well-formed body is parsed once, by `serde_json` alone; axum's parser, which tracks the
/// path to each value for its error message, runs only on a body that failed, so the rejection
/// (and the path it names) is axum's own.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !json_content_type(req.headers()) {
            // axum's rejection of the content type, word for word (or its acceptance of one
            // this check does not know).
            let axum::Json(value) = axum::Json::<T>::from_request(req, state).await?;
            return Ok(ApiJson(value));
        }
        let body = Bytes::from_request(req, state)
            .await
            .map_err(JsonRejection::from)?;
        match serde_json::from_slice(&body) {
            Ok(value) => Ok(ApiJson(value)),
            Err(_) => {
                let axum::Json(value) = axum::Json::<T>::from_bytes(&body)?;
                Ok(ApiJson(value))
            }
        }
    }
}

/// `application/json` or `application/<anything>+json`, parameters allowed: axum's own test,
/// with the same parser.
fn json_content_type(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<mime::Mime>().ok())
        .is_some_and(|mime| {
            mime.type_() == "application"
                && (mime.subtype() == "json" || mime.suffix().is_some_and(|name| name == "json"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(content_type: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, content_type.parse().unwrap());
        headers
    }

    #[test]
    fn json_content_types_are_told_as_axum_tells_them() {
        for accepted in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
            "application/merge-patch+json",
        ] {
            assert!(json_content_type(&headers(accepted)), "{accepted}");
        }
        for refused in [
            "text/plain",
            "application/jsonx",
            "application/+json",
            "json",
            "",
        ] {
            assert!(!json_content_type(&headers(refused)), "{refused}");
        }
        assert!(!json_content_type(&HeaderMap::new()));
    }
}
