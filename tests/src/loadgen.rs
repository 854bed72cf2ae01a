//! An open-loop HTTP load generator for the flash-crowd demo and the load test.
//!
//! The load is a schedule of phases (a rate in requests per second held for a duration).
//! Arrivals are at fixed times: request `k` of a phase at rate `r` starts `k / r` seconds
//! into the phase whatever happened to the earlier ones, so a slow server cannot slow the
//! generator down (the "coordinated omission" of closed-loop generators). In-flight requests
//! are capped (every one holds a socket); a request due while the cap is reached is not
//! delayed but counted as failed, `overloaded_generator`.
//!
//! Every request opens a new TCP connection (new connections are what the edge's XDP
//! program admits or steers), sends one `GET` with `Connection: close` and reads the whole
//! answer under a per-request timeout. Asking the server to close first leaves TIME_WAIT on
//! the server's side, so a long run does not use up the client's local ports.
//!
//! Results are kept per request and aggregated per second of completion: one-second buckets
//! are final when their second ends, so the live view ([`run`]'s progress hook) and the
//! final series are the same numbers. Latencies of successful requests go into HDR
//! histograms (overall and per bucket).
//!
//! Sockets live in the network namespace of the thread that creates them, so [`run`] builds
//! a current-thread tokio runtime on the calling thread (like [`crate::http`]); [`run_in`]
//! first starts a thread in a named namespace.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt as _, Empty};
use hyper::{
    Request, Uri,
    header::{CONNECTION, HOST, HeaderName, HeaderValue},
};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::{
    sync::Notify,
    task::{JoinHandle, JoinSet},
    time::Instant,
};

use crate::netns::{NetnsError, run_in_netns};

/// The response header naming the server that answered, unless configured otherwise.
pub const DEFAULT_SERVED_BY: &str = crate::http::SERVED_BY;
/// The server name recorded when an answer has no server header.
pub const UNKNOWN_SERVER: &str = "unknown";
/// At most this many requests in one schedule.
pub const MAX_REQUESTS: u64 = 5_000_000;
/// At most this long a schedule.
pub const MAX_SCHEDULE: Duration = Duration::from_secs(3600);
/// At most this long a per-request timeout.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(600);
/// Added to the schedule's length and the timeout to make the run's hard deadline.
pub const DEADLINE_MARGIN: Duration = Duration::from_secs(2);
/// How long a finished request waits for the server to close the connection (keeping
/// TIME_WAIT on the server's side) before closing it itself.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// File descriptors kept free for everything else in the process besides request sockets.
const SPARE_FDS: u64 = 128;
/// Histogram range: 1 µs to 1 hour, 3 significant digits.
const HIST_MAX_US: u64 = 3_600_000_000;

/// Errors of the load generator; all but the runtime and namespace ones are bad input.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("the load schedule is empty: give at least one phase")]
    EmptySchedule,
    #[error("phase {index}: rate {rate} req/s is not a positive finite number")]
    BadRate { index: usize, rate: f64 },
    #[error("phase {index}: the duration is zero")]
    ZeroDuration { index: usize },
    #[error("the schedule lasts {length:?}; at most {max:?}", max = MAX_SCHEDULE)]
    ScheduleTooLong { length: Duration },
    #[error("the schedule has {count} requests; at most {max}", max = MAX_REQUESTS)]
    TooManyRequests { count: f64 },
    #[error("the path list is empty: give at least one path")]
    NoPaths,
    #[error("path {0:?} is not an absolute request path (like /index.html)")]
    BadPath(String),
    #[error("host {0:?} is not a valid Host header value")]
    BadHost(String),
    #[error("header name {0:?} is not a valid HTTP header name")]
    BadHeaderName(String),
    #[error("Zipf exponent {0} is not a finite number ≥ 0")]
    BadZipfExponent(f64),
    #[error("the request timeout must be between 1 ms and {max:?}, not {0:?}", max = MAX_TIMEOUT)]
    BadTimeout(Duration),
    #[error("the in-flight cap must be at least 1")]
    ZeroInFlight,
    #[error(
        "an in-flight cap of {cap} needs {needed} file descriptors but the limit is {limit} (raise it with `ulimit -n`, or lower the cap)"
    )]
    FdLimit { cap: usize, needed: u64, limit: u64 },
    #[error("tokio runtime: {0}")]
    Runtime(std::io::Error),
    #[error("latency histogram: {0}")]
    Histogram(#[from] hdrhistogram::CreationError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

/// One phase of a schedule: `rate` requests per second for `duration`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Phase {
    pub rate: f64,
    pub duration: Duration,
}

