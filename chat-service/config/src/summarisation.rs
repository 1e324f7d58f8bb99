//! Summaries of the part of a long session that no longer fits the context
//! (`context.summarisation`): which model writes them, how often, how long, and with which
//! instructions.

use serde::{Deserialize, Serialize};

use crate::defaults;

/// Off unless `enabled`. When on, a turn whose context had to drop older messages beyond what
/// the session's stored summary covers has a summary of the dropped part written after it
/// (in the background, so the turn itself waits for nothing); later turns send that summary
/// instead of the dropped messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SummarisationConfig {
    #[serde(default)]
    pub enabled: bool,
    /// The model that writes the summaries (`models.default` or one of `models.allowed`);
    /// unset, each session's summary is written by the model of the turn that needed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// At most one summary call per this many turns of a session (across every replica): the
    /// cost bound. A failed call counts too, so a failing model is not asked every turn.
    #[serde(default = "defaults::summary_every_turns")]
    pub every_turns: u32,
    /// Upper bound of a summary's length, in tokens; at most half of
    /// `context.maxContextTokens`, so that recent turns still fit next to it.
    #[serde(default = "defaults::max_summary_tokens")]
    pub max_summary_tokens: u32,
    /// A summary call that takes longer is abandoned; the session keeps plain trimming until
    /// a later call succeeds.
    #[serde(default = "defaults::summary_timeout_ms")]
    pub timeout_ms: u64,
    /// The instructions sent with the dropped messages (and the previous summary).
    #[serde(default = "defaults::summary_prompt")]
    pub prompt: String,
}
