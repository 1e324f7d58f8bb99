//! Storage for the node's pods: a default StorageClass [`STORAGE_CLASS`] and a provisioner
//! thread that gives each of its pending claims a hostPath PersistentVolume in a folder of the
//! node (mode 0777, since a hostPath volume is not chowned to the pod's fsGroup), bound to the
//! claim through `claimRef`. The API server's PV controller does the binding; when the node
//! stops, its volumes are deleted with it. A cluster would run a CSI driver or a local-path
//! provisioner here; neither is available from the registries this machine reaches.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};

/// The default StorageClass the node serves.
pub const STORAGE_CLASS: &str = "rig-local";
const PROVISIONER: &str = "chatoperator.dev/rig-host-path";
/// Label of every PersistentVolume the provisioner made.
const VOLUME_LABEL: &str = "chatoperator.dev/rig-volume";

/// The provisioner thread; stops when dropped.
pub struct Provisioner {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Provisioner {
    /// Creates the StorageClass and starts provisioning claims into folders under `dir`.
    pub fn start(admin: &Path, dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let (admin, dir) = (admin.to_path_buf(), dir.to_path_buf());
        let class = serde_json::json!({
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": STORAGE_CLASS, "annotations": {
                "storageclass.kubernetes.io/is-default-class": "true"}},
            "provisioner": PROVISIONER,
            "reclaimPolicy": "Delete",
            "volumeBindingMode": "Immediate",
        });
        let class: StorageClass = serde_json::from_value(class)?;
        let admin2 = admin.clone();
        super::block_on(async move {
            let client = crate::client_from_kubeconfig(&admin2, None).await?;
            Api::<StorageClass>::all(client)
                .patch(
                    STORAGE_CLASS,
                    &PatchParams::apply("chat-rig").force(),
                    &Patch::Apply(&class),
                )
                .await?;
            Ok(())
        })
        .context("rig step 'storage class' failed")?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(client) = crate::client_from_kubeconfig(&admin, None).await else {
                    eprintln!("[kubelet-node] the volume provisioner cannot reach the API server");
                    return;
                };
                while !flag.load(Ordering::Relaxed) {
                    if let Err(e) = provision_pending(&client, &dir).await {
                        eprintln!("[kubelet-node] volume provisioner: {e:#}");
                    }
                    tokio::time::sleep(Duration::from_millis(700)).await;
                }
            });
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Provisioner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One pass: a volume for every pending claim of [`STORAGE_CLASS`] that has none yet.
async fn provision_pending(client: &kube::Client, dir: &Path) -> Result<()> {
    let claims = Api::<PersistentVolumeClaim>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let volumes = Api::<PersistentVolume>::all(client.clone());
    for claim in claims.items {
        let spec = claim.spec.clone().unwrap_or_default();
        let pending = claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending");
        if !pending
            || spec.volume_name.is_some()
            || spec.storage_class_name.as_deref() != Some(STORAGE_CLASS)
        {
            continue;
        }
        let (Some(uid), Some(name), Some(ns)) = (
            claim.metadata.uid.clone(),
            claim.metadata.name.clone(),
            claim.metadata.namespace.clone(),
        ) else {
            continue;
        };
        let pv_name = format!("rig-pv-{uid}");
        let path: PathBuf = dir.join(&uid);
        std::fs::create_dir_all(&path)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777))?;
        let size = spec
            .resources
            .and_then(|r| r.requests)
            .and_then(|r| r.get("storage").cloned())
            .map(|q| q.0)
            .unwrap_or_else(|| "1Gi".into());
        let pv = serde_json::json!({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": pv_name, "labels": {VOLUME_LABEL: "true"}},
            "spec": {
                "capacity": {"storage": size},
                "accessModes": spec.access_modes.unwrap_or_else(|| vec!["ReadWriteOnce".into()]),
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": STORAGE_CLASS,
                "hostPath": {"path": path.display().to_string(), "type": "Directory"},
                "claimRef": {"namespace": ns, "name": name, "uid": uid},
            },
        });
        match volumes
            .create(&PostParams::default(), &serde_json::from_value(pv)?)
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    // A released volume (its claim deleted) goes with its folder.
    for pv in volumes
        .list(&ListParams::default().labels(VOLUME_LABEL))
        .await?
        .items
    {
        if pv.status.and_then(|s| s.phase).as_deref() == Some("Released")
            && let Some(name) = pv.metadata.name
        {
            let _ = volumes.delete(&name, &DeleteParams::default()).await;
            if let Some(uid) = name.strip_prefix("rig-pv-") {
                let _ = std::fs::remove_dir_all(dir.join(uid));
            }
        }
    }
    Ok(())
}

/// Deletes every volume the provisioner made and the StorageClass (the folders go with the
/// node's folder); returns what failed.
pub fn delete_all(admin: &Path) -> Vec<String> {
    let admin = admin.to_path_buf();
    let result = super::block_on(async move {
        let client = crate::client_from_kubeconfig(&admin, None).await?;
        let volumes = Api::<PersistentVolume>::all(client.clone());
        let lp = ListParams::default().labels(VOLUME_LABEL);
        volumes
            .delete_collection(&DeleteParams::default(), &lp)
            .await?;
        match Api::<StorageClass>::all(client)
            .delete(STORAGE_CLASS, &DeleteParams::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    });
    match result {
        Ok(()) => Vec::new(),
        Err(e) => vec![format!("deleting the node's volumes: {e:#}")],
    }
}
