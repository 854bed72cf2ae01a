//! `cargo xtask <command>`: every p2pcdn workflow from one entry point.
//!
//! xtask depends on none of the project's crates: building redirector-user runs its build
//! script, which needs bpf-linker, which `cargo xtask setup` installs. Everything else runs as
//! cargo subprocesses.

mod host;
mod launch;
mod netns;
mod run;
mod setup;
mod suite;
mod workspace;

use std::process::ExitCode;

use clap::{
    Parser, Subcommand,
    builder::{PossibleValue, PossibleValuesParser},
};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "p2pcdn workflows",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what this machine lacks (LLVM 22 packages, rust-src, bpf-linker, test tools)
    /// and check the kernel (BTF) and privileges. Idempotent and quick when all is there.
    Setup,
    /// Build the workspace (and, through redirector-user's build script, the XDP program).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Format check, clippy for the host and for bpfel-unknown-none, unit tests, then the
    /// privileged tests one at a time. Stops at the first failing step.
    Test {
        /// Skip formatting and lints (local iteration only; CI runs everything).
        #[arg(long)]
        quick: bool,
    },
    /// Run the data-plane demo in throwaway network namespaces (needs root). Ctrl-C stops it
    /// and waits for its teardown.
    Demo {
        /// Passed to the demo binary.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run a benchmark and print its JSON results (target/bench/NAME.json). Needs root.
    Bench {
        /// Which benchmark.
        #[arg(value_parser = PossibleValuesParser::new(
            launch::BENCHES.iter().map(|b| PossibleValue::new(b.name).help(b.about))
        ))]
        name: String,
        /// Passed to the benchmark binary.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The flash-crowd load test (same as `cargo xtask bench loadtest`): a netns testbed driven
    /// with and without peering; writes target/bench/loadtest.json and an SVG. Needs root.
    Loadtest {
        /// Passed to the load-test binary.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run a simulation and print its JSON results (`trust`: target/bench/trust.json).
    Sim {
        #[arg(value_parser = ["trust"])]
        name: String,
        /// Passed to the simulation binary.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Remove leftovers of interrupted tests: network namespaces and host veths named with the
    /// prefix (and processes left in those namespaces), and /sys/fs/bpf/<prefix>* pins.
    CleanNetns {
        #[arg(long, default_value = "p2p")]
        prefix: String,
        /// The bpffs mount holding the pin roots (p2pcdn pins under /sys/fs/bpf/p2pcdn).
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: std::path::PathBuf,
        /// Only list what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            if err.downcast_ref::<launch::NeedsPrivileges>().is_some() {
                ExitCode::from(77)
            } else if err.downcast_ref::<run::Interrupted>().is_some() {
                ExitCode::from(130)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn dispatch(command: Cmd) -> anyhow::Result<()> {
    let root = workspace::root()?;
    match command {
        Cmd::Setup => setup::setup(),
        Cmd::Build { release } => build(&root, release),
        Cmd::Test { quick } => suite::test(&root, quick),
        Cmd::Demo { args } => launch::demo(&root, &args),
        Cmd::Bench { name, args } => launch::bench(&root, named(&name)?, &args),
        Cmd::Loadtest { args } => launch::bench(&root, named("loadtest")?, &args),
        Cmd::Sim { name, args } => launch::bench(&root, named(&name)?, &args),
        Cmd::CleanNetns {
            prefix,
            bpffs,
            dry_run,
        } => netns::clean(&prefix, &bpffs, dry_run),
    }
}

fn named(name: &str) -> anyhow::Result<&'static launch::Bench> {
    launch::find(name).ok_or_else(|| anyhow::anyhow!("unknown benchmark {name}"))
}

/// `cargo xtask build [--release]`: the default members, which include redirector-user, whose
/// build script builds the XDP program.
fn build(root: &std::path::Path, release: bool) -> anyhow::Result<()> {
    setup::ensure()?;
    let mut cmd = run::cargo(root);
    cmd.arg("build");
    if release {
        cmd.arg("--release");
    }
    run::check(run::visible(&mut cmd)?, "cargo build")
}
