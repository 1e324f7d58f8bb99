//! The caller's sessions as records, against the rig's real Redis and FerretDB: `GET
//! /v1/sessions` (cursor pages of the caller's own sessions), `GET /v1/sessions/export` (NDJSON of
//! every stored message) and `DELETE /v1/users/{user}` (an end user erased from MongoDB, the Redis
//! copy, the response cache and the idempotency records, with an audit record); the SIGKILL of the
//! binary mid-erasure is `erasure_restart.rs`. The stores are asked directly. Answers come from the
//! named fixture `FlakyUpstream` (an Ollama-protocol upstream that answers at once): these tests
//! are about what is stored, not what a model says.

mod support;

use std::collections::BTreeSet;

use chat_service::config::Config;
use mongodb::bson::doc;
use serde_json::{Value, json};
use support::flaky::{FlakyUpstream, Mode};
use support::pool::{backend, config_with};
use support::records::{Stores, call, turn};
use support::{rig, start_with_api_keys};

const KEY_A: &str = "records-key-a-0123456789";
const KEY_B: &str = "records-key-b-9876543210";
const KEYS: &str = "team-a records-key-a-0123456789, team-b records-key-b-9876543210";

/// Every session id `GET /v1/sessions` lists, following the cursor with `limit`.
async fn listed(base: &str, key: &str, query: &str, limit: usize) -> Vec<String> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v1/sessions?limit={limit}{query}");
        if let Some(cursor) = &cursor {
            path.push_str(&format!("&cursor={cursor}"));
        }
        let (status, page) = call(base, Some(key), reqwest::Method::GET, &path, None).await;
        assert_eq!(status, 200, "{page}");
        let sessions = page["sessions"].as_array().unwrap();
        assert!(sessions.len() <= limit, "{page}");
        ids.extend(
            sessions
                .iter()
                .map(|s| s["session_id"].as_str().unwrap().to_string()),
        );
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => return ids,
        }
    }
}

