//! The chart's monitoring extras (ServiceMonitor, PrometheusRule, dashboards) name only metrics the
//! code really registers: the chat service's, read from its registrations, and the operator's,
//! from its real registry.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use support::chart::{documents, find, one, render, repo};

/// Metric names (`chat_*`, `chatoperator_*`) in a PromQL expression.
fn metric_names(expr: &str, into: &mut BTreeSet<String>) {
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if starts_word && expr[i..].starts_with("chat") {
            let end = expr[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(expr.len(), |n| i + n);
            let name = &expr[i..end];
            // Label values and names such as `chat-service` or `chatoperator.dev/...` are not
            // metric names; a metric name is followed by `{`, `[`, `)` or a space.
            let next = bytes.get(end).copied();
            if name.contains('_') && matches!(next, None | Some(b'{' | b'[' | b')' | b' ' | b'\n'))
            {
                into.insert(name.to_string());
            }
            i = end;
        } else {
            i += 1;
        }
    }
}

/// The sample names a family registered under `base` exposes (counters add `_total`,
/// histograms `_bucket`, `_sum` and `_count`).
fn exposed(base: &str, kind: &str) -> Vec<String> {
    match kind {
        "counter" => vec![format!("{base}_total")],
        "histogram" => ["_bucket", "_sum", "_count"]
            .iter()
            .map(|s| format!("{base}{s}"))
            .collect(),
        _ => vec![base.to_string()],
    }
}

/// Names the chat service exposes, read from its registrations in chat-service/src/metrics.rs
/// (the operator does not link the service's server code): `registry.register("name", ...)` under
/// the `chat` prefix, with the type taken from the metric's field declaration.
fn chat_service_metric_names() -> BTreeSet<String> {
    let source = std::fs::read_to_string(repo().join("chat-service/src/metrics.rs")).unwrap();
    assert!(
        source.contains("Registry::with_prefix(\"chat\")"),
        "chat-service/src/metrics.rs no longer uses the `chat` prefix"
    );
    let mut names = BTreeSet::new();
    let mut rest = source.as_str();
    while let Some(at) = rest.find("registry.register(") {
        rest = &rest[at + "registry.register(".len()..];
        let open = rest.find('"').unwrap();
        let close = open + 1 + rest[open + 1..].find('"').unwrap();
        let base = &rest[open + 1..close];
        // The third argument is `<field>.clone()`; the field's declared type says the kind.
        let call_end = rest.find(");").unwrap();
        let field = rest[..call_end]
            .trim_end()
            .trim_end_matches(',')
            .rsplit(',')
            .next()
            .unwrap()
            .trim()
            .trim_end_matches(".clone()")
            .trim();
        let declaration = source
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("pub {field}:")))
            .unwrap_or_else(|| panic!("no field declaration for {field}"));
        let kind = if declaration.contains("Histogram") {
            "histogram"
        } else if declaration.contains("Counter") {
            "counter"
        } else {
            "gauge"
        };
        names.extend(exposed(&format!("chat_{base}"), kind));
    }
    assert!(names.len() > 5, "found too few metrics: {names:?}");
    names
}

/// Names the operator exposes, from its real registry (with one failure recorded: a labelled
/// family shows up only once it has a sample).
fn operator_metric_names() -> BTreeSet<String> {
    let metrics = chat_operator::metrics::Metrics::default();
    metrics.observe(Duration::from_millis(1), Some("probe"));
    let text = metrics.encode();
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (base, kind) = (parts.next().unwrap(), parts.next().unwrap());
            names.extend(exposed(base, kind));
        }
    }
    names
}

#[test]
fn monitoring_extras_use_the_metric_names_the_code_registers() {
    let docs = documents(&render(
        "ops",
        "operators",
        &[
            "--set",
            "serviceMonitor.enabled=true,prometheusRule.enabled=true,grafanaDashboard.enabled=true",
        ],
    ));
    let monitors = find(&docs, "ServiceMonitor");
    assert_eq!(
        monitors.len(),
        2,
        "operator and chat-service ServiceMonitors"
    );
    let chat_monitor = monitors
        .iter()
        .find(|m| {
            m["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "chat-service"
        })
        .expect("a ServiceMonitor for the chat-service Services");
    assert_eq!(
        chat_monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/managed-by"],
        "chat-operator"
    );
    assert_eq!(chat_monitor["spec"]["endpoints"][0]["port"], "http");

    let mut used = BTreeSet::new();
    let rule = one(&docs, "PrometheusRule");
    let mut alerts = BTreeSet::new();
    for group in rule["spec"]["groups"].as_array().unwrap() {
        for r in group["rules"].as_array().unwrap() {
            alerts.insert(r["alert"].as_str().unwrap().to_string());
            metric_names(r["expr"].as_str().unwrap(), &mut used);
        }
    }
    for wanted in [
        "ChatServiceErrorRateHigh",
        "ChatServiceLatencyHigh",
        "ChatBackendUnavailable",
        "ChatRateLimitSaturated",
        "ChatOperatorReconcileFailures",
    ] {
        assert!(
            alerts.contains(wanted),
            "missing alert {wanted}: {alerts:?}"
        );
    }

    let dashboard_map = one(&docs, "ConfigMap");
    assert_eq!(
        dashboard_map["metadata"]["labels"]["grafana_dashboard"],
        "1"
    );
    let dashboard: Value = serde_json::from_str(
        dashboard_map["data"]["chat-operator.json"]
            .as_str()
            .unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut panels = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            panels += 1;
            metric_names(target["expr"].as_str().unwrap(), &mut used);
        }
    }
    assert!(panels > 5, "dashboard has {panels} queries");

    let mut known = chat_service_metric_names();
    known.extend(operator_metric_names());
    let unknown: Vec<_> = used.difference(&known).collect();
    assert!(
        unknown.is_empty(),
        "rules or dashboard use metrics nobody registers: {unknown:?}\nregistered: {known:?}"
    );
    for wanted in [
        "chat_http_requests_total",
        "chat_http_request_duration_seconds_bucket",
        "chatoperator_reconcile_failures_total",
        "chatoperator_reconciles_total",
    ] {
        assert!(used.contains(wanted), "{wanted} is not used: {used:?}");
    }
}
