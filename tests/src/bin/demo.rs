//! `cargo xtask demo`: the whole flash-crowd loop in throwaway network namespaces, twice.
//!
//! Each run builds the testbed of [`p2pcdn_tests::flashcrowd`] — clients; an edge with the
//! XDP redirector, a `p2pcdn run` daemon and an origin that sustains 500 requests/s behind
//! a local admission rate of 200 new connections/s; three peers with the redirector
//! (decapsulation) and `p2pcdn run` with a surrogate, one a standby long-term peer and two
//! short-term — and drives an open-loop crowd: 50 requests/s for 10 s, 1,000/s for 30 s,
//! 50/s for 10 s. The first run is without peering (no peers: the edge is on its own), the
//! second with. A live view shows, once per second, the offered rate, what the edge admitted,
//! what each peer took, the arrangements' states and the success so far. Then a report:
//! a table of both runs, the timeline of the crowd (onset → steering → negotiation), the
//! ledger rows of the disbanded arrangements, `target/demo/report.json` and
//! `target/demo/flash-crowd.svg` (requests/s by server, success rate, p50/p99 over time).
//!
//! Everything is torn down at the end, on failure, on Ctrl-C or SIGTERM, and when the demo
//! overruns its time limit. Every load is bounded in count and time.

use std::{
    io::IsTerminal as _,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use p2pcdn_tests::{
    flashcrowd::{self, CrowdConfig, LiveSecond, ScenarioResult, Schedule},
    privilege,
    report::{self, Run},
};

/// The p2pcdn flash-crowd demo (needs root).
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Multiplies every rate and capacity (rates of the crowd, the edge, the origin, the
    /// peers): 0.3 is a lighter machine's demo.
    #[arg(long, default_value_t = 1.0, value_parser = parse_scale)]
    scale: f64,
    /// Requests/s before and after the crowd (before --scale).
    #[arg(long, default_value_t = 50.0)]
    base_rate: f64,
    /// Requests/s of the crowd (before --scale).
    #[arg(long, default_value_t = 1000.0)]
    crowd_rate: f64,
    /// Seconds before the crowd.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(2..=120))]
    before: u64,
    /// Seconds of the crowd.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=300))]
    during: u64,
    /// Seconds after the crowd.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=120))]
    after: u64,
    /// A short run: --scale 0.3 --before 4 --during 10 --after 8.
    #[arg(long)]
    quick: bool,
    /// Which runs.
    #[arg(long, value_enum, default_value_t = Only::Both)]
    only: Only,
    /// Where report.json and flash-crowd.svg go.
    #[arg(long, default_value = "target/demo")]
    out_dir: PathBuf,
    /// XDP attach mode: skb (veths), driver or auto.
    #[arg(long, default_value = "skb")]
    mode: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Only {
    Both,
    With,
    Without,
}

fn parse_scale(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.05..=2.0).contains(&v) {
        Ok(v)
    } else {
        Err("between 0.05 and 2".to_owned())
    }
}

/// Time for one run besides its schedule: set-up, draining, disbanding, teardown.
const RUN_OVERHEAD: Duration = Duration::from_secs(120);

fn main() -> ExitCode {
    let mut args = Args::parse();
    if args.quick {
        args.scale = 0.3;
        args.before = 4;
        args.during = 10;
        args.after = 8;
    }
    if !privilege::has_netns_admin() {
        eprintln!(
            "the demo needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN): \
             sudo -E cargo xtask demo"
        );
        return ExitCode::from(77);
    }
    if let Err(e) = ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: tearing the testbed down");
        flashcrowd::abort_all();
        std::process::exit(130);
    }) {
        eprintln!("cannot handle Ctrl-C ({e}); continuing");
    }
    let schedule = schedule(&args);
    let runs = if args.only == Only::Both { 2 } else { 1 };
    let limit = (schedule.length() + RUN_OVERHEAD) * runs;
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("\nthe demo took longer than {limit:?}: tearing the testbed down");
        flashcrowd::abort_all();
        std::process::exit(1);
    });
    match run(&args, &schedule) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            flashcrowd::abort_all();
            ExitCode::FAILURE
        }
    }
}

fn schedule(args: &Args) -> Schedule {
    Schedule {
        base: args.base_rate * args.scale,
        crowd: args.crowd_rate * args.scale,
        before: Duration::from_secs(args.before),
        during: Duration::from_secs(args.during),
        after: Duration::from_secs(args.after),
    }
}

fn step(title: &str) {
    println!("\n== {title}");
}

