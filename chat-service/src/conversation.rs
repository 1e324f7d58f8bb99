//! The vocabulary of a conversation that every part of the service shares: who speaks
//! ([`Role`]), a message as a model receives it ([`ContextMessage`]), which conversation
//! ([`SessionId`]), whose it is ([`Principal`], [`SessionKey`], [`EndUser`]), how the answer is
//! asked for ([`Sampling`]), how a reply ended ([`FinishReason`]) and what it cost ([`Usage`]).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::tools::{ToolCall, ToolChoice, ToolDefinition};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    /// The result of a tool call, sent by the client (OpenAI's `tool` role).
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// One message of a context, as the back ends receive it (each protocol in its own shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextMessage {
    pub role: Role,
    pub content: String,
    /// Assistant messages: the tools the model called (its `content` may then be empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// Tool messages: the call this is the result of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ContextMessage {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }

    /// The result of the tool call `tool_call_id`.
    pub fn tool_result(tool_call_id: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            tool_call_id: Some(tool_call_id.into()),
            ..Self::new(Role::Tool, content)
        }
    }
}

/// Token counts the back end reported for one generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

impl Usage {
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// How a client asks for its answer beyond temperature and length: OpenAI's `top_p`, `seed`,
/// `stop`, `response_format` and the tools it offers, which each back-end protocol receives in
/// its own form. The default asks for nothing, so the back end's defaults apply. Part of the
/// response-cache key: the same context with another stop sequence is another answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Sampling {
    pub top_p: Option<f64>,
    pub seed: Option<i64>,
    /// Up to [`Sampling::MAX_STOP_SEQUENCES`] sequences that end the answer (not included in it).
    pub stop: Vec<String>,
    pub format: OutputFormat,
    /// The functions the model may call; empty when the client offers none (or `tool_choice`
    /// is `none`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<ToolDefinition>,
    #[serde(skip_serializing_if = "ToolChoice::is_auto")]
    pub tool_choice: ToolChoice,
}

impl Sampling {
    /// OpenAI's limit, kept so that a client moving here meets the same bound.
    pub const MAX_STOP_SEQUENCES: usize = 4;
}

/// The form of the answer (OpenAI's `response_format`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutputFormat {
    #[default]
    Text,
    /// Some JSON object ("JSON mode"; Ollama's `format: "json"`).
    JsonObject,
    /// JSON valid against `schema` (Ollama's `format: <schema>`).
    JsonSchema {
        name: String,
        schema: serde_json::Value,
        strict: bool,
    },
}

/// An end user inside a principal, as the OpenAI `user` field (or `/v1/chat`'s `user`) names
/// them: any label of 1 to [`EndUser::MAX_BYTES`] bytes without control characters, such as an
/// e-mail address. Sessions remember the end users who took part, so that one end user's
/// sessions can be listed, exported and erased (`/v1/sessions?user=`, `DELETE /v1/users/{user}`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EndUser(String);

/// An end-user label that is empty, too long or holds control characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("user: must be 1 to 256 bytes without control characters")]
pub struct InvalidEndUser;

impl EndUser {
    pub const MAX_BYTES: usize = 256;

    pub fn parse(raw: &str) -> Result<Self, InvalidEndUser> {
        let valid =
            !raw.is_empty() && raw.len() <= Self::MAX_BYTES && !raw.chars().any(char::is_control);
        if valid {
            Ok(Self(raw.to_string()))
        } else {
            Err(InvalidEndUser)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The session an end user's turns go to when the client names none (OpenAI requests
    /// without `x-session-id`): the label itself where it is a valid session id, as before
    /// labels were free-form, else `u-` and 128 bits of its SHA-256, so that an e-mail address
    /// names one stable session inside the caller's namespace.
    pub fn default_session(&self) -> SessionId {
        if let Ok(id) = SessionId::parse(&self.0) {
            return id;
        }
        use sha2::Digest;
        let digest = sha2::Sha256::digest(self.0.as_bytes());
        SessionId(format!("u-{}", hex::encode(&digest[..16])))
    }
}

impl fmt::Display for EndUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A session id that is not `^[A-Za-z0-9_-]{1,64}$`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("session id must match ^[A-Za-z0-9_-]{{1,64}}$")]
pub struct InvalidSessionId;

/// A session id that matched `^[A-Za-z0-9_-]{1,64}$`; only such values reach Redis keys and
/// MongoDB filters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionId(String);

impl SessionId {
    pub fn parse(raw: &str) -> Result<Self, InvalidSessionId> {
        let valid = !raw.is_empty()
            && raw.len() <= 64
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if valid {
            Ok(SessionId(raw.to_string()))
        } else {
            Err(InvalidSessionId)
        }
    }

