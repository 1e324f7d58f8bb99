//! What the operator owns in a test namespace, reduced to what changes only when something is
//! written, so a test can prove a window of reconciles wrote nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use chat_operator::crd::ChatService;
use chat_rig::eventually;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::ListParams;
use kube::{Api, ResourceExt};

use super::{Env, WAIT};

/// resourceVersions of what only the operator writes, plus the operator's managedFields time on
/// workloads (their status is written by kube-controller-manager, which is not us).
pub async fn snapshot(env: &Env) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let lp = ListParams::default().labels("chatoperator.dev/chatservice=chat");
    macro_rules! rv {
        ($k:ty) => {
            for o in Api::<$k>::namespaced(env.admin.clone(), &env.ns)
                .list(&lp)
                .await
                .unwrap()
            {
                out.insert(
                    format!("{}/{}", <$k as kube::Resource>::kind(&()), o.name_any()),
                    o.resource_version().unwrap(),
                );
            }
        };
    }
    rv!(ConfigMap);
    rv!(Secret);
    rv!(Service);
    rv!(ServiceAccount);
    rv!(NetworkPolicy);
    macro_rules! ours {
        ($k:ty) => {
            for o in Api::<$k>::namespaced(env.admin.clone(), &env.ns)
                .list(&lp)
                .await
                .unwrap()
            {
                let time = o
                    .managed_fields()
                    .iter()
                    .filter(|m| m.manager.as_deref() == Some("chat-operator"))
                    .map(|m| format!("{:?}", m.time))
                    .collect::<Vec<_>>()
                    .join(",");
                out.insert(
                    format!("{}/{}", <$k as kube::Resource>::kind(&()), o.name_any()),
                    format!("{:?}/{time}", o.metadata.generation),
                );
            }
        };
    }
    ours!(Deployment);
    ours!(StatefulSet);
    ours!(HorizontalPodAutoscaler);
    ours!(PodDisruptionBudget);
    let cr = Api::<ChatService>::namespaced(env.admin.clone(), &env.ns)
        .get("chat")
        .await
        .unwrap();
    out.insert("ChatService/chat".into(), cr.resource_version().unwrap());
    out
}

/// Waits until ChatService `chat` and its children settle: kube-controller-manager writes
/// workload and HPA status for a while after a change and the ChatService status rightly follows
/// it. Settled means a 3 s window (over a resync) with no change.
pub async fn settle(env: &Env, what: &str) {
    eventually(what, WAIT, || async {
        let first = snapshot(env).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        (snapshot(env).await == first).then_some(())
    })
    .await;
}
