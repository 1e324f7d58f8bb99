//! One function per condition of the ChatService status. Each is a pure function of the
//! validation outcome and what was observed (Ready also of the others' verdicts), and returns a
//! [`Draft`]: the condition without its transition time, which [`super::compute_status`] adds.

use super::observed::Observed;
use crate::probe::{BackendReport, StoreReport};
use crate::validated::ConfigProblem;

pub const READY: &str = "Ready";
pub const CONFIG_VALID: &str = "ConfigValid";
pub const STORAGE_READY: &str = "StorageReady";
pub const BACKENDS_READY: &str = "BackendsReady";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

/// A condition before its transition time is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draft {
    pub type_: &'static str,
    pub status: bool,
    /// Neither true nor false: nothing could be asked (Kubernetes' `Unknown`); `status` is false.
    pub unknown: bool,
    pub reason: &'static str,
    pub message: String,
}

fn draft(
    type_: &'static str,
    status: bool,
    reason: &'static str,
    message: impl Into<String>,
) -> Draft {
    Draft {
        type_,
        status,
        unknown: false,
        reason,
        message: message.into(),
    }
}

fn unknown(type_: &'static str, reason: &'static str, message: impl Into<String>) -> Draft {
    Draft {
        unknown: true,
        ..draft(type_, false, reason, message)
    }
}

/// Whether every referenced Secret and ConfigMap exists and the rendered config is valid.
pub fn config_valid(config: Result<(), &[ConfigProblem]>) -> Draft {
    match config {
        Ok(()) => draft(
            CONFIG_VALID,
            true,
            "Valid",
            "All referenced Secrets and ConfigMaps exist and the rendered config is valid.",
        ),
        Err(problems) => {
            let message = problems
                .iter()
                .map(|p| p.message.as_str())
                .collect::<Vec<_>>()
                .join(" ");
            let reason = problems.first().map(|p| p.reason).unwrap_or("Invalid");
            draft(CONFIG_VALID, false, reason, message)
        }
    }
}

/// Whether the stores serve, as the chat pods see them: managed Redis and MongoDB pods ready,
/// then a chat pod's own view (`/readyz`) of both, external ones included. An external store no
/// chat pod has confirmed is `Unknown`, never `True`.
pub fn storage_ready(config_ok: bool, observed: &Observed) -> Draft {
    if !config_ok {
        return draft(
            STORAGE_READY,
            false,
            "ConfigInvalid",
            "Storage is not configured until the config is valid.",
        );
    }
    let storage = [("Redis", &observed.redis), ("MongoDB", &observed.mongodb)];
    let waiting: Vec<&str> = storage
        .iter()
        .filter(|(_, state)| state.is_some_and(|s| !s.is_ready()))
        .map(|(name, _)| *name)
        .collect();
    if !waiting.is_empty() {
        return draft(
            STORAGE_READY,
            false,
            "WaitingForPods",
            format!(
                "Waiting for managed {} pods to be ready.",
                waiting.join(" and ")
            ),
        );
    }
    let external: Vec<&str> = storage
        .iter()
        .filter(|(_, state)| state.is_none())
        .map(|(name, _)| *name)
        .collect();
    match &observed.stores {
        Some(StoreReport::Seen {
            pod,
            redis,
            mongodb,
        }) => {
            let failing: Vec<String> = [("Redis", redis), ("MongoDB", mongodb)]
                .into_iter()
                .filter_map(|(name, state)| state.as_ref().err().map(|e| format!("{name}: {e}")))
                .collect();
            let reason = match (redis.is_ok(), mongodb.is_ok()) {
                (true, true) => {
                    return draft(
                        STORAGE_READY,
                        true,
                        "Ready",
                        format!("Chat pod {pod} reaches Redis and MongoDB."),
                    );
                }
                (false, true) => "RedisUnreachable",
                (true, false) => "MongoDBUnreachable",
                (false, false) => "StoresUnreachable",
            };
            draft(
                STORAGE_READY,
                false,
                reason,
                format!("Chat pod {pod} cannot reach {}", failing.join("; ")),
            )
        }
        Some(StoreReport::Unreachable(why)) => unknown(
            STORAGE_READY,
            "NotVerified",
            format!("No chat pod could be asked what it sees of Redis and MongoDB: {why}"),
        ),
        None if external.is_empty() => draft(
            STORAGE_READY,
            true,
            "PodsReady",
            "The managed Redis and MongoDB pods are ready; no chat pod runs yet to confirm them.",
        ),
        None => unknown(
            STORAGE_READY,
            "NotVerified",
            format!(
                "External {} not verified yet: no chat pod runs to connect to it.",
                external.join(" and ")
            ),
        ),
    }
}

