//! `POST /v1/chat/completions`: the OpenAI Chat Completions API, so the official SDKs work
//! unchanged, tool calling included (see [`tools`]). With a session (header `x-session-id`, else
//! the `user` field) the stored history is the context and only the last user message (or the
//! tool results that end the messages) is new; without one the request is stateless and the
//! client's messages are the context. Either names a session inside the caller's own namespace
//! (its API key, or the user a trusted proxy names): `user: "alice"` of two keys is two end users
//! with two histories. `user` is a free-form end-user label (an e-mail address works, see
//! [`crate::conversation::EndUser`]); the session it selects is its `default_session`, and the
//! session remembers the end user, so that their sessions can be listed, exported and erased.
//! The request checks are in [`checks`].

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Extension;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use crate::conversation::{FinishReason, Principal, Role, SessionKey, Usage};
use crate::http::extract::ApiJson;
use crate::http::validate::resolve_model;
use crate::http::{AppError, RequestId};
use crate::rate_limit::Caller;
use crate::state::SharedState;
use crate::turn::{TurnEvent, TurnHistory, TurnInput, begin_turn, complete_turn};

mod checks;
mod tools;

pub(crate) use checks::{Checked, check_request};
use tools::{CompletionToolCall, completion_tool_calls};

pub const SESSION_HEADER: &str = "x-session-id";
/// Response header telling how many stored messages went into the context.
pub const CONTEXT_MESSAGES_HEADER: &str = "x-context-messages";

#[derive(Debug, Deserialize, ToSchema)]
pub struct CompletionRequest {
    pub model: String,
    pub messages: Vec<CompletionMessage>,
    #[serde(default)]
    pub stream: bool,
    /// At least 1; values above `context.maxOutputTokens` are capped at it.
    #[serde(default)]
    #[schema(minimum = 1)]
    pub max_tokens: Option<u32>,
    /// As `max_tokens`, which it overrides.
    #[serde(default)]
    #[schema(minimum = 1)]
    pub max_completion_tokens: Option<u32>,
    /// Choices to generate: only 1 is supported (anything else is refused, not ignored).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1)]
    pub n: Option<u32>,
    /// Functions the model may call (`{"type": "function", "function": {"name", "description",
    /// "parameters"}}`, at most 128); its calls come back as `message.tool_calls` with
    /// `finish_reason: "tool_calls"`.
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Vec<serde_json::Value>>,
    /// `none`, `auto` (the default), `required`, or `{"type": "function", "function": {"name":
    /// ...}}` naming one of `tools`. Ollama back ends cannot force a call: they are offered the
    /// named tool alone, and `required` is `auto` there.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub tool_choice: Option<serde_json::Value>,
    /// The deprecated form of `tools`: refused rather than ignored, so that a client never
    /// takes a plain answer for the result of its functions.
    #[serde(default)]
    pub functions: Option<Vec<serde_json::Value>>,
    /// `0` makes the answer deterministic and, with the response cache enabled, cacheable.
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f32>,
    /// The end user inside the caller's namespace, any label of 1 to 256 bytes without control
    /// characters (an e-mail address works). Selects that user's session when no
    /// `x-session-id` header is sent: the label itself if it matches `^[A-Za-z0-9_-]{1,64}$`,
    /// else `u-` and 32 hex digits of its SHA-256 (the response's `x-session-id` tells it).
    #[serde(default)]
    #[schema(min_length = 1, max_length = 256)]
    pub user: Option<String>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Nucleus sampling, 0 to 1.
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f64>,
    /// Makes sampling repeatable: the same seed and request give the same answer.
    #[serde(default)]
    pub seed: Option<i64>,
    /// Up to 4 sequences that end the answer.
    #[serde(default)]
    pub stop: Option<StopSequences>,
    /// `{"type": "json_object"}` answers with a JSON object, `{"type": "json_schema", ...}`
    /// with JSON valid against the schema; `{"type": "text"}` is the default.
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
}

