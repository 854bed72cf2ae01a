//! `cargo xtask bench surrogate`: requests/s and p99 latency of cached objects (10 KiB and
//! 1 MiB) served by the p2pcdn surrogate and by Debian's nginx, the same files, the same load
//! generator (wrk), one machine, loopback only. Writes `target/bench/surrogate.json`:
//! `{"10KiB": {"p2pcdn_rps", "nginx_rps", "p2pcdn_p99_ms", "nginx_p99_ms", …}, "1MiB": {…}}`.
//!
//! Set-up, as a peer runs it: a primary identity signs a manifest built from a document root
//! (`manifest::build_from_dir`), the surrogate opens it with the primary's key
//! (`manifest::open`) and serves the arrangement with the primary's host name (the DSR path:
//! tunnelled clients arrive with the primary's `Host`), pulling misses from an in-process
//! origin on 127.0.0.1 that serves the same files. nginx serves that document root itself.
//! Each object is pulled once through the surrogate (a miss), and every measured request must
//! then be a hit: the surrogate's usage counters must grow by the requests wrk made, with no
//! miss and no origin request.
//!
//! Fairness: nginx runs `worker_processes` = the number of CPUs (or `--workers`) and the
//! surrogate gets as many tokio worker threads; nginx has its usual static-file tuning
//! (sendfile, tcp_nopush, open_file_cache, no access log, reuseport, high keepalive_requests)
//! and the surrogate its production code path (the daemon's Prometheus recorder installed,
//! counters live). Both get the same wrk command line and `Host` header, a warm-up run, and
//! `--rounds` measured runs alternating which server goes first; the figures are the median
//! of the rounds. wrk shares the CPUs with the server under test in both cases.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use clap::{Parser, ValueEnum};
use p2pcdn_controller::{
    admin,
    identity::NodeIdentity,
    manifest::{self, BuildOptions},
    model::now_ms,
    surrogate::{Budgets, Surrogate, SurrogateConfig, Tenant, TenantUsage},
};
use p2pcdn_tests::{
    origin::{Origin, OriginConfig},
    wrk::{Errors, Load, Wrk, WrkResult},
};
use serde::Serialize;
use serde_json::{Map, Value, json};

/// The primary's service host name: what tunnelled (DSR) clients send as `Host`.
const HOST: &str = "www.primary.example";
const ARRANGEMENT: &str = "bench-arrangement";
const SERVICE: &str = "bench";
/// Objects of this size and more are "large": `--connections-large` applies.
const LARGE: u64 = 1 << 20;
/// Largest object accepted by `--sizes` (the surrogate keeps up to 1 MiB in memory by
/// default; larger objects are served from its disk tier).
const MAX_SIZE: u64 = 64 << 20;

#[derive(Parser)]
#[command(about = "Cached objects: the p2pcdn surrogate against Debian's nginx, same files, wrk")]
struct Args {
    /// Seconds of each measured wrk run.
    #[arg(long, default_value_t = 6)]
    duration_s: u64,
    /// Seconds of the unmeasured warm-up run of each server and size.
    #[arg(long, default_value_t = 2)]
    warmup_s: u64,
    /// Measured runs per server and size (alternating which server goes first); the
    /// figures are their median.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// wrk threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// wrk connections for objects under 1 MiB.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// wrk connections for objects of 1 MiB and more.
    #[arg(long, default_value_t = 16)]
    connections_large: usize,
    /// wrk's per-request time-out, seconds.
    #[arg(long, default_value_t = 10)]
    timeout_s: u64,
    /// nginx worker processes and surrogate worker threads (default: the number of CPUs).
    #[arg(long)]
    workers: Option<usize>,
    /// Object sizes, comma-separated, each `<n>B`, `<n>KiB` or `<n>MiB`.
    #[arg(long, value_delimiter = ',', default_value = "10KiB,1MiB", value_parser = parse_size)]
    sizes: Vec<Size>,
    /// How clients address the surrogate: `host` (the primary's host name in `Host`, as
    /// tunnelled DSR clients do) or `primary` (`/<primary-id>/<path>`, redirect mode).
    #[arg(long, value_enum, default_value_t = Route::Host)]
    route: Route,
    #[arg(long, default_value = "nginx")]
    nginx: PathBuf,
    #[arg(long, default_value = "wrk")]
    wrk: PathBuf,
    /// Output file (default: <workspace>/target/bench/surrogate.json).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Route {
    Host,
    Primary,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Size {
    /// As given: the JSON key (`10KiB`).
    name: String,
    bytes: u64,
}

fn parse_size(text: &str) -> Result<Size, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?}: expected a number then B, KiB or MiB"))?;
    let scale = match unit {
        "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        _ => return Err(format!("{text:?}: the unit must be B, KiB or MiB")),
    };
    let bytes = n
        .checked_mul(scale)
        .filter(|b| (1..=MAX_SIZE).contains(b))
        .ok_or_else(|| format!("{text:?}: sizes go from 1 B to {} MiB", MAX_SIZE >> 20))?;
    Ok(Size {
        name: text.to_owned(),
        bytes,
    })
}

