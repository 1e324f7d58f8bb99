//! The kinds of object the operator makes for a ChatService, listed once in [`child_kinds!`]'s
//! invocation below. From that one list come the [`ChildKind`] enum (apply order, pruning, the
//! dynamic API of each kind), the watch caches ([`ChildStores`]), and the watches that trigger
//! the owner's reconcile ([`ChildWatches`]): adding a child kind is one line here.

use futures::future::try_join_all;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::{Ingress, NetworkPolicy};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Client;
use kube::core::ApiResource;
use kube::runtime::controller::Controller;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;

use crate::cache::{self, Cached, Compact, StoreOf, api_for, trim_meta};
use crate::crd::ChatService;
use crate::metrics::Metrics;
use crate::triggers::SourceCounters;

/// Expands the table of child kinds. Each row is `Kind: store_field, status`, where `Kind` is
/// both the Kubernetes type and the [`ChildKind`] variant, and `status` says whether the cached
/// copy keeps the object's status (`keep`: it is read, or there is none) or drops it (`drop`).
macro_rules! child_kinds {
    ($($kind:ident: $field:ident, $status:ident;)+) => {
        /// The kinds of object the operator creates, in the order they are applied (what others
        /// read first: ServiceAccount, Secrets and ConfigMap before the workloads that mount them).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum ChildKind {
            $($kind,)+
        }

        impl ChildKind {
            pub const ALL: [ChildKind; [$(ChildKind::$kind),+].len()] = [$(ChildKind::$kind),+];

            pub fn api_resource(self) -> ApiResource {
                match self {
                    $(ChildKind::$kind => ApiResource::erase::<$kind>(&()),)+
                }
            }
        }

        /// A child kind as a Kubernetes type.
        pub trait Child: Cached {
            const KIND: ChildKind;
        }

        $(impl Child for $kind {
            const KIND: ChildKind = ChildKind::$kind;
        })+

        $(impl Cached for $kind {
            fn trim(&mut self) {
                trim_meta(self);
                child_kinds!(@status $status self);
            }
        })+

        /// One watch cache per child kind.
        #[derive(Clone)]
        pub struct ChildStores {
            $(pub $field: Store<Compact<$kind>>,)+
        }

        $(impl StoreOf<$kind> for ChildStores {
            fn store(&self) -> &Store<Compact<$kind>> {
                &self.$field
            }
        })+

        /// The watch streams behind [`ChildStores`]; they fill the stores only while polled.
        pub struct ChildWatches {
            $($field: BoxStream<'static, Result<Compact<$kind>, watcher::Error>>,)+
        }

        /// Starts one reflector per child kind over `namespace` (all when `None`) with `config`,
        /// its events counted in `metrics`.
        pub fn watch_children(
            client: &Client,
            namespace: Option<&str>,
            config: &watcher::Config,
            metrics: &Metrics,
        ) -> (ChildStores, ChildWatches) {
            $(let $field = cache::reflect(
                api_for::<$kind>(client, namespace),
                config.clone(),
                SourceCounters::new(metrics, stringify!($kind)),
            );)+
            (
                ChildStores { $($field: $field.0,)+ },
                ChildWatches { $($field: $field.1.boxed(),)+ },
            )
        }

        impl ChildWatches {
            /// Makes every change of a child trigger a reconcile of its owner, and polls the
            /// streams (which fills the stores) for as long as the controller runs.
            pub fn trigger_owners(self, controller: Controller<ChatService>) -> Controller<ChatService> {
                controller $(.owns_stream(self.$field))+
            }
        }

        impl ChildStores {
            /// The cached `K` named `namespace/name`.
            pub fn get<K: Cached>(&self, namespace: &str, name: &str) -> Option<K>
            where
                Self: StoreOf<K>,
            {
                cache::get(self.store(), namespace, name)
            }

            /// Waits until every store has had its first full list, so that a reconcile never
            /// mistakes "not listed yet" for "missing" (which would re-apply every child after a
            /// restart).
            pub async fn wait_until_ready(&self) -> Result<(), cache::CacheUnavailable> {
                try_join_all([$(self.$field.wait_until_ready().boxed(),)+])
                    .await
                    .map(|_| ())
                    .map_err(|_| cache::CacheUnavailable)
            }

            /// The cached child as JSON, when there is one.
            pub fn value(&self, kind: ChildKind, namespace: &str, name: &str) -> Option<serde_json::Value> {
                match kind {
                    $(ChildKind::$kind => cache::value_of(&self.$field, namespace, name),)+
                }
            }

            /// Names of the cached children of `kind` whose controller is the owner with `uid`.
            pub fn controlled_by(&self, kind: ChildKind, namespace: &str, uid: &str) -> Vec<String> {
                match kind {
                    $(ChildKind::$kind => cache::controlled_by(&self.$field, namespace, uid),)+
                }
            }

            /// Objects cached, over all kinds (for the operator's metrics and logs).
            pub fn len(&self) -> usize {
                0 $(+ self.$field.state().len())+
            }

            pub fn is_empty(&self) -> bool {
                self.len() == 0
            }
        }
    };
    (@status keep $object:ident) => {};
    (@status drop $object:ident) => {
        $object.status = None;
    };
}

// Workload status is what the ChatService status is computed from: kept. The status of Services,
// HPAs and PDBs is never read: dropped.
child_kinds! {
    ServiceAccount: service_accounts, keep;
    Secret: secrets, keep;
    ConfigMap: config_maps, keep;
    Service: services, drop;
    StatefulSet: stateful_sets, keep;
    Deployment: deployments, keep;
    HorizontalPodAutoscaler: hpas, drop;
    PodDisruptionBudget: pdbs, drop;
    NetworkPolicy: network_policies, keep;
    Ingress: ingresses, keep;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_api_and_the_apply_order_is_the_listing_order() {
        let kinds: Vec<_> = ChildKind::ALL
            .iter()
            .map(|k| k.api_resource().kind)
            .collect();
        assert_eq!(kinds.len(), 10);
        assert_eq!(kinds[0], "ServiceAccount");
        assert_eq!(
            format!("{:?}", ChildKind::HorizontalPodAutoscaler),
            "HorizontalPodAutoscaler"
        );
        assert!(ChildKind::Secret < ChildKind::Deployment);
        assert!(ChildKind::ConfigMap < ChildKind::StatefulSet);
    }

    #[test]
    fn unread_status_is_dropped_from_the_cache() {
        let mut service = Service {
            status: Some(Default::default()),
            ..Default::default()
        };
        service.trim();
        assert!(service.status.is_none());
        let mut deployment = Deployment {
            status: Some(Default::default()),
            ..Default::default()
        };
        deployment.metadata.managed_fields = Some(vec![Default::default()]);
        deployment.trim();
        assert!(deployment.status.is_some() && deployment.metadata.managed_fields.is_none());
    }
}
