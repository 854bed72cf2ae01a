//! `cargo xtask demo` and `cargo xtask bench NAME`: long-running privileged programs from the
//! test crate, run in release mode with Ctrl-C forwarded so they tear down what they set up.

use std::{
    fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::{Context as _, bail};

use crate::{
    host, run,
    suite::{REDIRECTOR_BIN, REDIRECTOR_VAR},
    workspace::Metadata,
};

/// A benchmark: a binary that measures and writes its results as JSON.
#[derive(Debug, Clone, Copy)]
pub struct Bench {
    /// The name given to `cargo xtask bench`.
    pub name: &'static str,
    pub package: &'static str,
    pub bin: &'static str,
    /// What it measures, for `--help`.
    pub about: &'static str,
    /// Whether it needs root (network namespaces, BPF); a simulation does not.
    pub privileged: bool,
}

/// Every benchmark `cargo xtask bench` knows. To add one (surrogate, loadtest, trust, ...),
/// write its binary so it takes `--out PATH` and writes its JSON results there, and add a line
/// here; xtask passes `--out target/bench/<name>.json`.
pub const BENCHES: &[Bench] = &[
    Bench {
        name: "dataplane",
        package: "p2pcdn-tests",
        bin: "bench-dataplane",
        about: "XDP program paths timed with BPF_PROG_TEST_RUN, ns/packet net of an empty-program floor",
        privileged: true,
    },
    Bench {
        name: "control",
        package: "p2pcdn-tests",
        bin: "bench-control",
        about: "discovery and negotiation times of 3, 10 and 100 in-process controllers over loopback TLS",
        privileged: true,
    },
    Bench {
        name: "surrogate",
        package: "p2pcdn-tests",
        bin: "bench-surrogate",
        about: "cached 10 KiB and 1 MiB objects: the surrogate against Debian's nginx, same files, same load generator (wrk), loopback",
        privileged: false,
    },
    Bench {
        name: "loadtest",
        package: "p2pcdn-tests",
        bin: "loadtest",
        about: "flash crowd on a netns testbed with and without peering: onset to steering, discovery + negotiation, success rate, p99 (also `cargo xtask loadtest`)",
        privileged: true,
    },
    Bench {
        name: "trust",
        package: "p2pcdn-tests",
        bin: "sim-trust",
        about: "adversarial trust simulation over 100 seeds: rounds to isolate, honest isolated, corrupted fraction (also `cargo xtask sim trust`)",
        privileged: false,
    },
];

/// The option telling a bench binary where to write its JSON.
pub const OUT_FLAG: &str = "--out";

pub fn find(name: &str) -> Option<&'static Bench> {
    BENCHES.iter().find(|bench| bench.name == name)
}

/// `target/bench/<name>.json`.
pub fn output_path(target_dir: &Path, bench: &Bench) -> PathBuf {
    target_dir
        .join("bench")
        .join(format!("{}.json", bench.name))
}

/// Missing privileges, reported with exit status 77 like the CLI does.
#[derive(Debug)]
pub struct NeedsPrivileges {
    pub what: String,
    pub missing: Vec<&'static str>,
}

impl std::fmt::Display for NeedsPrivileges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} (missing {})",
            self.what,
            host::PRIVILEGE_HINT,
            self.missing.join(" and ")
        )
    }
}

impl std::error::Error for NeedsPrivileges {}

fn require_privileges(what: &str) -> anyhow::Result<()> {
    let privileges = host::Privileges::read();
    if privileges.sufficient() {
        Ok(())
    } else {
        Err(NeedsPrivileges {
            what: what.to_owned(),
            missing: privileges.missing,
        }
        .into())
    }
}

