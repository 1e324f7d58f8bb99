//! The real node (kubelet + containerd + bridge CNI, `chat_rig::kubelet_node`) on the rig's
//! control plane: it registers under its own certificate and is confined by the Node authorizer,
//! runs a pod that Pod Security Admission `restricted` admits as the non-root user it names with
//! a read-only root file system, serves `kubectl logs` and `exec`, and when it stops leaves the
//! host as it found it (no process, mount, namespace, link, cgroup, sysctl or rule of its own).
//! Cluster DNS and ClusterIPs work from a pod, a NetworkPolicy is enforced, `kubectl top pod`
//! works, a container killed by the OOM killer or by its liveness probe is restarted, and running
//! pods survive a restart of containerd and of the kubelet.
//!
//! Needs root and the installer's node binaries (containerd, kubelet), runc, the CNI plugins,
//! buildah, gcc and busybox-static.

mod real_node;

use std::path::Path;
use std::time::Duration;

use chat_rig::kubelet_node::host::HostSnapshot;
use chat_rig::kubelet_node::images::TOOLBOX_IMAGE;
use chat_rig::kubelet_node::{KubeletNode, KubeletNodeOptions, leftovers};
use chat_rig::wait::until;
use chat_rig::{Parts, Rig, unique_name};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, Patch, PatchParams, PostParams};

/// The real kubectl client against `kubeconfig` (see `real_node::Kubectl`).
fn kubectl(kubeconfig: &Path, args: &[&str]) -> (bool, String) {
    real_node::Kubectl {
        kubeconfig: kubeconfig.to_path_buf(),
    }
    .try_run(args)
}

fn restricted_pod(name: &str) -> Pod {
    toolbox_pod(
        name,
        "trap 'exit 0' TERM; echo hello from the real node; while true; do sleep 1; done",
    )
}

/// A pod of the toolbox image that Pod Security `restricted` admits, running `script`.
fn toolbox_pod(name: &str, script: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "terminationGracePeriodSeconds": 2,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "toolbox", "image": TOOLBOX_IMAGE, "imagePullPolicy": "Never",
                "command": ["/bin/sh", "-c", script],
                "resources": {"limits": {"cpu": "100m", "memory": "32Mi"}},
                "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                    "capabilities": {"drop": ["ALL"]}},
            }],
        },
    }))
    .unwrap()
}

/// The toolbox pod's container: its ID and restart count.
async fn toolbox_container(pods: &Api<Pod>) -> (String, i32) {
    let pod = pods.get("toolbox").await.unwrap();
    let status = pod
        .status
        .and_then(|s| s.container_statuses)
        .unwrap_or_default();
    let c = status
        .first()
        .expect("the toolbox pod has a container status");
    (c.container_id.clone().unwrap_or_default(), c.restart_count)
}

/// containerd, then the kubelet, restarted under running pods: the same containers keep
/// running (no restart, same ID), the Node is Ready again, and exec and logs still work.
async fn survives_restarts(rig: &Rig, node: &mut KubeletNode, ns: &str) {
    let admin = rig.kubeconfig_path();
    let pods = Api::<Pod>::namespaced(rig.kube_client().await, ns);
    let before = toolbox_container(&pods).await;
    for daemon in ["containerd", "kubelet"] {
        let restarted = tokio::task::block_in_place(|| match daemon {
            "containerd" => node.restart_containerd(),
            _ => node.restart_kubelet(),
        });
        restarted.unwrap_or_else(|e| panic!("restarting {daemon}: {e:#}"));
        // A restarted kubelet is Ready before it has synced its pods; exec then answers "pod
        // does not exist" for a moment.
        until(
            &format!("exec in the toolbox pod after restarting {daemon}"),
            Duration::from_secs(60),
            || async {
                let (ok, uid) = kubectl(admin, &["exec", "-n", ns, "toolbox", "--", "id", "-u"]);
                if ok && uid.trim() == "65532" {
                    Ok(())
                } else {
                    Err(uid)
                }
            },
        )
        .await;
        let (ok, logs) = kubectl(admin, &["logs", "-n", ns, "toolbox"]);
        assert!(
            ok && logs.contains("hello from the real node"),
            "logs after restarting {daemon}: {logs}"
        );
        assert_eq!(
            toolbox_container(&pods).await,
            before,
            "the toolbox container must survive a {daemon} restart (same ID, no restart)"
        );
    }
}

