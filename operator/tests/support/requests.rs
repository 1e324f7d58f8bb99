//! The requests an operator's own client sends, recorded by a tower layer on that client, so a
//! test can prove a converged reconcile sends none.

use std::sync::{Arc, Mutex};

use kube::Client;

use super::{Env, Operator, operator_kube_config};

/// Runs the operator on a client that records every request it sends.
pub async fn start_counted(env: &Env) -> (Operator, Requests) {
    let requests = Requests::default();
    let client = requests.client(env).await;
    (Operator::start_client(env, client, None), requests)
}

/// Requests an operator's client sent, as "METHOD path?query", recorded by a tower layer on
/// the client itself (no mock: the requests go on to the real API server).
#[derive(Clone, Default)]
pub struct Requests(Arc<Mutex<Vec<String>>>);

impl Requests {
    /// A client like `env.operator_client` (same identity) that records into `self`.
    pub async fn client(&self, env: &Env) -> Client {
        self.client_for(operator_kube_config(&env.ns).await)
    }

    /// A client of `config` that records into `self`.
    pub fn client_for(&self, config: kube::Config) -> Client {
        let log = self.0.clone();
        let record =
            tower::util::MapRequestLayer::new(move |request: http::Request<kube::client::Body>| {
                let uri = request.uri();
                log.lock().unwrap().push(format!(
                    "{} {}?{}",
                    request.method(),
                    uri.path(),
                    uri.query().unwrap_or("")
                ));
                request
            });
        kube::client::ClientBuilder::try_from(config)
            .unwrap()
            .with_layer(&record)
            .build()
    }

    pub fn clear(&self) {
        self.0.lock().unwrap().clear();
    }

    /// Requests that write (every method but GET; server-side apply is a PATCH).
    pub fn writes(&self) -> Vec<String> {
        self.matching(|r| !r.starts_with("GET "))
    }

    /// GETs that are not watches (single reads and LISTs).
    pub fn reads(&self) -> Vec<String> {
        self.matching(|r| r.starts_with("GET ") && !r.contains("watch=true"))
    }

    /// Every request, in order.
    pub fn all(&self) -> Vec<String> {
        self.matching(|_| true)
    }

    fn matching(&self, keep: impl Fn(&str) -> bool) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|r| keep(r))
            .cloned()
            .collect()
    }
}
