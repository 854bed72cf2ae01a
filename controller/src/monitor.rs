//! Step 1 of the seed's process: detecting that a service is overloaded, and that the crowd
//! is over.
//!
//! The signal is the rate of new connections *arriving* for the service, from the data
//! plane's counters (admitted locally + steered to peers + overflow kept locally for lack of
//! a peer), compared with the service's local capacity (its admission rate). Arrivals, not
//! admissions: once peers take the overflow the local admissions stay at the capacity, and a
//! detector looking at them would declare the crowd over as soon as steering works.
//!
//! Hysteresis: *overloaded* after the arrival rate has stayed at or above `high_water` of the
//! capacity for `enter_ms`; the deficit asked for is the excess plus `headroom_percent`.
//! While overloaded, a deficit that grows by more than a quarter over what was asked for
//! asks for the difference. *Recovered* after the rate has stayed below `low_water` for
//! `exit_ms`. The kernel's admission bucket protects the origin meanwhile: the detector only
//! decides when to buy capacity, never what is admitted.
//!
//! Rates come from counter deltas over a sliding window of `window_ms` (counters wrap like
//! the kernel's: wrapping subtraction).

use std::collections::VecDeque;

use serde::Deserialize;
use tokio::sync::{mpsc, watch};

use crate::{daemon::LoadEvent, model::UnixMs};

/// Cumulative data-plane counters of one service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceCounters {
    pub syn_local: u64,
    pub syn_steered: u64,
    pub kept_local: u64,
}

impl ServiceCounters {
    /// Every new connection that arrived.
    pub fn arrivals(&self) -> u64 {
        self.syn_local
            .wrapping_add(self.syn_steered)
            .wrapping_add(self.kept_local)
    }
}

/// `[monitor]`: the overload detector's settings.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorConfig {
    /// Counters are read this often, ms; default 100.
    pub interval_ms: u64,
    /// Rates are measured over this window, ms; default 1000.
    pub window_ms: u64,
    /// Overloaded at or above this share of the capacity, percent; default 90.
    pub high_water_percent: u32,
    /// Recovered below this share, percent; default 60.
    pub low_water_percent: u32,
    /// The arrival rate must stay high this long, ms; default 500.
    pub enter_ms: u64,
    /// ... and low this long, ms; default 10000.
    pub exit_ms: u64,
    /// Asked for on top of the excess, percent; default 20.
    pub headroom_percent: u32,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            interval_ms: 100,
            window_ms: 1000,
            high_water_percent: 90,
            low_water_percent: 60,
            enter_ms: 500,
            exit_ms: 10_000,
            headroom_percent: 20,
        }
    }
}

impl MonitorConfig {
    /// Why the settings cannot work, with the key to blame.
    pub fn problem(&self) -> Option<(&'static str, String)> {
        if !(10..=10_000).contains(&self.interval_ms) {
            return Some(("interval_ms", "must be 10 to 10000".to_owned()));
        }
        if self.window_ms < self.interval_ms || self.window_ms > 60_000 {
            return Some((
                "window_ms",
                "must be at least interval_ms and at most 60000".to_owned(),
            ));
        }
        if self.high_water_percent == 0 || self.high_water_percent > 1000 {
            return Some(("high_water_percent", "must be 1 to 1000".to_owned()));
        }
        if self.low_water_percent >= self.high_water_percent {
            return Some((
                "low_water_percent",
                format!(
                    "must be below high_water_percent ({})",
                    self.high_water_percent
                ),
            ));
        }
        if self.enter_ms > 600_000 || self.exit_ms > 3_600_000 {
            return Some((
                "enter_ms",
                "enter_ms ≤ 600000 and exit_ms ≤ 3600000".to_owned(),
            ));
        }
        if self.headroom_percent > 1000 {
            return Some(("headroom_percent", "must be at most 1000".to_owned()));
        }
        None
    }
}

/// Where a service is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetectorState {
    Normal,
    /// High since then, not yet for `enter_ms`.
    Entering {
        since: UnixMs,
    },
    /// Overloaded; `requested` connections/s asked for so far.
    Overloaded {
        requested: u32,
    },
    /// Overloaded, low since then, not yet for `exit_ms`.
    Leaving {
        since: UnixMs,
        requested: u32,
    },
}

