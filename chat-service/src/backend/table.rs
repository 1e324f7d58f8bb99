//! The endpoint table: the configured back ends, and per back end its current endpoints.
//!
//! The endpoints are an immutable snapshot behind an [`ArcSwap`], replaced whole when discovery
//! changes a back end's set (as `pingora-load-balancing` keeps its backends and selector): every
//! request reads the snapshot without a lock, and a request that is choosing while the set
//! changes finishes on the set it read. Endpoints that stay keep their `Arc`, and with it their
//! counters, breaker and health.

use std::collections::HashSet;
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::endpoint::Endpoint;
use crate::config::{BackendConfig, RoutingConfig};

/// One configured back end: what all its endpoints share.
pub(super) struct Backend {
    pub config: BackendConfig,
    pub api_key: Option<String>,
    /// `url`, parsed: discovered endpoints take its scheme and path.
    pub url: reqwest::Url,
    /// Reserved for `routing.fallback`.
    pub fallback: bool,
    /// `rollout.candidateBackend`: serves the candidate's side of the split only.
    pub candidate: bool,
    /// Host and port to resolve, for `discoverDns`.
    pub discover: Option<(String, u16)>,
}

impl Backend {
    pub fn endpoint(&self, routing: &RoutingConfig, name: String, url: String) -> Endpoint {
        Endpoint::new(
            &self.config,
            self.api_key.clone(),
            self.fallback,
            routing,
            name,
            url,
        )
    }
}

/// Which endpoints a turn may use.
#[derive(Debug, Clone, Copy)]
pub(super) enum Route<'a> {
    /// Every back end but the one reserved for fallback and a rollout's candidate back end.
    Regular,
    /// The candidate's side of a rollout: its candidate back end.
    Candidate,
    /// `routing.fallback`: its back end, or the regular ones (with another model) when it names
    /// none.
    Fallback { backend: Option<&'a str> },
}

type Snapshot = Vec<Vec<Arc<Endpoint>>>;

pub(super) struct EndpointTable {
    backends: Vec<Backend>,
    /// Per back end, in the order of `backends`.
    endpoints: ArcSwap<Snapshot>,
}

impl EndpointTable {
    /// Every back end starts with its URL as its one endpoint: until (or unless) a `discoverDns`
    /// name resolves.
    pub fn new(backends: Vec<Backend>, routing: &RoutingConfig) -> Self {
        let endpoints = backends
            .iter()
            .map(|backend| {
                let url = backend.config.url.trim_end_matches('/').to_string();
                vec![Arc::new(backend.endpoint(
                    routing,
                    backend.config.name.clone(),
                    url,
                ))]
            })
            .collect();
        Self {
            backends,
            endpoints: ArcSwap::from_pointee(endpoints),
        }
    }

    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// Every endpoint, back end by back end in config order.
    pub fn all(&self) -> Vec<Arc<Endpoint>> {
        self.endpoints.load().iter().flatten().cloned().collect()
    }

    /// The current endpoints of the back end at `index` in [`Self::backends`].
    pub fn endpoints_of(&self, index: usize) -> Vec<Arc<Endpoint>> {
        self.endpoints.load()[index].clone()
    }

    /// Endpoints that `route` allows, that serve `model` and that this turn has not tried yet.
    pub fn routable(
        &self,
        model: &str,
        route: Route<'_>,
        attempted: &HashSet<String>,
    ) -> Vec<Arc<Endpoint>> {
        let endpoints = self.endpoints.load();
        self.backends
            .iter()
            .zip(endpoints.iter())
            .filter(|(backend, _)| match route {
                Route::Regular | Route::Fallback { backend: None } => {
                    !backend.fallback && !backend.candidate
                }
                Route::Candidate => backend.candidate,
                Route::Fallback {
                    backend: Some(name),
                } => backend.config.name == name,
            })
            .flat_map(|(_, endpoints)| endpoints.iter())
            .filter(|e| e.serves(model) && !attempted.contains(&e.name))
            .cloned()
            .collect()
    }

    /// Replaces the endpoints of the back end at `index`; requests choosing meanwhile finish on
    /// the snapshot they read.
    pub fn replace(&self, index: usize, endpoints: Vec<Arc<Endpoint>>) {
        self.endpoints.rcu(|current| {
            let mut next = Snapshot::clone(current);
            next[index] = endpoints.clone();
            next
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(name: &str, models: &[&str], fallback: bool) -> Backend {
        let url = format!("http://{name}.invalid:11434");
        Backend {
            config: BackendConfig {
                name: name.into(),
                url: url.clone(),
                protocol: crate::config::Protocol::Ollama,
                weight: 1,
                api_key_env: None,
                discover_dns: None,
                models: models.iter().map(|m| m.to_string()).collect(),
            },
            api_key: None,
            url: reqwest::Url::parse(&url).unwrap(),
            fallback,
            candidate: false,
            discover: None,
        }
    }

    fn names(endpoints: &[Arc<Endpoint>]) -> Vec<&str> {
        endpoints.iter().map(|e| e.name.as_str()).collect()
    }

    #[test]
    fn routes_filter_by_model_fallback_and_attempts() {
        let routing = RoutingConfig::default();
        let table = EndpointTable::new(
            vec![
                backend("general", &[], false),
                backend("special", &["special-model"], false),
                backend("spare", &[], true),
            ],
            &routing,
        );
        let none = HashSet::new();
        let regular = table.routable("llama", Route::Regular, &none);
        assert_eq!(names(&regular), ["general"]);
        let special = table.routable("special-model", Route::Regular, &none);
        assert_eq!(names(&special), ["general", "special"]);
        let tried = HashSet::from(["general".to_string()]);
        let left = table.routable("special-model", Route::Regular, &tried);
        assert_eq!(names(&left), ["special"]);
        let spare = Route::Fallback {
            backend: Some("spare"),
        };
        assert_eq!(names(&table.routable("llama", spare, &none)), ["spare"]);
        let other_model = Route::Fallback { backend: None };
        assert_eq!(
            names(&table.routable("llama", other_model, &none)),
            ["general"]
        );
    }

    #[test]
    fn a_replaced_set_is_seen_by_new_reads_only() {
        let routing = RoutingConfig::default();
        let table = EndpointTable::new(
            vec![backend("a", &[], false), backend("b", &[], false)],
            &routing,
        );
        let before = table.all();
        let pods: Vec<Arc<Endpoint>> = ["b/10.0.0.1", "b/10.0.0.2"]
            .iter()
            .map(|name| {
                Arc::new(table.backends()[1].endpoint(
                    &routing,
                    name.to_string(),
                    "http://10.0.0.1:1".into(),
                ))
            })
            .collect();
        table.replace(1, pods);
        assert_eq!(
            names(&before),
            ["a", "b"],
            "a read snapshot does not change"
        );
        assert_eq!(names(&table.all()), ["a", "b/10.0.0.1", "b/10.0.0.2"]);
        assert_eq!(names(&table.endpoints_of(0)), ["a"]);
        assert!(
            Arc::ptr_eq(&table.endpoints_of(0)[0], &before[0]),
            "untouched back end kept"
        );
    }
}
