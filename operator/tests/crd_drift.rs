//! The committed CRD files must be exactly what the Rust types generate
//! (regenerate with `cargo run -p chat-operator --bin crdgen > crds/chatservice.yaml`).

use std::path::Path;

fn committed(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

#[test]
fn crds_directory_matches_the_types() {
    assert!(
        committed("crds/chatservice.yaml") == chat_operator::crd::crd_yaml(),
        "crds/chatservice.yaml is stale: run `cargo run -p chat-operator --bin crdgen > crds/chatservice.yaml`"
    );
}

#[test]
fn helm_chart_copy_matches_the_types() {
    assert!(
        committed("charts/chat-operator/crds/chatservice.yaml") == chat_operator::crd::crd_yaml(),
        "charts/chat-operator/crds/chatservice.yaml is stale: copy crds/chatservice.yaml over it"
    );
}

#[test]
fn operator_rules_have_no_wildcards() {
    let text = committed("charts/chat-operator/files/operator-rules.yaml");
    let rules: serde_json::Value = serde_yaml::from_str(&text).unwrap();
    for rule in rules.as_array().unwrap() {
        for field in ["verbs", "resources", "apiGroups"] {
            let values = rule[field].as_array().unwrap();
            assert!(
                !values.iter().any(|v| v == "*"),
                "wildcard in {field}: {rule}"
            );
        }
    }
}
