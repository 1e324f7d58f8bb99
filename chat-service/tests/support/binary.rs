//! The real `chat-service` binary as a child process on the rig's Redis and FerretDB, its log
//! (stdout, JSON lines at `RUST_LOG=info`) in a file, for tests of what only the binary does:
//! signals, and the log it writes.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use chat_service::config::Config;

use super::rig;

pub struct Binary {
    pub child: Child,
    pub base: String,
    pub port: u16,
    pub log: PathBuf,
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

impl Binary {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub async fn exit_status(mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "chat-service did not exit within {within:?} of SIGTERM:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub async fn start_binary(mut config: Config) -> Binary {
    let rig = rig();
    let port = chat_rig::free_port().unwrap();
    config.listen = format!("127.0.0.1:{port}");
    let dir = chat_rig::scratch_dir("chat-service-shutdown").unwrap();
    let config_path = dir.join(chat_rig::unique_name("config"));
    std::fs::write(&config_path, serde_yaml::to_string(&config).unwrap()).unwrap();
    let log = dir.join(chat_rig::unique_name("service.log"));
    let child = Command::new(env!("CARGO_BIN_EXE_chat-service"))
        .arg("--config")
        .arg(&config_path)
        .env("REDIS_URL", rig.redis_url())
        .env("MONGODB_URI", rig.mongodb_url())
        .env("RUST_LOG", "info")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let up = async {
        while http.get(format!("{base}/healthz")).send().await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), up)
        .await
        .expect("service started");
    Binary {
        child,
        base,
        port,
        log,
    }
}