impl Phase {
    pub fn new(rate: f64, duration: Duration) -> Self {
        Self { rate, duration }
    }

    /// Requests this phase starts: one at each multiple of `1 / rate` before its end.
    fn requests(&self) -> f64 {
        (self.rate * self.duration.as_secs_f64()).ceil()
    }
}

/// How request paths are taken from [`LoadConfig::paths`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PathPick {
    /// In list order, over and over.
    RoundRobin,
    /// Zipf-like popularity: path `k` (from 0) has weight `1 / (k + 1)^exponent`, so the
    /// first paths are the hot ones. Deterministic: the draws come from a low-discrepancy
    /// sequence (Weyl, golden ratio) instead of a random number generator, so two runs ask
    /// for the same paths in the same order and short runs already match the weights.
    Zipf { exponent: f64 },
}

/// What to load and how. [`LoadConfig::new`] documents the defaults.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Where every connection goes.
    pub target: SocketAddr,
    /// `Host` header of every request.
    pub host: String,
    /// Request paths (absolute, `/...`).
    pub paths: Vec<String>,
    pub pick: PathPick,
    pub schedule: Vec<Phase>,
    /// Per request: connect, send, and read the whole answer.
    pub timeout: Duration,
    /// Requests in flight at most; a request due beyond it fails as `overloaded_generator`.
    pub max_in_flight: usize,
    /// The response header naming the server that answered.
    pub served_by_header: String,
    /// Set it to stop starting requests (Ctrl-C); those in flight still finish.
    pub stop: Option<Arc<AtomicBool>>,
}

impl LoadConfig {
    /// Defaults: host `service`, path `/` (round-robin), 5 s timeout, at most 1,000
    /// requests in flight, server named by `x-served-by`.
    pub fn new(target: SocketAddr, schedule: Vec<Phase>) -> Self {
        Self {
            target,
            host: "service".to_owned(),
            paths: vec!["/".to_owned()],
            pick: PathPick::RoundRobin,
            schedule,
            timeout: Duration::from_secs(5),
            max_in_flight: 1000,
            served_by_header: DEFAULT_SERVED_BY.to_owned(),
            stop: None,
        }
    }

    pub fn host(mut self, host: &str) -> Self {
        host.clone_into(&mut self.host);
        self
    }

