//! Every transition of the rollout state machine, and every hold, from small specs.

use super::*;
use crate::rollout::spec::RolloutCandidate;

fn spec(steps: &[i32]) -> RolloutSpec {
    RolloutSpec {
        candidate: RolloutCandidate {
            backend: Some("canary".into()),
            model: None,
        },
        steps: steps.to_vec(),
        min_turns_per_step: Some(10),
        min_seconds_per_step: Some(60),
        gates: None,
        paused: None,
    }
}

fn at(seconds: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + seconds).unwrap()
}

fn side(turns: i64, errors: i64, ttft_p95_ms: f64, tokens_per_second: f64) -> WindowFigures {
    WindowFigures {
        turns,
        errors,
        error_rate_percent: if turns == 0 {
            0.0
        } else {
            errors as f64 * 100.0 / turns as f64
        },
        ttft_p95_ms: Some(ttft_p95_ms),
        tokens_per_second: Some(tokens_per_second),
    }
}

/// A healthy window: the candidate as good as the current back end.
fn healthy(turns: i64) -> Window {
    Window {
        candidate: side(turns, 0, 200.0, 40.0),
        current: side(turns * 3, 0, 200.0, 40.0),
    }
}

fn started(spec: &RolloutSpec) -> RolloutStatus {
    decide(spec, None, None, at(0)).status
}

#[test]
fn a_new_rollout_starts_at_the_first_step_with_an_event() {
    let d = decide(&spec(&[5, 50, 100]), None, None, at(0));
    assert_eq!(d.status.phase, RolloutPhase::Progressing);
    assert_eq!(
        (
            d.status.step,
            d.status.candidate_weight_percent,
            d.status.current_weight_percent
        ),
        (0, 5, 95)
    );
    assert_eq!(d.status.step_started_at, Time(at(0)));
    assert_eq!(d.transition.unwrap().reason, "Started");
}

#[test]
fn a_step_holds_until_both_minimum_turns_and_time_have_passed() {
    let s = spec(&[5, 50, 100]);
    let status = started(&s);
    let too_early = decide(&s, Some(&status), Some(&healthy(50)), at(59));
    assert!(too_early.transition.is_none());
    assert_eq!(too_early.status.reason, "Observing");
    assert_eq!(too_early.status.step, 0);
    let too_few = decide(&s, Some(&status), Some(&healthy(9)), at(600));
    assert!(too_few.transition.is_none());
    assert_eq!(
        too_few.status.candidate.as_ref().unwrap().turns,
        9,
        "figures shown while holding"
    );
    assert_eq!(
        too_few.status.last_transition_time,
        Time(at(0)),
        "a hold is not a transition"
    );
}

#[test]
fn a_step_advances_when_gates_hold_for_its_minimum() {
    let s = spec(&[5, 50, 100]);
    let status = started(&s);
    let d = decide(&s, Some(&status), Some(&healthy(10)), at(60));
    let t = d.transition.expect("advanced");
    assert_eq!(t.reason, "StepAdvanced");
    assert!(!t.warning);
    assert_eq!(
        (
            d.status.step,
            d.status.candidate_weight_percent,
            d.status.current_weight_percent
        ),
        (1, 50, 50)
    );
    assert_eq!(
        d.status.step_started_at,
        Time(at(60)),
        "the next window starts now"
    );
    assert_eq!(
        d.status.candidate, None,
        "the old window's figures are not the new step's"
    );
}

#[test]
fn the_last_step_promotes_and_promotion_is_final() {
    let s = spec(&[50, 100]);
    let mut status = started(&s);
    status = decide(&s, Some(&status), Some(&healthy(10)), at(60)).status;
    assert_eq!(status.candidate_weight_percent, 100);
    let at_100 = Window {
        candidate: side(10, 0, 200.0, 40.0),
        current: WindowFigures::default(),
    };
    let d = decide(&s, Some(&status), Some(&at_100), at(120));
    assert_eq!(d.transition.unwrap().reason, "Promoted");
    assert_eq!(d.status.phase, RolloutPhase::Promoted);
    assert_eq!(
        (
            d.status.candidate_weight_percent,
            d.status.current_weight_percent
        ),
        (100, 0)
    );
    let bad = Window {
        candidate: side(100, 100, 9000.0, 1.0),
        current: WindowFigures::default(),
    };
    let after = decide(&s, Some(&d.status), Some(&bad), at(999));
    assert!(after.transition.is_none());
    assert_eq!(after.status, d.status, "nothing moves a promoted rollout");
}

