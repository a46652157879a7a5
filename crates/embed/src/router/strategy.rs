//! Balancing strategies: which of the backends that may take a call now
//! (circuit not open, not refused) gets it. `embedding.strategy` picks one.
//!
//! - `least_outstanding` (default): **power of two choices**: take two
//!   candidates at random, send to the one with fewer outstanding calls
//!   (running or waiting for an in-flight slot); ties go to the first drawn.
//!   Nearly as good as scanning for the least loaded, but two routers (or
//!   two instances) never herd onto the same "least loaded" backend, and a
//!   slow backend accumulates outstanding calls and so gets fewer new ones.
//! - `round_robin`: each backend in turn, skipping those that cannot take
//!   calls. Fair in requests, blind to speed.
//! - `weighted`: **smooth weighted round robin** (as nginx): every pick adds
//!   each candidate's weight to its running score, picks the highest score
//!   and subtracts the candidates' total weight from it. Shares follow the
//!   weights exactly over every `sum(weights)` picks, interleaved (1:2 gives
//!   a b b, not a a b b b b in bursts). A backend that cannot take calls
//!   simply does not take part; the others share its part by their weights.
//! - `latency`: power of two choices on **expected wait** = EWMA latency ×
//!   (outstanding + 1) ("peak EWMA" as in Finagle): the faster backend wins
//!   unless it is already queued deeper. A backend with no measurement yet
//!   costs 0, so it gets a call and a measurement at once.

use std::sync::Mutex;

use crate::settings::Strategy as StrategyName;

/// What a strategy knows about a backend that may take a call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Position among all configured backends.
    pub index: usize,
    pub weight: u32,
    /// Calls running or waiting for an in-flight slot.
    pub outstanding: usize,
    /// EWMA call latency in seconds, once measured.
    pub latency: Option<f64>,
}

pub trait Strategy: Send + Sync {
    /// The position in `candidates` (never empty) of the chosen backend.
    fn pick(&self, candidates: &[Candidate]) -> usize;
}

/// The strategy named in the configuration, for `backends` backends.
pub fn from_config(name: StrategyName, backends: usize) -> Box<dyn Strategy> {
    match name {
        StrategyName::LeastOutstanding => Box::new(LeastOutstanding),
        StrategyName::RoundRobin => Box::new(RoundRobin::default()),
        StrategyName::Weighted => Box::new(Weighted::new(backends)),
        StrategyName::Latency => Box::new(Latency),
    }
}

/// Two distinct random positions in `0..len` (`len` ≥ 2).
fn two_choices(len: usize) -> (usize, usize) {
    let a = rand::random_range(0..len);
    let mut b = rand::random_range(0..len - 1);
    if b >= a {
        b += 1;
    }
    (a, b)
}

fn p2c(candidates: &[Candidate], cost: impl Fn(&Candidate) -> f64) -> usize {
    if candidates.len() < 2 {
        return 0;
    }
    let (a, b) = two_choices(candidates.len());
    if cost(&candidates[b]) < cost(&candidates[a]) {
        b
    } else {
        a
    }
}

pub struct LeastOutstanding;

impl Strategy for LeastOutstanding {
    fn pick(&self, candidates: &[Candidate]) -> usize {
        p2c(candidates, |c| c.outstanding as f64)
    }
}

pub struct Latency;

impl Strategy for Latency {
    fn pick(&self, candidates: &[Candidate]) -> usize {
        p2c(candidates, |c| {
            c.latency.unwrap_or(0.0) * (c.outstanding as f64 + 1.0)
        })
    }
}

/// The next backend index at or after the cursor, cyclically.
#[derive(Default)]
pub struct RoundRobin {
    cursor: Mutex<usize>,
}

impl Strategy for RoundRobin {
    fn pick(&self, candidates: &[Candidate]) -> usize {
        let mut cursor = self.cursor.lock().unwrap_or_else(|p| p.into_inner());
        // Candidates come in index order: the first at or after the cursor,
        // else wrap to the first.
        let position = candidates
            .iter()
            .position(|c| c.index >= *cursor)
            .unwrap_or(0);
        *cursor = candidates.get(position).map_or(0, |c| c.index + 1);
        position
    }
}

