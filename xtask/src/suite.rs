//! `cargo xtask test`: formatting, clippy for the host and for BPF, unit tests, then the
//! privileged tests one at a time. Stops at the first failing step and names it.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{host, run, setup, workspace::Metadata};

/// Packages whose tests need root (BPF_PROG_TEST_RUN, attach, network namespaces). Their
/// tests run in the serialized step only: privileged tests share kernel state (namespaces,
/// pins, attached programs) and must not run twice or in parallel.
pub const PRIVILEGED_PACKAGES: &[&str] = &["p2pcdn-tests", "redirector-user"];

/// Tells tests, the demo and benchmarks where the `p2pcdn-redirector` binary xtask built is.
pub const REDIRECTOR_VAR: &str = "P2PCDN_REDIRECTOR";
pub const REDIRECTOR_BIN: &str = "p2pcdn-redirector";

/// The kernel crate, linted a second time for its real target.
const EBPF_PACKAGE: &str = "redirector-ebpf";
const BPF_TARGET: &str = "bpfel-unknown-none";

pub struct Step {
    pub name: &'static str,
    pub cmd: Command,
    /// What to do about a failure, when there is something specific to say.
    pub hint: Option<&'static str>,
    /// The step runs `cargo test`: its results count towards the closing line.
    pub runs_tests: bool,
}

/// The steps of `cargo xtask test`, in order. `quick` leaves out formatting and lints.
pub fn steps(root: &Path, target_dir: &Path, quick: bool) -> Vec<Step> {
    let mut steps = Vec::new();
    if !quick {
        let mut fmt = run::cargo(root);
        fmt.args(["+nightly", "fmt", "--all", "--", "--check"]);
        steps.push(Step {
            name: "format",
            cmd: fmt,
            hint: Some(
                "run `cargo +nightly fmt --all` (nightly: rustfmt.toml uses unstable import options)",
            ),
            runs_tests: false,
        });

        let mut clippy = run::cargo(root);
        clippy.args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]);
        steps.push(Step {
            name: "clippy (host)",
            cmd: clippy,
            hint: None,
            runs_tests: false,
        });

        // Linting the kernel crate for its own target is the only way clippy sees src/xdp.rs
        // (it is compiled only for target_arch = "bpf"). A separate target directory keeps this
        // build-std build from invalidating the host artifacts, and -p keeps the `user`
        // feature other members enable from leaking into it.
        let mut bpf = run::cargo(root);
        bpf.env("CARGO_TARGET_DIR", target_dir.join("bpf-clippy"))
            // The cfg aya-build passes for the real build; aya-ebpf selects per-arch code by it.
            .env(
                "CARGO_ENCODED_RUSTFLAGS",
                format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH),
            )
            .args([
                "+nightly",
                "clippy",
                "-p",
                EBPF_PACKAGE,
                "--target",
                BPF_TARGET,
                "-Z",
                "build-std=core",
                "--release",
                "--",
                "-D",
                "warnings",
            ]);
        steps.push(Step {
            name: "clippy (bpfel-unknown-none)",
            cmd: bpf,
            hint: None,
            runs_tests: false,
        });
    }

    let mut unit = run::cargo(root);
    // --no-fail-fast: one failing test binary must not hide the results of the others.
    unit.args(["test", "--no-fail-fast", "--workspace"]);
    for package in PRIVILEGED_PACKAGES {
        unit.args(["--exclude", package]);
    }
    steps.push(Step {
        name: "unit tests",
        cmd: unit,
        hint: None,
        runs_tests: true,
    });

    // The privileged tests drive the p2pcdn-redirector binary; `cargo test -p` does not build
    // another package's binaries, so build the default members first.
    let mut build = run::cargo(root);
    build.arg("build");
    steps.push(Step {
        name: "build (binaries the privileged tests run)",
        cmd: build,
        hint: None,
        runs_tests: false,
    });

    let mut privileged = run::cargo(root);
    privileged
        .env(
            REDIRECTOR_VAR,
            target_dir.join("debug").join(REDIRECTOR_BIN),
        )
        .args(["test", "--no-fail-fast"]);
    for package in PRIVILEGED_PACKAGES {
        privileged.args(["-p", package]);
    }
    privileged.args(["--", "--test-threads=1"]);
    steps.push(Step {
        name: "privileged tests (one at a time)",
        cmd: privileged,
        hint: Some(
            "if an interrupted run left namespaces or pins behind, `cargo xtask clean-netns` removes them",
        ),
        runs_tests: true,
    });
    steps
}

/// Test counts summed over `test result:` lines.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl Counts {
    fn add(&mut self, other: Self) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
    }
}

/// Parses libtest's `test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; ...`.
pub fn parse_test_result(line: &str) -> Option<Counts> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let (_, numbers) = rest.split_once(". ")?;
    let mut counts = Counts::default();
    for part in numbers.split(';') {
        let mut words = part.split_whitespace();
        let (Some(n), Some(what)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match what {
            "passed" => counts.passed = n,
            "failed" => counts.failed = n,
            "ignored" => counts.ignored = n,
            _ => {}
        }
    }
    Some(counts)
}

/// Runs `cargo test`, echoing its output and summing its result lines.
fn run_counting(cmd: &mut Command) -> anyhow::Result<(ExitStatus, Counts)> {
    println!("$ {}", run::display(cmd));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start cargo")?;
    let mut counts = Counts::default();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            println!("{line}");
            if let Some(result) = parse_test_result(&line) {
                counts.add(result);
            }
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    Ok((status, counts))
}