    pub fn paths<S: AsRef<str>>(mut self, paths: &[S], pick: PathPick) -> Self {
        self.paths = paths.iter().map(|p| p.as_ref().to_owned()).collect();
        self.pick = pick;
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn max_in_flight(mut self, cap: usize) -> Self {
        self.max_in_flight = cap;
        self
    }

    pub fn served_by_header(mut self, name: &str) -> Self {
        name.clone_into(&mut self.served_by_header);
        self
    }

    pub fn stop_flag(mut self, stop: Arc<AtomicBool>) -> Self {
        self.stop = Some(stop);
        self
    }

    /// Checks everything, so a bad schedule is refused before a testbed is built.
    pub fn validate(&self) -> Result<(), LoadError> {
        Plan::new(self).map(|_| ())
    }

    /// Requests the schedule starts.
    pub fn total_requests(&self) -> Result<u64, LoadError> {
        Plan::new(self).map(|p| p.arrivals.len() as u64)
    }

    /// The schedule's length (the last phase's end).
    pub fn schedule_length(&self) -> Duration {
        self.schedule.iter().map(|p| p.duration).sum()
    }

    /// The hard deadline of a run: schedule length + timeout + [`DEADLINE_MARGIN`].
    pub fn deadline(&self) -> Duration {
        self.schedule_length() + self.timeout + DEADLINE_MARGIN
    }
}

/// A validated config: the arrival times and everything parsed.
struct Plan {
    /// Start offset and path index of every request, in order.
    arrivals: Vec<(Duration, usize)>,
    paths: Vec<Uri>,
    host: HeaderValue,
    served_by: HeaderName,
}

impl Plan {
    fn new(config: &LoadConfig) -> Result<Self, LoadError> {
        if config.schedule.is_empty() {
            return Err(LoadError::EmptySchedule);
        }
        let mut count = 0.0;
        for (index, phase) in config.schedule.iter().enumerate() {
            if !(phase.rate.is_finite() && phase.rate > 0.0) {
                return Err(LoadError::BadRate {
                    index,
                    rate: phase.rate,
                });
            }
            if phase.duration.is_zero() {
                return Err(LoadError::ZeroDuration { index });
            }
            count += phase.requests();
        }
        let length = config.schedule_length();
        if length > MAX_SCHEDULE {
            return Err(LoadError::ScheduleTooLong { length });
        }
        if count > MAX_REQUESTS as f64 {
            return Err(LoadError::TooManyRequests { count });
        }
        if config.paths.is_empty() {
            return Err(LoadError::NoPaths);
        }
        let paths = config
            .paths
            .iter()
            .map(|p| match p.parse::<Uri>() {
                Ok(uri) if p.starts_with('/') && uri.authority().is_none() => Ok(uri),
                _ => Err(LoadError::BadPath(p.clone())),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let host = HeaderValue::from_str(&config.host)
            .ok()
            .filter(|_| !config.host.is_empty())
            .ok_or_else(|| LoadError::BadHost(config.host.clone()))?;
        let served_by = HeaderName::from_bytes(config.served_by_header.as_bytes())
            .map_err(|_| LoadError::BadHeaderName(config.served_by_header.clone()))?;
        if config.timeout < Duration::from_millis(1) || config.timeout > MAX_TIMEOUT {
            return Err(LoadError::BadTimeout(config.timeout));
        }
        if config.max_in_flight == 0 {
            return Err(LoadError::ZeroInFlight);
        }
        let mut picker = Picker::new(config.pick, paths.len())?;
        let mut arrivals = Vec::with_capacity(count as usize);
        let mut phase_start = Duration::ZERO;
        for phase in &config.schedule {
            let n = phase.requests() as u64;
            for k in 0..n {
                let at = phase_start + Duration::from_secs_f64(k as f64 / phase.rate);
                arrivals.push((at, picker.next()));
            }
            phase_start += phase.duration;
        }
        Ok(Self {
            arrivals,
            paths,
            host,
            served_by,
        })
    }
}

/// Chooses the path of each request in turn.
struct Picker {
    /// Cumulative weights, normalised to end at 1 (empty for round-robin).
    cdf: Vec<f64>,
    len: usize,
    n: u64,
}

impl Picker {
    fn new(pick: PathPick, len: usize) -> Result<Self, LoadError> {
        let cdf = match pick {
            PathPick::RoundRobin => Vec::new(),
            PathPick::Zipf { exponent } => {
                if !(exponent.is_finite() && exponent >= 0.0) {
                    return Err(LoadError::BadZipfExponent(exponent));
                }
                let weights: Vec<f64> = (0..len)
                    .map(|k| 1.0 / ((k + 1) as f64).powf(exponent))
                    .collect();
                let total: f64 = weights.iter().sum();
                let mut acc = 0.0;
                weights
                    .iter()
                    .map(|w| {
                        acc += w / total;
                        acc
                    })
                    .collect()
            }
        };
        Ok(Self { cdf, len, n: 0 })
    }

    fn next(&mut self) -> usize {
        let n = self.n;
        self.n += 1;
        if self.cdf.is_empty() {
            return (n % self.len as u64) as usize;
        }
        // Weyl sequence: frac(n / φ) fills [0, 1) evenly.
        const INV_PHI: f64 = 0.618_033_988_749_894_9;
        let u = ((n + 1) as f64 * INV_PHI).fract();
        self.cdf
            .iter()
            .position(|c| u < *c)
            .unwrap_or(self.len.saturating_sub(1))
    }
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Failure {
    /// The in-flight cap was reached when the request was due; it was not sent.
    OverloadedGenerator,
    /// The TCP connection could not be made (refused, unreachable, out of sockets).
    Connect,
    /// No full answer within the per-request timeout.
    Timeout,
    /// The connection broke or the answer was not HTTP/1.1.
    Http,
    /// An answer with a status other than 2xx.
    Status(u16),
    /// Still in flight at the run's hard deadline.
    Deadline,
}

impl Failure {
    /// The key in [`Bucket::failed`] and [`LoadReport::failed`]: `connect`, `timeout`,
    /// `http`, `status_503`, `overloaded_generator`, `deadline`.
    pub fn label(&self) -> String {
        match self {
            Self::OverloadedGenerator => "overloaded_generator".to_owned(),
            Self::Connect => "connect".to_owned(),
            Self::Timeout => "timeout".to_owned(),
            Self::Http => "http".to_owned(),
            Self::Status(code) => format!("status_{code}"),
            Self::Deadline => "deadline".to_owned(),
        }
    }
}

/// What became of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx answer read to its end.
    Ok { server: String, bytes: u64 },
    Failed {
        failure: Failure,
        /// Who answered, for failures that are answers (non-2xx).
        server: Option<String>,
    },
}

/// One request of a run.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    /// Position in the schedule.
    pub index: usize,
    /// Index into [`LoadConfig::paths`].
    pub path: usize,
    /// When it was due, from the start of the run.
    pub scheduled: Duration,
    /// When it was started (a little after `scheduled` when the generator's thread was
    /// busy).
    pub started: Duration,
    /// From the start of `connect` to the end of the answer (zero if never sent).
    pub latency: Duration,
    pub outcome: Outcome,
}

impl RequestRecord {
    pub fn is_ok(&self) -> bool {
        matches!(self.outcome, Outcome::Ok { .. })
    }

