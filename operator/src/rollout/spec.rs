//! `spec.rollout` and `status.rollout`: the schema of a canary rollout, kept apart from
//! [`crate::crd`] so that the rollout reads as one piece. The rules that need the rest of the
//! spec (the candidate exists, differs from what serves now) are on `ChatServiceSpec`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Defaults of the rollout fields, documented in the schema and applied by the operator.
pub mod defaults {
    pub const MIN_TURNS_PER_STEP: i32 = 20;
    pub const MIN_SECONDS_PER_STEP: i64 = 60;
    pub const MAX_ERROR_RATE_PERCENT: i32 = 5;
    pub const MAX_TTFT_P95_RATIO_PERCENT: i32 = 150;
    pub const MIN_TOKENS_PER_SECOND_RATIO_PERCENT: i32 = 50;
}

/// A canary rollout: the candidate takes a growing share of new sessions, step by step, while
/// gates compare it with what serves now over the same window. A gate that breaks sends the
/// share back to 0 % (`RolledBack`); the last step (100 %) promotes it (`Promoted`). Both end
/// states hold until the rollout spec is edited; editing it mid-way starts again at the first
/// step. After a promotion, make the candidate the default in the spec (backends or
/// models.default) and remove `rollout`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(
    validation = Rule::new("self.steps.isSorted()")
        .message("steps must increase: each weight larger than the one before").field_path(".steps"),
    validation = Rule::new("size(self.steps) == 0 || self.steps[size(self.steps) - 1] == 100")
        .message("the last step must be 100: a rollout ends with the candidate taking all traffic").field_path(".steps")
)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// What is rolled out: a back end, a model, or a model on a back end.
    pub candidate: RolloutCandidate,
    /// Percent of new sessions sent to the candidate at each step, increasing and ending at
    /// 100, e.g. `[5, 25, 50, 100]`.
    #[schemars(
        length(min = 1, max = 20),
        inner(range(min = 1, max = 100)),
        extend("x-kubernetes-list-type" = "set")
    )]
    pub steps: Vec<i32>,
    /// Turns the candidate must have served in a step (counted by the chat pods since the step
    /// began) before the step can advance. Default 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub min_turns_per_step: Option<i32>,
    /// Seconds a step lasts at least before it can advance. Default 60.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 604800))]
    pub min_seconds_per_step: Option<i64>,
    /// The limits the candidate must keep, compared with the current back end over the same
    /// window. Every gate has a default, so `gates: {}` (or none) gives the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gates: Option<RolloutGates>,
    /// Hold the rollout at its current step: the weights stay, no step advances, no gate rolls
    /// back. Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
}

/// The candidate: `backend` alone canaries a back end with the same models; `model` alone
/// canaries a model on the back ends that serve now (sessions asking for the default model get
/// it instead); both canary `model` on `backend`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[x_kube(validation = Rule::new("has(self.backend) || has(self.model)")
    .message("candidate needs a backend, a model or both"))]
#[serde(rename_all = "camelCase")]
pub struct RolloutCandidate {
    /// Name of an entry of `spec.backends` (or `ollama` for the managed Ollama). While the
    /// rollout runs it takes only the candidate's share, never regular traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 40),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub backend: Option<String>,
    /// Model the candidate's sessions are generated with, in place of the default model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")
    )]
    pub model: Option<String>,
}

/// Limits checked on every observation of a step, candidate against current over the same
/// window (the chat pods' counts since the step began). A gate is judged once the candidate has
/// served at least 5 turns in the step; it breaks when its limit is exceeded on two consecutive
/// observations (about 10 s apart), which rolls the rollout back.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutGates {
    /// Most failed turns, in percent of the candidate's turns in the window. Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub max_error_rate_percent: Option<i32>,
    /// Highest p95 time to first token of the candidate, in percent of the current back end's
    /// p95 over the same window (150 = up to 1.5 times slower). Not judged while the current
    /// side has no turns in the window. Default 150.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 100, max = 10000))]
    pub max_ttft_p95_ratio_percent: Option<i32>,
    /// Highest p95 time to first token of the candidate in milliseconds, whatever the current
    /// back end does. No absolute limit when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600000))]
    pub max_ttft_p95_ms: Option<i64>,
    /// Lowest generation speed (completion tokens per second, from a turn's start to its last
    /// token) of the candidate, in percent of the current back end's over the same window. Not judged while
    /// the current side has no turns in the window. Default 50.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub min_tokens_per_second_ratio_percent: Option<i32>,
}

/// Where a rollout stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RolloutPhase {
    /// A step is running; it advances when the gates hold for its minimum turns and time.
    Progressing,
    /// `spec.rollout.paused`: the weights hold.
    Paused,
    /// The last step passed: the candidate takes all traffic.
    Promoted,
    /// A gate broke: the candidate takes no traffic until the rollout spec is edited.
    RolledBack,
}

/// What the operator last decided about `spec.rollout`; read back after a restart.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// `Progressing`, `Paused`, `Promoted` or `RolledBack`.
    pub phase: RolloutPhase,
    /// Index in `spec.rollout.steps` of the step running (or last run).
    pub step: i32,
    /// Percent of new sessions the chat pods send to the candidate now.
    pub candidate_weight_percent: i32,
    /// Percent of new sessions the chat pods send to the current back end now.
    pub current_weight_percent: i32,
    /// When the current step began: its window starts here.
    pub step_started_at: Time,
    /// Digest of the `spec.rollout` this status belongs to; another one restarts the rollout.
    pub spec_digest: String,
    /// Consecutive observations on which a gate was over its limit (two roll back).
    #[serde(default)]
    pub breaches: i32,
    /// Why the rollout last moved or holds: one CamelCase word.
    pub reason: String,
    /// The same, as a sentence with the figures.
    pub message: String,
    /// When the phase or step last changed.
    pub last_transition_time: Time,
    /// The candidate's figures over the current step's window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<WindowFigures>,
    /// The current back end's figures over the same window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<WindowFigures>,
}

/// One side's figures over a window, summed over the chat pods serving the step's weights.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WindowFigures {
    /// Turns that ended, answered or failed.
    pub turns: i64,
    /// Turns that failed: no first token from any attempt, or an error mid-answer.
    pub errors: i64,
    /// `errors` in percent of `turns`.
    pub error_rate_percent: f64,
    /// 95th percentile of time to first token, from the pods' histograms (bucket upper bound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_p95_ms: Option<f64>,
    /// Completion tokens per second, from each turn's start to its last token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
}
