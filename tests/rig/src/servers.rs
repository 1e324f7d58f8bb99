//! The rig's servers, each started on a free 127.0.0.1 port and waited for until healthy.
//!
//! A start that fails names the server and its log file, shows the log's last lines, and stops
//! the process it started, so nothing is left half-running.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::paths;
use crate::process::ManagedProcess;
use crate::tls::StoreCa;

/// A free TCP port on 127.0.0.1 (bound and released; the caller binds it right after).
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a free port on 127.0.0.1")?;
    Ok(listener.local_addr()?.port())
}

/// The last `lines` lines of a log file, for error messages that stand on their own in CI output.
pub fn log_tail(log: &Path, lines: usize) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Polls `check` until it succeeds, the process exits, or `timeout` passes; on failure stops the
/// process and returns an error naming the step and its log.
pub fn wait_healthy(
    process: &mut ManagedProcess,
    timeout: Duration,
    mut check: impl FnMut() -> Result<()>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last_err = anyhow!("no health check ran");
    loop {
        if let Err(exited) = process.check_running() {
            last_err = exited;
            break;
        }
        match check() {
            Ok(()) => return Ok(()),
            Err(e) => last_err = e,
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    let name = process.name().to_string();
    let log = process.log().to_path_buf();
    process.stop();
    bail!(
        "rig step '{name}' failed: not healthy within {} s ({last_err:#}); read {}; its last lines:\n{}",
        timeout.as_secs(),
        log.display(),
        log_tail(&log, 20)
    )
}

fn tcp_exchange(port: u16, request: &[u8]) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse()?,
        Duration::from_millis(500),
    )?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(request)?;
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A plain-HTTP GET on 127.0.0.1, enough for health endpoints without pulling in a client.
pub fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    http_request(port, "GET", path, "", 5)
}

