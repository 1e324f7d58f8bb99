//! The rollout state machine: one pure function from the spec, the last status and what the
//! chat pods counted in the current step's window to the next status, and the transition (if
//! any) that an Event announces. No client, no clock of its own: the reconcile passes `now`.
//!
//! Hysteresis, so that the weights never flap:
//! - a gate is judged only once the candidate has served [`MIN_JUDGED_TURNS`] turns in the
//!   step, so one early error is not a 100 % error rate;
//! - a gate breaks only when it is over its limit on [`BREACHES_TO_ROLL_BACK`] consecutive
//!   observations; one observation within the limits resets the count;
//! - a step advances only when its minimum turns and time have passed and no gate is over its
//!   limit on that observation;
//! - `RolledBack` and `Promoted` are final until the rollout spec is edited: nothing moves the
//!   weights back and forth on its own.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use sha2::{Digest, Sha256};

use super::spec::defaults;
use super::spec::{RolloutGates, RolloutPhase, RolloutSpec, RolloutStatus, WindowFigures};

/// Candidate turns in a step before any gate is judged.
pub const MIN_JUDGED_TURNS: i64 = 5;
/// Consecutive observations over a limit that roll a rollout back.
pub const BREACHES_TO_ROLL_BACK: i32 = 2;

/// What the chat pods serving the step's weights counted since the step began.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Window {
    pub candidate: WindowFigures,
    pub current: WindowFigures,
}

/// A change of phase or step, announced by one Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// CamelCase Event reason.
    pub reason: &'static str,
    pub note: String,
    /// A rollback is a Warning; every other transition is Normal.
    pub warning: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub status: RolloutStatus,
    pub transition: Option<Transition>,
}

/// The gates with their defaults applied.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Limits {
    max_error_rate_percent: f64,
    max_ttft_p95_ratio: f64,
    max_ttft_p95_ms: Option<f64>,
    min_tokens_per_second_ratio: f64,
}

impl Limits {
    fn of(gates: Option<&RolloutGates>) -> Self {
        let gates = gates.cloned().unwrap_or_default();
        Limits {
            max_error_rate_percent: f64::from(
                gates
                    .max_error_rate_percent
                    .unwrap_or(defaults::MAX_ERROR_RATE_PERCENT),
            ),
            max_ttft_p95_ratio: f64::from(
                gates
                    .max_ttft_p95_ratio_percent
                    .unwrap_or(defaults::MAX_TTFT_P95_RATIO_PERCENT),
            ) / 100.0,
            max_ttft_p95_ms: gates.max_ttft_p95_ms.map(|ms| ms as f64),
            min_tokens_per_second_ratio: f64::from(
                gates
                    .min_tokens_per_second_ratio_percent
                    .unwrap_or(defaults::MIN_TOKENS_PER_SECOND_RATIO_PERCENT),
            ) / 100.0,
        }
    }
}

/// Digest of what defines the rollout: every field but `paused`, so that pausing and resuming
/// continue where the rollout was, and any other edit starts it again.
pub fn spec_digest(spec: &RolloutSpec) -> String {
    let mut defining = spec.clone();
    defining.paused = None;
    let json = serde_json::to_vec(&defining).expect("a rollout spec always serializes");
    hex::encode(&Sha256::digest(&json)[..8])
}

/// The first gate over its limit in `window`, as a sentence; `None` while all hold or too few
/// candidate turns were seen to judge.
pub fn broken_gate(gates: Option<&RolloutGates>, window: &Window) -> Option<String> {
    let limits = Limits::of(gates);
    let (candidate, current) = (&window.candidate, &window.current);
    if candidate.turns < MIN_JUDGED_TURNS {
        return None;
    }
    if candidate.error_rate_percent > limits.max_error_rate_percent {
        return Some(format!(
            "error rate {:.1} % ({} of {} turns) is over the limit of {} %",
            candidate.error_rate_percent,
            candidate.errors,
            candidate.turns,
            limits.max_error_rate_percent
        ));
    }
    if let (Some(p95), Some(limit)) = (candidate.ttft_p95_ms, limits.max_ttft_p95_ms)
        && p95 > limit
    {
        return Some(format!(
            "time to first token p95 {p95:.0} ms is over the limit of {limit:.0} ms"
        ));
    }
    let comparable = current.turns >= MIN_JUDGED_TURNS;
    if let (true, Some(p95), Some(base)) = (comparable, candidate.ttft_p95_ms, current.ttft_p95_ms)
        && p95 > base * limits.max_ttft_p95_ratio
    {
        return Some(format!(
            "time to first token p95 {p95:.0} ms is over {:.0} % of the current back end's {base:.0} ms",
            limits.max_ttft_p95_ratio * 100.0
        ));
    }
    if let (true, Some(speed), Some(base)) = (
        comparable,
        candidate.tokens_per_second,
        current.tokens_per_second,
    ) && speed < base * limits.min_tokens_per_second_ratio
    {
        return Some(format!(
            "{speed:.1} tokens/s is under {:.0} % of the current back end's {base:.1} tokens/s",
            limits.min_tokens_per_second_ratio * 100.0
        ));
    }
    None
}