    /// 128 random bits as 32 hex digits.
    pub fn generate() -> Self {
        // 128 random bits as 32 hex digits, in one formatting pass (this is also every
        // request's id).
        SessionId(format!("{:032x}", rand::random::<u128>()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who a request acts for, and so whose sessions it sees: an API key's id, an end user named by
/// a trusted proxy, or nobody in particular (auth off, and the owner of pre-ownership sessions).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal(String);

impl Principal {
    /// The one namespace of a service without auth, where session ids are global as they were
    /// before sessions had owners.
    pub fn shared() -> Self {
        Principal(String::new())
    }

    /// Callers of one API key (its configured name, or the short digest of an unnamed key).
    pub fn api_key(id: &str) -> Self {
        Principal(format!("k.{}", escape(id)))
    }

    /// An end user as a trusted proxy named them.
    pub fn proxy_user(user: &str) -> Self {
        Principal(format!("u.{}", escape(user)))
    }

    /// A principal as [`Principal::as_str`] gave it, read back from a store.
    pub fn from_stored(stored: &str) -> Self {
        Principal(stored.to_string())
    }

    pub fn is_shared(&self) -> bool {
        self.0.is_empty()
    }

    /// A short, plain form for keys in Redis and MongoDB; empty for [`Principal::shared`].
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Anything but `[A-Za-z0-9_-]` as `%XX`, so that principals never contain the `/` that
/// separates them from the session id, and different names never meet in one key.
fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
            escaped.push(byte as char);
        } else {
            escaped.push_str(&format!("%{byte:02X}"));
        }
    }
    escaped
}

/// A session as stored: the client's id inside its principal's namespace. The storage key is
/// `<principal>/<id>`, or the bare id in the shared namespace (which is how sessions were stored
/// before they had owners), so the same client id under two principals is two sessions, and
/// nobody can name a session of another principal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionKey {
    id: SessionId,
    storage: String,
}

impl SessionKey {
    pub fn new(owner: &Principal, id: SessionId) -> Self {
        let storage = if owner.is_shared() {
            id.as_str().to_string()
        } else {
            format!("{}/{}", owner.as_str(), id.as_str())
        };
        Self { id, storage }
    }

    /// The key of a session as the stores hold it (`<principal>/<id>`, or a bare id from before
    /// ownership), for work that starts from the stores, such as the retention sweep.
    pub fn from_storage(storage: &str) -> Option<Self> {
        let id = storage.rsplit('/').next()?;
        Some(Self {
            id: SessionId::parse(id).ok()?,
            storage: storage.to_string(),
        })
    }

    /// The id the client knows the session by.
    pub fn id(&self) -> &SessionId {
        &self.id
    }

    /// The key in MongoDB documents and Redis keys.
    pub fn as_str(&self) -> &str {
        &self.storage
    }
}

/// The client's id; the storage key is for the stores only.
impl fmt::Display for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id.as_str())
    }
}

/// Why a reply ended. Serialised as the string OpenAI uses (`stop`, `length`), or ours for
/// replies cut short (`error`, `cancelled`); an OpenAI-protocol back end may report others
/// (`content_filter`, `tool_calls`), which pass through unchanged as [`FinishReason::Other`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum FinishReason {
    /// The model finished its answer.
    Stop,
    /// The answer reached the token limit.
    Length,
    /// The back end failed mid-answer; the partial reply is stored as incomplete.
    Error,
    /// The client left mid-answer; the partial reply is stored as incomplete.
    Cancelled,
    /// Any other reason a back end reported, verbatim.
    Other(String),
}

impl FinishReason {
    pub fn as_str(&self) -> &str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Error => "error",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Other(reason) => reason,
        }
    }
}

impl From<String> for FinishReason {
    fn from(reason: String) -> Self {
        match reason.as_str() {
            "stop" => FinishReason::Stop,
            "length" => FinishReason::Length,
            "error" => FinishReason::Error,
            "cancelled" => FinishReason::Cancelled,
            _ => FinishReason::Other(reason),
        }
    }
}

impl From<&str> for FinishReason {
    fn from(reason: &str) -> Self {
        FinishReason::from(reason.to_string())
    }
}