    pub fn failure(&self) -> Option<Failure> {
        match self.outcome {
            Outcome::Failed { failure, .. } => Some(failure),
            Outcome::Ok { .. } => None,
        }
    }

    /// The server that answered (also for non-2xx answers).
    pub fn server(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Ok { server, .. } => Some(server),
            Outcome::Failed { server, .. } => server.as_deref(),
        }
    }
}

/// One second of a run, by completion time: requests started in the second, and those
/// that finished in it (success, failures by kind, successful answers by server, latency
/// percentiles of the successes).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Bucket {
    /// Seconds from the start of the run (the bucket covers `[second, second + 1)`).
    pub second: u64,
    /// Requests started (or refused as `overloaded_generator`) in this second.
    pub started: u64,
    /// Requests that finished in this second (successes + failures).
    pub completed: u64,
    pub succeeded: u64,
    /// Failures by [`Failure::label`].
    pub failed: BTreeMap<String, u64>,
    /// Successful answers by server.
    pub by_server: BTreeMap<String, u64>,
    /// Median latency of the successes, in milliseconds (none without successes).
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Requests in flight at the end of the second.
    pub in_flight: u64,
}

impl Bucket {
    /// Successes among the requests that finished in this second, from 0 to 1 (none if
    /// nothing finished).
    pub fn success_rate(&self) -> Option<f64> {
        (self.completed > 0).then(|| self.succeeded as f64 / self.completed as f64)
    }

    pub fn failures(&self) -> u64 {
        self.failed.values().sum()
    }
}

/// Per-server totals of a run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ServerTotals {
    /// 2xx answers.
    pub served: u64,
    /// Other answers (503, 404, ...).
    pub errors: u64,
    /// Body bytes of the 2xx answers.
    pub bytes: u64,
}

/// Latency percentiles of the successful requests, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub mean_ms: Option<f64>,
}

