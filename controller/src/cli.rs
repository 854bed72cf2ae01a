//! `p2pcdn`: `init`, `run`, and the operator commands that talk to the running daemon's admin
//! API over HTTPS (the node's own certificate pinned).
//!
//! Exit codes: 0 ok, 1 runtime failure (also: a negotiation that failed, a 409/5xx answer),
//! 2 usage (clap), 64 bad config or input value, 69 daemon unreachable, 77 unauthorised.

mod render;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use axum::http::{Method, StatusCode};
use clap::{ArgGroup, Args, Parser, Subcommand};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use serde::de::DeserializeOwned;

use crate::{
    admin::{
        AdminClient, ArrangementDetail, ArrangementView, ClientError, DisbandRequest, ErrorBody,
        NegotiateRequest, NegotiationState, NegotiationView, NewPolicyRule, PeerView,
        PolicyRuleView, PolicyView, RuleAction, StateView, StatusView,
    },
    config::Config,
    model::{Fingerprint, Role, now_ms},
};

/// Where `--config` points when neither it nor `P2PCDN_CONFIG` is given.
pub const DEFAULT_CONFIG: &str = "/etc/p2pcdn/p2pcdn.toml";

/// Exit statuses (sysexits.h where one fits).
pub mod exit {
    pub const OK: u8 = 0;
    pub const FAILURE: u8 = 1;
    pub const USAGE: u8 = 2;
    /// EX_DATAERR: bad config or input value.
    pub const DATAERR: u8 = 64;
    /// EX_UNAVAILABLE: the daemon cannot be reached.
    pub const UNAVAILABLE: u8 = 69;
    /// EX_NOPERM: the admin API refused the credentials.
    pub const NOPERM: u8 = 77;
}

