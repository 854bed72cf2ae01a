//! Usage counters per arrangement: kept as atomics for [`super::Surrogate::usage`]
//! (accounting) and mirrored to `metrics` counters labelled with the arrangement id.

use std::{
    cell::Cell,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use serde::Serialize;

use super::store::TenantStore;

/// An arrangement's usage since it was added.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TenantUsage {
    /// Requests routed to the arrangement (any status).
    pub requests: u64,
    /// Body bytes sent to clients.
    pub bytes: u64,
    /// Requests answered from a stored object.
    pub hits: u64,
    /// Requests that had to wait for the origin (or for a stored object to be verified).
    pub misses: u64,
    /// Fetches from the origin.
    pub origin_fetches: u64,
    /// Bytes read from the origin.
    pub origin_bytes: u64,
    /// Origin responses whose size or SHA-256 did not match the manifest (refused, 502).
    pub mismatches: u64,
    /// Requests refused by the egress budget (503 with Retry-After).
    pub budget_rejections: u64,
    /// Requests for paths the manifest does not list (404).
    pub not_found: u64,
    /// Requests for entries larger than the arrangement's `max_object_bytes` (503).
    pub oversize: u64,
    /// Origin fetches that failed (connection, status, protocol).
    pub origin_errors: u64,
    /// Origin fetches that timed out (504).
    pub origin_timeouts: u64,
    /// Disk tier failures (write, rename, space): the object is served from memory if small.
    pub disk_errors: u64,
    /// Stored files dropped because their content did not match the manifest (after a
    /// restart).
    pub disk_dropped: u64,
    /// Bytes now in the memory tier.
    pub memory_bytes: u64,
    /// Bytes now in the disk tier.
    pub disk_bytes: u64,
}

/// Slots of a counter: threads add to different cache lines, so the counters of a busy
/// arrangement are not one cache line every core writes on every request.
const STRIPES: usize = 8;

/// A cache line of its own.
#[repr(align(64))]
#[derive(Default)]
struct Stripe(AtomicU64);

/// The stripe of the calling thread, assigned round-robin on first use.
fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    STRIPE.with(|slot| {
        let mut index = slot.get();
        if index == usize::MAX {
            index = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
            slot.set(index);
        }
        index
    })
}

/// One counter: striped atomics for the snapshot and a `metrics` counter.
pub(crate) struct Counter {
    stripes: [Stripe; STRIPES],
    meter: metrics::Counter,
}

impl Counter {
    fn new(name: &'static str, tenant: &str) -> Self {
        Self {
            stripes: Default::default(),
            meter: metrics::counter!(name, "tenant" => tenant.to_owned()),
        }
    }

    pub(crate) fn add(&self, n: u64) {
        self.stripes[stripe()].0.fetch_add(n, Ordering::Relaxed);
        self.meter.increment(n);
    }

    fn get(&self) -> u64 {
        self.stripes
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }
}

pub(crate) struct Counters {
    pub(crate) requests: Counter,
    pub(crate) bytes: Counter,
    pub(crate) hits: Counter,
    pub(crate) misses: Counter,
    pub(crate) origin_fetches: Counter,
    pub(crate) origin_bytes: Counter,
    pub(crate) mismatches: Counter,
    pub(crate) budget_rejections: Counter,
    pub(crate) not_found: Counter,
    pub(crate) oversize: Counter,
    pub(crate) origin_errors: Counter,
    pub(crate) origin_timeouts: Counter,
    pub(crate) disk_errors: Counter,
    pub(crate) disk_dropped: Counter,
}

/// Shared handle on an arrangement's counters.
#[derive(Clone)]
pub(crate) struct Usage(Arc<Counters>);

impl std::ops::Deref for Usage {
    type Target = Counters;

    fn deref(&self) -> &Counters {
        &self.0
    }
}

impl Usage {
    pub(crate) fn new(tenant: &str) -> Self {
        Self(Arc::new(Counters {
            requests: Counter::new("p2pcdn_surrogate_requests_total", tenant),
            bytes: Counter::new("p2pcdn_surrogate_bytes_total", tenant),
            hits: Counter::new("p2pcdn_surrogate_hits_total", tenant),
            misses: Counter::new("p2pcdn_surrogate_misses_total", tenant),
            origin_fetches: Counter::new("p2pcdn_surrogate_origin_fetches_total", tenant),
            origin_bytes: Counter::new("p2pcdn_surrogate_origin_bytes_total", tenant),
            mismatches: Counter::new("p2pcdn_surrogate_mismatches_total", tenant),
            budget_rejections: Counter::new("p2pcdn_surrogate_budget_rejections_total", tenant),
            not_found: Counter::new("p2pcdn_surrogate_not_found_total", tenant),
            oversize: Counter::new("p2pcdn_surrogate_oversize_total", tenant),
            origin_errors: Counter::new("p2pcdn_surrogate_origin_errors_total", tenant),
            origin_timeouts: Counter::new("p2pcdn_surrogate_origin_timeouts_total", tenant),
            disk_errors: Counter::new("p2pcdn_surrogate_disk_errors_total", tenant),
            disk_dropped: Counter::new("p2pcdn_surrogate_disk_dropped_total", tenant),
        }))
    }

    pub(crate) fn snapshot(&self, store: &TenantStore) -> TenantUsage {
        TenantUsage {
            requests: self.requests.get(),
            bytes: self.bytes.get(),
            hits: self.hits.get(),
            misses: self.misses.get(),
            origin_fetches: self.origin_fetches.get(),
            origin_bytes: self.origin_bytes.get(),
            mismatches: self.mismatches.get(),
            budget_rejections: self.budget_rejections.get(),
            not_found: self.not_found.get(),
            oversize: self.oversize.get(),
            origin_errors: self.origin_errors.get(),
            origin_timeouts: self.origin_timeouts.get(),
            disk_errors: self.disk_errors.get(),
            disk_dropped: self.disk_dropped.get(),
            memory_bytes: store.memory_bytes(),
            disk_bytes: store.disk_bytes(),
        }
    }
}