#[test]
fn a_broken_gate_rolls_back_on_the_second_consecutive_observation() {
    let s = spec(&[5, 50, 100]);
    let status = started(&s);
    let failing = Window {
        candidate: side(10, 3, 200.0, 40.0),
        current: side(30, 0, 200.0, 40.0),
    };
    let first = decide(&s, Some(&status), Some(&failing), at(10));
    assert!(first.transition.is_none(), "one observation is not enough");
    assert_eq!(first.status.breaches, 1);
    assert_eq!(first.status.reason, "GateOverLimit");
    assert_eq!(first.status.candidate_weight_percent, 5);
    let second = decide(&s, Some(&first.status), Some(&failing), at(20));
    let t = second.transition.expect("rolled back");
    assert_eq!(t.reason, "RolledBack");
    assert!(t.warning);
    assert!(t.note.contains("error rate 30.0 %"), "{}", t.note);
    assert_eq!(second.status.phase, RolloutPhase::RolledBack);
    assert_eq!(
        (
            second.status.candidate_weight_percent,
            second.status.current_weight_percent
        ),
        (0, 100)
    );
    let later = decide(&s, Some(&second.status), Some(&healthy(100)), at(999));
    assert_eq!(
        later.status, second.status,
        "a rollback holds until the spec is edited"
    );
}

#[test]
fn one_good_observation_between_breaches_resets_the_count() {
    let s = spec(&[5, 50, 100]);
    let status = started(&s);
    let failing = Window {
        candidate: side(10, 3, 200.0, 40.0),
        current: side(30, 0, 200.0, 40.0),
    };
    let once = decide(&s, Some(&status), Some(&failing), at(10)).status;
    let good = decide(&s, Some(&once), Some(&healthy(8)), at(20)).status;
    assert_eq!(good.breaches, 0);
    let again = decide(&s, Some(&good), Some(&failing), at(30));
    assert!(again.transition.is_none());
    assert_eq!(again.status.breaches, 1);
}

#[test]
fn gates_are_not_judged_on_fewer_than_five_candidate_turns() {
    let s = spec(&[5, 50, 100]);
    let mut status = started(&s);
    let one_error = Window {
        candidate: side(4, 1, 200.0, 40.0),
        current: side(30, 0, 200.0, 40.0),
    };
    for second in [10, 20, 30] {
        status = decide(&s, Some(&status), Some(&one_error), at(second)).status;
    }
    assert_eq!(status.phase, RolloutPhase::Progressing);
    assert_eq!(status.breaches, 0);
}

#[test]
fn each_gate_breaks_on_its_own_figure() {
    let current = side(30, 0, 200.0, 40.0);
    let cases = [
        (side(10, 1, 200.0, 40.0), None, "error rate 10.0 %"),
        (side(10, 0, 301.0, 40.0), None, "over 150 % of the current"),
        (
            side(10, 0, 250.0, 40.0),
            Some(240),
            "over the limit of 240 ms",
        ),
        (side(10, 0, 200.0, 19.0), None, "under 50 % of the current"),
    ];
    for (candidate, absolute, expected) in cases {
        let gates = RolloutGates {
            max_ttft_p95_ms: absolute,
            ..RolloutGates::default()
        };
        let window = Window {
            candidate,
            current: current.clone(),
        };
        let broken = broken_gate(Some(&gates), &window).unwrap_or_default();
        assert!(broken.contains(expected), "{expected}: {broken}");
    }
    let within = Window {
        candidate: side(10, 0, 300.0, 20.0),
        current,
    };
    assert_eq!(
        broken_gate(None, &within),
        None,
        "exactly at the limits holds"
    );
}

#[test]
fn ratio_gates_wait_for_turns_on_the_current_side() {
    let window = Window {
        candidate: side(10, 0, 5000.0, 1.0),
        current: side(2, 0, 100.0, 50.0),
    };
    assert_eq!(broken_gate(None, &window), None);
}

