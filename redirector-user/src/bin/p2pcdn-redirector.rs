//! `p2pcdn-redirector`: attach the p2pcdn XDP program to an interface and program its maps.
//!
//! Human tables by default, `--json` for scripts. Exit codes: 0 ok, 1 runtime failure,
//! 2 bad usage, 64 bad input value (address, name, schema mismatch, unknown interface),
//! 77 missing privileges.

use std::{
    io::{self, Write as _},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum, error::ErrorKind};
use redirector_ebpf::{DEFAULT_GUE_PORT, DEFAULT_RING_SIZE};
use redirector_user::{
    AttachMode, AttachOptions, AttachOutcome, ConfigSpec, DEFAULT_PIN_ROOT, Dataplane,
    DecapCounters, Encap, Error, PeerInfo, PeerServices, PeerSpec, Redirector, ServiceInfo,
    ServiceMode, ServiceSpec, Stats, parse_ip, parse_service_addr, privilege, stats::rate,
};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(
    name = "p2pcdn-redirector",
    version,
    about = "Attach the p2pcdn XDP redirector to an interface and program its maps",
    after_help = "Inside a network namespace, run it with `nsenter --net=/run/netns/NAME \
                  p2pcdn-redirector ...` (not `ip netns exec`, which hides /sys/fs/bpf)."
)]
struct Cli {
    /// Network interface (in the caller's network namespace).
    #[arg(short, long, global = true, value_name = "IFACE")]
    iface: Option<String>,
    /// Directory of the pinned state (kept in DIR/IFACE/).
    #[arg(long, global = true, value_name = "DIR", default_value = DEFAULT_PIN_ROOT)]
    pin_root: PathBuf,
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Load and attach the program, pinning program, link and maps.
    Attach {
        #[arg(long, value_enum, default_value_t = ModeArg::Auto)]
        mode: ModeArg,
        /// Flow-table size (when the maps are created).
        #[arg(long, value_name = "N")]
        flow_capacity: Option<u32>,
        /// Flood-guard table size (when the maps are created).
        #[arg(long, value_name = "N")]
        guard_capacity: Option<u32>,
        /// If attached already, replace the program atomically, keeping the maps.
        #[arg(long)]
        upgrade: bool,
    },
    /// Detach and remove the pins (maps too unless --keep-maps).
    Detach {
        #[arg(long)]
        keep_maps: bool,
    },
    /// Whether it is attached, mode, program id, schema version, counts.
    Status,
    /// Show node settings, or change the ones given.
    Config {
        /// Local IPv4 decapsulation address (peer role), or `none`.
        #[arg(long, value_name = "ADDR")]
        decap_v4: Option<String>,
        /// Local IPv6 decapsulation address (peer role), or `none`.
        #[arg(long, value_name = "ADDR")]
        decap_v6: Option<String>,
        /// UDP port on which this node accepts GUE.
        #[arg(long, value_name = "P")]
        gue_port: Option<u16>,
        /// New flow-table entries per CPU per second (0: no ceiling).
        #[arg(long, value_name = "N")]
        flow_ceiling: Option<u32>,
    },
    /// Services: the addresses whose overflow is steered.
    Service {
        #[command(subcommand)]
        command: ServiceCommand,
    },
    /// Peers: the servers that take steered connections.
    Peer {
        #[command(subcommand)]
        command: PeerCommand,
    },
    /// The senders allowed to tunnel to this node.
    Decap {
        #[command(subcommand)]
        command: DecapCommand,
    },
    /// Counters summed across CPUs.
    Stats {
        /// Refresh every SECS seconds (default 1) with rates per second, until Ctrl-C.
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "1")]
        watch: Option<f64>,
    },
}

