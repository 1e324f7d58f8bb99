//! Named test fixture, a stand-in for one server feature only: `TtlProxy` relays the MongoDB
//! wire protocol between the service and the rig's real FerretDB, and plays a server that has
//! TTL indexes, which FerretDB on SQLite lacks (it answers `NotImplemented`). No MongoDB or
//! DocumentDB server can be installed on the machines the tests run on.
//!
//! It takes `expireAfterSeconds` out of each `createIndexes` it relays (so FerretDB makes the
//! index without it), records it, and puts it back into the `listIndexes` answers for those
//! indexes. Everything else (the documents, the queries, the other indexes) is FerretDB's own.
//! It deletes nothing: tests check the `expire_at` fields a TTL monitor would go by.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use mongodb::bson::{Bson, Document};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const OP_MSG: i32 = 2013;
const CHECKSUM_PRESENT: u32 = 1;

/// A TTL index as the service asked for it.
#[derive(Debug, Clone, PartialEq)]
pub struct TtlIndex {
    pub collection: String,
    pub name: String,
    pub key: Document,
    pub expire_after_seconds: i64,
}

#[derive(Default)]
struct Recorded {
    ttl_indexes: Vec<TtlIndex>,
}

pub struct TtlProxy {
    /// `mongodb://` URL of the proxy.
    pub url: String,
    recorded: Arc<Mutex<Recorded>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TtlProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TtlProxy {
    /// Relays to the server of `mongodb_url` (`mongodb://host:port/...`, no TLS).
    pub async fn start(mongodb_url: &str) -> Self {
        let upstream = mongodb_url
            .trim_start_matches("mongodb://")
            .split(['/', '?'])
            .next()
            .expect("a host in the MongoDB URL")
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("mongodb://{}/", listener.local_addr().unwrap());
        let recorded = Arc::new(Mutex::new(Recorded::default()));
        let shared = recorded.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let recorded = shared.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(&upstream).await {
                        relay(client, server, recorded).await;
                    }
                });
            }
        });
        Self {
            url,
            recorded,
            task,
        }
    }

    /// The TTL indexes the service asked for, in order.
    pub fn ttl_indexes(&self) -> Vec<TtlIndex> {
        self.recorded.lock().unwrap().ttl_indexes.clone()
    }
}