impl Args {
    fn check(&self) -> Result<()> {
        ensure!(
            (1..=600).contains(&self.duration_s),
            "--duration-s must be 1 to 600"
        );
        ensure!(self.warmup_s <= 60, "--warmup-s must be at most 60");
        ensure!((1..=20).contains(&self.rounds), "--rounds must be 1 to 20");
        ensure!(
            (1..=64).contains(&self.threads),
            "--threads must be 1 to 64"
        );
        for (flag, n) in [
            ("--connections", self.connections),
            ("--connections-large", self.connections_large),
        ] {
            ensure!(
                (self.threads..=10_000).contains(&n),
                "{flag} must be at least --threads ({}) and at most 10000",
                self.threads
            );
        }
        ensure!(
            (1..=120).contains(&self.timeout_s),
            "--timeout-s must be 1 to 120"
        );
        if let Some(workers) = self.workers {
            ensure!((1..=256).contains(&workers), "--workers must be 1 to 256");
        }
        ensure!(!self.sizes.is_empty(), "--sizes names no size");
        let mut names: Vec<&str> = self.sizes.iter().map(|s| s.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        ensure!(names.len() == self.sizes.len(), "--sizes repeats a size");
        Ok(())
    }

    fn load(&self, size: &Size, duration_s: u64) -> Load {
        Load {
            threads: self.threads,
            connections: if size.bytes >= LARGE {
                self.connections_large
            } else {
                self.connections
            },
            duration_s,
            timeout_s: self.timeout_s,
        }
    }

    /// Seconds of load generation in all (the set-up adds a few).
    fn planned_s(&self) -> u64 {
        let per_size = 2 * (self.warmup_s + self.rounds as u64 * self.duration_s);
        per_size * self.sizes.len() as u64
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    args.check()?;
    let interrupted = Arc::new(AtomicBool::new(false));
    let nginx_pid: Arc<Mutex<Option<i32>>> = Arc::default();
    {
        let interrupted = Arc::clone(&interrupted);
        let nginx_pid = Arc::clone(&nginx_pid);
        ctrlc::set_handler(move || {
            if interrupted.swap(true, Ordering::SeqCst) {
                // Second Ctrl-C: no more waiting for the orderly teardown.
                if let Some(pid) = *lock(&nginx_pid) {
                    // SAFETY: kill(2) on nginx's own process group (it runs as a group
                    // leader); no memory is involved.
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                }
                eprintln!("bench-surrogate: killed");
                std::process::exit(130);
            }
            eprintln!(
                "bench-surrogate: interrupted, stopping wrk and nginx (Ctrl-C again to force)"
            );
        })
        .context("cannot handle Ctrl-C")?;
    }
    let bench = Bench::new(&args, interrupted, nginx_pid)?;
    let results = bench.run()?;

    let path = args.out.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench/surrogate.json")
    });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&path, serde_json::to_string_pretty(&results.json)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    print!("{}", results.table);
    println!("wrote {}", path.display());
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn progress(message: impl AsRef<str>) {
    eprintln!("bench-surrogate: {}", message.as_ref());
}

struct Bench<'a> {
    args: &'a Args,
    workers: usize,
    interrupted: Arc<AtomicBool>,
    nginx_pid: Arc<Mutex<Option<i32>>>,
}

struct Results {
    json: Value,
    table: String,
}

/// One object served by both.
struct Object {
    size: Size,
    /// Request path (the file's name under the document root).
    path: String,
    body: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Server {
    P2pcdn,
    Nginx,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Self::P2pcdn => "p2pcdn",
            Self::Nginx => "nginx",
        }
    }
}

/// One measured run.
#[derive(Debug, Serialize)]
struct Round {
    server: Server,
    round: usize,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    mib_s: f64,
    requests: u64,
    errors: Errors,
    /// Surrogate runs: hits counted by the surrogate during the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    hits: Option<u64>,
    /// CPU time (user + system) the server used during the run: the surrogate's runtime
    /// threads, or nginx's master and workers.
    cpu_s: f64,
    cpu_us_per_request: f64,
    /// wrk's figures as printed (microseconds).
    wrk: WrkResult,
}

/// Everything running: the surrogate (on its runtime), its origin, nginx.
struct Servers {
    runtime: tokio::runtime::Runtime,
    surrogate: Surrogate,
    surrogate_addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    serving: Option<tokio::task::JoinHandle<Result<()>>>,
    origin: Origin,
    nginx: Nginx,
    /// Prefix of request paths to the surrogate (`/<primary-id>` in redirect mode).
    prefix: String,
}

impl Servers {
    /// CPU clock ticks (user + system) used so far by the server: the surrogate's runtime
    /// threads (named "surrogate"), or nginx's master and its workers.
    fn cpu_ticks(&self, server: Server) -> Result<u64> {
        let mut ticks = 0;
        match server {
            Server::P2pcdn => {
                for task in std::fs::read_dir("/proc/self/task").context("reading /proc")? {
                    let task = task?.path();
                    let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
                    if comm.trim() == SURROGATE_THREADS
                        && let Some((_, used)) = stat_group_and_ticks(&task.join("stat"))
                    {
                        ticks += used;
                    }
                }
            }
            Server::Nginx => {
                // The master and its workers: the processes of its group.
                let master = self.nginx.pid().context("nginx is not running")?;
                for process in std::fs::read_dir("/proc").context("reading /proc")? {
                    if let Some((group, used)) = stat_group_and_ticks(&process?.path().join("stat"))
                        && group == master
                    {
                        ticks += used;
                    }
                }
            }
        }
        Ok(ticks)
    }