/// `cargo xtask demo`: the flash-crowd demo (bin `demo`: a crowd without and with peering
/// on a netns testbed, live view, report, `target/demo/`). The data-plane-only scenario is
/// still there: `cargo run --release -p p2pcdn-tests --bin demo-dataplane`.
pub fn demo(root: &Path, args: &[String]) -> anyhow::Result<()> {
    const PACKAGE: &str = "p2pcdn-tests";
    const BIN: &str = "demo";
    require_privileges("the demo")?;
    let metadata = Metadata::load(root)?;
    metadata.require_bin(PACKAGE, BIN)?;
    // The demo runs the p2pcdn-redirector CLI and the p2pcdn daemons from target/release.
    crate::build(root, true)?;
    let mut cmd = run::cargo(root);
    cmd.env(REDIRECTOR_VAR, release_redirector(&metadata))
        .args(["run", "--release", "-p", PACKAGE, "--bin", BIN, "--"])
        .args(args);
    run::check(run::forwarding_signals(&mut cmd, "demo")?, "the demo")
}

/// The release CLI binary, built by `cargo build --release` of the default members.
fn release_redirector(metadata: &Metadata) -> PathBuf {
    metadata.target_dir.join("release").join(REDIRECTOR_BIN)
}

/// `cargo xtask bench NAME`.
pub fn bench(root: &Path, bench: &Bench, args: &[String]) -> anyhow::Result<()> {
    if bench.privileged {
        require_privileges(&format!("the {} benchmark", bench.name))?;
    }
    if args
        .iter()
        .any(|arg| arg == OUT_FLAG || arg.starts_with("--out="))
    {
        bail!(
            "xtask chooses the results file itself (target/bench/{}.json): drop {OUT_FLAG}",
            bench.name
        );
    }
    let metadata = Metadata::load(root)?;
    metadata.require_bin(bench.package, bench.bin)?;
    crate::build(root, true)?;
    let output = output_path(&metadata.target_dir, bench);
    if let Some(dir) = output.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let started = SystemTime::now();
    let mut cmd = run::cargo(root);
    cmd.env(REDIRECTOR_VAR, release_redirector(&metadata))
        .args([
            "run",
            "--release",
            "-p",
            bench.package,
            "--bin",
            bench.bin,
            "--",
            OUT_FLAG,
        ])
        .arg(&output)
        .args(args);
    let what = format!("{} benchmark", bench.name);
    run::check(run::forwarding_signals(&mut cmd, &what)?, &what)?;
    report(&output, started)
}

/// Prints the results file, refusing one that this run did not write (a stale file from an
/// earlier run must not pass for fresh results).
fn report(output: &Path, started: SystemTime) -> anyhow::Result<()> {
    let modified = fs::metadata(output)
        .and_then(|meta| meta.modified())
        .with_context(|| format!("the benchmark finished but wrote no {}", output.display()))?;
    if modified < started {
        bail!(
            "{} is older than this run: the benchmark did not write its results",
            output.display()
        );
    }
    let text =
        fs::read_to_string(output).with_context(|| format!("cannot read {}", output.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", output.display()))?;
    let pretty = serde_json::to_string_pretty(&value).unwrap_or(text);
    println!("\nresults: {}\n{pretty}", output.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn bench_names_are_unique_and_found() {
        for bench in BENCHES {
            assert_eq!(find(bench.name).map(|b| b.bin), Some(bench.bin));
        }
        assert!(find("nope").is_none());
        assert_eq!(
            output_path(Path::new("/w/target"), &BENCHES[0]),
            PathBuf::from("/w/target/bench/dataplane.json")
        );
    }

    #[test]
    fn stale_or_invalid_results_are_refused() {
        let dir = std::env::temp_dir().join(format!("xtask-bench-{}", std::process::id()));
        let _ = fs::create_dir_all(&dir);
        let file = dir.join("dataplane.json");
        assert!(report(&file, SystemTime::now()).is_err(), "missing file");

        let _ = fs::write(&file, r#"{"floor_ns": 12}"#);
        let later = SystemTime::now() + Duration::from_secs(3600);
        let Err(err) = report(&file, later) else {
            panic!("a file older than the run must be refused");
        };
        assert!(err.to_string().contains("older than this run"), "{err}");

        let earlier = SystemTime::now() - Duration::from_secs(3600);
        assert!(report(&file, earlier).is_ok());
        let _ = fs::write(&file, "not json");
        assert!(report(&file, earlier).is_err());
        let _ = fs::remove_dir_all(&dir);
    }
}
