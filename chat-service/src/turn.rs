//! One conversation turn: context from history, generation on a back end, storage of both
//! messages. Every transport (JSON, SSE, WebSocket, OpenAI) reads the same [`TurnEvents`]. A turn
//! of a session (or one holding a token reservation) runs as its own task feeding a channel, so a
//! client leaving mid-stream still gets its partial turn stored, marked incomplete; a stateless
//! turn with nothing to settle runs inside the client's request instead (no task, no channel). A back end failing after the first token ends the turn with an
//! explicit error event; its partial reply is stored too, marked incomplete with finish reason
//! `error`, so the user's message is never lost.
//!
//! With a token budget, a turn reserves its prompt estimate plus `max_tokens` before it calls a
//! back end and settles with what it used; a turn cut short (client gone, back end failed) is
//! charged its prompt estimate plus the tokens generated so far. A client leaving closes the
//! back-end request at once, so nothing is generated for nobody.

use tokio::sync::mpsc;
use tracing::Instrument;

use crate::backend::{BackendError, Chunk, ChunkStream, EndpointError, GenerationRequest};
use crate::cache::{CachedAnswer, FlightLeader, Lookup};
use crate::context::Context;
use crate::conversation::{
    ContextMessage, EndUser, FinishReason, Principal, Sampling, SessionKey, Usage,
};
use crate::history::{HistoryError, NewTurn};
use crate::metrics::TokenLabels;
use crate::rate_limit::{Caller, RateLimited, TokenReservation};
use crate::state::SharedState;
use crate::summary;
use crate::tools::ToolCall;

mod events;

pub use events::TurnEvents;
use events::{Events, InlineTurn, Progress, Step};

/// Finish reason stored with a turn cut by the shutdown deadline.
pub const SHUTDOWN_FINISH_REASON: &str = "shutdown";

/// Why a turn failed.
#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    #[error(transparent)]
    History(#[from] HistoryError),
    /// No back end could start the generation.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The back end failed after the first token; the partial reply is stored as incomplete.
    #[error("LLM back end failed mid-answer: {0}")]
    Interrupted(EndpointError),
    #[error("turn ended without an outcome")]
    NoOutcome,
    /// The shutdown grace period ran out mid-turn; the partial reply is stored as incomplete.
    #[error("the server shut down mid-answer")]
    ShuttingDown,
    /// The caller's token budget has no room for this turn.
    #[error(transparent)]
    RateLimited(#[from] RateLimited),
}

/// Where the history of a turn comes from.
pub enum TurnHistory {
    /// Stored history of this session; the turn is stored too.
    Session(SessionKey),
    /// A session whose id the service generated for this turn (128 random bits): nothing can
    /// be stored under it yet, so its history is not read (a Redis and a MongoDB round trip
    /// saved on every first turn). The turn is stored as in [`TurnHistory::Session`].
    NewSession(SessionKey),
    /// Messages the client sent along (OpenAI API without a session); nothing is stored.
    Stateless(Vec<ContextMessage>),
}

pub struct TurnInput {
    pub history: TurnHistory,
    /// The new messages: the user's, or the results of the tools the model called last turn.
    pub input: Vec<ContextMessage>,
    pub model: String,
    pub request_id: String,
    /// Client's cap on generated tokens, bounded by the configured maximum.
    pub max_tokens: Option<u32>,
    /// Sampling temperature; `Some(0.0)` makes the turn deterministic and, with `cache.enabled`,
    /// cacheable.
    pub temperature: Option<f32>,
    /// `top_p`, `seed`, `stop`, output format.
    pub sampling: Sampling,
    /// The end user the turn is for, remembered with its session.
    pub end_user: Option<EndUser>,
    /// Who the turn's tokens are charged to when rate limits are on.
    pub caller: Option<Caller>,
    /// Whom the turn is for: its cache entries are theirs alone (unless `cache.shared`).
    pub principal: Principal,
}

/// What a finished turn reports to the client.
#[derive(Debug, Clone)]
pub struct TurnOutcome {
    pub session_id: Option<String>,
    pub reply: String,
    /// The tools the model called (the finish reason is then `tool_calls`).
    pub tool_calls: Vec<ToolCall>,
    pub model: String,
    pub usage: Usage,
    pub finish_reason: FinishReason,
    /// Stored messages that went into the context; proves a later turn saw earlier ones.
    pub context_messages: usize,
    /// The reply came from the response cache (or an identical generation in flight).
    pub cached: bool,
}

#[derive(Debug)]
pub enum TurnEvent {
    Token(String),
    /// The tools the model called, all of them, after its text (if any).
    ToolCalls(Vec<ToolCall>),
    /// Sent only after both messages are durable in MongoDB (or for stateless turns, at the end).
    Finished(TurnOutcome),
    Failed(TurnError),
}

/// Prepares the context and starts generation; errors up to the first token are returned here
/// so that the transports can still answer them with a status code.
pub async fn begin_turn(state: &SharedState, input: TurnInput) -> Result<TurnEvents, TurnError> {
    start_turn(state, input, Delivery::Streamed).await
}

/// How the client takes the reply, which decides how the back end is asked for it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Delivery {
    /// Token by token (SSE, WebSocket): the back end streams.
    Streamed,
    /// In one piece (JSON): the back end is asked for a whole answer, unless the answer goes
    /// into the response cache, whose entries replay as the stream they were.
    Whole,
}