/// Whether the back ends can serve: managed Ollama pods ready, and at least one back end healthy
/// as far as the chat pods can tell (an unanswered question proves nothing either way).
pub fn backends_ready(config_ok: bool, observed: &Observed) -> Draft {
    if !config_ok {
        return draft(
            BACKENDS_READY,
            false,
            "ConfigInvalid",
            "Back ends are not configured until the config is valid.",
        );
    }
    if !observed.ollama.is_none_or(|s| s.is_ready()) {
        return draft(
            BACKENDS_READY,
            false,
            "WaitingForPods",
            "Waiting for managed Ollama pods to pull their models and become ready.",
        );
    }
    match &observed.backends {
        Some(BackendReport::Counts { ready, total }) if *ready > 0 => draft(
            BACKENDS_READY,
            true,
            "Healthy",
            format!("{ready} of {total} back-end endpoints pass the chat service's health checks."),
        ),
        Some(BackendReport::Counts { total, .. }) => draft(
            BACKENDS_READY,
            false,
            "NoHealthyBackends",
            format!(
                "None of {total} back-end endpoints passes the chat service's health checks; see GET /v1/backends on the chat Service."
            ),
        ),
        Some(BackendReport::Unreachable(why)) => draft(
            BACKENDS_READY,
            true,
            "Configured",
            format!(
                "Back ends are configured; their health could not be read from the chat service ({why})."
            ),
        ),
        None => draft(
            BACKENDS_READY,
            true,
            "Configured",
            match observed.ollama {
                Some(_) => {
                    "Managed Ollama pods are ready with their models pulled; external back ends are health-checked by the chat service."
                }
                None => "External back ends are configured; the chat service health-checks them.",
            },
        ),
    }
}

/// Whether the chat pods are rolling out a new spec.
pub fn progressing(config_ok: bool, observed: &Observed) -> Draft {
    let chat = observed.chat.unwrap_or_default();
    if config_ok && observed.chat.is_some() && chat.is_rolling() {
        draft(
            PROGRESSING,
            true,
            "RollingOut",
            format!(
                "{} of {} chat-service pods run the latest spec.",
                chat.updated, chat.desired
            ),
        )
    } else {
        draft(PROGRESSING, false, "Settled", "No rollout in progress.")
    }
}

/// At most this many faults are quoted in Degraded's message.
const QUOTED_FAULTS: usize = 3;

