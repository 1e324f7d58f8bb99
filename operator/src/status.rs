//! Status: conditions computed from what the children report. No kubelet means no pod ever
//! becomes ready on its own, so readiness is read only from workload status, never assumed.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::crd::{ChatService, ChatServiceStatus};
use crate::probe::BackendReport;
use crate::validate::ConfigProblem;

pub const READY: &str = "Ready";
pub const CONFIG_VALID: &str = "ConfigValid";
pub const STORAGE_READY: &str = "StorageReady";
pub const BACKENDS_READY: &str = "BackendsReady";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

/// Replica counts of one workload as its controller reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkloadState {
    pub desired: i32,
    pub ready: i32,
    pub updated: i32,
    pub available: i32,
    /// The workload controller has seen the latest spec.
    pub observed_latest: bool,
}

impl WorkloadState {
    pub fn is_ready(&self) -> bool {
        self.observed_latest && self.desired > 0 && self.ready >= self.desired
    }
    pub fn is_rolling(&self) -> bool {
        !self.observed_latest || self.updated < self.desired
    }
}

/// What the reconcile saw after applying.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    pub chat: Option<WorkloadState>,
    pub redis: Option<WorkloadState>,
    pub mongodb: Option<WorkloadState>,
    pub ollama: Option<WorkloadState>,
    pub endpoint: Option<String>,
    pub connection_secret: Option<String>,
    /// What the chat pods report about their back ends; `None` when nobody was asked (no chat pod
    /// is available yet).
    pub backends: Option<BackendReport>,
}

struct Draft {
    type_: &'static str,
    status: bool,
    reason: &'static str,
    message: String,
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
        reason,
        message: message.into(),
    }
}