/// One phase of the schedule, as run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PhaseSummary {
    pub rate: f64,
    pub duration_ms: f64,
    pub requests: u64,
}

/// The result of a run. `records` (one per request) is left out of the JSON.
#[derive(Clone, Debug, Serialize)]
pub struct LoadReport {
    pub target: SocketAddr,
    pub host: String,
    pub schedule: Vec<PhaseSummary>,
    /// Requests the schedule has.
    pub scheduled: u64,
    /// Requests with an outcome (all of `scheduled` unless the run was stopped).
    pub completed: u64,
    pub succeeded: u64,
    /// Failures by [`Failure::label`].
    pub failed: BTreeMap<String, u64>,
    /// `succeeded / completed` (0 when nothing completed).
    pub success_rate: f64,
    pub latency: LatencySummary,
    /// One bucket per second from 0 to the last completion, none missing.
    pub series: Vec<Bucket>,
    pub servers: BTreeMap<String, ServerTotals>,
    /// The most any request started after it was due, in milliseconds (a busy generator
    /// shows here).
    pub max_start_lag_ms: f64,
    /// Requests in flight at once, at most.
    pub max_in_flight: u64,
    pub elapsed_ms: f64,
    /// The stop flag ended the run early.
    pub stopped: bool,
    #[serde(skip)]
    pub records: Vec<RequestRecord>,
}

impl LoadReport {
    /// Failures of one kind.
    pub fn failures(&self, failure: Failure) -> u64 {
        self.failed.get(&failure.label()).copied().unwrap_or(0)
    }

    /// Successful answers from `server`.
    pub fn served_by(&self, server: &str) -> u64 {
        self.servers.get(server).map_or(0, |s| s.served)
    }

    /// Requests started in each second of the run (by [`RequestRecord::started`]).
    pub fn started_per_second(&self) -> Vec<u64> {
        self.series.iter().map(|b| b.started).collect()
    }
}

fn to_ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn us_to_ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

struct BucketAcc {
    bucket: Bucket,
    latency: Histogram<u64>,
    /// Requests in flight when the bucket was first shown (its second had ended).
    in_flight: Option<u64>,
}

/// Everything recorded so far; shared by the request tasks (one thread, so the mutex is
/// never contended).
struct Aggregator {
    start: Instant,
    template: Histogram<u64>,
    latency: Histogram<u64>,
    buckets: BTreeMap<u64, BucketAcc>,
    servers: BTreeMap<String, ServerTotals>,
    failed: BTreeMap<String, u64>,
    succeeded: u64,
    records: Vec<RequestRecord>,
    /// Started and not yet recorded: index → (scheduled, started, path).
    pending: HashMap<usize, (Duration, Duration, usize)>,
    in_flight: u64,
    max_in_flight: u64,
    max_lag: Duration,
}

impl Aggregator {
    fn new(start: Instant) -> Result<Self, LoadError> {
        let template = Histogram::new_with_bounds(1, HIST_MAX_US, 3)?;
        Ok(Self {
            start,
            latency: Histogram::new_from(&template),
            template,
            buckets: BTreeMap::new(),
            servers: BTreeMap::new(),
            failed: BTreeMap::new(),
            succeeded: 0,
            records: Vec::new(),
            pending: HashMap::new(),
            in_flight: 0,
            max_in_flight: 0,
            max_lag: Duration::ZERO,
        })
    }

    fn bucket(&mut self, second: u64) -> &mut BucketAcc {
        let template = &self.template;
        self.buckets.entry(second).or_insert_with(|| BucketAcc {
            bucket: Bucket {
                second,
                ..Bucket::default()
            },
            latency: Histogram::new_from(template),
            in_flight: None,
        })
    }

    /// A request was started (or refused) now.
    fn started(&mut self, now: Duration, scheduled: Duration) {
        self.max_lag = self.max_lag.max(now.saturating_sub(scheduled));
        self.bucket(now.as_secs()).bucket.started += 1;
    }

