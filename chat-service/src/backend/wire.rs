//! Messages and tools in each protocol's wire shape, and tool calls read back from either.
//!
//! The two protocols differ where tools are concerned: OpenAI's tool calls carry an `id`, a
//! `type` and their arguments as JSON *text*, and a tool result names its call by
//! `tool_call_id`; Ollama's native `/api/chat` takes the arguments as a JSON *object*, may send
//! no id, and matches a tool result to its function by `tool_name`. The service keeps one form
//! ([`ToolCall`], arguments as text) and writes or reads these shapes at the edge.

use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

use crate::config::Protocol;
use crate::conversation::{ContextMessage, Role};
use crate::tools::{ToolCall, ToolChoice, ToolDefinition};

/// The messages of a request as `protocol` takes them.
pub(super) struct WireMessages<'a> {
    pub protocol: Protocol,
    pub messages: &'a [ContextMessage],
}

impl Serialize for WireMessages<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.messages.iter().map(|message| WireMessage {
            protocol: self.protocol,
            message,
            tool_name: tool_name_of(self.messages, message),
        }))
    }
}

/// Ollama matches a tool result to its function by name: the name of the call it answers.
fn tool_name_of<'a>(messages: &'a [ContextMessage], message: &ContextMessage) -> Option<&'a str> {
    let id = message.tool_call_id.as_deref()?;
    messages
        .iter()
        .flat_map(|m| &m.tool_calls)
        .find(|call| call.id == id)
        .map(|call| call.name.as_str())
}

struct WireMessage<'a> {
    protocol: Protocol,
    message: &'a ContextMessage,
    tool_name: Option<&'a str>,
}

impl Serialize for WireMessage<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let message = self.message;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("role", message.role.as_str())?;
        if self.protocol == Protocol::Openai
            && message.content.is_empty()
            && !message.tool_calls.is_empty()
        {
            // OpenAI's form of an assistant message that only called tools.
            map.serialize_entry("content", &None::<&str>)?;
        } else {
            map.serialize_entry("content", &message.content)?;
        }
        if !message.tool_calls.is_empty() {
            let calls: Vec<WireToolCall<'_>> = message
                .tool_calls
                .iter()
                .map(|call| WireToolCall {
                    protocol: self.protocol,
                    call,
                })
                .collect();
            map.serialize_entry("tool_calls", &calls)?;
        }
        if message.role == Role::Tool {
            match self.protocol {
                Protocol::Openai => map.serialize_entry("tool_call_id", &message.tool_call_id)?,
                Protocol::Ollama => {
                    if let Some(name) = self.tool_name {
                        map.serialize_entry("tool_name", name)?;
                    }
                }
            }
        }
        map.end()
    }
}

struct WireToolCall<'a> {
    protocol: Protocol,
    call: &'a ToolCall,
}

impl Serialize for WireToolCall<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let call = self.call;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("id", &call.id)?;
        match self.protocol {
            Protocol::Openai => {
                map.serialize_entry("type", "function")?;
                map.serialize_entry(
                    "function",
                    &FunctionCall {
                        name: &call.name,
                        arguments: &call.arguments,
                    },
                )?;
            }
            Protocol::Ollama => {
                // Ollama wants an object; arguments that are not one (a model's broken JSON,
                // kept as it was) go as the text they are.
                let arguments = serde_json::from_str::<serde_json::Value>(&call.arguments)
                    .ok()
                    .filter(serde_json::Value::is_object)
                    .unwrap_or_else(|| serde_json::Value::String(call.arguments.clone()));
                map.serialize_entry(
                    "function",
                    &FunctionCall {
                        name: &call.name,
                        arguments: &arguments,
                    },
                )?;
            }
        }
        map.end()
    }
}

#[derive(Serialize)]
struct FunctionCall<'a, A: Serialize> {
    name: &'a str,
    arguments: &'a A,
}

/// A tool definition in the shape both protocols take.
#[derive(Serialize)]
pub(super) struct WireTool<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    function: &'a ToolDefinition,
}

