//! What the session-records tests (`sessions.rs`, `erasure_restart.rs`) share: calls with an API
//! key, one turn for an end user, and the stores asked directly (MongoDB collections, Redis keys).

use futures::TryStreamExt;
use mongodb::bson::Document;
use serde_json::{Value, json};

use chat_service::config::Config;

use super::rig;

/// A request to `base` with `key` (none: auth off), answered as (status, body as JSON).
pub async fn call(
    base: &str,
    key: Option<&str>,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut request = reqwest::Client::new().request(method, format!("{base}{path}"));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
    (status, body)
}

/// One turn in `session` for `user`; extra fields merged into the body.
pub async fn turn(base: &str, key: Option<&str>, session: &str, user: Option<&str>, extra: Value) {
    let mut body = json!({"session_id": session, "message": format!("note for {session}")});
    if let Some(user) = user {
        body["user"] = json!(user);
    }
    for (field, value) in extra.as_object().unwrap() {
        body[field] = value.clone();
    }
    let (status, answer) = call(base, key, reqwest::Method::POST, "/v1/chat", Some(&body)).await;
    assert_eq!(status, 200, "{answer}");
}

pub struct Stores {
    pub mongo: mongodb::Database,
    pub collection: String,
    pub redis: redis::aio::MultiplexedConnection,
    pub prefix: String,
}

impl Stores {
    pub async fn of(config: &Config) -> Self {
        let client = mongodb::Client::with_uri_str(rig().mongodb_url())
            .await
            .unwrap();
        let redis = redis::Client::open(rig().redis_url()).unwrap();
        Self {
            mongo: client.database(&config.history.mongodb.database),
            collection: config.history.mongodb.collection.clone(),
            redis: redis.get_multiplexed_async_connection().await.unwrap(),
            prefix: config.history.redis.key_prefix.clone(),
        }
    }

    pub fn collection(&self, suffix: &str) -> mongodb::Collection<Document> {
        self.mongo
            .collection(&format!("{}{suffix}", self.collection))
    }

    pub async fn count(&self, suffix: &str, filter: Document) -> u64 {
        self.collection(suffix)
            .count_documents(filter)
            .await
            .unwrap()
    }

    pub async fn find(&self, suffix: &str, filter: Document) -> Vec<Document> {
        self.collection(suffix)
            .find(filter)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap()
    }

    /// Redis keys under the service's prefix that contain `part`.
    pub async fn redis_keys(&mut self, part: &str) -> Vec<String> {
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*{part}*", self.prefix))
            .query_async(&mut self.redis)
            .await
            .unwrap();
        keys.sort();
        keys
    }

    pub async fn exists(&mut self, key: &str) -> bool {
        redis::cmd("EXISTS")
            .arg(key)
            .query_async::<i64>(&mut self.redis)
            .await
            .unwrap()
            == 1
    }
}
