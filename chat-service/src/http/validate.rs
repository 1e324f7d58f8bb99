//! Checks of request fields that the types alone do not express, shared by every transport
//! (REST, SSE, WebSocket, OpenAI), so that each refuses the same input with the same error.

use super::AppError;
use crate::state::AppState;

/// The requested model if allowed, else the default.
pub fn resolve_model(state: &AppState, requested: Option<&str>) -> Result<String, AppError> {
    match requested {
        None | Some("") => Ok(state.config.models.default.clone()),
        Some(model) if state.allowed_models.iter().any(|m| m == model) => Ok(model.to_string()),
        Some(model) => Err(AppError::ModelNotAllowed(model.chars().take(100).collect())),
    }
}

/// The new user message: not blank and at most `limits.maxMessageBytes` (`limit`).
pub fn check_message(limit: usize, message: &str) -> Result<(), AppError> {
    if message.len() > limit {
        return Err(AppError::PayloadTooLarge(format!(
            "message is {} bytes, the limit is {limit}",
            message.len(),
        )));
    }
    if message.trim().is_empty() {
        return Err(AppError::InvalidRequest(
            "message: must not be empty".into(),
        ));
    }
    Ok(())
}

/// Checks an optional sampling temperature; 0 makes a turn deterministic (and cacheable).
pub fn check_temperature(temperature: Option<f32>) -> Result<(), AppError> {
    match temperature {
        Some(t) if !(0.0..=2.0).contains(&t) => Err(AppError::InvalidRequest(
            "temperature: must be between 0 and 2".into(),
        )),
        _ => Ok(()),
    }
}