async fn start_turn(
    state: &SharedState,
    input: TurnInput,
    delivery: Delivery,
) -> Result<TurnEvents, TurnError> {
    let (session, context, summary_job) = match input.history {
        TurnHistory::Session(session) => {
            let recent = state.history.recent_messages(&session).await?;
            let (context, job) =
                summary::session_context(state, &session, &recent, &input.input, &input.model)
                    .await;
            (Some(session), context, job)
        }
        TurnHistory::NewSession(session) => {
            // With no history nothing is dropped, so no summary is looked up either.
            let (context, job) =
                summary::session_context(state, &session, &[], &input.input, &input.model).await;
            (Some(session), context, job)
        }
        TurnHistory::Stateless(messages) => {
            let context = summary::context_for(state, &messages, None, &input.input, &input.model);
            (None, context, None)
        }
    };
    let context_config = &state.config.context;
    let Context {
        messages,
        history_messages,
        summarised,
    } = context;
    let max_tokens = input
        .max_tokens
        .unwrap_or(context_config.max_output_tokens)
        .clamp(1, context_config.max_output_tokens);
    let prompt_tokens = messages
        .iter()
        .map(|message| state.tokens.count(&input.model, message))
        .sum();
    let mut run = TurnRun {
        state: state.clone(),
        session,
        input: input.input,
        end_user: input.end_user,
        model: input.model,
        context_messages: history_messages,
        caller: input.caller,
        cached: false,
        cache_leader: None,
        reservation: None,
        prompt_tokens,
        summary_job,
    };
    // Cached answers are text: a turn that offers tools is never answered from the cache.
    let deterministic = input.temperature == Some(0.0) && input.sampling.tools.is_empty();
    if let Some(cache) = state.cache.as_ref().filter(|_| deterministic) {
        let key = cache.key(
            &input.principal,
            &run.model,
            max_tokens,
            0.0,
            &input.sampling,
            &messages,
        );
        match cache.lookup(&key, run.session.as_ref()).await {
            Lookup::Hit(answer) => {
                tracing::debug!(model = %run.model, "answered from the response cache");
                run.cached = true;
                let (first, rest) = replay(answer);
                return Ok(run.start(first, rest));
            }
            Lookup::Miss(leader) => run.cache_leader = Some(leader),
        }
    }
    let request = GenerationRequest {
        model: &run.model,
        messages: &messages,
        max_tokens,
        temperature: input.temperature,
        sampling: &input.sampling,
        request_id: &input.request_id,
        session_id: run.session.as_ref().map(SessionKey::as_str),
        stream: delivery == Delivery::Streamed || run.cache_leader.is_some(),
    };
    if let (Some(limiter), Some(caller)) = (&state.rate_limiter, &run.caller) {
        let tokens = u64::from(run.prompt_tokens) + u64::from(max_tokens);
        run.reservation = limiter.reserve_tokens(caller, tokens).await?;
    }
    let generation = match state.backends.start(&request).await {
        Ok(generation) => generation,
        Err(e) => {
            // Nothing was generated: the whole reservation goes back.
            if let (Some(limiter), Some(reservation)) =
                (&state.rate_limiter, run.reservation.take())
            {
                limiter.settle(reservation, 0).await;
            }
            return Err(e.into());
        }
    };
    if generation.model != run.model {
        // `routing.fallback.model` answers: record the model that generated, and keep the
        // answer out of the cache entry of the requested model (dropping the leader releases
        // any waiters to generate for themselves).
        run.model = generation.model.clone();
        run.cache_leader = None;
    }
    tracing::debug!(
        backend = %generation.backend,
        fallback = generation.fallback,
        model = %run.model,
        session_id = run.session.as_ref().map(|s| s.id().as_str()),
        history_messages,
        summarised,
        "generation started"
    );
    Ok(run.start(generation.first, generation.rest))
}

