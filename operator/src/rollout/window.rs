//! The step's window as the chat pods counted it: `rollout` in each chat pod's
//! `GET /v1/backends`, asked of every running chat pod by its IP (the Service would answer for
//! one pod at random), merged into one [`Window`].
//!
//! Only pods whose split is the step's (same weight, same candidate) count: while a step's
//! config rolls out, the pods still on the previous step's config report the previous weight,
//! and their turns are not this step's. Each pod's figures cover its life, which began with
//! this step's config (a config change rolls the pods).

use serde::Deserialize;

use super::machine::Window;
use super::spec::{RolloutSpec, WindowFigures};
use crate::probe::BACKENDS_PATH;

/// `rollout` in a chat pod's `GET /v1/backends`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodRollout {
    #[serde(default)]
    pub candidate_backend: Option<String>,
    #[serde(default)]
    pub candidate_model: Option<String>,
    pub candidate_weight_percent: i32,
    pub ttft_buckets_ms: Vec<u64>,
    pub current: PodSide,
    pub candidate: PodSide,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodSide {
    pub turns: u64,
    pub errors: u64,
    pub ttft_counts: Vec<u64>,
    pub completion_tokens: u64,
    pub generation_seconds: f64,
}

#[derive(Deserialize)]
struct Backends {
    #[serde(default)]
    rollout: Option<PodRollout>,
}

/// Asks the chat pod at `base_url` (`http://<pod IP>:<port>`) for its split; `None` when it does
/// not answer or has no rollout in its config (yet).
pub async fn read_pod(client: &reqwest::Client, base_url: &str) -> Option<PodRollout> {
    let url = format!("{base_url}{BACKENDS_PATH}");
    let response = client.get(&url).send().await.ok()?;
    match response.json::<Backends>().await {
        Ok(backends) => backends.rollout,
        Err(e) => {
            tracing::debug!(%url, error = %e, "a chat pod's rollout figures could not be read");
            None
        }
    }
}

/// The window of the step with `weight` of `spec`'s candidate, merged from the pods that serve
/// exactly that split; `None` when none does.
pub fn merge(spec: &RolloutSpec, weight: i32, pods: &[PodRollout]) -> Option<Window> {
    let serving: Vec<&PodRollout> = pods
        .iter()
        .filter(|p| {
            p.candidate_weight_percent == weight
                && p.candidate_backend == spec.candidate.backend
                && p.candidate_model == spec.candidate.model
        })
        .collect();
    let bounds = &serving.first()?.ttft_buckets_ms;
    // Histograms with other bounds (another chat-service version) cannot be added up.
    let serving: Vec<&PodRollout> = serving
        .into_iter()
        .filter(|p| &p.ttft_buckets_ms == bounds)
        .collect();
    Some(Window {
        candidate: figures(bounds, serving.iter().map(|p| &p.candidate)),
        current: figures(bounds, serving.iter().map(|p| &p.current)),
    })
}

fn figures<'a>(bounds: &[u64], sides: impl Iterator<Item = &'a PodSide>) -> WindowFigures {
    let mut sum = PodSide {
        ttft_counts: vec![0; bounds.len() + 1],
        ..PodSide::default()
    };
    for side in sides {
        sum.turns += side.turns;
        sum.errors += side.errors;
        sum.completion_tokens += side.completion_tokens;
        sum.generation_seconds += side.generation_seconds;
        for (total, count) in sum.ttft_counts.iter_mut().zip(&side.ttft_counts) {
            *total += count;
        }
    }
    WindowFigures {
        turns: sum.turns as i64,
        errors: sum.errors as i64,
        error_rate_percent: match sum.turns {
            0 => 0.0,
            turns => sum.errors as f64 * 100.0 / turns as f64,
        },
        ttft_p95_ms: p95(bounds, &sum.ttft_counts),
        tokens_per_second: (sum.generation_seconds > 0.0)
            .then(|| sum.completion_tokens as f64 / sum.generation_seconds),
    }
}

/// The upper bound of the bucket holding the 95th percentile; the overflow bucket reads as
/// twice the last bound (slower than anything measured, which is what a gate needs to know).
pub fn p95(bounds: &[u64], counts: &[u64]) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (total as f64 * 0.95).ceil() as u64;
    let mut seen = 0;
    for (index, count) in counts.iter().enumerate() {
        seen += count;
        if seen >= rank {
            return Some(match bounds.get(index) {
                Some(bound) => *bound as f64,
                None => bounds.last().copied().unwrap_or(0) as f64 * 2.0,
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::spec::RolloutCandidate;

    fn spec() -> RolloutSpec {
        RolloutSpec {
            candidate: RolloutCandidate {
                backend: Some("canary".into()),
                model: None,
            },
            steps: vec![5, 100],
            min_turns_per_step: None,
            min_seconds_per_step: None,
            gates: None,
            paused: None,
        }
    }

    fn pod(weight: i32, candidate_turns: u64, candidate_errors: u64, slow: u64) -> PodRollout {
        PodRollout {
            candidate_backend: Some("canary".into()),
            candidate_model: None,
            candidate_weight_percent: weight,
            ttft_buckets_ms: vec![100, 1000],
            current: PodSide {
                turns: 10,
                errors: 0,
                ttft_counts: vec![10, 0, 0],
                completion_tokens: 100,
                generation_seconds: 10.0,
            },
            candidate: PodSide {
                turns: candidate_turns,
                errors: candidate_errors,
                ttft_counts: vec![candidate_turns - slow, 0, slow],
                completion_tokens: 50,
                generation_seconds: 10.0,
            },
        }
    }

    #[test]
    fn pods_of_the_step_are_summed_and_others_ignored() {
        let pods = [pod(5, 10, 1, 0), pod(5, 10, 1, 0), pod(50, 99, 99, 99)];
        let window = merge(&spec(), 5, &pods).unwrap();
        assert_eq!((window.candidate.turns, window.candidate.errors), (20, 2));
        assert_eq!(window.candidate.error_rate_percent, 10.0);
        assert_eq!(window.current.turns, 20);
        assert_eq!(window.candidate.tokens_per_second, Some(5.0));
        assert_eq!(window.current.tokens_per_second, Some(10.0));
        assert_eq!(window.current.ttft_p95_ms, Some(100.0));
        assert_eq!(merge(&spec(), 25, &pods), None, "no pod serves 25 % yet");
    }

    #[test]
    fn p95_reads_the_bucket_bound_and_overflow_as_slower_than_the_last() {
        assert_eq!(p95(&[100, 1000], &[0, 0, 0]), None);
        assert_eq!(p95(&[100, 1000], &[95, 5, 0]), Some(100.0));
        assert_eq!(p95(&[100, 1000], &[94, 6, 0]), Some(1000.0));
        let window = merge(&spec(), 5, &[pod(5, 10, 0, 1)]).unwrap();
        assert_eq!(window.candidate.ttft_p95_ms, Some(2000.0));
    }

    #[test]
    fn a_pod_of_another_candidate_does_not_count() {
        let mut other = pod(5, 10, 0, 0);
        other.candidate_backend = Some("elsewhere".into());
        assert_eq!(merge(&spec(), 5, &[other]), None);
    }
}
