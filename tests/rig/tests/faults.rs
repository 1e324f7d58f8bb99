//! The rig's own failure handling: a failed step names itself and its log and leaves nothing
//! running; the servers go when the process that started them dies, however it dies.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chat_rig::{RedisServer, RigInfo, scratch_dir};

fn port_is_open(port: u16) -> bool {
    TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_millis(200),
    )
    .is_ok()
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn a_port_in_use_fails_the_step_with_its_name_and_log_and_leaves_no_process() {
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let dir = scratch_dir("busy-redis").unwrap();

    let err = match RedisServer::start_with(&dir, port, None) {
        Ok(_) => panic!("redis-server must not start on a port that is in use"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("rig step 'redis-server' failed"), "{err}");
    assert!(err.contains("redis.log"), "the error names the log: {err}");
    let pids = Command::new("pgrep")
        .args(["-f", &format!("redis-server 127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(
        pids.stdout.is_empty(),
        "no redis-server is left behind: {}",
        String::from_utf8_lossy(&pids.stdout)
    );
}

#[test]
fn private_servers_stop_and_start_again_on_the_same_port() {
    let mut redis = RedisServer::start().unwrap();
    let port = redis.port();
    assert!(port_is_open(port));
    redis.stop();
    assert!(!port_is_open(port), "stopped redis no longer answers");
    redis.start_again().unwrap();
    assert!(port_is_open(port));
}

/// `rig up` is killed with SIGKILL (no clean-up code runs); its watchdog still stops its servers.
#[test]
fn servers_stop_when_the_owning_process_is_killed() {
    let dir = scratch_dir("killed-owner").unwrap();
    let env_file = dir.join("rig.json");
    let mut owner = Command::new(env!("CARGO_BIN_EXE_rig"))
        .args(["up", "--only", "redis", "--env-file"])
        .arg(&env_file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let info: RigInfo = loop {
        if let Ok(text) = std::fs::read_to_string(&env_file)
            && let Ok(info) = serde_json::from_str(&text)
        {
            break info;
        }
        assert!(
            Instant::now() < deadline,
            "rig up did not write {env_file:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let url = info.redis_url.unwrap();
    let port: u16 = url
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(port_is_open(port));

    owner.kill().unwrap();
    owner.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while port_is_open(port) {
        assert!(
            Instant::now() < deadline,
            "redis-server outlived the killed rig by 10 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!pid_alive(owner.id()));
}
