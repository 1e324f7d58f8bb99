//! Checks of spec values that the CRD schema leaves open (quantities, tolerations, label and
//! annotation keys inside Kubernetes' own types) but that the API server would refuse on a child.
//! Found here, before anything is applied, they become `ConfigValid=False` naming the field,
//! instead of a Deployment or StatefulSet that fails to apply while the rest is half built.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::quantity::parse_quantity;
use crate::crd::ChatService;
use crate::validated::ConfigProblem;

/// Every problem of this kind in `cr`, each message starting with the field's path.
pub fn spec_problems(cr: &ChatService) -> Vec<ConfigProblem> {
    let spec = &cr.spec;
    let mut problems = Vec::new();
    let mut resources = vec![("spec.resources", spec.resources.as_ref())];
    let history = &spec.history;
    if let Some(managed) = &history.redis.managed {
        resources.push((
            "spec.history.redis.managed.resources",
            managed.resources.as_ref(),
        ));
    }
    if let Some(managed) = &history.mongodb.managed {
        resources.push((
            "spec.history.mongodb.managed.resources",
            managed.resources.as_ref(),
        ));
        if let Some(storage) = &managed.storage {
            size_problems(
                "spec.history.mongodb.managed.storage",
                storage,
                &mut problems,
            );
        }
    }
    if let Some(ollama) = &spec.ollama {
        resources.push(("spec.ollama.resources", ollama.resources.as_ref()));
        if let Some(storage) = &ollama.model_storage {
            size_problems("spec.ollama.modelStorage", storage, &mut problems);
        }
    }
    for (field, requirements) in resources {
        if let Some(requirements) = requirements {
            resource_problems(field, requirements, &mut problems);
        }
    }
    if let Some(template) = &spec.pod_template {
        let field = "spec.podTemplate";
        label_problems(&format!("{field}.labels"), &template.labels, &mut problems);
        label_problems(
            &format!("{field}.nodeSelector"),
            &template.node_selector,
            &mut problems,
        );
        key_problems(
            &format!("{field}.annotations"),
            &template.annotations,
            &mut problems,
        );
        for (i, toleration) in template.tolerations.iter().enumerate() {
            toleration_problems(
                &format!("{field}.tolerations[{i}]"),
                toleration,
                &mut problems,
            );
        }
    }
    if let Some(service) = &spec.service {
        key_problems(
            "spec.service.annotations",
            &service.annotations,
            &mut problems,
        );
    }
    if let Some(ingress) = &spec.ingress {
        key_problems(
            "spec.ingress.annotations",
            &ingress.annotations,
            &mut problems,
        );
    }
    problems
}

fn problem(reason: &'static str, message: String) -> ConfigProblem {
    ConfigProblem { reason, message }
}

/// A volume size: a quantity above zero.
fn size_problems(field: &str, size: &Quantity, problems: &mut Vec<ConfigProblem>) {
    match parse_quantity(&size.0) {
        Err(why) => problems.push(problem("InvalidQuantity", format!("{field}: {why}."))),
        Ok(bytes) if bytes <= 0.0 => problems.push(problem(
            "InvalidQuantity",
            format!("{field}: {:?} is not a size above zero.", size.0),
        )),
        Ok(_) => {}
    }
}

fn resource_problems(
    field: &str,
    requirements: &ResourceRequirements,
    problems: &mut Vec<ConfigProblem>,
) {
    let read = |kind: &str, map: &Option<BTreeMap<String, Quantity>>, problems: &mut Vec<_>| {
        let mut values = BTreeMap::new();
        for (resource, quantity) in map.iter().flatten() {
            let at = format!("{field}.{kind}.{resource}");
            match parse_quantity(&quantity.0) {
                Err(why) => problems.push(problem("InvalidQuantity", format!("{at}: {why}."))),
                Ok(value) if value < 0.0 => problems.push(problem(
                    "InvalidQuantity",
                    format!("{at}: {:?} is negative.", quantity.0),
                )),
                Ok(value) => {
                    values.insert(resource.clone(), value);
                }
            }
        }
        values
    };
    let requests = read("requests", &requirements.requests, problems);
    let limits = read("limits", &requirements.limits, problems);
    for (resource, request) in &requests {
        if let Some(limit) = limits.get(resource).filter(|limit| request > *limit) {
            problems.push(problem(
                "RequestAboveLimit",
                format!(
                    "{field}.requests.{resource}: the request ({request}) is above the limit ({limit})."
                ),
            ));
        }
    }
}