/// The hysteresis detector of one service.
#[derive(Debug, Clone)]
pub struct Detector {
    service: String,
    capacity: u32,
    cfg: MonitorConfig,
    state: DetectorState,
    /// (time, cumulative arrivals) over the window.
    samples: VecDeque<(UnixMs, u64)>,
}

impl Detector {
    pub fn new(service: impl Into<String>, capacity_conn_per_s: u32, cfg: MonitorConfig) -> Self {
        Self {
            service: service.into(),
            capacity: capacity_conn_per_s.max(1),
            cfg,
            state: DetectorState::Normal,
            samples: VecDeque::new(),
        }
    }

    pub fn state(&self) -> DetectorState {
        self.state
    }

    /// The service's capacity changed (the admission rate was tuned to the origin): later
    /// readings are compared with `capacity_conn_per_s`.
    pub fn set_capacity(&mut self, capacity_conn_per_s: u32) {
        self.capacity = capacity_conn_per_s.max(1);
    }

    /// The arrival rate over the window, new connections/s (`None` until two readings).
    pub fn rate(&self) -> Option<f64> {
        let (t0, c0) = *self.samples.front()?;
        let (t1, c1) = *self.samples.back()?;
        if t1 <= t0 {
            return None;
        }
        #[expect(clippy::cast_precision_loss, reason = "rates")]
        let rate = c1.wrapping_sub(c0) as f64 * 1000.0 / (t1 - t0) as f64;
        Some(rate)
    }

    /// Takes a reading of the counters at `now`; returns what the daemon should do, if
    /// anything.
    pub fn observe(&mut self, now: UnixMs, counters: ServiceCounters) -> Option<LoadEvent> {
        self.samples.push_back((now, counters.arrivals()));
        let window = i64::try_from(self.cfg.window_ms).unwrap_or(i64::MAX);
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.saturating_sub(*t) > window)
            && self.samples.len() > 2
        {
            self.samples.pop_front();
        }
        let rate = self.rate()?;
        let capacity = f64::from(self.capacity);
        let high = rate >= capacity * f64::from(self.cfg.high_water_percent) / 100.0;
        let low = rate < capacity * f64::from(self.cfg.low_water_percent) / 100.0;
        let held = |since: UnixMs, ms: u64| {
            now.saturating_sub(since) >= i64::try_from(ms).unwrap_or(i64::MAX)
        };
        let deficit = self.deficit(rate);
        match self.state {
            DetectorState::Normal if high => {
                self.state = DetectorState::Entering { since: now };
                if self.cfg.enter_ms == 0 {
                    return self.enter(deficit, rate);
                }
                None
            }
            DetectorState::Normal => None,
            DetectorState::Entering { since } if high => {
                if held(since, self.cfg.enter_ms) {
                    self.enter(deficit, rate)
                } else {
                    None
                }
            }
            DetectorState::Entering { .. } => {
                self.state = DetectorState::Normal;
                None
            }
            DetectorState::Overloaded { requested } if low => {
                self.state = DetectorState::Leaving {
                    since: now,
                    requested,
                };
                None
            }
            DetectorState::Overloaded { requested } => self.more(requested, deficit),
            DetectorState::Leaving { since, .. } if low => {
                if held(since, self.cfg.exit_ms) {
                    self.state = DetectorState::Normal;
                    Some(LoadEvent::Recovered {
                        service: self.service.clone(),
                    })
                } else {
                    None
                }
            }
            DetectorState::Leaving { requested, .. } => {
                self.state = DetectorState::Overloaded { requested };
                self.more(requested, deficit)
            }
        }
    }

    /// Excess over the capacity plus headroom, rounded up.
    fn deficit(&self, rate: f64) -> u32 {
        let excess = (rate - f64::from(self.capacity)).max(0.0);
        let with_headroom = excess * (1.0 + f64::from(self.cfg.headroom_percent) / 100.0);
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "clamped to u32"
        )]
        let d = with_headroom.ceil().min(f64::from(u32::MAX)) as u32;
        d
    }

    fn enter(&mut self, deficit: u32, rate: f64) -> Option<LoadEvent> {
        let deficit = deficit.max(1);
        self.state = DetectorState::Overloaded { requested: deficit };
        Some(LoadEvent::Overloaded {
            service: self.service.clone(),
            deficit_conn_per_s: deficit,
            reason: format!(
                "{rate:.0} new connections/s arriving for a capacity of {}/s",
                self.capacity
            ),
        })
    }

    fn more(&mut self, requested: u32, deficit: u32) -> Option<LoadEvent> {
        if u64::from(deficit) * 4 > u64::from(requested) * 5 {
            self.state = DetectorState::Overloaded { requested: deficit };
            Some(LoadEvent::MoreNeeded {
                service: self.service.clone(),
                deficit_conn_per_s: deficit - requested,
            })
        } else {
            None
        }
    }
}