    fn usage(&self) -> Result<TenantUsage> {
        self.surrogate
            .usage(ARRANGEMENT)
            .context("the surrogate no longer serves the arrangement")
    }

    fn shutdown(mut self) -> Result<()> {
        self.nginx.stop();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(serving) = self.serving.take() {
            let joined = self
                .runtime
                .block_on(async { tokio::time::timeout(Duration::from_secs(15), serving).await });
            match joined {
                Ok(Ok(result)) => result?,
                Ok(Err(e)) => bail!("the surrogate task failed: {e}"),
                Err(_) => bail!("the surrogate did not stop within 15 s"),
            }
        }
        self.origin.stop();
        Ok(())
    }
}

impl<'a> Bench<'a> {
    fn new(
        args: &'a Args,
        interrupted: Arc<AtomicBool>,
        nginx_pid: Arc<Mutex<Option<i32>>>,
    ) -> Result<Self> {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        Ok(Self {
            args,
            workers: args.workers.unwrap_or(cpus),
            interrupted,
            nginx_pid,
        })
    }

    fn check_interrupted(&self) -> Result<()> {
        ensure!(!self.interrupted.load(Ordering::SeqCst), "interrupted");
        Ok(())
    }

    fn run(&self) -> Result<Results> {
        let args = self.args;
        let dir = tempfile::Builder::new()
            .prefix("p2pcdn-bench-surrogate-")
            .tempdir()
            .context("cannot create a temporary directory")?;
        let wrk = Wrk::new(&args.wrk, dir.path(), Arc::clone(&self.interrupted))?;
        let wrk_version = wrk.version()?;
        let nginx_version = nginx_version(&args.nginx)?;
        progress(format!(
            "{nginx_version}, {wrk_version}; {} nginx workers and {} surrogate threads; about {} s of load",
            self.workers,
            self.workers,
            args.planned_s()
        ));

        let objects = write_docroot(&dir.path().join("www"), &args.sizes)?;
        let servers = self.start(dir.path(), &objects)?;
        let measured = self.measure_all(&servers, &wrk, &objects);
        let stopped = servers.shutdown();
        let measured = measured?;
        stopped?;

        let mut json = Map::new();
        let mut table = String::new();
        let _ = writeln!(
            table,
            "\n{:<8} {:<7} {:>11} {:>8} {:>8} {:>9} {:>11}  wrk",
            "size", "server", "req/s", "p50 ms", "p99 ms", "MiB/s", "CPU µs/req"
        );
        for (object, rounds) in objects.iter().zip(&measured) {
            let load = args.load(&object.size, args.duration_s);
            json.insert(
                object.size.name.clone(),
                self.size_json(
                    object,
                    rounds,
                    &load,
                    &wrk,
                    &servers_route(args, &object.path),
                    &nginx_version,
                    &wrk_version,
                ),
            );
            for server in [Server::P2pcdn, Server::Nginx] {
                let s = summary(rounds, server);
                let _ = writeln!(
                    table,
                    "{:<8} {:<7} {:>11.0} {:>8.3} {:>8.3} {:>9.1} {:>11.2}  -t{} -c{} -d{}s, median of {}",
                    object.size.name,
                    server.name(),
                    s.rps,
                    s.p50_ms,
                    s.p99_ms,
                    s.mib_s,
                    s.cpu_us_per_request,
                    load.threads,
                    load.connections,
                    load.duration_s,
                    args.rounds
                );
            }
            let _ = writeln!(
                table,
                "{:<8} p2pcdn/nginx requests/s: {:.2} (median of the rounds' ratios)",
                object.size.name,
                paired_ratio(rounds)
            );
        }
        Ok(Results {
            json: Value::Object(json),
            table,
        })
    }

