//! The events of one turn as a transport reads them ([`TurnEvents`]), and the step that turns the
//! back end's chunks into them ([`Progress`]): shared by a turn that runs as its own task (its
//! events come through a channel) and one that runs inside its client's request (its events are
//! made as they are asked for).

use futures::StreamExt;
use tokio::sync::mpsc;

use super::{TurnEnd, TurnEvent, TurnRun};
use crate::backend::{Chunk, ChunkStream, EndpointError};
use crate::conversation::Usage;
use crate::state::SharedState;
use crate::tools::ToolCall;

/// The events of one turn, in order: tokens, then one [`TurnEvent::Finished`] or
/// [`TurnEvent::Failed`]; `None` after that (or when the turn's task ended without a word for
/// a client that had left).
pub struct TurnEvents(pub(super) Events);

pub(super) enum Events {
    /// The turn runs as its own task and goes on when the client leaves.
    Task(mpsc::Receiver<TurnEvent>),
    /// The turn runs in the caller's future: nothing of it has to outlive the client.
    Inline(Box<InlineTurn>),
    Over,
}

impl TurnEvents {
    pub async fn recv(&mut self) -> Option<TurnEvent> {
        let inline = match &mut self.0 {
            Events::Task(receiver) => return receiver.recv().await,
            Events::Inline(inline) => inline,
            Events::Over => return None,
        };
        let end = match inline
            .progress
            .step(&mut inline.rest, &inline.run.state)
            .await
        {
            Step::Token(token) => return Some(TurnEvent::Token(token)),
            Step::ToolCalls(calls) => return Some(TurnEvent::ToolCalls(calls)),
            Step::End(end) => end,
        };
        let Events::Inline(mut inline) = std::mem::replace(&mut self.0, Events::Over) else {
            unreachable!("matched above");
        };
        inline.concluded = true;
        let progress = std::mem::take(&mut inline.progress);
        inline.run.conclude(end, progress).await
    }
}

/// A turn driven by its client's future ([`Events::Inline`]).
pub(super) struct InlineTurn {
    pub run: TurnRun,
    pub rest: ChunkStream,
    pub progress: Progress,
    pub concluded: bool,
}

impl Drop for InlineTurn {
    /// The client left mid-turn: there is nothing to store or settle (else the turn would have
    /// its own task), but its tokens still count, as they would for a turn with a task.
    fn drop(&mut self) {
        if !self.concluded && !self.run.cached {
            let generated = self.progress.generated;
            self.run
                .count_tokens(Usage::new(self.run.prompt_tokens, generated));
        }
    }
}

/// What a turn has generated so far, and the chunk already received but not yet handed on.
#[derive(Default)]
pub(super) struct Progress {
    first: Option<Chunk>,
    pub reply: String,
    /// The tools the model called.
    pub tool_calls: Vec<ToolCall>,
    /// The tokens as they came, kept only when the answer goes into the cache.
    pub tokens: Vec<String>,
    keep_tokens: bool,
    pub generated: u32,
}

/// One step of a turn: a token for the client, or the end of the generation.
pub(super) enum Step {
    Token(String),
    ToolCalls(Vec<ToolCall>),
    End(TurnEnd),
}

impl Progress {
    pub fn new(first: Chunk, keep_tokens: bool) -> Self {
        Self {
            first: Some(first),
            keep_tokens,
            ..Self::default()
        }
    }

    /// The next chunk (the held first one, else the back end's), recorded.
    pub async fn step(&mut self, rest: &mut ChunkStream, state: &SharedState) -> Step {
        let chunk = match self.first.take() {
            Some(chunk) => Ok(chunk),
            None => tokio::select! {
                chunk = rest.next() => chunk.unwrap_or(Err(EndpointError::Truncated)),
                () = state.turn_deadline.cancelled() => return Step::End(TurnEnd::Deadline),
            },
        };
        match chunk {
            Ok(Chunk::Token(token)) => {
                self.generated = self.generated.saturating_add(1);
                self.reply.push_str(&token);
                if self.keep_tokens {
                    self.tokens.push(token.clone());
                }
                Step::Token(token)
            }
            Ok(Chunk::ToolCalls(mut calls)) => {
                self.generated = self.generated.saturating_add(1);
                for call in calls.iter_mut().filter(|call| call.id.is_empty()) {
                    call.id = ToolCall::generated_id();
                }
                self.tool_calls.extend(calls.iter().cloned());
                Step::ToolCalls(calls)
            }
            Ok(Chunk::Done {
                usage,
                finish_reason,
            }) => Step::End(TurnEnd::Done(usage, finish_reason.into())),
            Err(e) => Step::End(TurnEnd::BackendFailed(e)),
        }
    }
}
