//! The checks of a `POST /v1/chat/completions` request that need no state: its options, its
//! messages (converted to the service's own), and which of them are new this turn.

use super::tools::{parse_tool_calls, parse_tools};
use super::{CompletionMessage, CompletionRequest, MessageContent, ResponseFormat, StopSequences};
use crate::conversation::{
    ContextMessage, EndUser, InvalidSessionId, OutputFormat, Role, Sampling, SessionId,
};
use crate::http::AppError;
use crate::http::validate::{check_message, check_temperature};
use crate::tools::ToolCall;

fn convert(index: usize, message: CompletionMessage) -> Result<ContextMessage, AppError> {
    let role = match message.role.as_str() {
        "system" | "developer" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        "tool" => Role::Tool,
        other => {
            return Err(AppError::InvalidRequest(format!(
                "messages[{index}].role: `{other}` is not supported"
            )));
        }
    };
    let tool_calls = match message.tool_calls {
        Some(calls) if role == Role::Assistant => parse_tool_calls(index, calls)?,
        Some(calls) if !calls.is_empty() => {
            return Err(AppError::InvalidRequest(format!(
                "messages[{index}].tool_calls: only assistant messages call tools"
            )));
        }
        _ => Vec::new(),
    };
    let tool_call_id = match (role, message.tool_call_id) {
        (Role::Tool, Some(id)) if !id.is_empty() => Some(id),
        (Role::Tool, _) => {
            return Err(AppError::InvalidRequest(format!(
                "messages[{index}].tool_call_id: required for role `tool`"
            )));
        }
        _ => None,
    };
    let content = match message.content {
        None if role == Role::Assistant => String::new(),
        None => {
            return Err(AppError::InvalidRequest(format!(
                "messages[{index}].content: required for role `{}`",
                role.as_str()
            )));
        }
        Some(MessageContent::Text(text)) => text,
        Some(MessageContent::Parts(parts)) => {
            let mut text = String::new();
            for (part_index, part) in parts.into_iter().enumerate() {
                match (part.kind.as_str(), part.text) {
                    ("text", Some(t)) => text.push_str(&t),
                    (kind @ ("image_url" | "input_audio" | "file"), _) => {
                        return Err(AppError::InvalidRequest(format!(
                            "messages[{index}].content[{part_index}].type: `{kind}` parts are not accepted: the back ends of this service take text only"
                        )));
                    }
                    (kind, _) => {
                        return Err(AppError::InvalidRequest(format!(
                            "messages[{index}].content[{part_index}].type: `{kind}` is not supported"
                        )));
                    }
                }
            }
            text
        }
    };
    Ok(ContextMessage {
        role,
        content,
        tool_calls,
        tool_call_id,
    })
}

/// Options the types accept but this service cannot honour: refused with the field's name
/// instead of silently answering something else than what was asked.
fn check_options(request: &CompletionRequest) -> Result<(), AppError> {
    let refuse = |what: &str| Err(AppError::InvalidRequest(what.into()));
    for (field, value) in [
        ("max_tokens", request.max_tokens),
        ("max_completion_tokens", request.max_completion_tokens),
    ] {
        if value == Some(0) {
            return refuse(&format!("{field}: must be at least 1"));
        }
    }
    if request.n.is_some_and(|n| n != 1) {
        return refuse("n: only 1 choice per request is supported");
    }
    if request.functions.as_ref().is_some_and(|f| !f.is_empty()) {
        return refuse("functions: function calling is not supported");
    }
    if request.top_p.is_some_and(|p| !(0.0..=1.0).contains(&p)) {
        return refuse("top_p: must be between 0 and 1");
    }
    Ok(())
}

/// Longest stop sequence accepted; longer ones could never match a short answer anyway.
const MAX_STOP_BYTES: usize = 256;

