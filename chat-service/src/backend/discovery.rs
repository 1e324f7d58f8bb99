//! DNS discovery for back ends with `discoverDns`: the name of a headless Service resolves to one
//! address per ready pod, and each address becomes an endpoint of its own, so that replicas of
//! a managed Ollama are balanced (and their breakers kept) per pod rather than by kube-proxy.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Mutex;

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
}
