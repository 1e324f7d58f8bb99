//! Smoke tests: each of the rig's parts is a real server doing real work.

use std::time::Duration;

use chat_rig::wait::until_gone;
use chat_rig::{Rig, unique_name};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use kube::core::Resource;

fn config_map(name: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..Default::default()
        },
        data: Some([("greeting".to_string(), "hello".to_string())].into()),
        ..Default::default()
    }
}

#[tokio::test]
async fn api_server_creates_reads_and_deletes_a_config_map() {
    let rig = Rig::shared();
    let (client, ns) = rig.test_namespace("smoke-cm").await;
    let api: Api<ConfigMap> = Api::namespaced(client, &ns);

    let created = api
        .create(&PostParams::default(), &config_map("smoke"))
        .await
        .unwrap();
    assert!(
        created.metadata.uid.is_some(),
        "the API server assigns a uid"
    );
    let read = api.get("smoke").await.unwrap();
    assert_eq!(read.data.unwrap()["greeting"], "hello");

    api.delete("smoke", &DeleteParams::default()).await.unwrap();
    assert!(api.get_opt("smoke").await.unwrap().is_none());
}

#[tokio::test]
async fn controller_manager_garbage_collects_owned_objects() {
    let rig = Rig::shared();
    let (client, ns) = rig.test_namespace("smoke-gc").await;
    let api: Api<ConfigMap> = Api::namespaced(client, &ns);

    let owner = api
        .create(&PostParams::default(), &config_map("owner"))
        .await
        .unwrap();
    let mut child = config_map("child");
    child.metadata.owner_references = Some(vec![owner.controller_owner_ref(&()).unwrap()]);
    api.create(&PostParams::default(), &child).await.unwrap();

    api.delete("owner", &DeleteParams::background())
        .await
        .unwrap();
    // kube-controller-manager's garbage collector deletes the owned ConfigMap.
    until_gone(&api, "child", Duration::from_secs(60)).await;
}

#[tokio::test]
async fn redis_sets_and_gets() {
    let rig = Rig::shared();
    let client = redis::Client::open(rig.redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = format!("{}:greeting", unique_name("smoke"));
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("hello")
        .query_async(&mut conn)
        .await
        .unwrap();
    let value: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(value, "hello");
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        info.contains("redis_version:"),
        "a real redis-server answers INFO"
    );
}

#[tokio::test]
async fn ferretdb_inserts_finds_upserts_and_enforces_unique_indexes() {
    use mongodb::IndexModel;
    use mongodb::bson::{Document, doc};
    use mongodb::options::IndexOptions;

    let rig = Rig::shared();
    let client = mongodb::Client::with_uri_str(rig.mongodb_url())
        .await
        .unwrap();
    let db = client.database(&unique_name("smoke"));
    let coll = db.collection::<Document>("messages");

    coll.insert_one(doc! {"session": "s1", "seq": 1, "text": "hi"})
        .await
        .unwrap();
    let found = coll
        .find_one(doc! {"session": "s1", "seq": 1})
        .await
        .unwrap()
        .expect("inserted document is found");
    assert_eq!(found.get_str("text").unwrap(), "hi");

    let result = coll
        .update_one(
            doc! {"session": "s2", "seq": 1},
            doc! {"$set": {"text": "upserted"}, "$setOnInsert": {"created": 1}},
        )
        .upsert(true)
        .await
        .unwrap();
    assert!(
        result.upserted_id.is_some(),
        "the update inserted a document"
    );
    let upserted = coll
        .find_one(doc! {"session": "s2"})
        .await
        .unwrap()
        .unwrap();
    assert_eq!(upserted.get_str("text").unwrap(), "upserted");
    assert_eq!(upserted.get_i32("created").unwrap(), 1);

    coll.create_index(
        IndexModel::builder()
            .keys(doc! {"session": 1, "seq": 1})
            .options(IndexOptions::builder().unique(true).build())
            .build(),
    )
    .await
    .unwrap();
    let err = coll
        .insert_one(doc! {"session": "s1", "seq": 1, "text": "again"})
        .await
        .expect_err("a duplicate key is rejected");
    match *err.kind {
        mongodb::error::ErrorKind::Write(mongodb::error::WriteFailure::WriteError(ref e)) => {
            assert_eq!(e.code, 11000, "duplicate key error code")
        }
        ref other => panic!("expected a duplicate key write error, got {other:?}"),
    }
    db.drop().await.unwrap();
}

async fn post_json(url: &str, body: &serde_json::Value) -> serde_json::Value {
    let response = reqwest::Client::new()
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    assert!(status.is_success(), "POST {url} answered {status}: {text}");
    serde_json::from_str(&text).unwrap()
}

#[tokio::test]
async fn ollama_native_chat_generates_text() {
    let rig = Rig::shared();
    let body = serde_json::json!({
        "model": rig.model(),
        "messages": [{"role": "user", "content": "Write one short sentence about the sea."}],
        "stream": false,
        "options": {"num_predict": 16, "temperature": 0.7},
    });
    let reply = post_json(&format!("{}/api/chat", rig.ollama_url()), &body).await;
    let text = reply["message"]["content"].as_str().unwrap();
    assert!(!text.trim().is_empty(), "generated text: {reply}");
    let generated = reply["eval_count"].as_u64().unwrap();
    assert!(
        (1..=16).contains(&generated),
        "generated {generated} tokens"
    );
}

#[tokio::test]
async fn ollama_openai_compatible_chat_generates_text() {
    let rig = Rig::shared();
    let body = serde_json::json!({
        "model": rig.model(),
        "messages": [{"role": "user", "content": "Write one short sentence about the sea."}],
        "max_tokens": 16,
    });
    let reply = post_json(&format!("{}/chat/completions", rig.openai_url()), &body).await;
    let text = reply["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!text.trim().is_empty(), "generated text: {reply}");
    let generated = reply["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(
        (1..=16).contains(&generated),
        "generated {generated} tokens"
    );
    assert_eq!(reply["model"].as_str().unwrap(), rig.model());
}
