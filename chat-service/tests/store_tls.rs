//! The chat-service binary against stores that speak only TLS, with server verification on: a
//! redis-server with `--tls-port` and AUTH, and FerretDB with its TLS listener and a SCRAM user,
//! both serving a certificate from a CA made for the test (`chat_rig::tls::StoreCa`). The
//! credentials reach the process as the operator passes them (environment variables from
//! Secrets), the CA as a file the config names. The LLM is the shared rig's Ollama.
//!
//! The TLS servers are started here with the rig's code (`chat_rig::tls::TlsStores`), one pair
//! per test, so that a test may stop its own and the shared rig need not run them.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use chat_rig::tls::StoreCa;
use chat_rig::{FerretDb, RedisServer};
use chat_service::config::{Config, StoreTlsConfig};
use mongodb::bson::{Document, doc};
use serde_json::{Value, json};
use support::{rig, test_config};

/// The rig's TLS Redis and TLS FerretDB (one pair per test, in a scratch folder), and this
/// test's database.
struct TlsStores {
    ca: StoreCa,
    redis: RedisServer,
    mongodb: FerretDb,
    database: String,
    dir: PathBuf,
}

impl TlsStores {
    fn start(name: &str) -> Self {
        let dir = chat_rig::scratch_dir(name).unwrap();
        let chat_rig::tls::TlsStores { ca, redis, mongodb } =
            chat_rig::tls::TlsStores::start(&dir).unwrap();
        Self {
            ca,
            redis,
            mongodb,
            database: chat_rig::unique_name("chat"),
            dir,
        }
    }

    /// The test config with both stores verified against `ca_file`.
    fn config(&self, ca_file: &Path) -> Config {
        let mut config = test_config(rig());
        config.history.mongodb.database = self.database.clone();
        let tls = StoreTlsConfig {
            ca_file: ca_file.display().to_string(),
        };
        config.history.redis.tls = Some(tls.clone());
        config.history.mongodb.tls = Some(tls);
        // The DocumentDB flavor's setting; FerretDB takes it as well.
        config.history.mongodb.retry_writes = Some(false);
        config
    }
}

/// The binary, as a pod runs it: config file, credentials in the environment.
struct ServiceProcess {
    child: Child,
    base: String,
    stderr: PathBuf,
    http: reqwest::Client,
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServiceProcess {
    fn spawn(mut config: Config, stores: &TlsStores, label: &str) -> Self {
        let port = chat_rig::free_port().unwrap();
        config.listen = format!("127.0.0.1:{port}");
        let config_path = stores.dir.join(format!("{label}.yaml"));
        std::fs::write(&config_path, serde_yaml::to_string(&config).unwrap()).unwrap();
        let stderr = stores.dir.join(format!("{label}.stderr"));
        let child = Command::new(env!("CARGO_BIN_EXE_chat-service"))
            .arg("--config")
            .arg(&config_path)
            .env("REDIS_URL", stores.redis.url())
            .env("MONGODB_URI", stores.mongodb.url())
            .env("RUST_LOG", "info")
            .stdout(std::fs::File::create(stores.dir.join(format!("{label}.log"))).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            stderr,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(600))
                .build()
                .unwrap(),
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// `/readyz` once `check` holds for it, or a panic with the last answer and the logs.
    async fn readyz_until(&mut self, check: impl Fn(u16, &Value) -> bool) -> (u16, Value) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("chat-service exited ({status}): {}", self.logs());
            }
            if let Ok(response) = self.http.get(format!("{}/readyz", self.base)).send().await {
                let status = response.status().as_u16();
                let body: Value = response.json().await.unwrap();
                if check(status, &body) {
                    return (status, body);
                }
                last = Some((status, body));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "/readyz never matched; last {last:?}; logs:\n{}",
            self.logs()
        );
    }
}