#[derive(Subcommand, Debug)]
enum ServiceCommand {
    /// Add a service, or update the one with this name.
    Add {
        #[arg(long)]
        name: String,
        /// ADDR:PORT, or [ADDR]:PORT for IPv6; repeat for several.
        #[arg(long = "addr", value_name = "ADDR:PORT", required = true)]
        addrs: Vec<String>,
        #[arg(long, value_enum, default_value_t = ServiceModeArg::Steer)]
        mode: ServiceModeArg,
        /// New connections per second served locally.
        #[arg(long, value_name = "CONN_PER_S")]
        rate: u32,
        /// Connections admitted at once (default: rate/10, at least 1).
        #[arg(long, value_name = "N")]
        burst: Option<u32>,
        /// Per-source (IPv4 /32, IPv6 /64) new connections per second (default: no guard).
        #[arg(long, value_name = "N")]
        guard_rate: Option<u32>,
        /// Per-source burst (default: guard rate/10, at least 1).
        #[arg(long, value_name = "N")]
        guard_burst: Option<u32>,
        /// Maglev ring size, a prime no larger than 65537.
        #[arg(long, value_name = "PRIME", default_value_t = DEFAULT_RING_SIZE)]
        ring_size: u32,
    },
    /// Remove a service.
    Remove {
        #[arg(long)]
        name: String,
    },
    /// List services.
    List,
}

#[derive(Subcommand, Debug)]
enum PeerCommand {
    /// Create a peer, or update the one with this name (omitted options take their
    /// defaults).
    Set {
        #[arg(long)]
        name: String,
        /// The peer's decapsulation address.
        #[arg(long, value_name = "ADDR")]
        addr: String,
        /// Outer source address (default: the interface's own address of that family).
        #[arg(long, value_name = "ADDR")]
        src: Option<String>,
        #[arg(long, value_enum, default_value_t = EncapArg::Gue)]
        encap: EncapArg,
        #[arg(long, value_name = "P", default_value_t = DEFAULT_GUE_PORT)]
        gue_port: u16,
        /// Maglev weight (0: no new connections).
        #[arg(long, value_name = "W", default_value_t = 1)]
        weight: u32,
        /// Negotiated new connections per second (default: no limit).
        #[arg(long, value_name = "CONN_PER_S")]
        rate: Option<u32>,
        /// Connections at once (default: rate/10, at least 1).
        #[arg(long, value_name = "N")]
        burst: Option<u32>,
        /// MTU of the path to the peer (steered SYNs get their MSS clamped to fit).
        #[arg(long, value_name = "M", default_value_t = 1500)]
        mtu: u16,
        /// `all`, or a comma-separated list of service names.
        #[arg(long, value_name = "a,b|all", default_value = "all")]
        services: String,
    },
    /// Remove a peer: its flows are removed and it gets no new connections.
    Remove {
        #[arg(long)]
        name: String,
    },
    /// List peers.
    List,
}

#[derive(Subcommand, Debug)]
enum DecapCommand {
    /// Accept tunnels from ADDR.
    Allow { addr: String },
    /// Stop accepting tunnels from ADDR.
    Deny { addr: String },
    /// List allowed senders with the packets and bytes decapsulated from each.
    List,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeArg {
    Auto,
    Driver,
    Skb,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ServiceModeArg {
    Steer,
    Off,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum EncapArg {
    Gue,
    Ipip,
}

fn main() -> ExitCode {
    env_logger::Builder::new()
        .filter_level(log::LevelFilter::Warn)
        .parse_env("P2PCDN_LOG")
        .format(|buf, record| {
            writeln!(
                buf,
                "p2pcdn-redirector: {}: {}",
                record.level().as_str().to_lowercase(),
                record.args()
            )
        })
        .init();
    let cli = Cli::parse();
    let Some(iface) = cli.iface.clone() else {
        Cli::command()
            .error(
                ErrorKind::MissingRequiredArgument,
                "the interface is required: -i/--iface IFACE",
            )
            .exit()
    };
    match run(&cli, &iface) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error)
            if error
                .downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe) =>
        {
            // The reader went away (`| head`): not a failure of ours.
            ExitCode::SUCCESS
        }
        Err(error) => {
            let lib = error.downcast_ref::<Error>();
            eprintln!("p2pcdn-redirector: {error}");
            if let Some(log) = lib.and_then(Error::verifier_log) {
                eprintln!("{log}");
            }
            ExitCode::from(match lib {
                Some(Error::MissingPrivilege { .. }) => 77,
                Some(e) if e.is_bad_input() => 64,
                _ => 1,
            })
        }
    }
}

/// Prints `value` as JSON, or `human` as text.
fn emit<T: Serialize>(json: bool, value: &T, human: impl FnOnce() -> String) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, value)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", human())?;
    }
    out.flush()?;
    Ok(())
}