/// metrics-server scrapes the kubelet: `kubectl top pod` shows the toolbox pod's usage.
async fn top_pod_works(rig: &Rig, ns: &str) {
    let admin = rig.kubeconfig_path();
    until(
        "kubectl top pod toolbox",
        Duration::from_secs(90),
        || async {
            let (ok, out) = kubectl(admin, &["top", "pod", "-n", ns, "toolbox", "--no-headers"]);
            if ok && out.contains("toolbox") && out.contains("Mi") {
                Ok(())
            } else {
                Err(out)
            }
        },
    )
    .await;
}

/// `timeout 5 wget` of `url` from the toolbox image in pod `pod`: the body, or why not.
fn fetch(admin: &Path, ns: &str, pod: &str, url: &str) -> Result<String, String> {
    let (ok, body) = kubectl(
        admin,
        &[
            "exec", "-n", ns, pod, "--", "timeout", "5", "wget", "-q", "-O", "-", url,
        ],
    );
    if ok { Ok(body) } else { Err(body) }
}

/// kube-router enforces a NetworkPolicy: a pod of another namespace reaches the web pod until a
/// policy admits only the toolbox pod of its own namespace, and then no longer does.
async fn network_policy_enforced(rig: &Rig, ns: &str, url: &str) {
    let admin = rig.kubeconfig_path();
    let client = rig.kube_client().await;
    let outsider = unique_name("outsider");
    let namespace: Namespace = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": outsider, "labels": {"pod-security.kubernetes.io/enforce": "restricted"}},
    }))
    .unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();
    let outsider_pods = Api::<Pod>::namespaced(client.clone(), &outsider);
    outsider_pods
        .create(&PostParams::default(), &restricted_pod("intruder"))
        .await
        .unwrap();
    running(&outsider_pods, "intruder").await;
    until(
        "the intruder reaching web before any policy",
        Duration::from_secs(30),
        || async { fetch(admin, &outsider, "intruder", url).map(|_| ()) },
    )
    .await;

    let policy = serde_json::json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "web-from-toolbox"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "toolbox"}}}]}],
        },
    });
    let policies = Api::<NetworkPolicy>::namespaced(client.clone(), ns);
    policies
        .create(
            &PostParams::default(),
            &serde_json::from_value(policy).unwrap(),
        )
        .await
        .unwrap();
    until(
        "the policy cutting the intruder off",
        Duration::from_secs(60),
        || async {
            match fetch(admin, &outsider, "intruder", url) {
                Ok(body) => Err(format!("the intruder still got {body:?}")),
                Err(_) => Ok(()),
            }
        },
    )
    .await;
    let body = fetch(admin, ns, "toolbox", url)
        .unwrap_or_else(|e| panic!("the toolbox pod, which the policy admits, got no answer: {e}"));
    assert_eq!(body.trim(), "web");
}

