//! `GET /ws/chat`: many turns per connection. In: `{"message", "session_id"?, "model"?}` text
//! frames. Out: `{"type":"token"}` frames, then `{"type":"done"}` with session id and usage once
//! the turn is stored. Errors send `{"type":"error"}` and close with a code and reason.
//!
//! Limits: an open socket holds one admission permit and one of its caller's
//! `limits.maxSocketsPerCaller` places (1013 beyond); every turn counts against the caller's rate
//! limit; a frame or message over the size limit is refused with 1009 from its header, before its
//! payload is buffered; a socket without a client message for `limits.websocketIdleTimeoutMs`
//! closes. Browsers, which cannot set headers on a WebSocket, send the API key as the subprotocol
//! `chatop.key.<key>` next to `chatop` (the one the server selects, so the key is never echoed).

use std::net::SocketAddr;
use std::time::Duration;

use axum::Extension;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{ConnectInfo, State};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::conversation::{
    ContextMessage, FinishReason, Principal, Role, SessionId, SessionKey, Usage,
};
use crate::http::middleware::admission::{AdmissionSlot, OpenSocket};
use crate::http::validate::{check_message, resolve_model};
use crate::http::{AppError, ErrorBody, RequestId};
use crate::rate_limit::Caller;
use crate::state::SharedState;
use crate::turn::{TurnEvent, TurnHistory, TurnInput, begin_turn};

const PING_INTERVAL: Duration = Duration::from_secs(20);
/// Read buffer per connection. tungstenite's default is 128 KiB, and it zero-fills the whole
/// buffer before each read, so every open socket kept 128 KiB resident (125 MiB per 1,000
/// sockets) for client frames that are a few hundred bytes. A larger frame still arrives whole:
/// the buffer grows to fit it.
const READ_BUFFER_BYTES: usize = 4 * 1024;
/// RFC 6455: "try again later".
const CLOSE_TRY_AGAIN_LATER: u16 = 1013;
/// The subprotocol the server selects; clients offer it alongside `chatop.key.<key>`.
pub const SUBPROTOCOL: &str = "chatop";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClientFrame {
    #[serde(default)]
    session_id: Option<String>,
    message: String,
    #[serde(default)]
    model: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum ServerFrame {
    Token {
        content: String,
    },
    Done {
        session_id: String,
        message: String,
        model: String,
        usage: Usage,
        finish_reason: FinishReason,
        context_messages: usize,
    },
    Error(ErrorBody),
}

impl ServerFrame {
    fn to_message(&self) -> Message {
        Message::Text(
            serde_json::to_string(self)
                .expect("frames serialise")
                .into(),
        )
    }
}

#[utoipa::path(
    get,
    path = "/ws/chat",
    responses(
        (status = 101, description = "WebSocket upgrade; see the module docs for the frames"),
        (status = 400, description = "Not a WebSocket handshake (RFC 6455, version 13)", body = crate::http::ErrorBody),
        (status = 401, description = "Missing or unknown API key (when auth is enabled)", body = crate::http::ErrorBody),
        (status = 429, description = "Rate limit exceeded; see Retry-After", body = crate::http::ErrorBody),
        (status = 503, description = "Overloaded; see Retry-After", body = crate::http::ErrorBody),
    )
)]
pub async fn chat_socket(
    State(state): State<SharedState>,
    Extension(request_id): Extension<RequestId>,
    caller: Option<Extension<Caller>>,
    Extension(principal): Extension<Principal>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    slot: Option<Extension<AdmissionSlot>>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    // A plain GET (or a handshake this server cannot accept) gets the API's JSON error, not
    // axum's plain-text rejection.
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => {
            return AppError::InvalidRequest(format!(
                "this route takes a WebSocket handshake (RFC 6455, version 13): {}",
                rejection.body_text()
            ))
            .into_response();
        }
    };
    let frame_limit = state.config.limits.max_message_bytes.saturating_mul(2) + 4096;
    // The socket cap counts per principal; without auth (one shared principal), per address.
    let socket_owner = match &peer {
        _ if !principal.is_shared() => format!("principal:{}", principal.as_str()),
        Some(Extension(ConnectInfo(address))) => format!("ip:{}", address.ip()),
        None => "anonymous".into(),
    };
    let open = state
        .open_sockets
        .open(&socket_owner, state.config.limits.max_sockets_per_caller);
    // An open socket, not only its upgrade request, counts as in flight. A socket over its
    // caller's cap leaves the permit with the 101 response, so it is free again before the
    // client reads the 1013 close (a client that reconnects at once is not shed by its own
    // refused socket).
    let permit = match open {
        Some(_) => slot.and_then(|Extension(slot)| slot.take()),
        None => None,
    };
    upgrade
        .read_buffer_size(READ_BUFFER_BYTES)
        .max_frame_size(frame_limit)
        .max_message_size(frame_limit)
        .protocols([SUBPROTOCOL])
        .on_upgrade(move |socket| async move {
            let _permit = permit;
            serve_socket(
                state,
                request_id,
                caller.map(|Extension(c)| c),
                principal,
                open,
                socket,
            )
            .await
        })
}

