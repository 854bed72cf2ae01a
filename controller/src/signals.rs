//! Load signals besides the data plane's counters, and the tuning of each service's local
//! admission rate to what the origin can sustain.
//!
//! - **Host pressure**: `/proc/pressure/cpu` and `/proc/pressure/memory` (Linux PSI): the share
//!   of the last 10 s in which some task waited for the resource.
//! - **The origin's own signal**: an HTTP `GET` of the service's `origin_status_url` (for
//!   example nginx's `stub_status`, whose active-connection count is read when the body has
//!   one), timed from the request to the end of the body.
//!
//! [`Aimd`] turns them into an admission rate, TCP-style: while the origin answers within
//! `latency_target_ms` and the host is not under pressure the rate grows by `increase_percent`
//! of the configured capacity per interval (never above it); a slow or failing origin, or
//! pressure above `psi_high_percent`, cuts it by `decrease_percent` (never below `min_percent`
//! of the capacity). The kernel's bucket takes the new rate at once; the overload detector
//! compares arrivals with it, so the deficit asked from peers is what the origin cannot
//! sustain now, not what it was configured for.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use http_body_util::{BodyExt as _, Empty};
use hyper::{Request, body::Bytes, header};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;

/// `[admission]`: tuning of the local admission rates. Absent: rates stay as configured.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionConfig {
    /// Signals are read and the rate adjusted this often, ms; default 1000.
    pub interval_ms: u64,
    /// The origin is healthy while its status URL answers within this, ms; default 200.
    pub latency_target_ms: u64,
    /// Host pressure (PSI `some avg10` of cpu or memory) above this is congestion, percent;
    /// 0 turns the host signal off; default 80.
    pub psi_high_percent: u32,
    /// The rate never goes below this share of the configured capacity, percent; default 20.
    pub min_percent: u32,
    /// Additive increase per healthy interval, percent of the capacity; default 5.
    pub increase_percent: u32,
    /// Multiplicative decrease on congestion, percent of the current rate; default 30.
    pub decrease_percent: u32,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            interval_ms: 1000,
            latency_target_ms: 200,
            psi_high_percent: 80,
            min_percent: 20,
            increase_percent: 5,
            decrease_percent: 30,
        }
    }
}

impl AdmissionConfig {
    /// Why the settings cannot work, with the key to blame.
    pub fn problem(&self) -> Option<(&'static str, String)> {
        if !(50..=60_000).contains(&self.interval_ms) {
            return Some(("interval_ms", "must be 50 to 60000".to_owned()));
        }
        if !(1..=60_000).contains(&self.latency_target_ms) {
            return Some(("latency_target_ms", "must be 1 to 60000".to_owned()));
        }
        if self.psi_high_percent > 100 {
            return Some(("psi_high_percent", "must be 0 (off) to 100".to_owned()));
        }
        if !(1..=100).contains(&self.min_percent) {
            return Some(("min_percent", "must be 1 to 100".to_owned()));
        }
        if !(1..=100).contains(&self.increase_percent) {
            return Some(("increase_percent", "must be 1 to 100".to_owned()));
        }
        if !(1..=99).contains(&self.decrease_percent) {
            return Some(("decrease_percent", "must be 1 to 99".to_owned()));
        }
        None
    }
}

/// One PSI file's `some avg10` and `full avg10` (percent of the last 10 s).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pressure {
    pub some_avg10: f64,
    pub full_avg10: Option<f64>,
}

/// Parses a `/proc/pressure/*` file.
pub fn parse_pressure(text: &str) -> Result<Pressure, String> {
    let avg10 = |kind: &str| -> Result<Option<f64>, String> {
        let Some(line) = text.lines().find(|l| l.starts_with(kind)) else {
            return Ok(None);
        };
        let field = line
            .split_whitespace()
            .find_map(|f| f.strip_prefix("avg10="))
            .ok_or_else(|| format!("no avg10 in {line:?}"))?;
        let value: f64 = field
            .parse()
            .map_err(|_| format!("avg10 {field:?} is not a number"))?;
        if !(0.0..=100.0).contains(&value) {
            return Err(format!("avg10 {value} is not a percentage"));
        }
        Ok(Some(value))
    };
    let some = avg10("some ")?.ok_or("no \"some\" line")?;
    Ok(Pressure {
        some_avg10: some,
        full_avg10: avg10("full ")?,
    })
}

/// Reads a PSI file; `None` where the kernel has none (PSI disabled, not Linux).
pub fn read_pressure(path: &Path) -> Option<Result<Pressure, String>> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(parse_pressure(&text).map_err(|e| format!("{}: {e}", path.display())))
}