/// A MongoDB client of our own, verifying the server against the CA as the service does.
async fn read_messages(stores: &TlsStores, session: &str) -> Vec<Document> {
    use futures::TryStreamExt;
    use mongodb::options::{ClientOptions, Tls, TlsOptions};
    let mut options = ClientOptions::parse(stores.mongodb.url()).await.unwrap();
    options.tls = Some(Tls::Enabled(
        TlsOptions::builder()
            .ca_file_path(stores.ca.ca_file.clone())
            .build(),
    ));
    let client = mongodb::Client::with_options(options).unwrap();
    client
        .database(&stores.database)
        .collection::<Document>("messages")
        .find(doc! { "session_id": session })
        .sort(doc! { "seq": 1 })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

/// The recent copy through a redis client with TLS verification against the CA.
async fn read_recent(stores: &TlsStores, key: &str) -> Vec<String> {
    let certificates = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(std::fs::read(&stores.ca.ca_file).unwrap()),
    };
    let client = redis::Client::build_with_tls(stores.redis.url(), certificates).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("ZRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .query_async(&mut connection)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_turn_is_stored_over_verified_tls_in_mongodb_and_redis() {
    let stores = TlsStores::start("store-tls-turn");
    let config = stores.config(&stores.ca.ca_file);
    let key_prefix = config.history.redis.key_prefix.clone();
    let mut service = ServiceProcess::spawn(config, &stores, "service");
    let (_, ready) = service
        .readyz_until(|status, body| status == 200 && body["redis"] == true)
        .await;
    assert_eq!(ready["mongodb"], true, "{ready}");

    let response = service
        .http
        .post(format!("{}/v1/chat", service.base))
        .json(&json!({"message": "Name one colour."}))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let answer: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{answer}\n{}", service.logs());
    let session = answer["session_id"].as_str().unwrap().to_string();
    let reply = answer["message"].as_str().unwrap().to_string();
    assert!(!reply.is_empty(), "{answer}");

    let stored = read_messages(&stores, &session).await;
    let contents: Vec<&str> = stored
        .iter()
        .map(|m| m.get_str("content").unwrap())
        .collect();
    assert_eq!(contents, ["Name one colour.", reply.as_str()], "{stored:?}");
    let recent = read_recent(&stores, &format!("{key_prefix}:session:{session}:recent")).await;
    assert_eq!(recent.len(), 2, "the recent copy in Redis: {recent:?}");
    // Compare decoded contents: a reply with a newline is escaped in the stored JSON.
    let recent_contents: Vec<String> = recent
        .iter()
        .map(|entry| {
            let turn: Value = serde_json::from_str(entry).unwrap();
            turn["content"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(
        recent_contents,
        ["Name one colour.", reply.as_str()],
        "the recent copy in Redis: {recent:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_ca_keeps_the_service_up_and_not_ready_naming_both_stores() {
    let stores = TlsStores::start("store-tls-wrong-ca");
    let other = StoreCa::create(&stores.dir.join("other-ca"), "some-other-ca").unwrap();
    let mut service = ServiceProcess::spawn(stores.config(&other.ca_file), &stores, "wrong-ca");
    let (status, body) = service
        .readyz_until(|_, body| {
            body["mongodb_error"].is_string() && body["redis_error"].is_string()
        })
        .await;
    println!("/readyz with the wrong CA: {body}");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "not_ready", "{body}");
    assert_eq!(
        (&body["mongodb"], &body["redis"]),
        (&json!(false), &json!(false))
    );
    for store in ["mongodb_error", "redis_error"] {
        let reason = body[store].as_str().unwrap().to_lowercase();
        assert!(
            reason.contains("certificate") || reason.contains("unknownissuer"),
            "{store} names the TLS failure: {reason}"
        );
    }
    let degraded = body["degraded"].to_string();
    assert!(degraded.contains("redis unreachable"), "{degraded}");
    // Not a crash loop: the process is still serving a few seconds on.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        service.child.try_wait().unwrap().is_none(),
        "exited: {}",
        service.logs()
    );
    service.readyz_until(|status, _| status == 503).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreadable_ca_file_stops_start_up_naming_the_setting_and_path() {
    let stores = TlsStores::start("store-tls-missing-ca");
    let missing = stores.dir.join("no-such-ca.crt");
    let mut config = stores.config(&stores.ca.ca_file);
    config.history.redis.tls = Some(StoreTlsConfig {
        ca_file: missing.display().to_string(),
    });
    let mut service = ServiceProcess::spawn(config, &stores, "missing-ca");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = service.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running: {}",
            service.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success());
    let logs = service.logs();
    assert!(
        logs.contains("history.redis.tls.caFile") && logs.contains(&missing.display().to_string()),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ca_with_a_clear_text_redis_url_is_refused_at_start() {
    let stores = TlsStores::start("store-tls-clear-url");
    let config_path = stores.dir.join("clear.yaml");
    let mut config = stores.config(&stores.ca.ca_file);
    config.listen = format!("127.0.0.1:{}", chat_rig::free_port().unwrap());
    std::fs::write(&config_path, serde_yaml::to_string(&config).unwrap()).unwrap();
    let stderr_path = stores.dir.join("clear.stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_chat-service"))
        .arg("--config")
        .arg(&config_path)
        .env(
            "REDIS_URL",
            stores.redis.url().replace("rediss://", "redis://"),
        )
        .env("MONGODB_URI", stores.mongodb.url())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("started with a CA and a clear-text Redis URL");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success());
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(stderr.contains("not rediss://"), "{stderr}");
}
