//! The balancing strategies: pure functions over the candidates' weights and loads, so that
//! each is unit-tested without a network or an endpoint.
//!
//! Written here rather than taken from a crate: each is a few lines, and the crates that exist
//! (hash rings, tower's P2C balancer) own the endpoint set and its readiness, which the pool
//! must keep (model filter, breakers, queues). The hash is `xxh3` (`xxhash-rust`): unlike std's
//! `DefaultHasher` or `ahash`, its output is specified, so every replica of the service (and
//! every version) maps a session to the same endpoint and reuses its KV cache.
//!
//! Round robin keeps no shared state of its own: each endpoint carries its running score as an
//! atomic, so picks take no lock. `pingora-load-balancing` uses one atomic counter over a list
//! with each backend repeated `weight` times; that would lose what smooth weighted round robin
//! gives here: picks interleaved by weight, and exact shares over whichever subset is
//! available at the moment (breakers, limits and health change it request by request).

use std::sync::atomic::{AtomicI64, Ordering};

use rand::Rng;

/// What a strategy knows about one candidate.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub name: &'a str,
    pub weight: u32,
    pub in_flight: usize,
    /// At its in-flight limit: chosen only when nothing else can take the request.
    pub full: bool,
    /// The candidate's running score for [`smooth_round_robin`].
    pub round_robin: &'a AtomicI64,
}

