//! The one program of the mongo stand-in image (`mongo-standin`, linked as `mongod`, `mongosh`,
//! `mongo` and `docker-entrypoint.sh`), so that the StatefulSet the operator writes for the
//! official `mongo` image runs unchanged on FerretDB:
//!
//! - As the entrypoint (`docker-entrypoint.sh mongod [flags]`, or `mongod [flags]`): starts
//!   FerretDB 1.x on SQLite, on loopback at the next port, in `--dbpath` (default `/data/db`).
//!   `MONGO_INITDB_ROOT_USERNAME`/`_PASSWORD`, with which the official image creates its root
//!   user, become FerretDB's setup user of its (experimental) SCRAM authentication, the only one
//!   that accepts the drivers' SCRAM login. It then serves `--port` (default 27017) on every
//!   address and forwards to FerretDB byte for byte but for one field: FerretDB 1.24 answers the
//!   SCRAM server-final message with `done: false` and never completes the round the drivers then
//!   expect ("expected SCRAM authentication to have completed"), so that one reply gets
//!   `done: true`, as MongoDB sends it. It exits with FerretDB, and on SIGTERM.
//! - As `mongosh`/`mongo` (the readiness probe: `mongosh --quiet --eval
//!   "db.adminCommand('ping').ok"`): sends a wire-protocol `ping` to the local server and prints
//!   `1`; any other script is refused.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Where the image has FerretDB (`CHATOP_FERRETDB` overrides it, for tests on the host).
const FERRETDB: &str = "/usr/local/bin/ferretdb";

/// Runs the program as `argv0` (its base name decides the role) with `args`; the exit code.
pub fn main(argv0: &str, args: Vec<String>) -> i32 {
    let role = argv0.rsplit('/').next().unwrap_or(argv0);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{role}: starting the runtime: {e}");
            return 1;
        }
    };
    let result = match role {
        "mongosh" | "mongo" => runtime.block_on(shell(&args)),
        _ => {
            let mongod_args = match args.first().map(String::as_str) {
                Some("mongod") => &args[1..],
                Some(flag) if flag.starts_with('-') => &args[..],
                None => &args[..],
                Some(other) => {
                    eprintln!(
                        "{role}: this mongo stand-in runs only mongod (and mongosh for probes), not {other:?}"
                    );
                    return 2;
                }
            };
            runtime.block_on(mongod(mongod_args))
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{role}: {e:#}");
            1
        }
    }
}

/// The `mongod` flags the stand-in honours; the others have no FerretDB equivalent and are
/// ignored (named on stderr).
#[derive(Debug, PartialEq, Eq)]
pub struct MongodFlags {
    pub port: u16,
    pub dbpath: String,
}

pub fn parse_mongod_flags(args: &[String]) -> Result<MongodFlags> {
    let mut flags = MongodFlags {
        port: 27017,
        dbpath: "/data/db".into(),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (arg.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .with_context(|| format!("mongod {name} needs a value"))
        };
        match name {
            "--port" => {
                let v = value()?;
                flags.port = v
                    .parse()
                    .with_context(|| format!("mongod --port {v:?} is not a port"))?;
            }
            "--dbpath" => flags.dbpath = value()?.trim_end_matches('/').to_string(),
            "--bind_ip" => drop(value()?),
            "--bind_ip_all" => {}
            other => {
                eprintln!("mongod (stand-in): ignoring {other}, which FerretDB has no use for")
            }
        }
    }
    Ok(flags)
}

async fn mongod(args: &[String]) -> Result<i32> {
    let flags = parse_mongod_flags(args)?;
    let upstream = format!("127.0.0.1:{}", flags.port.checked_add(1).unwrap_or(27018));
    let state = format!("{}/.ferretdb", flags.dbpath);
    std::fs::create_dir_all(&state).with_context(|| format!("creating {state}"))?;
    let ferretdb = std::env::var("CHATOP_FERRETDB").unwrap_or_else(|_| FERRETDB.to_string());
    let mut cmd = tokio::process::Command::new(&ferretdb);
    cmd.args([
        "--handler=sqlite".to_string(),
        format!("--sqlite-url=file:{}/", flags.dbpath),
        format!("--listen-addr={upstream}"),
        format!("--state-dir={state}"),
        "--telemetry=disable".into(),
        "--debug-addr=-".into(),
        "--log-level=warn".into(),
    ]);
    if let Ok(user) = std::env::var("MONGO_INITDB_ROOT_USERNAME")
        && !user.is_empty()
    {
        let password = std::env::var("MONGO_INITDB_ROOT_PASSWORD").unwrap_or_default();
        cmd.env("FERRETDB_TEST_ENABLE_NEW_AUTH", "true")
            .env("FERRETDB_SETUP_DATABASE", "admin")
            .env("FERRETDB_SETUP_USERNAME", user)
            .env("FERRETDB_SETUP_PASSWORD", password);
    }
    let mut child = cmd
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {ferretdb}"))?;
    let listen = format!("0.0.0.0:{}", flags.port);
    let listener = TcpListener::bind(&listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    eprintln!("mongod (stand-in): FerretDB on {upstream}, MongoDB clients on {listen}");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        status = child.wait() => {
            let status = status?;
            eprintln!("mongod (stand-in): FerretDB exited ({status})");
            Ok(status.code().unwrap_or(1))
        }
        served = serve(listener, upstream.clone()) => served.map(|()| 0),
        _ = term.recv() => {
            // SQLite keeps every acknowledged write across a killed process.
            child.start_kill()?;
            let _ = child.wait().await;
            Ok(0)
        }
    }
}

