//! `p2pcdn manifest build|show`: the command line of the manifest module (wired into
//! `cli.rs`). Exit codes as in `cli.rs`: 0 ok, 1 runtime failure, 64 bad input.

use std::{
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{ArgGroup, Args, Subcommand};
use rustls::pki_types::{CertificateDer, pem::PemObject as _};

use super::{
    BuildOptions, Delta, MAX_PATH_BYTES, MAX_SIGNED_BYTES, MAX_TTL_MS, Manifest, ManifestError,
    SignedManifest, build_from_dir, build_from_origin, check_path, decode_signed, diff,
    encode_signed, fmt_ms, open, open_any_age, rank_hot_list, sign,
};
use crate::{
    cli::exit,
    config::Config,
    identity::{NodeIdentity, cert_info},
    model::now_ms,
};

/// Largest hot list or path list read.
const MAX_LIST_BYTES: u64 = 64 * 1024 * 1024;
/// Largest certificate file read by `show --cert`.
const MAX_PEM_BYTES: u64 = 64 * 1024;
/// Paths of each kind listed in the text summary of a build.
const DELTA_LINES: usize = 20;

#[derive(Debug, Subcommand)]
pub enum ManifestCommand {
    /// Build and sign a content manifest with this node's key (from --config).
    Build(Box<BuildArgs>),
    /// Verify a signed manifest (signature, expiry, entries) and print it.
    Show(ShowArgs),
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("source").required(true).args(["root", "paths"])))]
pub struct BuildArgs {
    /// Hash the files under this directory (the origin's document root).
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Fetch the paths listed in this file (one per line) from --origin.
    #[arg(long, value_name = "FILE")]
    paths: Option<PathBuf>,
    /// Base URL peers pull objects from, `http(s)://host[:port][/prefix]`; with --paths the
    /// objects are fetched from it now.
    #[arg(long, value_name = "URL")]
    origin: String,
    /// Service name (a `[[services]]` name).
    #[arg(long)]
    service: String,
    /// Version of the new manifest (default: previous + 1 with --previous, else 1).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    version: Option<u64>,
    /// The manifest this one supersedes: version previous + 1, and a summary of the changes.
    #[arg(long, value_name = "FILE")]
    previous: Option<PathBuf>,
    /// Validity in seconds (at most 90 days).
    #[arg(long, default_value_t = 7 * 24 * 3600,
          value_parser = clap::value_parser!(u64).range(1..=(MAX_TTL_MS / 1000) as u64))]
    ttl_s: u64,
    /// Hot set: one path per line, request counts (`PATH COUNT` or `COUNT PATH`), or the web
    /// server's access log (Common/Combined Log Format, e.g. nginx's access.log: successful
    /// GET/HEAD requests are counted); only paths in the manifest are kept, most requested
    /// first.
    #[arg(long, value_name = "FILE")]
    hot: Option<PathBuf>,
    /// Cache-Control of every entry (default: the origin's header with --paths, else
    /// "public, max-age=3600").
    #[arg(long, value_name = "VALUE")]
    cache_control: Option<String>,
    /// With --root: also publish names starting with "." (".well-known" always is).
    #[arg(long)]
    include_hidden: bool,
    /// With --paths: PEM certificates trusted for the origin besides the Mozilla roots.
    #[arg(long, value_name = "PEM")]
    origin_ca: Option<PathBuf>,
    /// With --paths: time limit for connecting, for the response headers, and for a silence
    /// in a body, seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout_s: u64,
    /// Largest object accepted, bytes.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=super::MAX_OBJECT_BYTES))]
    max_object_bytes: Option<u64>,
    /// Where to write the signed manifest.
    #[arg(long, short = 'o', value_name = "FILE")]
    out: PathBuf,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The signed manifest file.
    file: PathBuf,
    /// The primary's certificate (PEM) to verify with (default: this node's, from --config).
    #[arg(long, value_name = "PEM")]
    cert: Option<PathBuf>,
}

