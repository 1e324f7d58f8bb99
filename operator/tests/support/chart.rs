//! The Helm chart (charts/chat-operator) as the chart tests read it: rendered with the rig's
//! `helm`, split into documents, and the tools run with their output kept for the message.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use chat_rig::paths;
use serde::Deserialize;
use serde_json::Value;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn chart_dir() -> PathBuf {
    repo().join("charts/chat-operator")
}

pub fn tool(name: &str) -> PathBuf {
    paths::cached_bin(name).unwrap_or_else(|e| panic!("{e:#}"))
}

pub fn run(program: &Path, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", program.display()))
}

pub fn describe(what: &str, out: &Output) -> String {
    format!(
        "{what}: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `helm template` of the chart with extra arguments (e.g. `--set`); the raw output.
pub fn helm_template(release: &str, namespace: &str, extra: &[&str]) -> Output {
    let chart = chart_dir();
    let mut args = vec![
        "template",
        release,
        chart.to_str().unwrap(),
        "--namespace",
        namespace,
    ];
    args.extend_from_slice(extra);
    run(&tool("helm"), &args)
}

pub fn render(release: &str, namespace: &str, extra: &[&str]) -> String {
    let out = helm_template(release, namespace, extra);
    assert!(out.status.success(), "{}", describe("helm template", &out));
    String::from_utf8(out.stdout).unwrap()
}

/// The non-empty YAML documents of a multi-document stream.
pub fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

pub fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

pub fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found = find(docs, kind);
    assert_eq!(found.len(), 1, "expected one {kind}, found {}", found.len());
    found[0]
}

pub fn env_of(container: &Value) -> BTreeMap<String, Value> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e.clone()))
        .collect()
}
