//! The mongo image's stand-in is FerretDB 1.24 with its (experimental) SCRAM authentication, so
//! that the credentials the operator writes into MONGODB_URI work unchanged. One gap remains:
//! after a successful SCRAM proof, FerretDB answers the final `saslContinue` with `done: false`
//! and never completes the extra no-op round that follows, which the Rust driver rejects
//! ("expected SCRAM authentication to have completed"). This front, run inside the pod as the
//! container's main process (`rig mongo-front LISTEN UPSTREAM`), forwards the wire protocol
//! unchanged except for that one answer: a server reply carrying the SCRAM server-final message
//! (`v=...`) gets `done: true`, as MongoDB sends it. Everything else is byte-for-byte.

use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Serves `listen`, forwarding to `upstream`, until the process is stopped.
pub async fn run(listen: &str, upstream: &str) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("mongo-front: listening on {listen}"))?;
    loop {
        let (client, _) = listener.accept().await?;
        let upstream = upstream.to_string();
        tokio::spawn(async move {
            let server = match TcpStream::connect(&upstream).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("mongo-front: {upstream}: {e}");
                    return;
                }
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let up = async { tokio::io::copy(&mut cr, &mut sw).await.map(|_| ()) };
            let down = async {
                loop {
                    let mut header = [0u8; 4];
                    sr.read_exact(&mut header).await?;
                    let len = i32::from_le_bytes(header).max(4) as usize;
                    let mut msg = vec![0u8; len];
                    msg[..4].copy_from_slice(&header);
                    sr.read_exact(&mut msg[4..]).await?;
                    complete_scram(&mut msg);
                    cw.write_all(&msg).await?;
                }
                #[allow(unreachable_code)]
                std::io::Result::Ok(())
            };
            tokio::select! {
                _ = up => {},
                _ = down => {},
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        });
    }
}

/// Sets `done: true` in a reply whose `payload` is a SCRAM server-final message (`v=`).
fn complete_scram(msg: &mut [u8]) {
    const PAYLOAD: &[u8] = b"\x05payload\x00";
    const DONE_FALSE: &[u8] = b"\x08done\x00\x00";
    let Some(p) = find(msg, PAYLOAD) else {
        return;
    };
    // Element name, then int32 length and a subtype byte, then the data.
    let data = p + PAYLOAD.len() + 5;
    if msg.get(data..data + 2) != Some(b"v=".as_slice()) {
        return;
    }
    if let Some(d) = find(msg, DONE_FALSE) {
        msg[d + DONE_FALSE.len() - 1] = 1;
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_server_final_message_is_completed() {
        let mut reply = b"....\x08done\x00\x00\x05payload\x00\x04\x00\x00\x00\x00v=ab".to_vec();
        complete_scram(&mut reply);
        assert!(find(&reply, b"\x08done\x00\x01").is_some());
        let mut first = b"....\x08done\x00\x00\x05payload\x00\x04\x00\x00\x00\x00r=ab".to_vec();
        complete_scram(&mut first);
        assert!(find(&first, b"\x08done\x00\x00").is_some());
    }
}
