//! The managed Redis as the operator starts it: the exact shell line of the Deployment the
//! operator builds, run with the rig's real redis-server (Debian's), filled far past its
//! `maxmemory`. It must evict instead of refusing writes, keep the newest session's recent turns,
//! and never show the password on a command line.

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chat_operator::build::desired_children;
use chat_operator::children::ChildKind;
use chat_operator::crd::ChatService;
use chat_operator::reconcile::dereference::References;
use chat_operator::reconcile::validate::validate;
use k8s_openapi::api::apps::v1::Deployment;
use serde_json::json;

/// A ChatService whose managed Redis may use 8Mi, so that a few MB of turns overfill it.
fn chat_service() -> ChatService {
    serde_json::from_value(json!({
        "apiVersion": "chatoperator.dev/v1alpha1",
        "kind": "ChatService",
        "metadata": {"name": "chat", "namespace": "team", "uid": "6a0b3c1e-0000-4000-8000-000000000009"},
        "spec": {
            "backends": [{"name": "b", "url": "http://vllm.ml:8000", "protocol": "openai"}],
            "models": {"default": "m"},
            "history": {
                "redis": {"managed": {"resources": {"limits": {"memory": "8Mi"}}}},
                "mongodb": {"managed": {}},
            },
        },
    }))
    .unwrap()
}

/// The Redis container's shell line and the variable the password comes in, as built.
fn redis_script() -> (String, String) {
    let validated = validate(&chat_service(), &References::default(), "0.1.0").unwrap();
    let desired = desired_children(&validated).unwrap();
    let object = desired
        .objects
        .iter()
        .find(|o| o.kind == ChildKind::Deployment && o.name == "chat-redis")
        .expect("a Redis Deployment");
    let deployment: Deployment = serde_json::from_value(object.manifest.clone()).unwrap();
    let pod = deployment.spec.unwrap().template.spec.unwrap();
    let container = &pod.containers[0];
    assert_eq!(
        container.command.as_deref(),
        Some(&["sh".to_string(), "-c".to_string()][..])
    );
    let env = &container.env.as_ref().unwrap()[0];
    assert!(
        env.value_from.is_some(),
        "the password comes from a Secret: {env:?}"
    );
    (
        container.args.as_ref().unwrap()[0].clone(),
        env.name.clone(),
    )
}

struct RedisProcess {
    child: Child,
    port: u16,
    password: String,
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RedisProcess {
    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .env("REDISCLI_AUTH", &self.password)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn info_field(&self, section: &str, field: &str) -> u64 {
        let info = self.cli(&["info", section]);
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in INFO {section}: {info}"))
    }
}

#[test]
fn managed_redis_evicts_past_its_limit_and_keeps_its_password_off_the_command_line() {
    let (script, password_variable) = redis_script();
    let data = std::env::temp_dir().join(format!("chatop-redis-{}", std::process::id()));
    std::fs::create_dir_all(&data).unwrap();
    let port = chat_rig::free_port().unwrap();
    // The container's /data volume is a folder here; the port and address are the only additions.
    let script = format!(
        "{} --port {port} --bind 127.0.0.1",
        script.replace("/data", data.to_str().unwrap())
    );
    let password = "Pw0rdUnlikelyToAppearElsewhere42".to_string();
    let redis = RedisProcess {
        child: Command::new("sh")
            .args(["-c", &script])
            .env(&password_variable, &password)
            .stdout(Stdio::null())
            .spawn()
            .expect("sh runs"),
        port,
        password,
    };
    let started = Instant::now();
    while redis.cli(&["ping"]) != "PONG" {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "redis did not answer: {script}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The password is required, and is on no command line: `exec` made Redis the shell's process.
    let unauthenticated = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "set", "k", "v"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&unauthenticated.stdout).contains("NOAUTH"));
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", redis.child.id())).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.starts_with("redis-server"), "{cmdline}");
    assert!(!cmdline.contains(&redis.password), "{cmdline}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(data.join("redis.conf"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o077,
        0,
        "the config file with the password is private: {mode:o}"
    );

    let maxmemory = 6 * 1024 * 1024; // 75% of the 8Mi limit
    assert_eq!(
        redis.cli(&["config", "get", "maxmemory"]),
        format!("maxmemory\n{maxmemory}")
    );
    assert_eq!(
        redis.cli(&["config", "get", "maxmemory-policy"]),
        "maxmemory-policy\nallkeys-lru"
    );

    // Recent-history copies as the chat service writes them: a list per session with a TTL.
    // 3,000 sessions of 20 messages of 256 bytes are about 15 MB, well past 6 MB.
    let sessions = 3000;
    let mut pipe = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "--pipe"])
        .env("REDISCLI_AUTH", &redis.password)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let stdin = pipe.stdin.as_mut().unwrap();
        let message = "m".repeat(256);
        let mut commands = String::from("AUTH ");
        commands.push_str(&redis.password);
        commands.push_str("\r\n");
        for session in 0..sessions {
            for turn in 0..20 {
                commands.push_str(&format!("RPUSH recent:{session} {turn}-{message}\r\n"));
            }
            commands.push_str(&format!("EXPIRE recent:{session} 3600\r\n"));
        }
        stdin.write_all(commands.as_bytes()).unwrap();
    }
    let output = pipe.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        report.contains("errors: 0,"),
        "some writes were refused: {report}"
    );

    let evicted = redis.info_field("stats", "evicted_keys");
    let used = redis.info_field("memory", "used_memory");
    assert!(evicted > 0, "nothing was evicted; used_memory {used}");
    assert!(
        used <= maxmemory + 512 * 1024,
        "used_memory {used} is past maxmemory {maxmemory}"
    );
    // The newest session, the one a caller is in, is whole; Redis never restarted.
    let newest = format!("recent:{}", sessions - 1);
    assert_eq!(redis.cli(&["llen", &newest]), "20");
    assert_eq!(
        redis.info_field("server", "process_id"),
        u64::from(redis.child.id())
    );
    drop(redis);
    let _ = std::fs::remove_dir_all(&data);
}