/// `stop`: one sequence or a list.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StopSequences {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct JsonSchemaFormat {
    pub name: String,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub schema: Option<serde_json::Value>,
    #[serde(default)]
    pub strict: Option<bool>,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct CompletionMessage {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Required but for assistant messages that call tools.
    #[serde(default)]
    pub content: Option<MessageContent>,
    /// Assistant messages: the tool calls the model made, as it returned them.
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// Tool messages: the id of the call whose result this is.
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

/// A string, or the SDKs' list of content parts (only `text` parts are supported).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Completion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    pub usage: Usage,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub index: u32,
    pub message: AssistantMessage,
    #[schema(value_type = String)]
    pub finish_reason: FinishReason,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AssistantMessage {
    pub role: &'static str,
    /// `null` when the model only called tools.
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<CompletionToolCall>,
}

/// What every `chat.completion.chunk` of one answer shares; each event is written from borrowed
/// parts into one buffer (no `serde_json::Value` tree per token).
struct ChunkHeader<'a> {
    id: &'a str,
    created: u64,
    model: &'a str,
}

#[derive(Serialize, Default)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<&'a [CompletionToolCall]>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    finish_reason: Option<&'a str>,
}

#[derive(Serialize)]
struct CompletionChunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [ChunkChoice<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<&'a Usage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    x_context_messages: Option<usize>,
}

