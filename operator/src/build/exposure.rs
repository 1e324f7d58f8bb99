//! How callers reach the chat pods: the chat Service and, when asked for, an Ingress.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::networking::v1::{
    HTTPIngressPath, HTTPIngressRuleValue, Ingress, IngressBackend, IngressRule,
    IngressServiceBackend, IngressSpec, IngressTLS, ServiceBackendPort,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::meta::{child_meta, selector_labels};
use crate::crd::ServiceType;
use crate::names::Component;
use crate::validated::ValidatedChatService;

pub fn build_service(cs: &ValidatedChatService) -> Service {
    let service = &cs.service;
    let mut metadata = child_meta(cs, cs.names.chat(), Component::Chat);
    if !service.annotations.is_empty() {
        metadata.annotations = Some(service.annotations.clone());
    }
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(
                match service.type_ {
                    ServiceType::ClusterIP => "ClusterIP",
                    ServiceType::NodePort => "NodePort",
                    ServiceType::LoadBalancer => "LoadBalancer",
                }
                .into(),
            ),
            selector: Some(selector_labels(cs, Component::Chat)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: service.port,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The chat API's routes, the only ones an Ingress publishes. `/metrics`, `/v1/backends` (back-end
/// URLs and upstream errors), `/docs`, `/openapi.json` and the probes stay inside the cluster.
/// `Prefix` matches whole path segments, so `/v1/chat` covers `/v1/chat/completions` but not
/// `/v1/chatter`.
pub const PUBLIC_PATHS: [(&str, &str); 4] = [
    ("/v1/chat", "Prefix"),
    ("/ws/chat", "Exact"),
    ("/v1/sessions", "Prefix"),
    ("/v1/models", "Exact"),
];

pub fn build_ingress(cs: &ValidatedChatService) -> Option<Ingress> {
    let ingress = cs.ingress.as_ref()?;
    let mut metadata = child_meta(cs, cs.names.chat(), Component::Chat);
    if !ingress.annotations.is_empty() {
        metadata.annotations = Some(ingress.annotations.clone());
    }
    let backend = IngressBackend {
        service: Some(IngressServiceBackend {
            name: cs.names.chat(),
            port: Some(ServiceBackendPort {
                name: Some("http".into()),
                ..Default::default()
            }),
        }),
        ..Default::default()
    };
    Some(Ingress {
        metadata,
        spec: Some(IngressSpec {
            ingress_class_name: ingress.class_name.clone(),
            rules: Some(vec![IngressRule {
                host: ingress.host.clone(),
                http: Some(HTTPIngressRuleValue {
                    paths: PUBLIC_PATHS
                        .iter()
                        .map(|(path, path_type)| HTTPIngressPath {
                            path: Some((*path).into()),
                            path_type: (*path_type).into(),
                            backend: backend.clone(),
                        })
                        .collect(),
                }),
            }]),
            tls: ingress.tls_secret_name.as_ref().map(|secret| {
                vec![IngressTLS {
                    hosts: ingress.host.clone().map(|h| vec![h]),
                    secret_name: Some(secret.clone()),
                }]
            }),
            ..Default::default()
        }),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::*;

    #[test]
    fn service_and_ingress_follow_the_spec() {
        let cs = validated(FULL);
        let service = build_service(&cs).spec.unwrap();
        assert_eq!(service.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(service.ports.unwrap()[0].port, 8443);
        let ingress = build_ingress(&cs).unwrap().spec.unwrap();
        assert_eq!(
            ingress.tls.unwrap()[0].secret_name.as_deref(),
            Some("chat-tls")
        );
        let rule = &ingress.rules.unwrap()[0];
        assert_eq!(rule.host.as_deref(), Some("chat.example.com"));
        let paths: Vec<_> = rule
            .http
            .as_ref()
            .unwrap()
            .paths
            .iter()
            .map(|p| p.path.clone().unwrap())
            .collect();
        assert_eq!(
            paths,
            ["/v1/chat", "/ws/chat", "/v1/sessions", "/v1/models"]
        );
    }

    #[test]
    fn a_minimal_spec_gets_a_cluster_ip_service_on_port_80_and_no_ingress() {
        let cs = validated(MINIMAL);
        let service = build_service(&cs).spec.unwrap();
        assert_eq!(service.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(service.ports.unwrap()[0].port, 80);
        assert!(build_ingress(&cs).is_none());
    }
}