fn run(cli: &Cli, iface: &str) -> anyhow::Result<()> {
    redirector_user::validate_iface(iface)?;
    privilege::require()?;
    let root = cli.pin_root.as_path();
    match &cli.command {
        Command::Attach {
            mode,
            flow_capacity,
            guard_capacity,
            upgrade,
        } => {
            let options = AttachOptions {
                pin_root: cli.pin_root.clone(),
                mode: match mode {
                    ModeArg::Auto => AttachMode::Auto,
                    ModeArg::Driver => AttachMode::Driver,
                    ModeArg::Skb => AttachMode::Skb,
                },
                flow_capacity: *flow_capacity,
                guard_capacity: *guard_capacity,
                upgrade: *upgrade,
                enable_forwarding: true,
            };
            let r = Redirector::attach(iface, &options)?;
            let report = r
                .attach_report()
                .ok_or_else(|| anyhow!("attach returned no report"))?;
            emit(cli.json, report, || {
                let mut text = String::new();
                if let Some(dir) = &report.mounted_bpffs {
                    text += &format!("mounted bpffs on {}\n", dir.display());
                }
                if let Some(reason) = &report.driver_error {
                    text += &format!("warning: driver mode failed ({reason}); using skb mode\n");
                }
                let mode = report
                    .mode
                    .map_or_else(|| "unknown".to_owned(), |m| m.to_string());
                let prog = report
                    .program_id
                    .map_or_else(String::new, |id| format!(", program id {id}"));
                let dir = r
                    .pin_dir()
                    .map(|d| d.display().to_string())
                    .unwrap_or_default();
                text += &match report.outcome {
                    AttachOutcome::Attached => format!(
                        "attached to {iface} in {mode} mode{prog}; pinned in {dir}{}\n",
                        if report.reused_maps {
                            " (existing maps reused)"
                        } else {
                            ""
                        }
                    ),
                    AttachOutcome::AlreadyAttached => format!(
                        "already attached to {iface} ({mode} mode{prog}); nothing changed \
                         (--upgrade replaces the program)\n"
                    ),
                    AttachOutcome::Upgraded => {
                        format!("upgraded the program on {iface} ({mode} mode{prog}); maps kept\n")
                    }
                };
                if report.capacity_ignored {
                    text += "warning: existing maps kept their sizes; --flow-capacity and \
                             --guard-capacity apply when the maps are created\n";
                }
                for sysctl in &report.forwarding_enabled {
                    text += &format!("enabled {sysctl} (bpf_fib_lookup needs it)\n");
                }
                text
            })
        }
        Command::Detach { keep_maps } => {
            let report = Redirector::detach(iface, root, *keep_maps)?;
            emit(cli.json, &report, || {
                let mut text = if report.link_removed {
                    format!("detached from {iface}")
                } else {
                    format!("{iface} had no link pin")
                };
                if report.maps_kept {
                    text += &format!(
                        "; maps kept in {}",
                        redirector_user::pin_dir(root, iface).display()
                    );
                } else {
                    text += &format!("; removed {} map pins", report.maps_removed);
                }
                text += "\n";
                if report.still_attached {
                    text += "warning: the program is still attached: another process holds \
                             its link\n";
                }
                text
            })
        }
        Command::Status => status(cli, iface),
        Command::Config {
            decap_v4,
            decap_v6,
            gue_port,
            flow_ceiling,
        } => {
            let v4 = decap_v4
                .as_deref()
                .map(
                    |text| match optional_ip("IPv4 decapsulation address", text)? {
                        None => Ok(None),
                        Some(IpAddr::V4(v4)) => Ok(Some(v4)),
                        Some(other) => Err(Error::invalid(
                            "IPv4 decapsulation address",
                            other,
                            "not an IPv4 address",
                        )),
                    },
                )
                .transpose()?;
            let v6 = decap_v6
                .as_deref()
                .map(
                    |text| match optional_ip("IPv6 decapsulation address", text)? {
                        None => Ok(None),
                        Some(IpAddr::V6(v6)) => Ok(Some(v6)),
                        Some(other) => Err(Error::invalid(
                            "IPv6 decapsulation address",
                            other,
                            "not an IPv6 address",
                        )),
                    },
                )
                .transpose()?;
            let mut r = Redirector::open(iface, root)?;
            let mut config = r.config()?;
            let changing = decap_v4.is_some()
                || decap_v6.is_some()
                || gue_port.is_some()
                || flow_ceiling.is_some();
            if let Some(v4) = v4 {
                config.decap_v4 = v4;
            }
            if let Some(v6) = v6 {
                config.decap_v6 = v6;
            }
            if let Some(port) = gue_port {
                config.gue_port = *port;
            }
            if let Some(n) = flow_ceiling {
                config.flow_ceiling = *n;
            }
            if changing {
                r.set_config(&config)?;
            }
            emit(cli.json, &config, || config_text(&config))
        }
        Command::Service { command } => service(cli, iface, command),
        Command::Peer { command } => peer(cli, iface, command),
        Command::Decap { command } => {
            let open = || Redirector::open(iface, root);
            match command {
                DecapCommand::Allow { addr } => {
                    let addr = parse_ip("sender address", addr)?;
                    let added = open()?.allow_decap(addr)?;
                    emit(
                        cli.json,
                        &serde_json::json!({"addr": addr, "added": added}),
                        || {
                            if added {
                                format!("tunnels from {addr} are accepted\n")
                            } else {
                                format!("tunnels from {addr} were already accepted\n")
                            }
                        },
                    )
                }
                DecapCommand::Deny { addr } => {
                    let addr = parse_ip("sender address", addr)?;
                    let removed = open()?.deny_decap(addr)?;
                    emit(
                        cli.json,
                        &serde_json::json!({"addr": addr, "removed": removed}),
                        || {
                            if removed {
                                format!("tunnels from {addr} are dropped\n")
                            } else {
                                format!("{addr} was not on the allow-list\n")
                            }
                        },
                    )
                }
                DecapCommand::List => {
                    let list = open()?.decap_stats()?;
                    emit(cli.json, &list, || {
                        if list.is_empty() {
                            return "no sender is allowed to tunnel to this node\n".to_owned();
                        }
                        decap_table(&list, None)
                    })
                }
            }
        }
        Command::Stats { watch: None } => {
            let stats = Redirector::open(iface, root)?.stats()?;
            emit(cli.json, &stats, || stats_text(&stats, None))
        }
        Command::Stats { watch: Some(secs) } => watch(cli, iface, *secs),
    }
}

