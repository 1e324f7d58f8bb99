//! The split of a canary rollout (`rollout` in the config): which side of the split a session
//! is on, and what each side served, for the operator to compare (`rollout` in
//! `GET /v1/backends`).
//!
//! A session's side is `xxh3(session id) mod 10000 < weight × 100`: a fixed point per session
//! on a line the weight cuts. The same session is on the same side in every replica and every
//! turn, and raising the weight only moves sessions from the current side to the candidate,
//! never back, so no conversation jumps between models mid-way while a rollout advances. A
//! session leaves its side only for a turn its side cannot serve (see `BackendPool::start`).
//! Rendezvous hashing over the two sides would keep the same property; a threshold keeps it
//! exactly and is simpler to check.
//!
//! The figures cover the process's lifetime, which is the step's window: the operator renders
//! the step's weight into the config, and a config change rolls the pods.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::config::RolloutConfig;

/// Upper bounds (milliseconds) of the time-to-first-token histogram; one more bucket counts
/// everything slower. The operator merges pods' histograms bucket by bucket.
pub const TTFT_BUCKETS_MS: [u64; 17] = [
    50, 100, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000, 7500, 10000, 15000, 20000, 30000,
    60000,
];

/// One side of the split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Current,
    Candidate,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Current => Side::Candidate,
            Side::Candidate => Side::Current,
        }
    }
}

/// The rollout's split and its figures.
pub struct Split {
    pub config: RolloutConfig,
    default_model: String,
    current: Arc<SideCounters>,
    candidate: Arc<SideCounters>,
    since: SystemTime,
}

impl Split {
    pub fn new(config: RolloutConfig, default_model: String) -> Self {
        Self {
            config,
            default_model,
            current: Arc::default(),
            candidate: Arc::default(),
            since: SystemTime::now(),
        }
    }

    /// The side of the turn asking for `model` in session `key`; `None` when the rollout is not
    /// about this model (a model-only candidate replaces the default model, nothing else).
    pub fn side(&self, key: &str, model: &str) -> Option<Side> {
        if self.config.candidate_backend.is_none() && model != self.default_model {
            return None;
        }
        Some(side_of(key, self.config.candidate_weight_percent))
    }

    /// The model a turn on `side` generates with.
    pub fn model<'a>(&'a self, side: Side, requested: &'a str) -> &'a str {
        match (side, &self.config.candidate_model) {
            (Side::Candidate, Some(model)) if requested == self.default_model => model,
            _ => requested,
        }
    }

    /// Shared with the streams of the side's generations, which count their end.
    pub fn counters(&self, side: Side) -> &Arc<SideCounters> {
        match side {
            Side::Current => &self.current,
            Side::Candidate => &self.candidate,
        }
    }

    pub fn report(&self) -> RolloutReport {
        RolloutReport {
            candidate_backend: self.config.candidate_backend.clone(),
            candidate_model: self.config.candidate_model.clone(),
            candidate_weight_percent: self.config.candidate_weight_percent,
            since_unix_seconds: self
                .since
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            ttft_buckets_ms: TTFT_BUCKETS_MS.to_vec(),
            current: self.current.report(),
            candidate: self.candidate.report(),
        }
    }
}

/// Whether the session `key` is on the candidate's side at `weight_percent`.
pub fn side_of(key: &str, weight_percent: u32) -> Side {
    let point = xxhash_rust::xxh3::xxh3_64(key.as_bytes()) % 10_000;
    if point < u64::from(weight_percent.min(100)) * 100 {
        Side::Candidate
    } else {
        Side::Current
    }
}

/// What one side served; lock-free, every turn adds to it once.
#[derive(Default)]
pub struct SideCounters {
    turns: AtomicU64,
    errors: AtomicU64,
    /// One per bucket of [`TTFT_BUCKETS_MS`] plus the overflow bucket.
    ttft: [AtomicU64; TTFT_BUCKETS_MS.len() + 1],
    completion_tokens: AtomicU64,
    generation_micros: AtomicU64,
}

