//! `cargo xtask loadtest` (`cargo xtask bench loadtest`): the demo's flash crowd, measured.
//!
//! Two runs on the testbed of [`p2pcdn_tests::flashcrowd`] (without peering, then with),
//! 50 requests/s for 10 s, 1,000/s for 30 s, 50/s for 10 s, and writes `--out` (xtask:
//! `target/bench/loadtest.json`) plus the plot next to it (`loadtest.svg`):
//!
//! ```json
//! {"onset_to_steer_ms": N, "discovery_negotiation_ms": N, "unloaded_p99_ms": N,
//!  "with_peering": {"success_rate": F, "p99_ms": N},
//!  "without_peering": {"success_rate": F, "p99_ms": N}, ...}
//! ```
//!
//! - `unloaded_p99_ms`: p99 latency of the requests of the with-peering run started before
//!   the crowd (50/s, a quarter of the edge's admission rate; nothing is steered then).
//! - `onset_to_steer_ms`: from the crowd's onset (the first instant of the 1,000/s phase,
//!   where the offered load first exceeds the edge's capacity) to the completion of the
//!   first request started since then that a peer answered (the load generator's
//!   per-request timestamps).
//! - `discovery_negotiation_ms`: from the edge daemon's decision to seek capacity (the
//!   start of the first negotiation of the crowd, in its store) to the first arrangement of
//!   that negotiation active (its activation time in the store).
//! - `success_rate`, `p99_ms` of each run: over all of its requests (2xx; latency of the
//!   successes from connect to the end of the body).
//!
//! `details` adds the timeline (onset → decision, negotiation length, first flow to a
//! short-term peer), discovery and standby times, the crowd-only success rates and the
//! ledger's byte agreement; `targets` says which targets were met.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use p2pcdn_tests::{
    flashcrowd::{self, CrowdConfig, ScenarioResult, Schedule},
    privilege,
    report::{self, Run},
};
use serde_json::json;

/// The p2pcdn flash-crowd load test (needs root).
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// The results file (xtask passes target/bench/loadtest.json); the plot goes next to it.
    #[arg(long)]
    out: PathBuf,
    /// Multiplies every rate and capacity.
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Seconds of the crowd.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=300))]
    during: u64,
    /// A short run: --scale 0.3, 4 s before, 10 s of crowd, 8 s after.
    #[arg(long)]
    quick: bool,
}

const ONSET_TO_STEER_TARGET_MS: f64 = 250.0;
const DISCOVERY_NEGOTIATION_TARGET_MS: f64 = 1000.0;
const SUCCESS_TARGET: f64 = 0.99;

