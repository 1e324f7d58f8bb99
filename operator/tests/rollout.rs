//! Rollouts on the rig, end to end: the real operator against the real API server, the chat
//! pods' real chat service (run by the named kubelet stand-in `PodRunner`, since the shared rig
//! has no node), real Ollama back ends and real stores. A rollout to a second real Ollama
//! promotes, and an operator restarted mid-way continues from status; one to a candidate that
//! fails (the named fault fixture `FailingAfter`) rolls back within one step's window, and no
//! session loses a turn.

#[path = "rollout_parts/failing_after.rs"]
mod failing_after;
#[path = "rollout_parts/pod_runner.rs"]
mod pod_runner;
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chat_operator::crd::{ChatService, RolloutPhase, RolloutStatus};
use chat_rig::Rig;
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use serde_json::json;
use support::chat_service::{chat_service, create};
use support::{Env, Operator, env};

use failing_after::FailingAfter;
use pod_runner::PodRunner;

/// A rollout's longest wait here: every turn is a real generation on two shared cores.
const ROLLOUT_WAIT: Duration = Duration::from_secs(600);

fn spec(env: &Env, candidate_url: &str, rollout: serde_json::Value) -> serde_json::Value {
    let rig = Rig::shared();
    json!({
        "replicas": 1,
        "models": {"default": rig.model()},
        "backends": [
            {"name": "current", "url": rig.ollama_url(), "protocol": "ollama"},
            {"name": "canary", "url": candidate_url, "protocol": "ollama"}],
        "context": {"maxOutputTokens": 4},
        "history": {"redis": {"managed": {}}, "mongodb": {"managed": {}, "database": env.ns}},
        "rollout": rollout,
    })
}

/// Conversations of two turns each, one after another, to the newest chat pod, until told to
/// stop; counts turns and panics on a lost one (any answer but 200).
struct Traffic {
    stop: Arc<AtomicBool>,
    turns: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    fn start(pods: &PodRunner) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let turns = Arc::new(AtomicUsize::new(0));
        let runner = pods.pods.clone();
        let (task_stop, task_turns) = (stop.clone(), turns.clone());
        let task = tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(300))
                .build()
                .unwrap();
            while !task_stop.load(Ordering::SeqCst) {
                let Some(pod) = runner.lock().unwrap().last().map(|(_, p)| p.clone()) else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let session = chat_rig::unique_name("turns");
                for turn in 0..2 {
                    let body =
                        json!({"session_id": session, "message": format!("Say hi ({turn})")});
                    let response = http
                        .post(format!("{}/v1/chat", pod.url))
                        .json(&body)
                        .send()
                        .await
                        .unwrap_or_else(|e| panic!("turn {turn} of {session} lost: {e}"));
                    let status = response.status();
                    let text = response.text().await.unwrap_or_default();
                    assert_eq!(status, 200, "turn {turn} of {session} lost: {text}");
                    task_turns.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        Self { stop, turns, task }
    }

    /// Stops after the conversation in progress; fails the test if a turn was lost.
    async fn finish(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("no turn was lost");
        self.turns.load(Ordering::SeqCst)
    }
}

async fn rollout_status(env: &Env, name: &str) -> Option<RolloutStatus> {
    let cr = env.api::<ChatService>().get(name).await.unwrap();
    cr.status.and_then(|s| s.rollout)
}

