//! Benchmark (not a test): the operator at scale, issue 7 item 4.
//!
//! Against the rig's real kube-apiserver and kube-controller-manager (started by this benchmark,
//! stopped when it ends), the release `chat-operator` binary runs as a subprocess. The benchmark
//! creates N ChatServices (default 500, like `examples/minimal.yaml`: managed Redis and MongoDB,
//! one external back end) spread over M namespaces, then measures:
//!
//! * time until every ChatService has a status, and until every one has all its children and a
//!   status whose `observedGeneration` is current ("converged");
//! * the operator's peak RSS (`VmHWM` in `/proc/<pid>/status`);
//! * the writes one full resync of the converged objects makes, twice over: the write requests
//!   kube-apiserver received (its own `apiserver_request_total`, before and after) and the objects
//!   that actually changed (resourceVersions of every ChatService and child, before and after);
//! * the same after an operator restart (a restart re-lists and re-reconciles everything).
//!
//! Run: `cargo bench -p chat-operator --bench convergence` (after `tests/rig/install.sh`).
//! Knobs (environment): `CHATOP_BENCH_CHATSERVICES` (500), `CHATOP_BENCH_NAMESPACES` (10),
//! `CHATOP_BENCH_RESYNC_SECONDS` (30), `CHATOP_BENCH_RESYNC_WINDOWS` (3),
//! `CHATOP_BENCH_MAX_CONCURRENT_RECONCILES` (the operator's default). With `CHATOP_RIG_ENV`
//! set it attaches to a standing `rig up` instead of starting a control plane.
//! Output: a table on stdout and `target/bench/operator-convergence.json`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use chat_operator::build::{self, ChildKind, LABEL_MANAGED_BY, MANAGED_BY};
use chat_operator::crd::ChatService;
use chat_rig::process::ManagedProcess;
use chat_rig::{Parts, Rig};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const RUN_LABEL: &str = "bench.chatoperator.dev/run";
/// Verbs kube-apiserver reports for requests that write. `APPLY` is how it reports a PATCH
/// whose content type is server-side apply, which is every write the operator makes to children.
const WRITE_VERBS: [&str; 6] = [
    "POST",
    "PUT",
    "PATCH",
    "APPLY",
    "DELETE",
    "DELETECOLLECTION",
];
/// The subset named in the brief (it leaves out APPLY and DELETECOLLECTION).
const BRIEF_VERBS: [&str; 4] = ["POST", "PUT", "PATCH", "DELETE"];
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(600);

struct Settings {
    count: usize,
    namespaces: usize,
    resync_seconds: u64,
    windows: usize,
    /// `--max-concurrent-reconciles` for the operator; its default when unset.
    concurrency: Option<u16>,
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) => v.parse().map_err(|_| anyhow!("{name}={v} is not a number")),
        Err(_) => Ok(default),
    }
}