/// Whether a read failed because a frame or message is over the size limit.
fn too_large(error: &axum::Error) -> bool {
    matches!(
        tungstenite_error(error),
        Some(tungstenite::Error::Capacity(_))
    )
}

/// Whether a read failed because a text frame is not UTF-8 (RFC 6455 section 8.1: close 1007).
fn not_utf8(error: &axum::Error) -> bool {
    matches!(tungstenite_error(error), Some(tungstenite::Error::Utf8(_)))
}

fn tungstenite_error(error: &axum::Error) -> Option<&tungstenite::Error> {
    use std::error::Error as _;
    error
        .source()
        .and_then(|e| e.downcast_ref::<tungstenite::Error>())
}

fn close_for(error: &AppError) -> CloseFrame {
    let code = match error {
        AppError::InvalidJson(_) => close_code::INVALID,
        AppError::PayloadTooLarge(_) => close_code::SIZE,
        e if e.retry_after().is_some() => CLOSE_TRY_AGAIN_LATER,
        e if e.status().is_client_error() => close_code::POLICY,
        _ => close_code::ERROR,
    };
    // A close reason is at most 123 bytes.
    let mut reason = format!("{}: {}", error.code(), error.public_message());
    while reason.len() > 123 {
        reason.pop();
    }
    CloseFrame {
        code,
        reason: reason.into(),
    }
}

async fn serve_socket(
    state: SharedState,
    request_id: RequestId,
    caller: Option<Caller>,
    principal: Principal,
    open: Option<OpenSocket>,
    mut socket: WebSocket,
) {
    let Some(_open) = open else {
        let limit = state.config.limits.max_sockets_per_caller;
        let frame = CloseFrame {
            code: CLOSE_TRY_AGAIN_LATER,
            reason: format!("too many open sockets for this caller (limit {limit})").into(),
        };
        let _ = socket.send(Message::Close(Some(frame))).await;
        return;
    };
    state.metrics.open_websockets.inc();
    let mut session: Option<SessionKey> = None;
    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.tick().await;
    let idle_timeout = Duration::from_millis(state.config.limits.websocket_idle_timeout_ms);
    let mut idle_deadline = tokio::time::Instant::now() + idle_timeout;
    let mut turn_number = 0u64;
    let closing = loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => {
                break Some(CloseFrame { code: close_code::AWAY, reason: "server shutting down".into() });
            }
            _ = tokio::time::sleep_until(idle_deadline) => {
                let reason = format!("idle for {} ms", idle_timeout.as_millis());
                break Some(CloseFrame { code: close_code::NORMAL, reason: reason.into() });
            }
            _ = ping.tick() => {
                if socket.send(Message::Ping(Vec::new().into())).await.is_err() {
                    break None;
                }
            }
            incoming = socket.recv() => match incoming {
                Some(Err(error)) if too_large(&error) => {
                    break Some(CloseFrame { code: close_code::SIZE, reason: "frame or message over the size limit".into() });
                }
                Some(Err(error)) if not_utf8(&error) => {
                    break Some(CloseFrame { code: close_code::INVALID, reason: "text frame is not valid UTF-8".into() });
                }
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break None,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Binary(_))) => {
                    break Some(CloseFrame { code: close_code::UNSUPPORTED, reason: "binary frames are not supported".into() });
                }
                Some(Ok(Message::Text(text))) => {
                    turn_number += 1;
                    let turn_request_id = format!("{}.{turn_number}", request_id.0);
                    match run_turn(&state, &mut socket, (&principal, &mut session), caller.as_ref(), text.as_str(), turn_request_id).await {
                        Ok(true) => idle_deadline = tokio::time::Instant::now() + idle_timeout,
                        Ok(false) => break None,
                        Err(error) => {
                            let _ = socket.send(ServerFrame::Error(error.body()).to_message()).await;
                            break Some(close_for(&error));
                        }
                    }
                }
            }
        }
    };
    if let Some(frame) = closing {
        let _ = socket.send(Message::Close(Some(frame))).await;
    }
    state.metrics.open_websockets.dec();
}