async fn relay(client: TcpStream, server: TcpStream, recorded: Arc<Mutex<Recorded>>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    // Request ids of the `listIndexes` commands in flight on this connection, with their
    // collections.
    let pending: Arc<Mutex<HashMap<i32, String>>> = Arc::default();
    let requests = {
        let (recorded, pending) = (recorded.clone(), pending.clone());
        async move {
            while let Some(mut message) = read_message(&mut client_read).await {
                if let Some((request_id, mut body)) = command(&message)
                    && rewrite_request(&mut body, &recorded, &pending, request_id)
                {
                    message = with_body(&message, &body);
                }
                if server_write.write_all(&message).await.is_err() {
                    return;
                }
            }
        }
    };
    let replies = async move {
        while let Some(mut message) = read_message(&mut server_read).await {
            let response_to = i32::from_le_bytes(message[8..12].try_into().unwrap());
            let collection = pending.lock().unwrap().remove(&response_to);
            if let Some(collection) = collection
                && let Some((_, mut body)) = command(&message)
            {
                add_ttl_options(&mut body, &collection, &recorded);
                message = with_body(&message, &body);
            }
            if client_write.write_all(&message).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(requests, replies);
}

async fn read_message(stream: &mut (impl AsyncRead + Unpin)) -> Option<Vec<u8>> {
    let mut length = [0u8; 4];
    stream.read_exact(&mut length).await.ok()?;
    let length = usize::try_from(i32::from_le_bytes(length)).ok()?;
    let mut message = vec![0u8; length.max(4)];
    message[..4].copy_from_slice(&(length as i32).to_le_bytes());
    stream.read_exact(&mut message[4..]).await.ok()?;
    Some(message)
}

/// The request id and the body (section 0) of an OP_MSG; `None` for anything else.
fn command(message: &[u8]) -> Option<(i32, Document)> {
    if message.len() < 21 || i32::from_le_bytes(message[12..16].try_into().unwrap()) != OP_MSG {
        return None;
    }
    let request_id = i32::from_le_bytes(message[4..8].try_into().unwrap());
    let (offset, _) = body_section(message)?;
    let body = Document::from_reader(&mut &message[offset..]).ok()?;
    Some((request_id, body))
}

/// Where the body section's document starts, and its length.
fn body_section(message: &[u8]) -> Option<(usize, usize)> {
    let mut at = 20;
    while at < message.len() {
        let kind = message[at];
        let size = i32::from_le_bytes(message.get(at + 1..at + 5)?.try_into().ok()?) as usize;
        if kind == 0 {
            return Some((at + 1, size));
        }
        at += 1 + size;
    }
    None
}

/// The message with its body section replaced by `body` (and no checksum, which it would no
/// longer match).
fn with_body(message: &[u8], body: &Document) -> Vec<u8> {
    let (offset, size) = body_section(message).expect("a body section");
    let flags = u32::from_le_bytes(message[16..20].try_into().unwrap());
    let end = if flags & CHECKSUM_PRESENT != 0 {
        message.len() - 4
    } else {
        message.len()
    };
    let mut encoded = Vec::new();
    body.to_writer(&mut encoded).unwrap();
    let mut out = Vec::with_capacity(message.len() + encoded.len());
    out.extend_from_slice(&message[..16]);
    out.extend_from_slice(&(flags & !CHECKSUM_PRESENT).to_le_bytes());
    out.extend_from_slice(&message[20..offset]);
    out.extend_from_slice(&encoded);
    out.extend_from_slice(&message[offset + size..end]);
    let length = out.len() as i32;
    out[..4].copy_from_slice(&length.to_le_bytes());
    out
}

/// Takes `expireAfterSeconds` out of a `createIndexes`, recording it, and notes a
/// `listIndexes`; true when `body` changed.
fn rewrite_request(
    body: &mut Document,
    recorded: &Mutex<Recorded>,
    pending: &Mutex<HashMap<i32, String>>,
    request_id: i32,
) -> bool {
    if let Ok(collection) = body.get_str("listIndexes") {
        pending
            .lock()
            .unwrap()
            .insert(request_id, collection.to_string());
        return false;
    }
    let Ok(collection) = body.get_str("createIndexes").map(str::to_string) else {
        return false;
    };
    let Ok(indexes) = body.get_array_mut("indexes") else {
        return false;
    };
    let mut changed = false;
    for index in indexes.iter_mut() {
        let Bson::Document(index) = index else {
            continue;
        };
        let Some(expire) = index.remove("expireAfterSeconds") else {
            continue;
        };
        changed = true;
        let expire_after_seconds = match expire {
            Bson::Int32(n) => i64::from(n),
            Bson::Int64(n) => n,
            Bson::Double(n) => n as i64,
            other => panic!("expireAfterSeconds is not a number: {other:?}"),
        };
        let mut recorded = recorded.lock().unwrap();
        let ttl = TtlIndex {
            collection: collection.clone(),
            name: index.get_str("name").unwrap_or_default().to_string(),
            key: index.get_document("key").cloned().unwrap_or_default(),
            expire_after_seconds,
        };
        if !recorded.ttl_indexes.contains(&ttl) {
            recorded.ttl_indexes.push(ttl);
        }
    }
    changed
}

/// Puts the recorded `expireAfterSeconds` back into a `listIndexes` answer.
fn add_ttl_options(body: &mut Document, collection: &str, recorded: &Mutex<Recorded>) {
    let recorded = recorded.lock().unwrap();
    let Ok(batch) = body
        .get_document_mut("cursor")
        .and_then(|cursor| cursor.get_array_mut("firstBatch"))
    else {
        return;
    };
    for index in batch.iter_mut() {
        let Bson::Document(index) = index else {
            continue;
        };
        let name = index.get_str("name").unwrap_or_default();
        if let Some(ttl) = recorded
            .ttl_indexes
            .iter()
            .find(|ttl| ttl.collection == collection && ttl.name == name)
        {
            index.insert("expireAfterSeconds", ttl.expire_after_seconds);
        }
    }
}