/// Whether something is wrong that will not heal by waiting: a bad config, a child the API
/// server refused, a pod or workload fault (crash loop, OOM kill, restarts, image pull, no
/// place to run, progress deadline, pods that cannot be created), a store the chat pods cannot
/// reach, no healthy back end, or no chat pod available while the Deployment has not even
/// caught up with its spec.
pub fn degraded(config_ok: bool, observed: &Observed) -> Draft {
    let chat = observed.chat.unwrap_or_default();
    if !config_ok {
        return draft(
            DEGRADED,
            true,
            "ConfigInvalid",
            "The spec cannot be applied until the config problem is fixed.",
        );
    }
    if !observed.apply_failures.is_empty() {
        return draft(
            DEGRADED,
            true,
            "ApplyFailed",
            format!(
                "The API server refused {} of the children (the others were applied): {}",
                observed.apply_failures.len(),
                observed.apply_failures.join("; ")
            ),
        );
    }
    if let Some(first) = observed.faults.first() {
        let mut message: Vec<&str> = observed
            .faults
            .iter()
            .take(QUOTED_FAULTS)
            .map(|f| f.message.as_str())
            .collect();
        let more = observed.faults.len().saturating_sub(QUOTED_FAULTS);
        let more = format!("and {more} more");
        if observed.faults.len() > QUOTED_FAULTS {
            message.push(&more);
        }
        return draft(DEGRADED, true, first.kind.reason(), message.join("; "));
    }
    if let Some(StoreReport::Seen {
        pod,
        redis,
        mongodb,
    }) = &observed.stores
        && (redis.is_err() || mongodb.is_err())
    {
        let failing: Vec<String> = [("Redis", redis), ("MongoDB", mongodb)]
            .into_iter()
            .filter_map(|(name, state)| state.as_ref().err().map(|e| format!("{name}: {e}")))
            .collect();
        return draft(
            DEGRADED,
            true,
            "StoreUnreachable",
            format!("Chat pod {pod} cannot reach {}", failing.join("; ")),
        );
    }
    if let Some(BackendReport::Counts { ready: 0, total }) = observed.backends
        && total > 0
    {
        return draft(
            DEGRADED,
            true,
            "NoHealthyBackends",
            format!("None of {total} back-end endpoints passes the chat service's health checks."),
        );
    }
    if observed.chat.is_some() && !chat.observed_latest && chat.available == 0 && chat.desired > 0 {
        return draft(
            DEGRADED,
            true,
            "NoAvailablePods",
            "No chat-service pod is available.",
        );
    }
    // Last: the HPA still scales on its resource targets, so every fault above matters more.
    if let Some(why) = &observed.metrics_unavailable {
        return draft(DEGRADED, true, "MetricsUnavailable", why.clone());
    }
    draft(DEGRADED, false, "AsExpected", "No fault detected.")
}

/// The other conditions' verdicts that Ready summarises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdicts {
    pub config_ok: bool,
    pub storage_ok: bool,
    pub backends_ok: bool,
    pub progressing: bool,
}

