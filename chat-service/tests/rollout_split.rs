//! The split of a canary rollout (`rollout` in the config) in a running service: sessions stay
//! on their side for every turn, the sides share the traffic by the weight, each side's figures
//! are in `GET /v1/backends`, and a failing candidate loses no turn (its sessions are served by
//! the current side and the failures count against the candidate). The current side is the
//! rig's real Ollama; the candidate is the named fixture `FlakyUpstream`, which records every
//! turn it is asked, so the test knows which side served which turn. Stores are the rig's.

mod support;

use chat_service::config::RolloutConfig;
use serde_json::json;
use support::flaky::{FlakyUpstream, Mode};
use support::pool::{backend, backends_status, chat, config_with, serve};
use support::rig;

const SESSIONS: usize = 12;
const TURNS: usize = 2;

/// Every session's turns; returns, per session, how many of its turns the candidate saw.
async fn converse(service: &support::TestService, prefix: &str) -> Vec<(String, usize)> {
    let mut sessions = Vec::new();
    for s in 0..SESSIONS {
        let session = chat_rig::unique_name(prefix);
        for turn in 0..TURNS {
            let body =
                json!({"session_id": session, "message": format!("{session} turn {turn}: say hi")});
            let (status, _, value) = chat(service, body).await;
            assert_eq!(status, 200, "session {s} turn {turn} was lost: {value}");
        }
        sessions.push(session);
    }
    sessions.into_iter().map(|s| (s, 0)).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_stay_on_their_side_and_each_side_is_counted() {
    let rig = rig();
    let candidate = FlakyUpstream::start(Mode::Healthy).await;
    let mut config = config_with(vec![
        backend("current", rig.ollama_url()),
        backend("canary", &candidate.url),
    ]);
    config.context.max_output_tokens = 4;
    config.rollout = Some(RolloutConfig {
        candidate_backend: Some("canary".into()),
        candidate_model: None,
        candidate_weight_percent: 50,
    });
    let service = serve(config).await;
    let mut sessions = converse(&service, "split").await;
    let recorded = candidate.recorded();
    for (session, seen) in &mut sessions {
        *seen = recorded
            .iter()
            .filter(|r| r.last_message.contains(session.as_str()))
            .count();
    }
    let split: Vec<usize> = sessions.iter().map(|(_, seen)| *seen).collect();
    assert!(
        split.iter().all(|&seen| seen == 0 || seen == TURNS),
        "a session changed sides mid-way (candidate turns per session): {split:?}"
    );
    let on_candidate = split.iter().filter(|&&seen| seen == TURNS).count();
    assert!(
        (1..SESSIONS).contains(&on_candidate),
        "50 % should put some sessions on each side: {split:?}"
    );
    let status = backends_status(&service).await;
    let rollout = &status["rollout"];
    assert_eq!(rollout["candidateWeightPercent"], 50, "{status}");
    let candidate_turns = (on_candidate * TURNS) as u64;
    let current_turns = ((SESSIONS - on_candidate) * TURNS) as u64;
    assert_eq!(rollout["candidate"]["turns"], candidate_turns, "{rollout}");
    assert_eq!(rollout["current"]["turns"], current_turns, "{rollout}");
    assert_eq!(rollout["candidate"]["errors"], 0, "{rollout}");
    for side in ["current", "candidate"] {
        let timed: u64 = rollout[side]["ttftCounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap())
            .sum();
        assert_eq!(
            timed,
            rollout[side]["turns"].as_u64().unwrap(),
            "{side}: {rollout}"
        );
        assert!(
            rollout[side]["completionTokens"].as_u64().unwrap() > 0,
            "{side}: {rollout}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_candidate_loses_no_turn_and_its_failures_are_counted() {
    let rig = rig();
    let candidate = FlakyUpstream::start(Mode::Fail500).await;
    let mut config = config_with(vec![
        backend("current", rig.ollama_url()),
        backend("canary", &candidate.url),
    ]);
    config.context.max_output_tokens = 4;
    // One attempt per side: the failure is the candidate's, and the turn moves to the current
    // side rather than being retried on the candidate.
    config.routing.max_attempts = 1;
    config.rollout = Some(RolloutConfig {
        candidate_backend: Some("canary".into()),
        candidate_model: None,
        candidate_weight_percent: 50,
    });
    let service = serve(config).await;
    // `converse` asserts that every turn is answered.
    converse(&service, "failing").await;
    let asked = candidate.chat_calls() as u64;
    assert!(asked > 0, "no session was on the candidate's side");
    let status = backends_status(&service).await;
    let rollout = &status["rollout"];
    // Every candidate turn failed; once its breaker opens, a turn fails without asking it.
    let candidate_turns = rollout["candidate"]["turns"].as_u64().unwrap();
    assert_eq!(rollout["candidate"]["errors"], candidate_turns, "{rollout}");
    assert!(candidate_turns >= asked, "{asked} asked: {rollout}");
    assert_eq!(
        rollout["current"]["turns"],
        (SESSIONS * TURNS) as u64,
        "every turn, the candidate's sessions' too, was served by the current side: {rollout}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn at_zero_percent_the_candidate_takes_no_turn() {
    let rig = rig();
    let candidate = FlakyUpstream::start(Mode::Healthy).await;
    let mut config = config_with(vec![
        backend("current", rig.ollama_url()),
        backend("canary", &candidate.url),
    ]);
    config.context.max_output_tokens = 4;
    config.rollout = Some(RolloutConfig {
        candidate_backend: Some("canary".into()),
        candidate_model: None,
        candidate_weight_percent: 0,
    });
    let service = serve(config).await;
    for turn in 0..4 {
        let body =
            json!({"session_id": chat_rig::unique_name("zero"), "message": format!("hi {turn}")});
        let (status, _, value) = chat(&service, body).await;
        assert_eq!(status, 200, "{value}");
    }
    assert_eq!(
        candidate.chat_calls(),
        0,
        "a rolled-back candidate got traffic"
    );
}
