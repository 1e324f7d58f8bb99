//! `kubectl explain chatservice.spec...` teaches every field: each property of the spec and the
//! status has a description, in the generated CRD and in the schema the API server serves (which
//! is what `kubectl explain` reads).

mod support;

use chat_rig::{Rig, eventually};
use serde_json::Value;
use support::{WAIT, install};

/// Paths of the properties under `node` that have no description. `resolve` follows `$ref`s
/// (the served schema refers to shared definitions; the generated CRD is inline).
fn undocumented(
    node: &Value,
    path: &str,
    resolve: &dyn Fn(&Value) -> Value,
    out: &mut Vec<String>,
) {
    let node = resolve(node);
    if let Some(properties) = node.get("properties").and_then(Value::as_object) {
        for (name, property) in properties {
            let at = format!("{path}.{name}");
            let property_resolved = resolve(property);
            let described = [property, &property_resolved].iter().any(|p| {
                p.get("description")
                    .and_then(Value::as_str)
                    .is_some_and(|d| !d.trim().is_empty())
            });
            if !described {
                out.push(at.clone());
            }
            undocumented(property, &at, resolve, out);
        }
    }
    if let Some(items) = node.get("items") {
        undocumented(items, &format!("{path}[]"), resolve, out);
    }
    if let Some(values) = node.get("additionalProperties").filter(|v| v.is_object()) {
        undocumented(values, &format!("{path}{{}}"), resolve, out);
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        for part in node
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            undocumented(part, path, resolve, out);
        }
    }
}

fn count_fields(node: &Value) -> usize {
    let nested = |v: &Value| count_fields(v);
    node.get("properties")
        .and_then(Value::as_object)
        .map(|p| p.values().map(|v| 1 + nested(v)).sum())
        .unwrap_or(0)
        + node.get("items").map(nested).unwrap_or(0)
        + node
            .get("additionalProperties")
            .filter(|v| v.is_object())
            .map(nested)
            .unwrap_or(0)
}

#[test]
fn every_field_of_the_generated_crd_is_described() {
    let crd = serde_json::to_value(chat_operator::crd::custom_resource_definition()).unwrap();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let mut missing = Vec::new();
    for part in ["spec", "status"] {
        undocumented(
            &schema["properties"][part],
            part,
            &|v| v.clone(),
            &mut missing,
        );
    }
    let fields = count_fields(&schema["properties"]["spec"]);
    assert!(
        fields > 200,
        "only {fields} spec fields: the walk lost its way"
    );
    assert!(
        missing.is_empty(),
        "fields without a description (kubectl explain shows nothing): {missing:#?}"
    );
}

#[tokio::test]
async fn every_field_the_api_server_serves_is_described() {
    let rig = Rig::shared();
    let (admin, _ns) = rig.test_namespace("explain").await;
    install(&admin).await;
    // The OpenAPI v3 document of the group, as kubectl explain fetches it; it can lag the CRD's
    // establishment by a moment.
    let document: Value = eventually("the served OpenAPI schema of ChatService", WAIT, || async {
        let request = http::Request::get("/openapi/v3/apis/chatoperator.dev/v1alpha1")
            .body(Vec::new())
            .unwrap();
        let document: Value = admin.request(request).await.ok()?;
        let schema = document["components"]["schemas"]["dev.chatoperator.v1alpha1.ChatService"]
            ["properties"]["spec"]["properties"]["allowUnauthenticated"]
            .clone();
        (!schema.is_null()).then_some(document)
    })
    .await;
    let schemas = document["components"]["schemas"].clone();
    let resolve = move |v: &Value| -> Value {
        match v.get("$ref").and_then(Value::as_str) {
            Some(reference) => {
                schemas[reference.trim_start_matches("#/components/schemas/")].clone()
            }
            None => v.clone(),
        }
    };
    let chat_service = &document["components"]["schemas"]["dev.chatoperator.v1alpha1.ChatService"];
    let mut missing = Vec::new();
    for part in ["spec", "status"] {
        undocumented(
            &chat_service["properties"][part],
            part,
            &resolve,
            &mut missing,
        );
    }
    let fields = count_fields(&chat_service["properties"]["spec"]);
    assert!(
        fields > 200,
        "only {fields} spec fields served: {chat_service}"
    );
    assert!(
        missing.is_empty(),
        "served fields without a description: {missing:#?}"
    );
}
