//! A real Kubernetes control plane: etcd, kube-apiserver and kube-controller-manager, with a CA,
//! serving certificates and an admin identity (group system:masters) made by openssl.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::paths;
use crate::process::ManagedProcess;
use crate::servers::{Etcd, free_port, wait_healthy};

/// Certificates and keys of one control plane.
struct Pki {
    ca_crt: PathBuf,
    ca_key: PathBuf,
    serving_crt: PathBuf,
    serving_key: PathBuf,
    admin_crt: PathBuf,
    admin_key: PathBuf,
    sa_key: PathBuf,
    sa_pub: PathBuf,
}

/// Writes `<name>.key` and `<name>.crt` in `dir`: an EC P-256 key and a certificate for `subj`
/// (an openssl subject such as `/O=group/CN=user`) with the extensions `ext`, signed by the CA.
pub(crate) fn issue_cert(
    dir: &Path,
    ca_crt: &Path,
    ca_key: &Path,
    name: &str,
    subj: &str,
    ext: &str,
) -> Result<()> {
    let key = format!("{name}.key");
    let csr = format!("{name}.csr");
    let crt = format!("{name}.crt");
    let extfile = format!("{name}.ext");
    fs::write(dir.join(&extfile), ext)?;
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            subj,
        ],
    )?;
    let (ca_crt, ca_key) = (ca_crt.display().to_string(), ca_key.display().to_string());
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "3650",
            "-extfile",
            &extfile,
        ],
    )
}

pub(crate) fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running openssl (Debian package openssl)")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl Pki {
    fn create(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir)?;
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend(["-keyout", "ca.key", "-out", "ca.crt", "-days", "3650"]);
        ca.extend(["-subj", "/CN=chat-operator-rig-ca"]);
        openssl(dir, &ca)?;
        let leaf = |name: &str, subj: &str, ext: &str| {
            issue_cert(
                dir,
                &dir.join("ca.crt"),
                &dir.join("ca.key"),
                name,
                subj,
                ext,
            )
        };
        leaf(
            "serving",
            "/CN=kube-apiserver",
            "subjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n",
        )?;
        leaf(
            "admin",
            "/O=system:masters/CN=chat-operator-rig-admin",
            "extendedKeyUsage=clientAuth\n",
        )?;
        openssl(
            dir,
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                "sa.key",
            ],
        )?;
        openssl(dir, &["ec", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
        Ok(Self {
            ca_crt: dir.join("ca.crt"),
            ca_key: dir.join("ca.key"),
            serving_crt: dir.join("serving.crt"),
            serving_key: dir.join("serving.key"),
            admin_crt: dir.join("admin.crt"),
            admin_key: dir.join("admin.key"),
            sa_key: dir.join("sa.key"),
            sa_pub: dir.join("sa.pub"),
        })
    }
}

/// A running control plane; everything stops when it is dropped.
pub struct ControlPlane {
    // Field order is drop order: controller-manager, then the API server, then etcd.
    _controller_manager: ManagedProcess,
    _apiserver: ManagedProcess,
    _etcd: Etcd,
    pub url: String,
    pub kubeconfig: PathBuf,
}

fn write_kubeconfig(path: &Path, url: &str, pki: &Pki) -> Result<()> {
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "rig", "cluster": {
            "server": url,
            "certificate-authority": pki.ca_crt,
        }}],
        "users": [{"name": "rig-admin", "user": {
            "client-certificate": pki.admin_crt,
            "client-key": pki.admin_key,
        }}],
        "contexts": [{"name": "rig", "context": {"cluster": "rig", "user": "rig-admin", "namespace": "default"}}],
        "current-context": "rig",
    });
    fs::write(path, serde_yaml::to_string(&config)?)?;
    Ok(())
}

/// An HTTPS GET with the admin identity, via curl-free means: kube-apiserver health is read by
/// the kube client once it is up; before that we only need the port to answer TLS.
fn https_port_open(port: u16) -> Result<()> {
    std::net::TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse()?,
        Duration::from_millis(300),
    )?;
    Ok(())
}