    /// Starts the origin, the surrogate (and warms it: one miss per object) and nginx.
    fn start(&self, dir: &Path, objects: &[Object]) -> Result<Servers> {
        let docroot = dir.join("www");
        let mut origin_config = OriginConfig::new("bench-origin", &[loopback(0)])
            .workers(4)
            .service_time(Duration::ZERO);
        for object in objects {
            origin_config = origin_config.object(&object.path, object.body.clone());
        }
        let origin = Origin::start(origin_config).context("starting the origin")?;
        let origin_url = match origin.local_addrs() {
            [addr, ..] => format!("http://{addr}"),
            [] => bail!("the origin has no address"),
        };
        progress(format!("origin for pull-through on {origin_url}"));

        // The daemon's metrics recorder: the surrogate's counters cost what they cost there.
        let _ = admin::install_metrics();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(self.workers)
            .thread_name(SURROGATE_THREADS)
            .enable_all()
            .build()
            .context("cannot start the surrogate's tokio runtime")?;
        let primary = NodeIdentity::generate("bench-primary", "p2pcdn bench", &[])
            .context("generating the primary's identity")?;
        let (surrogate, listener) = runtime.block_on(async {
            let built = manifest::build_from_dir(
                &docroot,
                BuildOptions::new(primary.fingerprint, SERVICE, &origin_url),
            )
            .await
            .context("building the manifest")?;
            // What a peer receives: the signed bytes, opened with the primary's key.
            let signed = manifest::sign(&primary, &built);
            let signed = manifest::decode_signed(&manifest::encode_signed(&signed))?;
            let manifest = manifest::open(&signed, &primary.spki_der, now_ms())
                .context("opening the signed manifest")?;
            let surrogate = Surrogate::new(SurrogateConfig::new(dir.join("cache")))
                .await
                .context("starting the surrogate")?;
            surrogate
                .add_tenant(Tenant {
                    arrangement_id: ARRANGEMENT.to_owned(),
                    primary: primary.fingerprint,
                    primary_spki: primary.spki_der.clone(),
                    host_names: vec![HOST.to_owned()],
                    manifest,
                    budgets: Budgets {
                        max_object_bytes: MAX_SIZE,
                        total_bytes: 4 * MAX_SIZE,
                        // The budget is not what is measured: far above loopback speed.
                        egress_bytes_per_s: 1 << 40,
                        egress_burst_bytes: 1 << 40,
                    },
                    allow_origin: None,
                })
                .context("adding the arrangement")?;
            let listener = tokio::net::TcpListener::bind(loopback(0))
                .await
                .context("binding the surrogate's port")?;
            anyhow::Ok((surrogate, listener))
        })?;
        let surrogate_addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = {
            let surrogate = surrogate.clone();
            runtime.spawn(async move {
                surrogate
                    .serve(listener, None, async {
                        let _ = stopped.await;
                    })
                    .await
                    .context("the surrogate stopped serving")
            })
        };
        let prefix = match self.args.route {
            Route::Host => String::new(),
            Route::Primary => format!("/{}", primary.fingerprint),
        };
        progress(format!(
            "surrogate on {surrogate_addr} ({} worker threads), arrangement for Host {HOST}",
            self.workers
        ));

        let nginx_port = free_port()?;
        let nginx = Nginx::start(
            &self.args.nginx,
            dir,
            &docroot,
            nginx_port,
            self.workers,
            &self.interrupted,
            Arc::clone(&self.nginx_pid),
        )?;
        progress(format!(
            "nginx on 127.0.0.1:{nginx_port} ({} worker processes)",
            self.workers
        ));
        let servers = Servers {
            runtime,
            surrogate,
            surrogate_addr,
            stop: Some(stop),
            serving: Some(serving),
            origin,
            nginx,
            prefix,
        };
        if let Err(e) = self.warm(&servers, objects) {
            let _ = servers.shutdown();
            return Err(e);
        }
        Ok(servers)
    }

    /// Pulls every object through the surrogate once (a miss), checks the next request is a
    /// hit with the same bytes, and that nginx serves the same bytes.
    fn warm(&self, servers: &Servers, objects: &[Object]) -> Result<()> {
        for object in objects {
            let path = format!("{}{}", servers.prefix, object.path);
            for expected in ["miss", "hit"] {
                let answer = get(
                    servers.surrogate_addr,
                    &self.host(servers, Server::P2pcdn),
                    &path,
                )?;
                answer.check(&object.body, "the surrogate")?;
                let cache = answer.header("x-p2pcdn-cache");
                ensure!(
                    cache == Some(expected),
                    "the surrogate answered {path} with x-p2pcdn-cache {cache:?}, expected {expected}"
                );
            }
            get(
                servers.nginx.addr,
                &self.host(servers, Server::Nginx),
                &object.path,
            )?
            .check(&object.body, "nginx")?;
        }
        let usage = servers.usage()?;
        let n = objects.len() as u64;
        ensure!(
            usage.origin_fetches == n && usage.misses == n && usage.hits == n,
            "after warming: {usage:?}, expected {n} origin fetches, misses and hits"
        );
        ensure!(
            usage.memory_bytes + usage.disk_bytes > 0,
            "after warming the surrogate stores nothing: {usage:?}"
        );
        progress(format!(
            "warm: {n} objects pulled once from the origin, then hits (memory tier {} B, disk tier {} B)",
            usage.memory_bytes, usage.disk_bytes
        ));
        Ok(())
    }

    fn measure_all(
        &self,
        servers: &Servers,
        wrk: &Wrk,
        objects: &[Object],
    ) -> Result<Vec<Vec<Round>>> {
        let args = self.args;
        let total = objects.len() * 2 * args.rounds;
        let mut done = 0;
        let mut all = Vec::new();
        for object in objects {
            let warmup = args.load(&object.size, args.warmup_s);
            if args.warmup_s > 0 {
                for server in [Server::P2pcdn, Server::Nginx] {
                    progress(format!(
                        "{} {}: warm-up, {} s",
                        object.size.name,
                        server.name(),
                        args.warmup_s
                    ));
                    self.wrk_run(servers, wrk, object, server, &warmup)?;
                }
            }
            let load = args.load(&object.size, args.duration_s);
            let mut rounds = Vec::new();
            for round in 1..=args.rounds {
                let order = if round % 2 == 1 {
                    [Server::P2pcdn, Server::Nginx]
                } else {
                    [Server::Nginx, Server::P2pcdn]
                };
                for server in order {
                    done += 1;
                    progress(format!(
                        "[{done}/{total}] {} {} round {round}/{}: wrk {}",
                        object.size.name,
                        server.name(),
                        args.rounds,
                        wrk.args(
                            &load,
                            &self.url(servers, server, object),
                            &self.host(servers, server)
                        )[..4]
                            .join(" ")
                    ));
                    let (result, hits, cpu_s) =
                        self.wrk_run(servers, wrk, object, server, &load)?;
                    let cpu_us_per_request = cpu_s * 1e6 / result.requests as f64;
                    progress(format!(
                        "    {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms, {:.1} MiB/s, {:.2} CPU s ({:.1} µs/request){}",
                        result.rps(),
                        result.p50_ms(),
                        result.p99_ms(),
                        result.mib_per_s(),
                        cpu_s,
                        cpu_us_per_request,
                        hits.map(|h| format!(", {h} hits")).unwrap_or_default()
                    ));
                    rounds.push(Round {
                        server,
                        round,
                        rps: result.rps(),
                        p50_ms: result.p50_ms(),
                        p99_ms: result.p99_ms(),
                        mib_s: result.mib_per_s(),
                        requests: result.requests,
                        errors: result.errors,
                        hits,
                        cpu_s,
                        cpu_us_per_request,
                        wrk: result,
                    });
                }
            }
            all.push(rounds);
        }
        Ok(all)
    }