/// Reads a service's counters (a data-plane map read: may block briefly).
pub type CounterSource = Box<dyn FnMut() -> Result<ServiceCounters, String> + Send>;

/// Runs a detector for `service` until `stop`: reads `source` every `interval_ms` (off the
/// async workers), sends what it decides to `events`, and exports the rate and the state as
/// metrics.
pub async fn run(
    mut detector: Detector,
    mut source: CounterSource,
    events: mpsc::Sender<LoadEvent>,
    mut capacity: Option<watch::Receiver<u32>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticker =
        tokio::time::interval(std::time::Duration::from_millis(detector.cfg.interval_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let service = detector.service.clone();
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let reading = match tokio::task::spawn_blocking(move || {
            let r = source();
            (source, r)
        })
        .await
        {
            Ok((back, r)) => {
                source = back;
                r
            }
            Err(e) => {
                tracing::error!(service, error = %e, "the counter reader failed; monitor stops");
                return;
            }
        };
        let counters = match reading {
            Ok(c) => {
                last_error = None;
                c
            }
            Err(e) => {
                if last_error.as_deref() != Some(e.as_str()) {
                    tracing::warn!(service, error = %e, "cannot read the service's counters");
                }
                last_error = Some(e);
                continue;
            }
        };
        if let Some(rx) = capacity.as_mut()
            && rx.has_changed().unwrap_or(false)
        {
            detector.set_capacity(*rx.borrow_and_update());
        }
        let event = detector.observe(crate::model::now_ms(), counters);
        if let Some(rate) = detector.rate() {
            metrics::gauge!("p2pcdn_arrivals_conn_per_s", "service" => service.clone()).set(rate);
        }
        let overloaded = matches!(
            detector.state(),
            DetectorState::Overloaded { .. } | DetectorState::Leaving { .. }
        );
        metrics::gauge!("p2pcdn_overloaded", "service" => service.clone()).set(if overloaded {
            1.0
        } else {
            0.0
        });
        if let Some(event) = event {
            tracing::info!(service, ?event, "load event");
            if events.send(event).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]
mod tests {
    use super::*;

    fn cfg() -> MonitorConfig {
        MonitorConfig {
            interval_ms: 100,
            window_ms: 1000,
            high_water_percent: 90,
            low_water_percent: 60,
            enter_ms: 500,
            exit_ms: 2000,
            headroom_percent: 20,
        }
    }

    /// Feeds `rate` arrivals/s for `ms` in 100 ms steps; returns the events.
    fn feed(
        d: &mut Detector,
        t: &mut UnixMs,
        total: &mut u64,
        rate: u64,
        ms: i64,
    ) -> Vec<LoadEvent> {
        let mut out = Vec::new();
        for _ in 0..ms / 100 {
            *t += 100;
            *total = total.wrapping_add(rate / 10);
            let c = ServiceCounters {
                syn_local: *total,
                ..ServiceCounters::default()
            };
            out.extend(d.observe(*t, c));
        }
        out
    }

    #[test]
    fn a_short_spike_does_not_trigger_and_a_sustained_one_does() {
        // A 200 ms window, so that a short spike is short in the measured rate too.
        let mut d = Detector::new(
            "web",
            100,
            MonitorConfig {
                window_ms: 200,
                ..cfg()
            },
        );
        let (mut t, mut total) = (0, 0);
        assert!(feed(&mut d, &mut t, &mut total, 50, 2000).is_empty());
        // 200 ms at 1000/s: the rate crosses 90 % for less than enter_ms.
        let spike = feed(&mut d, &mut t, &mut total, 1000, 200);
        let after = feed(&mut d, &mut t, &mut total, 0, 1500);
        assert!(spike.is_empty() && after.is_empty(), "{spike:?} {after:?}");
        let events = feed(&mut d, &mut t, &mut total, 300, 3000);
        assert_eq!(events.len(), 1, "{events:?}");
        match &events[0] {
            LoadEvent::Overloaded {
                deficit_conn_per_s, ..
            } => {
                // (300 - 100) × 1.2 = 240 (the window may still be ramping up: at most 240).
                assert!((1..=240).contains(deficit_conn_per_s), "{events:?}");
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn steering_does_not_end_the_overload_and_recovery_needs_exit_ms() {
        let mut d = Detector::new("web", 100, cfg());
        let (mut t, mut total) = (0, 0);
        feed(&mut d, &mut t, &mut total, 300, 3000);
        assert!(matches!(d.state(), DetectorState::Overloaded { .. }));
        // Arrivals stay at 300/s while peers take 200 of them: still overloaded.
        let mut steered = 0u64;
        let mut local = total;
        for _ in 0..30 {
            t += 100;
            local += 10;
            steered += 20;
            let e = d.observe(
                t,
                ServiceCounters {
                    syn_local: local,
                    syn_steered: steered,
                    kept_local: 0,
                },
            );
            assert_eq!(e, None);
        }
        total = local + steered;
        // Below the low-water mark, but not yet for exit_ms.
        assert!(feed(&mut d, &mut t, &mut total, 20, 1500).is_empty());
        // A bounce above the low-water mark restarts the count.
        assert!(feed(&mut d, &mut t, &mut total, 200, 300).is_empty());
        let events = feed(&mut d, &mut t, &mut total, 20, 4000);
        assert_eq!(
            events,
            vec![LoadEvent::Recovered {
                service: "web".to_owned()
            }]
        );
        assert_eq!(d.state(), DetectorState::Normal);
    }

    #[test]
    fn a_growing_crowd_asks_for_the_difference() {
        let mut d = Detector::new("web", 100, cfg());
        let (mut t, mut total) = (0, 0);
        let first = feed(&mut d, &mut t, &mut total, 300, 3000);
        let asked = match &first[..] {
            [
                LoadEvent::Overloaded {
                    deficit_conn_per_s, ..
                },
            ] => *deficit_conn_per_s,
            e => panic!("{e:?}"),
        };
        let more = feed(&mut d, &mut t, &mut total, 1000, 3000);
        let extra: u32 = more
            .iter()
            .map(|e| match e {
                LoadEvent::MoreNeeded {
                    deficit_conn_per_s, ..
                } => *deficit_conn_per_s,
                e => panic!("{e:?}"),
            })
            .sum();
        // In total (1000 - 100) × 1.2 = 1080, asked for in steps of more than a quarter: at
        // least 1080 / 1.25.
        assert!(
            (864..=1080).contains(&(asked + extra)),
            "{asked} + {extra}: {more:?}"
        );
    }

    #[test]
    fn counters_that_wrap_give_the_right_rate() {
        let mut d = Detector::new("web", 100, cfg());
        let start = u64::MAX - 5;
        d.observe(
            0,
            ServiceCounters {
                syn_local: start,
                ..ServiceCounters::default()
            },
        );
        d.observe(
            1000,
            ServiceCounters {
                syn_local: start.wrapping_add(50),
                ..ServiceCounters::default()
            },
        );
        assert!((d.rate().unwrap() - 50.0).abs() < 1e-9);
    }

    #[test]
    fn bad_settings_name_their_key() {
        let mut c = cfg();
        c.low_water_percent = 95;
        assert_eq!(c.problem().unwrap().0, "low_water_percent");
        let mut c = cfg();
        c.interval_ms = 0;
        assert_eq!(c.problem().unwrap().0, "interval_ms");
        assert!(cfg().problem().is_none());
        assert!(MonitorConfig::default().problem().is_none());
    }
}
