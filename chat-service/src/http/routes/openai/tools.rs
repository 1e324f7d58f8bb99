//! Tool calling on `POST /v1/chat/completions`: `tools` and `tool_choice` read into the service's
//! own types, with an error naming the field at fault (`tools[1].function.name: ...`) for
//! anything malformed; the tool calls of assistant messages a client sends back; and the calls a
//! model made, in OpenAI's response shape.
//!
//! The fields are read from JSON values rather than typed structs so that a malformed tool is
//! refused with its path, the way OpenAI refuses it, instead of a generic parse error.

use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::http::AppError;
use crate::tools::{ToolCall, ToolChoice, ToolDefinition};

/// OpenAI's limit on `tools`.
pub const MAX_TOOLS: usize = 128;

fn invalid(message: String) -> AppError {
    AppError::InvalidRequest(message)
}

/// `tools` and `tool_choice` as the back ends receive them. `tool_choice: "none"` offers no
/// tools at all; a choice other than `none` or `auto` needs tools to choose from.
pub fn parse_tools(
    tools: Option<Vec<Value>>,
    choice: Option<Value>,
) -> Result<(Vec<ToolDefinition>, ToolChoice), AppError> {
    let tools = tools.unwrap_or_default();
    if tools.len() > MAX_TOOLS {
        return Err(invalid(format!("tools: at most {MAX_TOOLS} tools")));
    }
    let mut definitions: Vec<ToolDefinition> = Vec::with_capacity(tools.len());
    for (index, tool) in tools.into_iter().enumerate() {
        let definition = parse_tool(index, tool)?;
        if definitions.iter().any(|d| d.name == definition.name) {
            return Err(invalid(format!(
                "tools[{index}].function.name: `{}` is given twice",
                definition.name
            )));
        }
        definitions.push(definition);
    }
    let choice = parse_choice(choice.as_ref(), &definitions)?;
    if choice == ToolChoice::None {
        definitions.clear();
    }
    Ok((definitions, choice))
}

fn parse_tool(index: usize, tool: Value) -> Result<ToolDefinition, AppError> {
    let Value::Object(mut tool) = tool else {
        return Err(invalid(format!("tools[{index}]: must be an object")));
    };
    match tool.get("type").and_then(Value::as_str) {
        Some("function") => {}
        Some(other) => {
            return Err(invalid(format!(
                "tools[{index}].type: `{other}` tools are not supported, only `function`"
            )));
        }
        None => return Err(invalid(format!("tools[{index}].type: must be `function`"))),
    }
    let Some(Value::Object(mut function)) = tool.remove("function") else {
        return Err(invalid(format!(
            "tools[{index}].function: an object with the function's `name` is required"
        )));
    };
    let field = |name: &str| format!("tools[{index}].function.{name}");
    let name = match function.remove("name") {
        Some(Value::String(name)) if ToolDefinition::valid_name(&name) => name,
        _ => {
            return Err(invalid(format!(
                "{}: must be 1 to 64 letters, digits, `_` or `-`",
                field("name")
            )));
        }
    };
    let description = match function.remove("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(text),
        Some(_) => {
            return Err(invalid(format!(
                "{}: must be a string",
                field("description")
            )));
        }
    };
    let parameters = match function.remove("parameters") {
        None | Some(Value::Null) => None,
        Some(schema @ Value::Object(_)) => Some(schema),
        Some(_) => {
            return Err(invalid(format!(
                "{}: must be a JSON schema object",
                field("parameters")
            )));
        }
    };
    let strict = match function.remove("strict") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(strict)) => Some(strict),
        Some(_) => return Err(invalid(format!("{}: must be a boolean", field("strict")))),
    };
    Ok(ToolDefinition {
        name,
        description,
        parameters,
        strict,
    })
}

fn parse_choice(choice: Option<&Value>, tools: &[ToolDefinition]) -> Result<ToolChoice, AppError> {
    let choice = match choice {
        None | Some(Value::Null) => return Ok(ToolChoice::Auto),
        Some(Value::String(choice)) => match choice.as_str() {
            "none" => return Ok(ToolChoice::None),
            "auto" => return Ok(ToolChoice::Auto),
            "required" => ToolChoice::Required,
            other => {
                return Err(invalid(format!(
                    "tool_choice: `{other}` is not one of `none`, `auto`, `required` or a named function"
                )));
            }
        },
        Some(Value::Object(named)) => {
            let name = named
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str);
            match (named.get("type").and_then(Value::as_str), name) {
                (Some("function"), Some(name)) => {
                    if !tools.iter().any(|t| t.name == name) {
                        return Err(invalid(format!(
                            "tool_choice: `{name}` is not among `tools`"
                        )));
                    }
                    ToolChoice::Function(name.to_string())
                }
                _ => {
                    return Err(invalid(
                        "tool_choice: a named choice is {\"type\": \"function\", \"function\": {\"name\": ...}}"
                            .into(),
                    ));
                }
            }
        }
        Some(_) => {
            return Err(invalid(
                "tool_choice: must be a string or a named function".into(),
            ));
        }
    };
    if tools.is_empty() {
        return Err(invalid(
            "tool_choice: only allowed when `tools` are given".into(),
        ));
    }
    Ok(choice)
}