/// A cached answer as the chunks a back end would have streamed.
fn replay(answer: CachedAnswer) -> (Chunk, ChunkStream) {
    let mut chunks: Vec<Chunk> = answer.tokens.into_iter().map(Chunk::Token).collect();
    chunks.push(Chunk::Done {
        usage: answer.usage,
        finish_reason: answer.finish_reason.into(),
    });
    let mut chunks = chunks.into_iter();
    let first = chunks.next().expect("at least the final chunk");
    (first, Box::pin(futures::stream::iter(chunks.map(Ok))))
}

/// How the generation of a turn ended.
enum TurnEnd {
    Done(Usage, FinishReason),
    ClientGone,
    /// The back end failed after the first token.
    BackendFailed(EndpointError),
    /// The shutdown grace period ran out first.
    Deadline,
}

struct TurnRun {
    state: SharedState,
    session: Option<SessionKey>,
    /// The turn's new messages, stored before the reply.
    input: Vec<ContextMessage>,
    end_user: Option<EndUser>,
    model: String,
    context_messages: usize,
    caller: Option<Caller>,
    /// Replaying a cached answer: no tokens are counted or charged, nothing is cached again.
    cached: bool,
    /// Set when this turn generates an answer that goes into the cache.
    cache_leader: Option<FlightLeader>,
    /// Held from the caller's token budget until the turn ends.
    reservation: Option<TokenReservation>,
    /// Estimate of the context's tokens, charged when the back end reports no usage.
    prompt_tokens: u32,
    /// The summary this turn calls for, written once the turn is stored.
    summary_job: Option<summary::SummaryJob>,
}

impl TurnRun {
    /// Runs the turn where it must run: as a task of its own when something of it must outlive
    /// the client (a session's turn is stored when the client leaves; a token reservation is
    /// settled), else in the caller's own future, driven by [`TurnEvents::recv`]: no task, no
    /// channel, and dropping the events (the client left) drops the back-end request.
    fn start(self, first: Chunk, rest: ChunkStream) -> TurnEvents {
        let progress = Progress::new(first, self.cache_leader.is_some());
        if self.session.is_none() && self.reservation.is_none() {
            return TurnEvents(Events::Inline(Box::new(InlineTurn {
                run: self,
                rest,
                progress,
                concluded: false,
            })));
        }
        let (sender, receiver) = mpsc::channel(64);
        let turns = self.state.turns.clone();
        turns.spawn(
            self.drive(progress, rest, sender)
                .instrument(tracing::Span::current()),
        );
        TurnEvents(Events::Task(receiver))
    }

    async fn drive(
        mut self,
        mut progress: Progress,
        mut rest: ChunkStream,
        sender: mpsc::Sender<TurnEvent>,
    ) {
        let end = loop {
            // A client that leaves while the back end thinks ends the turn now, not at the
            // next token.
            let step = tokio::select! {
                step = progress.step(&mut rest, &self.state) => step,
                () = sender.closed() => break TurnEnd::ClientGone,
            };
            match step {
                Step::Token(token) => {
                    if sender.send(TurnEvent::Token(token)).await.is_err() {
                        // Dropping `rest` closes the back-end request, which stops generation.
                        break TurnEnd::ClientGone;
                    }
                }
                Step::ToolCalls(calls) => {
                    if sender.send(TurnEvent::ToolCalls(calls)).await.is_err() {
                        break TurnEnd::ClientGone;
                    }
                }
                Step::End(end) => break end,
            }
        };
        drop(rest);
        if let Some(event) = self.conclude(end, progress).await {
            let _ = sender.send(event).await;
        }
    }