impl Settings {
    fn from_env() -> Result<Self> {
        Ok(Self {
            count: env_num("CHATOP_BENCH_CHATSERVICES", 500)?,
            namespaces: env_num("CHATOP_BENCH_NAMESPACES", 10)?.max(1),
            resync_seconds: env_num("CHATOP_BENCH_RESYNC_SECONDS", 30)?.max(1),
            windows: env_num("CHATOP_BENCH_RESYNC_WINDOWS", 3)?.max(1),
            concurrency: match std::env::var("CHATOP_BENCH_MAX_CONCURRENT_RECONCILES") {
                Ok(v) => Some(v.parse().map_err(|_| {
                    anyhow!("CHATOP_BENCH_MAX_CONCURRENT_RECONCILES={v} is not a number")
                })?),
                Err(_) => None,
            },
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The operator as a subprocess.

/// The release `chat-operator` binary, run with the rig's admin kubeconfig. It runs under the
/// rig's watchdog, so it is stopped however the benchmark ends.
struct OperatorProcess {
    process: ManagedProcess,
    pid: u32,
    metrics: SocketAddr,
    started: Instant,
}

impl OperatorProcess {
    fn start(kubeconfig: &Path, settings: &Settings, log: &Path) -> Result<Self> {
        let metrics: SocketAddr = ([127, 0, 0, 1], chat_rig::free_port()?).into();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_chat-operator"));
        cmd.arg("--disable-leader-election")
            .arg(format!("--metrics-address={metrics}"))
            .arg(format!("--resync-seconds={}", settings.resync_seconds))
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,kube=warn");
        // The operator's own default unless the knob is set (also not from the environment).
        cmd.env_remove("MAX_CONCURRENT_RECONCILES");
        if let Some(n) = settings.concurrency {
            cmd.arg(format!("--max-concurrent-reconciles={n}"));
        }
        let process = ManagedProcess::spawn("chat-operator", cmd, log)?;
        let pid = process.pid().context("chat-operator has no pid")?;
        Ok(Self {
            process,
            pid,
            metrics,
            started: Instant::now(),
        })
    }

    fn pid(&self) -> u32 {
        self.pid
    }

    /// A `Vm*` line of `/proc/<pid>/status`, in bytes.
    fn vm(&self, key: &str) -> Option<u64> {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    }

    async fn metrics_text(&self) -> Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.metrics).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: operator\r\nConnection: close\r\n\r\n")
            .await?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await?;
        Ok(text)
    }

    /// `chatoperator_reconciles_total`, once the metrics server answers.
    async fn reconciles(&mut self) -> Result<u64> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.process.check_running()?;
            if let Ok(text) = self.metrics_text().await
                && let Some(n) = text
                    .lines()
                    .find_map(|l| l.strip_prefix("chatoperator_reconciles_total "))
                    .and_then(|v| v.trim().parse::<f64>().ok())
            {
                return Ok(n as u64);
            }
            if Instant::now() > deadline {
                bail!("the operator's /metrics did not answer within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `chatoperator_api_requests_total` by method: the operator's own requests, counted on its
    /// client (kube-apiserver's counter sums every client, kube-controller-manager included).
    async fn own_requests(&mut self) -> Result<BTreeMap<String, u64>> {
        self.reconciles().await?; // up and serving
        let text = self.metrics_text().await?;
        Ok(text
            .lines()
            .filter_map(|l| l.strip_prefix("chatoperator_api_requests_total{method=\""))
            .filter_map(|l| {
                let (method, value) = l.split_once("\"} ")?;
                Some((method.to_string(), value.trim().parse::<f64>().ok()? as u64))
            })
            .collect())
    }

    /// SIGTERM, up to 30 s for a graceful exit, then SIGKILL. Returns the peak RSS.
    fn stop(mut self) -> u64 {
        let peak = self.vm("VmHWM").unwrap_or(0);
        self.process.stop_with_grace(Duration::from_secs(30));
        peak
    }
}

// ---------------------------------------------------------------------------------------------
// kube-apiserver's request counters.

/// `apiserver_request_total` summed by (verb, resource[/subresource]).
type RequestCounts = BTreeMap<(String, String), f64>;

fn labels_of(text: &str) -> HashMap<&str, &str> {
    let mut out = HashMap::new();
    let mut rest = text;
    while let Some((key, tail)) = rest.split_once("=\"") {
        let Some(end) = tail.find('"') else { break };
        out.insert(key.trim_start_matches(',').trim(), &tail[..end]);
        rest = &tail[end + 1..];
    }
    out
}

async fn apiserver_requests(admin: &Client) -> Result<RequestCounts> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    let text = admin
        .request_text(request)
        .await
        .context("GET /metrics from kube-apiserver")?;
    let mut out = RequestCounts::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let labels = labels_of(labels);
        let value: f64 = value.trim().parse().unwrap_or(0.0);
        let resource = match labels.get("subresource").copied().unwrap_or("") {
            "" => labels.get("resource").copied().unwrap_or("").to_string(),
            sub => format!("{}/{sub}", labels.get("resource").copied().unwrap_or("")),
        };
        let verb = labels.get("verb").copied().unwrap_or("").to_string();
        *out.entry((verb, resource)).or_default() += value;
    }
    if out.is_empty() {
        bail!("kube-apiserver's /metrics has no apiserver_request_total");
    }
    Ok(out)
}

/// Write requests between two readings, by verb and resource (zero rows left out).
fn write_delta(before: &RequestCounts, after: &RequestCounts) -> BTreeMap<(String, String), u64> {
    delta(before, after, &WRITE_VERBS)
}

/// Read requests (GET, LIST; not WATCH) between two readings.
fn read_delta(before: &RequestCounts, after: &RequestCounts) -> u64 {
    delta(before, after, &["GET", "LIST"]).values().sum()
}

fn delta(
    before: &RequestCounts,
    after: &RequestCounts,
    verbs: &[&str],
) -> BTreeMap<(String, String), u64> {
    after
        .iter()
        .filter(|((verb, _), _)| verbs.contains(&verb.as_str()))
        .map(|(key, v)| {
            (
                key.clone(),
                (v - before.get(key).copied().unwrap_or(0.0)).round() as u64,
            )
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

struct Writes {
    rows: BTreeMap<(String, String), u64>,
}

impl Writes {
    fn total(&self) -> u64 {
        self.rows.values().sum()
    }
    fn brief(&self) -> u64 {
        self.rows
            .iter()
            .filter(|((verb, _), _)| BRIEF_VERBS.contains(&verb.as_str()))
            .map(|(_, n)| n)
            .sum()
    }
    fn by_verb(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for ((verb, _), n) in &self.rows {
            *out.entry(verb.clone()).or_default() += n;
        }
        out
    }
    fn json(&self) -> Value {
        json!({
            "total": self.total(),
            "post_put_patch_delete": self.brief(),
            "by_verb": self.by_verb(),
            "by_verb_and_resource": self.rows.iter()
                .map(|((verb, resource), n)| json!({"verb": verb, "resource": resource, "requests": n}))
                .collect::<Vec<_>>(),
        })
    }
    fn summary(&self) -> String {
        let verbs = self
            .by_verb()
            .iter()
            .map(|(v, n)| format!("{v} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!("{} ({verbs})", self.total())
    }
}

// ---------------------------------------------------------------------------------------------
// Object snapshots: what actually changed.

#[derive(Debug, Clone, PartialEq)]
struct Fingerprint {
    resource_version: String,
    /// metadata.generation plus the operator's managedFields entries (fields and time): changes
    /// only when the operator changed something it owns. A workload's resourceVersion also moves
    /// when kube-controller-manager writes its status, which is not the operator's doing.
    operator_owned: String,
}

type Snapshot = BTreeMap<(String, String, String), Fingerprint>;

fn fingerprint(meta: &ObjectMeta) -> Fingerprint {
    let ours = meta
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.manager.as_deref() == Some(build::FIELD_MANAGER))
        .map(|m| serde_json::to_string(m).unwrap_or_default())
        .collect::<Vec<_>>()
        .join(";");
    Fingerprint {
        resource_version: meta.resource_version.clone().unwrap_or_default(),
        operator_owned: format!("{:?}|{ours}", meta.generation),
    }
}

async fn snapshot(admin: &Client, run: &str, namespaces: &BTreeSet<String>) -> Result<Snapshot> {
    let mut out = Snapshot::new();
    let crs = Api::<ChatService>::all(admin.clone())
        .list(&ListParams::default().labels(&format!("{RUN_LABEL}={run}")))
        .await?;
    for cr in crs {
        out.insert(
            (
                "ChatService".into(),
                cr.namespace().unwrap_or_default(),
                cr.name_any(),
            ),
            fingerprint(&cr.metadata),
        );
    }
    let owned = ListParams::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGED_BY}"));
    for kind in ChildKind::ALL {
        let api: Api<DynamicObject> = Api::all_with(admin.clone(), &kind.api_resource());
        for object in api.list_metadata(&owned).await? {
            let namespace = object.namespace().unwrap_or_default();
            if namespaces.contains(&namespace) {
                out.insert(
                    (format!("{kind:?}"), namespace, object.name_any()),
                    fingerprint(&object.metadata),
                );
            }
        }
    }
    Ok(out)
}

#[derive(Default)]
struct Changes {
    objects: usize,
    /// kind -> (objects with a new resourceVersion, of which the operator's own fields changed)
    by_kind: BTreeMap<String, (usize, usize)>,
}

impl Changes {
    fn of(before: &Snapshot, after: &Snapshot) -> Self {
        let mut out = Changes {
            objects: after.len(),
            ..Default::default()
        };
        for (key, new) in after {
            let entry = out.by_kind.entry(key.0.clone()).or_default();
            match before.get(key) {
                Some(old) if old == new => {}
                Some(old) => {
                    if old.resource_version != new.resource_version {
                        entry.0 += 1;
                    }
                    if old.operator_owned != new.operator_owned {
                        entry.1 += 1;
                    }
                }
                // Created in the window.
                None => {
                    entry.0 += 1;
                    entry.1 += 1;
                }
            }
        }
        // Deleted in the window.
        for key in before.keys().filter(|k| !after.contains_key(*k)) {
            let entry = out.by_kind.entry(key.0.clone()).or_default();
            entry.0 += 1;
            entry.1 += 1;
        }
        out
    }
    fn rv_changed(&self) -> usize {
        self.by_kind.values().map(|c| c.0).sum()
    }
    fn operator_changed(&self) -> usize {
        self.by_kind.values().map(|c| c.1).sum()
    }
    fn json(&self) -> Value {
        json!({
            "objects": self.objects,
            "resource_version_changed": self.rv_changed(),
            "operator_fields_changed": self.operator_changed(),
            "by_kind": self.by_kind.iter()
                .filter(|(_, c)| c.0 + c.1 > 0)
                .map(|(k, c)| (k.clone(), json!({"resource_version_changed": c.0, "operator_fields_changed": c.1})))
                .collect::<serde_json::Map<_, _>>(),
        })
    }
    fn summary(&self) -> String {
        let kinds = self
            .by_kind
            .iter()
            .filter(|(_, c)| c.0 > 0)
            .map(|(k, c)| format!("{k} {}", c.0))
            .collect::<Vec<_>>()
            .join(", ");
        if kinds.is_empty() {
            format!("0 of {}", self.objects)
        } else {
            format!("{} of {} ({kinds})", self.rv_changed(), self.objects)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Set-up and convergence.

async fn install_crd(admin: &Client) -> Result<()> {
    let text = std::fs::read_to_string(format!("{WORKSPACE}/crds/chatservice.yaml"))?;
    let crd: CustomResourceDefinition = serde_yaml::from_str(&text)?;
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    crds.patch(
        "chatservices.chatoperator.dev",
        &PatchParams::apply("chat-operator-bench").force(),
        &Patch::Apply(&crd),
    )
    .await
    .context("applying crds/chatservice.yaml")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if Api::<ChatService>::all(admin.clone())
            .list(&ListParams::default().limit(1))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the ChatService CRD was not served within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The rig's API server allocates Service IPs from a /24 (253 addresses), and each ChatService
/// here asks for more than one ClusterIP Service, so 500 would exhaust it ("failed to allocate a
/// serviceIP: range is full"). Kubernetes 1.33+ lets an admin add a range at run time with a
/// ServiceCIDR object; this adds a /16 and waits until it is Ready.
async fn widen_service_ips(admin: &Client) -> Result<()> {
    let api: Api<ServiceCIDR> = Api::all(admin.clone());
    let cidr: ServiceCIDR = serde_json::from_value(json!({
        "metadata": {"name": "chat-operator-bench"},
        "spec": {"cidrs": ["10.200.0.0/16"]},
    }))?;
    api.patch(
        "chat-operator-bench",
        &PatchParams::apply("chat-operator-bench").force(),
        &Patch::Apply(&cidr),
    )
    .await
    .context("adding a ServiceCIDR for the benchmark's Services")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = api
            .get("chat-operator-bench")
            .await?
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the benchmark's ServiceCIDR did not become Ready within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn chat_service(name: &str, namespace: &str, run: &str) -> Result<ChatService> {
    let text = std::fs::read_to_string(format!("{WORKSPACE}/examples/minimal.yaml"))?;
    let mut cr: ChatService = serde_yaml::from_str(&text)?;
    cr.metadata.name = Some(name.into());
    cr.metadata.namespace = Some(namespace.into());
    cr.metadata.labels = Some(BTreeMap::from([(RUN_LABEL.to_string(), run.to_string())]));
    Ok(cr)
}

/// The children the operator must make for `cr` (applied ones and the generated Secrets).
fn expected_children(cr: &ChatService) -> Result<BTreeSet<(String, String, String)>> {
    // The example references no Secret, so nothing needs dereferencing.
    let refs = chat_operator::reconcile::dereference::References::default();
    let validated =
        chat_operator::reconcile::validate::validate(cr, &refs, env!("CARGO_PKG_VERSION"))?;
    let desired = build::desired_children(&validated)?;
    let namespace = cr.namespace().unwrap_or_default();
    Ok(desired
        .keep()
        .into_iter()
        .map(|(kind, name)| (format!("{kind:?}"), namespace.clone(), name))
        .collect())
}

#[derive(Debug, Default)]
struct Convergence {
    created_s: f64,
    first_status_earliest_s: f64,
    first_status_median_s: f64,
    first_status_all_s: f64,
    converged_s: f64,
    children_per_chatservice: usize,
    polls: usize,
}

fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

async fn create_and_converge(
    admin: &Client,
    settings: &Settings,
    run: &str,
    namespaces: &[String],
    operator: &mut OperatorProcess,
    peak_sampled: &mut u64,
) -> Result<Convergence> {
    let started = Instant::now();
    let crs = (0..settings.count)
        .map(|i| {
            let namespace = &namespaces[i % namespaces.len()];
            chat_service(&format!("chat-{i:04}"), namespace, run)
        })
        .collect::<Result<Vec<_>>>()?;
    futures::stream::iter(crs.into_iter().map(|cr| {
        let admin = admin.clone();
        async move {
            Api::<ChatService>::namespaced(admin, &cr.namespace().unwrap_or_default())
                .create(&PostParams::default(), &cr)
                .await
                .map(|_| ())
        }
    }))
    .buffer_unordered(16)
    .try_collect::<Vec<_>>()
    .await
    .context("creating ChatServices")?;
    let mut result = Convergence {
        created_s: started.elapsed().as_secs_f64(),
        ..Default::default()
    };
    eprintln!(
        "[bench] created {} ChatServices in {:.1} s",
        settings.count, result.created_s
    );

    let api = Api::<ChatService>::all(admin.clone());
    let mine = ListParams::default().labels(&format!("{RUN_LABEL}={run}"));
    let owned = ListParams::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGED_BY}"));
    let namespace_set: BTreeSet<&str> = namespaces.iter().map(String::as_str).collect();
    let mut first_status: HashMap<String, f64> = HashMap::new();
    let mut last_report = Instant::now();
    loop {
        operator.process.check_running()?;
        *peak_sampled = (*peak_sampled).max(operator.vm("VmRSS").unwrap_or(0));
        result.polls += 1;
        let now = started.elapsed().as_secs_f64();
        let list = api.list(&mine).await?;
        let mut current = 0;
        for cr in &list {
            if let Some(status) = &cr.status {
                first_status
                    .entry(format!(
                        "{}/{}",
                        cr.namespace().unwrap_or_default(),
                        cr.name_any()
                    ))
                    .or_insert(now);
                if status.observed_generation.is_some()
                    && status.observed_generation == cr.metadata.generation
                {
                    current += 1;
                }
            }
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "[bench] {now:.0} s: {} with a status, {current} current, operator RSS {:.0} MiB",
                first_status.len(),
                operator.vm("VmRSS").unwrap_or(0) as f64 / 1048576.0
            );
            last_report = Instant::now();
        }
        if list.items.len() == settings.count && current == settings.count {
            // Every status is current: check that every child exists too.
            let mut present = BTreeSet::new();
            for kind in ChildKind::ALL {
                let api: Api<DynamicObject> = Api::all_with(admin.clone(), &kind.api_resource());
                for object in api.list_metadata(&owned).await? {
                    let namespace = object.namespace().unwrap_or_default();
                    if namespace_set.contains(namespace.as_str()) {
                        present.insert((format!("{kind:?}"), namespace, object.name_any()));
                    }
                }
            }
            let mut missing = 0;
            let mut per_cr = 0;
            for cr in &list {
                let expected = expected_children(cr)?;
                per_cr = expected.len();
                missing += expected.difference(&present).count();
            }
            if missing == 0 {
                result.converged_s = started.elapsed().as_secs_f64();
                result.children_per_chatservice = per_cr;
                break;
            }
            eprintln!("[bench] statuses current but {missing} children missing");
        }
        if started.elapsed() > CONVERGE_TIMEOUT {
            bail!(
                "not converged after {} s: {} of {} statuses current",
                CONVERGE_TIMEOUT.as_secs(),
                current,
                settings.count
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut times: Vec<f64> = first_status.values().copied().collect();
    result.first_status_median_s = median(&mut times);
    result.first_status_earliest_s = times.first().copied().unwrap_or(f64::NAN);
    result.first_status_all_s = times.last().copied().unwrap_or(f64::NAN);
    Ok(result)
}

/// Waits until nothing the operator owns changes for `quiet` (bounded by `limit`).
async fn settle(
    admin: &Client,
    run: &str,
    namespaces: &BTreeSet<String>,
    quiet: Duration,
    limit: Duration,
) -> Result<(f64, bool)> {
    let started = Instant::now();
    let mut last = snapshot(admin, run, namespaces).await?;
    let mut stable_since = Instant::now();
    while started.elapsed() < limit {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = snapshot(admin, run, namespaces).await?;
        if Changes::of(&last, &now).operator_changed() > 0 {
            stable_since = Instant::now();
        } else if stable_since.elapsed() >= quiet {
            return Ok((started.elapsed().as_secs_f64(), true));
        }
        last = now;
    }
    Ok((started.elapsed().as_secs_f64(), false))
}

/// The operator's own requests between two readings of its counter, by method.
#[derive(Default)]
struct OwnRequests(BTreeMap<String, u64>);

impl OwnRequests {
    fn between(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> Self {
        Self(
            after
                .iter()
                .map(|(m, n)| (m.clone(), n - before.get(m).copied().unwrap_or(0)))
                .filter(|(_, n)| *n > 0)
                .collect(),
        )
    }
    fn writes(&self) -> u64 {
        self.0
            .iter()
            .filter(|(m, _)| m.as_str() != "GET" && m.as_str() != "WATCH")
            .map(|(_, n)| n)
            .sum()
    }
    fn summary(&self) -> String {
        let all = self
            .0
            .iter()
            .map(|(m, n)| format!("{m} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "{} (all requests: {})",
            self.writes(),
            if all.is_empty() { "none" } else { &all }
        )
    }
}

struct Window {
    seconds: f64,
    reconciles: u64,
    /// The operator's own requests (its client's counter).
    own: OwnRequests,
    writes: Writes,
    /// GET and LIST requests (everyone's, the benchmark's own snapshots excluded).
    reads: u64,
    changes: Changes,
}

impl Window {
    fn json(&self) -> Value {
        json!({
            "seconds": self.seconds,
            "reconciles": self.reconciles,
            "operator_own_requests_by_method": self.own.0,
            "operator_own_write_requests": self.own.writes(),
            "read_requests_get_list": self.reads,
            "write_requests": self.writes.json(),
            "objects_changed": self.changes.json(),
        })
    }
}

/// One full periodic resync: from now until the operator has started `count` more reconciles
/// (each converged ChatService is requeued once per resync period).
async fn resync_window(
    admin: &Client,
    run: &str,
    namespaces: &BTreeSet<String>,
    operator: &mut OperatorProcess,
    count: usize,
    timeout: Duration,
) -> Result<Window> {
    let before_objects = snapshot(admin, run, namespaces).await?;
    let before_requests = apiserver_requests(admin).await?;
    let before_reconciles = operator.reconciles().await?;
    let before_own = operator.own_requests().await?;
    let started = Instant::now();
    loop {
        let done = operator.reconciles().await?;
        if done >= before_reconciles + count as u64 {
            break;
        }
        if started.elapsed() > timeout {
            bail!(
                "only {} reconciles in {} s of resync window",
                done - before_reconciles,
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let reconciles = operator.reconciles().await? - before_reconciles;
    let seconds = started.elapsed().as_secs_f64();
    let own = OwnRequests::between(&before_own, &operator.own_requests().await?);
    let after_requests = apiserver_requests(admin).await?;
    let after_objects = snapshot(admin, run, namespaces).await?;
    Ok(Window {
        seconds,
        reconciles,
        own,
        writes: Writes {
            rows: write_delta(&before_requests, &after_requests),
        },
        reads: read_delta(&before_requests, &after_requests),
        changes: Changes::of(&before_objects, &after_objects),
    })
}

struct Restart {
    window: Window,
    all_reconciled_s: f64,
    peak_rss: u64,
}

/// Starts a second operator on the converged objects, waits until it has reconciled every one
/// and gone quiet, stops it, and reports what it wrote.
async fn restart(
    admin: &Client,
    run: &str,
    namespaces: &BTreeSet<String>,
    settings: &Settings,
    kubeconfig: &Path,
    log: &Path,
) -> Result<Restart> {
    let before_objects = snapshot(admin, run, namespaces).await?;
    let before_requests = apiserver_requests(admin).await?;
    let mut operator = OperatorProcess::start(kubeconfig, settings, log)?;
    let started = operator.started;
    let timeout = Duration::from_secs(300);
    let mut all_reconciled_s = None;
    let mut last = (0, Instant::now());
    loop {
        let n = operator.reconciles().await?;
        if all_reconciled_s.is_none() && n >= settings.count as u64 {
            all_reconciled_s = Some(started.elapsed().as_secs_f64());
        }
        if n != last.0 {
            last = (n, Instant::now());
        }
        // Every object's reconcile started and 2 s without a new one: the initial pass is over
        // (the next requeue is a resync period away). The counter counts started reconciles, so
        // the window may close on a few still in flight; the per-kind APPLY counts show it.
        if all_reconciled_s.is_some() && last.1.elapsed() >= Duration::from_secs(2) {
            break;
        }
        if started.elapsed() > timeout {
            bail!(
                "the restarted operator reconciled only {n} in {} s",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let reconciles = operator.reconciles().await?;
    let seconds = started.elapsed().as_secs_f64();
    // A fresh process: its counter started at zero.
    let own = OwnRequests::between(&BTreeMap::new(), &operator.own_requests().await?);
    let peak_rss = operator.stop();
    let after_requests = apiserver_requests(admin).await?;
    let after_objects = snapshot(admin, run, namespaces).await?;
    Ok(Restart {
        window: Window {
            seconds,
            reconciles,
            own,
            writes: Writes {
                rows: write_delta(&before_requests, &after_requests),
            },
            reads: read_delta(&before_requests, &after_requests),
            changes: Changes::of(&before_objects, &after_objects),
        },
        all_reconciled_s: all_reconciled_s.unwrap_or(f64::NAN),
        peak_rss,
    })
}

/// Write requests in a window with no operator running: what the control plane writes by itself.
async fn idle_baseline(admin: &Client, seconds: u64) -> Result<Writes> {
    let before = apiserver_requests(admin).await?;
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let after = apiserver_requests(admin).await?;
    Ok(Writes {
        rows: write_delta(&before, &after),
    })
}

fn concurrency_label(settings: &Settings) -> String {
    match settings.concurrency {
        Some(n) => n.to_string(),
        None => format!(
            "{} (default)",
            chat_operator::controller::DEFAULT_MAX_CONCURRENT_RECONCILES
        ),
    }
}

/// `/proc/loadavg`'s 1, 5 and 15 minute figures: how busy the shared machine was.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|| "?".into())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

async fn bench(rig: &Rig, settings: &Settings, logs: &Path) -> Result<Value> {
    let admin = rig.kube_client().await;
    install_crd(&admin).await?;
    let run = chat_rig::unique_name("conv");
    let namespaces: Vec<String> = (0..settings.namespaces)
        .map(|i| chat_rig::unique_name(&format!("bench{i:02}")))
        .collect();
    for ns in &namespaces {
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(ns.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(admin.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .with_context(|| format!("creating namespace {ns}"))?;
    }
    widen_service_ips(&admin).await?;
    let namespace_set: BTreeSet<String> = namespaces.iter().cloned().collect();
    let kubeconfig = rig.kubeconfig_path().to_path_buf();

    // Baseline: what the control plane writes with no operator running.
    let baseline_seconds = settings.resync_seconds.min(30);
    eprintln!("[bench] {baseline_seconds} s idle baseline (no operator)");
    let baseline = idle_baseline(&admin, baseline_seconds).await?;

    // 1. Converge.
    let mut operator = OperatorProcess::start(&kubeconfig, settings, &logs.join("operator-1.log"))?;
    operator.reconciles().await?; // up and serving
    let idle_rss = operator.vm("VmRSS").unwrap_or(0);
    let mut sampled_peak = idle_rss;
    eprintln!(
        "[bench] operator up (pid {}), creating {} ChatServices in {} namespaces",
        operator.pid(),
        settings.count,
        settings.namespaces
    );
    let converged = create_and_converge(
        &admin,
        settings,
        &run,
        &namespaces,
        &mut operator,
        &mut sampled_peak,
    )
    .await?;
    let peak_at_convergence = operator.vm("VmHWM").unwrap_or(0);
    eprintln!(
        "[bench] converged in {:.1} s; peak RSS so far {:.1} MiB",
        converged.converged_s,
        mib(peak_at_convergence)
    );

    // 2. Settle (kube-controller-manager reports workload status, the operator follows).
    let (settle_s, settled) = settle(
        &admin,
        &run,
        &namespace_set,
        Duration::from_secs(15),
        // kube-controller-manager creates the ReplicaSets and pods at its own client rate limit
        // (20 requests/s by default), and the ChatService status rightly follows each workload
        // status it writes: minutes for 500 ChatServices on a busy machine.
        Duration::from_secs(300),
    )
    .await?;
    eprintln!("[bench] settled={settled} after {settle_s:.0} s");

    // 3. Periodic resyncs of the converged objects.
    let mut windows = Vec::new();
    for i in 0..settings.windows {
        let window = resync_window(
            &admin,
            &run,
            &namespace_set,
            &mut operator,
            settings.count,
            Duration::from_secs(settings.resync_seconds * 3 + 60),
        )
        .await?;
        eprintln!(
            "[bench] resync {}: {} reconciles in {:.1} s, write requests {}, objects changed {}",
            i + 1,
            window.reconciles,
            window.seconds,
            window.writes.summary(),
            window.changes.summary()
        );
        windows.push(window);
    }
    let steady_rss = operator.vm("VmRSS").unwrap_or(0);
    let peak_rss = operator.stop();

    // 4. Restart.
    eprintln!("[bench] restarting the operator");
    let restarted = restart(
        &admin,
        &run,
        &namespace_set,
        settings,
        &kubeconfig,
        &logs.join("operator-2.log"),
    )
    .await?;
    eprintln!(
        "[bench] restart: {} reconciles, write requests {}, objects changed {}",
        restarted.window.reconciles,
        restarted.window.writes.summary(),
        restarted.window.changes.summary()
    );

    // Medians over the resync windows.
    let med = |f: &dyn Fn(&Window) -> f64| median(&mut windows.iter().map(f).collect::<Vec<_>>());
    let resync_writes = med(&|w| w.writes.total() as f64);
    let resync_brief = med(&|w| w.writes.brief() as f64);
    let resync_apply = med(&|w| w.writes.by_verb().get("APPLY").copied().unwrap_or(0) as f64);
    let resync_changed = med(&|w| w.changes.rv_changed() as f64);
    let resync_operator_changed = med(&|w| w.changes.operator_changed() as f64);
    let resync_reconciles = med(&|w| w.reconciles as f64);
    let resync_own = med(&|w| w.own.writes() as f64);
    let per_reconcile = resync_apply / resync_reconciles.max(1.0);

    let count = settings.count;
    let rows: Vec<(String, String, String, String)> = vec![
        (
            format!("create {count} ChatServices (16 in flight)"),
            format!("{:.1} s", converged.created_s),
            "-".into(),
            "-".into(),
        ),
        (
            "first status: earliest / median / all".into(),
            format!(
                "{:.1} / {:.1} / {:.1} s",
                converged.first_status_earliest_s,
                converged.first_status_median_s,
                converged.first_status_all_s
            ),
            "-".into(),
            "-".into(),
        ),
        (
            format!(
                "all converged (children x{} + current observedGeneration)",
                converged.children_per_chatservice
            ),
            format!("{:.1} s", converged.converged_s),
            "<= 60 s".into(),
            verdict(converged.converged_s <= 60.0).into(),
        ),
        (
            "operator RSS: idle / peak (VmHWM) / steady".into(),
            format!(
                "{:.1} / {:.1} / {:.1} MiB",
                mib(idle_rss),
                mib(peak_rss),
                mib(steady_rss)
            ),
            "<= 100 MiB".into(),
            verdict(mib(peak_rss) <= 100.0).into(),
        ),
        (
            "operator peak RSS after restart (VmHWM)".into(),
            format!("{:.1} MiB", mib(restarted.peak_rss)),
            "<= 100 MiB".into(),
            verdict(mib(restarted.peak_rss) <= 100.0).into(),
        ),
        (
            format!("resync ({}x, median): reconciles / seconds", windows.len()),
            format!("{resync_reconciles:.0} / {:.1} s", med(&|w| w.seconds)),
            "-".into(),
            "-".into(),
        ),
        (
            "resync: the operator's own write requests (its client's counter)".into(),
            format!(
                "{resync_own:.0}; window 1: {}",
                windows.first().map(|w| w.own.summary()).unwrap_or_default()
            ),
            "0".into(),
            verdict(resync_own == 0.0).into(),
        ),
        (
            "resync: write requests at kube-apiserver, all clients, all write verbs".into(),
            format!(
                "{resync_writes:.0} (APPLY {resync_apply:.0}, {per_reconcile:.1} per reconcile)"
            ),
            "-".into(),
            "-".into(),
        ),
        (
            "resync: the same, POST/PUT/PATCH/DELETE only".into(),
            format!("{resync_brief:.0}"),
            "-".into(),
            "-".into(),
        ),
        (
            "resync: API read requests (GET + LIST)".into(),
            format!(
                "{:.0} ({:.1} per reconcile)",
                med(&|w| w.reads as f64),
                med(&|w| w.reads as f64) / resync_reconciles.max(1.0)
            ),
            "-".into(),
            "-".into(),
        ),
        (
            "resync: objects changed (resourceVersion) / by the operator".into(),
            format!("{resync_changed:.0} / {resync_operator_changed:.0}"),
            "0".into(),
            verdict(resync_operator_changed == 0.0).into(),
        ),
        (
            format!(
                "restart: {} reconciles (all started by {:.1} s); the operator's own writes",
                restarted.window.reconciles, restarted.all_reconciled_s
            ),
            restarted.window.own.summary(),
            "0".into(),
            verdict(restarted.window.own.writes() == 0).into(),
        ),
        (
            "restart: write requests at kube-apiserver, all clients".into(),
            restarted.window.writes.summary(),
            "-".into(),
            "-".into(),
        ),
        (
            "restart: objects changed (resourceVersion) / by the operator".into(),
            format!(
                "{} / {}",
                restarted.window.changes.rv_changed(),
                restarted.window.changes.operator_changed()
            ),
            "0".into(),
            verdict(restarted.window.changes.operator_changed() == 0).into(),
        ),
        (
            format!("baseline: control-plane writes in {baseline_seconds} s, no operator"),
            baseline.summary(),
            "-".into(),
            "-".into(),
        ),
    ];
    let widths = rows.iter().fold([6, 5, 6, 7], |w, r| {
        [
            w[0].max(r.0.len()),
            w[1].max(r.1.len()),
            w[2].max(r.2.len()),
            w[3].max(r.3.len()),
        ]
    });
    println!();
    println!(
        "Operator convergence: {count} ChatServices (examples/minimal.yaml) in {} namespaces, resync {} s, max concurrent reconciles {}, {} cores, load average at the end {}",
        settings.namespaces,
        settings.resync_seconds,
        concurrency_label(settings),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average()
    );
    println!(
        "| {:w0$} | {:w1$} | {:w2$} | {:w3$} |",
        "metric",
        "value",
        "target",
        "verdict",
        w0 = widths[0],
        w1 = widths[1],
        w2 = widths[2],
        w3 = widths[3]
    );
    println!(
        "|{}|{}|{}|{}|",
        "-".repeat(widths[0] + 2),
        "-".repeat(widths[1] + 2),
        "-".repeat(widths[2] + 2),
        "-".repeat(widths[3] + 2)
    );
    for r in &rows {
        println!(
            "| {:w0$} | {:w1$} | {:w2$} | {:w3$} |",
            r.0,
            r.1,
            r.2,
            r.3,
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3]
        );
    }
    println!();

    Ok(json!({
        "benchmark": "operator-convergence",
        "settings": {
            "chatservices": count,
            "namespaces": settings.namespaces,
            "resync_seconds": settings.resync_seconds,
            "resync_windows": settings.windows,
            "max_concurrent_reconciles": concurrency_label(settings),
            "load_average_at_end": load_average(),
            "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "operator_binary": env!("CARGO_BIN_EXE_chat-operator"),
            "write_verbs": WRITE_VERBS,
        },
        "convergence": {
            "create_s": converged.created_s,
            "first_status_earliest_s": converged.first_status_earliest_s,
            "first_status_median_s": converged.first_status_median_s,
            "first_status_all_s": converged.first_status_all_s,
            "converged_s": converged.converged_s,
            "children_per_chatservice": converged.children_per_chatservice,
            "polls": converged.polls,
            "target_s": 60,
        },
        "settle": {"seconds": settle_s, "quiet": settled},
        "rss": {
            "idle_bytes": idle_rss,
            "peak_bytes": peak_rss,
            "peak_at_convergence_bytes": peak_at_convergence,
            "peak_sampled_during_convergence_bytes": sampled_peak,
            "steady_bytes": steady_rss,
            "restart_peak_bytes": restarted.peak_rss,
            "target_bytes": 100 * 1048576,
        },
        "resync": {
            "windows": windows.iter().map(Window::json).collect::<Vec<_>>(),
            "median_operator_own_write_requests": resync_own,
            "median_write_requests": resync_writes,
            "median_post_put_patch_delete": resync_brief,
            "median_apply": resync_apply,
            "median_objects_changed": resync_changed,
            "median_objects_changed_by_operator": resync_operator_changed,
            "median_reconciles": resync_reconciles,
        },
        "restart": {
            "all_reconciled_s": restarted.all_reconciled_s,
            "window": restarted.window.json(),
        },
        "baseline_no_operator": {"seconds": baseline_seconds, "write_requests": baseline.json()},
    }))
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; `cargo test --benches` would pass nothing useful either.
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let settings = Settings::from_env()?;
    let rig = match std::env::var_os(chat_rig::ENV_RIG_FILE) {
        Some(file) => Rig::attach(Path::new(&file))?,
        None => Rig::start(
            &chat_rig::run_dir()?.join("bench-convergence"),
            Parts {
                kubernetes: true,
                redis: false,
                mongodb: false,
                ollama: false,
            },
        )?,
    };
    let logs: PathBuf = chat_rig::scratch_dir("bench-convergence-logs")?;
    eprintln!("[bench] operator logs in {}", logs.display());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(bench(&rig, &settings, &logs));
    drop(runtime);
    let result = result?;
    let out_dir = Path::new(WORKSPACE).join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let out = out_dir.join("operator-convergence.json");
    std::fs::write(&out, serde_json::to_string_pretty(&result)?)?;
    println!("results: {}", out.canonicalize().unwrap_or(out).display());
    // The rig (if this process started it) stops here, on drop.
    drop(rig);
    Ok(())
}