/// Why a command stopped: the exit code and a one-line message.
struct Failure {
    code: u8,
    message: String,
}

fn bad(message: impl std::fmt::Display) -> Failure {
    Failure {
        code: exit::DATAERR,
        message: message.to_string(),
    }
}

fn runtime(message: impl std::fmt::Display) -> Failure {
    Failure {
        code: exit::FAILURE,
        message: message.to_string(),
    }
}

fn from_build(e: ManifestError) -> Failure {
    if e.is_bad_input() { bad(e) } else { runtime(e) }
}

/// Runs a `manifest` subcommand; returns the exit code.
pub(crate) fn run(command: ManifestCommand, config: &Path, json: bool) -> u8 {
    let result = match command {
        ManifestCommand::Build(args) => build(*args, config, json),
        ManifestCommand::Show(args) => show(args, config, json),
    };
    match result {
        Ok(()) => exit::OK,
        Err(f) => {
            eprintln!("p2pcdn: {}", f.message);
            f.code
        }
    }
}

fn build(args: BuildArgs, config_path: &Path, json: bool) -> Result<(), Failure> {
    let config = Config::load(config_path).map_err(bad)?;
    let identity = NodeIdentity::load(&config.tls.key, &config.tls.cert).map_err(bad)?;

    let previous = match &args.previous {
        Some(file) => {
            let signed = read_signed(file)?;
            let manifest = open_any_age(&signed, &identity.spki_der)
                .map_err(|e| bad(format!("{}: {e}", file.display())))?;
            if manifest.service != args.service {
                return Err(bad(format!(
                    "{}: a manifest of service {:?}, not {:?}",
                    file.display(),
                    manifest.service,
                    args.service
                )));
            }
            Some(manifest)
        }
        None => None,
    };
    let version = match (&previous, args.version) {
        (Some(prev), Some(v)) if v <= prev.version => {
            return Err(bad(format!(
                "--version {v} must be greater than the previous version {}",
                prev.version
            )));
        }
        (_, Some(v)) => v,
        (Some(prev), None) => prev
            .version
            .checked_add(1)
            .ok_or_else(|| bad("the previous version is the largest possible"))?,
        (None, None) => 1,
    };
    let hot = match &args.hot {
        Some(file) => {
            let text = read_text(file)?;
            Some(rank_hot_list(&text).map_err(|e| bad(format!("{}: {e}", file.display())))?)
        }
        None => None,
    };

    let mut opts = BuildOptions::new(identity.fingerprint, &args.service, &args.origin);
    opts.version = version;
    opts.ttl_ms = i64::try_from(args.ttl_s.saturating_mul(1000)).unwrap_or(i64::MAX);
    opts.cache_control = args.cache_control.clone();
    opts.include_hidden = args.include_hidden;
    if let Some(max) = args.max_object_bytes {
        opts.max_object_bytes = max;
    }
    let timeout = Duration::from_secs(args.timeout_s);
    opts.fetch.connect_timeout = timeout;
    opts.fetch.response_timeout = timeout;
    opts.fetch.idle_timeout = timeout;
    if let Some(pem) = &args.origin_ca {
        opts.fetch.extra_roots = read_certs(pem)?;
    }

    let runtime_ = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| runtime(format!("cannot start the runtime: {e}")))?;
    let mut manifest = match (&args.root, &args.paths) {
        (Some(root), _) => runtime_
            .block_on(build_from_dir(root, opts))
            .map_err(from_build)?,
        (None, Some(file)) => {
            let paths = read_paths(file)?;
            runtime_
                .block_on(build_from_origin(&args.origin, &paths, opts))
                .map_err(from_build)?
        }
        (None, None) => return Err(bad("give --root DIR or --paths FILE")),
    };
    let hot_ignored = hot.map(|ranked| manifest.set_hot(ranked));

    let signed = sign(&identity, &manifest);
    let encoded = encode_signed(&signed);
    write_atomically(&args.out, &encoded)?;
    let delta = previous.as_ref().map(|prev| diff(prev, &manifest));
    let sha256 = hex::encode(signed.sha256());
    if json {
        let summary = serde_json::json!({
            "out": args.out,
            "service": manifest.service,
            "version": manifest.version,
            "primary": manifest.primary,
            "origin": manifest.origin,
            "entries": manifest.entries.len(),
            "total_bytes": manifest.total_bytes(),
            "hot": manifest.hot.len(),
            "hot_ignored": hot_ignored,
            "created_ms": manifest.created_ms,
            "expires_ms": manifest.expires_ms,
            "sha256": sha256,
            "bytes": encoded.len(),
            "previous_version": previous.as_ref().map(|p| p.version),
            "delta": delta,
        });
        println!("{summary:#}");
    } else {
        print!(
            "{}",
            build_summary(
                &args.out,
                &manifest,
                &sha256,
                hot_ignored,
                previous.as_ref().zip(delta.as_ref())
            )
        );
    }
    Ok(())
}

