//! `cargo xtask bench dataplane`: cost of each path of the XDP program, in ns per packet net
//! of an empty XDP program timed the same way, median of several runs. Writes
//! `target/bench/dataplane.json`.
//!
//! Method: BPF_PROG_TEST_RUN with repeat > 1 does not restore the packet between
//! iterations, so a path that rewrites the packet would see its own output from the second
//! iteration on. Every path (and the floor) is therefore timed as many separate calls with
//! repeat = 1, using the kernel-reported duration of each call, and every call's action and
//! output length are checked: a benchmark whose path silently changed fails.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::PathBuf,
};

use anyhow::{Context as _, Result, bail, ensure};
use clap::Parser;
use p2pcdn_tests::{
    harness::{
        Harness, HarnessNs, action, addrs, fixture_addrs::*, peer, service_key, steer_service, v4,
    },
    packet::{self, Ip},
    privilege::require_root,
};
use redirector_ebpf::{DEFAULT_GUE_PORT, ENCAP_GUE};
use serde_json::json;

#[derive(Parser)]
#[command(about = "Benchmark the XDP program's paths with BPF_PROG_TEST_RUN")]
struct Args {
    /// Separate test-run calls per path and run (each with repeat = 1).
    #[arg(long, default_value_t = 1_000_000)]
    calls: u32,
    /// Runs per path; the median is reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Output file (default: <workspace>/target/bench/dataplane.json).
    #[arg(long)]
    out: Option<PathBuf>,
}

const PORT: u16 = 443;

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        args.calls > 0 && args.runs > 0,
        "--calls and --runs must be positive"
    );
    if !require_root("bench-dataplane") {
        bail!("the data-plane benchmark needs root (BPF_PROG_TEST_RUN)");
    }
    let ns = HarnessNs::enter()?;
    let floor = FloorProgram::load()?;

    let paths = [
        "pass_through",
        "local_established",
        "syn_steered",
        "syn_steered_distinct",
        "steered_established",
        "decap",
    ];
    let mut floors = Vec::new();
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    for run in 0..args.runs {
        // A fresh program per run: empty flow table, fresh buckets.
        let mut h = setup(&ns, args.calls)?;
        floors.push(floor.time(args.calls, ns.veth0)?);
        for (i, path) in paths.iter().enumerate() {
            let ns_per_call = time_path(&mut h, path, args.calls)?;
            samples[i].push(ns_per_call);
        }
        eprintln!(
            "run {}/{}: floor {:.1} ns, {}",
            run + 1,
            args.runs,
            floors[run],
            paths
                .iter()
                .zip(&samples)
                .map(|(p, s)| format!("{p} {:.1}", s[run]))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let floor_ns = median(&floors);
    let mut out_paths = serde_json::Map::new();
    for (path, s) in paths.iter().zip(&samples) {
        let net = (median(s) - floor_ns).max(0.0);
        out_paths.insert((*path).to_owned(), json!(round1(net)));
    }
    let report = json!({
        "floor_ns": round1(floor_ns),
        "paths": out_paths,
        "method": {
            "calls_per_path_and_run": args.calls,
            "runs": args.runs,
            "statistic": "median over runs of the mean kernel-reported duration per call \
                          (repeat = 1), minus the floor (an empty XDP program timed the same way)",
        },
        "targets": {"pass_through": 24, "steered_established": 110, "syn_steered": 384},
    });
    let path = args.out.unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench/dataplane.json")
    });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    println!("wrote {}", path.display());
    drop(ns);
    Ok(())
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// The program as an edge with one steered service (no local admission: every new flow is
/// overflow), one GUE peer with an unlimited rate, and decapsulation enabled for `decap`.
fn setup(ns: &HarnessNs, calls: u32) -> Result<Harness> {
    // Room for every distinct SYN of a run: no LRU eviction in the measurement.
    let mut h = Harness::load((calls + 1024).next_power_of_two())?;
    h.set_ingress(Some(ns.veth0));
    h.add_service(
        0,
        &[service_key(v4(SERVICE_V4), PORT)],
        steer_service(0, 0, redirector_ebpf::DEFAULT_RING_SIZE),
    )?;
    h.set_peer(
        0,
        peer(
            v4(addrs::PEER_A_V4),
            ENCAP_GUE,
            1_000_000_000,
            1_000_000_000,
            1,
        ),
    )?;
    h.fill_ring(0, redirector_ebpf::DEFAULT_RING_SIZE, &[0])?;
    h.enable_decap(DEFAULT_GUE_PORT)?;
    h.allow_decap(v4(addrs::PEER_A_V4))?;
    Ok(h)
}

