//! `cargo xtask demo`: the data-plane scenario of the netns test, shown as it happens.
//!
//! Builds throwaway namespaces (client, edge, three peers on one bridge), attaches the XDP
//! program with the real `p2pcdn-redirector` CLI, opens connections at a fixed rate and
//! prints who served them, changes the peer table, removes a peer, probes the decap
//! allow-list, prints the counters and tears everything down — also on Ctrl-C, on failure
//! and after a time limit.

use std::{
    collections::BTreeMap,
    net::SocketAddrV4,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use p2pcdn_tests::{
    http::{KeptId, LoadPlan, LoadReport, Outcome},
    netns::{self, UdpSink},
    privilege,
    scenario::{self, EDGE, Encap, Outer, SERVICE_V4, Scenario, ScenarioConfig},
};

/// The p2pcdn data-plane demo (needs root).
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// XDP attach mode: auto, driver or skb.
    #[arg(long, default_value = "auto")]
    mode: String,
    /// Connections of the first (IPv4) wave.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=5000))]
    connections: u32,
    /// Seconds over which the first wave is opened.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=10))]
    seconds: u64,
    /// Print one line per connection instead of one per batch.
    #[arg(long)]
    each: bool,
}

/// The whole demo must finish within this, or it tears down and fails.
const TIME_LIMIT: Duration = Duration::from_secs(90);
const BATCH: usize = 50;

fn main() -> ExitCode {
    let args = Args::parse();
    if !privilege::has_netns_admin() {
        eprintln!(
            "the demo needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN): \
             sudo -E cargo xtask demo"
        );
        return ExitCode::from(77);
    }
    // Ctrl-C, SIGTERM or the time limit: remove this process's namespaces and pins, then
    // exit (the servers' threads die with the process).
    if let Err(e) = ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: tearing the testbed down");
        netns::remove_own();
        std::process::exit(130);
    }) {
        eprintln!("cannot handle Ctrl-C ({e}); continuing");
    }
    std::thread::spawn(|| {
        std::thread::sleep(TIME_LIMIT);
        eprintln!("\nthe demo took longer than {TIME_LIMIT:?}: tearing the testbed down");
        netns::remove_own();
        std::process::exit(1);
    });
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn step(title: &str) {
    println!("\n== {title}");
}

fn run(args: &Args) -> anyhow::Result<()> {
    let started = Instant::now();
    step("setting up");
    let config = ScenarioConfig {
        xdp_mode: args.mode.clone(),
        ..ScenarioConfig::default()
    };
    let (rate, burst) = (config.local_rate, config.local_burst);
    let scenario = Scenario::setup(config, &mut |line| println!("  {line}"))
        .context("setting the scenario up")?;
    for host in ["edge", "peer1", "peer2"] {
        let cli = if host == "edge" {
            &scenario.edge
        } else {
            scenario.peer_cli.get(host).context("peer CLI")?
        };
        let status = cli.run(&["status"]).context("status")?;
        println!("  {host} status:");
        for line in status.lines() {
            println!("    {line}");
        }
    }
    let result = phases(&scenario, args, rate, burst);
    step("counters");
    for host in ["edge", "peer1", "peer2", "peer3"] {
        let cli = if host == "edge" {
            Some(&scenario.edge)
        } else {
            scenario.peer_cli.get(host)
        };
        if let Some(cli) = cli {
            match cli.run(&["stats"]) {
                Ok(text) => {
                    println!("  {host}: p2pcdn-redirector stats");
                    for line in text.lines().map(str::trim_end) {
                        if line.is_empty() {
                            println!();
                        } else {
                            println!("    {line}");
                        }
                    }
                }
                Err(e) => println!("  {host}: {e}"),
            }
        }
    }
    step("tearing down");
    for failure in scenario.detach_all() {
        println!("  detach: {failure}");
    }
    let id = scenario.testbed.id.clone();
    drop(scenario);
    println!(
        "  removed namespaces {id}-* and pins under /sys/fs/bpf/{id} ({:.1} s in all)",
        started.elapsed().as_secs_f64()
    );
    result
}

/// Prints connections as they complete: one line per batch (or per connection).
struct Progress {
    each: bool,
    batch: Vec<Outcome>,
    done: usize,
}

impl Progress {
    fn new(each: bool) -> Self {
        Self {
            each,
            batch: Vec::new(),
            done: 0,
        }
    }