fn build_summary(
    out: &Path,
    m: &Manifest,
    sha256: &str,
    hot_ignored: Option<usize>,
    change: Option<(&Manifest, &Delta)>,
) -> String {
    let mut text = format!("wrote {}\n", out.display());
    text.push_str(&format!(
        "service {}, version {}, {} entries, {} bytes\n",
        m.service,
        m.version,
        m.entries.len(),
        m.total_bytes()
    ));
    text.push_str(&format!("origin {}\n", m.origin));
    text.push_str(&format!("expires {}\n", fmt_ms(m.expires_ms)));
    text.push_str(&format!("sha256 {sha256}\n"));
    if let Some(ignored) = hot_ignored {
        text.push_str(&format!(
            "hot set {} paths ({ignored} ignored: not in the manifest or repeated)\n",
            m.hot.len()
        ));
    }
    if let Some((prev, delta)) = change {
        text.push_str(&format!(
            "changes since version {}: {} added, {} changed, {} removed\n",
            prev.version,
            delta.added.len(),
            delta.changed.len(),
            delta.removed.len()
        ));
        for (mark, paths) in [
            ('+', &delta.added),
            ('~', &delta.changed),
            ('-', &delta.removed),
        ] {
            for path in paths.iter().take(DELTA_LINES) {
                text.push_str(&format!("  {mark} {path}\n"));
            }
            if paths.len() > DELTA_LINES {
                text.push_str(&format!(
                    "  {mark} … and {} more\n",
                    paths.len() - DELTA_LINES
                ));
            }
        }
    }
    text
}

fn show(args: ShowArgs, config_path: &Path, json: bool) -> Result<(), Failure> {
    let signed = read_signed(&args.file)?;
    let cert_path = match &args.cert {
        Some(pem) => pem.clone(),
        None => {
            let config = Config::load(config_path).map_err(|e| {
                bad(format!(
                    "{e} (give --cert PEM: the primary's certificate to verify with)"
                ))
            })?;
            config.tls.cert
        }
    };
    let pem = read_bounded(&cert_path, MAX_PEM_BYTES)?;
    let cert = CertificateDer::from_pem_slice(&pem).map_err(|e| {
        bad(format!(
            "{}: not a pem certificate: {e}",
            cert_path.display()
        ))
    })?;
    let info = cert_info(&cert).map_err(|e| bad(format!("{}: {e}", cert_path.display())))?;
    let now = now_ms();
    let manifest = open(&signed, &info.spki_der, now)
        .map_err(|e| bad(format!("{}: {e}", args.file.display())))?;
    let sha256 = hex::encode(signed.sha256());
    if json {
        let mut value = serde_json::to_value(&manifest).map_err(runtime)?;
        if let Some(object) = value.as_object_mut() {
            object.insert("sha256".into(), sha256.into());
            object.insert("total_bytes".into(), manifest.total_bytes().into());
        }
        println!("{value:#}");
    } else {
        print!("{}", show_text(&args.file, &manifest, &sha256, now));
    }
    Ok(())
}