/// Times `calls` repeat = 1 runs of one path; returns the mean kernel-reported ns per call.
fn time_path(h: &mut Harness, path: &str, calls: u32) -> Result<f64> {
    let svc = SocketAddrV4::new(SERVICE_V4, PORT);
    let gue = |n: usize| 14 + 20 + 8 + n;
    let (pkt, want_action, want_len) = match path {
        "pass_through" => {
            // TCP to a port with no service: the common case on a busy edge.
            let p = packet::syn_v4(CLIENT_V4, SocketAddrV4::new(SERVICE_V4, 8080), 1000);
            let n = p.len();
            (p, action::PASS, n)
        }
        "local_established" => {
            // An ACK of a flow admitted locally (flow entry says local).
            let mut conf = steer_service(1_000_000_000, 1_000_000_000, 13);
            conf.ring_size = redirector_ebpf::DEFAULT_RING_SIZE;
            h.set_service_conf(0, conf)?;
            let r = h.run(&packet::syn_v4(CLIENT_V4, svc, 2000))?;
            ensure!(r.action == action::PASS, "local SYN: action {}", r.action);
            h.set_service_conf(0, steer_service(0, 0, redirector_ebpf::DEFAULT_RING_SIZE))?;
            let p = packet::ack_v4(CLIENT_V4, svc, 2000);
            let n = p.len();
            (p, action::PASS, n)
        }
        "syn_steered" => {
            // The same SYN again and again: flow-table hit, encapsulation, MSS clamp.
            let p = packet::syn_v4(CLIENT_V4, svc, 3000);
            let n = gue(p.len() - 14);
            (p, action::TX, n)
        }
        "syn_steered_distinct" => return time_distinct_syns(h, calls),
        "steered_established" => {
            let r = h.run(&packet::syn_v4(CLIENT_V4, svc, 4000))?;
            ensure!(r.action == action::TX, "steered SYN: action {}", r.action);
            let p = packet::ack_v4(CLIENT_V4, svc, 4000);
            let n = gue(p.len() - 14);
            (p, action::TX, n)
        }
        "decap" => {
            let inner = packet::syn_v4_packet(CLIENT_V4, svc, 5000);
            let p = Ip::new(v4(addrs::PEER_A_V4), v4(addrs::EDGE_V4))
                .gue(50_000, DEFAULT_GUE_PORT, &inner)
                .frame();
            (p, action::PASS, 14 + inner.bytes().len())
        }
        other => bail!("unknown path {other}"),
    };
    if std::env::var_os("P2PCDN_BENCH_PROBE").is_some() && want_action == action::PASS {
        let (a, d) = h.run_repeat(&pkt, 1_000_000)?;
        eprintln!(
            "probe {path}: repeat 1e6 -> action {a}, {} ns/iteration",
            d.as_nanos()
        );
    }
    let mut total_ns = 0u128;
    for i in 0..calls {
        let r = h.run(&pkt)?;
        if r.action != want_action || r.out.len() != want_len {
            bail!(
                "{path}: call {i} returned action {} with {} bytes, expected {want_action} with \
                 {want_len}: the path changed",
                r.action,
                r.out.len()
            );
        }
        total_ns += r.duration.as_nanos();
    }
    Ok(total_ns as f64 / f64::from(calls))
}

