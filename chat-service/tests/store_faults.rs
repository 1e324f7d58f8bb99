//! Store faults stay bounded: a MongoDB that stops answering (a private FerretDB, SIGSTOPped)
//! gives 503 within the configured timeout and never leaves a session locked; a Redis that fails
//! an append or a delete never lets a later context miss a stored turn or see a deleted one.
//! Redis faults go through a named fixture, [`SeverableTcpProxy`], in front of the rig's Redis.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chat_rig::servers::FerretDb;
use serde_json::{Value, json};
use support::{TestService, rig, start, test_config};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Test fixture: a TCP proxy that forwards to `upstream` until it is severed. Severing closes
/// every open connection and every new one at once, so each store command through it fails
/// (no command is delayed and delivered later); mending lets connections through again.
struct SeverableTcpProxy {
    address: SocketAddr,
    severed: Arc<AtomicBool>,
    generation: watch::Sender<u64>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for SeverableTcpProxy {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl SeverableTcpProxy {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let severed = Arc::new(AtomicBool::new(false));
        let (generation, _) = watch::channel(0u64);
        let accept_severed = severed.clone();
        let accept_generation = generation.clone();
        let server = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if accept_severed.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let mut cut = accept_generation.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self {
            address,
            severed,
            generation,
            server,
        }
    }

    fn url(&self) -> String {
        format!("redis://{}/", self.address)
    }

    fn sever(&self) {
        self.severed.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    fn mend(&self) {
        self.severed.store(false, Ordering::SeqCst);
    }
}

fn redis_address() -> SocketAddr {
    let url = rig().redis_url();
    let host_port = url
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .rsplit('@')
        .next()
        .unwrap();
    host_port.parse().expect("the rig's Redis is host:port")
}

async fn turn(service: &TestService, session: &str, message: &str) -> (u16, Value) {
    let body = json!({"session_id": session, "message": message});
    let (status, _, value) = service.post_json("/v1/chat", &body).await;
    (status, value)
}

/// A request that must be answered within `limit`, so that a hang fails the test, not stalls it.
async fn answered_within(limit: Duration, request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request
        .timeout(limit)
        .send()
        .await
        .unwrap_or_else(|e| panic!("no answer within {limit:?}: {e}"));
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

fn signal(ferretdb: &FerretDb, signal: &str) {
    let pid = ferretdb.pid().expect("FerretDB runs");
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
    if signal == "-STOP" {
        wait_until_stopped(pid);
    }
}

/// `kill` returns once the signal is queued; the fault is in effect only when every thread of
/// the process has stopped, which /proc shows as state `T`.
fn wait_until_stopped(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The state follows the command name, which is in parentheses.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next());
        if state == Some("T") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "FerretDB {pid} did not stop: {stat}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_ferretdb_gives_503_within_the_timeout_and_frees_the_session() {
    let ferretdb = tokio::task::spawn_blocking(FerretDb::start)
        .await
        .unwrap()
        .expect("a private FerretDB");
    let rig = rig();
    let mut config = test_config(rig);
    let timeout = Duration::from_millis(1_000);
    config.history.mongodb.timeout_ms = timeout.as_millis() as u64;
    let service = start(config, rig.redis_url(), &ferretdb.url()).await;
    let session = "faults-stopped-mongodb";
    let (status, first) = turn(&service, session, "Before the stop.").await;
    assert_eq!(status, 200, "{first}");

    signal(&ferretdb, "-STOP");
    // Reads, the turn's append (after a real generation, under the session lock) and a delete:
    // each 503 within the bound, and the lock of the failed append does not hold up the next.
    let bound = timeout * 3 + Duration::from_secs(1);
    let page = format!("/v1/sessions/{session}/messages");
    let http = &service.http;
    let started = Instant::now();
    let (status, body) = answered_within(bound * 5, http.get(service.url(&page))).await;
    let read_took = started.elapsed();
    let mut failures = vec![(status, body, read_took)];
    for _ in 0..2 {
        let generated = Instant::now();
        let body = json!({"session_id": session, "message": "While it is stopped."});
        // Generation included: Ollama on a shared CPU may queue the turn for a while.
        let request = http.post(service.url("/v1/chat")).json(&body);
        let (status, body) = answered_within(Duration::from_secs(180), request).await;
        failures.push((status, body, generated.elapsed()));
    }
    let started = Instant::now();
    let request = http.delete(service.url(&format!("/v1/sessions/{session}")));
    let (status, body) = answered_within(bound * 5, request).await;
    failures.push((status, body, started.elapsed()));
    signal(&ferretdb, "-CONT");

    for (status, body, took) in &failures {
        assert_eq!(*status, 503, "{body} after {took:?}");
        assert_eq!(body["error"]["code"], "storage_unavailable", "{body}");
    }
    assert!(read_took < bound, "a read took {read_took:?}");
    assert!(failures[3].2 < bound, "a delete took {:?}", failures[3].2);
    println!(
        "with FerretDB stopped: read {:?}, turns {:?} and {:?} (generation included), delete {:?}",
        failures[0].2, failures[1].2, failures[2].2, failures[3].2
    );

    // Running again: the session takes turns (no lock left behind) and holds what was stored.
    let (status, after) = turn(&service, session, "After the stop.").await;
    assert_eq!(status, 200, "{after}");
    let messages = service.all_messages(session).await;
    assert_eq!(messages.len(), 4, "{messages:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_redis_append_makes_the_next_turn_read_mongodb() {
    let proxy = SeverableTcpProxy::start(redis_address()).await;
    let rig = rig();
    let service = start(test_config(rig), &proxy.url(), rig.mongodb_url()).await;
    let session = "faults-failed-append";
    let (status, first) = turn(&service, session, "First turn.").await;
    assert_eq!(status, 200, "{first}");

    proxy.sever();
    let (status, second) = turn(&service, session, "Second turn, Redis failing.").await;
    assert_eq!(status, 200, "MongoDB alone keeps the turn: {second}");
    assert_eq!(second["context_messages"], 2, "{second}");
    proxy.mend();

    // Redis answers again, but its copy lacks the second turn: it must not be the context.
    let (status, third) = turn(&service, session, "Third turn.").await;
    assert_eq!(status, 200, "{third}");
    assert_eq!(
        third["context_messages"], 4,
        "the second turn went missing: {third}"
    );
    // And the copy was rebuilt: the next turn reads it complete.
    let (_, fourth) = turn(&service, session, "Fourth turn.").await;
    assert_eq!(fourth["context_messages"], 6, "{fourth}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delete_while_redis_is_down_never_comes_back_into_a_context() {
    let proxy = SeverableTcpProxy::start(redis_address()).await;
    let rig = rig();
    let service = start(test_config(rig), &proxy.url(), rig.mongodb_url()).await;
    let session = "faults-delete";
    let (status, first) = turn(&service, session, "My password is swordfish.").await;
    assert_eq!(status, 200, "{first}");

    proxy.sever();
    let response = service
        .http
        .delete(service.url(&format!("/v1/sessions/{session}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let deleted: Value = response.json().await.unwrap();
    assert_eq!(deleted["cache_erased"], false, "{deleted}");
    proxy.mend();

    // Redis still holds the deleted turn; the next turn of the same id must not see it.
    let (status, next) = turn(&service, session, "What is my password?").await;
    assert_eq!(status, 200, "{next}");
    assert_eq!(
        next["context_messages"], 0,
        "deleted text came back: {next}"
    );
    let messages = service.all_messages(session).await;
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert!(!Value::Array(messages).to_string().contains("swordfish"));
}
