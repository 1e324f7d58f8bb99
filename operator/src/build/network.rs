//! NetworkPolicies, default-deny in both directions for every pod of the ChatService, with
//! explicit allows: the stores and Ollama take connections from this ChatService's chat pods only
//! and open none (Ollama: DNS and HTTPS, to pull its models); the chat pods take connections from
//! their own namespace, the operator's (its status probes) and the namespaces the spec names (an
//! ingress controller's, Prometheus's),
//! or from anywhere when the Service is a NodePort or LoadBalancer, and open connections only to
//! DNS, their own stores and Ollama, and the ports of their external back ends and stores
//! (NetworkPolicy cannot name a host, so those ports are open to any address).

use std::collections::BTreeSet;

use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::meta::{child_meta, label_selector};
use crate::crd::ServiceType;
use crate::layout::{CHAT_PORT, MONGODB_PORT, OLLAMA_PORT, REDIS_PORT};
use crate::names::Component;
use crate::validated::{Mongodb, Redis, ValidatedChatService};

fn tcp(port: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

/// Cluster DNS, wherever it runs.
fn dns() -> NetworkPolicyEgressRule {
    NetworkPolicyEgressRule {
        to: Some(vec![NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector::default()),
            ..Default::default()
        }]),
        ports: Some(vec![
            NetworkPolicyPort {
                port: Some(IntOrString::Int(53)),
                protocol: Some("UDP".into()),
                ..Default::default()
            },
            tcp(53),
        ]),
    }
}

/// Any address, IPv4 and IPv6.
fn anywhere() -> Vec<NetworkPolicyPeer> {
    ["0.0.0.0/0", "::/0"]
        .into_iter()
        .map(|cidr| NetworkPolicyPeer {
            ip_block: Some(IPBlock {
                cidr: cidr.into(),
                except: None,
            }),
            ..Default::default()
        })
        .collect()
}

/// The port of an `http(s)://host[:port]/...` URL.
fn url_port(url: &str) -> Option<i32> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit('@').next()?;
    let explicit = authority
        .rsplit_once(':')
        .filter(|(host, _)| !host.ends_with(']') || authority.starts_with('['))
        .and_then(|(_, port)| port.parse().ok());
    explicit.or(match scheme {
        "https" => Some(443),
        _ => Some(80),
    })
}

/// The ports of the hosts of a `mongodb://` URI (27017 where none is given).
fn mongodb_ports(uri: &str) -> Vec<i32> {
    let Some((_, rest)) = uri.split_once("://") else {
        return vec![MONGODB_PORT];
    };
    let hosts = rest.split(['/', '?']).next().unwrap_or("");
    let hosts = hosts.rsplit('@').next().unwrap_or("");
    hosts
        .split(',')
        .map(|host| {
            host.rsplit_once(':')
                .and_then(|(_, port)| port.parse().ok())
                .unwrap_or(MONGODB_PORT)
        })
        .collect()
}

/// Ports the chat pods open to addresses outside the ChatService: external back ends and stores.
fn external_ports(cs: &ValidatedChatService) -> BTreeSet<i32> {
    let mut ports: BTreeSet<i32> = cs
        .config
        .backends
        .iter()
        .filter_map(|backend| url_port(&backend.url))
        .collect();
    if let Redis::External(redis) = &cs.redis
        && let Some((_, port)) = redis.address.rsplit_once(':')
        && let Ok(port) = port.parse()
    {
        ports.insert(port);
    }
    if let Mongodb::External(mongodb) = &cs.mongodb {
        ports.extend(mongodb_ports(&mongodb.uri));
    }
    ports
}

/// The chat pods' policy: who may call them, and what they may call.
pub fn build_chat_network_policy(cs: &ValidatedChatService) -> NetworkPolicy {
    let public = cs.service.type_ != ServiceType::ClusterIP;
    let mut callers = vec![NetworkPolicyPeer {
        pod_selector: Some(LabelSelector::default()),
        ..Default::default()
    }];
    callers.extend(
        cs.client_namespaces
            .iter()
            .map(|namespace| NetworkPolicyPeer {
                namespace_selector: Some(LabelSelector {
                    match_labels: Some(
                        [("kubernetes.io/metadata.name".to_string(), namespace.clone())].into(),
                    ),
                    ..Default::default()
                }),
                ..Default::default()
            }),
    );
    if let Some(operator) = cs
        .operator_namespace
        .as_ref()
        .filter(|ns| **ns != cs.namespace)
    {
        callers.push(NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector {
                match_labels: Some(
                    [("kubernetes.io/metadata.name".to_string(), operator.clone())].into(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    if public {
        callers = anywhere();
    }
    let mut egress = vec![dns()];
    let own = [
        (
            Component::Redis,
            REDIS_PORT,
            matches!(cs.redis, Redis::Managed(_)),
        ),
        (
            Component::Mongodb,
            MONGODB_PORT,
            matches!(cs.mongodb, Mongodb::Managed(_)),
        ),
        (Component::Ollama, OLLAMA_PORT, cs.ollama.is_some()),
    ];
    for (component, port, managed) in own {
        if managed {
            egress.push(NetworkPolicyEgressRule {
                to: Some(vec![NetworkPolicyPeer {
                    pod_selector: Some(label_selector(cs, component)),
                    ..Default::default()
                }]),
                ports: Some(vec![tcp(port)]),
            });
        }
    }
    let external = external_ports(cs);
    if !external.is_empty() {
        egress.push(NetworkPolicyEgressRule {
            to: Some(anywhere()),
            ports: Some(external.into_iter().map(tcp).collect()),
        });
    }
    NetworkPolicy {
        metadata: child_meta(cs, cs.names.chat(), Component::Chat),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(label_selector(cs, Component::Chat)),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(callers),
                ports: Some(vec![tcp(CHAT_PORT)]),
            }]),
            egress: Some(egress),
        }),
    }
}

