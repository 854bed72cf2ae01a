//! The egress token bucket of an arrangement.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// Tokens are bytes. A response is admitted when the bucket holds its size (or, for a body
/// larger than the burst, when the bucket is full); the bucket may then go below zero and
/// the refill pays the debt back before anything else is admitted.
///
/// Kept as one atomic (the generic cell rate algorithm's form of a token bucket): the time
/// at which the bucket will be full again, `tat`. The bucket holds
/// `burst - (tat - now) * rate` tokens (below zero: a debt), so admitting a cost is one
/// compare-and-swap moving `tat` forward by `cost / rate`, with no lock shared by every
/// request of the arrangement.
pub(crate) struct TokenBucket {
    /// Nanoseconds one byte takes at the sustained rate.
    ns_per_byte: f64,
    /// Bytes the bucket holds when full.
    burst: u64,
    /// `burst` as time at the sustained rate, nanoseconds.
    burst_ns: f64,
    base: Instant,
    /// When the bucket is full again, nanoseconds since `base` (in the past: full now).
    tat: AtomicU64,
}

impl TokenBucket {
    pub(crate) fn new(bytes_per_s: u64, burst_bytes: u64) -> Self {
        #[expect(
            clippy::cast_precision_loss,
            reason = "byte rates far below 2^52 are exact; above, a rounding of a rate is harmless"
        )]
        let (rate, burst) = (bytes_per_s.max(1) as f64, burst_bytes.max(1));
        let ns_per_byte = 1e9 / rate;
        #[expect(
            clippy::cast_precision_loss,
            reason = "a burst rounded to 2^-52 relative precision is fine for a budget"
        )]
        let burst_ns = burst as f64 * ns_per_byte;
        Self {
            ns_per_byte,
            burst,
            burst_ns,
            base: Instant::now(),
            tat: AtomicU64::new(0),
        }
    }

    /// Takes `cost` bytes, or says how long until they would be available.
    pub(crate) fn take(&self, cost: u64) -> Result<(), Duration> {
        self.take_at(cost, Instant::now())
    }

    #[expect(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "nanosecond times and byte counts rounded to 2^-52 relative precision are fine \
                  for a budget; float to integer casts saturate"
    )]
    fn take_at(&self, cost: u64, now: Instant) -> Result<(), Duration> {
        let now =
            u64::try_from(now.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX);
        let cost_ns = (cost as f64 * self.ns_per_byte).ceil() as u64;
        // Admitted when the tokens cover min(cost, burst): the time the bucket is short of
        // full may be at most what is left of the burst after that.
        let allowed = self.burst_ns - cost.min(self.burst) as f64 * self.ns_per_byte;
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let short = tat.saturating_sub(now) as f64;
            if short > allowed {
                return Err(Duration::from_nanos((short - allowed).ceil() as u64));
            }
            let next = tat.max(now).saturating_add(cost_ns);
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(()),
                Err(current) => tat = current,
            }
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

    #[test]
    fn concurrent_takers_never_get_more_than_the_bucket_holds() {
        // A refill of 1 byte/s adds nothing measurable while the threads run.
        let bucket = std::sync::Arc::new(TokenBucket::new(1, 1000));
        let admitted: u64 = (0..8)
            .map(|_| {
                let bucket = std::sync::Arc::clone(&bucket);
                std::thread::spawn(move || (0..1000).filter(|_| bucket.take(1).is_ok()).count())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().map_or(0, |n| n as u64))
            .sum();
        assert!((1000..=1001).contains(&admitted), "{admitted}");
    }
}
