//! How many chat pods run and how many may go: the HorizontalPodAutoscaler (when autoscaling is
//! asked for) and the PodDisruptionBudget.

use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HPAScalingRules, HorizontalPodAutoscaler,
    HorizontalPodAutoscalerBehavior, HorizontalPodAutoscalerSpec, MetricIdentifier, MetricSpec,
    MetricTarget, PodsMetricSource, ResourceMetricSource,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::meta::{child_meta, label_selector};
use crate::names::Component;
use crate::validated::{Replicas, ValidatedChatService};

pub fn build_pdb(cs: &ValidatedChatService) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: child_meta(cs, cs.names.chat(), Component::Chat),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(label_selector(cs, Component::Chat)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn build_hpa(cs: &ValidatedChatService) -> Option<HorizontalPodAutoscaler> {
    let Replicas::Autoscaled(autoscaling) = &cs.chat.replicas else {
        return None;
    };
    let mut metrics = Vec::new();
    for (resource, target) in [
        ("cpu", autoscaling.target_cpu_utilization_percentage),
        ("memory", autoscaling.target_memory_utilization_percentage),
    ] {
        if let Some(percent) = target {
            metrics.push(MetricSpec {
                type_: "Resource".into(),
                resource: Some(ResourceMetricSource {
                    name: resource.into(),
                    target: MetricTarget {
                        type_: "Utilization".into(),
                        average_utilization: Some(percent),
                        ..Default::default()
                    },
                }),
                ..Default::default()
            });
        }
    }
    if let Some(in_flight) = autoscaling.in_flight_requests_per_pod {
        metrics.push(MetricSpec {
            type_: "Pods".into(),
            pods: Some(PodsMetricSource {
                metric: MetricIdentifier {
                    name: "chat_requests_in_flight".into(),
                    selector: None,
                },
                target: MetricTarget {
                    type_: "AverageValue".into(),
                    average_value: Some(Quantity(in_flight.to_string())),
                    ..Default::default()
                },
            }),
            ..Default::default()
        });
    }
    let behavior = autoscaling.scale_down_stabilization_seconds.map(|seconds| {
        HorizontalPodAutoscalerBehavior {
            scale_down: Some(HPAScalingRules {
                stabilization_window_seconds: Some(seconds),
                ..Default::default()
            }),
            ..Default::default()
        }
    });
    Some(HorizontalPodAutoscaler {
        metadata: child_meta(cs, cs.names.chat(), Component::Chat),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name: cs.names.chat(),
            },
            min_replicas: Some(autoscaling.min_replicas),
            max_replicas: autoscaling.max_replicas,
            metrics: Some(metrics),
            behavior,
        }),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::*;

    #[test]
    fn hpa_has_every_requested_metric() {
        let spec = build_hpa(&validated(FULL)).unwrap().spec.unwrap();
        assert_eq!((spec.min_replicas, spec.max_replicas), (Some(2), 6));
        assert_eq!(spec.scale_target_ref.name, "support");
        let metrics = spec.metrics.unwrap();
        assert_eq!(metrics.len(), 2);
        assert_eq!(
            metrics[0]
                .resource
                .as_ref()
                .unwrap()
                .target
                .average_utilization,
            Some(70)
        );
        assert_eq!(
            metrics[1].pods.as_ref().unwrap().metric.name,
            "chat_requests_in_flight"
        );
        let scale_down = spec.behavior.unwrap().scale_down.unwrap();
        assert_eq!(scale_down.stabilization_window_seconds, Some(120));
        assert!(build_hpa(&validated(MINIMAL)).is_none());
    }

    #[test]
    fn at_most_one_chat_pod_is_disrupted_at_a_time() {
        let spec = build_pdb(&validated(MINIMAL)).spec.unwrap();
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
        let selector = spec.selector.unwrap().match_labels.unwrap();
        assert_eq!(selector["app.kubernetes.io/component"], "chat-service");
    }
}