impl ControlPlane {
    pub fn start(dir: &Path) -> Result<Self> {
        let pki = Pki::create(&dir.join("pki")).context("rig step 'pki' failed")?;
        let etcd = Etcd::start(&dir.join("etcd"))?;

        let port = free_port()?;
        let url = format!("https://127.0.0.1:{port}");
        let kubeconfig = dir.join("admin.kubeconfig");
        write_kubeconfig(&kubeconfig, &url, &pki)?;
        let p = |p: &Path| p.display().to_string();
        let mut cmd = Command::new(paths::cached_bin("kube-apiserver")?);
        cmd.arg(format!("--etcd-servers={}", etcd.client_url))
            .arg("--bind-address=127.0.0.1")
            // The `kubernetes` Service's endpoint: the real node's bridge address, where it
            // forwards to this loopback listener, so pods reach the API server.
            .arg(format!(
                "--advertise-address={}",
                crate::kubelet_node::POD_GATEWAY
            ))
            .arg(format!("--secure-port={port}"))
            .arg(format!(
                "--cert-dir={}",
                dir.join("apiserver-certs").display()
            ))
            .arg(format!("--tls-cert-file={}", p(&pki.serving_crt)))
            .arg(format!("--tls-private-key-file={}", p(&pki.serving_key)))
            .arg(format!("--client-ca-file={}", p(&pki.ca_crt)))
            .arg("--service-cluster-ip-range=10.0.0.0/24")
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!("--service-account-key-file={}", p(&pki.sa_pub)))
            .arg(format!(
                "--service-account-signing-key-file={}",
                p(&pki.sa_key)
            ))
            // The Node authorizer and NodeRestriction confine a kubelet (group system:nodes) to
            // its own Node and pods; the admin identity lets the API server reach kubelets for
            // `kubectl logs` and `exec`.
            .arg("--authorization-mode=Node,RBAC")
            .arg("--enable-admission-plugins=NodeRestriction")
            .arg(format!(
                "--kubelet-client-certificate={}",
                p(&pki.admin_crt)
            ))
            .arg(format!("--kubelet-client-key={}", p(&pki.admin_key)))
            // A rig node's name does not resolve; its InternalIP is on the node's bridge.
            .arg("--kubelet-preferred-address-types=InternalIP,Hostname")
            .arg("--allow-privileged=true")
            .arg("--profiling=false")
            .arg("--v=1");
        let mut apiserver =
            ManagedProcess::spawn("kube-apiserver", cmd, &dir.join("kube-apiserver.log"))?;
        let ready_kubeconfig = kubeconfig.clone();
        wait_healthy(&mut apiserver, Duration::from_secs(90), || {
            https_port_open(port)?;
            api_ready(&ready_kubeconfig)
        })?;

        let kcm_port = free_port()?;
        let mut cmd = Command::new(paths::cached_bin("kube-controller-manager")?);
        cmd.arg(format!("--kubeconfig={}", p(&kubeconfig)))
            .arg(format!("--authentication-kubeconfig={}", p(&kubeconfig)))
            .arg(format!("--authorization-kubeconfig={}", p(&kubeconfig)))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={kcm_port}"))
            .arg(format!("--cert-dir={}", dir.join("kcm-certs").display()))
            .arg("--leader-elect=false")
            .arg(format!(
                "--service-account-private-key-file={}",
                p(&pki.sa_key)
            ))
            .arg(format!("--root-ca-file={}", p(&pki.ca_crt)))
            .arg(format!("--cluster-signing-cert-file={}", p(&pki.ca_crt)))
            .arg(format!("--cluster-signing-key-file={}", p(&pki.ca_key)))
            .arg("--v=1");
        let mut controller_manager = ManagedProcess::spawn(
            "kube-controller-manager",
            cmd,
            &dir.join("kube-controller-manager.log"),
        )?;
        wait_healthy(&mut controller_manager, Duration::from_secs(60), || {
            https_port_open(kcm_port)
        })?;
        Ok(Self {
            _controller_manager: controller_manager,
            _apiserver: apiserver,
            _etcd: etcd,
            url,
            kubeconfig,
        })
    }
}

/// `GET /readyz` through the kube client with the admin identity.
fn api_ready(kubeconfig: &Path) -> Result<()> {
    let kubeconfig = kubeconfig.to_path_buf();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let client = crate::client_from_kubeconfig(&kubeconfig, None).await?;
        let req = http::Request::get("/readyz").body(Vec::new())?;
        let text = tokio::time::timeout(Duration::from_secs(5), client.request_text(req))
            .await
            .context("readyz timed out")??;
        if text.trim() == "ok" {
            Ok(())
        } else {
            bail!("readyz: {text}")
        }
    })
}