pub fn build_network_policy(
    cs: &ValidatedChatService,
    component: Component,
    port: i32,
) -> NetworkPolicy {
    NetworkPolicy {
        metadata: child_meta(cs, cs.names.component(component), component),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(label_selector(cs, component)),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            // Stores call nobody; Ollama resolves and downloads its models over HTTPS.
            egress: Some(match component {
                Component::Ollama => vec![
                    dns(),
                    NetworkPolicyEgressRule {
                        to: Some(anywhere()),
                        ports: Some(vec![tcp(443)]),
                    },
                ],
                _ => Vec::new(),
            }),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![NetworkPolicyPeer {
                    pod_selector: Some(label_selector(cs, Component::Chat)),
                    ..Default::default()
                }]),
                ports: Some(vec![tcp(port)]),
            }]),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::*;

    #[test]
    fn only_this_chat_service_reaches_its_redis() {
        let policy = build_network_policy(&validated(MINIMAL), Component::Redis, 6379)
            .spec
            .unwrap();
        let target = policy.pod_selector.unwrap().match_labels.unwrap();
        assert_eq!(target["app.kubernetes.io/component"], "redis");
        assert_eq!(target["chatoperator.dev/chatservice"], "support");
        let from = policy.ingress.unwrap()[0].from.clone().unwrap()[0]
            .pod_selector
            .clone()
            .unwrap();
        let from = from.match_labels.unwrap();
        assert_eq!(from["app.kubernetes.io/component"], "chat-service");
        assert_eq!(from["chatoperator.dev/chatservice"], "support");
        assert_eq!(policy.egress, Some(Vec::new()), "Redis calls nobody");
        assert_eq!(policy.policy_types.unwrap(), ["Ingress", "Egress"]);
    }

    #[test]
    fn chat_pods_call_only_dns_their_stores_and_their_back_ends_ports() {
        let policy = build_chat_network_policy(&validated(MINIMAL)).spec.unwrap();
        assert_eq!(policy.policy_types.unwrap(), ["Ingress", "Egress"]);
        let egress = policy.egress.unwrap();
        // DNS, Redis, MongoDB, and port 8000 of http://vllm.ml:8000.
        assert_eq!(egress.len(), 4, "{egress:#?}");
        let last = egress.last().unwrap().ports.clone().unwrap();
        assert_eq!(last[0].port, Some(IntOrString::Int(8000)));
        let callers = policy.ingress.unwrap()[0].from.clone().unwrap();
        assert_eq!(
            callers.len(),
            1,
            "only this namespace by default: {callers:?}"
        );
        let mut probed = validated(MINIMAL);
        probed.operator_namespace = Some("operators".into());
        let callers = build_chat_network_policy(&probed)
            .spec
            .unwrap()
            .ingress
            .unwrap()[0]
            .from
            .clone()
            .unwrap();
        let admitted = callers[1].namespace_selector.clone().unwrap().match_labels;
        assert_eq!(
            admitted.unwrap()["kubernetes.io/metadata.name"],
            "operators",
            "the operator's status probes get in: {callers:?}"
        );
        let public = build_chat_network_policy(&validated(FULL)).spec.unwrap();
        let callers = public.ingress.unwrap()[0].from.clone().unwrap();
        assert_eq!(
            callers[0].ip_block.as_ref().unwrap().cidr,
            "0.0.0.0/0",
            "a LoadBalancer is called from anywhere"
        );
    }

    #[test]
    fn ports_are_read_from_urls_and_uris() {
        assert_eq!(url_port("https://llm.example.com/x"), Some(443));
        assert_eq!(url_port("http://vllm.ml:8000"), Some(8000));
        assert_eq!(url_port("http://[fe80::1]"), Some(80));
        assert_eq!(url_port("http://[::1]:9000"), Some(9000));
        assert_eq!(
            mongodb_ports("mongodb://u:p@a:27018,b/db?tls=true"),
            [27018, 27017]
        );
    }
}