/// The highest `some avg10` of CPU and memory pressure, if the host reports any.
pub fn host_pressure() -> Option<f64> {
    ["/proc/pressure/cpu", "/proc/pressure/memory"]
        .iter()
        .filter_map(|p| read_pressure(Path::new(p)))
        .filter_map(Result::ok)
        .map(|p| p.some_avg10)
        .reduce(f64::max)
}

/// What the origin's status URL said.
#[derive(Debug, Clone, PartialEq)]
pub struct OriginReading {
    /// Request to the end of the body.
    pub latency: Duration,
    pub status: u16,
    /// nginx `stub_status`'s "Active connections", when the body has it.
    pub active_connections: Option<u64>,
}

/// Reads nginx `stub_status`'s first line, `Active connections: N`.
pub fn parse_stub_status(body: &str) -> Option<u64> {
    body.lines()
        .find_map(|l| l.trim().strip_prefix("Active connections:"))
        .and_then(|n| n.trim().parse().ok())
}

/// Largest status body read.
const MAX_STATUS_BODY: usize = 64 << 10;

/// `GET url` (http:// only), timed; never panics on any answer.
pub async fn probe_origin(url: &str, timeout: Duration) -> Result<OriginReading, String> {
    let started = Instant::now();
    let work = async {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("bad url {url:?}: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("{url}: only http:// status URLs are read"));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{url}: no host"))?
            .clone();
        let port = authority.port_u16().unwrap_or(80);
        let stream = TcpStream::connect((authority.host().trim_matches(['[', ']']), port))
            .await
            .map_err(|e| format!("connect {authority}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("{authority}: {e}"))?;
        let driver = tokio::spawn(conn);
        let request = Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(header::HOST, authority.as_str())
            .header(header::USER_AGENT, "p2pcdn-monitor")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let result = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| format!("{authority}: {e}"))?;
            let status = response.status().as_u16();
            let limited = http_body_util::Limited::new(response.into_body(), MAX_STATUS_BODY);
            let body = limited
                .collect()
                .await
                .map_err(|e| format!("{authority}: body: {e}"))?
                .to_bytes();
            Ok((status, body))
        }
        .await;
        driver.abort();
        result
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok((status, body))) => Ok(OriginReading {
            latency: started.elapsed(),
            status,
            active_connections: parse_stub_status(&String::from_utf8_lossy(&body)),
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

/// What one interval's signals say.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Healthy,
    Congested(String),
}

/// Judges one interval: the origin's answer (if probed) against the target, host pressure
/// (if read) against the threshold.
pub fn judge(
    cfg: &AdmissionConfig,
    origin: Option<&Result<OriginReading, String>>,
    pressure: Option<f64>,
) -> Verdict {
    if let Some(answer) = origin {
        match answer {
            Err(e) => return Verdict::Congested(format!("origin: {e}")),
            Ok(r) if r.status >= 500 => {
                return Verdict::Congested(format!("origin answered {}", r.status));
            }
            Ok(r) if r.latency > Duration::from_millis(cfg.latency_target_ms) => {
                return Verdict::Congested(format!(
                    "origin answered in {} ms (target {} ms)",
                    r.latency.as_millis(),
                    cfg.latency_target_ms
                ));
            }
            Ok(_) => {}
        }
    }
    if cfg.psi_high_percent > 0
        && let Some(p) = pressure
        && p > f64::from(cfg.psi_high_percent)
    {
        return Verdict::Congested(format!(
            "host pressure {p:.0} % (threshold {} %)",
            cfg.psi_high_percent
        ));
    }
    Verdict::Healthy
}

/// Additive-increase, multiplicative-decrease of one service's admission rate.
#[derive(Debug, Clone)]
pub struct Aimd {
    capacity: u32,
    min: u32,
    step: u32,
    keep_percent: u32,
    rate: u32,
}

impl Aimd {
    /// Starts at the configured `capacity`.
    pub fn new(capacity: u32, cfg: &AdmissionConfig) -> Self {
        let capacity = capacity.max(1);
        let share = |percent: u32| {
            u32::try_from(u64::from(capacity) * u64::from(percent) / 100)
                .unwrap_or(capacity)
                .max(1)
        };
        Self {
            capacity,
            min: share(cfg.min_percent),
            step: share(cfg.increase_percent),
            keep_percent: 100 - cfg.decrease_percent.min(99),
            rate: capacity,
        }
    }

    pub fn rate(&self) -> u32 {
        self.rate
    }

    /// The rate after one interval judged `verdict`; `Some` only when it changed.
    pub fn update(&mut self, verdict: &Verdict) -> Option<u32> {
        let next = match verdict {
            Verdict::Healthy => self.rate.saturating_add(self.step).min(self.capacity),
            Verdict::Congested(_) => {
                let cut = u64::from(self.rate) * u64::from(self.keep_percent) / 100;
                u32::try_from(cut).unwrap_or(self.rate).max(self.min)
            }
        };
        (next != self.rate).then(|| {
            self.rate = next;
            next
        })
    }
}

/// Tunes `service`'s admission rate until `stop`: every `interval_ms` reads the signals
/// (`origin_status_url` if set, host pressure if `psi_high_percent` > 0), updates the rate
/// with [`Aimd`], writes it to the data plane and publishes it on `capacity` (the overload
/// detector's capacity).
pub async fn tune(
    service: String,
    configured: u32,
    origin_status_url: Option<String>,
    cfg: AdmissionConfig,
    dataplane: crate::steering::SharedDataplane,
    capacity: tokio::sync::watch::Sender<u32>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut aimd = Aimd::new(configured, &cfg);
    let interval = Duration::from_millis(cfg.interval_ms);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let origin = match &origin_status_url {
            Some(url) => Some(probe_origin(url, interval).await),
            None => None,
        };
        if let Some(Ok(r)) = &origin {
            metrics::histogram!("p2pcdn_origin_latency_ms", "service" => service.clone())
                .record(r.latency.as_secs_f64() * 1000.0);
        }
        let pressure = if cfg.psi_high_percent > 0 {
            host_pressure()
        } else {
            None
        };
        if let Some(p) = pressure {
            metrics::gauge!("p2pcdn_host_pressure_percent").set(p);
        }
        let verdict = judge(&cfg, origin.as_ref(), pressure);
        let Some(rate) = aimd.update(&verdict) else {
            continue;
        };
        let dp = dataplane.clone();
        let name = service.clone();
        let written = tokio::task::spawn_blocking(move || {
            let mut dp = dp.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let info = dp
                .services()
                .map_err(|e| e.to_string())?
                .into_iter()
                .find(|s| s.name == name)
                .ok_or_else(|| format!("service {name} is not in the data plane"))?;
            let mut spec = info.to_spec();
            spec.rate = rate;
            // The bucket's depth follows the rate (a tenth of a second's worth).
            spec.burst = None;
            dp.upsert_service(&spec)
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        match written {
            Ok(()) => {
                metrics::gauge!("p2pcdn_admission_conn_per_s", "service" => service.clone())
                    .set(f64::from(rate));
                let _ = capacity.send(rate);
                match &verdict {
                    Verdict::Congested(why) => tracing::info!(
                        service,
                        rate,
                        why,
                        "admission rate cut: the origin cannot sustain more"
                    ),
                    Verdict::Healthy => tracing::debug!(service, rate, "admission rate raised"),
                }
            }
            Err(e) => tracing::warn!(service, rate, error = %e, "cannot write the admission rate"),
        }
    }
}

#[cfg(test)]
#[expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests panic with a message on failure"
)]
mod tests {
    use super::*;

    #[test]
    fn pressure_files_parse_and_bad_ones_say_why() {
        let cpu = "some avg10=12.50 avg60=3.00 avg300=1.00 total=123\n\
                   full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        let p = parse_pressure(cpu).unwrap();
        assert!((p.some_avg10 - 12.5).abs() < 1e-9);
        assert_eq!(p.full_avg10, Some(0.0));
        let older = "some avg10=1.00 avg60=0.00 avg300=0.00 total=5\n";
        assert_eq!(parse_pressure(older).unwrap().full_avg10, None);
        assert!(parse_pressure("").unwrap_err().contains("some"));
        assert!(
            parse_pressure("some avg10=x\n")
                .unwrap_err()
                .contains("number")
        );
        assert!(
            parse_pressure("some avg10=250\n")
                .unwrap_err()
                .contains("percentage")
        );
        assert!(
            parse_pressure("some total=1\n")
                .unwrap_err()
                .contains("avg10")
        );
    }

    #[test]
    fn stub_status_active_connections_are_read() {
        let body = "Active connections: 291 \nserver accepts handled requests\n 16630948 16630948 31070465 \nReading: 6 Writing: 179 Waiting: 106 \n";
        assert_eq!(parse_stub_status(body), Some(291));
        assert_eq!(parse_stub_status("ok"), None);
    }

    #[test]
    fn congestion_cuts_the_rate_and_health_grows_it_back_within_bounds() {
        let cfg = AdmissionConfig::default();
        let mut aimd = Aimd::new(1000, &cfg);
        assert_eq!(
            aimd.update(&Verdict::Healthy),
            None,
            "already at the capacity"
        );
        let slow = Verdict::Congested("slow".to_owned());
        assert_eq!(aimd.update(&slow), Some(700));
        assert_eq!(aimd.update(&slow), Some(490));
        for _ in 0..10 {
            aimd.update(&slow);
        }
        assert_eq!(aimd.rate(), 200, "never below min_percent of the capacity");
        assert_eq!(aimd.update(&slow), None);
        assert_eq!(
            aimd.update(&Verdict::Healthy),
            Some(250),
            "+5 % of the capacity"
        );
        for _ in 0..100 {
            aimd.update(&Verdict::Healthy);
        }
        assert_eq!(aimd.rate(), 1000, "never above the capacity");
    }

    #[test]
    fn verdicts_weigh_the_origin_and_the_host() {
        let cfg = AdmissionConfig::default();
        let ok = Ok(OriginReading {
            latency: Duration::from_millis(20),
            status: 200,
            active_connections: None,
        });
        assert_eq!(judge(&cfg, Some(&ok), Some(10.0)), Verdict::Healthy);
        assert_eq!(judge(&cfg, None, None), Verdict::Healthy);
        let slow = Ok(OriginReading {
            latency: Duration::from_millis(900),
            status: 200,
            active_connections: None,
        });
        assert!(
            matches!(judge(&cfg, Some(&slow), None), Verdict::Congested(w) if w.contains("900 ms"))
        );
        let failing = Ok(OriginReading {
            latency: Duration::from_millis(1),
            status: 503,
            active_connections: None,
        });
        assert!(
            matches!(judge(&cfg, Some(&failing), None), Verdict::Congested(w) if w.contains("503"))
        );
        let down: Result<OriginReading, String> = Err("connect: refused".to_owned());
        assert!(matches!(
            judge(&cfg, Some(&down), None),
            Verdict::Congested(_)
        ));
        assert!(
            matches!(judge(&cfg, Some(&ok), Some(95.0)), Verdict::Congested(w) if w.contains("pressure"))
        );
        let off = AdmissionConfig {
            psi_high_percent: 0,
            ..cfg
        };
        assert_eq!(judge(&off, Some(&ok), Some(95.0)), Verdict::Healthy);
    }

    #[tokio::test]
    async fn the_origin_probe_times_the_status_url() {
        use axum::{Router, routing::get};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route(
            "/status",
            get(|| async { "Active connections: 7 \nserver accepts handled requests\n" }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        let r = probe_origin(&format!("http://{addr}/status"), Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!((r.status, r.active_connections), (200, Some(7)));
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gone = closed.local_addr().unwrap();
        drop(closed);
        assert!(
            probe_origin(&format!("http://{gone}/"), Duration::from_secs(1))
                .await
                .is_err()
        );
        assert!(
            probe_origin("https://x/", Duration::from_secs(1))
                .await
                .is_err()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_origin_lowers_the_kernel_rate_and_a_fast_one_restores_it() {
        use std::sync::{
            Arc, Mutex,
            atomic::{AtomicU64, Ordering},
        };

        use axum::{Router, routing::get};
        use redirector_user::{Dataplane, MemoryDataplane, ServiceSpec};

        let delay_ms = Arc::new(AtomicU64::new(150));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let d = delay_ms.clone();
        let app = Router::new().route(
            "/status",
            get(move || {
                let d = d.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(d.load(Ordering::SeqCst))).await;
                    "Active connections: 1\n"
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });

        let mut mem = MemoryDataplane::new(Some("192.0.2.254".parse().unwrap()), None);
        mem.upsert_service(&ServiceSpec::new(
            "web",
            vec!["192.0.2.10:80".parse().unwrap()],
            1000,
        ))
        .unwrap();
        let boxed: Box<dyn Dataplane + Send> = Box::new(mem);
        let dp: crate::steering::SharedDataplane = Arc::new(Mutex::new(boxed));
        let cfg = AdmissionConfig {
            interval_ms: 400,
            latency_target_ms: 60,
            psi_high_percent: 0,
            ..AdmissionConfig::default()
        };
        let (tx, mut rx) = tokio::sync::watch::channel(1000);
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(tune(
            "web".to_owned(),
            1000,
            Some(format!("http://{addr}/status")),
            cfg,
            dp.clone(),
            tx,
            stop,
        ));
        let rate =
            |dp: &crate::steering::SharedDataplane| dp.lock().unwrap().services().unwrap()[0].rate;
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|r| *r <= 490))
            .await
            .expect("the rate is cut while the origin is slow")
            .unwrap();
        assert!(
            rate(&dp) <= 490,
            "the kernel's bucket has the cut rate: {}",
            rate(&dp)
        );
        delay_ms.store(0, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(15), rx.wait_for(|r| *r >= 600))
            .await
            .expect("the rate grows back once the origin is fast")
            .unwrap();
        assert!(rate(&dp) >= 600, "{}", rate(&dp));
        let _ = stop_tx.send(true);
        task.await.unwrap();
    }
}
