//! DNS discovery for back ends with `discoverDns`: the name of a headless Service resolves to one
//! address per ready pod, and each address becomes an endpoint of its own, so that replicas of
//! a managed Ollama are balanced (and their breakers kept) per pod rather than by kube-proxy.
//!
//! [`Discovery::refresh`] resolves every such name and swaps the back end's endpoints in the
//! [`EndpointTable`]; an address that stays keeps its endpoint (and its breaker, health and
//! counters), one that goes takes its endpoint with it.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use super::endpoint::Endpoint;
use super::table::EndpointTable;
use crate::config::RoutingConfig;

/// Longest a DNS resolution may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Resolves a host name to addresses. [`SystemResolver`] in production; tests inject
/// [`StaticResolver`] to simulate pods coming and going.
pub trait Resolver: Send + Sync {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + 'a>>;
}

/// The system resolver through `tokio::net::lookup_host` (getaddrinfo: /etc/hosts, then the
/// cluster DNS).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + 'a>> {
        Box::pin(async move {
            let addresses = tokio::net::lookup_host((host, port)).await?;
            Ok(addresses.map(|a| a.ip()).collect())
        })
    }
}

/// A fixed table of names; unknown names fail like NXDOMAIN. Changeable at run time.
#[derive(Debug, Default)]
pub struct StaticResolver {
    table: Mutex<HashMap<String, Vec<IpAddr>>>,
}

impl StaticResolver {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set(&self, host: &str, addresses: Vec<IpAddr>) {
        self.table
            .lock()
            .expect("resolver table poisoned")
            .insert(host.to_string(), addresses);
    }
}

impl Resolver for StaticResolver {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        _port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + 'a>> {
        let found = self
            .table
            .lock()
            .expect("resolver table poisoned")
            .get(host)
            .cloned();
        Box::pin(async move {
            found.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{host}: unknown")))
        })
    }
}

/// `discoverDns` split into host and port; the port defaults to the one of the back end's URL.
pub fn target(discover_dns: &str, url: &reqwest::Url) -> (String, u16) {
    let default_port = url.port_or_known_default().unwrap_or(80);
    match discover_dns.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => match port.parse() {
            Ok(port) => (host.to_string(), port),
            Err(_) => (discover_dns.to_string(), default_port),
        },
        _ => (discover_dns.to_string(), default_port),
    }
}

/// The endpoint name and base URL of one discovered address: the back end's URL with the host
/// replaced by the address (bracketed for IPv6) and the discovery port.
pub fn endpoint_for(backend: &str, url: &reqwest::Url, ip: IpAddr, port: u16) -> (String, String) {
    let mut url = url.clone();
    // Both only fail for URLs that cannot have a host, which validation rejects.
    let _ = url.set_ip_host(ip);
    let _ = url.set_port(Some(port));
    let base = url.as_str().trim_end_matches('/').to_string();
    (format!("{backend}/{ip}"), base)
}

/// Sorted, de-duplicated addresses, so that endpoint order (and round robin) is stable.
pub fn normalise(mut addresses: Vec<IpAddr>) -> Vec<IpAddr> {
    addresses.sort();
    addresses.dedup();
    addresses
}

/// The resolver and the refresh of the endpoints it finds.
pub(super) struct Discovery {
    resolver: RwLock<Arc<dyn Resolver>>,
    /// Held for a whole refresh, so that a slow, older resolution never lands after (and
    /// overwrites) a newer one.
    refreshing: tokio::sync::Mutex<()>,
}

