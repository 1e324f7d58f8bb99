//! NetworkPolicies that admit only this ChatService's chat pods to its managed stores and Ollama.

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{ChildNames, Component, child_meta, label_selector};
use crate::crd::ChatService;
use crate::error::Result;

pub fn build_network_policy(
    cr: &ChatService,
    component: Component,
    port: i32,
) -> Result<NetworkPolicy> {
    let names = ChildNames::of(cr);
    let name = match component {
        Component::Redis => names.redis(),
        Component::Mongodb => names.mongodb(),
        Component::Ollama => names.ollama(),
        Component::Chat => names.chat(),
    };
    Ok(NetworkPolicy {
        metadata: child_meta(cr, name, component)?,
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(label_selector(cr, component)),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![NetworkPolicyPeer {
                    pod_selector: Some(label_selector(cr, Component::Chat)),
                    ..Default::default()
                }]),
                ports: Some(vec![NetworkPolicyPort {
                    port: Some(IntOrString::Int(port)),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
            }]),
            ..Default::default()
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures::*;

    #[test]
    fn only_this_chat_service_reaches_its_redis() {
        let cr = chat_service(MINIMAL);
        let policy = build_network_policy(&cr, Component::Redis, 6379)
            .unwrap()
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
    }
}