/// A plain HTTP/1.0 request on 127.0.0.1 with a JSON body; returns status and body.
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    body: &str,
    timeout_secs: u64,
) -> Result<(u16, String)> {
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse()?,
        Duration::from_millis(500),
    )?;
    stream.set_read_timeout(Some(Duration::from_secs(timeout_secs)))?;
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("not an HTTP response: {response:.80}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

fn expect_ok(port: u16, path: &str) -> Result<String> {
    let (status, body) = http_get(port, path)?;
    if status != 200 {
        bail!("GET {path} answered {status}: {body:.200}");
    }
    Ok(body)
}

/// redis-server on a free port, no persistence; `password` turns on AUTH; with a [`StoreCa`] it
/// listens for TLS only (like ElastiCache with in-transit encryption).
pub struct RedisServer {
    process: ManagedProcess,
    port: u16,
    password: Option<String>,
    tls: Option<StoreCa>,
    dir: PathBuf,
}

impl RedisServer {
    /// A private instance in a fresh scratch folder, e.g. for a test that stops it.
    pub fn start() -> Result<Self> {
        Self::start_in(&crate::scratch_dir("redis")?)
    }

    pub fn start_in(dir: &Path) -> Result<Self> {
        Self::start_with(dir, free_port()?, None)
    }

    pub fn start_with(dir: &Path, port: u16, password: Option<&str>) -> Result<Self> {
        Self::start_full(dir, port, password, None)
    }

    /// TLS on a free port (no clear-text port), the serving pair of `ca`, AUTH with `password`.
    pub fn start_tls(dir: &Path, password: &str, ca: &StoreCa) -> Result<Self> {
        Self::start_full(dir, free_port()?, Some(password), Some(ca.clone()))
    }

    fn start_full(
        dir: &Path,
        port: u16,
        password: Option<&str>,
        tls: Option<StoreCa>,
    ) -> Result<Self> {
        fs::create_dir_all(dir)?;
        let mut server = Self {
            process: Self::spawn(dir, port, password, tls.as_ref())?,
            port,
            password: password.map(str::to_string),
            tls,
            dir: dir.to_path_buf(),
        };
        server.wait()?;
        Ok(server)
    }

    fn spawn(
        dir: &Path,
        port: u16,
        password: Option<&str>,
        tls: Option<&StoreCa>,
    ) -> Result<ManagedProcess> {
        let mut cmd = Command::new(paths::redis_server()?);
        cmd.args(["--bind", "127.0.0.1"]);
        match tls {
            None => {
                cmd.args(["--port", &port.to_string()]);
            }
            Some(ca) => {
                cmd.args(["--port", "0", "--tls-port", &port.to_string()])
                    .arg("--tls-cert-file")
                    .arg(&ca.server_cert)
                    .arg("--tls-key-file")
                    .arg(&ca.server_key)
                    .arg("--tls-ca-cert-file")
                    .arg(&ca.ca_file)
                    // Server verification is the point; client certificates are not used by
                    // ElastiCache either.
                    .args(["--tls-auth-clients", "no"]);
            }
        }
        cmd.args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--dir", &dir.display().to_string()]);
        if let Some(pw) = password {
            cmd.args(["--requirepass", pw]);
        }
        ManagedProcess::spawn("redis-server", cmd, &dir.join("redis.log"))
    }

    fn wait(&mut self) -> Result<()> {
        if let Some(ca) = self.tls.clone() {
            return self.wait_tls(&ca);
        }
        let port = self.port;
        let auth = self
            .password
            .as_ref()
            .map(|pw| format!("AUTH {pw}\r\n"))
            .unwrap_or_default();
        wait_healthy(&mut self.process, Duration::from_secs(20), || {
            let reply = tcp_exchange(port, format!("{auth}PING\r\n").as_bytes())?;
            if reply.contains("+PONG") || (reply.starts_with("+OK") && !auth.is_empty()) {
                Ok(())
            } else {
                bail!("PING answered {reply:?}")
            }
        })
    }

    /// PING through redis-cli over TLS, verifying the server against `ca` as clients will.
    fn wait_tls(&mut self, ca: &StoreCa) -> Result<()> {
        let port = self.port.to_string();
        let password = self.password.clone().unwrap_or_default();
        wait_healthy(&mut self.process, Duration::from_secs(20), || {
            let out = Command::new("redis-cli")
                .args(["--tls", "--cacert"])
                .arg(&ca.ca_file)
                .args(["-h", "127.0.0.1", "-p", &port, "--no-auth-warning"])
                .args(["-a", &password, "PING"])
                .output()
                .context("running redis-cli (Debian package redis-tools)")?;
            let reply = String::from_utf8_lossy(&out.stdout);
            if reply.contains("PONG") {
                Ok(())
            } else {
                bail!(
                    "redis-cli PING over TLS answered {reply:?} {:?}",
                    String::from_utf8_lossy(&out.stderr)
                )
            }
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://` or, with TLS, `rediss://`, with the password when there is one.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        match &self.password {
            Some(pw) => format!("{scheme}://:{pw}@127.0.0.1:{}/", self.port),
            None => format!("{scheme}://127.0.0.1:{}/", self.port),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Stops the server (the port stays reserved for `start_again`).
    pub fn stop(&mut self) {
        self.process.stop();
    }

    /// Starts it again on the same port.
    pub fn start_again(&mut self) -> Result<()> {
        self.process = Self::spawn(
            &self.dir,
            self.port,
            self.password.as_deref(),
            self.tls.as_ref(),
        )?;
        self.wait()
    }
}

/// FerretDB (MongoDB wire protocol) on SQLite files in its own folder; with [`FerretTls`] it
/// listens for TLS only, and clients log in with a user and password (PLAIN).
///
/// Limitation, measured with FerretDB 1.24.2: its SCRAM (`--test-enable-new-auth`) answers the
/// final step with `done: false` whatever `skipEmptyExchange` says, which the Rust driver refuses
/// ("expected SCRAM authentication to have completed"); and on SQLite, PLAIN credentials are
/// carried but not checked. So the TLS listener is verified for real here, the password is not.
pub struct FerretDb {
    process: ManagedProcess,
    port: u16,
    tls: Option<FerretTls>,
    dir: PathBuf,
}

/// The TLS listener's certificates and the user clients log in as.
#[derive(Debug, Clone)]
pub struct FerretTls {
    pub ca: StoreCa,
    pub database: String,
    pub username: String,
    pub password: String,
}

impl FerretDb {
    /// A private instance in a fresh scratch folder, e.g. for a test that stops it.
    pub fn start() -> Result<Self> {
        Self::start_in(&crate::scratch_dir("ferretdb")?)
    }

    pub fn start_in(dir: &Path) -> Result<Self> {
        Self::start_full(dir, None)
    }

    /// TLS only, on a free port; clients use `tls.database` as `tls.username`.
    pub fn start_tls(dir: &Path, tls: FerretTls) -> Result<Self> {
        Self::start_full(dir, Some(tls))
    }

    fn start_full(dir: &Path, tls: Option<FerretTls>) -> Result<Self> {
        let port = free_port()?;
        let mut server = Self {
            process: Self::spawn(dir, port, tls.as_ref())?,
            port,
            tls,
            dir: dir.to_path_buf(),
        };
        server.wait()?;
        Ok(server)
    }

    fn spawn(dir: &Path, port: u16, tls: Option<&FerretTls>) -> Result<ManagedProcess> {
        let data = dir.join("data");
        let state = dir.join("state");
        fs::create_dir_all(&data)?;
        fs::create_dir_all(&state)?;
        let mut cmd = Command::new(paths::cached_bin("ferretdb")?);
        cmd.arg("--handler=sqlite")
            .arg(format!("--sqlite-url=file:{}/", data.display()))
            .arg(format!("--state-dir={}", state.display()))
            .arg("--telemetry=disable")
            .arg("--debug-addr=-")
            .arg("--log-level=warn");
        match tls {
            None => {
                cmd.arg(format!("--listen-addr=127.0.0.1:{port}"));
            }
            Some(tls) => {
                cmd.arg("--listen-addr=")
                    .arg(format!("--listen-tls=127.0.0.1:{port}"))
                    .arg(format!(
                        "--listen-tls-cert-file={}",
                        tls.ca.server_cert.display()
                    ))
                    .arg(format!(
                        "--listen-tls-key-file={}",
                        tls.ca.server_key.display()
                    ));
            }
        }
        ManagedProcess::spawn("ferretdb", cmd, &dir.join("ferretdb.log"))
    }

    fn wait(&mut self) -> Result<()> {
        let port = self.port;
        wait_healthy(&mut self.process, Duration::from_secs(30), || {
            TcpStream::connect_timeout(
                &format!("127.0.0.1:{port}").parse()?,
                Duration::from_millis(500),
            )?;
            Ok(())
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// With TLS: the user's credentials (PLAIN, see [`FerretDb`]) and `tls=true`, without a CA
    /// (the client names its CA file separately, as chat-service's `history.mongodb.tls.caFile`
    /// does).
    pub fn url(&self) -> String {
        match &self.tls {
            None => format!("mongodb://127.0.0.1:{}/", self.port),
            Some(tls) => format!(
                "mongodb://{}:{}@127.0.0.1:{}/{}?tls=true&authMechanism=PLAIN&authSource=%24external",
                tls.username, tls.password, self.port, tls.database
            ),
        }
    }

    pub fn stop(&mut self) {
        self.process.stop();
    }

    /// Starts it again on the same port and data.
    pub fn start_again(&mut self) -> Result<()> {
        self.process = Self::spawn(&self.dir, self.port, self.tls.as_ref())?;
        self.wait()
    }
}

/// `ollama serve` on a free port, sharing the installer's model store (read-mostly).
pub struct OllamaServer {
    process: ManagedProcess,
    port: u16,
    dir: PathBuf,
}

impl OllamaServer {
    /// A private instance in a fresh scratch folder, e.g. a second back end a test can stop.
    pub fn start() -> Result<Self> {
        Self::start_in(&crate::scratch_dir("ollama")?)
    }

    pub fn start_in(dir: &Path) -> Result<Self> {
        let port = free_port()?;
        let mut server = Self {
            process: Self::spawn(dir, port)?,
            port,
            dir: dir.to_path_buf(),
        };
        server.wait()?;
        Ok(server)
    }

    fn spawn(dir: &Path, port: u16) -> Result<ManagedProcess> {
        fs::create_dir_all(dir.join("home"))?;
        let models = paths::ollama_models()?;
        let mut cmd = Command::new(paths::cached_bin("ollama")?);
        cmd.arg("serve")
            .env("OLLAMA_HOST", format!("127.0.0.1:{port}"))
            .env("OLLAMA_MODELS", &models)
            // Several instances share one model store: none may prune the others' blobs.
            .env("OLLAMA_NOPRUNE", "1")
            .env("OLLAMA_KEEP_ALIVE", "-1")
            .env("OLLAMA_NUM_PARALLEL", "4")
            .env("HOME", dir.join("home"));
        ManagedProcess::spawn("ollama", cmd, &dir.join("ollama.log"))
    }

    fn wait(&mut self) -> Result<()> {
        let port = self.port;
        wait_healthy(&mut self.process, Duration::from_secs(60), || {
            expect_ok(port, "/api/version").map(|_| ())
        })
    }

    /// Loads `model` into memory so the first test request does not pay for it.
    pub fn load_model(&mut self, model: &str) -> Result<()> {
        let body = serde_json::json!({"model": model, "prompt": "", "keep_alive": -1}).to_string();
        let (status, reply) = http_request(self.port, "POST", "/api/generate", &body, 120)
            .with_context(|| format!("loading model {model} into ollama"))?;
        if status != 200 {
            bail!(
                "rig step 'ollama model load' failed: POST /api/generate answered {status}: {reply:.300}; read {}",
                self.process.log().display()
            );
        }
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    pub fn stop(&mut self) {
        self.process.stop();
    }

    pub fn start_again(&mut self) -> Result<()> {
        self.process = Self::spawn(&self.dir, self.port)?;
        self.wait()
    }
}

/// etcd with its data in a throw-away folder (fsync off: the rig's data need not survive a crash).
pub struct Etcd {
    _process: ManagedProcess,
    pub client_url: String,
}

impl Etcd {
    pub fn start(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir)?;
        let client = free_port()?;
        let peer = free_port()?;
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut cmd = Command::new(paths::cached_bin("etcd")?);
        cmd.arg(format!("--data-dir={}", dir.join("data").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=default={peer_url}"))
            .arg("--unsafe-no-fsync")
            .arg("--log-level=warn");
        let mut process = ManagedProcess::spawn("etcd", cmd, &dir.join("etcd.log"))?;
        wait_healthy(&mut process, Duration::from_secs(30), || {
            let body = expect_ok(client, "/health")?;
            if body.contains("\"true\"") {
                Ok(())
            } else {
                bail!("etcd /health: {body}")
            }
        })?;
        Ok(Self {
            _process: process,
            client_url,
        })
    }
}