/// The next status of the rollout `spec`, from the `previous` one and the step's `window`
/// (`None` while no chat pod serving the step's weights has answered).
pub fn decide(
    spec: &RolloutSpec,
    previous: Option<&RolloutStatus>,
    window: Option<&Window>,
    now: Timestamp,
) -> Decision {
    let digest = spec_digest(spec);
    let paused = spec.paused.unwrap_or(false);
    let previous = match previous {
        Some(p) if p.spec_digest == digest => p,
        other => return start(spec, digest, other.is_some(), paused, now),
    };
    let mut next = previous.clone();
    if matches!(
        previous.phase,
        RolloutPhase::Promoted | RolloutPhase::RolledBack
    ) {
        return Decision {
            status: next,
            transition: None,
        };
    }
    if let Some(window) = window {
        next.candidate = Some(window.candidate.clone());
        next.current = Some(window.current.clone());
    }
    match (paused, previous.phase) {
        (true, RolloutPhase::Paused) => return hold(next),
        (true, _) => {
            let note = format!(
                "Paused at step {} ({} %).",
                next.step + 1,
                weight(spec, next.step)
            );
            return moved(next, RolloutPhase::Paused, "Paused", note, false, now);
        }
        (false, RolloutPhase::Paused) => {
            let note = format!(
                "Resumed at step {} ({} %).",
                next.step + 1,
                weight(spec, next.step)
            );
            return moved(next, RolloutPhase::Progressing, "Resumed", note, false, now);
        }
        (false, _) => {}
    }
    let Some(window) = window else {
        next.reason = "WaitingForFigures".into();
        next.message =
            "No chat pod serving this step's weights has reported its figures yet.".into();
        return hold(next);
    };
    if let Some(gate) = broken_gate(spec.gates.as_ref(), window) {
        next.breaches = previous.breaches + 1;
        if next.breaches < BREACHES_TO_ROLL_BACK {
            next.reason = "GateOverLimit".into();
            next.message = format!(
                "At step {}: {gate} (observation {} of {BREACHES_TO_ROLL_BACK} before a rollback).",
                next.step + 1,
                next.breaches
            );
            return hold(next);
        }
        next.candidate_weight_percent = 0;
        next.current_weight_percent = 100;
        let note = format!(
            "Rolled back at step {} ({} %): {gate}. The candidate takes no traffic until spec.rollout is edited.",
            next.step + 1,
            weight(spec, next.step)
        );
        return moved(
            next,
            RolloutPhase::RolledBack,
            "RolledBack",
            note,
            true,
            now,
        );
    }
    next.breaches = 0;
    let min_turns = i64::from(
        spec.min_turns_per_step
            .unwrap_or(defaults::MIN_TURNS_PER_STEP),
    );
    let min_seconds = spec
        .min_seconds_per_step
        .unwrap_or(defaults::MIN_SECONDS_PER_STEP);
    let elapsed = now.duration_since(previous.step_started_at.0);
    let turns = window.candidate.turns;
    if turns < min_turns || elapsed < SignedDuration::from_secs(min_seconds) {
        next.reason = "Observing".into();
        next.message = format!(
            "Step {} ({} %): gates hold; {turns} of {min_turns} turns, {} of {min_seconds} s.",
            next.step + 1,
            weight(spec, next.step),
            elapsed.as_secs().max(0)
        );
        return hold(next);
    }
    let last = spec.steps.len() as i32 - 1;
    if next.step >= last {
        next.candidate_weight_percent = 100;
        next.current_weight_percent = 0;
        let note = format!(
            "Promoted after {} steps: the candidate takes all traffic; make it the default in the spec and remove spec.rollout.",
            spec.steps.len()
        );
        return moved(next, RolloutPhase::Promoted, "Promoted", note, false, now);
    }
    next.step += 1;
    next.candidate_weight_percent = weight(spec, next.step);
    next.current_weight_percent = 100 - next.candidate_weight_percent;
    next.step_started_at = Time(now);
    next.candidate = None;
    next.current = None;
    let note = format!(
        "Advanced to step {} ({} %): gates held for {turns} turns over {} s.",
        next.step + 1,
        next.candidate_weight_percent,
        elapsed.as_secs()
    );
    moved(
        next,
        RolloutPhase::Progressing,
        "StepAdvanced",
        note,
        false,
        now,
    )
}

/// The weight of step `index`, 0 when out of range (a spec edit shortened the steps).
fn weight(spec: &RolloutSpec, index: i32) -> i32 {
    usize::try_from(index)
        .ok()
        .and_then(|i| spec.steps.get(i).copied())
        .unwrap_or(0)
}

fn start(
    spec: &RolloutSpec,
    digest: String,
    restarted: bool,
    paused: bool,
    now: Timestamp,
) -> Decision {
    let first = weight(spec, 0);
    let (reason, verb) = match restarted {
        true => ("Restarted", "Restarted after an edit of spec.rollout"),
        false => ("Started", "Started"),
    };
    let note = format!(
        "{verb}: step 1 of {} sends {first} % of new sessions to the candidate.",
        spec.steps.len()
    );
    let status = RolloutStatus {
        phase: if paused {
            RolloutPhase::Paused
        } else {
            RolloutPhase::Progressing
        },
        step: 0,
        candidate_weight_percent: first,
        current_weight_percent: 100 - first,
        step_started_at: Time(now),
        spec_digest: digest,
        breaches: 0,
        reason: reason.into(),
        message: note.clone(),
        last_transition_time: Time(now),
        candidate: None,
        current: None,
    };
    Decision {
        status,
        transition: Some(Transition {
            reason,
            note,
            warning: false,
        }),
    }
}

fn hold(status: RolloutStatus) -> Decision {
    Decision {
        status,
        transition: None,
    }
}

fn moved(
    mut status: RolloutStatus,
    phase: RolloutPhase,
    reason: &'static str,
    note: String,
    warning: bool,
    now: Timestamp,
) -> Decision {
    status.phase = phase;
    status.reason = reason.into();
    status.message = note.clone();
    status.last_transition_time = Time(now);
    Decision {
        status,
        transition: Some(Transition {
            reason,
            note,
            warning,
        }),
    }
}

#[cfg(test)]
mod tests;