    fn record(&mut self, record: RequestRecord) {
        let now = self.start.elapsed();
        self.pending.remove(&record.index);
        let acc = self.bucket(now.as_secs());
        acc.bucket.completed += 1;
        match &record.outcome {
            Outcome::Ok { server, .. } => {
                let us = record.latency.as_micros().try_into().unwrap_or(u64::MAX);
                acc.latency.saturating_record(us.max(1));
                acc.bucket.succeeded += 1;
                *acc.bucket.by_server.entry(server.clone()).or_default() += 1;
                self.latency.saturating_record(us.max(1));
                self.succeeded += 1;
            }
            Outcome::Failed { failure, .. } => {
                *acc.bucket.failed.entry(failure.label()).or_default() += 1;
                *self.failed.entry(failure.label()).or_default() += 1;
            }
        }
        match &record.outcome {
            Outcome::Ok { server, bytes } => {
                let totals = self.servers.entry(server.clone()).or_default();
                totals.served += 1;
                totals.bytes += bytes;
            }
            Outcome::Failed {
                server: Some(server),
                ..
            } => self.servers.entry(server.clone()).or_default().errors += 1,
            Outcome::Failed { server: None, .. } => {}
        }
        self.records.push(record);
    }

    /// The finished view of bucket `second` (empty if nothing happened in it).
    fn snapshot(&mut self, second: u64) -> Bucket {
        let in_flight = self.in_flight;
        let acc = self.bucket(second);
        let mut bucket = acc.bucket.clone();
        if !acc.latency.is_empty() {
            bucket.p50_ms = Some(us_to_ms(acc.latency.value_at_quantile(0.5)));
            bucket.p99_ms = Some(us_to_ms(acc.latency.value_at_quantile(0.99)));
        }
        // The in-flight count is only known live: the first snapshot (when the second
        // ended) keeps it.
        bucket.in_flight = *acc.in_flight.get_or_insert(in_flight);
        bucket
    }
}

fn lock(agg: &Mutex<Aggregator>) -> std::sync::MutexGuard<'_, Aggregator> {
    agg.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Makes sure the process may open `cap` sockets besides what it has: raises the soft
/// `RLIMIT_NOFILE` towards the hard limit if needed.
fn ensure_fd_limit(cap: usize) -> Result<(), LoadError> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let needed = cap as u64 + SPARE_FDS;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return Ok(());
    };
    if soft >= needed {
        return Ok(());
    }
    if hard >= needed && setrlimit(Resource::RLIMIT_NOFILE, needed, hard).is_ok() {
        return Ok(());
    }
    Err(LoadError::FdLimit {
        cap,
        needed,
        limit: if hard >= needed { soft } else { hard },
    })
}

/// Runs the load from the calling thread (its network namespace), on a current-thread
/// runtime built for the run. `progress` is called on this thread with every bucket when
/// its second has ended (and at the end for the last, partial one); keep it quick — it
/// shares the thread with the generator.
///
/// Bounded: the schedule fixes the request count, and the run ends by
/// [`LoadConfig::deadline`] whatever the server does (requests still in flight then are
/// counted as `deadline` failures).
///
/// Every in-flight request holds a socket: if the soft `RLIMIT_NOFILE` of the process is
/// below the in-flight cap (plus a margin), it is raised towards the hard limit, and the
/// run is refused if that is not enough.
pub fn run(config: &LoadConfig, progress: impl FnMut(&Bucket)) -> Result<LoadReport, LoadError> {
    let plan = Plan::new(config)?;
    ensure_fd_limit(config.max_in_flight)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(LoadError::Runtime)?;
    rt.block_on(drive(config, plan, progress))
}

/// [`run`] on a new thread that enters network namespace `ns` first.
pub fn run_in(
    ns: &str,
    config: LoadConfig,
    progress: impl FnMut(&Bucket) + Send + 'static,
) -> Result<LoadReport, LoadError> {
    config.validate()?;
    run_in_netns(ns, move || run(&config, progress))?
}

