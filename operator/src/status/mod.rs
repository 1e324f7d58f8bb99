//! Status: the ChatService's conditions, computed from the validation outcome and what the
//! observe step saw. No kubelet means no pod ever becomes ready on its own, so readiness is read
//! only from workload status, never assumed. [`conditions`] has one function per condition; this
//! module puts them together, keeps transition times, and says which changes are news (Events).

pub mod conditions;
pub mod observed;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

pub use self::conditions::{
    BACKENDS_READY, CONFIG_VALID, DEGRADED, Draft, PROGRESSING, READY, STORAGE_READY, Verdicts,
};
pub use self::observed::{Observed, WorkloadState};
use crate::crd::{ChatService, ChatServiceStatus};
use crate::validated::ConfigProblem;

/// Computes the new status. `config` is the validation outcome: problems keep the previous
/// workload numbers but flip ConfigValid, Ready and Degraded.
pub fn compute_status(
    cr: &ChatService,
    observed: &Observed,
    config: Result<(), &[ConfigProblem]>,
    now: Timestamp,
) -> ChatServiceStatus {
    let old = cr.status.clone().unwrap_or_default();
    let config_ok = config.is_ok();
    let config_valid = conditions::config_valid(config);
    let storage = conditions::storage_ready(config_ok, observed);
    let backends = conditions::backends_ready(config_ok, observed);
    let progressing = conditions::progressing(config_ok, observed);
    let degraded = conditions::degraded(config_ok, observed);
    let verdicts = Verdicts {
        config_ok,
        storage_ok: storage.status || storage.unknown,
        backends_ok: backends.status,
        progressing: progressing.status,
    };
    let ready = conditions::ready(verdicts, observed);
    let drafts = [
        ready,
        config_valid,
        storage,
        backends,
        progressing,
        degraded,
    ];

    let generation = cr.metadata.generation;
    ChatServiceStatus {
        observed_generation: generation,
        conditions: drafts
            .into_iter()
            .map(|d| with_transition_time(d, &old.conditions, generation, now))
            .collect(),
        replicas: observed.chat.map(|c| c.desired).or(old.replicas),
        ready_replicas: observed.chat.map(|c| c.ready).or(old.ready_replicas),
        endpoint: observed.endpoint.clone().or(old.endpoint),
        connection_secret: observed.connection_secret.clone().or(old.connection_secret),
        // The rollout's own step decides it (crate::rollout); kept as it was until then.
        rollout: old.rollout,
    }
}

/// The condition for `draft`. The time moves only when the status flips; reason and message may
/// change freely.
fn with_transition_time(
    draft: Draft,
    old: &[Condition],
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = match (draft.unknown, draft.status) {
        (true, _) => "Unknown",
        (false, true) => "True",
        (false, false) => "False",
    }
    .to_string();
    let last_transition_time = old
        .iter()
        .find(|c| c.type_ == draft.type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: draft.type_.into(),
        status,
        reason: draft.reason.into(),
        message: draft.message,
        observed_generation: generation,
        last_transition_time,
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
                // A first status is news only when it is bad or is the Ready summary. Degraded
                // because of the config says what ConfigValid's Event already says.
                None => {
                    c.type_ == READY
                        || (c.type_ == CONFIG_VALID && c.status == "False")
                        || (c.type_ == DEGRADED
                            && c.status == "True"
                            && c.reason != "ConfigInvalid")
                }
            }
        })
        .collect()
}

/// How a flipped condition is announced as an Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// A Warning (not Normal) Event: the condition turned bad.
    pub warning: bool,
    /// The condition type, with `False` appended when it turned false.
    pub reason: String,
    /// The condition's message, cut to the 1,000 characters an Event note may hold.
    pub note: String,
}

/// The Event for a condition that flipped. Progressing and Degraded are good when false; a
/// rollout starting is normal operation, so Progressing is never a warning.
pub fn announcement(condition: &Condition) -> Announcement {
    let is_true = condition.status == "True";
    let good = is_true != (condition.type_ == PROGRESSING || condition.type_ == DEGRADED);
    Announcement {
        warning: !(good || condition.type_ == PROGRESSING),
        reason: format!("{}{}", condition.type_, if is_true { "" } else { "False" }),
        note: condition.message.chars().take(1000).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::*;
    use crate::probe::BackendReport;
    use crate::validated::ConfigProblem;

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
            apply_failures: Vec::new(),
            ..Default::default()
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

    #[test]
    fn flips_are_announced_as_warnings_only_when_they_are_bad() {
        let flip = |type_: &str, status: &str| {
            announcement(&Condition {
                type_: type_.into(),
                status: status.into(),
                reason: "R".into(),
                message: "m".repeat(1200),
                observed_generation: None,
                last_transition_time: Time(ts(1)),
            })
        };
        let ready = flip(READY, "True");
        assert_eq!((ready.warning, ready.reason.as_str()), (false, "Ready"));
        assert_eq!(ready.note.len(), 1000);
        let not_ready = flip(READY, "False");
        assert_eq!(
            (not_ready.warning, not_ready.reason.as_str()),
            (true, "ReadyFalse")
        );
        assert!(flip(DEGRADED, "True").warning);
        assert!(!flip(DEGRADED, "False").warning);
        assert!(!flip(PROGRESSING, "True").warning);
        assert!(!flip(PROGRESSING, "False").warning);
        assert!(flip(CONFIG_VALID, "False").warning);
    }
}
