//! Summarisation of the part of a session that no longer fits its context
//! (`context.summarisation`).
//!
//! A session's turn whose context has to drop history uses the session's stored summary (the
//! one that covers the most, from MongoDB, so every replica sees it) in place of the messages
//! it covers, plus as many recent messages after it as fit. When the dropped part reaches past
//! what that summary covers, the turn, once stored, calls for a new summary *after* it: in the
//! background, so no turn waits for a summary; the next turns use it. The call writes a summary
//! of the previous summary and the messages dropped since, through the back-end pool like any
//! generation (not streamed), and stores it next to the messages (see `history::summaries`).
//!
//! The cost is bounded: at most one call per `everyTurns` turns of a session (a claim on the
//! session in MongoDB, shared by replicas; a failed call counts), at most `maxSummaryTokens`
//! generated, and the call's tokens are charged to the caller's token budget like a turn's
//! (a budget without room skips the call). A call that fails or outlasts `timeoutMs` stores
//! nothing: the session stays on plain trimming, `chat_summaries_total{outcome}` counts it and a
//! warning says so. A summary is part of its session, so it is its caller's alone and goes with
//! the session's erasure and retention.

use std::fmt::Write as _;
use std::time::Duration;

use futures::StreamExt;
use tracing::Instrument;

use crate::backend::{Chunk, EndpointError, GenerationRequest};
use crate::context::{Context, SummaryOfHistory, build_context, build_context_with_summary};
use crate::conversation::{ContextMessage, Role, Sampling, SessionId, SessionKey, Usage};
use crate::history::{NewSummary, RecentMessage, StoredMessage, StoredSummary};
use crate::metrics::{SummaryLabels, TokenLabels};
use crate::rate_limit::Caller;
use crate::state::SharedState;

/// Messages one summary call reads at most; a longer dropped part is summarised over several
/// calls (each covering the next stretch).
const MAX_SUMMARISED_MESSAGES: i64 = 200;

/// A summary a turn calls for, written after the turn is stored.
#[derive(Debug, Clone)]
pub struct SummaryJob {
    session: SessionKey,
    model: String,
    previous: Option<StoredSummary>,
    /// The last message the context left out.
    through_seq: i64,
}

/// The context of a turn over `history` (the stateless case, or a session without drops).
pub fn context_for(
    state: &SharedState,
    history: &[ContextMessage],
    summary: Option<SummaryOfHistory<'_>>,
    new_messages: &[ContextMessage],
    model: &str,
) -> Context {
    let config = &state.config.context;
    build_context_with_summary(
        config.system_prompt.as_deref(),
        history,
        summary,
        new_messages,
        config.max_context_tokens,
        &|m| state.tokens.count(model, m),
    )
}

/// The context of a session's turn over its `recent` messages, with the stored summary where
/// history has to be dropped, and the summary this turn calls for, if any.
pub async fn session_context(
    state: &SharedState,
    session: &SessionKey,
    recent: &[RecentMessage],
    new_messages: &[ContextMessage],
    model: &str,
) -> (Context, Option<SummaryJob>) {
    let history: Vec<ContextMessage> = recent.iter().cloned().map(ContextMessage::from).collect();
    let config = &state.config.context;
    let plain = build_context(
        config.system_prompt.as_deref(),
        &history,
        new_messages,
        config.max_context_tokens,
        &|m| state.tokens.count(model, m),
    );
    if !config.summarisation.enabled || plain.history_messages == history.len() {
        return (plain, None);
    }
    let stored = match state.history.latest_summary(session).await {
        Ok(stored) => stored,
        Err(e) => {
            tracing::warn!(error = %e, "summary unavailable; the context is trimmed instead");
            None
        }
    };
    let context = match &stored {
        Some(summary) => {
            let covered = recent
                .iter()
                .take_while(|m| m.seq <= summary.covers_seq)
                .count();
            let summary = SummaryOfHistory {
                content: &summary.content,
                covered,
            };
            context_for(state, &history, Some(summary), new_messages, model)
        }
        None => plain,
    };
    let job = dropped_through(recent, context.history_messages)
        .filter(|&through| through > stored.as_ref().map_or(0, |s| s.covers_seq))
        .map(|through_seq| SummaryJob {
            session: session.clone(),
            model: config
                .summarisation
                .model
                .clone()
                .unwrap_or_else(|| model.to_string()),
            previous: stored.clone(),
            through_seq,
        });
    (context, job)
}