/// A new 5-tuple for every SYN: Maglev lookup, peer bucket, flow-table insert, encapsulation.
fn time_distinct_syns(h: &mut Harness, calls: u32) -> Result<f64> {
    let svc = SocketAddrV4::new(SERVICE_V4, PORT);
    let mut total_ns = 0u128;
    for i in 0..calls {
        // 65,000 ports per client address, a new client address after that.
        let client = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i / 65_000);
        let sport = 1024 + (i % 65_000) as u16;
        let pkt = packet::syn_v4(client, svc, sport);
        let r = h.run(&pkt)?;
        if r.action != action::TX || r.out.len() != pkt.len() + 28 {
            bail!(
                "syn_steered_distinct: call {i} returned action {} with {} bytes: the path \
                 changed",
                r.action,
                r.out.len()
            );
        }
        total_ns += r.duration.as_nanos();
    }
    Ok(total_ns as f64 / f64::from(calls))
}

/// The floor: an XDP program that only returns XDP_PASS (two instructions), loaded with a raw
/// bpf() call because it is not part of the product's object file.
struct FloorProgram {
    fd: OwnedFd,
}

impl FloorProgram {
    fn load() -> Result<Self> {
        // r0 = XDP_PASS (2); exit
        let insns: [u64; 2] = [
            0x0000_0002_0000_00b7, // BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm 2
            0x0000_0000_0000_0095, // BPF_JMP | BPF_EXIT
        ];
        let license = c"GPL";
        let mut attr = [0u8; 128];
        put_u32(&mut attr, 0, 6); // prog_type = BPF_PROG_TYPE_XDP
        put_u32(&mut attr, 4, 2); // insn_cnt
        put_u64(&mut attr, 8, insns.as_ptr() as u64);
        put_u64(&mut attr, 16, license.as_ptr() as u64);
        let fd = bpf(5, &mut attr).context("loading the floor program (BPF_PROG_LOAD)")?; // BPF_PROG_LOAD
        // SAFETY: the kernel returned a new fd we own.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Mean kernel-reported ns per repeat = 1 call over `calls` calls, with the same packet
    /// size class and the same context (ingress interface) as the paths.
    fn time(&self, calls: u32, ingress: u32) -> Result<f64> {
        let pkt = packet::syn_v4(CLIENT_V4, SocketAddrV4::new(SERVICE_V4, PORT), 1);
        let mut out = vec![0u8; pkt.len() + 256];
        // struct xdp_md with data_end = size and ingress_ifindex, as `Harness::run` sends.
        let mut md = [0u8; 24];
        md[4..8].copy_from_slice(&(pkt.len() as u32).to_ne_bytes());
        md[12..16].copy_from_slice(&ingress.to_ne_bytes());
        let mut total = 0u128;
        for _ in 0..calls {
            let mut attr = [0u8; 128];
            // struct bpf_attr.test: prog_fd, retval, data_size_in, data_size_out, data_in,
            // data_out, repeat, duration, ...
            put_u32(&mut attr, 0, self.fd.as_raw_fd() as u32);
            put_u32(&mut attr, 8, pkt.len() as u32);
            put_u32(&mut attr, 12, out.len() as u32);
            put_u64(&mut attr, 16, pkt.as_ptr() as u64);
            put_u64(&mut attr, 24, out.as_mut_ptr() as u64);
            put_u32(&mut attr, 32, 1);
            put_u32(&mut attr, 40, md.len() as u32); // ctx_size_in
            put_u64(&mut attr, 48, md.as_ptr() as u64); // ctx_in
            bpf(10, &mut attr).context("BPF_PROG_TEST_RUN of the floor program")?; // BPF_PROG_TEST_RUN
            let retval = u32::from_ne_bytes([attr[4], attr[5], attr[6], attr[7]]);
            ensure!(retval == action::PASS, "floor program returned {retval}");
            total += u128::from(u32::from_ne_bytes([attr[36], attr[37], attr[38], attr[39]]));
        }
        Ok(total as f64 / f64::from(calls))
    }
}

fn put_u32(a: &mut [u8], off: usize, v: u32) {
    a[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(a: &mut [u8], off: usize, v: u64) {
    a[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> Result<i32> {
    // SAFETY: `attr` is a zero-padded bpf_attr of the size we pass.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if rc < 0 {
        bail!("bpf({cmd}): {}", std::io::Error::last_os_error());
    }
    Ok(rc as i32)
}