    /// After the generation ended: charges the tokens, fills the cache, stores the turn;
    /// returns what the client is told, if it is still there.
    async fn conclude(&mut self, end: TurnEnd, progress: Progress) -> Option<TurnEvent> {
        let Progress {
            reply,
            tool_calls,
            tokens,
            generated,
            ..
        } = progress;
        // A turn cut short has no usage from the back end: it is charged the estimate of its
        // prompt and one token per chunk generated, so leaving early saves no budget.
        let (usage, finish_reason) = match &end {
            TurnEnd::Done(usage, finish_reason) => (*usage, finish_reason.clone()),
            TurnEnd::ClientGone => (
                Usage::new(self.prompt_tokens, generated),
                FinishReason::Cancelled,
            ),
            TurnEnd::BackendFailed(_) => (
                Usage::new(self.prompt_tokens, generated),
                FinishReason::Error,
            ),
            TurnEnd::Deadline => (
                Usage::new(self.prompt_tokens, generated),
                FinishReason::Other(SHUTDOWN_FINISH_REASON.into()),
            ),
        };
        let complete = matches!(end, TurnEnd::Done(..));
        if !self.cached {
            self.count_tokens(usage);
            if let (Some(limiter), Some(reservation)) =
                (&self.state.rate_limiter, self.reservation.take())
            {
                limiter
                    .settle(reservation, u64::from(usage.total_tokens))
                    .await;
            }
        }
        // Only a complete answer is cached; otherwise dropping the leader releases the waiters.
        if let Some(leader) = self.cache_leader.take()
            && complete
        {
            leader
                .complete(CachedAnswer {
                    tokens,
                    usage,
                    finish_reason: finish_reason.clone(),
                })
                .await;
        }

        match &end {
            TurnEnd::BackendFailed(e) => {
                tracing::warn!(error = %e, "back end failed mid-stream; partial reply stored as incomplete");
            }
            TurnEnd::Deadline => {
                tracing::warn!(
                    "shutdown grace period over mid-turn; partial reply stored as incomplete"
                );
            }
            _ => {}
        }
        if let Some(session) = &self.session {
            let stored = self
                .state
                .history
                .append_turn(
                    session,
                    NewTurn {
                        input: &self.input,
                        end_user: self.end_user.as_ref(),
                        reply: &reply,
                        tool_calls: &tool_calls,
                        model: &self.model,
                        finish_reason: &finish_reason,
                        incomplete: !complete,
                    },
                )
                .await;
            if !complete {
                self.state.metrics.incomplete_turns.inc();
            }
            if let (Ok(turn), Some(job)) = (&stored, self.summary_job.take())
                && complete
            {
                summary::spawn(&self.state, job, self.caller.clone(), turn.user_seq);
            }
            match (&end, stored) {
                (TurnEnd::ClientGone, Ok(_)) => {
                    tracing::info!(session_id = %session, "client left; partial turn stored as incomplete");
                    return None;
                }
                (TurnEnd::ClientGone, Err(e)) => {
                    tracing::warn!(session_id = %session, error = %e, "client left; partial turn not stored");
                    return None;
                }
                (TurnEnd::BackendFailed(_) | TurnEnd::Deadline, Err(e)) => {
                    tracing::warn!(session_id = %session, error = %e, "partial turn not stored");
                }
                (TurnEnd::Done(..), Err(e)) => return Some(TurnEvent::Failed(e.into())),
                (_, Ok(_)) => {}
            }
        }
        match end {
            TurnEnd::ClientGone => return None,
            TurnEnd::BackendFailed(e) => return Some(TurnEvent::Failed(TurnError::Interrupted(e))),
            TurnEnd::Deadline => return Some(TurnEvent::Failed(TurnError::ShuttingDown)),
            TurnEnd::Done(..) => {}
        }
        tracing::debug!(
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
            "turn finished"
        );
        Some(TurnEvent::Finished(TurnOutcome {
            session_id: self.session.as_ref().map(|s| s.to_string()),
            reply,
            tool_calls,
            model: self.model.clone(),
            usage,
            finish_reason,
            context_messages: self.context_messages,
            cached: self.cached,
        }))
    }

    fn count_tokens(&self, usage: Usage) {
        for (direction, count) in [
            ("in", usage.prompt_tokens),
            ("out", usage.completion_tokens),
        ] {
            self.state
                .metrics
                .tokens
                .get_or_create(&TokenLabels {
                    model: self.model.clone(),
                    direction,
                })
                .inc_by(u64::from(count));
        }
    }
}

/// Runs a turn to the end and returns its outcome (the non-streaming transports).
pub async fn complete_turn(
    state: &SharedState,
    input: TurnInput,
) -> Result<TurnOutcome, TurnError> {
    let mut events = start_turn(state, input, Delivery::Whole).await?;
    while let Some(event) = events.recv().await {
        match event {
            TurnEvent::Token(_) | TurnEvent::ToolCalls(_) => {}
            TurnEvent::Finished(outcome) => return Ok(outcome),
            TurnEvent::Failed(e) => return Err(e),
        }
    }
    Err(TurnError::NoOutcome)
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    #[tokio::test]
    async fn a_cached_answer_replays_as_the_stream_it_was() {
        let answer = CachedAnswer {
            tokens: vec!["Hel".into(), "lo".into()],
            usage: Usage::new(3, 2),
            finish_reason: FinishReason::Length,
        };
        let (first, rest) = replay(answer);
        assert_eq!(first, Chunk::Token("Hel".into()));
        let rest: Vec<Chunk> = rest.map(|chunk| chunk.unwrap()).collect().await;
        assert_eq!(
            rest,
            [
                Chunk::Token("lo".into()),
                Chunk::Done {
                    usage: Usage::new(3, 2),
                    finish_reason: "length".into()
                }
            ]
        );
    }
}
