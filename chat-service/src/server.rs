//! The listener and its connections: how many clients may be connected at once and how long a
//! client may take before it sends a request. `axum::serve` has no such bounds: a client that
//! trickled its headers one line a second kept its connection (and a task) for as long as it
//! liked.
//!
//! - At most `limits.maxConnections` connections are open (upgraded WebSockets included); the
//!   accept loop waits for one to close, so further clients queue in the kernel's accept backlog
//!   instead of being accepted and starved.
//! - A request's headers must be complete within `limits.headerReadTimeoutMs` of its first byte.
//! - A keep-alive connection without a request in flight closes after `limits.idleTimeoutMs`.
//! - The body deadline and the admission permit are the admission middleware's: the body is read
//!   first, under `limits.bodyReadTimeoutMs`, and only then a permit is taken.
//!
//! - A response sent before its request's body was read to the end (a 413, a 404 for a POST)
//!   says `Connection: close`: hyper closes such a connection rather than drain an unknown amount
//!   of body, and a client that took the response as keep-alive would write its next request
//!   into a closed socket (a broken pipe instead of an answer).
//!
//! On shutdown the listening socket is closed (new connections are refused, not queued), idle
//! connections close, and the others finish their requests in flight.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::config::LimitsConfig;

/// The connection bounds of [`serve`], from `limits`.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
}

impl From<&LimitsConfig> for ConnectionLimits {
    fn from(limits: &LimitsConfig) -> Self {
        Self {
            max_connections: limits.max_connections,
            header_read_timeout: Duration::from_millis(limits.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(limits.idle_timeout_ms),
        }
    }
}

/// Serves `app` on `listener` until `shutdown` is cancelled and every connection has finished.
/// Requests carry `ConnectInfo<SocketAddr>` (the peer) for `rateLimit.keyBy: clientIp`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and the like: wait instead of spinning on the error.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY on a connection");
        }
        connections.spawn(serve_connection(
            stream,
            peer,
            slot,
            app.clone(),
            limits,
            shutdown.clone(),
        ));
    }
    // Refuse new connections from now on rather than leave them in the backlog.
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Where a connection is between requests, for its deadlines.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// No request in flight and no byte of the next one since this instant.
    Idle(Instant),
    /// The first byte of a request arrived at this instant; its headers are not complete.
    ReadingHead(Instant),
    /// At least one request is being handled.
    Busy,
}

/// Shared between a connection's socket, its service and its watchdog.
struct Activity {
    phase: Mutex<Phase>,
    in_flight: AtomicUsize,
    changed: Notify,
}

impl Activity {
    fn set(&self, phase: Phase) {
        *self.phase.lock().expect("phase lock") = phase;
        self.changed.notify_one();
    }

    fn bytes_arrived(&self) {
        let mut phase = self.phase.lock().expect("phase lock");
        if let Phase::Idle(_) = *phase {
            *phase = Phase::ReadingHead(Instant::now());
            drop(phase);
            self.changed.notify_one();
        }
    }

    fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.set(Phase::Busy);
    }

    fn request_finished(&self) {
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.set(Phase::Idle(Instant::now()));
        }
    }

    /// When the connection is cut if nothing changes, and why.
    fn deadline(&self, limits: &ConnectionLimits) -> Option<(Instant, &'static str)> {
        match *self.phase.lock().expect("phase lock") {
            Phase::Idle(since) => Some((since + limits.idle_timeout, "idle")),
            Phase::ReadingHead(since) => {
                Some((since + limits.header_read_timeout, "headers too slow"))
            }
            Phase::Busy => None,
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    slot: OwnedSemaphorePermit,
    app: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) {
    let activity = Arc::new(Activity {
        phase: Mutex::new(Phase::Idle(Instant::now())),
        in_flight: AtomicUsize::new(0),
        changed: Notify::new(),
    });
    let io = TokioIo::new(WatchedStream {
        stream,
        activity: activity.clone(),
        _slot: slot,
    });
    let service_activity = activity.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let activity = service_activity.clone();
        activity.request_started();
        let body_read = Arc::new(AtomicBool::new(false));
        let watched = body_read.clone();
        let mut request = request.map(|body| {
            watched.store(http_body::Body::is_end_stream(&body), Ordering::Relaxed);
            Body::new(WatchedBody {
                body,
                read: watched,
            })
        });
        request.extensions_mut().insert(ConnectInfo(peer));
        let app = app.clone();
        async move {
            let mut response = app.oneshot(request).await.unwrap_or_else(|e| match e {});
            if !body_read.load(Ordering::Relaxed)
                && response.status() != hyper::StatusCode::SWITCHING_PROTOCOLS
            {
                response.headers_mut().insert(
                    hyper::header::CONNECTION,
                    hyper::header::HeaderValue::from_static("close"),
                );
            }
            let finished = RequestFinished(activity);
            Ok::<_, std::convert::Infallible>(response.map(|body| {
                Body::new(TrackedBody {
                    body,
                    _finished: finished,
                })
            }))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // hyper's own header timeout also runs while a keep-alive connection waits for its next
    // request, which would make the idle timeout no longer than it; the watchdog below keeps
    // the two apart.
    builder.timer(TokioTimer::new()).header_read_timeout(None);
    let connection = builder.serve_connection(io, service).with_upgrades();
    tokio::pin!(connection);
    let mut draining = false;
    loop {
        let deadline = activity.deadline(&limits);
        let sleep = async {
            match deadline {
                Some((at, _)) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "connection ended with an error");
                }
                return;
            }
            _ = activity.changed.notified() => {}
            _ = sleep => {
                // Still the same deadline: nothing arrived in time.
                if let (Some((at, why)), Some((now_at, _))) = (deadline, activity.deadline(&limits))
                    && at == now_at
                {
                    tracing::info!(%peer, reason = why, "closing a slow or idle connection");
                    return;
                }
            }
            _ = shutdown.cancelled(), if !draining => {
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

/// The client socket, noting when bytes arrive; it holds the connection's slot, so an upgraded
/// WebSocket counts against `maxConnections` until it closes.
struct WatchedStream {
    stream: TcpStream,
    activity: Arc<Activity>,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for WatchedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.bytes_arrived();
        }
        polled
    }
}

impl AsyncWrite for WatchedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Marks the request finished when its response body is done or dropped.
struct RequestFinished(Arc<Activity>);

impl Drop for RequestFinished {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

/// A response body that counts as in flight until it is sent; passes the size hint on.
struct TrackedBody {
    body: Body,
    _finished: RequestFinished,
}

impl http_body::Body for TrackedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A request body that records when it has been read to the end.
struct WatchedBody {
    body: Incoming,
    read: Arc<AtomicBool>,
}

impl http_body::Body for WatchedBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, hyper::Error>>> {
        let frame = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(frame, Poll::Ready(None)) || self.body.is_end_stream() {
            self.read.store(true, Ordering::Relaxed);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
