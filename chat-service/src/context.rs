//! Builds the messages sent to the model: the system prompt, as much recent history as the
//! budget allows (the oldest dropped first), and the turn's new messages (the user's, or the
//! results of the tools the model called). Tokens are counted by
//! the caller's `count` (the model's tokenizer or the estimate, see [`crate::tokens`]).

use crate::conversation::{ContextMessage, Role};

/// A context ready to send, with how many stored messages made it in.
#[derive(Debug, Clone, PartialEq)]
pub struct Context {
    pub messages: Vec<ContextMessage>,
    pub history_messages: usize,
}

pub fn build_context(
    system_prompt: Option<&str>,
    history: &[ContextMessage],
    new_messages: &[ContextMessage],
    budget_tokens: u32,
    count: &dyn Fn(&ContextMessage) -> u32,
) -> Context {
    let system = system_prompt.map(|s| ContextMessage::new(Role::System, s));
    let mut used = new_messages
        .iter()
        .map(count)
        .fold(system.as_ref().map_or(0, count), u32::saturating_add);
    let mut kept = 0;
    for message in history.iter().rev() {
        let cost = count(message);
        if used.saturating_add(cost) > budget_tokens {
            break;
        }
        used += cost;
        kept += 1;
    }
    // A tool result without the assistant message that called the tool is refused by OpenAI
    // servers and meaningless to any model: the cut never leaves one at the start.
    while kept > 0 && history[history.len() - kept].role == Role::Tool {
        kept -= 1;
    }
    let mut messages = Vec::with_capacity(kept + 1 + new_messages.len());
    messages.extend(system);
    messages.extend_from_slice(&history[history.len() - kept..]);
    messages.extend_from_slice(new_messages);
    Context {
        messages,
        history_messages: kept,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::TokenCounter;

    fn estimate(message: &ContextMessage) -> u32 {
        TokenCounter::default().count("any", message)
    }

    #[test]
    fn keeps_everything_within_budget() {
        let history = [
            ContextMessage::new(Role::User, "hi"),
            ContextMessage::new(Role::Assistant, "hello"),
        ];
        let context = build_context(
            Some("be brief"),
            &history,
            &[ContextMessage::new(Role::User, "again")],
            1000,
            &estimate,
        );
        assert_eq!(context.history_messages, 2);
        assert_eq!(context.messages.len(), 4);
        assert_eq!(context.messages[0].role, Role::System);
        assert_eq!(context.messages[3].content, "again");
    }

    #[test]
    fn drops_oldest_first_and_keeps_system_prompt() {
        let long = "x".repeat(400); // ~104 tokens each
        let history = [
            ContextMessage::new(Role::User, format!("old {long}")),
            ContextMessage::new(Role::Assistant, format!("mid {long}")),
            ContextMessage::new(Role::User, format!("new {long}")),
        ];
        let context = build_context(
            Some("sys"),
            &history,
            &[ContextMessage::new(Role::User, "now")],
            250,
            &estimate,
        );
        assert_eq!(context.history_messages, 2);
        assert_eq!(context.messages[0].content, "sys");
        assert!(context.messages[1].content.starts_with("mid"));
        assert!(context.messages[2].content.starts_with("new"));
    }

    #[test]
    fn new_message_is_kept_even_over_budget() {
        let context = build_context(
            None,
            &[ContextMessage::new(Role::User, "a")],
            &[ContextMessage::new(Role::User, "y".repeat(1000))],
            16,
            &estimate,
        );
        assert_eq!(context.history_messages, 0);
        assert_eq!(context.messages.len(), 1);
    }

    #[test]
    fn the_cut_never_leaves_a_tool_result_without_its_call() {
        let call = ContextMessage {
            tool_calls: vec![crate::tools::ToolCall {
                id: "call_1".into(),
                name: "f".into(),
                arguments: "x".repeat(400),
            }],
            ..ContextMessage::new(Role::Assistant, "")
        };
        let history = [
            ContextMessage::new(Role::User, "q"),
            call,
            ContextMessage::tool_result("call_1", "r"),
            ContextMessage::new(Role::Assistant, "a"),
        ];
        let next = [ContextMessage::new(Role::User, "next")];
        // The budget holds the last two messages but not the call before them.
        let context = build_context(None, &history, &next, 40, &estimate);
        assert_eq!(context.history_messages, 1, "{:?}", context.messages);
        assert_eq!(context.messages[0].content, "a");
    }
}
