//! Beta reputations with exponential decay.

use serde::Serialize;

use crate::model::UnixMs;

/// `0.5^(elapsed / half_life)`; 1 for no or negative elapsed time (observations that arrive
/// out of order are not made heavier than fresh ones).
pub(crate) fn decay(elapsed_ms: i64, half_life_ms: i64) -> f64 {
    if elapsed_ms <= 0 || half_life_ms <= 0 {
        return 1.0;
    }
    (-(elapsed_ms as f64) / half_life_ms as f64 * std::f64::consts::LN_2).exp()
}

/// Decayed (weighted) successes and failures of one dimension, as of `at`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Beta {
    pub successes: f64,
    pub failures: f64,
    /// When the counts were last brought up to date.
    #[serde(skip)]
    pub at: UnixMs,
}

impl Beta {
    /// The counts as of `now`.
    pub fn at(&self, now: UnixMs, half_life_ms: i64) -> Self {
        let k = decay(now - self.at, half_life_ms);
        Self {
            successes: self.successes * k,
            failures: self.failures * k,
            at: now.max(self.at),
        }
    }

    /// Adds weighted evidence observed at `now`.
    pub fn add(&mut self, now: UnixMs, half_life_ms: i64, successes: f64, failures: f64) {
        *self = self.at(now, half_life_ms);
        self.successes += successes;
        self.failures += failures;
    }

    /// The posterior mean with a Beta(`prior_s`, `prior_f`) prior.
    pub fn mean(&self, prior_s: f64, prior_f: f64) -> f64 {
        (prior_s + self.successes) / (prior_s + prior_f + self.successes + self.failures)
    }

    /// Weighted observations.
    pub fn weight(&self) -> f64 {
        self.successes + self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_life_halves() {
        let mut b = Beta::default();
        b.add(0, 1000, 4.0, 2.0);
        let later = b.at(1000, 1000);
        assert!((later.successes - 2.0).abs() < 1e-9);
        assert!((later.failures - 1.0).abs() < 1e-9);
        assert_eq!(b.at(-5, 1000).successes, 4.0, "no growth backwards in time");
    }
}