/// The `seq` of the newest message of `recent` left out when the context kept the last `kept`.
fn dropped_through(recent: &[RecentMessage], kept: usize) -> Option<i64> {
    let dropped = recent.len().checked_sub(kept)?;
    dropped.checked_sub(1).map(|last| recent[last].seq)
}

/// What the summarising model is sent: the instructions, then the previous summary and the
/// messages after it as one transcript.
pub fn summary_request(
    prompt: &str,
    previous: Option<&str>,
    messages: &[StoredMessage],
) -> Vec<ContextMessage> {
    let mut transcript = String::new();
    if let Some(previous) = previous {
        let _ = write!(
            transcript,
            "Summary so far:\n{previous}\n\nThe conversation since:\n"
        );
    }
    for message in messages {
        let _ = writeln!(transcript, "{}: {}", message.role.as_str(), message.content);
    }
    vec![
        ContextMessage::new(Role::System, prompt),
        ContextMessage::new(Role::User, transcript),
    ]
}

/// Writes the summary `job` calls for in the background, after the turn whose user message has
/// `turn_seq`; tokens are charged to `caller`.
pub fn spawn(state: &SharedState, job: SummaryJob, caller: Option<Caller>, turn_seq: i64) {
    let state = state.clone();
    let span = tracing::info_span!("summary", session_id = %job.session);
    let turns = state.turns.clone();
    turns.spawn(
        async move {
            if let Some(outcome) = summarise(&state, job, caller, turn_seq).await {
                state
                    .metrics
                    .summaries
                    .get_or_create(&SummaryLabels { outcome })
                    .inc();
            }
        }
        .instrument(span),
    );
}

/// The outcome to count, `None` when no call was due.
async fn summarise(
    state: &SharedState,
    job: SummaryJob,
    caller: Option<Caller>,
    turn_seq: i64,
) -> Option<&'static str> {
    let config = &state.config.context.summarisation;
    match state
        .history
        .claim_summary(&job.session, turn_seq, config.every_turns)
        .await
    {
        Ok(true) => {}
        Ok(false) => {
            tracing::debug!("summary not due yet (one call per everyTurns turns)");
            return None;
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not claim the summary call; trimming instead");
            return Some("store_error");
        }
    }
    let after = job.previous.as_ref().map_or(0, |s| s.covers_seq);
    let limit = (job.through_seq - after).clamp(1, MAX_SUMMARISED_MESSAGES);
    let mut messages = match state.history.page(&job.session, after, limit).await {
        Ok(messages) => messages,
        Err(e) => {
            tracing::warn!(error = %e, "could not read the messages to summarise");
            return Some("store_error");
        }
    };
    messages.retain(|m| m.seq <= job.through_seq);
    let covers_seq = messages.last()?.seq;
    let request = summary_request(
        &config.prompt,
        job.previous.as_ref().map(|s| s.content.as_str()),
        &messages,
    );
    let prompt_tokens: u32 = request
        .iter()
        .map(|m| state.tokens.count(&job.model, m))
        .sum();
    let mut reservation = None;
    if let (Some(limiter), Some(caller)) = (&state.rate_limiter, &caller) {
        let tokens = u64::from(prompt_tokens) + u64::from(config.max_summary_tokens);
        match limiter.reserve_tokens(caller, tokens).await {
            Ok(reserved) => reservation = reserved,
            Err(refused) => {
                tracing::warn!(error = %refused, "no token budget left for a summary; trimming instead");
                return Some("budget");
            }
        }
    }
    let timeout = Duration::from_millis(config.timeout_ms);
    let call = generate(state, &job, &request, config.max_summary_tokens);
    // `None`: out of time, or the shutdown deadline came first.
    let generated = tokio::select! {
        generated = tokio::time::timeout(timeout, call) => generated.ok(),
        () = state.turn_deadline.cancelled() => None,
    };
    let (usage, result) = match generated {
        Some(Ok((text, usage))) => (usage.unwrap_or(Usage::new(prompt_tokens, 0)), Ok(text)),
        // Nothing generated: nothing charged, as for a turn no back end started.
        Some(Err(e)) => (Usage::default(), Err(("failed", e))),
        // The model worked on it: the prompt is charged.
        None => (
            Usage::new(prompt_tokens, 0),
            Err(("timeout", format!("no summary within {timeout:?}"))),
        ),
    };
    if let (Some(limiter), Some(reservation)) = (&state.rate_limiter, reservation) {
        limiter
            .settle(reservation, u64::from(usage.total_tokens))
            .await;
    }
    count_tokens(state, &job.model, usage);
    let text = match result {
        Ok(text) if !text.trim().is_empty() => text.trim().to_string(),
        Ok(_) => {
            tracing::warn!("the model wrote an empty summary; trimming instead");
            return Some("empty");
        }
        Err((outcome, e)) => {
            tracing::warn!(error = %e, outcome, "summary call failed; the session stays on plain trimming");
            return Some(outcome);
        }
    };
    let summary = NewSummary {
        covers_seq,
        content: text,
        model: job.model.clone(),
    };
    match state.history.store_summary(&job.session, &summary).await {
        Ok(true) => {
            tracing::info!(covers_seq, "session summary stored");
            Some("stored")
        }
        Ok(false) => Some("erased"),
        Err(e) => {
            tracing::warn!(error = %e, "could not store the summary; trimming instead");
            Some("store_error")
        }
    }
}