/// `none`/`off` or an address.
fn optional_ip(what: &'static str, text: &str) -> Result<Option<IpAddr>, Error> {
    if matches!(text, "none" | "off") {
        return Ok(None);
    }
    Ok(Some(parse_ip(what, text)?))
}

fn status(cli: &Cli, iface: &str) -> anyhow::Result<()> {
    let r = match Redirector::open(iface, &cli.pin_root) {
        Ok(r) => r,
        Err(Error::NotAttached { dir, .. }) => {
            return emit(
                cli.json,
                &serde_json::json!({"iface": iface, "attached": false, "pin_dir": dir}),
                || {
                    format!(
                        "p2pcdn is not attached to {iface} (nothing pinned in {})\n",
                        dir.display()
                    )
                },
            );
        }
        Err(e) => return Err(e.into()),
    };
    let s = r.status()?;
    emit(cli.json, &s, || {
        let opt = |v: Option<u32>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
        let attached = match (s.attached, s.mode) {
            (true, Some(mode)) => format!("yes ({mode} mode)"),
            (true, None) => "yes (link pinned; interface not visible here)".to_owned(),
            (false, _) => "no (pinned maps only)".to_owned(),
        };
        table(
            &[],
            vec![
                vec!["interface".into(), iface.to_owned()],
                vec!["attached".into(), attached],
                vec!["program id".into(), opt(s.program_id)],
                vec!["link id".into(), opt(s.link_id)],
                vec![
                    "pin dir".into(),
                    s.pin_dir
                        .as_ref()
                        .map(|d| d.display().to_string())
                        .unwrap_or_default(),
                ],
                vec!["schema version".into(), s.schema_version.to_string()],
                vec!["services".into(), s.services.to_string()],
                vec!["peers".into(), s.peers.to_string()],
                vec!["decap senders".into(), s.decap_allowed.to_string()],
                vec![
                    "flows".into(),
                    format!("{} of {}", s.flows, s.flow_capacity),
                ],
                vec!["guard capacity".into(), s.guard_capacity.to_string()],
            ],
        )
    })
}