/// The `tool_calls` of assistant message `message` that a client sends back.
pub fn parse_tool_calls(message: usize, calls: Vec<Value>) -> Result<Vec<ToolCall>, AppError> {
    calls
        .into_iter()
        .enumerate()
        .map(|(index, call)| {
            let at = format!("messages[{message}].tool_calls[{index}]");
            let text = |value: Option<&Value>| value.and_then(Value::as_str).map(str::to_string);
            let id = text(call.get("id")).filter(|id| !id.is_empty());
            let function = call.get("function");
            let name = text(function.and_then(|f| f.get("name")));
            let arguments = text(function.and_then(|f| f.get("arguments")));
            if call
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("function")
                != "function"
            {
                return Err(invalid(format!("{at}.type: must be `function`")));
            }
            match (id, name, arguments) {
                (None, ..) => Err(invalid(format!("{at}.id: required"))),
                (_, None, _) => Err(invalid(format!("{at}.function.name: required"))),
                (_, _, None) => Err(invalid(format!(
                    "{at}.function.arguments: required, as a string of JSON"
                ))),
                (Some(id), Some(name), Some(arguments)) => Ok(ToolCall {
                    id,
                    name,
                    arguments,
                }),
            }
        })
        .collect()
}

/// A tool call in OpenAI's response shape; `index` in streamed chunks only.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionToolCall {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: CompletionFunctionCall,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionFunctionCall {
    pub name: String,
    /// The arguments as JSON text.
    pub arguments: String,
}

/// `calls` in OpenAI's shape, numbered when they go in a stream.
pub fn completion_tool_calls(calls: Vec<ToolCall>, streamed: bool) -> Vec<CompletionToolCall> {
    calls
        .into_iter()
        .enumerate()
        .map(|(index, call)| CompletionToolCall {
            index: streamed.then_some(index as u32),
            id: call.id,
            kind: "function",
            function: CompletionFunctionCall {
                name: call.name,
                arguments: call.arguments,
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}})
    }

    fn refused(tools: Value, choice: Option<Value>) -> String {
        let tools = serde_json::from_value(tools).unwrap();
        let error = parse_tools(Some(tools), choice).unwrap_err();
        format!(
            "{} | {}",
            error.param().unwrap_or_default(),
            error.public_message()
        )
    }

    #[test]
    fn tools_and_choices_are_read() {
        let (tools, choice) = parse_tools(Some(vec![weather()]), None).unwrap();
        assert_eq!(
            (tools[0].name.as_str(), choice),
            ("get_weather", ToolChoice::Auto)
        );
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let (_, choice) = parse_tools(Some(vec![weather()]), Some(named)).unwrap();
        assert_eq!(choice, ToolChoice::Function("get_weather".into()));
        let (tools, choice) = parse_tools(Some(vec![weather()]), Some(json!("none"))).unwrap();
        assert!(tools.is_empty(), "`none` offers nothing");
        assert_eq!(choice, ToolChoice::None);
        assert!(parse_tools(None, Some(json!("none"))).is_ok());
    }

    #[test]
    fn malformed_tools_are_refused_with_their_path() {
        for (tools, choice, expected) in [
            (json!([{"type": "retrieval"}]), None, "tools[0].type | "),
            (
                json!([weather(), {"type": "function"}]),
                None,
                "tools[1].function | ",
            ),
            (
                json!([{"type": "function", "function": {"name": "get weather"}}]),
                None,
                "tools[0].function.name | ",
            ),
            (
                json!([{"type": "function", "function": {"name": "f", "parameters": "x"}}]),
                None,
                "tools[0].function.parameters | ",
            ),
            (
                json!([weather(), weather()]),
                None,
                "tools[1].function.name | ",
            ),
            (
                json!([weather()]),
                Some(json!("sometimes")),
                "tool_choice | ",
            ),
            (
                json!([weather()]),
                Some(json!({"type": "function", "function": {"name": "other"}})),
                "tool_choice | ",
            ),
            (json!([]), Some(json!("required")), "tool_choice | "),
        ] {
            let got = refused(tools, choice);
            assert!(got.starts_with(expected), "{got} (expected {expected})");
        }
    }

    #[test]
    fn tool_calls_sent_back_need_id_name_and_arguments() {
        let good = json!({"id": "call_1", "type": "function",
            "function": {"name": "f", "arguments": "{}"}});
        assert_eq!(parse_tool_calls(2, vec![good]).unwrap()[0].id, "call_1");
        let error =
            parse_tool_calls(2, vec![json!({"id": "c", "function": {"name": "f"}})]).unwrap_err();
        assert_eq!(
            error.param().as_deref(),
            Some("messages[2].tool_calls[0].function.arguments")
        );
    }
}