async fn drive(
    config: &LoadConfig,
    plan: Plan,
    mut progress: impl FnMut(&Bucket),
) -> Result<LoadReport, LoadError> {
    let start = Instant::now();
    let deadline = start + config.deadline();
    let agg = Arc::new(Mutex::new(Aggregator::new(start)?));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(Notify::new());
    let shared = Arc::new(Shared {
        target: config.target,
        host: plan.host.clone(),
        served_by: plan.served_by.clone(),
        timeout: config.timeout,
    });
    let mut tasks = JoinSet::new();
    let mut next = 0;
    let mut next_tick = 1u64;
    let mut stopped = false;
    loop {
        let now = Instant::now();
        while let Some(&(at, path)) = plan.arrivals.get(next) {
            if start + at > now {
                break;
            }
            if config
                .stop
                .as_ref()
                .is_some_and(|s| s.load(Ordering::Relaxed))
            {
                stopped = true;
                next = plan.arrivals.len();
                break;
            }
            let index = next;
            next += 1;
            let started = now - start;
            let mut a = lock(&agg);
            a.started(started, at);
            if in_flight.load(Ordering::Relaxed) >= config.max_in_flight {
                a.record(RequestRecord {
                    index,
                    path,
                    scheduled: at,
                    started,
                    latency: Duration::ZERO,
                    outcome: Outcome::Failed {
                        failure: Failure::OverloadedGenerator,
                        server: None,
                    },
                });
                continue;
            }
            let count = in_flight.fetch_add(1, Ordering::Relaxed) + 1;
            a.in_flight = count as u64;
            a.max_in_flight = a.max_in_flight.max(count as u64);
            a.pending.insert(index, (at, started, path));
            drop(a);
            let uri = plan.paths.get(path).cloned().unwrap_or_default();
            let (agg, in_flight, done, shared) = (
                Arc::clone(&agg),
                Arc::clone(&in_flight),
                Arc::clone(&done),
                Arc::clone(&shared),
            );
            tasks.spawn(async move {
                let t0 = Instant::now();
                let (outcome, conn) =
                    match tokio::time::timeout(shared.timeout, request(&shared, uri)).await {
                        Ok(r) => r,
                        Err(_) => (
                            Outcome::Failed {
                                failure: Failure::Timeout,
                                server: None,
                            },
                            None,
                        ),
                    };
                let latency = t0.elapsed();
                lock(&agg).record(RequestRecord {
                    index,
                    path,
                    scheduled: at,
                    started,
                    latency,
                    outcome,
                });
                if let Some(conn) = conn {
                    conn.close().await;
                }
                let left = in_flight.fetch_sub(1, Ordering::Relaxed) - 1;
                lock(&agg).in_flight = left as u64;
                done.notify_one();
            });
        }
        // Reap finished tasks so the set does not grow with the run.
        while tasks.try_join_next().is_some() {}
        while start + Duration::from_secs(next_tick) <= now {
            let bucket = lock(&agg).snapshot(next_tick - 1);
            progress(&bucket);
            next_tick += 1;
        }
        let all_started = next >= plan.arrivals.len();
        if all_started && in_flight.load(Ordering::Relaxed) == 0 {
            break;
        }
        if now >= deadline {
            break;
        }
        let tick = start + Duration::from_secs(next_tick);
        match plan.arrivals.get(next) {
            Some(&(at, _)) => tokio::time::sleep_until((start + at).min(tick)).await,
            None => {
                // notify_one keeps a permit when nobody waits, so a completion between the
                // check above and this wait is not missed.
                let _ = tokio::time::timeout_at(tick.min(deadline), done.notified()).await;
            }
        }
    }
    // At the deadline: whatever is still in flight failed.
    tasks.shutdown().await;
    let elapsed = start.elapsed();
    let mut a = lock(&agg);
    let pending: Vec<_> = a.pending.drain().collect();
    for (index, (scheduled, started, path)) in pending {
        a.record(RequestRecord {
            index,
            path,
            scheduled,
            started,
            latency: elapsed.saturating_sub(started),
            outcome: Outcome::Failed {
                failure: Failure::Deadline,
                server: None,
            },
        });
    }
    a.in_flight = 0;
    let last = a.buckets.keys().next_back().copied().unwrap_or(0);
    // Buckets not shown live yet (the last, partial second; and all of them if the
    // thread was busy at the end).
    let mut series = Vec::with_capacity(last as usize + 1);
    for second in 0..=last {
        let bucket = a.snapshot(second);
        if second + 1 >= next_tick {
            progress(&bucket);
        }
        series.push(bucket);
    }
    let mut records = std::mem::take(&mut a.records);
    records.sort_by_key(|r| r.index);
    let completed = records.len() as u64;
    let quantile =
        |q: f64| (!a.latency.is_empty()).then(|| us_to_ms(a.latency.value_at_quantile(q)));
    let latency = LatencySummary {
        count: a.latency.len(),
        p50_ms: quantile(0.5),
        p90_ms: quantile(0.9),
        p99_ms: quantile(0.99),
        p999_ms: quantile(0.999),
        max_ms: (!a.latency.is_empty()).then(|| us_to_ms(a.latency.max())),
        mean_ms: (!a.latency.is_empty()).then(|| a.latency.mean() / 1000.0),
    };
    Ok(LoadReport {
        target: config.target,
        host: config.host.clone(),
        schedule: config
            .schedule
            .iter()
            .map(|p| PhaseSummary {
                rate: p.rate,
                duration_ms: to_ms(p.duration),
                requests: p.requests() as u64,
            })
            .collect(),
        scheduled: plan.arrivals.len() as u64,
        completed,
        succeeded: a.succeeded,
        failed: a.failed.clone(),
        success_rate: if completed == 0 {
            0.0
        } else {
            a.succeeded as f64 / completed as f64
        },
        latency,
        series,
        servers: a.servers.clone(),
        max_start_lag_ms: to_ms(a.max_lag),
        max_in_flight: a.max_in_flight,
        elapsed_ms: to_ms(elapsed),
        stopped,
        records,
    })
}