/// The summary: true when everything else is fine and some chat pod is available; otherwise its
/// reason names the first condition to look at.
pub fn ready(verdicts: Verdicts, observed: &Observed) -> Draft {
    let chat = observed.chat.unwrap_or_default();
    let chat_available = observed.chat.is_some() && chat.available > 0;
    if !verdicts.config_ok {
        draft(
            READY,
            false,
            "ConfigInvalid",
            "The configuration is invalid; see ConfigValid.",
        )
    } else if !observed.apply_failures.is_empty() {
        draft(
            READY,
            false,
            "ApplyFailed",
            "Some children could not be applied; see Degraded.",
        )
    } else if !verdicts.storage_ok {
        draft(
            READY,
            false,
            "StorageNotReady",
            "Storage is not ready; see StorageReady.",
        )
    } else if !verdicts.backends_ok {
        draft(
            READY,
            false,
            "BackendsNotReady",
            "Back ends are not ready; see BackendsReady.",
        )
    } else if verdicts.progressing {
        draft(
            READY,
            false,
            "RollingOut",
            "A rollout is in progress; see Progressing.",
        )
    } else if chat_available {
        draft(
            READY,
            true,
            "Ready",
            format!(
                "{} of {} chat-service pods are ready.",
                chat.ready, chat.desired
            ),
        )
    } else {
        draft(
            READY,
            false,
            "NoAvailablePods",
            format!(
                "{} of {} chat-service pods are available.",
                chat.available, chat.desired
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::observed::WorkloadState;

    const READY_STATE: WorkloadState = WorkloadState {
        desired: 1,
        ready: 1,
        updated: 1,
        available: 1,
        observed_latest: true,
    };
    const STARTING: WorkloadState = WorkloadState {
        desired: 1,
        ready: 0,
        updated: 1,
        available: 0,
        observed_latest: true,
    };

    fn observed() -> Observed {
        Observed {
            chat: Some(READY_STATE),
            redis: Some(READY_STATE),
            mongodb: Some(READY_STATE),
            ..Default::default()
        }
    }

    fn verdict(draft: &Draft) -> (bool, &str) {
        (draft.status, draft.reason)
    }

    const ALL_GOOD: Verdicts = Verdicts {
        config_ok: true,
        storage_ok: true,
        backends_ok: true,
        progressing: false,
    };

    #[test]
    fn config_valid_names_every_problem_and_the_first_reason() {
        assert_eq!(verdict(&config_valid(Ok(()))), (true, "Valid"));
        let problems = [
            ConfigProblem {
                reason: "SecretMissing",
                message: "a.".into(),
            },
            ConfigProblem {
                reason: "InvalidConfig",
                message: "b.".into(),
            },
        ];
        let draft = config_valid(Err(&problems));
        assert_eq!(verdict(&draft), (false, "SecretMissing"));
        assert_eq!(draft.message, "a. b.");
        assert_eq!(config_valid(Err(&[])).reason, "Invalid");
    }

    #[test]
    fn storage_is_what_a_chat_pod_sees_and_unknown_before_one_runs() {
        let managed = storage_ready(true, &observed());
        assert_eq!(verdict(&managed), (true, "PodsReady"));
        let external = storage_ready(true, &Observed::default());
        assert_eq!(verdict(&external), (false, "NotVerified"));
        assert!(
            external.unknown,
            "an uncontacted external store is Unknown, never True"
        );
        assert_eq!(
            external.message,
            "External Redis and MongoDB not verified yet: no chat pod runs to connect to it."
        );
        let mut seen = Observed {
            stores: Some(StoreReport::Seen {
                pod: "chat-1".into(),
                redis: Ok(()),
                mongodb: Ok(()),
            }),
            ..Default::default()
        };
        assert_eq!(verdict(&storage_ready(true, &seen)), (true, "Ready"));
        seen.stores = Some(StoreReport::Seen {
            pod: "chat-1".into(),
            redis: Err("invalid peer certificate: UnknownIssuer".into()),
            mongodb: Ok(()),
        });
        let draft = storage_ready(true, &seen);
        assert_eq!(verdict(&draft), (false, "RedisUnreachable"));
        assert_eq!(
            draft.message,
            "Chat pod chat-1 cannot reach Redis: invalid peer certificate: UnknownIssuer"
        );
        assert_eq!(verdict(&degraded(true, &seen)), (true, "StoreUnreachable"));
        seen.stores = Some(StoreReport::Unreachable("timed out".into()));
        let draft = storage_ready(true, &seen);
        assert!(draft.unknown && draft.reason == "NotVerified", "{draft:?}");
        let mut starting = observed();
        starting.redis = Some(STARTING);
        starting.mongodb = Some(STARTING);
        let draft = storage_ready(true, &starting);
        assert_eq!(verdict(&draft), (false, "WaitingForPods"));
        assert_eq!(
            draft.message,
            "Waiting for managed Redis and MongoDB pods to be ready."
        );
        assert_eq!(
            verdict(&storage_ready(false, &observed())),
            (false, "ConfigInvalid")
        );
    }

    #[test]
    fn degraded_quotes_the_first_faults_and_counts_the_rest() {
        let mut o = observed();
        o.faults = (0..5)
            .map(|i| crate::pods::Fault {
                kind: if i == 0 {
                    crate::pods::FaultKind::OomKilled
                } else {
                    crate::pods::FaultKind::Restarting
                },
                message: format!("fault {i}"),
                pod: None,
            })
            .collect();
        let draft = degraded(true, &o);
        assert_eq!(verdict(&draft), (true, "OOMKilled"));
        assert_eq!(draft.message, "fault 0; fault 1; fault 2; and 2 more");
        o.faults.clear();
        o.backends = Some(BackendReport::Counts { ready: 0, total: 2 });
        assert_eq!(verdict(&degraded(true, &o)), (true, "NoHealthyBackends"));
    }

    #[test]
    fn backends_follow_ollama_and_what_the_chat_pods_report() {
        let mut o = observed();
        assert_eq!(verdict(&backends_ready(true, &o)), (true, "Configured"));
        o.ollama = Some(STARTING);
        assert_eq!(
            verdict(&backends_ready(true, &o)),
            (false, "WaitingForPods")
        );
        o.ollama = Some(READY_STATE);
        assert!(
            backends_ready(true, &o)
                .message
                .starts_with("Managed Ollama pods are ready")
        );
        o.backends = Some(BackendReport::Counts { ready: 1, total: 2 });
        let draft = backends_ready(true, &o);
        assert_eq!(verdict(&draft), (true, "Healthy"));
        assert!(draft.message.starts_with("1 of 2 "), "{}", draft.message);
        o.backends = Some(BackendReport::Counts { ready: 0, total: 2 });
        assert_eq!(
            verdict(&backends_ready(true, &o)),
            (false, "NoHealthyBackends")
        );
        o.backends = Some(BackendReport::Unreachable("timed out".into()));
        let draft = backends_ready(true, &o);
        assert_eq!(verdict(&draft), (true, "Configured"));
        assert!(draft.message.contains("timed out"), "{}", draft.message);
        assert_eq!(
            verdict(&backends_ready(false, &o)),
            (false, "ConfigInvalid")
        );
    }

    #[test]
    fn progressing_while_pods_run_an_older_spec() {
        assert_eq!(verdict(&progressing(true, &observed())), (false, "Settled"));
        let mut o = observed();
        o.chat = Some(WorkloadState {
            desired: 2,
            updated: 1,
            ..READY_STATE
        });
        let draft = progressing(true, &o);
        assert_eq!(verdict(&draft), (true, "RollingOut"));
        assert_eq!(
            draft.message,
            "1 of 2 chat-service pods run the latest spec."
        );
        assert_eq!(verdict(&progressing(false, &o)), (false, "Settled"));
        assert_eq!(
            verdict(&progressing(true, &Observed::default())),
            (false, "Settled")
        );
    }

    #[test]
    fn degraded_by_a_bad_config_or_no_pod_at_all() {
        assert_eq!(verdict(&degraded(true, &observed())), (false, "AsExpected"));
        assert_eq!(
            verdict(&degraded(false, &observed())),
            (true, "ConfigInvalid")
        );
        let mut o = observed();
        o.chat = Some(WorkloadState {
            desired: 2,
            observed_latest: false,
            ..Default::default()
        });
        assert_eq!(verdict(&degraded(true, &o)), (true, "NoAvailablePods"));
        // Pods that are merely starting under a seen spec are not a fault yet.
        o.chat = Some(STARTING);
        assert_eq!(verdict(&degraded(true, &o)), (false, "AsExpected"));
    }

    #[test]
    fn ready_names_the_first_condition_to_look_at() {
        let o = observed();
        let draft = ready(ALL_GOOD, &o);
        assert_eq!(verdict(&draft), (true, "Ready"));
        assert_eq!(draft.message, "1 of 1 chat-service pods are ready.");
        let not = |verdicts| ready(verdicts, &o).reason;
        assert_eq!(
            not(Verdicts {
                config_ok: false,
                storage_ok: false,
                ..ALL_GOOD
            }),
            "ConfigInvalid"
        );
        assert_eq!(
            not(Verdicts {
                storage_ok: false,
                backends_ok: false,
                ..ALL_GOOD
            }),
            "StorageNotReady"
        );
        assert_eq!(
            not(Verdicts {
                backends_ok: false,
                ..ALL_GOOD
            }),
            "BackendsNotReady"
        );
        assert_eq!(
            not(Verdicts {
                progressing: true,
                ..ALL_GOOD
            }),
            "RollingOut"
        );
        let mut starting = observed();
        starting.chat = Some(STARTING);
        assert_eq!(
            verdict(&ready(ALL_GOOD, &starting)),
            (false, "NoAvailablePods")
        );
    }

    #[test]
    fn a_custom_metric_nobody_serves_is_degraded_naming_why() {
        let mut o = observed();
        o.metrics_unavailable = Some("no adapter serves custom.metrics.k8s.io/v1beta1".into());
        let draft = degraded(true, &o);
        assert_eq!(verdict(&draft), (true, "MetricsUnavailable"));
        assert!(draft.message.contains("custom.metrics.k8s.io"));
    }
}