pub struct Weighted {
    scores: Mutex<Vec<i64>>,
}

impl Weighted {
    pub fn new(backends: usize) -> Self {
        Self {
            scores: Mutex::new(vec![0; backends]),
        }
    }
}

impl Strategy for Weighted {
    fn pick(&self, candidates: &[Candidate]) -> usize {
        let mut scores = self.scores.lock().unwrap_or_else(|p| p.into_inner());
        let mut total = 0i64;
        let mut best: Option<(usize, i64)> = None;
        for (position, c) in candidates.iter().enumerate() {
            if c.index >= scores.len() {
                scores.resize(c.index + 1, 0);
            }
            let weight = i64::from(c.weight.max(1));
            total += weight;
            scores[c.index] += weight;
            let score = scores[c.index];
            if best.is_none_or(|(_, s)| score > s) {
                best = Some((position, score));
            }
        }
        let (position, _) = best.unwrap_or((0, 0));
        if let Some(c) = candidates.get(position) {
            scores[c.index] -= total;
        }
        position
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidates(specs: &[(u32, usize, Option<f64>)]) -> Vec<Candidate> {
        specs
            .iter()
            .enumerate()
            .map(|(index, &(weight, outstanding, latency))| Candidate {
                index,
                weight,
                outstanding,
                latency,
            })
            .collect()
    }

    fn shares(strategy: &dyn Strategy, cs: &[Candidate], picks: usize) -> Vec<usize> {
        let mut counts = vec![0; cs.len()];
        for _ in 0..picks {
            counts[strategy.pick(cs)] += 1;
        }
        counts
    }

    #[test]
    fn weighted_is_exact_and_interleaved() {
        let w = Weighted::new(3);
        let cs = candidates(&[(1, 0, None), (2, 0, None), (3, 0, None)]);
        let order: Vec<usize> = (0..6).map(|_| w.pick(&cs)).collect();
        assert_eq!(order, vec![2, 1, 0, 2, 1, 2]);
        assert_eq!(shares(&w, &cs, 600), vec![100, 200, 300]);
        // Without backend 2, 0 and 1 share 1:2.
        let without = vec![cs[0], cs[1]];
        assert_eq!(shares(&w, &without, 300), vec![100, 200]);
    }

    #[test]
    fn round_robin_rotates_and_skips() {
        let r = RoundRobin::default();
        let cs = candidates(&[(1, 0, None), (1, 0, None), (1, 0, None)]);
        let order: Vec<usize> = (0..6).map(|_| cs[r.pick(&cs)].index).collect();
        assert_eq!(order, vec![0, 1, 2, 0, 1, 2]);
        let without_1 = vec![cs[0], cs[2]];
        let order: Vec<usize> = (0..4)
            .map(|_| without_1[r.pick(&without_1)].index)
            .collect();
        assert_eq!(order, vec![0, 2, 0, 2]);
    }

    #[test]
    fn least_outstanding_prefers_the_idle_backend() {
        let cs = candidates(&[(1, 5, None), (1, 0, None)]);
        assert_eq!(shares(&LeastOutstanding, &cs, 100), vec![0, 100]);
        // Among three, the busiest is never chosen (it loses every pair).
        let cs = candidates(&[(1, 9, None), (1, 1, None), (1, 0, None)]);
        assert_eq!(shares(&LeastOutstanding, &cs, 300)[0], 0);
        assert_eq!(LeastOutstanding.pick(&cs[..1]), 0);
    }

    #[test]
    fn latency_weighs_speed_by_queue_and_tries_the_unmeasured() {
        let cs = candidates(&[(1, 0, Some(0.2)), (1, 0, Some(0.01))]);
        assert_eq!(shares(&Latency, &cs, 100), vec![0, 100]);
        // The fast one is queued 30 deep: 0.31 s > 0.2 s.
        let cs = candidates(&[(1, 0, Some(0.2)), (1, 30, Some(0.01))]);
        assert_eq!(shares(&Latency, &cs, 100), vec![100, 0]);
        let cs = candidates(&[(1, 0, Some(0.2)), (1, 0, None)]);
        assert_eq!(shares(&Latency, &cs, 100), vec![0, 100]);
    }
}
