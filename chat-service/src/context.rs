//! Builds the messages sent to the model: the system prompt, as much recent history as the
//! budget allows (the oldest dropped first), and the new user message. Tokens are counted by
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
    new_user_message: &str,
    budget_tokens: u32,
    count: &dyn Fn(&ContextMessage) -> u32,
) -> Context {
    let system = system_prompt.map(|s| ContextMessage {
        role: Role::System,
        content: s.to_string(),
    });
    let user = ContextMessage {
        role: Role::User,
        content: new_user_message.to_string(),
    };
    let mut used = count(&user).saturating_add(system.as_ref().map_or(0, count));
    let mut kept = 0;
    for message in history.iter().rev() {
        let cost = count(message);
        if used.saturating_add(cost) > budget_tokens {
            break;
        }
        used += cost;
        kept += 1;
    }
    let mut messages = Vec::with_capacity(kept + 2);
    messages.extend(system);
    messages.extend_from_slice(&history[history.len() - kept..]);
    messages.push(user);
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
        let context = build_context(Some("be brief"), &history, "again", 1000, &estimate);
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
        let context = build_context(Some("sys"), &history, "now", 250, &estimate);
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
            &"y".repeat(1000),
            16,
            &estimate,
        );
        assert_eq!(context.history_messages, 0);
        assert_eq!(context.messages.len(), 1);
    }
}
