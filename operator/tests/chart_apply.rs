//! The rendered chart applied to the rig's real API server with server-side apply under Pod
//! Security `restricted`, then applied again as a GitOps controller would: the second time changes
//! nothing.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use chat_rig::{Rig, unique_name};
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use support::chart::{describe, documents, render, run, tool};

const FIELD_MANAGER: &str = "chart-test";

struct Kubectl {
    bin: PathBuf,
    kubeconfig: PathBuf,
}

impl Kubectl {
    fn run(&self, args: &[&str]) -> Output {
        let mut all = vec!["--kubeconfig", self.kubeconfig.to_str().unwrap()];
        all.extend_from_slice(args);
        run(&self.bin, &all)
    }

    /// (kind/namespace/name -> resourceVersion) of every object in `file`.
    fn resource_versions(&self, file: &Path) -> BTreeMap<String, String> {
        let out = self.run(&["get", "-f", file.to_str().unwrap(), "-o", "json"]);
        assert!(out.status.success(), "{}", describe("kubectl get -f", &out));
        let list: Value = serde_json::from_slice(&out.stdout).unwrap();
        let items = match list["items"].as_array() {
            Some(items) => items.clone(),
            None => vec![list],
        };
        items
            .iter()
            .map(|o| {
                let m = &o["metadata"];
                (
                    format!(
                        "{}/{}/{}",
                        o["kind"].as_str().unwrap_or_default(),
                        m["namespace"].as_str().unwrap_or_default(),
                        m["name"].as_str().unwrap_or_default()
                    ),
                    m["resourceVersion"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect()
    }

    /// Resource versions once nothing (controllers updating status) writes for a moment.
    async fn settled_versions(&self, file: &Path) -> BTreeMap<String, String> {
        let mut last = self.resource_versions(file);
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = self.resource_versions(file);
            if now == last {
                return now;
            }
            last = now;
        }
        panic!("objects kept changing for 30 s: {last:?}");
    }
}

/// Removes what a test created: its namespace and its cluster-wide binding. The CRD and the
/// ClusterRole stay: other tests share them.
struct Cleanup<'a> {
    kubectl: &'a Kubectl,
    namespace: String,
    cluster_role_binding: String,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let _ = self.kubectl.run(&[
            "delete",
            "clusterrolebinding",
            &self.cluster_role_binding,
            "--ignore-not-found",
            "--wait=false",
        ]);
        let _ = self.kubectl.run(&[
            "delete",
            "namespace",
            &self.namespace,
            "--ignore-not-found",
            "--wait=false",
        ]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rendered_chart_applies_and_reapplying_changes_nothing() {
    let rig = Rig::shared();
    let kubectl = Kubectl {
        bin: tool("kubectl"),
        kubeconfig: rig.kubeconfig_path().to_path_buf(),
    };
    let (admin, ns) = rig.test_namespace("chart").await;
    let release = unique_name("rel");
    let _cleanup = Cleanup {
        kubectl: &kubectl,
        namespace: ns.clone(),
        cluster_role_binding: format!("{release}-chat-operator-{ns}"),
    };
    // The operator's pods must pass the "restricted" Pod Security Standard.
    Api::<Namespace>::all(admin.clone())
        .patch(
            &ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/warn": "restricted",
            }}})),
        )
        .await
        .expect("labelling the namespace");

    // Two replicas: the Lease Role and leader-election settings are part of what is applied.
    let manifests = render(&release, &ns, &["--include-crds", "--set", "replicas=2"]);
    let dir = chat_rig::scratch_dir("chart").unwrap();
    let file = dir.join("rendered.yaml");
    std::fs::write(&file, &manifests).unwrap();
    let file_arg = file.to_str().unwrap();
    let expected: BTreeSet<String> = documents(&manifests)
        .iter()
        .map(|d| d["kind"].as_str().unwrap().to_string())
        .collect();

    // First apply. --force-conflicts: the CRD and ClusterRole are shared with other tests, which
    // apply the same content under their own field manager.
    let out = kubectl.run(&[
        "apply",
        "--server-side",
        "--field-manager",
        FIELD_MANAGER,
        "--force-conflicts",
        "-f",
        file_arg,
    ]);
    assert!(out.status.success(), "{}", describe("kubectl apply", &out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("PodSecurity"),
        "the operator's pod template violates Pod Security restricted: {stderr}"
    );
    let applied = kubectl.resource_versions(&file);
    let applied_kinds: BTreeSet<String> = applied
        .keys()
        .map(|k| k.split('/').next().unwrap().to_string())
        .collect();
    assert_eq!(applied_kinds, expected);

    // The ReplicaSet controller creates the operator's pods under enforce=restricted (they stay
    // Pending: the rig runs no scheduler or kubelet).
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    let replica_sets: Api<ReplicaSet> = Api::namespaced(admin.clone(), &ns);
    let selector = format!("app.kubernetes.io/instance={release}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let list = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .expect("listing pods");
        if list.items.len() == 2 {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            let sets = replica_sets
                .list(&ListParams::default().labels(&selector))
                .await
                .expect("listing ReplicaSets");
            let conditions: Vec<_> = sets
                .items
                .iter()
                .flat_map(|rs| rs.status.iter().flat_map(|s| s.conditions.iter().flatten()))
                .map(|c| format!("{}: {}", c.type_, c.message.clone().unwrap_or_default()))
                .collect();
            panic!(
                "the operator's 2 pods were not created within 60 s ({} exist); \
                 ReplicaSet conditions: {conditions:?}",
                list.items.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Re-applying the same manifests (what a GitOps controller does on every sync) changes
    // nothing. Controllers may still write status right after the first apply, so compare once
    // writes have settled, and allow a second round if a late status write races the apply.
    let mut changed = Vec::new();
    for _round in 0..3 {
        let before = kubectl.settled_versions(&file).await;
        let out = kubectl.run(&[
            "apply",
            "--server-side",
            "--field-manager",
            FIELD_MANAGER,
            "-f",
            file_arg,
        ]);
        assert!(
            out.status.success(),
            "{}",
            describe("kubectl re-apply", &out)
        );
        let after = kubectl.resource_versions(&file);
        changed = before
            .iter()
            .filter(|(k, v)| after.get(*k) != Some(v))
            .map(|(k, _)| k.clone())
            .collect();
        if changed.is_empty() {
            break;
        }
    }
    assert!(
        changed.is_empty(),
        "re-applying the chart changed {changed:?} in every round"
    );
    let out = kubectl.run(&[
        "diff",
        "--server-side",
        "--field-manager",
        FIELD_MANAGER,
        "-f",
        file_arg,
    ]);
    assert!(
        out.status.code() == Some(0),
        "{}",
        describe("kubectl diff --server-side (expected no differences)", &out)
    );
}
