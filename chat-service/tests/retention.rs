//! Retention of the stored history (`history.retention`): a session idle past its maximum age is
//! erased from MongoDB and Redis by the sweeper, a session in use is not, and a session keeps
//! only its newest messages; against real Redis and FerretDB (which has no TTL indexes, so the
//! sweeper is what enforces the age, and the service says so). Where a server has TTL indexes,
//! the service makes them and every document carries an expiry past its session's last turn:
//! that test runs behind the named fixture `support::ttl_proxy::TtlProxy`, which plays a server
//! with TTL indexes in front of FerretDB. The answers come from the named test fixture
//! `support::flaky::FlakyUpstream` (an Ollama-protocol upstream that answers at once): these
//! tests time sessions' ages, which a model's answer time on a busy machine would blur.

mod support;

use std::time::{Duration, Instant};

use futures::TryStreamExt;
use mongodb::bson::{Document, doc};
use serde_json::json;
use support::flaky::{FlakyUpstream, Mode};
use support::pool::{backend, config_with};
use support::records::Stores;
use support::ttl_proxy::TtlProxy;
use support::{TestService, metric_value, rig, start, test_config};

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
    // FerretDB refused the TTL indexes: the service says so and writes no expiry it would
    // never act on.
    let metrics = service.metrics_text().await;
    assert_eq!(
        metric_value(&metrics, "chat_history_ttl_index"),
        0.0,
        "{metrics}"
    );
    let stored = Stores::of(&service.state.config)
        .await
        .find("", doc! { "session_id": busy.as_str() })
        .await;
    assert!(!stored.is_empty());
    assert!(
        stored.iter().all(|m| !m.contains_key("expire_at")),
        "expiry written for a server without TTL indexes: {stored:?}"
    );
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

fn millis(document: &Document, field: &str) -> i64 {
    document
        .get_datetime(field)
        .unwrap_or_else(|e| panic!("{field} of {document}: {e}"))
        .timestamp_millis()
}

fn now_millis() -> i64 {
    mongodb::bson::DateTime::now().timestamp_millis()
}

#[tokio::test(flavor = "multi_thread")]
async fn where_the_server_has_ttl_indexes_every_document_expires_after_its_sessions_last_turn() {
    let rig = rig();
    let proxy = TtlProxy::start(rig.mongodb_url()).await;
    let fixture = FlakyUpstream::start(Mode::Healthy).await;
    let mut config = config_with(vec![backend("fixture", &fixture.url)]);
    config.history.retention.max_age_seconds = Some(8);
    config.history.retention.sweep_interval_seconds = 1;
    config.history.redis.ttl_seconds = 2;
    config.validate().expect("valid retention config");
    // Maximum age + a grace of the longer of the Redis copy's lifetime and two sweeps.
    let after_ms = 10_000;
    let slack_ms = 1_250;
    let service = start(config, rig.redis_url(), &proxy.url).await;

    // Found out at start-up, before any turn.
    let started = Instant::now();
    loop {
        let metrics = service.metrics_text().await;
        if metric_value(&metrics, "chat_history_ttl_index") == 1.0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the service did not report its TTL indexes: {metrics}\nasked for: {:?}",
            proxy.ttl_indexes()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Asked of the server, as `getIndexes()` would.
    let mongodb = service.state.config.history.mongodb.clone();
    let client = mongodb::Client::with_uri_str(&proxy.url).await.unwrap();
    for collection in [
        mongodb.collection.clone(),
        format!("{}_sessions", mongodb.collection),
    ] {
        let indexes: Vec<_> = client
            .database(&mongodb.database)
            .collection::<Document>(&collection)
            .list_indexes()
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let ttl = indexes
            .iter()
            .find(|index| {
                index
                    .options
                    .as_ref()
                    .and_then(|o| o.expire_after)
                    .is_some()
            })
            .unwrap_or_else(|| panic!("no TTL index on {collection}: {indexes:?}"));
        assert_eq!(ttl.keys, doc! { "expire_at": 1 }, "{ttl:?}");
        assert_eq!(
            ttl.options.as_ref().unwrap().expire_after,
            Some(Duration::ZERO),
            "{ttl:?}"
        );
    }

    let check =
        |messages: &[Document], sessions: &[Document], turn_started: i64, turn_ended: i64| {
            assert!(!messages.is_empty());
            let mut latest = 0;
            for message in messages {
                let at = millis(message, "expire_at");
                assert!(
                    at >= turn_started + after_ms,
                    "a message expires sooner than {after_ms} ms after the last turn: {message}"
                );
                assert!(
                    at <= turn_ended + after_ms + slack_ms,
                    "a message expires later than it should: {message}"
                );
                latest = latest.max(at);
            }
            let [session] = sessions else {
                panic!("one session document expected: {sessions:?}");
            };
            assert!(
                millis(session, "expire_at") > latest,
                "the session document would go before its messages: {session} / {messages:?}"
            );
        };
    let stores = Stores::of(&service.state.config).await;
    let first_started = now_millis();
    let session = turn(&service, None, "Say one word.").await;
    let first_ended = now_millis();
    // Without authentication sessions are stored under their bare ids.
    let id = session.clone();
    let messages = stores.find("", doc! { "session_id": &id }).await;
    let sessions = stores.find("_sessions", doc! { "_id": &id }).await;
    check(&messages, &sessions, first_started, first_ended);
    assert_eq!(messages.len(), 2);

    // Past the slack, the next turn moves the expiry of the older messages too.
    tokio::time::sleep(Duration::from_millis(2 * slack_ms as u64)).await;
    let second_started = now_millis();
    turn(&service, Some(&session), "One more word.").await;
    let second_ended = now_millis();
    let messages = stores.find("", doc! { "session_id": &id }).await;
    let sessions = stores.find("_sessions", doc! { "_id": &id }).await;
    assert_eq!(messages.len(), 4, "{messages:?}");
    check(&messages, &sessions, second_started, second_ended);
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