    /// The `Host` clients send: the primary's host name (DSR), or in redirect mode the
    /// address they were redirected to.
    fn host(&self, servers: &Servers, server: Server) -> String {
        match (self.args.route, server) {
            (Route::Host, _) => HOST.to_owned(),
            (Route::Primary, Server::P2pcdn) => servers.surrogate_addr.to_string(),
            (Route::Primary, Server::Nginx) => servers.nginx.addr.to_string(),
        }
    }

    fn url(&self, servers: &Servers, server: Server, object: &Object) -> String {
        match server {
            Server::P2pcdn => format!(
                "http://{}{}{}",
                servers.surrogate_addr, servers.prefix, object.path
            ),
            Server::Nginx => format!("http://{}{}", servers.nginx.addr, object.path),
        }
    }

    /// One wrk run; for the surrogate, checks that every request was a hit and returns the
    /// hits counted.
    fn wrk_run(
        &self,
        servers: &Servers,
        wrk: &Wrk,
        object: &Object,
        server: Server,
        load: &Load,
    ) -> Result<(WrkResult, Option<u64>, f64)> {
        self.check_interrupted()?;
        let url = self.url(servers, server, object);
        let before = servers.usage()?;
        let origin_before = servers.origin.stats().requests;
        let cpu_before = servers.cpu_ticks(server)?;
        let (result, summary) = wrk
            .run(load, &url, &self.host(servers, server))
            .with_context(|| format!("wrk against {} ({url})", server.name()))?;
        let cpu = ticks_to_s(servers.cpu_ticks(server)?.saturating_sub(cpu_before));
        if server == Server::Nginx {
            servers.nginx.check_running()?;
        }
        let after = servers.usage()?;
        let origin_requests = servers.origin.stats().requests - origin_before;
        ensure!(
            result.errors.status == 0,
            "{} answered {} requests of {url} with a status outside 2xx/3xx:\n{summary}",
            server.name(),
            result.errors.status
        );
        ensure!(
            result.bytes >= result.requests * object.size.bytes,
            "{} sent {} bytes for {} requests of {} B objects: bodies are missing",
            server.name(),
            result.bytes,
            result.requests,
            object.size.bytes
        );
        if result.errors.socket() > 0 {
            progress(format!(
                "warning: {} socket errors against {}: {:?}",
                result.errors.socket(),
                server.name(),
                result.errors
            ));
        }
        ensure!(
            origin_requests == 0 && after.origin_fetches == before.origin_fetches,
            "the origin was asked for {origin_requests} objects during a run: not all hits"
        );
        ensure!(
            after.misses == before.misses,
            "the surrogate counted {} misses during a run",
            after.misses - before.misses
        );
        let hits = after.hits - before.hits;
        let routed = after.requests - before.requests;
        if server == Server::Nginx {
            ensure!(
                routed == 0,
                "the surrogate got {routed} requests during nginx's run"
            );
            return Ok((result, None, cpu));
        }
        ensure!(
            hits == routed,
            "the surrogate answered {routed} requests but counted {hits} hits"
        );
        // A request in flight on each connection when wrk stopped (or lost to a socket
        // error) is counted by the surrogate but not by wrk.
        let slack = load.connections as u64 + result.errors.socket();
        ensure!(
            (result.requests..=result.requests + slack).contains(&hits),
            "wrk completed {} requests but the surrogate counted {hits} hits",
            result.requests
        );
        Ok((result, Some(hits), cpu))
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "the JSON of one size, from its parts"
    )]
    fn size_json(
        &self,
        object: &Object,
        rounds: &[Round],
        load: &Load,
        wrk: &Wrk,
        route: &Value,
        nginx_version: &str,
        wrk_version: &str,
    ) -> Value {
        let p2pcdn = summary(rounds, Server::P2pcdn);
        let nginx = summary(rounds, Server::Nginx);
        let errors = |server| {
            rounds
                .iter()
                .filter(|r| r.server == server)
                .fold(Errors::default(), |sum, r| Errors {
                    connect: sum.connect + r.errors.connect,
                    read: sum.read + r.errors.read,
                    write: sum.write + r.errors.write,
                    status: sum.status + r.errors.status,
                    timeout: sum.timeout + r.errors.timeout,
                })
        };
        let (p2pcdn_errors, nginx_errors) = (errors(Server::P2pcdn), errors(Server::Nginx));
        let hits: u64 = rounds.iter().filter_map(|r| r.hits).sum();
        let host = match self.args.route {
            Route::Host => HOST,
            Route::Primary => "ADDRESS:PORT",
        };
        let mut args = wrk.args(load, "URL", host);
        // The script path is a temporary file: name what it does instead.
        if let Some(script) = args.iter().position(|a| a == "-s") {
            args[script + 1] = "done.lua (prints the results as JSON)".to_owned();
        }
        json!({
            "p2pcdn_rps": round2(p2pcdn.rps),
            "nginx_rps": round2(nginx.rps),
            "p2pcdn_p99_ms": round3(p2pcdn.p99_ms),
            "nginx_p99_ms": round3(nginx.p99_ms),
            "p2pcdn_p50_ms": round3(p2pcdn.p50_ms),
            "nginx_p50_ms": round3(nginx.p50_ms),
            "p2pcdn_mib_s": round2(p2pcdn.mib_s),
            "nginx_mib_s": round2(nginx.mib_s),
            "p2pcdn_cpu_us_per_request": round3(p2pcdn.cpu_us_per_request),
            "nginx_cpu_us_per_request": round3(nginx.cpu_us_per_request),
            // Each round's two runs are back to back: their ratio is the figure least
            // affected by other load on the machine.
            "rps_ratio": round3(paired_ratio(rounds)),
            "object_bytes": object.size.bytes,
            "path": route,
            "aggregate": format!("median of {} rounds per server, alternating which server goes first", self.args.rounds),
            "wrk": {
                "threads": load.threads,
                "connections": load.connections,
                "duration_s": load.duration_s,
                "timeout_s": load.timeout_s,
                "warmup_s": self.args.warmup_s,
                "args": args,
                "version": wrk_version,
            },
            "workers": {
                "nginx_worker_processes": self.workers,
                "surrogate_tokio_worker_threads": self.workers,
                "cpus": std::thread::available_parallelism().map_or(1, usize::from),
            },
            "nginx_version": nginx_version,
            "errors": { "p2pcdn": p2pcdn_errors, "nginx": nginx_errors },
            "non_2xx": { "p2pcdn": p2pcdn_errors.status, "nginx": nginx_errors.status },
            "surrogate": {
                "tier": if object.size.bytes <= SurrogateConfig::new("").memory_object_max_bytes { "memory" } else { "disk" },
                "hits": hits,
                "misses": 0,
                "origin_fetches": 0,
            },
            "rounds": rounds,
        })
    }
}