/// The tools `protocol` is offered for `choice`, and OpenAI's `tool_choice` (Ollama has none:
/// a named function is offered alone, and `required` is `auto`).
pub(super) fn wire_tools<'a>(
    protocol: Protocol,
    tools: &'a [ToolDefinition],
    choice: &'a ToolChoice,
) -> (Vec<WireTool<'a>>, Option<serde_json::Value>) {
    if tools.is_empty() || *choice == ToolChoice::None {
        return (Vec::new(), None);
    }
    let offered = |tool: &&ToolDefinition| match (protocol, choice) {
        (Protocol::Ollama, ToolChoice::Function(name)) => tool.name == *name,
        _ => true,
    };
    let wire = tools
        .iter()
        .filter(offered)
        .map(|function| WireTool {
            kind: "function",
            function,
        })
        .collect();
    let choice = match (protocol, choice) {
        (Protocol::Ollama, _) | (_, ToolChoice::Auto | ToolChoice::None) => None,
        (Protocol::Openai, ToolChoice::Required) => Some(serde_json::json!("required")),
        (Protocol::Openai, ToolChoice::Function(name)) => Some(serde_json::json!({
            "type": "function",
            "function": {"name": name},
        })),
    };
    (wire, choice)
}

/// A tool call as Ollama sends it: arguments as an object, perhaps no id.
#[derive(Deserialize)]
pub(super) struct OllamaToolCall {
    #[serde(default)]
    id: Option<String>,
    function: OllamaFunction,
}

#[derive(Deserialize)]
struct OllamaFunction {
    name: String,
    #[serde(default)]
    arguments: serde_json::Value,
}

impl From<OllamaToolCall> for ToolCall {
    fn from(call: OllamaToolCall) -> Self {
        let arguments = match call.function.arguments {
            serde_json::Value::String(text) => text,
            serde_json::Value::Null => "{}".into(),
            object => object.to_string(),
        };
        // No id: the turn gives it one (see `ToolCall::generated_id`), so that decoding stays
        // a pure function of the bytes.
        ToolCall {
            id: call.id.unwrap_or_default(),
            name: call.function.name,
            arguments,
        }
    }
}

/// A tool call of an OpenAI answer, whole (`message.tool_calls`) or a streamed piece of one
/// (`delta.tool_calls`, where only the first piece has the id and name).
#[derive(Deserialize)]
pub(super) struct OpenAiToolCall {
    #[serde(default)]
    index: Option<u32>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<OpenAiFunction>,
}

#[derive(Deserialize)]
struct OpenAiFunction {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

impl From<OpenAiToolCall> for ToolCall {
    fn from(call: OpenAiToolCall) -> Self {
        let (name, arguments) = call
            .function
            .map(|f| (f.name.unwrap_or_default(), f.arguments.unwrap_or_default()))
            .unwrap_or_default();
        ToolCall {
            id: call.id.unwrap_or_default(),
            name,
            arguments,
        }
    }
}

/// The tool calls of an OpenAI stream, put together from their pieces by `index`.
#[derive(Default)]
pub(super) struct StreamedToolCalls {
    calls: Vec<(u32, ToolCall)>,
}

impl StreamedToolCalls {
    pub fn add(&mut self, piece: OpenAiToolCall) {
        let index = piece.index.unwrap_or(self.calls.len() as u32);
        let (name, arguments) = piece
            .function
            .map(|f| (f.name, f.arguments))
            .unwrap_or_default();
        let call = match self.calls.iter_mut().find(|(i, _)| *i == index) {
            Some((_, call)) => call,
            None => {
                self.calls.push((
                    index,
                    ToolCall {
                        id: String::new(),
                        name: String::new(),
                        arguments: String::new(),
                    },
                ));
                &mut self.calls.last_mut().expect("just pushed").1
            }
        };
        if let Some(id) = piece.id.filter(|id| !id.is_empty()) {
            call.id = id;
        }
        if let Some(name) = name {
            call.name.push_str(&name);
        }
        if let Some(arguments) = arguments {
            call.arguments.push_str(&arguments);
        }
    }