fn service(cli: &Cli, iface: &str, command: &ServiceCommand) -> anyhow::Result<()> {
    let open = || Redirector::open(iface, &cli.pin_root);
    match command {
        ServiceCommand::Add {
            name,
            addrs,
            mode,
            rate,
            burst,
            guard_rate,
            guard_burst,
            ring_size,
        } => {
            let addrs = addrs
                .iter()
                .map(|a| parse_service_addr(a))
                .collect::<Result<Vec<SocketAddr>, Error>>()?;
            let spec = ServiceSpec {
                name: name.clone(),
                addrs,
                mode: match mode {
                    ServiceModeArg::Steer => ServiceMode::Steer,
                    ServiceModeArg::Off => ServiceMode::Off,
                },
                rate: *rate,
                burst: *burst,
                guard_rate: *guard_rate,
                guard_burst: *guard_burst,
                ring_size: *ring_size,
            };
            spec.validate()?;
            let mut r = open()?;
            let existed = r.services()?.iter().any(|s| s.name == *name);
            let id = r.upsert_service(&spec)?;
            let info = r
                .services()?
                .into_iter()
                .find(|s| s.id == id)
                .ok_or_else(|| anyhow!("service {name} vanished"))?;
            emit(cli.json, &info, || {
                format!(
                    "{} service {name} (id {id}): {}\n",
                    if existed { "updated" } else { "added" },
                    service_summary(&info)
                )
            })
        }
        ServiceCommand::Remove { name } => {
            open()?.remove_service(name)?;
            emit(cli.json, &serde_json::json!({"removed": name}), || {
                format!("removed service {name}\n")
            })
        }
        ServiceCommand::List => {
            let list = open()?.services()?;
            emit(cli.json, &list, || services_text(&list))
        }
    }
}

fn service_summary(s: &ServiceInfo) -> String {
    let addrs: Vec<String> = s.addrs.iter().map(SocketAddr::to_string).collect();
    format!(
        "{}, {} conn/s locally (burst {}), {}, ring {}, peers: {}",
        addrs.join(" "),
        s.rate,
        s.burst,
        s.mode,
        s.ring_size,
        if s.peers.is_empty() {
            "none".to_owned()
        } else {
            s.peers.join(",")
        }
    )
}

fn services_text(list: &[ServiceInfo]) -> String {
    if list.is_empty() {
        return "no services\n".to_owned();
    }
    table(
        &[
            "ID",
            "NAME",
            "MODE",
            "RATE",
            "BURST",
            "GUARD",
            "RING",
            "PEERS",
            "ADDRESSES",
        ],
        list.iter()
            .map(|s| {
                vec![
                    s.id.to_string(),
                    s.name.clone(),
                    s.mode.to_string(),
                    s.rate.to_string(),
                    s.burst.to_string(),
                    match (s.guard_rate, s.guard_burst) {
                        (Some(r), Some(b)) => format!("{r}/s burst {b}"),
                        _ => "-".to_owned(),
                    },
                    s.ring_size.to_string(),
                    if s.peers.is_empty() {
                        "-".to_owned()
                    } else {
                        s.peers.join(",")
                    },
                    s.addrs
                        .iter()
                        .map(SocketAddr::to_string)
                        .collect::<Vec<_>>()
                        .join(" "),
                ]
            })
            .collect(),
    )
}