/// The name of the surrogate's runtime threads (to account their CPU time).
const SURROGATE_THREADS: &str = "surrogate";

/// The process group and utime + stime (clock ticks) of a `/proc/.../stat` file.
fn stat_group_and_ticks(path: &Path) -> Option<(u32, u64)> {
    parse_stat(&std::fs::read_to_string(path).ok()?)
}

fn parse_stat(text: &str) -> Option<(u32, u64)> {
    // The command name, in parentheses, may hold spaces: count fields after its end.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 5 (pgrp), 14 (utime) and 15 (stime) of proc(5); the state (field 3) is the
    // first after the name.
    let group: u32 = fields.get(2)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((group, utime + stime))
}

fn ticks_to_s(ticks: u64) -> f64 {
    // SAFETY: sysconf(3) only reads a constant of the system.
    let per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64 / if per_s > 0 { per_s as f64 } else { 100.0 }
}

/// How the surrogate was addressed, for the JSON.
fn servers_route(args: &Args, path: &str) -> Value {
    match args.route {
        Route::Host => json!({
            "route": "host",
            "what": "DSR: the primary's host name in Host, the object's own path (what tunnelled clients send)",
            "host": HOST,
            "request_path": path,
        }),
        Route::Primary => json!({
            "route": "primary",
            "what": "redirect mode: /<primary-id>/<path>, Host the surrogate's address",
            "host": "<address>:<port>",
            "request_path": format!("/<primary-id>{path}"),
        }),
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[derive(Debug, Default, Clone, Copy)]
struct Summary {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    mib_s: f64,
    cpu_us_per_request: f64,
}

/// Median of each figure over the server's rounds.
fn summary(rounds: &[Round], server: Server) -> Summary {
    let of = |f: fn(&Round) -> f64| {
        median(
            rounds
                .iter()
                .filter(|r| r.server == server)
                .map(f)
                .collect(),
        )
    };
    Summary {
        rps: of(|r| r.rps),
        p50_ms: of(|r| r.p50_ms),
        p99_ms: of(|r| r.p99_ms),
        mib_s: of(|r| r.mib_s),
        cpu_us_per_request: of(|r| r.cpu_us_per_request),
    }
}

/// The median over the rounds of p2pcdn's requests/s over nginx's in the same round.
fn paired_ratio(rounds: &[Round]) -> f64 {
    let ratios = rounds
        .iter()
        .filter(|r| r.server == Server::P2pcdn)
        .filter_map(|p| {
            rounds
                .iter()
                .find(|n| n.server == Server::Nginx && n.round == p.round)
                .map(|n| p.rps / n.rps)
        })
        .collect();
    median(ratios)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A free port on 127.0.0.1 (bound then released; nginx binds it a moment later).
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind(loopback(0)).context("cannot find a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Writes one file per size (pseudo-random bytes, so nothing compresses or dedupes) into a
/// document root readable by nginx's workers (which run as `nobody` when started as root).
fn write_docroot(docroot: &Path, sizes: &[Size]) -> Result<Vec<Object>> {
    std::fs::create_dir_all(docroot).with_context(|| format!("creating {}", docroot.display()))?;
    let mut objects = Vec::new();
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    for size in sizes {
        let len = usize::try_from(size.bytes)?;
        let mut body = Vec::with_capacity(len + 8);
        while body.len() < len {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            body.extend_from_slice(&state.to_le_bytes());
        }
        body.truncate(len);
        let name = format!("{}.bin", size.name);
        let file = docroot.join(&name);
        std::fs::write(&file, &body).with_context(|| format!("writing {}", file.display()))?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))?;
        objects.push(Object {
            size: size.clone(),
            path: format!("/{name}"),
            body,
        });
    }
    for dir in [docroot, docroot.parent().unwrap_or(docroot)] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("opening {} to nginx's workers", dir.display()))?;
    }
    Ok(objects)
}