async fn serve(listener: TcpListener, upstream: String) -> Result<()> {
    loop {
        let (client, _) = listener.accept().await?;
        let upstream = upstream.clone();
        tokio::spawn(async move {
            if let Err(e) = forward(client, &upstream).await {
                eprintln!("mongod (stand-in): a connection ended: {e}");
            }
        });
    }
}

async fn forward(client: TcpStream, upstream: &str) -> std::io::Result<()> {
    // FerretDB may still be starting when the first client (a probe) comes.
    let mut server = None;
    for _ in 0..50 {
        match TcpStream::connect(upstream).await {
            Ok(s) => {
                server = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let Some(server) = server else {
        return Err(std::io::Error::other(format!(
            "FerretDB does not accept connections on {upstream}"
        )));
    };
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let requests = async {
        tokio::io::copy(&mut client_read, &mut server_write).await?;
        server_write.shutdown().await
    };
    let replies = async {
        loop {
            let mut header = [0u8; 4];
            if server_read.read_exact(&mut header).await.is_err() {
                return client_write.shutdown().await;
            }
            let len = usize::try_from(i32::from_le_bytes(header))
                .unwrap_or(0)
                .max(4);
            let mut message = vec![0u8; len];
            message[..4].copy_from_slice(&header);
            server_read.read_exact(&mut message[4..]).await?;
            complete_scram(&mut message);
            client_write.write_all(&message).await?;
        }
    };
    tokio::try_join!(requests, replies).map(drop)
}

/// Sets `done: true` in a reply whose `payload` is a SCRAM server-final message (`v=...`).
pub fn complete_scram(message: &mut [u8]) {
    const PAYLOAD: &[u8] = b"\x05payload\x00";
    const DONE_FALSE: &[u8] = b"\x08done\x00\x00";
    let Some(at) = find(message, PAYLOAD) else {
        return;
    };
    // A BSON binary: int32 length and a subtype byte, then the data.
    let data = at + PAYLOAD.len() + 5;
    if message.get(data..data + 2) != Some(b"v=".as_slice()) {
        return;
    }
    if let Some(done) = find(message, DONE_FALSE) {
        message[done + DONE_FALSE.len() - 1] = 1;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `mongosh [--quiet] [--port N] --eval SCRIPT`: only a ping script is understood.
async fn shell(args: &[String]) -> Result<i32> {
    let mut port = 27017u16;
    let mut script = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--eval" => script = it.next().cloned(),
            "--port" => {
                let v = it.next().context("--port needs a value")?;
                port = v.parse().with_context(|| format!("{v:?} is not a port"))?;
            }
            _ => {}
        }
    }
    let script = script.unwrap_or_default();
    if !script.contains("ping") {
        bail!(
            "this mongosh stand-in runs only a ping (`--eval \"db.adminCommand('ping').ok\"`), not {script:?}"
        );
    }
    ping(("127.0.0.1", port)).await?;
    println!("1");
    Ok(0)
}

/// One OP_MSG `{ping: 1, $db: "admin"}`; an error unless the reply says `ok: 1.0`.
pub async fn ping(addr: impl tokio::net::ToSocketAddrs) -> Result<()> {
    let mut doc = Vec::new();
    doc.extend([0u8; 4]);
    doc.push(0x10); // int32
    doc.extend(b"ping\0");
    doc.extend(1i32.to_le_bytes());
    doc.push(0x02); // string
    doc.extend(b"$db\0");
    doc.extend(6i32.to_le_bytes());
    doc.extend(b"admin\0");
    doc.push(0);
    let doc_len = i32::try_from(doc.len())?;
    doc[..4].copy_from_slice(&doc_len.to_le_bytes());
    let total = i32::try_from(16 + 4 + 1 + doc.len())?;
    let mut message = Vec::new();
    message.extend(total.to_le_bytes());
    message.extend(1i32.to_le_bytes()); // request id
    message.extend(0i32.to_le_bytes()); // response to
    message.extend(2013i32.to_le_bytes()); // OP_MSG
    message.extend(0u32.to_le_bytes()); // flags
    message.push(0); // section kind 0: the body
    message.extend(doc);
    let mut stream = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr))
        .await
        .context("connecting: timed out")?
        .context("connecting")?;
    stream.write_all(&message).await?;
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).await?;
    let len = usize::try_from(i32::from_le_bytes(header))
        .unwrap_or(0)
        .max(4);
    let mut reply = vec![0u8; len - 4];
    tokio::time::timeout(Duration::from_secs(3), stream.read_exact(&mut reply))
        .await
        .context("waiting for the ping reply: timed out")??;
    let ok = [b"\x01ok\0".as_slice(), &1f64.to_le_bytes()].concat();
    if find(&reply, &ok).is_none() {
        bail!("the server did not answer ping with ok: 1");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_server_final_message_is_completed() {
        let mut last = b"....\x08done\x00\x00\x05payload\x00\x04\x00\x00\x00\x00v=ab".to_vec();
        complete_scram(&mut last);
        assert!(find(&last, b"\x08done\x00\x01").is_some());
        let mut first = b"....\x08done\x00\x00\x05payload\x00\x04\x00\x00\x00\x00r=ab".to_vec();
        complete_scram(&mut first);
        assert!(find(&first, b"\x08done\x00\x00").is_some());
    }

    #[test]
    fn mongod_flags_name_port_and_data_folder() {
        let args: Vec<String> = ["--port=27018", "--dbpath", "/d/", "--bind_ip_all"]
            .map(String::from)
            .into();
        assert_eq!(
            parse_mongod_flags(&args).unwrap(),
            MongodFlags {
                port: 27018,
                dbpath: "/d".into()
            }
        );
        assert!(parse_mongod_flags(&["--port".into(), "x".into()]).is_err());
    }
}
