//! Requests as the API server and the operator count them: kube-apiserver's own
//! `apiserver_request_total` (every client) read before and after a window, and the operator's
//! `chatoperator_api_requests_total` (its client only).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::{Result, bail};
use kube::Client;
use serde_json::{Value, json};

/// Verbs kube-apiserver reports for requests that write. `APPLY` is how it reports a PATCH
/// whose content type is server-side apply, which is every write the operator makes to children.
pub const WRITE_VERBS: [&str; 6] = [
    "POST",
    "PUT",
    "PATCH",
    "APPLY",
    "DELETE",
    "DELETECOLLECTION",
];
/// The subset named in the brief (it leaves out APPLY and DELETECOLLECTION).
const BRIEF_VERBS: [&str; 4] = ["POST", "PUT", "PATCH", "DELETE"];

/// `apiserver_request_total` summed by (verb, resource[/subresource]).
pub type RequestCounts = BTreeMap<(String, String), f64>;

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

pub async fn apiserver_requests(admin: &Client) -> Result<RequestCounts> {
    // On a loaded machine one GET of the API server's (large) /metrics can fail; a few tries.
    let mut tries = 0;
    let text = loop {
        let request = http::Request::get("/metrics").body(Vec::new())?;
        match admin.request_text(request).await {
            Ok(text) => break text,
            Err(e) if tries < 4 => {
                tries += 1;
                eprintln!("[bench] GET /metrics from kube-apiserver failed ({e}); again");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context("GET /metrics from kube-apiserver"));
            }
        }
    };
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
pub fn write_delta(
    before: &RequestCounts,
    after: &RequestCounts,
) -> BTreeMap<(String, String), u64> {
    delta(before, after, &WRITE_VERBS)
}

/// Read requests (GET, LIST; not WATCH) between two readings.
pub fn read_delta(before: &RequestCounts, after: &RequestCounts) -> u64 {
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

pub struct Writes {
    pub rows: BTreeMap<(String, String), u64>,
}

impl Writes {
    pub fn total(&self) -> u64 {
        self.rows.values().sum()
    }
    pub fn brief(&self) -> u64 {
        self.rows
            .iter()
            .filter(|((verb, _), _)| BRIEF_VERBS.contains(&verb.as_str()))
            .map(|(_, n)| n)
            .sum()
    }
    pub fn by_verb(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for ((verb, _), n) in &self.rows {
            *out.entry(verb.clone()).or_default() += n;
        }
        out
    }
    pub fn json(&self) -> Value {
        json!({
            "total": self.total(),
            "post_put_patch_delete": self.brief(),
            "by_verb": self.by_verb(),
            "by_verb_and_resource": self.rows.iter()
                .map(|((verb, resource), n)| json!({"verb": verb, "resource": resource, "requests": n}))
                .collect::<Vec<_>>(),
        })
    }
    pub fn summary(&self) -> String {
        let verbs = self
            .by_verb()
            .iter()
            .map(|(v, n)| format!("{v} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!("{} ({verbs})", self.total())
    }
}

/// The operator's own requests between two readings of its counter, by method.
#[derive(Default)]
pub struct OwnRequests(pub BTreeMap<String, u64>);

impl OwnRequests {
    pub fn between(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> Self {
        Self(
            after
                .iter()
                .map(|(m, n)| (m.clone(), n - before.get(m).copied().unwrap_or(0)))
                .filter(|(_, n)| *n > 0)
                .collect(),
        )
    }
    pub fn writes(&self) -> u64 {
        self.0
            .iter()
            .filter(|(m, _)| m.as_str() != "GET" && m.as_str() != "WATCH")
            .map(|(_, n)| n)
            .sum()
    }
    pub fn summary(&self) -> String {
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

/// Write requests in a window with no operator running: what the control plane writes by itself.
pub async fn idle_baseline(admin: &Client, seconds: u64) -> Result<Writes> {
    let before = apiserver_requests(admin).await?;
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let after = apiserver_requests(admin).await?;
    Ok(Writes {
        rows: write_delta(&before, &after),
    })
}