/// The export's lines, parsed.
async fn export(base: &str, key: &str, query: &str) -> Vec<Value> {
    let response = reqwest::Client::new()
        .get(format!("{base}/v1/sessions/export{query}"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/x-ndjson",
        "{:?}",
        response.headers()
    );
    let text = response.text().await.unwrap();
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

/// Every stored message of `session`, as (session, seq, content).
async fn stored(base: &str, key: &str, session: &str) -> Vec<(String, i64, String)> {
    let path = format!("/v1/sessions/{session}/messages?limit=200");
    let (status, page) = call(base, Some(key), reqwest::Method::GET, &path, None).await;
    assert_eq!(status, 200, "{page}");
    page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                session.to_string(),
                m["seq"].as_i64().unwrap(),
                m["content"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn exported_messages(lines: &[Value]) -> Vec<(String, i64, String)> {
    lines
        .iter()
        .filter(|l| l["type"] == "message")
        .map(|l| {
            (
                l["session_id"].as_str().unwrap().to_string(),
                l["seq"].as_i64().unwrap(),
                l["content"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn fixture_config(fixture: &FlakyUpstream) -> Config {
    let mut config = config_with(vec![backend("fixture", &fixture.url)]);
    config.auth.enabled = true;
    config
}

#[tokio::test(flavor = "multi_thread")]
async fn list_and_export_show_every_message_of_the_caller_and_nothing_of_others() {
    let fixture = FlakyUpstream::start(Mode::Healthy).await;
    let rig = rig();
    let service = start_with_api_keys(
        fixture_config(&fixture),
        rig.redis_url(),
        rig.mongodb_url(),
        Some(KEYS),
    )
    .await;
    let base = service.base.as_str();
    let eve = "eve@example.com";
    for (session, user, turns) in [
        ("a-eve-1", Some(eve), 2),
        ("a-eve-2", Some(eve), 1),
        ("a-bob", Some("bob"), 1),
        ("a-nobody", None, 1),
        ("shared-id", Some(eve), 1),
    ] {
        for _ in 0..turns {
            turn(base, Some(KEY_A), session, user, json!({})).await;
        }
    }
    for session in ["shared-id", "b-eve"] {
        turn(
            base,
            Some(KEY_B),
            session,
            Some(eve),
            json!({"message": "B's secret 4711"}),
        )
        .await;
    }

    // Pages of two, in id order, A's own only; B sees B's.
    let all_a = ["a-bob", "a-eve-1", "a-eve-2", "a-nobody", "shared-id"];
    assert_eq!(listed(base, KEY_A, "", 2).await, all_a);
    assert_eq!(listed(base, KEY_B, "", 2).await, ["b-eve", "shared-id"]);
    let user_query = "&user=eve%40example.com";
    assert_eq!(
        listed(base, KEY_A, user_query, 50).await,
        ["a-eve-1", "a-eve-2", "shared-id"]
    );
    let (_, page) = call(
        base,
        Some(KEY_A),
        reqwest::Method::GET,
        "/v1/sessions?limit=1",
        None,
    )
    .await;
    assert_eq!(page["sessions"][0]["end_users"], json!(["bob"]), "{page}");
    assert!(page["sessions"][0]["updated_at"].is_string(), "{page}");

    // Bad cursors and limits are the client's error, naming the parameter.
    for query in [
        "cursor=..%2Fx",
        "cursor=%7B%22%24gt%22%3A%22%22%7D",
        "limit=0",
        "limit=201",
        "limit=ten",
        "user=",
    ] {
        let path = format!("/v1/sessions?{query}");
        let (status, body) = call(base, Some(KEY_A), reqwest::Method::GET, &path, None).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(
            body["error"]["type"], "invalid_request_error",
            "{query}: {body}"
        );
    }

    // The export holds every stored message of A, each once, and ends with the totals.
    let lines = export(base, KEY_A, "").await;
    let mut expected = Vec::new();
    for session in all_a {
        expected.extend(stored(base, KEY_A, session).await);
    }
    assert_eq!(exported_messages(&lines), expected, "{lines:#?}");
    assert_eq!(expected.len(), 12);
    assert_eq!(
        lines.last().unwrap(),
        &json!({"type": "end", "sessions": 5, "messages": 12})
    );
    let text = serde_json::to_string(&lines).unwrap();
    assert!(!text.contains("4711"), "B's messages in A's export");
    // One end user's export: only their sessions.
    let lines = export(base, KEY_A, "?user=eve%40example.com").await;
    let sessions: BTreeSet<String> = exported_messages(&lines)
        .into_iter()
        .map(|(s, _, _)| s)
        .collect();
    assert_eq!(
        sessions,
        BTreeSet::from(["a-eve-1".into(), "a-eve-2".into(), "shared-id".into()])
    );
    assert_eq!(lines.last().unwrap()["messages"], 8);
}

#[tokio::test(flavor = "multi_thread")]
async fn erasing_an_end_user_empties_every_store_once_and_leaves_an_audit_record() {
    let fixture = FlakyUpstream::start(Mode::Healthy).await;
    let mut config = fixture_config(&fixture);
    config.cache.enabled = true;
    let rig = rig();
    let service = start_with_api_keys(
        config.clone(),
        rig.redis_url(),
        rig.mongodb_url(),
        Some(KEYS),
    )
    .await;
    let base = service.base.as_str();
    let mut stores = Stores::of(&config).await;
    let eve = "eve@example.com";
    // Deterministic turns (answers cached, indexed by session) and an idempotent one.
    turn(
        base,
        Some(KEY_A),
        "erase-1",
        Some(eve),
        json!({"temperature": 0.0}),
    )
    .await;
    turn(base, Some(KEY_A), "erase-1", Some(eve), json!({})).await;
    turn(
        base,
        Some(KEY_A),
        "erase-2",
        Some(eve),
        json!({"temperature": 0.0}),
    )
    .await;
    let response = reqwest::Client::new()
        .post(format!("{base}/v1/chat"))
        .bearer_auth(KEY_A)
        .header("idempotency-key", "erase-idempotent-1")
        .json(&json!({"session_id": "erase-2", "user": eve, "message": "kept for retries"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    turn(
        base,
        Some(KEY_A),
        "keep-bob",
        Some("bob"),
        json!({"temperature": 0.0}),
    )
    .await;
    turn(base, Some(KEY_B), "erase-1", Some(eve), json!({})).await;

    let eve_keys = ["k.team-a/erase-1", "k.team-a/erase-2"];
    assert_eq!(
        stores
            .count("", doc! {"session_id": {"$in": eve_keys.to_vec()}})
            .await,
        8
    );
    let cached_answers = stores.redis_keys("erase").await;
    let answers: Vec<String> = {
        let mut answers = Vec::new();
        for index in cached_answers.iter().filter(|k| k.ends_with(":responses")) {
            let members: Vec<String> = redis::cmd("SMEMBERS")
                .arg(index)
                .query_async(&mut stores.redis)
                .await
                .unwrap();
            answers.extend(members);
        }
        answers
    };
    assert_eq!(
        answers.len(),
        2,
        "one cached answer per deterministic turn: {cached_answers:?}"
    );
    for answer in &answers {
        assert!(stores.exists(answer).await, "{answer}");
    }
    assert_eq!(
        stores
            .count("_idempotency", doc! {"session": "k.team-a/erase-2"})
            .await,
        1
    );

    let (status, erased) = call(
        base,
        Some(KEY_A),
        reqwest::Method::DELETE,
        "/v1/users/eve%40example.com",
        None,
    )
    .await;
    assert_eq!(status, 200, "{erased}");
    assert_eq!(erased["user"], eve);
    assert_eq!(erased["erased_sessions"], 2, "{erased}");
    assert_eq!(erased["erased_messages"], 8, "{erased}");
    assert_eq!(erased["erased_cached_answers"], 2, "{erased}");

    // Gone from every store, asked directly.
    assert_eq!(
        stores
            .count("", doc! {"session_id": {"$in": eve_keys.to_vec()}})
            .await,
        0
    );
    assert_eq!(
        stores
            .count("_sessions", doc! {"_id": {"$in": eve_keys.to_vec()}})
            .await,
        0
    );
    assert_eq!(
        stores
            .count("_idempotency", doc! {"session": "k.team-a/erase-2"})
            .await,
        0
    );
    let left: Vec<String> = stores
        .redis_keys("erase")
        .await
        .into_iter()
        .filter(|k| k.contains("team-a"))
        .collect();
    assert!(
        left.is_empty(),
        "Redis keys of erased sessions left: {left:?}"
    );
    for answer in &answers {
        assert!(!stores.exists(answer).await, "cached answer {answer} left");
    }
    // Others' sessions stay: A's bob, and B's eve.
    assert_eq!(
        stores
            .count("", doc! {"session_id": "k.team-a/keep-bob"})
            .await,
        2
    );
    assert_eq!(
        stores
            .count("", doc! {"session_id": "k.team-b/erase-1"})
            .await,
        2
    );
    assert_eq!(
        listed(base, KEY_B, "&user=eve%40example.com", 10).await,
        ["erase-1"]
    );

    // The audit record: who, when, how many; no content and no label.
    let audit = stores
        .find(
            "_erasures",
            doc! {"_id": erased["erasure_id"].as_str().unwrap()},
        )
        .await;
    assert_eq!(audit.len(), 1, "{audit:?}");
    let record = &audit[0];
    assert_eq!(record.get_str("state").unwrap(), "done", "{record}");
    assert_eq!(record.get_str("principal").unwrap(), "k.team-a", "{record}");
    assert!(record.get_datetime("requested_at").is_ok(), "{record}");
    assert!(record.get_datetime("completed_at").is_ok(), "{record}");
    assert_eq!(record.get_i64("sessions").unwrap(), 2, "{record}");
    assert_eq!(record.get_i64("messages").unwrap(), 8, "{record}");
    let text = record.to_string();
    for secret in [eve, "note for", "kept for retries"] {
        assert!(
            !text.contains(secret),
            "{secret:?} in the audit record: {text}"
        );
    }

    // Again: nothing left, so 200 with zeros, and another audit record.
    let (status, again) = call(
        base,
        Some(KEY_A),
        reqwest::Method::DELETE,
        "/v1/users/eve%40example.com",
        None,
    )
    .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(
        (
            again["erased_sessions"].clone(),
            again["erased_messages"].clone()
        ),
        (json!(0), json!(0)),
        "{again}"
    );
    assert_eq!(
        stores
            .count("_erasures", doc! {"principal": "k.team-a"})
            .await,
        2
    );
    // B cannot erase A's end users: B's erasure of bob finds nothing of A's.
    let (status, other) = call(
        base,
        Some(KEY_B),
        reqwest::Method::DELETE,
        "/v1/users/bob",
        None,
    )
    .await;
    assert_eq!(status, 200, "{other}");
    assert_eq!(other["erased_sessions"], 0, "{other}");
    assert_eq!(
        stores
            .count("", doc! {"session_id": "k.team-a/keep-bob"})
            .await,
        2
    );
    // A label that is no label.
    let (status, bad) = call(
        base,
        Some(KEY_A),
        reqwest::Method::DELETE,
        &format!("/v1/users/{}", "x".repeat(257)),
        None,
    )
    .await;
    assert_eq!(status, 400, "{bad}");
}