/// Smooth weighted round robin (the nginx algorithm): every pick adds each candidate's weight to
/// its score, takes the highest and subtracts the total from it. Over any run of `sum(weights)`
/// picks each candidate gets exactly its weight, interleaved (5,1,1 gives a a b a c a a rather
/// than a a a a a b c).
///
/// The scores are atomics updated without a lock: sequential picks are exactly the algorithm;
/// two picks racing may both take the same candidate, and the subtraction makes the following
/// picks even it out, since the scores always sum to what they did.
pub fn smooth_round_robin(candidates: &[Candidate<'_>]) -> Option<usize> {
    let total: i64 = candidates.iter().map(|c| i64::from(c.weight)).sum();
    let mut best: Option<(usize, i64)> = None;
    for (index, candidate) in candidates.iter().enumerate() {
        let weight = i64::from(candidate.weight);
        let score = candidate.round_robin.fetch_add(weight, Ordering::Relaxed) + weight;
        if best.is_none_or(|(_, highest)| score > highest) {
            best = Some((index, score));
        }
    }
    let (index, _) = best?;
    candidates[index]
        .round_robin
        .fetch_sub(total, Ordering::Relaxed);
    Some(index)
}

/// Power of two random choices: two distinct random candidates, the one with fewer requests in
/// flight per unit of weight wins. Nearly as good as scanning for the least loaded, without
/// every replica herding onto the same momentarily idle endpoint.
pub fn power_of_two(candidates: &[Candidate<'_>], rng: &mut impl Rng) -> Option<usize> {
    match candidates.len() {
        0 => None,
        1 => Some(0),
        n => {
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            Some(if less_loaded(&candidates[b], &candidates[a]) {
                b
            } else {
                a
            })
        }
    }
}

/// `x` carries fewer requests per unit of weight than `y`.
fn less_loaded(x: &Candidate<'_>, y: &Candidate<'_>) -> bool {
    (x.in_flight as u128) * u128::from(y.weight) < (y.in_flight as u128) * u128::from(x.weight)
}

/// Weighted rendezvous (highest random weight) hashing: every candidate scores
/// `-weight / ln(u)` with `u` a uniform hash of (candidate, key); the order of scores is the
/// key's preference list. Adding or removing a candidate moves only the keys that rank it first.
pub fn rendezvous_order(key: &str, candidates: &[Candidate<'_>]) -> Vec<usize> {
    let mut scored: Vec<(usize, f64)> = candidates
        .iter()
        .enumerate()
        .map(|(index, c)| (index, rendezvous_score(key, c.name, c.weight)))
        .collect();
    scored.sort_by(|a, b| {
        b.1.total_cmp(&a.1)
            .then_with(|| candidates[a.0].name.cmp(candidates[b.0].name))
    });
    scored.into_iter().map(|(index, _)| index).collect()
}

fn rendezvous_score(key: &str, name: &str, weight: u32) -> f64 {
    let mut bytes = Vec::with_capacity(name.len() + key.len() + 1);
    bytes.extend_from_slice(name.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(key.as_bytes());
    let hash = xxhash_rust::xxh3::xxh3_64(&bytes);
    // 53 random bits mapped into the open interval (0, 1).
    let unit = ((hash >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -f64::from(weight.max(1)) / unit.ln()
}

/// Consistent hashing with bounded load (Mirrokni, Thorup, Zadimoghaddam): the first candidate
/// in the key's preference order that is not full and carries fewer than
/// `ceil(factor * (total + 1) / n)` requests, so that one hot session cannot pile onto one
/// endpoint. `None` when every candidate is full.
pub fn bounded_load(key: &str, candidates: &[Candidate<'_>], factor: f64) -> Option<usize> {
    if candidates.is_empty() {
        return None;
    }
    let order = rendezvous_order(key, candidates);
    let total: usize = candidates.iter().map(|c| c.in_flight).sum();
    let bound = (factor * (total + 1) as f64 / candidates.len() as f64).ceil() as usize;
    order
        .iter()
        .copied()
        .find(|&i| !candidates[i].full && candidates[i].in_flight < bound)
        .or_else(|| order.iter().copied().find(|&i| !candidates[i].full))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use std::collections::HashMap;

    /// One shared score for candidates of strategies that do not read it.
    static UNUSED_SCORE: AtomicI64 = AtomicI64::new(0);

    fn candidate(name: &str, weight: u32, in_flight: usize) -> Candidate<'_> {
        Candidate {
            name,
            weight,
            in_flight,
            full: false,
            round_robin: &UNUSED_SCORE,
        }
    }

    /// Candidates for round robin, each with its own score.
    fn scored<'a>(fleet: &'a [(&'a str, u32)], scores: &'a [AtomicI64]) -> Vec<Candidate<'a>> {
        fleet
            .iter()
            .zip(scores)
            .map(|(&(name, weight), score)| Candidate {
                round_robin: score,
                ..candidate(name, weight, 0)
            })
            .collect()
    }

    #[test]
    fn smooth_round_robin_interleaves_by_weight() {
        let fleet = [("a", 5), ("b", 1), ("c", 1)];
        let scores: Vec<AtomicI64> = fleet.iter().map(|_| AtomicI64::new(0)).collect();
        let candidates = scored(&fleet, &scores);
        let sequence: String = (0..14)
            .map(|_| candidates[smooth_round_robin(&candidates).unwrap()].name)
            .collect();
        assert_eq!(sequence, "aabacaaaabacaa");
        let a = sequence.matches('a').count();
        assert_eq!((a, sequence.matches('b').count()), (10, 2));
        assert_eq!(smooth_round_robin(&[]), None);
    }

    #[test]
    fn smooth_round_robin_skips_an_absent_candidate_without_losing_the_ratio() {
        let fleet = [("a", 3), ("b", 1)];
        let scores: Vec<AtomicI64> = fleet.iter().map(|_| AtomicI64::new(0)).collect();
        let all = scored(&fleet, &scores);
        let mut counts = HashMap::new();
        for i in 0..400 {
            // `b` is missing (e.g. its breaker is open) one pick in four.
            let candidates = if i % 4 == 3 { &all[..1] } else { &all[..] };
            let index = smooth_round_robin(candidates).unwrap();
            *counts.entry(candidates[index].name).or_insert(0) += 1;
        }
        assert_eq!(counts["a"] + counts["b"], 400);
        assert!((70..=80).contains(&counts["b"]), "{counts:?}");
    }

    #[test]
    fn racing_round_robin_picks_keep_the_weights() {
        let fleet = [("a", 3), ("b", 1)];
        let scores: Vec<AtomicI64> = fleet.iter().map(|_| AtomicI64::new(0)).collect();
        let candidates = scored(&fleet, &scores);
        let picks: Vec<usize> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        (0..1000)
                            .map(|_| smooth_round_robin(&candidates).unwrap())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            threads
                .into_iter()
                .flat_map(|t| t.join().unwrap())
                .collect()
        });
        let b = picks.iter().filter(|&&i| i == 1).count();
        assert!((950..=1050).contains(&b), "b got {b} of 4000");
    }

    #[test]
    fn power_of_two_prefers_the_less_loaded_per_weight() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let candidates = [candidate("busy", 1, 10), candidate("idle", 1, 0)];
        for _ in 0..50 {
            assert_eq!(power_of_two(&candidates, &mut rng), Some(1));
        }
        // Four idle and one very busy: the busy one is picked only when drawn against itself,
        // which two distinct draws never do.
        let candidates = [
            candidate("a", 1, 0),
            candidate("b", 1, 0),
            candidate("c", 1, 0),
            candidate("d", 1, 0),
            candidate("hot", 1, 100),
        ];
        for _ in 0..200 {
            assert_ne!(power_of_two(&candidates, &mut rng), Some(4));
        }
        // Weight counts: 4 in flight on weight 4 is lighter than 2 on weight 1.
        let candidates = [candidate("big", 4, 4), candidate("small", 1, 2)];
        assert_eq!(power_of_two(&candidates, &mut rng), Some(0));
        assert_eq!(power_of_two(&[], &mut rng), None);
    }

    #[test]
    fn rendezvous_moves_about_one_in_n_keys_when_a_node_joins() {
        let names: Vec<String> = (0..5).map(|i| format!("ollama/10.0.0.{i}")).collect();
        let before: Vec<Candidate<'_>> = names.iter().map(|n| candidate(n, 1, 0)).collect();
        let joined = "ollama/10.0.0.99".to_string();
        let mut after = before.clone();
        after.push(candidate(&joined, 1, 0));
        let keys = 10_000;
        let mut moved = 0;
        let mut to_new = 0;
        let mut first_choice = HashMap::new();
        for k in 0..keys {
            let key = format!("session-{k}");
            let old = before[rendezvous_order(&key, &before)[0]].name;
            let new = after[rendezvous_order(&key, &after)[0]].name;
            *first_choice.entry(old).or_insert(0) += 1;
            if old != new {
                moved += 1;
                if new == joined {
                    to_new += 1;
                }
            }
        }
        // Expected 1/6 of the keys, all of them to the new node and none between old nodes.
        assert_eq!(moved, to_new, "keys only move to the node that joined");
        let share = moved as f64 / keys as f64;
        assert!((0.14..0.20).contains(&share), "moved share {share}");
        // And the spread over the first five is even (each ~2000).
        for (name, count) in first_choice {
            assert!((1800..2200).contains(&count), "{name}: {count}");
        }
    }

    #[test]
    fn rendezvous_respects_weights() {
        let candidates = [candidate("heavy", 3, 0), candidate("light", 1, 0)];
        let heavy = (0..8000)
            .filter(|k| rendezvous_order(&format!("s{k}"), &candidates)[0] == 0)
            .count();
        let share = heavy as f64 / 8000.0;
        assert!((0.72..0.78).contains(&share), "heavy share {share}");
    }

    #[test]
    fn bounded_load_keeps_the_home_until_it_is_above_the_bound() {
        let names = ["x", "y"];
        // Find which of the two is the key's home.
        let key = "session-42";
        let probe = [candidate(names[0], 1, 0), candidate(names[1], 1, 0)];
        let home = rendezvous_order(key, &probe)[0];
        let other = 1 - home;
        let mut loads = [0usize; 2];
        let mut picks = Vec::new();
        for _ in 0..4 {
            let candidates: Vec<Candidate<'_>> =
                (0..2).map(|i| candidate(names[i], 1, loads[i])).collect();
            let pick = bounded_load(key, &candidates, 1.25).unwrap();
            loads[pick] += 1;
            picks.push(pick);
        }
        // bound = ceil(1.25 * (total + 1) / 2): 1, 2, 2, 3 -> home, home, other, home.
        assert_eq!(picks, vec![home, home, other, home]);
        // A full home spills at once, whatever the bound.
        let mut candidates: Vec<Candidate<'_>> =
            (0..2).map(|i| candidate(names[i], 1, 0)).collect();
        candidates[home].full = true;
        assert_eq!(bounded_load(key, &candidates, 1.25), Some(other));
        candidates[other].full = true;
        assert_eq!(bounded_load(key, &candidates, 1.25), None);
    }
}