impl SideCounters {
    /// A turn that got no first token (every attempt failed), or failed mid-answer.
    pub fn failed(&self) {
        self.turns.fetch_add(1, Ordering::Relaxed);
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// The first token arrived `ttft` after the turn started.
    pub fn first_token(&self, ttft: Duration) {
        let ms = ttft.as_millis();
        let bucket = TTFT_BUCKETS_MS
            .iter()
            .position(|&bound| ms <= u128::from(bound))
            .unwrap_or(TTFT_BUCKETS_MS.len());
        self.ttft[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// The answer ended with `completion_tokens` after `generation` from the turn's start.
    pub fn finished(&self, completion_tokens: u64, generation: Duration) {
        self.turns.fetch_add(1, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(completion_tokens, Ordering::Relaxed);
        self.generation_micros
            .fetch_add(generation.as_micros() as u64, Ordering::Relaxed);
    }

    fn report(&self) -> SideReport {
        SideReport {
            turns: self.turns.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            ttft_counts: self
                .ttft
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            completion_tokens: self.completion_tokens.load(Ordering::Relaxed),
            generation_seconds: self.generation_micros.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

/// `rollout` in `GET /v1/backends`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutReport {
    pub candidate_backend: Option<String>,
    pub candidate_model: Option<String>,
    pub candidate_weight_percent: u32,
    /// Start of the window the figures cover (the process's start).
    pub since_unix_seconds: u64,
    /// Upper bounds of the TTFT buckets; `ttftCounts` has one more, for slower turns.
    pub ttft_buckets_ms: Vec<u64>,
    pub current: SideReport,
    pub candidate: SideReport,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SideReport {
    /// Turns that ended (answered or failed).
    pub turns: u64,
    /// Turns that failed: no first token from any attempt, or an error mid-answer.
    pub errors: u64,
    /// Turns per time-to-first-token bucket (not cumulative).
    pub ttft_counts: Vec<u64>,
    pub completion_tokens: u64,
    /// Seconds from the turns' starts to their last tokens, summed.
    pub generation_seconds: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_weight_splits_sessions_in_proportion() {
        let on_candidate = (0..10_000)
            .filter(|i| side_of(&format!("session-{i}"), 25) == Side::Candidate)
            .count();
        assert!((2300..2700).contains(&on_candidate), "{on_candidate}");
        assert!((0..1000).all(|i| side_of(&format!("s{i}"), 0) == Side::Current));
        assert!((0..1000).all(|i| side_of(&format!("s{i}"), 100) == Side::Candidate));
    }

    #[test]
    fn a_larger_weight_only_moves_sessions_to_the_candidate() {
        for i in 0..5_000 {
            let key = format!("session-{i}");
            let mut was_candidate = false;
            for weight in [0, 5, 25, 50, 75, 100] {
                let candidate = side_of(&key, weight) == Side::Candidate;
                assert!(
                    candidate || !was_candidate,
                    "{key} moved back at {weight} %"
                );
                was_candidate = candidate;
            }
        }
    }

    #[test]
    fn a_model_candidate_splits_only_the_default_model() {
        let config = RolloutConfig {
            candidate_backend: None,
            candidate_model: Some("new".into()),
            candidate_weight_percent: 100,
        };
        let split = Split::new(config, "old".into());
        assert_eq!(split.side("s", "other"), None);
        assert_eq!(split.side("s", "old"), Some(Side::Candidate));
        assert_eq!(split.model(Side::Candidate, "old"), "new");
        assert_eq!(split.model(Side::Current, "old"), "old");
    }

    #[test]
    fn counters_report_turns_errors_and_ttft_buckets() {
        let counters = SideCounters::default();
        counters.first_token(Duration::from_millis(120));
        counters.finished(10, Duration::from_millis(500));
        counters.first_token(Duration::from_secs(100));
        counters.finished(5, Duration::from_secs(101));
        counters.failed();
        let report = counters.report();
        assert_eq!(
            (report.turns, report.errors, report.completion_tokens),
            (3, 1, 15)
        );
        assert_eq!(
            report.ttft_counts[2], 1,
            "120 ms falls in the 200 ms bucket"
        );
        assert_eq!(
            report.ttft_counts[TTFT_BUCKETS_MS.len()],
            1,
            "overflow bucket"
        );
        assert!((report.generation_seconds - 101.5).abs() < 1e-6);
    }
}
