//! Getting an object ready to serve: from a tier, or — once for any number of concurrent
//! requests — by verifying a recovered file or pulling it from the origin.

use std::sync::{Arc, MutexGuard};

use bytes::Bytes;
use tokio::sync::watch;

use super::{
    Entry, Inner, TenantState,
    origin::{FetchFailure, OriginError, Sink, object_url},
    store::{DiskError, Inflight, Lease, Sha, file_matches},
};

/// A verified object.
#[derive(Clone)]
pub(crate) enum Object {
    Memory(Bytes),
    Disk(Arc<Lease>),
}

/// Why an object could not be made ready.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum FillError {
    #[error(transparent)]
    Origin(#[from] OriginError),
    #[error("the object cannot be stored: {0}")]
    Disk(Arc<DiskError>),
    #[error("the fetch ended without a result")]
    Aborted,
}

pub(crate) type FillResult = Result<Object, FillError>;

fn lock(
    inflight: &Inflight,
) -> MutexGuard<'_, std::collections::HashMap<Sha, watch::Receiver<Option<FillResult>>>> {
    match inflight.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Removes the in-flight marker when the fill ends, also if it panicked.
struct InflightGuard {
    tenant: Arc<TenantState>,
    sha: Sha,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        lock(&self.tenant.store.inflight).remove(&self.sha);
    }
}

/// The object of `entry`, and whether it was already stored (a hit). Concurrent callers for
/// the same content share one fill; the fill runs in its own task, so a client that goes
/// away does not cancel it for the others.
pub(crate) async fn obtain(
    inner: &Arc<Inner>,
    tenant: &Arc<TenantState>,
    entry: &Entry,
) -> Result<(Object, bool), FillError> {
    if let Some(object) = tenant.store.lookup(&entry.sha256) {
        return Ok((object, true));
    }
    let mut rx = {
        let mut inflight = lock(&tenant.store.inflight);
        match inflight.get(&entry.sha256) {
            Some(rx) if rx.has_changed().is_ok() => rx.clone(),
            _ => {
                let (tx, rx) = watch::channel(None);
                inflight.insert(entry.sha256, rx.clone());
                let guard = InflightGuard {
                    tenant: Arc::clone(tenant),
                    sha: entry.sha256,
                };
                let inner = Arc::clone(inner);
                let entry = entry.clone();
                tokio::spawn(async move {
                    let result = fill(&inner, &guard.tenant, &entry).await;
                    // Stored before the marker goes: a request arriving now finds the object.
                    drop(guard);
                    let _ = tx.send(Some(result));
                });
                rx
            }
        }
    };
    let result = match rx.wait_for(Option::is_some).await {
        Ok(value) => value.clone(),
        Err(_) => None,
    };
    match result {
        Some(Ok(object)) => Ok((object, false)),
        Some(Err(e)) => Err(e),
        None => Err(FillError::Aborted),
    }
}

async fn fill(inner: &Inner, tenant: &TenantState, entry: &Entry) -> FillResult {
    let store = &tenant.store;
    let sha = entry.sha256;
    if let Some(object) = store.lookup(&sha) {
        return Ok(object);
    }
    if let Some(found) = store.disk_get(&sha).and_then(|d| d.lease()) {
        // Left by a previous run: hash it again before its first use.
        let (path, size) = (found.path.clone(), found.size);
        let checked = tokio::task::spawn_blocking(move || file_matches(&path, size, &sha)).await;
        if matches!(checked, Ok(Ok(true))) {
            found.set_verified();
            return Ok(Object::Disk(found));
        }
        tracing::warn!(arrangement.id = %tenant.id, path = %entry.path, file = %found.path.display(), "surrogate: stored file does not match the manifest, dropped");
        tenant.usage.disk_dropped.add(1);
        store.invalidate(&sha);
    }

    let url = object_url(&tenant.manifest().origin, &entry.path);
    tenant.usage.origin_fetches.add(1);
    let usage = &tenant.usage;
    if entry.size <= store.memory_object_max() {
        let capacity = usize::try_from(entry.size).unwrap_or(0);
        let mut buffer = Vec::with_capacity(capacity);
        let fetched = inner
            .origin
            .fetch_object(
                &url,
                entry,
                &mut Sink::Memory(&mut buffer),
                &usage.origin_bytes,
            )
            .await;
        if let Err(failure) = fetched {
            return Err(count_failure(tenant, entry, failure));
        }
        let bytes = Bytes::from(buffer);
        store.put_memory(sha, bytes.clone());
        match store.put_disk(sha, &bytes).await {
            Ok(()) | Err(DiskError::Removed) => {}
            Err(e) => {
                usage.disk_errors.add(1);
                tracing::warn!(arrangement.id = %tenant.id, path = %entry.path, error = %e, "surrogate: not stored on disk, serving from memory");
            }
        }
        return Ok(Object::Memory(bytes));
    }

    let mut temp = match store.temp_file(entry.size).await {
        Ok(temp) => temp,
        Err(e) => {
            usage.disk_errors.add(1);
            tracing::warn!(arrangement.id = %tenant.id, path = %entry.path, error = %e, "surrogate: cannot fetch a large object");
            return Err(FillError::Disk(Arc::new(e)));
        }
    };
    let fetched = inner
        .origin
        .fetch_object(&url, entry, &mut Sink::File(&mut temp), &usage.origin_bytes)
        .await;
    if let Err(failure) = fetched {
        return Err(count_failure(tenant, entry, failure));
    }
    match store.publish(sha, temp).await {
        Ok(object) => Ok(Object::Disk(object)),
        Err(e) => {
            usage.disk_errors.add(1);
            tracing::warn!(arrangement.id = %tenant.id, path = %entry.path, error = %e, "surrogate: storing a large object");
            Err(FillError::Disk(Arc::new(e)))
        }
    }
}

fn count_failure(tenant: &TenantState, entry: &Entry, failure: FetchFailure) -> FillError {
    let usage = &tenant.usage;
    match failure {
        FetchFailure::Origin(e) => {
            if e.is_mismatch() {
                usage.mismatches.add(1);
                tracing::warn!(arrangement.id = %tenant.id, path = %entry.path, error = %e, "surrogate: origin bytes refused");
            } else if e.is_timeout() {
                usage.origin_timeouts.add(1);
                tracing::warn!(arrangement.id = %tenant.id, path = %entry.path, error = %e, "surrogate: origin timed out");
            } else {
                usage.origin_errors.add(1);
                tracing::warn!(arrangement.id = %tenant.id, path = %entry.path, error = %e, "surrogate: origin fetch failed");
            }
            FillError::Origin(e)
        }
        FetchFailure::Sink(e) => {
            usage.disk_errors.add(1);
            tracing::warn!(arrangement.id = %tenant.id, path = %entry.path, error = %e, "surrogate: writing a large object");
            FillError::Disk(Arc::new(DiskError::Io(e)))
        }
    }
}