impl From<FinishReason> for String {
    fn from(reason: FinishReason) -> Self {
        match reason {
            FinishReason::Other(reason) => reason,
            known => known.as_str().to_string(),
        }
    }
}

impl fmt::Display for FinishReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_short_and_plain() {
        for good in ["a", "A-z_0", &"x".repeat(64)] {
            assert_eq!(SessionId::parse(good).unwrap().as_str(), good);
        }
        for bad in ["", &"x".repeat(65), "a b", "a/b", "a:b", "ä", "a\n"] {
            assert_eq!(SessionId::parse(bad), Err(InvalidSessionId), "{bad:?}");
        }
    }

    #[test]
    fn generated_session_ids_parse_and_differ() {
        let (a, b) = (SessionId::generate(), SessionId::generate());
        assert_eq!(a.as_str().len(), 32);
        assert_eq!(SessionId::parse(a.as_str()), Ok(a.clone()));
        assert_ne!(a, b);
    }

    #[test]
    fn one_client_id_under_two_principals_is_two_storage_keys() {
        let id = SessionId::parse("chat-1").unwrap();
        let a = SessionKey::new(&Principal::api_key("team-a"), id.clone());
        let b = SessionKey::new(&Principal::api_key("team-b"), id.clone());
        let user = SessionKey::new(&Principal::proxy_user("team-a"), id.clone());
        let shared = SessionKey::new(&Principal::shared(), id.clone());
        assert_eq!(a.as_str(), "k.team-a/chat-1");
        assert_eq!(shared.as_str(), "chat-1", "the pre-ownership key");
        let keys = [a.as_str(), b.as_str(), user.as_str(), shared.as_str()];
        for (i, key) in keys.iter().enumerate() {
            assert!(!keys[i + 1..].contains(key), "{keys:?}");
        }
        assert_eq!(a.to_string(), "chat-1", "clients see their own id");
        // A proxy-named user cannot reach into another namespace with a separator.
        assert_eq!(
            Principal::proxy_user("x/../k.team-a").as_str(),
            "u.x%2F%2E%2E%2Fk%2Eteam-a"
        );
    }

    #[test]
    fn finish_reasons_serialise_as_the_plain_strings() {
        let cases = [
            (FinishReason::Stop, "stop"),
            (FinishReason::Length, "length"),
            (FinishReason::Error, "error"),
            (FinishReason::Cancelled, "cancelled"),
            (
                FinishReason::Other("content_filter".into()),
                "content_filter",
            ),
        ];
        for (reason, text) in cases {
            let json = serde_json::to_value(&reason).unwrap();
            assert_eq!(json, serde_json::Value::String(text.into()));
            assert_eq!(
                serde_json::from_value::<FinishReason>(json).unwrap(),
                reason
            );
            assert_eq!(reason.to_string(), text);
        }
    }

    #[test]
    fn finish_reasons_are_stored_as_strings() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Stored {
            finish_reason: FinishReason,
        }
        let stored = Stored {
            finish_reason: FinishReason::Length,
        };
        let document = mongodb::bson::to_document(&stored).unwrap();
        assert_eq!(document.get_str("finish_reason").unwrap(), "length");
        let read: Stored = mongodb::bson::from_document(document).unwrap();
        assert_eq!(read, stored);
    }

    #[test]
    fn end_users_are_free_form_labels_with_a_stable_session() {
        let email = EndUser::parse("alice@example.com").unwrap();
        let session = email.default_session();
        assert_eq!(
            session,
            EndUser::parse("alice@example.com")
                .unwrap()
                .default_session()
        );
        assert!(session.as_str().starts_with("u-") && session.as_str().len() == 34);
        assert_ne!(
            session,
            EndUser::parse("bob@example.com").unwrap().default_session()
        );
        // A label that is a session id keeps naming that session, as before.
        assert_eq!(
            EndUser::parse("alice").unwrap().default_session().as_str(),
            "alice"
        );
        assert!(EndUser::parse(&"x".repeat(EndUser::MAX_BYTES)).is_ok());
        for bad in [
            "",
            &"x".repeat(EndUser::MAX_BYTES + 1),
            "alice\r\nx-session-id: bob",
            "a\u{0}",
        ] {
            assert_eq!(EndUser::parse(bad), Err(InvalidEndUser), "{bad:?}");
        }
    }

    #[test]
    fn usage_totals_prompt_and_completion() {
        assert_eq!(Usage::new(3, 4).total_tokens, 7);
    }
}