fn peer(cli: &Cli, iface: &str, command: &PeerCommand) -> anyhow::Result<()> {
    let open = || Redirector::open(iface, &cli.pin_root);
    match command {
        PeerCommand::Set {
            name,
            addr,
            src,
            encap,
            gue_port,
            weight,
            rate,
            burst,
            mtu,
            services,
        } => {
            let spec = PeerSpec {
                name: name.clone(),
                addr: parse_ip("peer address", addr)?,
                src: src
                    .as_deref()
                    .map(|s| parse_ip("source address", s))
                    .transpose()?,
                encap: match encap {
                    EncapArg::Gue => Encap::Gue,
                    EncapArg::Ipip => Encap::Ipip,
                },
                gue_port: *gue_port,
                weight: *weight,
                rate: *rate,
                burst: *burst,
                mtu: *mtu,
                services: services.parse::<PeerServices>()?,
            };
            spec.validate()?;
            let mut r = open()?;
            let existed = r.peers()?.iter().any(|p| p.name == *name);
            let slot = r.set_peer(&spec)?;
            let info = r
                .peers()?
                .into_iter()
                .find(|p| p.slot == slot)
                .ok_or_else(|| anyhow!("peer {name} vanished"))?;
            emit(cli.json, &info, || {
                format!(
                    "{} peer {name} (slot {slot}): {} from {} over {}, weight {}, {}\n",
                    if existed { "updated" } else { "added" },
                    info.addr,
                    info.src,
                    info.encap,
                    info.weight,
                    info.rate
                        .map_or_else(|| "no rate limit".to_owned(), |r| format!("{r} conn/s"))
                )
            })
        }
        PeerCommand::Remove { name } => {
            open()?.remove_peer(name)?;
            emit(cli.json, &serde_json::json!({"removed": name}), || {
                format!("removed peer {name}; its flows were dropped from the flow table\n")
            })
        }
        PeerCommand::List => {
            let list = open()?.peers()?;
            emit(cli.json, &list, || peers_text(&list))
        }
    }
}

fn peers_text(list: &[PeerInfo]) -> String {
    if list.is_empty() {
        return "no peers\n".to_owned();
    }
    table(
        &[
            "SLOT", "NAME", "ADDRESS", "SOURCE", "ENCAP", "WEIGHT", "RATE", "BURST", "MTU",
            "SERVICES", "GEN",
        ],
        list.iter()
            .map(|p| {
                vec![
                    p.slot.to_string(),
                    p.name.clone(),
                    p.addr.to_string(),
                    p.src.to_string(),
                    if p.encap == Encap::Gue {
                        format!("gue:{}", p.gue_port)
                    } else {
                        "ipip".to_owned()
                    },
                    p.weight.to_string(),
                    p.rate
                        .map_or_else(|| "unlimited".to_owned(), |r| r.to_string()),
                    p.burst.to_string(),
                    p.mtu.to_string(),
                    match &p.services {
                        PeerServices::All => "all".to_owned(),
                        PeerServices::Only(names) if names.is_empty() => "-".to_owned(),
                        PeerServices::Only(names) => names.join(","),
                    },
                    p.generation.to_string(),
                ]
            })
            .collect(),
    )
}

fn config_text(c: &ConfigSpec) -> String {
    table(
        &[],
        vec![
            vec![
                "decap-v4".into(),
                c.decap_v4.map_or_else(|| "none".into(), |a| a.to_string()),
            ],
            vec![
                "decap-v6".into(),
                c.decap_v6.map_or_else(|| "none".into(), |a| a.to_string()),
            ],
            vec!["gue-port".into(), c.gue_port.to_string()],
            vec![
                "flow-ceiling".into(),
                if c.flow_ceiling == 0 {
                    "none".into()
                } else {
                    format!("{} new flows/s per CPU", c.flow_ceiling)
                },
            ],
        ],
    )
}

/// Left-aligned columns separated by two spaces (no header row when `headers` is empty).
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let columns = rows
        .iter()
        .map(Vec::len)
        .chain([headers.len()])
        .max()
        .unwrap_or(0);
    let mut widths = vec![0usize; columns];
    for (i, h) in headers.iter().enumerate() {
        widths[i] = widths[i].max(h.len());
    }
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, cell) in cells.enumerate() {
            if i > 0 {
                text += "  ";
            }
            text += &format!("{cell:<width$}", width = widths[i]);
        }
        out += text.trim_end();
        out += "\n";
    };
    if !headers.is_empty() {
        line(&mut headers.iter().copied());
    }
    for row in &rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// Allowed senders with what was decapsulated from each, and rates per second against
/// `before` (taken `secs` earlier) when given.
fn decap_table(now: &[DecapCounters], before: Option<(&Stats, f64)>) -> String {
    let per_sec = |addr: IpAddr, pick: fn(&DecapCounters) -> u64, value: u64| {
        before
            .and_then(|(b, secs)| {
                b.decap_from(addr)
                    .map(|d| format!("{value} ({:.0}/s)", rate(pick(d), value, secs)))
            })
            .unwrap_or_else(|| value.to_string())
    };
    table(
        &["SENDER", "PACKETS", "BYTES"],
        now.iter()
            .map(|d| {
                vec![
                    d.addr.to_string(),
                    per_sec(d.addr, |c| c.packets, d.packets),
                    per_sec(d.addr, |c| c.bytes, d.bytes),
                ]
            })
            .collect(),
    )
}

