//! Tool calling as the OpenAI Chat Completions API defines it: the functions a client offers the
//! model ([`ToolDefinition`]), how far the model may use them ([`ToolChoice`]) and the calls it
//! makes ([`ToolCall`]). These are the service's own forms; each back-end protocol receives and
//! returns them in its wire shape (see `backend::wire`), and the history stores them with the
//! assistant message that made the calls.

use serde::{Deserialize, Serialize};

/// A function the model may call. `parameters` is the JSON schema of its arguments.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolDefinition {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

impl ToolDefinition {
    /// OpenAI's rule for function names, kept so that a tool accepted here is accepted there.
    pub fn valid_name(name: &str) -> bool {
        !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    }
}

/// OpenAI's `tool_choice`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolChoice {
    /// The model decides (the default when tools are given).
    #[default]
    Auto,
    /// No tool is offered: the model answers in text.
    None,
    /// The model must call some tool (OpenAI-protocol back ends enforce it; Ollama has no such
    /// option and treats it as `auto`).
    Required,
    /// The model must call this tool (Ollama is offered this tool alone).
    Function(String),
}

impl ToolChoice {
    pub fn is_auto(&self) -> bool {
        *self == ToolChoice::Auto
    }
}

/// One call the model made: `arguments` is the JSON text of the arguments, as OpenAI clients
/// receive it (Ollama's argument objects are written out as such text).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

impl ToolCall {
    /// An id for a call the back end sent without one (Ollama's native API may send none),
    /// given by the turn that received it.
    pub fn generated_id() -> String {
        format!("call_{:024x}", rand::random::<u128>() >> 32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_names_follow_openai() {
        for good in ["get_weather", "a", "A-1", &"x".repeat(64)] {
            assert!(ToolDefinition::valid_name(good), "{good}");
        }
        for bad in ["", "get weather", "a.b", &"x".repeat(65), "ä"] {
            assert!(!ToolDefinition::valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn generated_ids_differ_and_look_like_openai_ids() {
        let (a, b) = (ToolCall::generated_id(), ToolCall::generated_id());
        assert_ne!(a, b);
        assert!(a.starts_with("call_") && a.len() == 29, "{a}");
    }
}
