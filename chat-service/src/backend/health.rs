//! The active half of an endpoint's health: a check of the model-listing endpoint on an
//! interval (the pool runs it on every endpoint), and the hysteresis that keeps one failed or
//! passed check from flipping the endpoint. The thresholds are tested without a network; the
//! check itself is one GET.

use std::time::Duration;

use super::protocol::{self, Target};

/// Longest a health check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Asks the endpoint for its models; `None` when it answers 2xx, else what went wrong.
pub(super) async fn check(client: &reqwest::Client, target: &Target<'_>) -> Option<String> {
    let path = protocol::health_path(target.protocol);
    let mut request = client
        .get(format!("{}{path}", target.base_url))
        .timeout(CHECK_TIMEOUT);
    if let Some(key) = target.api_key {
        request = request.bearer_auth(key);
    }
    match request.send().await {
        Ok(response) if response.status().is_success() => None,
        Ok(response) => Some(format!("health check: status {}", response.status())),
        Err(e) => Some(format!("health check: {e}")),
    }
}

/// Active health with hysteresis: `unhealthy_threshold` failed checks in a row mark the
/// endpoint down, `healthy_threshold` passed checks in a row mark it up again. Starts up, so a
/// new replica serves at once; the first check runs at start-up.
#[derive(Debug)]
pub struct HealthTracker {
    healthy: bool,
    streak: u32,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
}

impl HealthTracker {
    pub fn new(healthy_threshold: u32, unhealthy_threshold: u32) -> Self {
        Self {
            healthy: true,
            streak: 0,
            healthy_threshold: healthy_threshold.max(1),
            unhealthy_threshold: unhealthy_threshold.max(1),
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Records one check; returns the new health when it changed.
    pub fn record(&mut self, passed: bool) -> Option<bool> {
        if passed == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if passed {
            self.healthy_threshold
        } else {
            self.unhealthy_threshold
        };
        if self.streak >= needed {
            self.healthy = passed;
            self.streak = 0;
            return Some(passed);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_needs_consecutive_checks_to_flip() {
        let mut health = HealthTracker::new(2, 3);
        assert!(health.healthy());
        assert_eq!(health.record(false), None);
        assert_eq!(health.record(false), None);
        assert_eq!(health.record(true), None, "a pass breaks the streak");
        assert_eq!(health.record(false), None);
        assert_eq!(health.record(false), None);
        assert_eq!(health.record(false), Some(false));
        assert_eq!(health.record(true), None);
        assert_eq!(health.record(true), Some(true));
    }
}
