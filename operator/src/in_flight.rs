//! A cap on the operator's requests in flight to the API server, as a tower layer on its kube
//! client. Watches are long-lived and not counted: they would hold a permit for ever.
//!
//! Why on the client and not only on reconciles: a reconcile of a converged ChatService sends no
//! request at all, while a first one sends a dozen applies; bounding reconciles bounds neither
//! the load on the API server nor the responses held in memory, and kube-runtime picks among
//! waiting reconciles in no fixed order, so a tight reconcile bound can starve some objects
//! (docs/BENCHMARKS.md, "the stall"). Bounding requests lets cheap reconciles run while a burst
//! of applies queues here, first come first served (tokio's semaphore is fair).

use std::sync::Arc;
use std::task::{Context, Poll, ready};

use futures::future::BoxFuture;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

/// Default of `--max-requests-in-flight`.
pub const DEFAULT_MAX_REQUESTS_IN_FLIGHT: usize = 32;

/// Whether `request` is a watch (which does not count against the cap).
pub fn is_watch<B>(request: &http::Request<B>) -> bool {
    request
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"))
}

/// At most `permits` requests (watches excepted) in flight at once; 0 is no cap.
#[derive(Clone)]
pub struct LimitInFlightLayer {
    permits: Option<Arc<Semaphore>>,
}

impl LimitInFlightLayer {
    pub fn new(permits: usize) -> Self {
        Self {
            permits: (permits > 0).then(|| Arc::new(Semaphore::new(permits))),
        }
    }
}

impl<S> Layer<S> for LimitInFlightLayer {
    type Service = LimitInFlight<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LimitInFlight {
            inner,
            permits: self.permits.clone(),
            acquiring: None,
            permit: None,
        }
    }
}

/// The service of [`LimitInFlightLayer`]. A permit is taken when the service is polled ready
/// (the request is not known then) and given back when the response arrives, or at once for a
/// watch.
pub struct LimitInFlight<S> {
    inner: S,
    permits: Option<Arc<Semaphore>>,
    acquiring: Option<BoxFuture<'static, Option<OwnedSemaphorePermit>>>,
    permit: Option<OwnedSemaphorePermit>,
}

impl<S, B> Service<http::Request<B>> for LimitInFlight<S>
where
    S: Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if let Some(permits) = &self.permits
            && self.permit.is_none()
        {
            let acquiring = self.acquiring.get_or_insert_with(|| {
                let permits = permits.clone();
                // The semaphore is never closed; without a permit a request is only uncapped.
                Box::pin(async move { permits.acquire_owned().await.ok() })
            });
            let permit = ready!(acquiring.as_mut().poll(cx));
            self.acquiring = None;
            self.permit = permit;
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let permit = self.permit.take().filter(|_| !is_watch(&request));
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            drop(permit);
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tower::ServiceExt;

    use super::*;

    #[test]
    fn watches_are_told_apart() {
        let watch = http::Request::get("/api/v1/pods?watch=true&resourceVersion=1")
            .body(())
            .unwrap();
        let list = http::Request::get("/api/v1/pods?limit=100")
            .body(())
            .unwrap();
        assert!(is_watch(&watch));
        assert!(!is_watch(&list));
    }

    #[tokio::test]
    async fn no_more_than_the_cap_are_in_flight_and_watches_do_not_count() {
        let now = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (n, m) = (now.clone(), most.clone());
        let slow = tower::service_fn(move |request: http::Request<()>| {
            let (n, m) = (n.clone(), m.clone());
            async move {
                if !is_watch(&request) {
                    let in_flight = n.fetch_add(1, Ordering::SeqCst) + 1;
                    m.fetch_max(in_flight, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    n.fetch_sub(1, Ordering::SeqCst);
                } else {
                    // A watch that never ends while the test runs.
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
                Ok::<_, std::convert::Infallible>(())
            }
        });
        let mut service = LimitInFlightLayer::new(3).layer(slow);
        let mut responses = Vec::new();
        // Two watches first: they must not keep their permits (they would take two of three).
        for i in 0..14 {
            let uri = if i < 2 { "/x?watch=true" } else { "/x" };
            let request = http::Request::get(uri).body(()).unwrap();
            let ready = tokio::time::timeout(Duration::from_secs(10), service.ready())
                .await
                .expect("a permit frees up")
                .unwrap();
            let response = tokio::spawn(ready.call(request));
            if i >= 2 {
                responses.push(response);
            }
        }
        for response in responses {
            response.await.unwrap().unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 3);
    }
}
