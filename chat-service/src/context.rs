//! Builds the messages sent to the model: the system prompt, as much recent history as the
//! budget allows (the oldest dropped first), and the turn's new messages (the user's, or the
//! results of the tools the model called). Tokens are counted by
//! the caller's `count` (the model's tokenizer or the estimate, see [`crate::tokens`]).
//!
//! When history has to be dropped and the session has a summary of its older part (see
//! [`crate::summary`]), the summary goes into the system message and the budget left after it
//! takes the recent messages it does not cover; a summary that does not fit is left out.

use crate::conversation::{ContextMessage, Role};

/// A context ready to send, with how many stored messages made it in.
#[derive(Debug, Clone, PartialEq)]
pub struct Context {
    pub messages: Vec<ContextMessage>,
    pub history_messages: usize,
    /// The summary went in, in place of the history it covers.
    pub summarised: bool,
}

/// A summary of the first `covered` messages of the history, to send in their place.
#[derive(Debug, Clone, Copy)]
pub struct SummaryOfHistory<'a> {
    pub content: &'a str,
    pub covered: usize,
}

/// How a summary is introduced to the model, after the system prompt if there is one.
pub const SUMMARY_HEADING: &str = "Summary of the earlier conversation:";

/// The system message carrying `summary` (after `system_prompt`).
fn with_summary(system_prompt: Option<&str>, summary: &str) -> ContextMessage {
    let content = match system_prompt {
        Some(prompt) => format!("{prompt}\n\n{SUMMARY_HEADING}\n{summary}"),
        None => format!("{SUMMARY_HEADING}\n{summary}"),
    };
    ContextMessage::new(Role::System, content)
}

/// Like [`build_context`]; when not all of `history` fits, `summary` stands in for the part it
/// covers, if it fits itself.
pub fn build_context_with_summary(
    system_prompt: Option<&str>,
    history: &[ContextMessage],
    summary: Option<SummaryOfHistory<'_>>,
    new_messages: &[ContextMessage],
    budget_tokens: u32,
    count: &dyn Fn(&ContextMessage) -> u32,
) -> Context {
    let plain = build_context(system_prompt, history, new_messages, budget_tokens, count);
    let Some(summary) = summary else {
        return plain;
    };
    if plain.history_messages == history.len() {
        return plain;
    }
    let system = with_summary(system_prompt, summary.content);
    if fixed_cost(Some(&system), new_messages, count) > budget_tokens {
        return plain;
    }
    let uncovered = history.len() - summary.covered.min(history.len());
    fit(
        Some(system),
        history,
        uncovered,
        new_messages,
        budget_tokens,
        count,
        true,
    )
}

pub fn build_context(
    system_prompt: Option<&str>,
    history: &[ContextMessage],
    new_messages: &[ContextMessage],
    budget_tokens: u32,
    count: &dyn Fn(&ContextMessage) -> u32,
) -> Context {
    let system = system_prompt.map(|s| ContextMessage::new(Role::System, s));
    fit(
        system,
        history,
        history.len(),
        new_messages,
        budget_tokens,
        count,
        false,
    )
}

/// What the system message and the turn's new messages cost, which every context sends.
fn fixed_cost(
    system: Option<&ContextMessage>,
    new_messages: &[ContextMessage],
    count: &dyn Fn(&ContextMessage) -> u32,
) -> u32 {
    new_messages
        .iter()
        .map(count)
        .fold(system.map_or(0, count), u32::saturating_add)
}

/// `system`, then as many of the newest `candidates` messages of `history` as fit in what
/// `budget_tokens` leaves, then `new_messages`.
fn fit(
    system: Option<ContextMessage>,
    history: &[ContextMessage],
    candidates: usize,
    new_messages: &[ContextMessage],
    budget_tokens: u32,
    count: &dyn Fn(&ContextMessage) -> u32,
    summarised: bool,
) -> Context {
    let mut used = fixed_cost(system.as_ref(), new_messages, count);
    let mut kept = 0;
    for message in history[history.len() - candidates..].iter().rev() {
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
        summarised,
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
    fn a_summary_stands_in_for_the_dropped_part_and_the_budget_holds() {
        let long = "x".repeat(400); // ~104 tokens each
        let history: Vec<_> = (0..6)
            .map(|i| ContextMessage::new(Role::User, format!("m{i} {long}")))
            .collect();
        let summary = SummaryOfHistory {
            content: "they talked about x",
            covered: 3,
        };
        let context = build_context_with_summary(
            Some("sys"),
            &history,
            Some(summary),
            &[ContextMessage::new(Role::User, "now")],
            250,
            &estimate,
        );
        assert!(context.summarised);
        assert_eq!(context.history_messages, 2);
        assert!(context.messages[0].content.starts_with("sys\n\nSummary"));
        assert!(context.messages[0].content.ends_with("they talked about x"));
        assert!(context.messages[1].content.starts_with("m4"));
        let total: u32 = context.messages.iter().map(estimate).sum();
        assert!(total <= 250, "{total}");
    }

    #[test]
    fn a_summary_is_not_used_when_everything_fits_or_it_does_not() {
        let history = [ContextMessage::new(Role::User, "hi")];
        let summary = SummaryOfHistory {
            content: "short",
            covered: 1,
        };
        let all_fit = build_context_with_summary(
            None,
            &history,
            Some(summary),
            &[ContextMessage::new(Role::User, "again")],
            1000,
            &estimate,
        );
        assert!(!all_fit.summarised);
        assert_eq!(all_fit.history_messages, 1);
        let huge = "s".repeat(4000);
        let long = "x".repeat(400);
        let history = [
            ContextMessage::new(Role::User, long.clone()),
            ContextMessage::new(Role::User, long),
        ];
        let too_big = SummaryOfHistory {
            content: &huge,
            covered: 1,
        };
        let context = build_context_with_summary(
            None,
            &history,
            Some(too_big),
            &[ContextMessage::new(Role::User, "now")],
            150,
            &estimate,
        );
        assert!(!context.summarised);
        assert_eq!(context.history_messages, 1);
    }

    #[test]
    fn the_uncovered_messages_only_follow_a_summary() {
        let long = "x".repeat(400);
        let history: Vec<_> = (0..3)
            .map(|i| ContextMessage::new(Role::User, format!("m{i} {long}")))
            .collect();
        // The summary covers all but the last; room for two more would not bring back covered
        // ones.
        let summary = SummaryOfHistory {
            content: "s",
            covered: 2,
        };
        let context = build_context_with_summary(
            None,
            &history,
            Some(summary),
            &[ContextMessage::new(Role::User, "now")],
            290,
            &estimate,
        );
        assert!(context.summarised);
        assert_eq!(context.history_messages, 1);
        assert!(context.messages[1].content.starts_with("m2"));
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