/// The kubelet restarts a container that the OOM killer killed (it allocates past its 32Mi
/// limit) and one whose liveness probe fails, and says why in the container's last state.
async fn killed_containers_restart(rig: &Rig, ns: &str) {
    let pods = Api::<Pod>::namespaced(rig.kube_client().await, ns);
    let hog = toolbox_pod(
        "memory-hog",
        "echo allocating; x=$(busybox head -c 200m /dev/zero | busybox tr '\\0' a); sleep 3600",
    );
    let mut unhealthy = toolbox_pod("unhealthy", "while true; do sleep 1; done");
    unhealthy.spec.as_mut().unwrap().containers[0].liveness_probe = Some(
        serde_json::from_value(serde_json::json!({
            "exec": {"command": ["cat", "/no-such-file"]},
            "initialDelaySeconds": 1, "periodSeconds": 2, "failureThreshold": 1,
        }))
        .unwrap(),
    );
    for pod in [&hog, &unhealthy] {
        pods.create(&PostParams::default(), pod).await.unwrap();
    }
    for (name, reason) in [("memory-hog", Some("OOMKilled")), ("unhealthy", None)] {
        until(
            &format!("the kubelet restarting container {name}"),
            Duration::from_secs(120),
            || async {
                let pod = pods.get(name).await.map_err(|e| e.to_string())?;
                let statuses = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.container_statuses.clone())
                    .unwrap_or_default();
                let seen = serde_json::to_string(&statuses).unwrap_or_default();
                let Some(c) = statuses.first() else {
                    return Err(seen);
                };
                let last = c.last_state.as_ref().and_then(|s| s.terminated.as_ref());
                let why = last.and_then(|t| t.reason.clone());
                let reason_ok = reason.is_none_or(|r| why.as_deref() == Some(r));
                if c.restart_count >= 1 && last.is_some() && reason_ok {
                    Ok(())
                } else {
                    Err(seen)
                }
            },
        )
        .await;
    }
    let events = kubectl(
        rig.kubeconfig_path(),
        &[
            "get",
            "events",
            "-n",
            ns,
            "--field-selector",
            "involvedObject.name=unhealthy",
        ],
    )
    .1;
    assert!(
        events.contains("Unhealthy") && events.contains("Liveness probe failed"),
        "the kubelet's events should name the failed liveness probe: {events}"
    );
}

async fn checks_on_the_node(rig: &Rig, node: &KubeletNode) -> (String, String) {
    let admin = rig.kubeconfig_path();
    let client = rig.kube_client().await;

    // Its own identity: the kubelet's credentials may not touch another Node.
    let other: Node = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": unique_name("other-node")},
    }))
    .unwrap();
    let other = Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &other)
        .await
        .unwrap();
    let other_name = other.metadata.name.unwrap();
    let kubelet_client = chat_rig::client_from_kubeconfig(&node.info().kubelet_kubeconfig, None)
        .await
        .unwrap();
    let label = serde_json::json!({"metadata": {"labels": {"chatoperator.dev/hijacked": "yes"}}});
    let err = Api::<Node>::all(kubelet_client.clone())
        .patch(&other_name, &PatchParams::default(), &Patch::Merge(&label))
        .await
        .expect_err("the kubelet's identity must not change another Node");
    assert!(
        matches!(&err, kube::Error::Api(e) if e.code == 403),
        "expected 403 Forbidden from the Node authorizer, got {err}"
    );
    Api::<Node>::all(client.clone())
        .patch(
            &node.info().name,
            &PatchParams::default(),
            &Patch::Merge(&label),
        )
        .await
        .unwrap();
    let _ = Api::<Node>::all(client.clone())
        .delete(&other_name, &Default::default())
        .await;

    // A restricted namespace admits the pod; the kubelet runs it as the user it names.
    let ns_name = unique_name("real-node");
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": ns_name, "labels": {"pod-security.kubernetes.io/enforce": "restricted"}},
    }))
    .unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    let pods = Api::<Pod>::namespaced(client.clone(), &ns_name);
    let mut root_pod = restricted_pod("as-root");
    root_pod
        .spec
        .as_mut()
        .unwrap()
        .security_context
        .as_mut()
        .unwrap()
        .run_as_user = Some(0);
    let refused = pods.create(&PostParams::default(), &root_pod).await;
    assert!(
        matches!(&refused, Err(kube::Error::Api(e)) if e.code == 403 && e.message.contains("restricted")),
        "Pod Security Admission must refuse a root pod in a restricted namespace: {refused:?}"
    );
    pods.create(&PostParams::default(), &restricted_pod("toolbox"))
        .await
        .unwrap();
    pods.create(
        &PostParams::default(),
        &toolbox_pod("web", "exec httpd -f -p 8080 -h /etc"),
    )
    .await
    .unwrap();
    let web: Service = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }))
    .unwrap();
    Api::<Service>::namespaced(client.clone(), &ns_name)
        .create(&PostParams::default(), &web)
        .await
        .unwrap();
    for name in ["toolbox", "web"] {
        running(&pods, name).await;
    }

    let (ok, logs) = kubectl(admin, &["logs", "-n", &ns_name, "toolbox"]);
    assert!(
        ok && logs.contains("hello from the real node"),
        "kubectl logs: {logs}"
    );
    let (ok, uid) = kubectl(
        admin,
        &["exec", "-n", &ns_name, "toolbox", "--", "id", "-u"],
    );
    assert!(ok && uid.trim() == "65532", "kubectl exec id -u: {uid}");
    let (ok, write) = kubectl(
        admin,
        &["exec", "-n", &ns_name, "toolbox", "--", "touch", "/written"],
    );
    assert!(
        !ok && write.contains("Read-only file system"),
        "writing the root file system must fail: {write}"
    );

    // Cluster DNS (CoreDNS, a pod) and a ClusterIP (kube-proxy): the kubelet writes the pod's
    // /etc/hostname, which the web pod serves.
    let (ok, lookup) = kubectl(
        admin,
        &[
            "exec",
            "-n",
            &ns_name,
            "toolbox",
            "--",
            "nslookup",
            "kubernetes.default.svc.cluster.local",
        ],
    );
    assert!(
        ok && lookup.contains("10.0.0.1"),
        "nslookup through CoreDNS: {lookup}"
    );
    // busybox's wget is static glibc, which cannot resolve names without NSS modules (and its
    // -T crashes it): resolve with nslookup, then fetch by the address.
    let name = format!("web.{ns_name}.svc.cluster.local");
    let (ok, lookup) = kubectl(
        admin,
        &["exec", "-n", &ns_name, "toolbox", "--", "nslookup", &name],
    );
    let web_ip = lookup
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Address:"))
        .map(|a| a.trim().to_string())
        .rfind(|a| a.starts_with("10.0.0."));
    let Some(web_ip) = web_ip.filter(|_| ok) else {
        panic!("nslookup {name} gave no ClusterIP: {lookup}")
    };
    let url = format!("http://{web_ip}/hostname");
    let (ok, body) = kubectl(
        admin,
        &[
            "exec", "-n", &ns_name, "toolbox", "--", "wget", "-q", "-O", "-", &url,
        ],
    );
    assert!(
        ok && body.trim() == "web",
        "GET {url} ({name}) through the ClusterIP: {body}"
    );
    (ns_name, url)
}

