//! Shared by the tests that run on the rig's real node: the real kubectl client, HTTP calls to
//! the chat service, probes from a toolbox container inside a pod, and the diagnostics a failed
//! test prints (conditions, events, pod statuses, container logs).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use chat_rig::paths;

/// The real kubectl client against one API server.
#[derive(Clone)]
pub struct Kubectl {
    pub kubeconfig: PathBuf,
}

impl Kubectl {
    /// Runs kubectl; whether it succeeded, and its stdout and stderr together.
    pub fn try_run(&self, args: &[&str]) -> (bool, String) {
        let out =
            Command::new(paths::cached_bin("kubectl").expect("kubectl (tests/rig/install.sh)"))
                .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
                .args(args)
                .output()
                .expect("running kubectl");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// Runs kubectl and fails the test, with its output, when it fails.
    pub fn run(&self, args: &[&str]) -> String {
        let (ok, out) = self.try_run(args);
        assert!(ok, "kubectl {} failed: {out}", args.join(" "));
        out
    }

    /// What a failed test needs to say why: every ChatService's conditions, the events, each
    /// pod's status, and the logs (current and previous) of every container.
    pub fn dump(&self) {
        eprintln!("===== diagnostics from the real node =====");
        for args in [
            &["get", "nodes", "-o", "wide"][..],
            &["get", "pods", "-A", "-o", "wide"],
            &[
                "get",
                "chatservices",
                "-A",
                "-o",
                "jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name}:{\"\\n\"}{range .status.conditions[*]}  {.type}={.status} ({.reason}): {.message}{\"\\n\"}{end}{end}",
            ],
            &["get", "events", "-A", "--sort-by=.lastTimestamp"],
            &[
                "get",
                "pods",
                "-A",
                "-o",
                "jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name}: {.status}{\"\\n\"}{end}",
            ],
        ] {
            let (_, out) = self.try_run(args);
            eprintln!("--- kubectl {}\n{out}", args.join(" "));
        }
        let (_, pods) = self.try_run(&[
            "get",
            "pods",
            "-A",
            "-o",
            "jsonpath={range .items[*]}{.metadata.namespace} {.metadata.name}{\"\\n\"}{end}",
        ]);
        for line in pods.lines() {
            let Some((ns, pod)) = line.split_once(' ') else {
                continue;
            };
            for previous in [false, true] {
                let mut args = vec![
                    "logs",
                    "-n",
                    ns,
                    pod,
                    "--all-containers",
                    "--prefix",
                    "--tail=40",
                ];
                if previous {
                    args.push("--previous");
                }
                let (ok, out) = self.try_run(&args);
                if ok || !previous {
                    eprintln!(
                        "--- kubectl logs {ns}/{pod}{}\n{out}",
                        if previous { " --previous" } else { "" }
                    );
                }
            }
        }
        eprintln!("===== end of diagnostics =====");
    }

    /// Adds an ephemeral container of the node's toolbox image (busybox, user 65532, the
    /// `restricted` profile) to `pod`, sharing the process namespace of its container `target`,
    /// and waits until it runs; returns its name, for [`Kubectl::exec_in`].
    pub fn attach_toolbox(&self, ns: &str, pod: &str, target: &str) -> String {
        let name = format!("probe-{}", chat_rig::unique_name("t").replace('-', ""));
        let name = name[..name.len().min(40)].to_string();
        self.run(&[
            "debug",
            "-n",
            ns,
            pod,
            "--image",
            chat_rig::kubelet_node::images::TOOLBOX_IMAGE,
            "--image-pull-policy=Never",
            "--profile=restricted",
            "--target",
            target,
            "--container",
            &name,
            "--",
            "sleep",
            "3600",
        ]);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (ok, state) = self.try_run(&[
                "get",
                "pod",
                "-n",
                ns,
                pod,
                "-o",
                &format!(
                    "jsonpath={{.status.ephemeralContainerStatuses[?(@.name==\"{name}\")].state}}"
                ),
            ]);
            if ok && state.contains("running") {
                return name;
            }
            assert!(
                Instant::now() < deadline,
                "the toolbox container {name} in {ns}/{pod} did not start within 60 s: {state}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// `kubectl exec` of `argv` in container `container` of `pod`.
    pub fn exec_in(&self, ns: &str, pod: &str, container: &str, argv: &[&str]) -> (bool, String) {
        let mut args = vec!["exec", "-n", ns, pod, "-c", container, "--"];
        args.extend_from_slice(argv);
        self.try_run(&args)
    }

    /// Whether a TCP connection from `container` of `pod` to `ip:port` opens within 3 s (busybox
    /// nc, which runs `echo` on the connection and exits once it is open): `Ok`, or nc's output.
    pub fn connects(
        &self,
        ns: &str,
        pod: &str,
        container: &str,
        ip: &str,
        port: u16,
    ) -> Result<(), String> {
        let port = port.to_string();
        let argv = [
            "timeout",
            "5",
            "nc",
            "-w",
            "3",
            ip,
            &port,
            "-e",
            "/bin/echo",
        ];
        match self.exec_in(ns, pod, container, &argv) {
            (true, _) => Ok(()),
            (false, out) => Err(out),
        }
    }
}

/// The repository's own file `path`.
pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// A JSON request with a fresh connection each time (so the Service proxy balances them).
pub async fn http(
    method: reqwest::Method,
    url: &str,
    body: Option<serde_json::Value>,
) -> (u16, String) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap();
    let mut req = client.request(method, url);
    if let Some(b) = body {
        req = req.json(&b);
    }
    match req.send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.text().await.unwrap_or_default())
        }
        Err(e) => (0, format!("{e}")),
    }
}

/// One chat turn at `base`; retries while the service answers 503 (its health checks have not
/// yet seen a back end) or the connection fails (a pod going away right after a rollout).
pub async fn chat(base: &str, session: Option<&str>, message: &str) -> serde_json::Value {
    let mut body = serde_json::json!({"message": message});
    if let Some(s) = session {
        body["session_id"] = s.into();
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    let (status, text) = loop {
        let (status, text) = http(
            reqwest::Method::POST,
            &format!("{base}/v1/chat"),
            Some(body.clone()),
        )
        .await;
        if !matches!(status, 0 | 503) || Instant::now() > deadline {
            break (status, text);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    assert_eq!(status, 200, "POST {base}/v1/chat answered {status}: {text}");
    serde_json::from_str(&text).unwrap()
}