/// A client's text frame, checked as far as no state is needed: the frame, and the session it
/// names. Also the entry of the fuzz target.
pub(crate) fn parse_frame(
    text: &str,
    max_message_bytes: usize,
) -> Result<(ClientFrame, Option<SessionId>), AppError> {
    let frame: ClientFrame =
        serde_json::from_str(text).map_err(|e| AppError::InvalidJson(e.to_string()))?;
    let id = frame
        .session_id
        .as_deref()
        .map(SessionId::parse)
        .transpose()?;
    check_message(max_message_bytes, &frame.message)?;
    Ok((frame, id))
}

/// Runs one turn; `Ok(false)` when the client went away.
async fn run_turn(
    state: &SharedState,
    socket: &mut WebSocket,
    (principal, session): (&Principal, &mut Option<SessionKey>),
    caller: Option<&Caller>,
    text: &str,
    request_id: String,
) -> Result<bool, AppError> {
    let (frame, named) = parse_frame(text, state.config.limits.max_message_bytes)?;
    let (turn_session, history): (SessionKey, fn(SessionKey) -> TurnHistory) =
        match (named, session.as_ref()) {
            (Some(id), _) => (SessionKey::new(principal, id), TurnHistory::Session),
            (None, Some(current)) => (current.clone(), TurnHistory::Session),
            (None, None) => (
                SessionKey::new(principal, SessionId::generate()),
                TurnHistory::NewSession,
            ),
        };
    let model = resolve_model(state, frame.model.as_deref())?;
    // Each turn on the socket counts as one request against the caller's limit.
    if let (Some(limiter), Some(caller)) = (&state.rate_limiter, caller) {
        let decision = limiter.admit(caller).await;
        if !decision.allowed {
            return Err(decision.refusal().into());
        }
    }
    *session = Some(turn_session.clone());
    let mut events = begin_turn(
        state,
        TurnInput {
            history: history(turn_session),
            input: vec![ContextMessage::new(Role::User, frame.message)],
            model,
            request_id,
            max_tokens: None,
            temperature: None,
            sampling: Default::default(),
            end_user: None,
            caller: caller.cloned(),
            principal: principal.clone(),
        },
    )
    .await?;
    while let Some(event) = events.recv().await {
        let frame = match event {
            TurnEvent::Token(content) => ServerFrame::Token { content },
            TurnEvent::Finished(outcome) => ServerFrame::Done {
                session_id: outcome.session_id.unwrap_or_default(),
                message: outcome.reply,
                model: outcome.model,
                usage: outcome.usage,
                finish_reason: outcome.finish_reason,
                context_messages: outcome.context_messages,
            },
            TurnEvent::Failed(error) => return Err(error.into()),
            // This API offers no tools.
            TurnEvent::ToolCalls(_) => continue,
        };
        if socket.send(frame.to_message()).await.is_err() {
            return Ok(false);
        }
    }
    Ok(true)
}