impl Discovery {
    pub fn new(resolver: Arc<dyn Resolver>) -> Self {
        Self {
            resolver: RwLock::new(resolver),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    /// Used from the next refresh on.
    pub fn set_resolver(&self, resolver: Arc<dyn Resolver>) {
        *self.resolver.write().expect("resolver lock poisoned") = resolver;
    }

    /// Resolves every `discoverDns` name and replaces the back end's endpoints with one per
    /// address. A name that does not resolve (or to no address) keeps its last endpoints.
    pub async fn refresh(&self, table: &EndpointTable, routing: &RoutingConfig) {
        let _one_at_a_time = self.refreshing.lock().await;
        if table.backends().iter().all(|b| b.discover.is_none()) {
            return;
        }
        let resolver = self
            .resolver
            .read()
            .expect("resolver lock poisoned")
            .clone();
        for (index, backend) in table.backends().iter().enumerate() {
            let Some((host, port)) = &backend.discover else {
                continue;
            };
            let name = &backend.config.name;
            let Some(addresses) = resolve(resolver.as_ref(), name, host, *port).await else {
                continue;
            };
            let current = table.endpoints_of(index);
            let endpoints: Vec<Arc<Endpoint>> = addresses
                .into_iter()
                .map(|ip| {
                    let (endpoint, url) = endpoint_for(name, &backend.url, ip, *port);
                    current
                        .iter()
                        .find(|e| e.name == endpoint)
                        .cloned()
                        .unwrap_or_else(|| Arc::new(backend.endpoint(routing, endpoint, url)))
                })
                .collect();
            let before: Vec<&str> = current.iter().map(|e| e.name.as_str()).collect();
            let after: Vec<&str> = endpoints.iter().map(|e| e.name.as_str()).collect();
            if before != after {
                tracing::info!(backend = %name, ?before, ?after, "discovered endpoints changed");
            }
            table.replace(index, endpoints);
        }
    }
}

/// The addresses of `host`, sorted; `None` (logged) when it does not resolve in time or to
/// nothing.
async fn resolve(
    resolver: &dyn Resolver,
    backend: &str,
    host: &str,
    port: u16,
) -> Option<Vec<IpAddr>> {
    match tokio::time::timeout(RESOLVE_TIMEOUT, resolver.resolve(host, port)).await {
        Ok(Ok(addresses)) if !addresses.is_empty() => Some(normalise(addresses)),
        Ok(Ok(_)) => {
            tracing::warn!(%backend, %host, "discoverDns resolved to no address; keeping the last endpoints");
            None
        }
        Ok(Err(e)) => {
            tracing::warn!(%backend, %host, error = %e, "discoverDns did not resolve; keeping the last endpoints");
            None
        }
        Err(_) => {
            tracing::warn!(%backend, %host, "discoverDns timed out; keeping the last endpoints");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovered_endpoints_keep_scheme_and_port_and_bracket_ipv6() {
        let url = reqwest::Url::parse("http://ollama:11434").unwrap();
        assert_eq!(
            target("ollama-headless.ai.svc", &url),
            ("ollama-headless.ai.svc".into(), 11434)
        );
        assert_eq!(target("localhost:9000", &url), ("localhost".into(), 9000));
        let (name, base) = endpoint_for("ollama", &url, "10.1.2.3".parse().unwrap(), 11434);
        assert_eq!(name, "ollama/10.1.2.3");
        assert_eq!(base, "http://10.1.2.3:11434");
        let (name, base) = endpoint_for("ollama", &url, "fd00::7".parse().unwrap(), 11434);
        assert_eq!(name, "ollama/fd00::7");
        assert_eq!(base, "http://[fd00::7]:11434");
        let https = reqwest::Url::parse("https://llm.example.com/").unwrap();
        assert_eq!(target("llm-pods", &https).1, 443);
    }

    #[tokio::test]
    async fn static_resolver_answers_from_its_table() {
        let resolver = StaticResolver::new();
        resolver.set(
            "pods",
            vec!["127.0.0.2".parse().unwrap(), "127.0.0.1".parse().unwrap()],
        );
        let found = normalise(resolver.resolve("pods", 80).await.unwrap());
        assert_eq!(
            found,
            vec![
                "127.0.0.1".parse::<IpAddr>().unwrap(),
                "127.0.0.2".parse().unwrap()
            ]
        );
        assert!(resolver.resolve("other", 80).await.is_err());
        let system = SystemResolver.resolve("localhost", 80).await.unwrap();
        assert!(system.iter().any(|ip| ip.is_loopback()), "{system:?}");
    }

    #[tokio::test]
    async fn a_refresh_keeps_the_endpoints_of_addresses_that_stay() {
        use crate::backend::table::Backend;
        use crate::config::{BackendConfig, Protocol};
        let routing = RoutingConfig::default();
        let url = reqwest::Url::parse("http://pods:11434").unwrap();
        let backend = Backend {
            config: BackendConfig {
                name: "pods".into(),
                url: url.to_string(),
                protocol: Protocol::Ollama,
                weight: 1,
                api_key_env: None,
                discover_dns: Some("pods.ai.svc".into()),
                models: vec![],
            },
            api_key: None,
            discover: Some(target("pods.ai.svc", &url)),
            url,
            fallback: false,
            candidate: false,
        };
        let table = EndpointTable::new(vec![backend], &routing);
        let names = |table: &EndpointTable| -> Vec<String> {
            table.all().iter().map(|e| e.name.clone()).collect()
        };
        assert_eq!(names(&table), ["pods"], "the URL until the name resolves");
        let resolver = Arc::new(StaticResolver::new());
        let discovery = Discovery::new(resolver.clone());
        discovery.refresh(&table, &routing).await;
        assert_eq!(
            names(&table),
            ["pods"],
            "an unknown name keeps the last endpoints"
        );

        let ip = |a: &str| a.parse::<IpAddr>().unwrap();
        resolver.set("pods.ai.svc", vec![ip("10.0.0.2"), ip("10.0.0.1")]);
        discovery.refresh(&table, &routing).await;
        assert_eq!(names(&table), ["pods/10.0.0.1", "pods/10.0.0.2"]);
        let staying = table.all()[1].clone();
        assert_eq!(staying.url, "http://10.0.0.2:11434");

        resolver.set("pods.ai.svc", vec![ip("10.0.0.3"), ip("10.0.0.2")]);
        discovery.refresh(&table, &routing).await;
        assert_eq!(names(&table), ["pods/10.0.0.2", "pods/10.0.0.3"]);
        assert!(
            Arc::ptr_eq(&table.all()[0], &staying),
            "same endpoint, same state"
        );

        resolver.set("pods.ai.svc", vec![]);
        discovery.refresh(&table, &routing).await;
        assert_eq!(
            names(&table).len(),
            2,
            "no address keeps the last endpoints"
        );
    }
}