/// `top_p`, `seed`, `stop` and `response_format` as the back ends receive them.
fn sampling_of(request: &mut CompletionRequest) -> Result<Sampling, AppError> {
    let stop = match request.stop.take() {
        None => Vec::new(),
        Some(StopSequences::One(one)) => vec![one],
        Some(StopSequences::Many(many)) => many,
    };
    if stop.len() > Sampling::MAX_STOP_SEQUENCES {
        return Err(AppError::InvalidRequest(format!(
            "stop: at most {} sequences",
            Sampling::MAX_STOP_SEQUENCES
        )));
    }
    if stop
        .iter()
        .any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
    {
        return Err(AppError::InvalidRequest(format!(
            "stop: each sequence must be 1 to {MAX_STOP_BYTES} bytes"
        )));
    }
    let (tools, tool_choice) = parse_tools(request.tools.take(), request.tool_choice.take())?;
    let format = match request.response_format.take() {
        None | Some(ResponseFormat::Text) => OutputFormat::Text,
        Some(ResponseFormat::JsonObject) => OutputFormat::JsonObject,
        Some(ResponseFormat::JsonSchema { json_schema }) => {
            let schema = match json_schema.schema {
                Some(schema @ serde_json::Value::Object(_)) => schema,
                _ => {
                    return Err(AppError::InvalidRequest(
                        "response_format.json_schema.schema: a JSON schema object is required"
                            .into(),
                    ));
                }
            };
            OutputFormat::JsonSchema {
                name: json_schema.name,
                schema,
                strict: json_schema.strict.unwrap_or(false),
            }
        }
    };
    Ok(Sampling {
        top_p: request.top_p,
        seed: request.seed,
        stop,
        format,
        tools,
        tool_choice,
    })
}

/// A request checked as far as no state is needed (all but the model's allow-list).
pub(crate) struct Checked {
    /// From `x-session-id`, else `user`.
    pub session: Option<SessionId>,
    /// `user`.
    pub end_user: Option<EndUser>,
    pub sampling: Sampling,
    /// The messages before the new ones.
    pub messages: Vec<ContextMessage>,
    /// The new messages: the last user message, or the tool results that end the list.
    pub new: Vec<ContextMessage>,
}

/// Everything of a request that needs no state; takes its messages. Also the entry of the fuzz
/// target.
pub(crate) fn check_request(
    request: &mut CompletionRequest,
    session_header: Option<&[u8]>,
    max_message_bytes: usize,
) -> Result<Checked, AppError> {
    check_temperature(request.temperature)?;
    check_options(request)?;
    let sampling = sampling_of(request)?;
    let end_user = request
        .user
        .as_deref()
        .map(EndUser::parse)
        .transpose()
        .map_err(|e| AppError::InvalidRequest(e.to_string()))?;
    let session = match session_header {
        Some(value) => Some(SessionId::parse(
            std::str::from_utf8(value).map_err(|_| InvalidSessionId)?,
        )?),
        None => end_user.as_ref().map(EndUser::default_session),
    };
    let mut messages = std::mem::take(&mut request.messages)
        .into_iter()
        .enumerate()
        .map(|(i, m)| convert(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    let first_new = match messages.last().map(|m| m.role) {
        Some(Role::User) => messages.len() - 1,
        Some(Role::Tool) => messages
            .iter()
            .rposition(|m| m.role != Role::Tool)
            .map_or(0, |i| i + 1),
        _ => {
            return Err(AppError::InvalidRequest(
                "messages: the last message must have role `user` or `tool`".into(),
            ));
        }
    };
    check_tool_results(&messages, session.is_some())?;
    let new = messages.split_off(first_new);
    for message in &new {
        // A tool may well return nothing; only its size is bounded.
        if message.role == Role::User || !message.content.is_empty() {
            check_message(max_message_bytes, &message.content)?;
        }
    }
    Ok(Checked {
        session,
        end_user,
        sampling,
        messages,
        new,
    })
}

/// Every tool message must answer a call of the assistant message before its run of results,
/// as OpenAI requires. A session's turn may send the results alone, since the session holds
/// the call; a stateless one has nothing else to go by.
fn check_tool_results(messages: &[ContextMessage], session: bool) -> Result<(), AppError> {
    let mut calls: Option<&[ToolCall]> = None;
    for (index, message) in messages.iter().enumerate() {
        match message.role {
            Role::Tool => {
                let id = message.tool_call_id.as_deref().unwrap_or_default();
                match calls {
                    Some(calls) if calls.iter().any(|call| call.id == id) => {}
                    Some(_) => {
                        return Err(AppError::InvalidRequest(format!(
                            "messages[{index}].tool_call_id: `{id}` answers no tool call of the assistant message before it"
                        )));
                    }
                    None if session && messages[..index].iter().all(|m| m.role == Role::Tool) => {}
                    None => {
                        return Err(AppError::InvalidRequest(format!(
                            "messages[{index}]: a `tool` message must follow the assistant message with the tool call it answers"
                        )));
                    }
                }
            }
            Role::Assistant if !message.tool_calls.is_empty() => calls = Some(&message.tool_calls),
            _ => calls = None,
        }
    }
    Ok(())
}
