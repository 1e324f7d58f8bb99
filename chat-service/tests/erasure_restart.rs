//! An end-user erasure (`DELETE /v1/users/{user}`) cut by a SIGKILL of the real `chat-service`
//! binary is finished after a restart, against the rig's real Redis and FerretDB. The erasure is
//! slowed with the named fault injection `CHAT_SERVICE_FAULT_ERASE_DELAY_MS` (a pause before each
//! session), so that the kill lands mid-erasure; answers come from the named fixture
//! `FlakyUpstream`.

mod support;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use chat_service::config::Config;
use mongodb::bson::doc;
use serde_json::json;
use support::flaky::{FlakyUpstream, Mode};
use support::pool::{backend, config_with};
use support::records::{Stores, turn};
use support::rig;

/// The real binary on the rig's stores; killed when dropped.
struct Binary {
    child: Child,
    base: String,
    log: std::path::PathBuf,
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Binary {
    async fn start(config: &Config, fault_delay_ms: Option<u64>, label: &str) -> Self {
        let rig = rig();
        let dir = chat_rig::scratch_dir("chat-service-erasure").unwrap();
        let config_path = dir.join(chat_rig::unique_name("config"));
        std::fs::write(&config_path, serde_yaml::to_string(config).unwrap()).unwrap();
        let log = dir.join(chat_rig::unique_name(label));
        let mut command = Command::new(env!("CARGO_BIN_EXE_chat-service"));
        command
            .arg("--config")
            .arg(&config_path)
            .env("REDIS_URL", rig.redis_url())
            .env("MONGODB_URI", rig.mongodb_url())
            .env("RUST_LOG", "info")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.join("stderr")).unwrap());
        if let Some(delay) = fault_delay_ms {
            command.env(
                chat_service::state::FAULT_ERASE_DELAY_ENV,
                delay.to_string(),
            );
        }
        let child = command.spawn().unwrap();
        let base = format!("http://{}", config.listen);
        let http = reqwest::Client::new();
        let up = async {
            while http.get(format!("{base}/healthz")).send().await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), up)
            .await
            .expect("service started");
        Self { child, base, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_erasure_cut_by_sigkill_is_finished_after_a_restart() {
    const SESSIONS: usize = 12;
    let fixture = FlakyUpstream::start(Mode::Healthy).await;
    let mut config = config_with(vec![backend("fixture", &fixture.url)]);
    config.listen = format!("127.0.0.1:{}", chat_rig::free_port().unwrap());
    let mut stores = Stores::of(&config).await;
    let user = "kim@example.com";
    // Fault injection: each session of an erasure waits 400 ms, so the kill lands mid-erasure.
    let first = Binary::start(&config, Some(400), "first.log").await;
    for i in 0..SESSIONS {
        turn(
            &first.base,
            None,
            &format!("kill-{i:02}"),
            Some(user),
            json!({}),
        )
        .await;
    }
    let of_user = doc! {"end_users": user};
    assert_eq!(
        stores.count("_sessions", of_user.clone()).await,
        SESSIONS as u64
    );
    let erase = tokio::spawn({
        let base = first.base.clone();
        async move {
            reqwest::Client::new()
                .delete(format!("{base}/v1/users/kim%40example.com"))
                .send()
                .await
        }
    });
    let started = Instant::now();
    loop {
        let left = stores.count("_sessions", of_user.clone()).await;
        if left < SESSIONS as u64 - 2 {
            assert!(
                left > 0,
                "the erasure finished before the kill:\n{}",
                first.log()
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the erasure never progressed:\n{}",
            first.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = Command::new("kill")
        .args(["-KILL", &first.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        erase.await.unwrap().is_err(),
        "the DELETE was answered before the kill"
    );
    drop(first);
    let pending = stores.find("_erasures", doc! {"state": "pending"}).await;
    assert_eq!(pending.len(), 1, "{pending:?}");
    let left = stores.count("_sessions", of_user.clone()).await;
    assert!(left > 0, "nothing left to finish");

    // Restarted without the fault: the pending erasure is finished (its lease runs out first).
    let second = Binary::start(&config, None, "second.log").await;
    let id = pending[0].get_str("_id").unwrap().to_string();
    let record = loop {
        let record = stores.find("_erasures", doc! {"_id": &id}).await.remove(0);
        if record.get_str("state").unwrap() == "done" {
            break record;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the erasure was not finished after the restart: {record}\n{}",
            second.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(stores.count("_sessions", of_user.clone()).await, 0);
    let keys: Vec<String> = (0..SESSIONS).map(|i| format!("kill-{i:02}")).collect();
    assert_eq!(
        stores
            .count("", doc! {"session_id": {"$in": keys.clone()}})
            .await,
        0
    );
    let left = stores.redis_keys("kill-").await;
    assert!(left.is_empty(), "Redis keys left: {left:?}");
    // The counts add up both runs; a kill between a session's delete and its count (a few
    // milliseconds against the 400 ms pause) would leave that one session uncounted.
    let sessions = record.get_i64("sessions").unwrap();
    assert!(
        (SESSIONS as i64 - 1..=SESSIONS as i64).contains(&sessions),
        "{record}"
    );
    assert!(record.get_i64("resumed").unwrap() >= 1, "{record}");
    assert!(record.get("end_user").is_none(), "{record}");
    assert!(
        second
            .log()
            .contains("finished an erasure that a stopped replica had begun")
    );
}
