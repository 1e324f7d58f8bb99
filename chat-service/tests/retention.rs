//! Retention of the stored history (`history.retention`): a session idle past its maximum age is
//! erased from MongoDB and Redis by the sweeper, a session in use is not, and a session keeps
//! only its newest messages; against real Redis and FerretDB (which has no TTL indexes, so the
//! sweeper is what enforces the age). The answers come from the named test fixture
//! `support::flaky::FlakyUpstream` (an Ollama-protocol upstream that answers at once): these
//! tests time sessions' ages, which a model's answer time on a busy machine would blur.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::flaky::{FlakyUpstream, Mode};
use support::pool::{backend, config_with};
use support::{TestService, rig, start, test_config};

async fn turn(service: &TestService, session: Option<&str>, message: &str) -> String {
    let mut body = json!({"message": message});
    if let Some(session) = session {
        body["session_id"] = json!(session);
    }
    let (status, _, answer) = service.post_json("/v1/chat", &body).await;
    assert_eq!(status, 200, "{answer}");
    answer["session_id"].as_str().unwrap().to_string()
}

async fn redis_copy_exists(service: &TestService, session: &str) -> bool {
    let client = redis::Client::open(rig().redis_url()).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let exists: i64 = redis::cmd("EXISTS")
        .arg(service.recent_key(session))
        .query_async(&mut redis)
        .await
        .unwrap();
    exists == 1
}

/// The retention age of the first test.
const MAX_AGE: Duration = Duration::from_secs(4);

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_session_is_erased_from_both_stores_and_a_busy_one_is_kept() {
    let rig = rig();
    let fixture = FlakyUpstream::start(Mode::Healthy).await;
    let mut config = config_with(vec![backend("fixture", &fixture.url)]);
    config.history.retention.max_age_seconds = Some(MAX_AGE.as_secs());
    config.history.retention.sweep_interval_seconds = 1;
    config.validate().expect("valid retention config");
    let service = start(config, rig.redis_url(), rig.mongodb_url()).await;

    let idle = turn(&service, None, "Say one word.").await;
    let started = Instant::now();
    assert!(redis_copy_exists(&service, &idle).await);
    let busy = turn(&service, None, "Say one word.").await;
    // The busy session gets a turn about every second, so its last turn is never that old.
    let mut gone_after = None;
    while started.elapsed() < Duration::from_secs(30) {
        turn(&service, Some(&busy), "One more word.").await;
        let (status, _) = service
            .get_json(&format!("/v1/sessions/{idle}/messages"))
            .await;
        if status == 404 {
            gone_after = Some(started.elapsed());
            break;
        }
        assert_eq!(status, 200);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let gone_after = gone_after.expect("the idle session was still there after 30 s");
    println!(
        "idle session erased {gone_after:?} after its last turn (max age {MAX_AGE:?}, sweep 1 s)"
    );
    assert!(
        gone_after >= MAX_AGE - Duration::from_secs(1),
        "erased before it was {MAX_AGE:?} idle: {gone_after:?}"
    );
    assert!(
        !redis_copy_exists(&service, &idle).await,
        "the Redis copy of an expired session is left"
    );
    // The busy one kept every turn.
    let kept = service.all_messages(&busy).await;
    assert!(kept.len() >= 4, "the busy session lost turns: {kept:?}");
    // A new turn on the expired id starts from nothing.
    turn(&service, Some(&idle), "Hello again.").await;
    assert_eq!(service.all_messages(&idle).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_keeps_only_its_newest_messages_in_both_stores() {
    let rig = rig();
    let fixture = FlakyUpstream::start(Mode::Healthy).await;
    let mut config = config_with(vec![backend("fixture", &fixture.url)]);
    config.history.retention.max_messages_per_session = Some(4);
    config.validate().expect("valid retention config");
    let service = start(config, rig.redis_url(), rig.mongodb_url()).await;
    let session = turn(&service, None, "First.").await;
    for message in ["Second.", "Third.", "Fourth."] {
        turn(&service, Some(&session), message).await;
    }
    let kept = service.all_messages(&session).await;
    let users: Vec<&str> = kept
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(kept.len(), 4, "{kept:?}");
    assert_eq!(users, ["Third.", "Fourth."]);
    let client = redis::Client::open(rig.redis_url()).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let cached: i64 = redis::cmd("ZCARD")
        .arg(service.recent_key(&session))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(
        cached, 4,
        "Redis holds more of the session than retention keeps"
    );
}

#[test]
fn retention_settings_are_checked_with_their_paths() {
    let mut config = test_config(rig());
    config.history.retention.max_age_seconds = Some(0);
    config.history.retention.max_messages_per_session = Some(1);
    config.history.retention.sweep_interval_seconds = 0;
    let errors = config.validate().unwrap_err().to_string();
    for path in [
        "history.retention.maxAgeSeconds",
        "history.retention.maxMessagesPerSession",
        "history.retention.sweepIntervalSeconds",
    ] {
        assert!(errors.contains(path), "{path} not named in: {errors}");
    }
}