/// The summary's text and the usage the back end reported.
async fn generate(
    state: &SharedState,
    job: &SummaryJob,
    messages: &[ContextMessage],
    max_tokens: u32,
) -> Result<(String, Option<Usage>), String> {
    let sampling = Sampling::default();
    let request_id = format!("summary-{}", SessionId::generate());
    let request = GenerationRequest {
        model: &job.model,
        messages,
        max_tokens,
        // A summary should say what was said, not vary.
        temperature: Some(0.0),
        sampling: &sampling,
        request_id: &request_id,
        session_id: Some(job.session.as_str()),
        stream: false,
    };
    let generation = state
        .backends
        .start(&request)
        .await
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    let mut rest = generation.rest;
    let mut chunk: Result<Chunk, EndpointError> = Ok(generation.first);
    // Up to the back end's `Done`, as a turn reads it: what follows it (the connection kept
    // for reuse, the lease's bookkeeping) is not the summary's to wait for.
    loop {
        match chunk.map_err(|e| e.to_string())? {
            Chunk::Token(token) => text.push_str(&token),
            Chunk::Done { usage, .. } => return Ok((text, Some(usage))),
            // The summary request offers no tools.
            Chunk::ToolCalls(_) => {}
        }
        chunk = match rest.next().await {
            Some(next) => next,
            None => return Err("the back end's answer ended before its end marker".into()),
        };
    }
}

fn count_tokens(state: &SharedState, model: &str, usage: Usage) {
    for (direction, count) in [
        ("in", usage.prompt_tokens),
        ("out", usage.completion_tokens),
    ] {
        state
            .metrics
            .tokens
            .get_or_create(&TokenLabels {
                model: model.to_string(),
                direction,
            })
            .inc_by(u64::from(count));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson;

    fn stored(seq: i64, role: Role, content: &str) -> StoredMessage {
        StoredMessage {
            session_id: "s".into(),
            seq,
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            model: "m".into(),
            turn_id: "t".into(),
            incomplete: false,
            finish_reason: None,
            created_at: bson::DateTime::now(),
            covers_seq: None,
            expire_at: None,
        }
    }

    fn recent(seqs: &[i64]) -> Vec<RecentMessage> {
        seqs.iter()
            .map(|&seq| RecentMessage {
                seq,
                role: Role::User,
                content: format!("m{seq}"),
                tool_calls: Vec::new(),
                tool_call_id: None,
            })
            .collect()
    }

    #[test]
    fn the_request_carries_the_prompt_the_previous_summary_and_the_transcript() {
        let messages = [
            stored(5, Role::User, "my name is Ada"),
            stored(6, Role::Assistant, "hello Ada"),
        ];
        let request = summary_request("Summarise.", Some("they met"), &messages);
        assert_eq!(request[0], ContextMessage::new(Role::System, "Summarise."));
        assert_eq!(
            request[1].content,
            "Summary so far:\nthey met\n\nThe conversation since:\nuser: my name is Ada\nassistant: hello Ada\n"
        );
        let first = summary_request("Summarise.", None, &messages[..1]);
        assert_eq!(first[1].content, "user: my name is Ada\n");
    }

    #[test]
    fn the_dropped_part_ends_before_the_kept_messages() {
        let window = recent(&[7, 8, 9, 10]);
        assert_eq!(dropped_through(&window, 1), Some(9));
        assert_eq!(dropped_through(&window, 3), Some(7));
        assert_eq!(dropped_through(&window, 4), None);
        assert_eq!(dropped_through(&[], 0), None);
    }
}