    /// A call that came whole (Ollama's).
    pub fn push(&mut self, call: ToolCall) {
        self.calls.push((self.calls.len() as u32, call));
    }

    /// The calls so far (an id may be empty: the turn gives one).
    pub fn take(&mut self) -> Vec<ToolCall> {
        std::mem::take(&mut self.calls)
            .into_iter()
            .map(|(_, call)| call)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn loop_messages() -> Vec<ContextMessage> {
        vec![
            ContextMessage::new(Role::User, "Weather in Paris?"),
            ContextMessage {
                tool_calls: vec![ToolCall {
                    id: "call_1".into(),
                    name: "get_weather".into(),
                    arguments: r#"{"city":"Paris"}"#.into(),
                }],
                ..ContextMessage::new(Role::Assistant, "")
            },
            ContextMessage::tool_result("call_1", "18 C"),
        ]
    }

    #[test]
    fn a_tool_loop_goes_to_each_protocol_in_its_shape() {
        let messages = loop_messages();
        let ollama = serde_json::to_value(WireMessages {
            protocol: Protocol::Ollama,
            messages: &messages,
        })
        .unwrap();
        assert_eq!(
            ollama[1]["tool_calls"][0]["function"],
            json!({"name": "get_weather", "arguments": {"city": "Paris"}})
        );
        assert_eq!(
            ollama[2],
            json!({"role": "tool", "content": "18 C", "tool_name": "get_weather"})
        );
        let openai = serde_json::to_value(WireMessages {
            protocol: Protocol::Openai,
            messages: &messages,
        })
        .unwrap();
        assert_eq!(
            openai[0],
            json!({"role": "user", "content": "Weather in Paris?"})
        );
        assert_eq!(
            openai[1],
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_1",
                "type": "function", "function": {"name": "get_weather",
                "arguments": "{\"city\":\"Paris\"}"}}]})
        );
        assert_eq!(
            openai[2],
            json!({"role": "tool", "content": "18 C", "tool_call_id": "call_1"})
        );
    }

    #[test]
    fn tool_choice_narrows_what_ollama_is_offered() {
        let tools = ["a", "b"].map(|name| ToolDefinition {
            name: name.into(),
            description: None,
            parameters: Some(json!({"type": "object"})),
            strict: None,
        });
        let named = ToolChoice::Function("b".into());
        let (offered, choice) = wire_tools(Protocol::Ollama, &tools, &named);
        assert_eq!(
            serde_json::to_value(&offered).unwrap(),
            json!([{"type": "function", "function": {"name": "b", "parameters": {"type": "object"}}}])
        );
        assert_eq!(choice, None);
        let (offered, choice) = wire_tools(Protocol::Openai, &tools, &named);
        assert_eq!(offered.len(), 2);
        assert_eq!(choice.unwrap()["function"]["name"], "b");
        assert!(
            wire_tools(Protocol::Openai, &tools, &ToolChoice::None)
                .0
                .is_empty()
        );
    }

    #[test]
    fn streamed_pieces_assemble_into_calls() {
        let mut calls = StreamedToolCalls::default();
        for piece in [
            json!({"index": 0, "id": "call_a", "function": {"name": "f", "arguments": ""}}),
            json!({"index": 1, "id": "call_b", "function": {"name": "g", "arguments": "{}"}}),
            json!({"index": 0, "function": {"arguments": "{\"x\":"}}),
            json!({"index": 0, "function": {"arguments": "1}"}}),
        ] {
            calls.add(serde_json::from_value(piece).unwrap());
        }
        let calls = calls.take();
        assert_eq!(calls[0].arguments, r#"{"x":1}"#);
        assert_eq!(
            (calls[1].id.as_str(), calls[1].name.as_str()),
            ("call_b", "g")
        );
        let ollama: OllamaToolCall =
            serde_json::from_value(json!({"function": {"name": "f", "arguments": {"x": 1}}}))
                .unwrap();
        let call = ToolCall::from(ollama);
        assert_eq!(call.arguments, r#"{"x":1}"#);
        assert!(call.id.is_empty(), "given by the turn");
    }
}