/// What every request task needs.
struct Shared {
    target: SocketAddr,
    host: HeaderValue,
    served_by: HeaderName,
    timeout: Duration,
}

/// The task driving a client connection; aborted on drop so a request given up on (timeout,
/// deadline) closes its socket at once.
struct Connection(JoinHandle<()>);

impl Connection {
    /// Waits (a little) for the server to close first, then closes.
    async fn close(mut self) {
        let _ = tokio::time::timeout(CLOSE_GRACE, &mut self.0).await;
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn failed(failure: Failure, server: Option<String>) -> (Outcome, Option<Connection>) {
    (Outcome::Failed { failure, server }, None)
}

/// One request on a new connection.
async fn request(shared: &Shared, uri: Uri) -> (Outcome, Option<Connection>) {
    let Ok(stream) = tokio::net::TcpStream::connect(shared.target).await else {
        return failed(Failure::Connect, None);
    };
    let _ = stream.set_nodelay(true);
    let Ok((mut sender, connection)) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await
    else {
        return failed(Failure::Http, None);
    };
    let connection = Connection(tokio::spawn(async move {
        let _ = connection.await;
    }));
    let request = Request::get(uri)
        .header(HOST, shared.host.clone())
        .header(CONNECTION, "close")
        .body(Empty::new());
    let Ok(request) = request else {
        return failed(Failure::Http, None);
    };
    let Ok(response) = sender.send_request(request).await else {
        return failed(Failure::Http, None);
    };
    let server = response
        .headers()
        .get(&shared.served_by)
        .and_then(|v| v.to_str().ok())
        .unwrap_or(UNKNOWN_SERVER)
        .to_owned();
    let status = response.status();
    let Ok(body) = response.into_body().collect().await else {
        return failed(Failure::Http, Some(server));
    };
    let outcome = if status.is_success() {
        Outcome::Ok {
            server,
            bytes: body.to_bytes().len() as u64,
        }
    } else {
        Outcome::Failed {
            failure: Failure::Status(status.as_u16()),
            server: Some(server),
        }
    };
    (outcome, Some(connection))
}