/// Time limit of a query; `negotiate` gets [`NEGOTIATE_TIMEOUT`].
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const NEGOTIATE_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Parser)]
#[command(
    name = "p2pcdn",
    version,
    about = "p2pcdn peering control plane: daemon and operator commands"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct Global {
    /// The config file (also tells the operator commands where the admin API is).
    #[arg(long, global = true, env = "P2PCDN_CONFIG", default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Admin API bearer token (default: the first operator token in the config, else the
    /// first viewer token).
    #[arg(long, global = true, env = "P2PCDN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Admin API address (default: `admin.listen` from the config).
    #[arg(long, global = true, value_name = "ADDR:PORT")]
    admin: Option<SocketAddr>,
    /// Present this client certificate (PEM) to the admin API instead of a token.
    #[arg(long, global = true, requires = "client_key", value_name = "PEM")]
    client_cert: Option<PathBuf>,
    /// The private key (PEM) of --client-cert.
    #[arg(long, global = true, requires = "client_cert", value_name = "PEM")]
    client_key: Option<PathBuf>,
    /// Machine output: the admin API's JSON.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the node key, certificate and a commented config file.
    Init {
        /// Directory to write p2pcdn.toml, node.key and node.crt into.
        #[arg(long, default_value = "/etc/p2pcdn")]
        dir: PathBuf,
        /// This node's name (certificate CN).
        #[arg(long)]
        name: String,
        /// Organisation (certificate O), used by peers' allow-lists.
        #[arg(long, default_value = "")]
        organisation: String,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Run the daemon (config errors exit 64 before anything binds).
    Run,
    /// This node: identity, listeners, capacity, counts.
    Status,
    /// Known peers.
    Peers,
    /// Arrangements, newest first.
    Arrangements {
        #[arg(long)]
        state: Option<StateView>,
        #[arg(long)]
        role: Option<Role>,
        /// Only those with this peer (fingerprint).
        #[arg(long)]
        peer: Option<Fingerprint>,
    },
    /// One arrangement with its history.
    Arrangement { id: String },
    /// Show the policy, or change its operator rules.
    Policy {
        #[command(subcommand)]
        action: Option<PolicyAction>,
    },
    /// Recent negotiations.
    Negotiations,
    /// Negotiate capacity for a service now (operator).
    Negotiate {
        /// A `[[services]]` name from the config.
        #[arg(long)]
        service: String,
        /// New connections per second to cover (default: the mediator's figure).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        rate: Option<u64>,
        /// Duration in seconds (default: the service's duration_s).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=crate::admin::MAX_DURATION_S))]
        duration: Option<u64>,
    },
    /// Disband an arrangement (operator).
    Disband {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// The usage ledger (read from this node's store; works with the daemon running or not).
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// Content manifests: build and sign one, or verify and show one.
    Manifest {
        #[command(subcommand)]
        command: crate::manifest::cli::ManifestCommand,
    },
}

#[derive(Debug, Subcommand)]
enum LedgerCommand {
    /// One row per arrangement that was active: both sides' counts, their discrepancy in
    /// percent, and the settlement.
    Export {
        #[arg(long, value_enum, default_value = "json")]
        format: crate::accounting::Format,
        /// Only this arrangement.
        #[arg(long)]
        arrangement: Option<String>,
        /// Write to this file instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyAction {
    /// Show the effective policy (the default).
    Show,
    /// Allow a peer by fingerprint or organisation.
    Allow(Subject),
    /// Deny a peer by fingerprint or organisation.
    Deny(Subject),
    /// Remove an operator rule by id.
    Remove { id: i64 },
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("subject").required(true).args(["fingerprint", "organisation"])))]
struct Subject {
    #[arg(long)]
    fingerprint: Option<Fingerprint>,
    #[arg(long)]
    organisation: Option<String>,
}

/// `p2pcdn ledger export`: reads the store the config names (never creates one).
fn ledger_export(
    config_path: &Path,
    format: crate::accounting::Format,
    arrangement: Option<&str>,
    out: Option<&Path>,
) -> u8 {
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(e) => return fail(exit::DATAERR, e),
    };
    let path = config.store_path();
    if !path.is_file() {
        return fail(
            exit::DATAERR,
            format!(
                "no store at {} (has `p2pcdn run` ever started with this config?)",
                path.display()
            ),
        );
    }
    let store = match crate::store::Store::open(&path) {
        Ok(store) => store,
        Err(e) => return fail(exit::FAILURE, e),
    };
    let rows = match crate::accounting::ledger(&store, arrangement) {
        Ok(rows) => rows,
        Err(e) => return fail(exit::FAILURE, e),
    };
    if let Some(id) = arrangement
        && rows.is_empty()
    {
        return fail(
            exit::DATAERR,
            format!(
                "no arrangement {id:?} that was ever active in {}",
                path.display()
            ),
        );
    }
    let text = match crate::accounting::export(&rows, format) {
        Ok(text) => text,
        Err(e) => return fail(exit::FAILURE, e),
    };
    match out {
        Some(file) => match std::fs::write(file, &text) {
            Ok(()) => exit::OK,
            Err(e) => fail(exit::FAILURE, format!("{}: {e}", file.display())),
        },
        None => {
            println!("{}", text.trim_end());
            exit::OK
        }
    }
}

/// Entry point of the `p2pcdn` binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            });
        }
    };
    let code = match cli.command {
        Command::Init {
            dir,
            name,
            organisation,
            force,
        } => init(&dir, &name, &organisation, force, cli.global.json),
        Command::Run => run(&cli.global.config),
        Command::Ledger {
            command:
                LedgerCommand::Export {
                    format,
                    arrangement,
                    out,
                },
        } => ledger_export(
            &cli.global.config,
            format,
            arrangement.as_deref(),
            out.as_deref(),
        ),
        Command::Manifest { command } => {
            crate::manifest::cli::run(command, &cli.global.config, cli.global.json)
        }
        command => operator(&cli.global, command),
    };
    ExitCode::from(code)
}

fn fail(code: u8, message: impl std::fmt::Display) -> u8 {
    eprintln!("p2pcdn: {message}");
    code
}

fn init(dir: &Path, name: &str, organisation: &str, force: bool, json: bool) -> u8 {
    match crate::config::init(dir, name, organisation, force) {
        Ok(report) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "config": report.config_path,
                        "key": report.key_path,
                        "cert": report.cert_path,
                        "fingerprint": report.fingerprint,
                    })
                );
            } else {
                println!("wrote {}", report.config_path.display());
                println!("wrote {} (private, mode 0600)", report.key_path.display());
                println!("wrote {}", report.cert_path.display());
                println!("fingerprint {}", report.fingerprint);
                println!("admin tokens (operator and viewer) are in the config file");
            }
            exit::OK
        }
        Err(e) => fail(exit::DATAERR, e),
    }
}

