//! `rollout`: a weighted split of new sessions between what serves now and a candidate (a back
//! end, a model, or a model on a back end), written by the operator from the step of a
//! ChatService's `spec.rollout` that is running.

use serde::{Deserialize, Serialize};

/// The split of one rollout step. A session's side is a hash of its id against the weight, so
/// a session stays on its side as long as the weight does not shrink below it, and a larger
/// weight only moves sessions from the current side to the candidate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutConfig {
    /// Back end in `backends` that serves the candidate's side only (no regular traffic).
    /// Absent: the candidate side uses the regular back ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_backend: Option<String>,
    /// Model the candidate's side generates with instead of `models.default`. Absent: the model
    /// asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_model: Option<String>,
    /// Percent of sessions (0 to 100) on the candidate's side.
    pub candidate_weight_percent: u32,
}
