//! The passive half of an endpoint's health: a circuit breaker fed by real requests (outlier
//! detection). Time is passed in, so the state machine is tested without sleeping.
//!
//! Written here rather than taken from a crate (`failsafe`, `recloser`): those wrap the call and
//! hide their state, while the pool needs to ask "may this endpoint take a request now?" before
//! choosing it, to let exactly one probe through when half-open, and to report state, failure
//! count and reopening time on `/v1/backends`.

use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum BreakerState {
    /// Traffic flows.
    Closed,
    /// Failing: no traffic until the cooldown ends.
    Open,
    /// Cooldown over: one probe request may pass (or is passing); its outcome decides.
    HalfOpen,
}

impl BreakerState {
    /// Value of the `chat_backend_breaker_state` gauge.
    pub fn gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

/// What admission through the breaker granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Normal,
    /// The single half-open probe: its outcome closes or reopens the breaker.
    Probe,
}

#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    consecutive_failures: u32,
    opened_at: Option<Instant>,
    probe_in_flight: bool,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown,
            consecutive_failures: 0,
            opened_at: None,
            probe_in_flight: false,
        }
    }

    pub fn state(&self, now: Instant) -> BreakerState {
        match self.opened_at {
            None => BreakerState::Closed,
            Some(opened) if now.duration_since(opened) < self.cooldown => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// Whether a request could be admitted now (without taking the probe).
    pub fn available(&self, now: Instant) -> bool {
        match self.state(now) {
            BreakerState::Closed => true,
            BreakerState::Open => false,
            BreakerState::HalfOpen => !self.probe_in_flight,
        }
    }

    /// Admits a request, taking the probe when half-open.
    pub fn admit(&mut self, now: Instant) -> Option<Admission> {
        match self.state(now) {
            BreakerState::Closed => Some(Admission::Normal),
            BreakerState::Open => None,
            BreakerState::HalfOpen if self.probe_in_flight => None,
            BreakerState::HalfOpen => {
                self.probe_in_flight = true;
                Some(Admission::Probe)
            }
        }
    }

    pub fn on_success(&mut self) {
        self.consecutive_failures = 0;
        self.opened_at = None;
        self.probe_in_flight = false;
    }

    /// Returns true when this failure opened (or reopened) the breaker.
    pub fn on_failure(&mut self, now: Instant) -> bool {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let was_probe = std::mem::take(&mut self.probe_in_flight);
        let reopen = was_probe
            || self
                .opened_at
                .is_some_and(|_| self.state(now) != BreakerState::Open);
        if reopen || (self.opened_at.is_none() && self.consecutive_failures >= self.threshold) {
            self.opened_at = Some(now);
            return true;
        }
        false
    }

    /// The probe ended without telling anything (client left, request refused with 4xx):
    /// let the next request probe.
    pub fn release_probe(&mut self) {
        self.probe_in_flight = false;
    }

    /// Time until the breaker lets a probe through; zero unless open.
    pub fn reopens_in(&self, now: Instant) -> Duration {
        match self.opened_at {
            Some(opened) => self.cooldown.saturating_sub(now.duration_since(opened)),
            None => Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_after_threshold_then_half_opens_for_one_probe() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(3, Duration::from_secs(10));
        assert!(!breaker.on_failure(t0));
        assert!(!breaker.on_failure(t0));
        assert_eq!(breaker.state(t0), BreakerState::Closed);
        assert!(breaker.on_failure(t0), "third failure opens");
        assert_eq!(breaker.state(t0), BreakerState::Open);
        assert_eq!(breaker.admit(t0 + Duration::from_secs(9)), None);
        assert_eq!(
            breaker.reopens_in(t0 + Duration::from_secs(4)),
            Duration::from_secs(6)
        );
        let later = t0 + Duration::from_secs(10);
        assert_eq!(breaker.state(later), BreakerState::HalfOpen);
        assert_eq!(breaker.admit(later), Some(Admission::Probe));
        assert_eq!(breaker.admit(later), None, "only one probe at a time");
        assert!(!breaker.available(later));
        breaker.on_success();
        assert_eq!(breaker.state(later), BreakerState::Closed);
        assert_eq!(breaker.consecutive_failures(), 0);
        assert_eq!(breaker.admit(later), Some(Admission::Normal));
    }

    #[test]
    fn failed_probe_reopens_for_a_full_cooldown() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(1, Duration::from_secs(5));
        assert!(breaker.on_failure(t0));
        let t1 = t0 + Duration::from_secs(6);
        assert_eq!(breaker.admit(t1), Some(Admission::Probe));
        assert!(breaker.on_failure(t1), "probe failure reopens");
        assert_eq!(
            breaker.state(t1 + Duration::from_secs(4)),
            BreakerState::Open
        );
        assert_eq!(
            breaker.state(t1 + Duration::from_secs(5)),
            BreakerState::HalfOpen
        );
        // An abandoned probe frees the slot for the next request.
        let t2 = t1 + Duration::from_secs(5);
        assert_eq!(breaker.admit(t2), Some(Admission::Probe));
        breaker.release_probe();
        assert_eq!(breaker.admit(t2), Some(Admission::Probe));
    }

    #[test]
    fn success_resets_the_failure_streak() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(2, Duration::from_secs(5));
        breaker.on_failure(t0);
        breaker.on_success();
        assert!(!breaker.on_failure(t0), "not consecutive");
        assert!(breaker.on_failure(t0));
    }
}