/// Refuses to start a CI run that cannot pass, before spending minutes building.
fn preflight(ci: bool) -> anyhow::Result<()> {
    let privileges = host::privilege_check();
    let btf = host::btf_check();
    let kernel = host::kernel_check();
    for check in [&kernel, &btf, &privileges] {
        println!("  {:<16} {}", check.label, check.detail);
    }
    let blocking: Vec<&host::HostCheck> = [&kernel, &btf, &privileges]
        .into_iter()
        .filter(|check| !check.ok)
        .collect();
    if blocking.is_empty() {
        return Ok(());
    }
    if ci {
        let reasons: Vec<&str> = blocking.iter().map(|check| check.detail.as_str()).collect();
        bail!(
            "CI=true and the privileged tests cannot run here: {}",
            reasons.join("; ")
        );
    }
    println!("  (not CI: the privileged tests will skip with a printed reason)");
    Ok(())
}

fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| !value.is_empty() && value != "false" && value != "0")
}

/// `cargo xtask test`.
pub fn test(root: &Path, quick: bool) -> anyhow::Result<()> {
    let ci = is_ci();
    println!(
        "test: {} run{}",
        if quick { "quick (no lints)" } else { "full" },
        if ci {
            ", CI=true: privileged tests fail instead of skipping"
        } else {
            ""
        }
    );
    preflight(ci)?;
    setup::ensure()?;
    let metadata = Metadata::load(root)?;
    let mut steps = steps(root, &metadata.target_dir, quick);
    let total = steps.len();
    let mut counts = Counts::default();
    let mut timings: Vec<(&'static str, Duration)> = Vec::new();
    let start = Instant::now();
    for (index, step) in steps.iter_mut().enumerate() {
        println!("\n==> [{}/{total}] {}", index + 1, step.name);
        let step_start = Instant::now();
        let status = if step.runs_tests {
            let (status, step_counts) = run_counting(&mut step.cmd)?;
            counts.add(step_counts);
            status
        } else {
            run::visible(&mut step.cmd)?
        };
        timings.push((step.name, step_start.elapsed()));
        if !status.success() {
            if step.runs_tests {
                print_counts(counts);
            }
            let hint = step
                .hint
                .map(|hint| format!("; {hint}"))
                .unwrap_or_default();
            bail!(
                "step {}/{total} `{}` failed ({}){hint}",
                index + 1,
                step.name,
                run::describe_status(status)
            );
        }
    }
    println!(
        "\ntest: all {total} steps passed in {:.0} s",
        start.elapsed().as_secs_f64()
    );
    for (name, elapsed) in timings {
        println!("  {name:<44} {:>6.1} s", elapsed.as_secs_f64());
    }
    print_counts(counts);
    Ok(())
}

/// The closing line, in the plain `N passed, N failed, N skipped` form CI logs are read for.
fn print_counts(counts: Counts) {
    println!(
        "tests: {} passed, {} failed, {} skipped",
        counts.passed, counts.failed, counts.ignored
    );
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn result_lines_parse() {
        let ok = "test result: ok. 12 passed; 0 failed; 3 ignored; 0 measured; 0 filtered out; finished in 0.41s";
        assert_eq!(
            parse_test_result(ok),
            Some(Counts {
                passed: 12,
                failed: 0,
                ignored: 3
            })
        );
        let failed =
            "test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out";
        assert_eq!(
            parse_test_result(failed),
            Some(Counts {
                passed: 2,
                failed: 1,
                ignored: 0
            })
        );
        assert_eq!(parse_test_result("running 3 tests"), None);
        assert_eq!(parse_test_result("test foo ... ok"), None);
    }

    fn shown(quick: bool) -> Vec<(String, String)> {
        steps(Path::new("/repo"), &PathBuf::from("/repo/target"), quick)
            .iter()
            .map(|step| (step.name.to_owned(), run::display(&step.cmd)))
            .collect()
    }

    #[test]
    fn full_run_lints_twice_then_tests_privileged_serially() {
        let steps = shown(false);
        let names: Vec<&str> = steps.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(
            names,
            [
                "format",
                "clippy (host)",
                "clippy (bpfel-unknown-none)",
                "unit tests",
                "build (binaries the privileged tests run)",
                "privileged tests (one at a time)"
            ]
        );
        assert_eq!(steps[0].1, "cargo +nightly fmt --all -- --check");
        assert_eq!(
            steps[1].1,
            "cargo clippy --workspace --all-targets -- -D warnings"
        );
        let bpf = &steps[2].1;
        assert!(
            bpf.contains("CARGO_TARGET_DIR=/repo/target/bpf-clippy"),
            "{bpf}"
        );
        assert!(
            bpf.ends_with(
                "cargo +nightly clippy -p redirector-ebpf --target bpfel-unknown-none \
                 -Z build-std=core --release -- -D warnings"
            ),
            "{bpf}"
        );
        assert_eq!(
            steps[3].1,
            "cargo test --no-fail-fast --workspace --exclude p2pcdn-tests --exclude redirector-user"
        );
        assert_eq!(
            steps[5].1,
            "P2PCDN_REDIRECTOR=/repo/target/debug/p2pcdn-redirector \
             cargo test --no-fail-fast -p p2pcdn-tests -p redirector-user -- --test-threads=1"
        );
    }

    #[test]
    fn quick_run_skips_lints_only() {
        let names: Vec<String> = shown(true).into_iter().map(|(name, _)| name).collect();
        assert_eq!(
            names,
            [
                "unit tests",
                "build (binaries the privileged tests run)",
                "privileged tests (one at a time)"
            ]
        );
    }
}