fn show_text(file: &Path, m: &Manifest, sha256: &str, now: i64) -> String {
    let mut text = format!("manifest {} (signature valid)\n", file.display());
    text.push_str(&format!("sha256   {sha256}\n"));
    text.push_str(&format!("primary  {}\n", m.primary));
    text.push_str(&format!("service  {}\n", m.service));
    text.push_str(&format!("version  {}\n", m.version));
    text.push_str(&format!("origin   {}\n", m.origin));
    text.push_str(&format!("created  {}\n", fmt_ms(m.created_ms)));
    text.push_str(&format!(
        "expires  {} (in {})\n",
        fmt_ms(m.expires_ms),
        human_duration(m.expires_ms - now)
    ));
    text.push_str(&format!(
        "entries  {} ({} bytes)\n",
        m.entries.len(),
        m.total_bytes()
    ));
    text.push_str(&format!("hot      {}\n", m.hot.len()));
    for (rank, path) in m.hot.iter().enumerate().take(DELTA_LINES) {
        text.push_str(&format!("  {:>3}. {path}\n", rank + 1));
    }
    if m.hot.len() > DELTA_LINES {
        text.push_str(&format!("  … and {} more\n", m.hot.len() - DELTA_LINES));
    }
    if !m.entries.is_empty() {
        let width = m
            .entries
            .keys()
            .map(|p| p.chars().count())
            .max()
            .unwrap_or(4)
            .clamp(4, 60);
        text.push_str(&format!(
            "{:<width$}  {:>12}  {:<16}  SHA256\n",
            "PATH", "SIZE", "CONTENT-TYPE"
        ));
        for e in m.entries.values() {
            text.push_str(&format!(
                "{:<width$}  {:>12}  {:<16}  {}\n",
                e.path,
                e.size,
                e.content_type,
                hex::encode(&e.sha256[..8])
            ));
        }
    }
    text
}

fn human_duration(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86_400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, Failure> {
    let io = |e: std::io::Error| bad(format!("{}: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(bad(format!(
            "{}: larger than {limit} bytes",
            path.display()
        )));
    }
    Ok(bytes)
}

fn read_text(path: &Path) -> Result<String, Failure> {
    String::from_utf8(read_bounded(path, MAX_LIST_BYTES)?)
        .map_err(|_| bad(format!("{}: not utf-8 text", path.display())))
}

fn read_signed(path: &Path) -> Result<SignedManifest, Failure> {
    let bytes = read_bounded(path, MAX_SIGNED_BYTES as u64)?;
    decode_signed(&bytes).map_err(|e| bad(format!("{}: {e}", path.display())))
}

/// One path per line (empty lines and `#` comments skipped), each a normalised path.
fn read_paths(path: &Path) -> Result<Vec<String>, Failure> {
    let text = read_text(path)?;
    let mut paths = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.len() > MAX_PATH_BYTES {
            return Err(bad(format!(
                "{} line {}: longer than {MAX_PATH_BYTES} bytes",
                path.display(),
                n + 1
            )));
        }
        check_path(line).map_err(|e| bad(format!("{} line {}: {e}", path.display(), n + 1)))?;
        paths.push(line.to_owned());
    }
    if paths.is_empty() {
        return Err(bad(format!("{}: no paths", path.display())));
    }
    Ok(paths)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Failure> {
    let pem = read_bounded(path, MAX_LIST_BYTES)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(bad(format!("{}: no certificate", path.display())));
    }
    Ok(certs)
}

/// Writes `bytes` to a temporary file next to `out` and renames it over `out`, so a reader
/// (the web server publishing it) never sees half a manifest.
fn write_atomically(out: &Path, bytes: &[u8]) -> Result<(), Failure> {
    let name = out
        .file_name()
        .ok_or_else(|| bad(format!("{}: not a file name", out.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = out.with_file_name(tmp_name);
    let io = |e: std::io::Error| runtime(format!("{}: {e}", out.display()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, out)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}
