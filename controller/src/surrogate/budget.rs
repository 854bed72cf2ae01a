//! The egress token bucket of an arrangement.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// Tokens are bytes. A response is admitted when the bucket holds its size (or, for a body
/// larger than the burst, when the bucket is full); the bucket may then go below zero and
/// the refill pays the debt back before anything else is admitted.
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<State>,
}

struct State {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(bytes_per_s: u64, burst_bytes: u64) -> Self {
        #[expect(
            clippy::cast_precision_loss,
            reason = "byte rates far below 2^52 are exact; above, a rounding of a rate is harmless"
        )]
        let (rate, burst) = (bytes_per_s.max(1) as f64, burst_bytes.max(1) as f64);
        Self {
            rate,
            burst,
            state: Mutex::new(State {
                tokens: burst,
                last: Instant::now(),
            }),
        }
    }

    /// Takes `cost` bytes, or says how long until they would be available.
    pub(crate) fn take(&self, cost: u64) -> Result<(), Duration> {
        self.take_at(cost, Instant::now())
    }

    fn take_at(&self, cost: u64, now: Instant) -> Result<(), Duration> {
        let mut state = match self.state.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        };
        let elapsed = now.saturating_duration_since(state.last).as_secs_f64();
        state.tokens = (state.tokens + elapsed * self.rate).min(self.burst);
        state.last = now;
        #[expect(
            clippy::cast_precision_loss,
            reason = "an object size rounded to 2^-52 relative precision is fine for a budget"
        )]
        let cost = cost as f64;
        let needed = cost.min(self.burst);
        if state.tokens >= needed {
            state.tokens -= cost;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((needed - state.tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_within_burst_then_refuses_until_refilled() {
        let bucket = TokenBucket::new(1000, 10_000);
        let start = Instant::now();
        assert!(bucket.take_at(8000, start).is_ok());
        let Err(wait) = bucket.take_at(8000, start) else {
            panic!("only 2000 left")
        };
        assert_eq!(wait, Duration::from_secs(6));
        assert!(bucket.take_at(8000, start + Duration::from_secs(6)).is_ok());
    }

    #[test]
    fn a_body_larger_than_the_burst_needs_a_full_bucket_then_leaves_a_debt() {
        let bucket = TokenBucket::new(1000, 1000);
        let start = Instant::now();
        assert!(bucket.take_at(5000, start).is_ok());
        let Err(wait) = bucket.take_at(1, start) else {
            panic!("in debt")
        };
        assert!((wait.as_secs_f64() - 4.001).abs() < 1e-6, "{wait:?}");
        assert!(bucket.take_at(0, start).is_err());
    }
}