async fn running(pods: &Api<Pod>, name: &str) {
    until(
        &format!("pod {name} Running"),
        Duration::from_secs(90),
        || async {
            let pod = pods.get(name).await.map_err(|e| e.to_string())?;
            let status = pod.status.unwrap_or_default();
            if status.phase.as_deref() == Some("Running") {
                Ok(())
            } else {
                Err(format!(
                    "node {:?}, status {}",
                    pod.spec.and_then(|s| s.node_name),
                    serde_json::to_string(&status).unwrap_or_default()
                ))
            }
        },
    )
    .await;
}

#[test]
fn a_real_node_runs_restricted_pods_and_leaves_the_host_as_it_found_it() {
    let before = HostSnapshot::take().unwrap();
    let dir = chat_rig::run_dir().unwrap().join("kubelet-node-test");
    let rig = Rig::start(
        &dir,
        Parts {
            kubernetes: true,
            redis: false,
            mongodb: false,
            ollama: false,
            tls_stores: false,
        },
    )
    .unwrap();
    let mut node =
        KubeletNode::start(&rig, KubeletNodeOptions::default()).unwrap_or_else(|e| panic!("{e:#}"));
    let node_dir = node.info().dir.clone();
    eprintln!("bring-up: {:.1} s", node.info().bring_up.as_secs_f64());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (ns, web_url) = rt.block_on(checks_on_the_node(&rig, &node));
    rt.block_on(top_pod_works(&rig, &ns));
    rt.block_on(network_policy_enforced(&rig, &ns, &web_url));
    rt.block_on(killed_containers_restart(&rig, &ns));
    rt.block_on(survives_restarts(&rig, &mut node, &ns));
    node.stop().unwrap_or_else(|e| panic!("{e:#}"));
    drop(rig);

    let left = leftovers(&node_dir);
    assert!(left.is_empty(), "the node left behind: {}", left.join("\n"));
    let after = HostSnapshot::take().unwrap();
    let changed = before.differences(&after);
    assert!(
        changed.is_empty(),
        "the host differs after the node stopped: {}",
        changed.join("\n")
    );
}
