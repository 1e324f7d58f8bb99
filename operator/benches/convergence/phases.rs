//! The benchmark's steps on the rig: room for the Services, N ChatServices created and waited
//! for until every one has its children and a current status, the settling after, a window of
//! periodic resyncs, and a restarted operator on the converged objects.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chat_operator::build::{self, ChildKind, LABEL_MANAGED_BY, MANAGED_BY};
use chat_operator::crd::ChatService;
use chat_rig::procfs;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use crate::objects::{Changes, snapshot};
use crate::operator_process::{Activity, OperatorProcess};
use crate::requests::{OwnRequests, Writes, apiserver_requests, read_delta, write_delta};
use crate::{RUN_LABEL, Settings, WORKSPACE};

const CONVERGE_TIMEOUT: Duration = Duration::from_secs(600);

/// The rig's API server allocates Service IPs from a /24 (253 addresses), and each ChatService
/// here asks for more than one ClusterIP Service, so 500 would exhaust it ("failed to allocate a
/// serviceIP: range is full"). Kubernetes 1.33+ lets an admin add a range at run time with a
/// ServiceCIDR object; this adds a /16 and waits until it is Ready.
pub async fn widen_service_ips(admin: &Client) -> Result<()> {
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

pub fn chat_service(name: &str, namespace: &str, run: &str) -> Result<ChatService> {
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
pub struct Convergence {
    pub created_s: f64,
    pub first_status_earliest_s: f64,
    pub first_status_median_s: f64,
    pub first_status_all_s: f64,
    pub converged_s: f64,
    pub children_per_chatservice: usize,
    pub polls: usize,
    /// Statuses current at the end (all of them when converged).
    pub current: usize,
    /// Why it did not converge in time, when it did not.
    pub failure: Option<String>,
}

pub fn median(values: &mut [f64]) -> f64 {
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

pub async fn create_and_converge(
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

    // The ChatServices are followed by a watch (one LIST, then events), not listed every poll:
    // the benchmark must not load the API server whose clients it times.
    let api = Api::<ChatService>::all(admin.clone());
    let (store, writer) = reflector::store();
    let follow = watcher(
        api,
        watcher::Config::default().labels(&format!("{RUN_LABEL}={run}")),
    )
    .default_backoff()
    .reflect(writer)
    .applied_objects()
    .for_each(|_| std::future::ready(()));
    let follow = tokio::spawn(follow);
    let owned = ListParams::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGED_BY}"));
    let namespace_set: BTreeSet<&str> = namespaces.iter().map(String::as_str).collect();
    let mut first_status: HashMap<String, f64> = HashMap::new();
    let mut last_report = Instant::now();
    let outcome = loop {
        operator.process.check_running()?;
        *peak_sampled = (*peak_sampled).max(operator.rss());
        result.polls += 1;
        let now = started.elapsed().as_secs_f64();
        let list = store.state();
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
        result.current = current;
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "[bench] {now:.0} s: {} with a status, {current} current, operator RSS {:.0} MiB",
                first_status.len(),
                procfs::mib(operator.rss())
            );
            last_report = Instant::now();
        }
        if list.len() == settings.count && current == settings.count {
            // Every status is current: check that every child exists too (one LIST per kind).
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
                break Ok(());
            }
            eprintln!("[bench] statuses current but {missing} children missing");
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        if started.elapsed() > CONVERGE_TIMEOUT {
            // Reported, not fatal: the rest of the run still says what the operator did.
            break Err(format!(
                "not converged after {} s: {} of {} statuses current",
                CONVERGE_TIMEOUT.as_secs(),
                current,
                settings.count
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    follow.abort();
    if let Err(why) = outcome {
        eprintln!("[bench] {why}");
        result.converged_s = f64::NAN;
        result.failure = Some(why);
    }
    let mut times: Vec<f64> = first_status.values().copied().collect();
    result.first_status_median_s = median(&mut times);
    result.first_status_earliest_s = times.first().copied().unwrap_or(f64::NAN);
    result.first_status_all_s = times.last().copied().unwrap_or(f64::NAN);
    Ok(result)
}

/// What the settling after convergence saw.
#[derive(Debug, Default)]
pub struct Settle {
    pub seconds: f64,
    /// Whether the operator went quiet within the limit.
    pub quiet: bool,
    /// The whole settling period, by the operator's counters.
    pub total: Activity,
    /// Per 15 s of settling: seconds since its start and what the operator did in them.
    pub samples: Vec<(f64, Activity)>,
}

/// Waits until the operator has written nothing (no status, no child) for `quiet`, bounded by
/// `limit`, by its own counters (no requests to the API server). Meanwhile
/// kube-controller-manager works through its backlog (ReplicaSets, pods, workload status), and
/// each workload status it writes rightly changes a ChatService's status.
pub async fn settle(
    operator: &mut OperatorProcess,
    quiet: Duration,
    limit: Duration,
) -> Result<Settle> {
    let started = Instant::now();
    let first = operator.activity().await?;
    let mut last_sample = (Instant::now(), first.clone());
    let mut writes = first.writes();
    let mut stable_since = Instant::now();
    let mut result = Settle::default();
    while started.elapsed() < limit {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = operator.activity().await?;
        if last_sample.0.elapsed() >= Duration::from_secs(15) {
            let delta = now.since(&last_sample.1);
            eprintln!(
                "[bench] settling {:.0} s: {} reconciles, {} status writes, {} child writes; triggers {}",
                started.elapsed().as_secs_f64(),
                delta.reconciles,
                delta.status_writes,
                delta.child_writes,
                delta.triggers()
            );
            result
                .samples
                .push((started.elapsed().as_secs_f64(), delta));
            last_sample = (Instant::now(), now.clone());
        }
        if now.writes() != writes {
            writes = now.writes();
            stable_since = Instant::now();
        } else if stable_since.elapsed() >= quiet {
            result.quiet = true;
            break;
        }
    }
    result.seconds = started.elapsed().as_secs_f64();
    result.total = operator.activity().await?.since(&first);
    Ok(result)
}

pub struct Window {
    pub seconds: f64,
    pub reconciles: u64,
    /// Whether the window saw what it waited for (else it ended at its time limit).
    pub complete: bool,
    /// The operator's own counters over the window.
    pub activity: Activity,
    /// The operator's own requests (its client's counter).
    pub own: OwnRequests,
    pub writes: Writes,
    /// GET and LIST requests (everyone's, the benchmark's own snapshots excluded).
    pub reads: u64,
    pub changes: Changes,
}

impl Window {
    pub fn json(&self) -> Value {
        json!({
            "seconds": self.seconds,
            "reconciles": self.reconciles,
            "complete": self.complete,
            "operator_activity": self.activity.json(),
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
pub async fn resync_window(
    admin: &Client,
    run: &str,
    namespaces: &BTreeSet<String>,
    operator: &mut OperatorProcess,
    count: usize,
    timeout: Duration,
) -> Result<Window> {
    let before_objects = snapshot(admin, run, namespaces).await?;
    let before_requests = apiserver_requests(admin).await?;
    let before_activity = operator.activity().await?;
    let before_reconciles = before_activity.reconciles;
    let before_own = operator.own_requests().await?;
    let started = Instant::now();
    let complete = loop {
        let done = operator.reconciles().await?;
        if done >= before_reconciles + count as u64 {
            break true;
        }
        if started.elapsed() > timeout {
            // Reported (the window's `complete` is false), not fatal.
            eprintln!(
                "[bench] only {} reconciles in {} s of resync window",
                done - before_reconciles,
                timeout.as_secs()
            );
            break false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let activity = operator.activity().await?.since(&before_activity);
    let reconciles = activity.reconciles;
    let seconds = started.elapsed().as_secs_f64();
    let own = OwnRequests::between(&before_own, &operator.own_requests().await?);
    let after_requests = apiserver_requests(admin).await?;
    let after_objects = snapshot(admin, run, namespaces).await?;
    Ok(Window {
        seconds,
        reconciles,
        complete,
        activity,
        own,
        writes: Writes {
            rows: write_delta(&before_requests, &after_requests),
        },
        reads: read_delta(&before_requests, &after_requests),
        changes: Changes::of(&before_objects, &after_objects),
    })
}

pub struct Restart {
    pub window: Window,
    pub all_reconciled_s: f64,
    pub peak_rss: u64,
}

/// Starts a second operator on the converged objects, waits until it has reconciled every one
/// and gone quiet, stops it, and reports what it wrote.
pub async fn restart(
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
    let mut last_write = (0, Instant::now());
    let complete = loop {
        let now = operator.activity().await?;
        if all_reconciled_s.is_none() && now.reconciles >= settings.count as u64 {
            all_reconciled_s = Some(started.elapsed().as_secs_f64());
        }
        if now.writes() != last_write.0 {
            last_write = (now.writes(), Instant::now());
        }
        // Every object's reconcile started and 5 s without a write: the initial pass is over.
        // Reconciles alone cannot say so: at 1,000 ChatServices and a 30 s resync the resyncs of
        // the first objects begin before the last have had their first pass (the counter counts
        // started reconciles, so the window may close on a few still in flight).
        if all_reconciled_s.is_some() && last_write.1.elapsed() >= Duration::from_secs(5) {
            break true;
        }
        if started.elapsed() > timeout {
            eprintln!(
                "[bench] the restarted operator was still writing after {} s ({} reconciles)",
                timeout.as_secs(),
                now.reconciles
            );
            break false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let activity = operator.activity().await?;
    let reconciles = activity.reconciles;
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
            complete,
            activity,
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