/// Counters, and rates per second against `before` (taken `secs` earlier) when given.
fn stats_text(now: &Stats, before: Option<(&Stats, f64)>) -> String {
    let g = &now.global;
    let mut text = table(
        &[
            "UNPARSED",
            "DECAP PKTS",
            "DECAP BYTES",
            "DECAP DENIED",
            "FIB NO NEIGH",
            "FIB FAILED",
            "ENCAP FAILED",
            "STALE PEER",
        ],
        vec![
            [
                g.unparsed,
                g.decap_pkts,
                g.decap_bytes,
                g.decap_denied,
                g.fib_no_neigh,
                g.fib_failed,
                g.encap_failed,
                g.stale_peer,
            ]
            .iter()
            .map(u64::to_string)
            .collect(),
        ],
    );
    text += "\n";
    if now.services.is_empty() {
        text += "no services\n";
    } else {
        let per_sec = |name: &str,
                       id: u32,
                       pick: fn(&redirector_user::ServiceCounters) -> u64,
                       value: u64| {
            before
                .and_then(|(b, secs)| {
                    b.services
                        .iter()
                        .find(|s| s.name == name && s.id == id)
                        .map(|s| format!("{value} ({:.0}/s)", rate(pick(s), value, secs)))
                })
                .unwrap_or_else(|| value.to_string())
        };
        text += &table(
            &[
                "SERVICE",
                "ID",
                "SYN LOCAL",
                "SYN STEERED",
                "KEPT LOCAL",
                "PKTS LOCAL",
                "BYTES LOCAL",
                "PKTS STEERED",
                "BYTES STEERED",
                "FLOW MISSES",
                "GUARD DROPS",
                "CEILING HITS",
            ],
            now.services
                .iter()
                .map(|s| {
                    vec![
                        s.name.clone(),
                        s.id.to_string(),
                        per_sec(&s.name, s.id, |c| c.syn_local, s.syn_local),
                        per_sec(&s.name, s.id, |c| c.syn_steered, s.syn_steered),
                        per_sec(&s.name, s.id, |c| c.kept_local, s.kept_local),
                        per_sec(&s.name, s.id, |c| c.pkts_local, s.pkts_local),
                        per_sec(&s.name, s.id, |c| c.bytes_local, s.bytes_local),
                        per_sec(&s.name, s.id, |c| c.pkts_steered, s.pkts_steered),
                        per_sec(&s.name, s.id, |c| c.bytes_steered, s.bytes_steered),
                        per_sec(&s.name, s.id, |c| c.flow_misses, s.flow_misses),
                        per_sec(&s.name, s.id, |c| c.guard_drops, s.guard_drops),
                        s.ceiling_hits.to_string(),
                    ]
                })
                .collect(),
        );
    }
    text += "\n";
    if now.peers.is_empty() {
        text += "no peers\n";
    } else {
        let per_sec =
            |name: &str, slot: u32, pick: fn(&redirector_user::PeerCounters) -> u64, value: u64| {
                before
                    .and_then(|(b, secs)| {
                        b.peers
                            .iter()
                            .find(|p| p.name == name && p.slot == slot)
                            .map(|p| format!("{value} ({:.0}/s)", rate(pick(p), value, secs)))
                    })
                    .unwrap_or_else(|| value.to_string())
            };
        text += &table(
            &[
                "PEER",
                "SLOT",
                "CONNECTIONS",
                "PACKETS",
                "BYTES",
                "NO TOKEN",
            ],
            now.peers
                .iter()
                .map(|p| {
                    vec![
                        p.name.clone(),
                        p.slot.to_string(),
                        per_sec(&p.name, p.slot, |c| c.connections, p.connections),
                        per_sec(&p.name, p.slot, |c| c.packets, p.packets),
                        per_sec(&p.name, p.slot, |c| c.bytes, p.bytes),
                        per_sec(&p.name, p.slot, |c| c.no_token, p.no_token),
                    ]
                })
                .collect(),
        );
    }
    text += "\n";
    if now.decap.is_empty() {
        text += "no decap senders\n";
    } else {
        text += &decap_table(&now.decap, before);
    }
    text
}