    fn push(&mut self, outcome: &Outcome) {
        self.done += 1;
        if self.each {
            let port = outcome.local.map_or(0, |a| a.port());
            match &outcome.result {
                Ok(name) => println!(
                    "  #{:<4} :{port:<5} at {:>6.3} s  served by {name:<6} {:>7.2} ms",
                    outcome.index + 1,
                    outcome.at.as_secs_f64(),
                    outcome.latency.as_secs_f64() * 1e3
                ),
                Err(e) => println!("  #{:<4} :{port:<5} FAILED: {e}", outcome.index + 1),
            }
            return;
        }
        self.batch.push(outcome.clone());
        if self.batch.len() == BATCH {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let counts = p2pcdn_tests::http::count_servers(&self.batch);
        let errors = self.batch.iter().filter(|o| o.result.is_err()).count();
        let mut latencies: Vec<f64> = self
            .batch
            .iter()
            .filter(|o| o.result.is_ok())
            .map(|o| o.latency.as_secs_f64() * 1e3)
            .collect();
        latencies.sort_by(f64::total_cmp);
        let median = latencies.get(latencies.len() / 2).copied().unwrap_or(0.0);
        let max = latencies.last().copied().unwrap_or(0.0);
        println!(
            "  {:>4}-{:<4} {}  errors {errors}  latency median {median:.2} ms, max {max:.2} ms",
            self.done - self.batch.len() + 1,
            self.done,
            format_counts(&counts),
        );
        self.batch.clear();
    }
}

fn format_counts(counts: &BTreeMap<String, usize>) -> String {
    ["edge", "peer1", "peer2", "peer3"]
        .iter()
        .map(|name| format!("{name} {:>3}", counts.get(*name).copied().unwrap_or(0)))
        .collect::<Vec<_>>()
        .join("  ")
}

fn wave(scenario: &Scenario, plan: LoadPlan, each: bool) -> anyhow::Result<LoadReport> {
    let mut progress = Progress::new(each);
    let report = scenario
        .client
        .load(plan, |o| progress.push(o))
        .context("client")?;
    progress.flush();
    let counts = report.served_by();
    let total = report.outcomes.len().max(1);
    let steered: usize = counts
        .iter()
        .filter(|(name, _)| name.as_str() != EDGE)
        .map(|(_, n)| n)
        .sum();
    println!(
        "  => {} connections in {:.2} s: {}  (local {:.0} %, steered {steered}), errors {}",
        report.outcomes.len(),
        report.elapsed.as_secs_f64(),
        format_counts(&counts),
        100.0 * report.count(EDGE) as f64 / total as f64,
        report.errors().len()
    );
    Ok(report)
}

fn phases(scenario: &Scenario, args: &Args, rate: u32, burst: u32) -> anyhow::Result<()> {
    let n = usize::try_from(args.connections)?;
    let over = Duration::from_secs(args.seconds);
    step(&format!(
        "wave 1: {n} IPv4 connections over {} s to {} (local admission {rate}/s, burst {burst}; \
         expect ~{} local, the rest 1:2 over peer1 (GUE) and peer2 (IPIP))",
        args.seconds,
        scenario::service_v4(),
        u64::from(rate) * args.seconds
    ));
    let report = wave(
        scenario,
        LoadPlan::new(scenario::service_v4(), n, over).keep_per_server(3),
        args.each,
    )?;

    step(&format!(
        "wave 2: 150 IPv6 connections over 1 s to {} (IPv6 inside GUE and 6in4)",
        scenario::service_v6()
    ));
    wave(
        scenario,
        LoadPlan::new(scenario::service_v6(), 150, Duration::from_secs(1)),
        args.each,
    )?;

    step("table change: peer1 weight 1 -> 5, peer3 added (GUE over IPv6, weight 2)");
    let mut log = |line: &str| println!("  {line}");
    scenario.set_peer("peer1", Encap::Gue, Outer::V4, 5, &mut log)?;
    scenario.add_peer("peer3", Encap::Gue, Outer::V6, 2, &mut log)?;
    let kept = report.kept();
    let ids: Vec<KeptId> = kept.iter().map(|(id, _)| *id).collect();
    let again = scenario
        .client
        .reuse(&ids, Duration::from_secs(3))
        .context("reuse")?;
    let mut same = 0;
    for ((_, first), outcome) in kept.iter().zip(&again) {
        let now = match &outcome.result {
            Ok(name) => name.clone(),
            Err(e) => format!("error: {e}"),
        };
        if &now == first {
            same += 1;
        }
        println!("  kept connection first served by {first:<6} now served by {now}");
    }
    println!(
        "  => {same} of {} established connections stayed with their server",
        kept.len()
    );
    step("wave 3: 300 IPv4 connections over 1 s with the new table (expect 5:2:2)");
    wave(
        scenario,
        LoadPlan::new(scenario::service_v4(), 300, Duration::from_secs(1)),
        args.each,
    )?;

    step(&format!(
        "wave 3b: 150 IPv6 connections over 1 s to {} (IPv6 in GUE over IPv6 to peer3)",
        scenario::service_v6()
    ));
    wave(
        scenario,
        LoadPlan::new(scenario::service_v6(), 150, Duration::from_secs(1)),
        args.each,
    )?;

    step("peer2 removed");
    let peer2: Vec<KeptId> = kept
        .iter()
        .filter(|(_, s)| s == "peer2")
        .map(|(id, _)| *id)
        .collect();
    scenario.client.close(&peer2)?;
    scenario.remove_peer("peer2", &mut log)?;
    step("wave 4: 200 IPv4 connections over 1 s (expect none at peer2)");
    let report4 = wave(
        scenario,
        LoadPlan::new(scenario::service_v4(), 200, Duration::from_secs(1)),
        args.each,
    )?;

    step("decap allow-list: tunnels to peer1 (GUE) from the edge, then from the client");
    let probe = SocketAddrV4::new(SERVICE_V4, 9999);
    let sink = UdpSink::start(&scenario.testbed.host("peer1").ns, probe.into())?;
    let before = scenario.stats("peer1")?.global;
    scenario.send_tunnel_frames("edge", "peer1", Encap::Gue, 10, probe)?;
    scenario.send_tunnel_frames("client", "peer1", Encap::Gue, 25, probe)?;
    std::thread::sleep(Duration::from_millis(300));
    let after = scenario.stats("peer1")?.global;
    println!(
        "  sent 10 from the edge (allowed) and 25 from the client (not allowed): \
         peer1's UDP socket got {}, decap_pkts +{}, decap_denied +{}",
        sink.received(),
        after.decap_pkts - before.decap_pkts,
        after.decap_denied - before.decap_denied
    );

    let failures = report.errors().len() + report4.errors().len();
    if failures > 0 {
        bail!("{failures} connections were not answered");
    }
    Ok(())
}