/// A response read whole (HTTP/1.1, `Connection: close`).
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn check(&self, expected: &[u8], who: &str) -> Result<()> {
        ensure!(
            self.status == 200,
            "{who} answered {}: {}",
            self.status,
            String::from_utf8_lossy(&self.body[..self.body.len().min(200)])
        );
        ensure!(
            self.body == expected,
            "{who} sent {} bytes that differ from the file ({} bytes)",
            self.body.len(),
            expected.len()
        );
        Ok(())
    }
}

/// A GET over a fresh connection, read to its end (at most 30 s).
fn get(addr: SocketAddr, host: &str, path: &str) -> Result<Answer> {
    let what = || format!("GET http://{addr}{path}");
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).with_context(what)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nUser-Agent: bench-surrogate\r\n\r\n"
    )
    .with_context(what)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).with_context(what)?;
    parse_answer(&raw).with_context(what)
}

fn parse_answer(raw: &[u8]) -> Result<Answer> {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        bail!("no end of headers in {} bytes", raw.len());
    };
    let head = std::str::from_utf8(&raw[..end]).context("headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let body = raw[end + 4..].to_vec();
    let answer = Answer {
        status,
        headers,
        body,
    };
    if let Some(len) = answer.header("content-length") {
        ensure!(
            len.parse::<usize>().ok() == Some(answer.body.len()),
            "content-length {len} but {} body bytes",
            answer.body.len()
        );
    }
    Ok(answer)
}

fn nginx_version(program: &Path) -> Result<String> {
    let output = Command::new(program).arg("-v").output().with_context(|| {
        format!(
            "cannot run {} (install it: apt-get install nginx, or cargo xtask setup)",
            program.display()
        )
    })?;
    // nginx prints its version on stderr.
    let text = String::from_utf8_lossy(&output.stderr);
    Ok(text.lines().next().unwrap_or("nginx").trim().to_owned())
}

/// nginx configured like a static file server at its best; everything it writes stays in
/// `dir`.
fn nginx_conf(dir: &Path, docroot: &Path, port: u16, workers: usize) -> String {
    let dir = dir.display();
    let docroot = docroot.display();
    format!(
        "# bench-surrogate: Debian's nginx serving the benchmark's document root.
worker_processes {workers};
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
worker_rlimit_nofile 65536;

events {{
    worker_connections 8192;
}}

http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 75s;
    keepalive_requests 10000000;
    open_file_cache max=1024 inactive=60s;
    open_file_cache_valid 60s;
    open_file_cache_min_uses 1;
    open_file_cache_errors on;
    types {{ application/octet-stream bin; }}
    default_type application/octet-stream;
    client_body_temp_path {dir}/nginx-client-body;
    proxy_temp_path {dir}/nginx-proxy;
    fastcgi_temp_path {dir}/nginx-fastcgi;
    uwsgi_temp_path {dir}/nginx-uwsgi;
    scgi_temp_path {dir}/nginx-scgi;

    server {{
        listen 127.0.0.1:{port} reuseport backlog=1024;
        server_name _;
        root {docroot};
        location / {{ }}
    }}
}}
"
    )
}

/// nginx running as a child (its own process group); stopped on drop.
struct Nginx {
    child: Mutex<Option<Child>>,
    addr: SocketAddr,
    error_log: PathBuf,
    pid_slot: Arc<Mutex<Option<i32>>>,
}