fn toleration_problems(field: &str, toleration: &Toleration, problems: &mut Vec<ConfigProblem>) {
    let operator = toleration.operator.as_deref().unwrap_or("");
    if !["", "Equal", "Exists"].contains(&operator) {
        problems.push(problem(
            "InvalidToleration",
            format!("{field}.operator: {operator:?} is neither Equal nor Exists."),
        ));
    }
    let effect = toleration.effect.as_deref().unwrap_or("");
    if !["", "NoSchedule", "PreferNoSchedule", "NoExecute"].contains(&effect) {
        problems.push(problem(
            "InvalidToleration",
            format!("{field}.effect: {effect:?} is not NoSchedule, PreferNoSchedule or NoExecute."),
        ));
    }
    if operator == "Exists" && toleration.value.as_deref().is_some_and(|v| !v.is_empty()) {
        problems.push(problem(
            "InvalidToleration",
            format!("{field}.value: must be empty when operator is Exists."),
        ));
    }
    if let Some(key) = toleration.key.as_deref().filter(|k| !k.is_empty())
        && !is_qualified_name(key)
    {
        problems.push(problem(
            "InvalidToleration",
            format!("{field}.key: {key:?} is not a valid label key."),
        ));
    }
}

/// Label maps: keys are qualified names, values at most 63 characters of the same alphabet.
fn label_problems(
    field: &str,
    labels: &BTreeMap<String, String>,
    problems: &mut Vec<ConfigProblem>,
) {
    key_problems(field, labels, problems);
    for (key, value) in labels {
        if !(value.is_empty() || is_label_name(value)) {
            problems.push(problem(
                "InvalidLabel",
                format!(
                    "{field}[{key:?}]: value {value:?} must be at most 63 letters, digits, '-', '_' or '.', beginning and ending with a letter or digit."
                ),
            ));
        }
    }
}

fn key_problems(field: &str, map: &BTreeMap<String, String>, problems: &mut Vec<ConfigProblem>) {
    for key in map.keys() {
        if !is_qualified_name(key) {
            problems.push(problem(
                "InvalidLabel",
                format!(
                    "{field}: key {key:?} is not a qualified name (an optional DNS subdomain and '/', then at most 63 letters, digits, '-', '_' or '.', beginning and ending with a letter or digit)."
                ),
            ));
        }
    }
}

/// `[prefix/]name` as Kubernetes label and annotation keys are.
fn is_qualified_name(key: &str) -> bool {
    match key.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_label_name(name),
        None => is_label_name(key),
    }
}

fn is_label_name(name: &str) -> bool {
    let alphanumeric_ends = name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    name.len() <= 63
        && alphanumeric_ends
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && label.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::chat_service;

    fn messages(yaml_spec: &str) -> Vec<String> {
        let cr = chat_service(&format!(
            "apiVersion: chatoperator.dev/v1alpha1\nkind: ChatService\nmetadata: {{name: s}}\nspec:\n{yaml_spec}"
        ));
        spec_problems(&cr).into_iter().map(|p| p.message).collect()
    }

    const STORES: &str =
        "  ollama: {models: [m]}\n  history: {redis: {managed: {}}, mongodb: {managed: {}}}\n";

    #[test]
    fn bad_quantities_and_inverted_requests_are_named() {
        let found = messages(&format!(
            "{STORES}  resources: {{limits: {{cpu: abc, memory: 1Gi}}, requests: {{memory: 2Gi}}}}\n"
        ));
        assert!(
            found
                .iter()
                .any(|m| m.starts_with("spec.resources.limits.cpu: \"abc\"")),
            "{found:?}"
        );
        assert!(
            found
                .iter()
                .any(|m| m.starts_with("spec.resources.requests.memory: the request")),
            "{found:?}"
        );
    }

    #[test]
    fn good_specs_have_no_problems() {
        let found = messages(&format!(
            "{STORES}  resources: {{limits: {{cpu: '2', memory: 1Gi}}, requests: {{cpu: 500m, memory: 1Gi}}}}\n  podTemplate: {{labels: {{example.com/team: a-1}}, tolerations: [{{key: gpu, operator: Exists, effect: NoSchedule}}]}}\n"
        ));
        assert_eq!(found, Vec::<String>::new());
    }

    #[test]
    fn label_keys_tolerations_and_sizes_are_named() {
        let found = messages(
            "  ollama: {models: [m], modelStorage: -5Gi}\n  history: {redis: {managed: {}}, mongodb: {managed: {storage: lots}}}\n  podTemplate: {labels: {'bad key!': x}, tolerations: [{key: k, operator: Bogus}]}\n",
        );
        for start in [
            "spec.ollama.modelStorage: \"-5Gi\"",
            "spec.history.mongodb.managed.storage: \"lots\"",
            "spec.podTemplate.labels: key \"bad key!\"",
            "spec.podTemplate.tolerations[0].operator: \"Bogus\"",
        ] {
            assert!(
                found.iter().any(|m| m.starts_with(start)),
                "{start}: {found:?}"
            );
        }
    }
}