/// Waits until `status.rollout` satisfies `check`; on timeout says what it last was.
async fn wait_rollout(
    env: &Env,
    name: &str,
    what: &str,
    check: impl Fn(&RolloutStatus) -> bool,
) -> RolloutStatus {
    let deadline = Instant::now() + ROLLOUT_WAIT;
    loop {
        let status = rollout_status(env, name).await;
        if let Some(status) = status.as_ref().filter(|s| check(s)) {
            return status.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the rollout did not {what} within {ROLLOUT_WAIT:?}; last status: {status:#?}; events: {:?}",
            rollout_events(env).await
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Reasons of the rollout Events, oldest first.
async fn rollout_events(env: &Env) -> Vec<String> {
    let mut events: Vec<Event> = Api::<Event>::namespaced(env.admin.clone(), &env.ns)
        .list(&Default::default())
        .await
        .unwrap()
        .items;
    events.sort_by_key(|e| e.event_time.clone().map(|t| t.0));
    events
        .into_iter()
        .filter_map(|e| e.reason)
        .filter(|r| r.starts_with("Rollout"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_to_a_second_real_ollama_promotes_and_survives_an_operator_restart() {
    let rig = Rig::shared();
    let model = rig.model().to_string();
    let second = tokio::task::spawn_blocking(move || {
        let mut server = chat_rig::OllamaServer::start().map_err(|e| format!("{e:#}"))?;
        server.load_model(&model).map_err(|e| format!("{e:#}"))?;
        Ok::<_, String>(server)
    })
    .await
    .unwrap()
    .expect("a second real Ollama");
    let env = env("rollout-promote").await;
    // Generous ratio gates: both Ollamas share two busy cores, so their speeds vary by turn;
    // this test is about the steps, the failing one about the gates.
    let rollout = json!({
        "candidate": {"backend": "canary"}, "steps": [50, 100],
        "minTurnsPerStep": 3, "minSecondsPerStep": 5,
        "gates": {"maxTtftP95RatioPercent": 10000, "minTokensPerSecondRatioPercent": 1}});
    create(
        &env,
        &chat_service("promote", spec(&env, &second.url(), rollout)),
    )
    .await;
    let operator = Operator::start(&env);
    let pods = PodRunner::start(env.admin.clone(), &env.ns, "promote");
    let traffic = Traffic::start(&pods);

    let advanced = wait_rollout(&env, "promote", "reach step 2", |s| s.step == 1).await;
    assert_eq!(advanced.candidate_weight_percent, 100, "{advanced:#?}");
    // Restarted mid-rollout, the operator continues from status: no restart of the rollout,
    // the step and its start time kept.
    operator.stop().await;
    let operator = Operator::start(&env);
    let promoted = wait_rollout(&env, "promote", "promote", |s| {
        s.phase == RolloutPhase::Promoted
    })
    .await;
    let turns = traffic.finish().await;
    assert_eq!(promoted.step, 1, "{promoted:#?}");
    assert_eq!(
        promoted.step_started_at, advanced.step_started_at,
        "{promoted:#?}"
    );
    assert!(
        promoted.candidate.as_ref().is_some_and(|c| c.turns >= 3),
        "{promoted:#?}"
    );
    let events = rollout_events(&env).await;
    assert_eq!(
        events,
        ["RolloutStarted", "RolloutStepAdvanced", "RolloutPromoted"],
        "one Event per transition, none for the operator's restart ({turns} turns served)"
    );
    assert!(
        pods.newest().is_some_and(|p| p.weight == Some(100)),
        "the promoted weight serves: {:?}",
        pod_runner::weights(&pods.pods)
    );
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_candidate_rolls_back_within_one_step_window_and_loses_no_turn() {
    let rig = Rig::shared();
    let env = env("rollout-fail").await;
    let candidate = FailingAfter::start(rig.ollama_url(), 3).await;
    let window = Duration::from_secs(300);
    let rollout = json!({
        "candidate": {"backend": "canary"}, "steps": [50, 100],
        "minTurnsPerStep": 1000, "minSecondsPerStep": window.as_secs(),
        "gates": {"maxErrorRatePercent": 5}});
    create(
        &env,
        &chat_service("failing", spec(&env, &candidate.url, rollout)),
    )
    .await;
    let _operator = Operator::start(&env);
    let pods = PodRunner::start(env.admin.clone(), &env.ns, "failing");
    let traffic = Traffic::start(&pods);

    let rolled_back = wait_rollout(&env, "failing", "roll back", |s| {
        s.phase == RolloutPhase::RolledBack
    })
    .await;
    let seen_at = Instant::now();
    let breach = candidate
        .first_failure()
        .expect("the fixture failed a turn");
    let breach_to_rollback = seen_at - breach;
    println!("breach to rollback (status RolledBack seen): {breach_to_rollback:?}");
    assert!(
        breach_to_rollback < window,
        "{breach_to_rollback:?}: {rolled_back:#?}"
    );
    assert_eq!(
        (
            rolled_back.candidate_weight_percent,
            rolled_back.current_weight_percent
        ),
        (0, 100)
    );
    assert!(
        rolled_back.message.contains("error rate"),
        "{}",
        rolled_back.message
    );
    // The rollback reaches the pods (a config change rolls them), and then the candidate gets
    // no more turns.
    chat_rig::eventually("a chat pod at 0 %", Duration::from_secs(60), || async {
        pods.newest().filter(|p| p.weight == Some(0)).map(|_| ())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let asked = candidate.chat_calls();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let turns = traffic.finish().await;
    assert_eq!(
        candidate.chat_calls(),
        asked,
        "a rolled-back candidate still got turns"
    );
    let events = rollout_events(&env).await;
    assert_eq!(
        events,
        ["RolloutStarted", "RolloutRolledBack"],
        "one Event per transition ({turns} turns served, none lost)"
    );
}