/// `stats --watch`: re-reads the pinned maps every `secs` seconds until Ctrl-C.
fn watch(cli: &Cli, iface: &str, secs: f64) -> anyhow::Result<()> {
    if !(0.1..=3600.0).contains(&secs) {
        return Err(Error::invalid(
            "watch interval",
            secs,
            "must be between 0.1 and 3600 seconds",
        )
        .into());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("cannot install the Ctrl-C handler")?;
    let interval = Duration::from_secs_f64(secs);
    let mut previous: Option<(Stats, Instant)> = None;
    while !stop.load(Ordering::SeqCst) {
        // Re-open every round: services and peers may change while we watch.
        let stats = Redirector::open(iface, &cli.pin_root)?.stats()?;
        let now = Instant::now();
        let mut out = io::stdout().lock();
        if cli.json {
            serde_json::to_writer(&mut out, &stats)?;
            writeln!(out)?;
        } else {
            let before = previous
                .as_ref()
                .map(|(s, at)| (s, now.duration_since(*at).as_secs_f64()));
            write!(
                out,
                "\x1b[2J\x1b[H{iface}: every {secs}s, Ctrl-C to stop\n\n{}",
                stats_text(&stats, before)
            )?;
        }
        out.flush()?;
        drop(out);
        previous = Some((stats, now));
        // Sleep in short steps so Ctrl-C ends the watch promptly.
        let until = now + interval;
        while !stop.load(Ordering::SeqCst) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50).min(until - Instant::now()));
        }
    }
    Ok(())
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]
mod tests {
    use super::*;

    #[test]
    fn the_contract_parses() {
        let cli = Cli::try_parse_from([
            "p2pcdn-redirector",
            "-i",
            "eth0",
            "--json",
            "service",
            "add",
            "--name",
            "web",
            "--addr",
            "10.0.0.1:80",
            "--addr",
            "[2001:db8::1]:80",
            "--rate",
            "50",
        ])
        .unwrap();
        assert_eq!(cli.iface.as_deref(), Some("eth0"));
        assert!(cli.json);
        let Command::Service {
            command: ServiceCommand::Add {
                addrs, ring_size, ..
            },
        } = cli.command
        else {
            panic!("not service add");
        };
        assert_eq!(addrs.len(), 2);
        assert_eq!(ring_size, DEFAULT_RING_SIZE);

        let cli =
            Cli::try_parse_from(["p2pcdn-redirector", "stats", "-i", "eth0", "--watch"]).unwrap();
        assert!(matches!(cli.command, Command::Stats { watch: Some(s) } if s == 1.0));
        let cli =
            Cli::try_parse_from(["p2pcdn-redirector", "-i", "e", "stats", "--watch", "5"]).unwrap();
        assert!(matches!(cli.command, Command::Stats { watch: Some(s) } if s == 5.0));
        let cli = Cli::try_parse_from([
            "p2pcdn-redirector",
            "-i",
            "e",
            "peer",
            "set",
            "--name",
            "p",
            "--addr",
            "192.0.2.1",
            "--services",
            "a,b",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Peer {
                command: PeerCommand::Set { .. }
            }
        ));
        assert_eq!(cli.pin_root, PathBuf::from(DEFAULT_PIN_ROOT));
        assert!(
            Cli::try_parse_from([
                "p2pcdn-redirector",
                "-i",
                "e",
                "service",
                "add",
                "--name",
                "x"
            ])
            .is_err(),
            "--addr and --rate are required"
        );
    }

    #[test]
    fn tables_align_columns() {
        let text = table(
            &["A", "LONGER"],
            vec![
                vec!["xyz".into(), "1".into()],
                vec!["q".into(), "22".into()],
            ],
        );
        assert_eq!(text, "A    LONGER\nxyz  1\nq    22\n");
    }

    #[test]
    fn watched_stats_show_rates() {
        let mut before = Stats::default();
        before.services.push(redirector_user::ServiceCounters {
            name: "web".into(),
            syn_local: 100,
            ..Default::default()
        });
        let mut now = before.clone();
        now.services[0].syn_local = 300;
        let text = stats_text(&now, Some((&before, 2.0)));
        assert!(text.contains("300 (100/s)"), "{text}");
        assert!(stats_text(&now, None).contains("300"));
    }
}
