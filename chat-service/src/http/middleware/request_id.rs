//! The request id: the caller's `x-request-id` when it is sane, else a new one; put in the
//! request extensions for the handlers and logs, and echoed on every response.

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;

use crate::conversation::SessionId;

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The id of the current request: the caller's `x-request-id` when it is sane, else a new one.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Printable, short, and free of anything that could break a log line or a header.
fn acceptable_request_id(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 128
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

pub async fn assign(mut request: Request, next: Next) -> Response {
    let request_id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| acceptable_request_id(v))
        .map(str::to_string)
        // Same shape as session ids: 32 hex digits.
        .unwrap_or_else(|| SessionId::generate().to_string());
    request
        .extensions_mut()
        .insert(RequestId(request_id.clone()));
    let mut response = next.run(request).await;
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::acceptable_request_id;

    #[test]
    fn only_short_printable_ids_are_taken_from_the_caller() {
        assert!(acceptable_request_id("abc-123_x.y:z"));
        assert!(acceptable_request_id(&"a".repeat(128)));
        assert!(!acceptable_request_id(&"a".repeat(129)));
        assert!(!acceptable_request_id(""));
        assert!(!acceptable_request_id("two words"));
        assert!(!acceptable_request_id("line\nbreak"));
    }
}