#[test]
fn paused_holds_the_weights_and_resuming_continues_the_step() {
    let mut s = spec(&[5, 50, 100]);
    let status = started(&s);
    s.paused = Some(true);
    let paused = decide(&s, Some(&status), Some(&healthy(100)), at(600));
    assert_eq!(paused.transition.unwrap().reason, "Paused");
    assert_eq!(paused.status.phase, RolloutPhase::Paused);
    assert_eq!(paused.status.candidate_weight_percent, 5);
    let failing = Window {
        candidate: side(10, 10, 200.0, 40.0),
        current: side(30, 0, 200.0, 40.0),
    };
    let mut held = paused.status.clone();
    for second in [610, 620, 630] {
        let d = decide(&s, Some(&held), Some(&failing), at(second));
        assert!(
            d.transition.is_none(),
            "a paused rollout neither advances nor rolls back"
        );
        held = d.status;
    }
    assert_eq!(held.candidate_weight_percent, 5);
    s.paused = Some(false);
    let resumed = decide(&s, Some(&held), Some(&healthy(10)), at(640));
    assert_eq!(resumed.transition.unwrap().reason, "Resumed");
    assert_eq!(
        resumed.status.step, 0,
        "resuming does not skip the step's judgement"
    );
    let advanced = decide(&s, Some(&resumed.status), Some(&healthy(10)), at(650));
    assert_eq!(advanced.transition.unwrap().reason, "StepAdvanced");
}

#[test]
fn a_rollout_created_paused_starts_paused() {
    let mut s = spec(&[5, 100]);
    s.paused = Some(true);
    let d = decide(&s, None, None, at(0));
    assert_eq!(d.status.phase, RolloutPhase::Paused);
    assert_eq!(d.status.candidate_weight_percent, 5);
}

#[test]
fn a_spec_edit_restarts_from_the_first_step_even_after_a_rollback() {
    let s = spec(&[5, 50, 100]);
    let status = started(&s);
    let advanced = decide(&s, Some(&status), Some(&healthy(10)), at(60)).status;
    let mut edited = s.clone();
    edited.steps = vec![10, 100];
    let d = decide(&edited, Some(&advanced), Some(&healthy(10)), at(70));
    assert_eq!(d.transition.unwrap().reason, "Restarted");
    assert_eq!((d.status.step, d.status.candidate_weight_percent), (0, 10));
    let mut rolled_back = advanced.clone();
    rolled_back.phase = RolloutPhase::RolledBack;
    rolled_back.candidate_weight_percent = 0;
    let mut gates = edited.clone();
    gates.gates = Some(RolloutGates {
        max_error_rate_percent: Some(50),
        ..Default::default()
    });
    let again = decide(&gates, Some(&rolled_back), None, at(80));
    assert_eq!(again.status.phase, RolloutPhase::Progressing);
    assert_eq!(again.status.candidate_weight_percent, 10);
}

#[test]
fn pausing_is_not_an_edit() {
    let mut s = spec(&[5, 100]);
    let digest = spec_digest(&s);
    s.paused = Some(true);
    assert_eq!(spec_digest(&s), digest);
    s.min_turns_per_step = Some(11);
    assert_ne!(spec_digest(&s), digest);
}

#[test]
fn without_figures_a_step_waits_and_says_so() {
    let s = spec(&[5, 100]);
    let status = started(&s);
    let d = decide(&s, Some(&status), None, at(600));
    assert!(d.transition.is_none());
    assert_eq!(d.status.reason, "WaitingForFigures");
    assert_eq!(d.status.step, 0);
}

#[test]
fn a_status_read_back_after_a_restart_continues_where_it_was() {
    let s = spec(&[5, 50, 100]);
    let status = started(&s);
    let advanced = decide(&s, Some(&status), Some(&healthy(10)), at(60)).status;
    // What the API server stores and a new operator reads: the status as JSON.
    let stored: RolloutStatus =
        serde_json::from_value(serde_json::to_value(&advanced).unwrap()).unwrap();
    let d = decide(&s, Some(&stored), Some(&healthy(3)), at(90));
    assert!(d.transition.is_none(), "no restart: {:?}", d.transition);
    assert_eq!(
        (d.status.step, d.status.step_started_at.clone()),
        (1, Time(at(60)))
    );
}