fn run(config_path: &Path) -> u8 {
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(e) => return fail(exit::DATAERR, e),
    };
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(exit::FAILURE, format!("cannot start the runtime: {e}")),
    };
    match runtime.block_on(crate::daemon::run(config)) {
        Ok(()) => exit::OK,
        Err(e) if e.is_config() => fail(exit::DATAERR, e),
        Err(e) => fail(exit::FAILURE, e),
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Where and how to reach the admin API, from the config and the global options.
struct Target {
    addr: SocketAddr,
    pinned: CertificateDer<'static>,
    token: Option<String>,
    client_auth: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
}

/// Connecting to an unspecified listen address means connecting to loopback.
fn connectable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

fn target(global: &Global) -> Result<Target, String> {
    let config = Config::load(&global.config).map_err(|e| e.to_string())?;
    let cert_path = &config.tls.cert;
    let pinned = CertificateDer::from_pem_file(cert_path).map_err(|e| {
        format!(
            "{}: cannot read the node certificate: {e}",
            cert_path.display()
        )
    })?;
    let token = global.token.clone().or_else(|| {
        config
            .admin
            .operator_token()
            .or_else(|| config.admin.tokens.first().map(|t| t.token.as_str()))
            .map(str::to_owned)
    });
    let client_auth = match (&global.client_cert, &global.client_key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                .map_err(|e| format!("{}: {e}", cert.display()))?;
            let key =
                PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
            Some((chain, key))
        }
        _ => None,
    };
    Ok(Target {
        addr: connectable(global.admin.unwrap_or(config.admin.listen)),
        pinned,
        // A client certificate replaces the token unless one is given explicitly.
        token: if client_auth.is_some() {
            global.token.clone()
        } else {
            token
        },
        client_auth,
    })
}

fn operator(global: &Global, command: Command) -> u8 {
    let target = match target(global) {
        Ok(target) => target,
        Err(e) => return fail(exit::DATAERR, e),
    };
    let timeout = if matches!(command, Command::Negotiate { .. }) {
        NEGOTIATE_TIMEOUT
    } else {
        REQUEST_TIMEOUT
    };
    let client = match AdminClient::new(
        target.addr,
        target.pinned,
        target.token,
        target.client_auth,
        timeout,
    ) {
        Ok(client) => client,
        Err(e) => return fail(exit::DATAERR, e),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(exit::FAILURE, format!("cannot start the runtime: {e}")),
    };
    runtime.block_on(execute(&client, command, global.json))
}

/// A successful answer, or the exit code after printing why not.
async fn call<T: DeserializeOwned>(
    client: &AdminClient,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
    json: bool,
) -> Result<T, u8> {
    let (status, bytes) =
        client
            .request(method, path, body.as_ref())
            .await
            .map_err(|e| match e {
                ClientError::Setup(_) => fail(exit::DATAERR, e),
                _ => fail(exit::UNAVAILABLE, e),
            })?;
    if !status.is_success() {
        let reason = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|b| b.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).trim().to_owned());
        let code = match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => exit::NOPERM,
            s if s.is_client_error() && s != StatusCode::CONFLICT => exit::DATAERR,
            _ => exit::FAILURE,
        };
        return Err(fail(code, format!("{} ({})", reason, status.as_u16())));
    }
    if json {
        match serde_json::from_slice::<serde_json::Value>(&bytes)
            .and_then(|v| serde_json::to_string_pretty(&v))
        {
            Ok(text) => println!("{text}"),
            Err(e) => return Err(fail(exit::FAILURE, format!("unexpected answer: {e}"))),
        }
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        fail(
            exit::FAILURE,
            format!("unexpected answer from the daemon: {e}"),
        )
    })
}

async fn execute(client: &AdminClient, command: Command, json: bool) -> u8 {
    match run_command(client, command, json).await {
        Ok(code) | Err(code) => code,
    }
}