impl Nginx {
    fn start(
        program: &Path,
        dir: &Path,
        docroot: &Path,
        port: u16,
        workers: usize,
        interrupted: &AtomicBool,
        pid_slot: Arc<Mutex<Option<i32>>>,
    ) -> Result<Self> {
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, nginx_conf(dir, docroot, port, workers))
            .with_context(|| format!("writing {}", conf.display()))?;
        let error_log = dir.join("nginx-error.log");
        let mut cmd = Command::new(program);
        cmd.arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(&error_log)
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // A group of its own: Ctrl-C reaches this process, which stops nginx in order,
            // and a forced stop can kill the master and its workers together.
            .process_group(0);
        let child = cmd.spawn().with_context(|| {
            format!(
                "cannot run {} (install it: apt-get install nginx, or cargo xtask setup)",
                program.display()
            )
        })?;
        let pid = i32::try_from(child.id())?;
        *lock(&pid_slot) = Some(pid);
        let nginx = Self {
            child: Mutex::new(Some(child)),
            addr: loopback(port),
            error_log,
            pid_slot,
        };
        let started = Instant::now();
        loop {
            nginx.check_running()?;
            if TcpStream::connect_timeout(&nginx.addr, Duration::from_millis(200)).is_ok() {
                return Ok(nginx);
            }
            ensure!(!interrupted.load(Ordering::SeqCst), "interrupted");
            ensure!(
                started.elapsed() < Duration::from_secs(10),
                "nginx did not listen on {} within 10 s; {}",
                nginx.addr,
                nginx.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> Option<u32> {
        lock(&self.child).as_ref().map(Child::id)
    }

    fn check_running(&self) -> Result<()> {
        if let Some(child) = lock(&self.child).as_mut()
            && !matches!(child.try_wait(), Ok(None))
        {
            bail!("nginx exited; {}", self.log_tail());
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.error_log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(5).collect();
        if lines.is_empty() {
            format!("{} is empty", self.error_log.display())
        } else {
            let tail: Vec<&str> = lines.into_iter().rev().collect();
            format!("{}: {}", self.error_log.display(), tail.join(" | "))
        }
    }

    /// SIGTERM (nginx's fast shutdown: the master stops its workers, then exits), then
    /// SIGKILL to the whole group after 5 s.
    fn stop(&mut self) {
        let Some(mut child) = lock(&self.child).take() else {
            return;
        };
        let pid = i32::try_from(child.id()).unwrap_or(0);
        if pid > 0 {
            // SAFETY: kill(2) on our child; no memory is involved.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            if !matches!(child.try_wait(), Ok(None)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if pid > 0 {
            // Workers left behind by a master that did not stop in time.
            // SAFETY: kill(2) on nginx's process group; no memory is involved.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
        let _ = child.kill();
        let _ = child.wait();
        *lock(&self.pid_slot) = None;
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        let size = |text: &str| match parse_size(text) {
            Ok(size) => size.bytes,
            Err(e) => panic!("{text}: {e}"),
        };
        assert_eq!(size("10KiB"), 10 << 10);
        assert_eq!(size("1MiB"), 1 << 20);
        assert_eq!(size("512B"), 512);
        for bad in [
            "",
            "KiB",
            "10kb",
            "0B",
            "65MiB",
            "1.5MiB",
            "99999999999999999999MiB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn proc_stat_fields() {
        let line = "4242 (nginx: worker (x)) S 4240 4240 4240 0 -1 4194624 100 0 0 0 \
                    1500 250 0 0 20 0 1 0 123 456 789";
        assert_eq!(parse_stat(line), Some((4240, 1750)));
        assert_eq!(parse_stat("4242 (short) S 1"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn ratios_pair_the_runs_of_a_round() {
        let run = |server, round, rps| Round {
            server,
            round,
            rps,
            p50_ms: 0.0,
            p99_ms: 0.0,
            mib_s: 0.0,
            requests: 0,
            errors: Errors::default(),
            hits: None,
            cpu_s: 0.0,
            cpu_us_per_request: 0.0,
            wrk: WrkResult::default(),
        };
        // Round 2 ran while the machine was busy: both servers slower, the ratio steady.
        let rounds = [
            run(Server::P2pcdn, 1, 110.0),
            run(Server::Nginx, 1, 100.0),
            run(Server::Nginx, 2, 50.0),
            run(Server::P2pcdn, 2, 60.0),
            run(Server::P2pcdn, 3, 99.0),
            run(Server::Nginx, 3, 90.0),
        ];
        assert!((paired_ratio(&rounds) - 1.1).abs() < 1e-9);
        assert!((summary(&rounds, Server::P2pcdn).rps - 99.0).abs() < 1e-9);
        assert!((summary(&rounds, Server::Nginx).rps - 90.0).abs() < 1e-9);
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }

    #[test]
    fn answers() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nx-p2pcdn-cache: hit\r\n\r\nabc";
        let answer = match parse_answer(raw) {
            Ok(answer) => answer,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(answer.status, 200);
        assert_eq!(answer.header("X-P2PCDN-Cache"), Some("hit"));
        assert!(answer.check(b"abc", "test").is_ok());
        assert!(answer.check(b"abd", "test").is_err());
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nabc").is_err());
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_answer(b"garbage\r\n\r\n").is_err());
    }

    #[test]
    fn nginx_config_keeps_everything_in_its_directory() {
        let conf = nginx_conf(Path::new("/tmp/b"), Path::new("/tmp/b/www"), 8080, 2);
        for needle in [
            "worker_processes 2;",
            "master_process on;",
            "pid /tmp/b/nginx.pid;",
            "error_log /tmp/b/nginx-error.log",
            "access_log off;",
            "sendfile on;",
            "tcp_nopush on;",
            "open_file_cache max=",
            "keepalive_requests 10000000;",
            "listen 127.0.0.1:8080 ",
            "root /tmp/b/www;",
            "client_body_temp_path /tmp/b/",
        ] {
            assert!(conf.contains(needle), "{needle}");
        }
        assert!(!conf.contains("daemon"), "daemon off is given with -g");
    }
}
