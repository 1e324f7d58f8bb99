//! The retry budget: retries may add at most a fixed share to the traffic the back ends see, so
//! that when they all fail, retries do not multiply the load (the design of Finagle's and
//! Linkerd's retry budgets). A token bucket counted in retries: every turn deposits `ratio` of a
//! retry, every retry withdraws one, and a floor of `min_per_second` refills with time so that a
//! quiet service still fails over. The bucket holds at most [`BURST`] retries plus ten seconds
//! of the floor.
//!
//! Written here: `governor` (already a dependency for rate limits) meters requests per unit of
//! time, not a ratio of one event stream (turns) to another (retries).

use std::time::Instant;

/// Retries the bucket holds beyond ten seconds of the floor; it starts full.
pub const BURST: f64 = 10.0;

#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_per_second: f64,
    capacity: f64,
    balance: f64,
    refilled_at: Instant,
}

impl RetryBudget {
    pub fn new(percent: u32, min_per_second: u32, now: Instant) -> Self {
        let min_per_second = f64::from(min_per_second);
        let capacity = BURST + 10.0 * min_per_second;
        Self {
            ratio: f64::from(percent) / 100.0,
            min_per_second,
            capacity,
            balance: capacity,
            refilled_at: now,
        }
    }

    /// A turn's first attempt.
    pub fn deposit(&mut self, now: Instant) {
        self.refill(now);
        self.balance = (self.balance + self.ratio).min(self.capacity);
    }

    /// Takes one retry if the budget has it.
    pub fn try_withdraw(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.balance >= 1.0 {
            self.balance -= 1.0;
            true
        } else {
            false
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.refilled_at = now;
        self.balance = (self.balance + elapsed * self.min_per_second).min(self.capacity);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn retries_are_bounded_by_ratio_plus_burst() {
        let now = Instant::now();
        let mut budget = RetryBudget::new(20, 0, now);
        let mut retries = 0;
        // 1000 turns that all fail and would each retry twice.
        for _ in 0..1000 {
            budget.deposit(now);
            for _ in 0..2 {
                if budget.try_withdraw(now) {
                    retries += 1;
                }
            }
        }
        // 10 from the initial burst + 20% of 1000.
        assert!((209..=210).contains(&retries), "{retries}");
    }

    #[test]
    fn the_floor_refills_with_time() {
        let t0 = Instant::now();
        let mut budget = RetryBudget::new(0, 2, t0);
        let mut taken = 0;
        while budget.try_withdraw(t0) {
            taken += 1;
        }
        assert_eq!(taken, 30, "burst 10 + 10 s of a 2/s floor");
        assert!(!budget.try_withdraw(t0 + Duration::from_millis(400)));
        assert!(budget.try_withdraw(t0 + Duration::from_millis(600)));
        assert!(!budget.try_withdraw(t0 + Duration::from_millis(700)));
    }

    #[test]
    fn quiet_times_save_up_no_more_than_the_bucket_holds() {
        let t0 = Instant::now();
        let mut budget = RetryBudget::new(100, 1, t0);
        // A long quiet spell and many successful turns: the balance stops at the capacity.
        for _ in 0..1000 {
            budget.deposit(t0);
        }
        let later = t0 + Duration::from_secs(3600);
        let mut taken = 0;
        while budget.try_withdraw(later) {
            taken += 1;
        }
        assert_eq!(
            taken, 20,
            "burst 10 + 10 s of a 1/s floor, however long the calm"
        );
    }
}