async fn run_command(client: &AdminClient, command: Command, json: bool) -> Result<u8, u8> {
    let now = now_ms();
    let show = |text: String| {
        if !json {
            print!("{text}");
        }
    };
    match command {
        Command::Status => {
            let s: StatusView = call(client, Method::GET, "/v1/status", None, json).await?;
            show(render::status(&s, now));
        }
        Command::Peers => {
            let p: Vec<PeerView> = call(client, Method::GET, "/v1/peers", None, json).await?;
            show(render::peers(&p, now));
        }
        Command::Arrangements { state, role, peer } => {
            let mut query = Vec::new();
            if let Some(state) = state {
                query.push(format!("state={state}"));
            }
            if let Some(role) = role {
                query.push(format!("role={}", role.as_str()));
            }
            if let Some(peer) = peer {
                query.push(format!("peer={peer}"));
            }
            let path = if query.is_empty() {
                "/v1/arrangements".to_owned()
            } else {
                format!("/v1/arrangements?{}", query.join("&"))
            };
            let list: Vec<ArrangementView> = call(client, Method::GET, &path, None, json).await?;
            show(render::arrangements(&list, now));
        }
        Command::Arrangement { id } => {
            let path = format!("/v1/arrangements/{}", path_segment(&id)?);
            let d: ArrangementDetail = call(client, Method::GET, &path, None, json).await?;
            show(render::arrangement(&d, now));
        }
        Command::Policy { action } => match action.unwrap_or(PolicyAction::Show) {
            PolicyAction::Show => {
                let p: PolicyView = call(client, Method::GET, "/v1/policy", None, json).await?;
                show(render::policy(&p));
            }
            PolicyAction::Allow(subject) => {
                add_rule(client, RuleAction::Allow, subject, json).await?
            }
            PolicyAction::Deny(subject) => {
                add_rule(client, RuleAction::Deny, subject, json).await?
            }
            PolicyAction::Remove { id } => {
                let path = format!("/v1/policy/rules/{id}");
                let _: serde_json::Value = call(client, Method::DELETE, &path, None, json).await?;
                show(format!("rule {id} removed\n"));
            }
        },
        Command::Negotiations => {
            let list: Vec<NegotiationView> =
                call(client, Method::GET, "/v1/negotiations", None, json).await?;
            show(render::negotiations(&list, now));
        }
        Command::Negotiate {
            service,
            rate,
            duration,
        } => {
            let body = to_json(&NegotiateRequest {
                service,
                new_connections_per_s: rate,
                duration_s: duration,
            })?;
            let n: NegotiationView =
                call(client, Method::POST, "/v1/negotiate", Some(body), json).await?;
            show(render::negotiation(&n));
            if matches!(
                n.state,
                NegotiationState::Failed | NegotiationState::Abandoned
            ) {
                return Ok(exit::FAILURE);
            }
        }
        Command::Disband { id, reason } => {
            let path = format!("/v1/arrangements/{}/disband", path_segment(&id)?);
            let body = to_json(&DisbandRequest { reason })?;
            let a: ArrangementView = call(client, Method::POST, &path, Some(body), json).await?;
            show(format!(
                "arrangement {}: {}{}\n",
                a.id,
                a.state.as_str(),
                a.end_reason.map(|r| format!(" ({r})")).unwrap_or_default()
            ));
        }
        Command::Init { .. } | Command::Run | Command::Manifest { .. } | Command::Ledger { .. } => {
            return Err(exit::FAILURE);
        }
    }
    Ok(exit::OK)
}

async fn add_rule(
    client: &AdminClient,
    action: RuleAction,
    subject: Subject,
    json: bool,
) -> Result<(), u8> {
    let body = to_json(&NewPolicyRule {
        action,
        fingerprint: subject.fingerprint,
        organisation: subject.organisation,
    })?;
    let rule: PolicyRuleView =
        call(client, Method::POST, "/v1/policy/rules", Some(body), json).await?;
    if !json {
        println!(
            "rule {}: {} {}",
            rule.id.map_or("-".to_owned(), |id| id.to_string()),
            rule.action.as_str(),
            rule.subject
        );
    }
    Ok(())
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<serde_json::Value, u8> {
    serde_json::to_value(value).map_err(|e| fail(exit::FAILURE, e))
}

/// Arrangement ids go into the path as they are: refuse anything that would need escaping.
fn path_segment(id: &str) -> Result<&str, u8> {
    let valid = !id.is_empty()
        && id.len() <= crate::admin::MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if valid {
        Ok(id)
    } else {
        Err(fail(
            exit::DATAERR,
            format!("invalid arrangement id {id:?}"),
        ))
    }
}