fn run(args: &Args, schedule: &Schedule) -> anyhow::Result<()> {
    let started = Instant::now();
    let config = CrowdConfig {
        xdp_mode: args.mode.clone(),
        ..CrowdConfig::demo(args.scale)
    };
    println!(
        "flash crowd: {:.0} requests/s for {} s, {:.0}/s for {} s, {:.0}/s for {} s (open loop, \
         a new connection per request)",
        schedule.base,
        schedule.before.as_secs(),
        schedule.crowd,
        schedule.during.as_secs(),
        schedule.base,
        schedule.after.as_secs()
    );
    let mut results = Vec::new();
    let plan: &[(&str, bool)] = match args.only {
        Only::Both => &[("without peering", false), ("with peering", true)],
        Only::With => &[("with peering", true)],
        Only::Without => &[("without peering", false)],
    };
    for (label, peering) in plan {
        step(&format!("run: {label}"));
        let config = if *peering {
            config.clone()
        } else {
            config.clone().without_peering()
        };
        let view = LiveView::new(schedule.length().as_secs());
        let result = flashcrowd::run_scenario(
            label,
            config,
            schedule,
            &mut |line| view.println(&format!("  {line}")),
            |second| view.show(second),
        )
        .with_context(|| format!("run {label}"))?;
        view.finish();
        results.push(result);
    }

    step("report");
    let by_label: Vec<Run<'_>> = results
        .iter()
        .map(|r| Run::new(&r.label, &r.report))
        .collect();
    print!("{}", report::summary_table(&by_label));
    for r in &results {
        print_figures(r, schedule);
    }
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    let json = args.out_dir.join("report.json");
    let doc = serde_json::json!({
        "schedule": schedule,
        "scale": args.scale,
        "runs": results,
    });
    std::fs::write(&json, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    let svg = args.out_dir.join("flash-crowd.svg");
    report::write_svg(&svg, &by_label)?;
    println!(
        "\nwrote {} and {} ({:.0} s in all)",
        json.display(),
        svg.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0} ms"))
}

fn print_figures(r: &ScenarioResult, schedule: &Schedule) {
    println!("\n{}:", r.label);
    let crowd = r
        .crowd_success_rate
        .map_or_else(|| "-".to_owned(), |v| format!("{:.2} %", v * 100.0));
    println!(
        "  unloaded p50 {} / p99 {}; during the crowd {crowd} of the requests succeeded",
        ms(r.unloaded_p50_ms),
        ms(r.unloaded_p99_ms)
    );
    println!(
        "  answered by the origin {}, by peers {}",
        r.timeline.answered_by_origin, r.timeline.answered_by_peers
    );
    if !r.peering {
        return;
    }
    let t = &r.timeline;
    println!(
        "  edge daemon start → all peers known {}, → standby arrangement active {}",
        ms(r.discovery_ms),
        ms(r.standby_ready_ms)
    );
    println!(
        "  crowd onset ({:.0}/s from {} s) → first answer by a peer {} (standby long-term peer, \
         steered in XDP)",
        schedule.crowd,
        schedule.onset().as_secs(),
        ms(t.onset_to_steer_ms)
    );
    println!(
        "  onset → the monitor's decision {}; decision → short-term arrangement active {} \
         (negotiation {}); onset → first flow to a short-term peer {}",
        ms(t.onset_to_decision_ms),
        ms(t.discovery_negotiation_ms),
        ms(t.negotiation_ms),
        ms(t.onset_to_short_term_ms)
    );
    println!("  arrangements and ledger (the edge's side):");
    for a in &r.arrangements {
        let row = r.ledger.iter().find(|l| l.arrangement == a.id);
        let usage = row.map_or_else(String::new, |l| {
            format!(
                ", {} connections, bytes edge {} / peer {} ({:.2} % apart), settled {} micro-{}",
                l.local_connections,
                l.local_bytes,
                l.peer_bytes,
                l.bytes_gap_percent(),
                l.total_micros,
                l.currency
            )
        });
        println!(
            "    {} {:<10} {:<10} {:>5}/s {}{}{}",
            a.peer,
            a.kind,
            a.state,
            a.rate,
            a.id,
            a.end_reason
                .as_deref()
                .map_or_else(String::new, |e| format!(" ({e})")),
            usage
        );
    }
    if !r.not_disbanded.is_empty() {
        println!("  NOT disbanded in time: {:?}", r.not_disbanded);
    }
}

/// The live view: a progress bar on a terminal with one line per second above it, plain
/// lines otherwise.
struct LiveView {
    bar: Option<ProgressBar>,
}

impl LiveView {
    fn new(seconds: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(seconds);
            if let Ok(style) =
                ProgressStyle::with_template("  [{bar:40.cyan/blue}] {pos:>3}/{len} s  {msg}")
            {
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        });
        Self { bar }
    }

    fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn show(&self, second: &LiveSecond) {
        let line = second.line();
        match &self.bar {
            Some(bar) => {
                bar.set_position(second.bucket.second + 1);
                bar.set_message(format!(
                    "offered {}/s, ok {} of {}",
                    second.bucket.started, second.succeeded, second.completed
                ));
                bar.println(format!("  {line}"));
            }
            None => eprintln!("  {line}"),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
