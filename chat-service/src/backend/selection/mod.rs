//! The choice of an endpoint for one request among those the route allows: first the endpoints
//! that can take it (breaker admitting, health checks passing), then the strategy's pick among
//! those below their in-flight limit, else the queue to wait in.
//!
//! Candidates are the endpoints serving the model, minus those already tried in this turn,
//! minus open breakers, preferring endpoints whose health checks pass (if none pass, the others
//! are tried rather than failing outright: checks can be wrong, requests and breakers decide).
//! The strategies themselves are pure functions in [`strategy`].
//!
//! Choosing reads each endpoint's atomics and its own small lock, never a lock shared by all
//! requests: what is chosen is only a proposal, and the caller's lease (permit and breaker
//! admission) decides, choosing again when another request took the place first.

mod strategy;

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::endpoint::Endpoint;
use super::error::Saturation;
use crate::config::{RoutingConfig, Strategy};
use strategy::Candidate;

/// What the strategy chose.
#[derive(Clone)]
pub(super) enum Pick {
    /// Below its in-flight limit: lease it now.
    Free(Arc<Endpoint>),
    /// Every candidate is at its limit: wait in this endpoint's queue (the shortest; on a tie,
    /// the one the strategy prefers).
    Queue(Arc<Endpoint>),
}

/// Why no endpoint could be leased.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum NoEndpoint {
    /// No endpoint (not yet tried in this turn) serves the model.
    NotServed,
    /// Every candidate has its breaker open; the earliest lets a probe through after this long.
    AllOpen(Duration),
    /// Every candidate is at its limit and the turn could not wait for one.
    Saturated(Saturation),
}

pub(super) struct Selector {
    strategy: Strategy,
    /// `affinityLoadFactorPercent` as a factor.
    load_factor: f64,
}

impl Selector {
    pub fn new(routing: &RoutingConfig) -> Self {
        Self {
            strategy: routing.strategy,
            load_factor: f64::from(routing.affinity_load_factor_percent) / 100.0,
        }
    }

    /// Chooses among `endpoints` (those the route allows and the turn has not tried).
    pub fn pick(
        &self,
        endpoints: Vec<Arc<Endpoint>>,
        session: Option<&str>,
        now: Instant,
    ) -> Result<Pick, NoEndpoint> {
        let ready = ready(endpoints, now)?;
        let candidates: Vec<Candidate<'_>> = ready
            .iter()
            .map(|e| Candidate {
                name: &e.name,
                weight: e.weight,
                in_flight: e.in_flight(),
                full: e.full(),
                round_robin: &e.round_robin,
            })
            .collect();
        if let Some(index) = self.choose(&candidates, session) {
            return Ok(Pick::Free(ready[index].clone()));
        }
        let preferred: Vec<usize> = match (self.strategy, session) {
            (Strategy::SessionAffinity, Some(key)) => strategy::rendezvous_order(key, &candidates),
            _ => (0..ready.len()).collect(),
        };
        let shortest = preferred
            .iter()
            .map(|&i| &ready[i])
            .min_by_key(|e| e.queued())
            .expect("ready endpoints are never empty");
        Ok(Pick::Queue(shortest.clone()))
    }

    /// The strategy's pick among candidates below their limit; `None` when all are full.
    fn choose(&self, candidates: &[Candidate<'_>], session: Option<&str>) -> Option<usize> {
        if let (Strategy::SessionAffinity, Some(key)) = (self.strategy, session) {
            return strategy::bounded_load(key, candidates, self.load_factor);
        }
        let open: Vec<usize> = (0..candidates.len())
            .filter(|&i| !candidates[i].full)
            .collect();
        let subset: Vec<Candidate<'_>> = open.iter().map(|&i| candidates[i].clone()).collect();
        let pick = match self.strategy {
            Strategy::RoundRobin => strategy::smooth_round_robin(&subset),
            Strategy::LeastInFlight | Strategy::SessionAffinity => {
                strategy::power_of_two(&subset, &mut rand::rng())
            }
        };
        pick.map(|i| open[i])
    }
}

/// The endpoints that may take a request now: breaker admitting, and of those the healthy
/// ones, or all of them when none is healthy.
fn ready(endpoints: Vec<Arc<Endpoint>>, now: Instant) -> Result<Vec<Arc<Endpoint>>, NoEndpoint> {
    if endpoints.is_empty() {
        return Err(NoEndpoint::NotServed);
    }
    let readiness: Vec<_> = endpoints.iter().map(|e| e.readiness(now)).collect();
    if readiness.iter().all(|r| !r.available) {
        let reopens_in = readiness
            .iter()
            .map(|r| r.reopens_in)
            .min()
            .unwrap_or_default();
        return Err(NoEndpoint::AllOpen(reopens_in));
    }
    let any_healthy = readiness.iter().any(|r| r.available && r.healthy);
    Ok(endpoints
        .into_iter()
        .zip(readiness)
        .filter(|(_, r)| r.available && (r.healthy || !any_healthy))
        .map(|(e, _)| e)
        .collect())
}

#[cfg(test)]
mod tests;
