//! NetworkPolicies that admit only this ChatService's chat pods to its managed stores and Ollama.

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::meta::{child_meta, label_selector};
use crate::names::Component;
use crate::validated::ValidatedChatService;

pub fn build_network_policy(
    cs: &ValidatedChatService,
    component: Component,
    port: i32,
) -> NetworkPolicy {
    NetworkPolicy {
        metadata: child_meta(cs, cs.names.component(component), component),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(label_selector(cs, component)),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![NetworkPolicyPeer {
                    pod_selector: Some(label_selector(cs, Component::Chat)),
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
    }
}