fn main() -> ExitCode {
    let args = Args::parse();
    if !privilege::has_netns_admin() {
        eprintln!("the load test needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)");
        return ExitCode::from(77);
    }
    if !(0.05..=2.0).contains(&args.scale) {
        eprintln!("--scale: between 0.05 and 2");
        return ExitCode::from(64);
    }
    if let Err(e) = ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: tearing the testbed down");
        flashcrowd::abort_all();
        std::process::exit(130);
    }) {
        eprintln!("cannot handle Ctrl-C ({e}); continuing");
    }
    let (scale, schedule) = if args.quick {
        (
            0.3,
            Schedule {
                base: 50.0 * 0.3,
                crowd: 1000.0 * 0.3,
                before: Duration::from_secs(4),
                during: Duration::from_secs(10),
                after: Duration::from_secs(8),
            },
        )
    } else {
        (
            args.scale,
            Schedule {
                base: 50.0 * args.scale,
                crowd: 1000.0 * args.scale,
                before: Duration::from_secs(10),
                during: Duration::from_secs(args.during),
                after: Duration::from_secs(10),
            },
        )
    };
    let limit = (schedule.length() + Duration::from_secs(120)) * 2;
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("\nthe load test took longer than {limit:?}: tearing the testbed down");
        flashcrowd::abort_all();
        std::process::exit(1);
    });
    match run(&args, scale, &schedule) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("load test failed: {e:#}");
            flashcrowd::abort_all();
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args, scale: f64, schedule: &Schedule) -> anyhow::Result<()> {
    let config = CrowdConfig::demo(scale);
    let mut results: Vec<ScenarioResult> = Vec::new();
    for (label, peering) in [("without peering", false), ("with peering", true)] {
        eprintln!("== {label}");
        let config = if peering {
            config.clone()
        } else {
            config.clone().without_peering()
        };
        let result = flashcrowd::run_scenario(
            label,
            config,
            schedule,
            &mut |line| eprintln!("  {line}"),
            |second| eprintln!("  {}", second.line()),
        )
        .with_context(|| format!("run {label}"))?;
        results.push(result);
    }
    let [without, with] = results.as_slice() else {
        anyhow::bail!("expected two runs");
    };
    let run_figures = |r: &ScenarioResult| {
        json!({
            "success_rate": r.report.success_rate,
            "p99_ms": r.report.latency.p99_ms,
            "p50_ms": r.report.latency.p50_ms,
            "requests": r.report.completed,
            "crowd_success_rate": r.crowd_success_rate,
            "answered_by_origin": r.timeline.answered_by_origin,
            "answered_by_peers": r.timeline.answered_by_peers,
            "failed": r.report.failed,
        })
    };
    let t = &with.timeline;
    let unloaded = with.unloaded_p99_ms;
    let ledger_gap = with
        .ledger
        .iter()
        .filter(|l| l.state == "disbanded")
        .map(flashcrowd::LedgerRow::bytes_gap_percent)
        .fold(0.0f64, f64::max);
    let met = |v: Option<f64>, ok: &dyn Fn(f64) -> bool| v.is_some_and(ok);
    let doc = json!({
        "onset_to_steer_ms": t.onset_to_steer_ms,
        "discovery_negotiation_ms": t.discovery_negotiation_ms,
        "unloaded_p99_ms": unloaded,
        "with_peering": run_figures(with),
        "without_peering": run_figures(without),
        "targets": {
            "onset_to_steer_ms_le_250": met(t.onset_to_steer_ms, &|v| v <= ONSET_TO_STEER_TARGET_MS),
            "discovery_negotiation_ms_le_1000":
                met(t.discovery_negotiation_ms, &|v| v <= DISCOVERY_NEGOTIATION_TARGET_MS),
            "with_peering_success_rate_ge_0_99": with.report.success_rate >= SUCCESS_TARGET,
            "with_peering_p99_le_2x_unloaded": match (with.report.latency.p99_ms, unloaded) {
                (Some(p99), Some(u)) => p99 <= 2.0 * u,
                _ => false,
            },
        },
        "details": {
            "schedule": schedule,
            "scale": scale,
            "edge_capacity_conn_per_s": CrowdConfig::demo(scale).capacity,
            "origin_capacity_req_per_s": CrowdConfig::demo(scale).origin_capacity(),
            "onset_to_decision_ms": t.onset_to_decision_ms,
            "negotiation_ms": t.negotiation_ms,
            "onset_to_short_term_ms": t.onset_to_short_term_ms,
            "discovery_ms": with.discovery_ms,
            "standby_ready_ms": with.standby_ready_ms,
            "unloaded_p50_ms": with.unloaded_p50_ms,
            "ledger_max_bytes_gap_percent": ledger_gap,
            "not_disbanded": with.not_disbanded,
        },
    });
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", args.out.display()))?;
    let svg = args.out.with_extension("svg");
    let runs: Vec<Run<'_>> = results
        .iter()
        .map(|r| Run::new(&r.label, &r.report))
        .collect();
    report::write_svg(&svg, &runs)?;
    eprint!("{}", report::summary_table(&runs));
    eprintln!("wrote {} and {}", args.out.display(), svg.display());
    Ok(())
}