/// Computes the new status. `config` is the validation outcome: problems keep the previous
/// workload numbers but flip ConfigValid, Ready and Degraded.
pub fn compute_status(
    cr: &ChatService,
    observed: &Observed,
    config: Result<(), &[ConfigProblem]>,
    now: Timestamp,
) -> ChatServiceStatus {
    let old = cr.status.clone().unwrap_or_default();
    let mut drafts = Vec::new();

    let config_ok = match config {
        Ok(()) => {
            drafts.push(draft(
                CONFIG_VALID,
                true,
                "Valid",
                "All referenced Secrets exist and the rendered config is valid.",
            ));
            true
        }
        Err(problems) => {
            let message = problems
                .iter()
                .map(|p| p.message.as_str())
                .collect::<Vec<_>>()
                .join(" ");
            let reason = problems.first().map(|p| p.reason).unwrap_or("Invalid");
            drafts.push(draft(CONFIG_VALID, false, reason, message));
            false
        }
    };

    let storage = [("Redis", &observed.redis), ("MongoDB", &observed.mongodb)];
    let waiting: Vec<&str> = storage
        .iter()
        .filter(|(_, state)| state.is_some_and(|s| !s.is_ready()))
        .map(|(name, _)| *name)
        .collect();
    let storage_ok = config_ok && waiting.is_empty();
    drafts.push(if !config_ok {
        draft(
            STORAGE_READY,
            false,
            "ConfigInvalid",
            "Storage is not configured until the config is valid.",
        )
    } else if waiting.is_empty() {
        draft(
            STORAGE_READY,
            true,
            "Ready",
            "Redis and MongoDB are ready or external.",
        )
    } else {
        draft(
            STORAGE_READY,
            false,
            "WaitingForPods",
            format!(
                "Waiting for managed {} pods to be ready.",
                waiting.join(" and ")
            ),
        )
    });

    let ollama_ready = observed.ollama.is_none_or(|s| s.is_ready());
    let (backends_ok, backends_draft) = if !config_ok {
        (
            false,
            draft(
                BACKENDS_READY,
                false,
                "ConfigInvalid",
                "Back ends are not configured until the config is valid.",
            ),
        )
    } else if !ollama_ready {
        (
            false,
            draft(
                BACKENDS_READY,
                false,
                "WaitingForPods",
                "Waiting for managed Ollama pods to pull their models and become ready.",
            ),
        )
    } else {
        match &observed.backends {
            Some(BackendReport::Counts { ready, total }) if *ready > 0 => (
                true,
                draft(
                    BACKENDS_READY,
                    true,
                    "Healthy",
                    format!(
                        "{ready} of {total} back-end endpoints pass the chat service's health checks."
                    ),
                ),
            ),
            Some(BackendReport::Counts { total, .. }) => (
                false,
                draft(
                    BACKENDS_READY,
                    false,
                    "NoHealthyBackends",
                    format!(
                        "None of {total} back-end endpoints passes the chat service's health checks; see GET /v1/backends on the chat Service."
                    ),
                ),
            ),
            Some(BackendReport::Unreachable(why)) => (
                true,
                draft(
                    BACKENDS_READY,
                    true,
                    "Configured",
                    format!(
                        "Back ends are configured; their health could not be read from the chat service ({why})."
                    ),
                ),
            ),
            None => (
                true,
                draft(
                    BACKENDS_READY,
                    true,
                    "Configured",
                    match observed.ollama {
                        Some(_) => {
                            "Managed Ollama pods are ready with their models pulled; external back ends are health-checked by the chat service."
                        }
                        None => {
                            "External back ends are configured; the chat service health-checks them."
                        }
                    },
                ),
            ),
        }
    };
    drafts.push(backends_draft);

    let chat = observed.chat.unwrap_or_default();
    let progressing = config_ok && observed.chat.is_some() && chat.is_rolling();
    drafts.push(if progressing {
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
    });

    let chat_ready = observed.chat.is_some() && chat.available > 0;
    let degraded = !config_ok
        || (observed.chat.is_some()
            && !chat.observed_latest
            && chat.available == 0
            && chat.desired > 0);
    drafts.push(if !config_ok {
        draft(
            DEGRADED,
            true,
            "ConfigInvalid",
            "The spec cannot be applied until the config problem is fixed.",
        )
    } else if degraded {
        draft(
            DEGRADED,
            true,
            "NoAvailablePods",
            "No chat-service pod is available.",
        )
    } else {
        draft(DEGRADED, false, "AsExpected", "No fault detected.")
    });

    let ready = config_ok && storage_ok && backends_ok && chat_ready && !progressing;
    let ready_draft = if ready {
        draft(
            READY,
            true,
            "Ready",
            format!(
                "{} of {} chat-service pods are ready.",
                chat.ready, chat.desired
            ),
        )
    } else if !config_ok {
        draft(
            READY,
            false,
            "ConfigInvalid",
            "The configuration is invalid; see ConfigValid.",
        )
    } else if !storage_ok {
        draft(
            READY,
            false,
            "StorageNotReady",
            "Storage is not ready; see StorageReady.",
        )
    } else if !backends_ok {
        draft(
            READY,
            false,
            "BackendsNotReady",
            "Back ends are not ready; see BackendsReady.",
        )
    } else if progressing {
        draft(
            READY,
            false,
            "RollingOut",
            "A rollout is in progress; see Progressing.",
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
    };
    drafts.insert(0, ready_draft);

    let generation = cr.metadata.generation;
    let conditions = drafts
        .into_iter()
        .map(|d| {
            let status = if d.status { "True" } else { "False" }.to_string();
            // The time moves only when the status flips; reason and message may change freely.
            let last_transition_time = old
                .conditions
                .iter()
                .find(|c| c.type_ == d.type_ && c.status == status)
                .map(|c| c.last_transition_time.clone())
                .unwrap_or(Time(now));
            Condition {
                type_: d.type_.into(),
                status,
                reason: d.reason.into(),
                message: d.message,
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect();

    ChatServiceStatus {
        observed_generation: generation,
        conditions,
        replicas: observed.chat.map(|c| c.desired).or(old.replicas),
        ready_replicas: observed.chat.map(|c| c.ready).or(old.ready_replicas),
        endpoint: observed.endpoint.clone().or(old.endpoint),
        connection_secret: observed.connection_secret.clone().or(old.connection_secret),
    }
}

/// Conditions whose status changed from `old` to `new` (including first appearance), for Events.
pub fn transitions<'a>(
    old: Option<&ChatServiceStatus>,
    new: &'a ChatServiceStatus,
) -> Vec<&'a Condition> {
    new.conditions
        .iter()
        .filter(|c| {
            let before = old.and_then(|o| o.conditions.iter().find(|p| p.type_ == c.type_));
            match before {
                Some(p) => p.status != c.status,
                // A first status is news only when it is bad or is the Ready summary.
                None => c.type_ == READY || (c.type_ == CONFIG_VALID && c.status == "False"),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures::*;

    fn ts(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap()
    }

    fn ready_observed() -> Observed {
        let ok = WorkloadState {
            desired: 2,
            ready: 2,
            updated: 2,
            available: 2,
            observed_latest: true,
        };
        Observed {
            chat: Some(ok),
            redis: Some(WorkloadState {
                desired: 1,
                ready: 1,
                updated: 1,
                available: 1,
                observed_latest: true,
            }),
            mongodb: Some(WorkloadState {
                desired: 1,
                ready: 1,
                updated: 1,
                available: 1,
                observed_latest: true,
            }),
            ollama: None,
            endpoint: Some("http://support.team-a.svc".into()),
            connection_secret: Some("support-connection".into()),
            backends: None,
        }
    }

    fn condition<'a>(status: &'a ChatServiceStatus, type_: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn all_ready_gives_ready_true() {
        let cr = chat_service(MINIMAL);
        let status = compute_status(&cr, &ready_observed(), Ok(()), ts(100));
        assert_eq!(condition(&status, READY).status, "True");
        assert_eq!(condition(&status, DEGRADED).status, "False");
        assert_eq!(status.observed_generation, Some(1));
        assert_eq!(status.ready_replicas, Some(2));
        assert_eq!(status.conditions.len(), 6);
    }

    #[test]
    fn backends_ready_follows_what_the_chat_service_reports() {
        let cr = chat_service(MINIMAL);
        let mut observed = ready_observed();
        observed.backends = Some(BackendReport::Counts { ready: 1, total: 2 });
        let status = compute_status(&cr, &observed, Ok(()), ts(100));
        let backends = condition(&status, BACKENDS_READY);
        assert_eq!(
            (backends.status.as_str(), backends.reason.as_str()),
            ("True", "Healthy")
        );
        assert!(
            backends.message.starts_with("1 of 2 "),
            "{}",
            backends.message
        );
        assert_eq!(condition(&status, READY).status, "True");

        observed.backends = Some(BackendReport::Counts { ready: 0, total: 2 });
        let status = compute_status(&cr, &observed, Ok(()), ts(100));
        let backends = condition(&status, BACKENDS_READY);
        assert_eq!(
            (backends.status.as_str(), backends.reason.as_str()),
            ("False", "NoHealthyBackends")
        );
        let ready = condition(&status, READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "BackendsNotReady")
        );

        // An unanswered question proves nothing either way.
        observed.backends = Some(BackendReport::Unreachable("timed out".into()));
        let status = compute_status(&cr, &observed, Ok(()), ts(100));
        let backends = condition(&status, BACKENDS_READY);
        assert_eq!(
            (backends.status.as_str(), backends.reason.as_str()),
            ("True", "Configured")
        );
        assert!(
            backends.message.contains("timed out"),
            "{}",
            backends.message
        );
    }

    #[test]
    fn pods_that_never_start_are_reported_honestly() {
        let cr = chat_service(MINIMAL);
        let mut observed = ready_observed();
        observed.redis = Some(WorkloadState {
            desired: 1,
            observed_latest: true,
            updated: 1,
            ..Default::default()
        });
        let status = compute_status(&cr, &observed, Ok(()), ts(100));
        assert_eq!(condition(&status, STORAGE_READY).reason, "WaitingForPods");
        assert_eq!(condition(&status, READY).status, "False");
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let mut cr = chat_service(MINIMAL);
        let first = compute_status(&cr, &ready_observed(), Ok(()), ts(100));
        cr.status = Some(first.clone());
        let same = compute_status(&cr, &ready_observed(), Ok(()), ts(200));
        assert_eq!(first, same, "a resync changes nothing");
        assert!(transitions(Some(&first), &same).is_empty());

        let problem = [ConfigProblem {
            reason: "SecretMissing",
            message: "spec.auth.apiKeysSecret: Secret \"k\" does not exist.".into(),
        }];
        let broken = compute_status(&cr, &ready_observed(), Err(&problem), ts(300));
        let valid = condition(&broken, CONFIG_VALID);
        assert_eq!(
            (valid.status.as_str(), valid.reason.as_str()),
            ("False", "SecretMissing")
        );
        assert_eq!(valid.last_transition_time, Time(ts(300)));
        assert_eq!(
            condition(&broken, PROGRESSING).last_transition_time,
            Time(ts(100))
        );
        let changed: Vec<_> = transitions(Some(&first), &broken)
            .iter()
            .map(|c| c.type_.as_str())
            .collect();
        assert!(
            changed.contains(&CONFIG_VALID) && changed.contains(&READY),
            "{changed:?}"
        );
    }
}