impl ChunkHeader<'_> {
    fn write(&self, choices: &[ChunkChoice<'_>], usage: Option<(&Usage, usize)>) -> Event {
        let chunk = CompletionChunk {
            id: self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model,
            choices,
            usage: usage.map(|(u, _)| u),
            x_context_messages: usage.map(|(_, n)| n),
        };
        let data = serde_json::to_string(&chunk).expect("a chunk serialises");
        Event::default().data(data)
    }

    fn event(&self, delta: Delta<'_>, finish_reason: Option<&str>) -> Event {
        self.write(
            &[ChunkChoice {
                index: 0,
                delta,
                finish_reason,
            }],
            None,
        )
    }

    /// The last chunk when `stream_options.include_usage`: no choices, the usage.
    fn usage_event(&self, usage: &Usage, context_messages: usize) -> Event {
        self.write(&[], Some((usage, context_messages)))
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    request_body = CompletionRequest,
    params(("x-session-id" = Option<String>, Header, pattern = "^[A-Za-z0-9_-]{1,64}$", description = "Session to continue; overrides `user`")),
    responses(
        (status = 200, description = "A chat completion, or `chat.completion.chunk` events when `stream` is true", body = Completion),
        (status = 400, description = "Malformed request, bad session id, unsupported option or model not allowed", body = crate::http::ErrorBody),
        (status = 401, description = "Missing or unknown API key (when auth is enabled)", body = crate::http::ErrorBody),
        (status = 408, description = "The body did not arrive within `limits.bodyReadTimeoutMs`", body = crate::http::ErrorBody),
        (status = 413, description = "Message or body too large", body = crate::http::ErrorBody),
        (status = 429, description = "Rate limit exceeded; see Retry-After", body = crate::http::ErrorBody),
        (status = 502, description = "The back end failed mid-answer", body = crate::http::ErrorBody),
        (status = 503, description = "Overloaded, history store or back ends unavailable; see Retry-After", body = crate::http::ErrorBody),
        (status = 504, description = "Back end timed out", body = crate::http::ErrorBody),
    )
)]
pub async fn post_chat_completions(
    State(state): State<SharedState>,
    Extension(request_id): Extension<RequestId>,
    caller: Option<Extension<Caller>>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    ApiJson(mut request): ApiJson<CompletionRequest>,
) -> Result<Response, AppError> {
    if headers.contains_key(crate::http::idempotent::IDEMPOTENCY_KEY_HEADER) {
        // Refused rather than ignored: a client must not believe its retries are safe here.
        return Err(AppError::InvalidRequest(
            "Idempotency-Key: supported on POST /v1/chat only".into(),
        ));
    }
    let model = resolve_model(&state, Some(&request.model))?;
    let session_header = headers.get(SESSION_HEADER).map(HeaderValue::as_bytes);
    let Checked {
        session,
        end_user,
        sampling,
        mut messages,
        new,
    } = check_request(
        &mut request,
        session_header,
        state.config.limits.max_message_bytes,
    )?;
    let session = session.map(|id| SessionKey::new(&principal, id));
    let history = match &session {
        Some(session) => TurnHistory::Session(session.clone()),
        None => {
            // The configured system prompt is added by the context builder.
            messages
                .retain(|m| m.role != Role::System || state.config.context.system_prompt.is_none());
            TurnHistory::Stateless(messages)
        }
    };
    let input = TurnInput {
        history,
        input: new,
        model: model.clone(),
        request_id: request_id.0.clone(),
        max_tokens: request.max_completion_tokens.or(request.max_tokens),
        temperature: request.temperature,
        sampling,
        end_user,
        caller: caller.map(|Extension(caller)| caller),
        principal,
    };
    let id = format!("chatcmpl-{}", request_id.0);
    let created = unix_now();

    let mut response = if !request.stream {
        let outcome = complete_turn(&state, input).await?;
        let context_messages = outcome.context_messages;
        let content =
            (!outcome.reply.is_empty() || outcome.tool_calls.is_empty()).then_some(outcome.reply);
        let completion = Completion {
            id,
            object: "chat.completion",
            created,
            model: outcome.model,
            choices: vec![CompletionChoice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content,
                    tool_calls: completion_tool_calls(outcome.tool_calls, false),
                },
                finish_reason: outcome.finish_reason,
            }],
            usage: outcome.usage,
        };
        let mut response = axum::Json(completion).into_response();
        response
            .headers_mut()
            .insert(CONTEXT_MESSAGES_HEADER, HeaderValue::from(context_messages));
        response
    } else {
        let include_usage = request.stream_options.is_some_and(|o| o.include_usage);
        let mut events = begin_turn(&state, input).await?;
        let stream = async_stream::stream! {
            let header = ChunkHeader {
                id: &id,
                created,
                model: &model,
            };
            let opening = Delta { role: Some("assistant"), content: Some(""), ..Delta::default() };
            yield Ok::<_, Infallible>(header.event(opening, None));
            while let Some(event) = events.recv().await {
                match event {
                    TurnEvent::Token(content) => {
                        let delta = Delta { content: Some(&content), ..Delta::default() };
                        yield Ok(header.event(delta, None));
                    }
                    TurnEvent::ToolCalls(calls) => {
                        // Each call whole in one delta: the SDKs put deltas together by
                        // `index`, and one piece is a valid sequence of pieces.
                        let calls = completion_tool_calls(calls, true);
                        let delta = Delta { tool_calls: Some(&calls), ..Delta::default() };
                        yield Ok(header.event(delta, None));
                    }
                    TurnEvent::Finished(outcome) => {
                        yield Ok(header.event(Delta::default(), Some(outcome.finish_reason.as_str())));
                        if include_usage {
                            yield Ok(header.usage_event(&outcome.usage, outcome.context_messages));
                        }
                        yield Ok(Event::default().data("[DONE]"));
                    }
                    TurnEvent::Failed(error) => {
                        // No [DONE]: the SDKs then report the stream as failed.
                        yield Ok(Event::default().data(json!(AppError::from(error).body()).to_string()));
                    }
                }
            }
        };
        Sse::new(stream).into_response()
    };
    if let Some(session) = session
        && let Ok(value) = HeaderValue::from_str(session.id().as_str())
    {
        response.headers_mut().insert(SESSION_HEADER, value);
    }
    Ok(response)
}
