//! `cargo xtask setup`: installs what a fresh machine of our kind (Debian 12, rustup with the
//! stable and nightly toolchains) lacks to build and test p2pcdn, and reports what it cannot
//! install (kernel BTF, privileges).
//!
//! The work splits into three parts so the decision can be tested without a machine:
//! [`Facts::gather`] probes the system (fast: one dpkg-query, two rustup calls, one
//! `bpf-linker --version`), [`plan`] turns facts into items with the commands that fix them
//! (pure), and [`execute`] runs them with progress.

use std::{
    collections::BTreeSet,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{host, run};

/// Debian packages bpf-linker is built against (the recipe verified in DEVELOPERS.md).
pub const BUILD_PACKAGES: &[&str] = &["llvm-22-dev", "libpolly-22-dev", "libzstd-dev"];

/// A program the tests, the demo or a benchmark runs, and the Debian package that has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuntimeTool {
    pub command: &'static str,
    pub package: &'static str,
    pub used_by: &'static str,
}

/// The one list of programs the test suite, the demo and the benchmarks need at run time.
/// Add a line here when a test starts using a new tool (`wrk`, `curl`, ...): `setup` installs
/// it and `build`/`test`/`demo`/`bench` notice when it is missing.
pub const RUNTIME_TOOLS: &[RuntimeTool] = &[
    RuntimeTool {
        command: "ip",
        package: "iproute2",
        used_by: "network-namespace testbeds (ip netns, veth)",
    },
    RuntimeTool {
        command: "nsenter",
        package: "util-linux",
        used_by: "running p2pcdn-redirector inside a testbed namespace",
    },
    RuntimeTool {
        command: "nginx",
        package: "nginx",
        used_by: "the surrogate benchmark's baseline (nginx serving the same files on loopback)",
    },
    RuntimeTool {
        command: "wrk",
        package: "wrk",
        used_by: "the surrogate benchmark's load generator (same for the surrogate and nginx)",
    },
];

/// Which rustup toolchain a component belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Toolchain {
    /// `nightly`: the eBPF build (`-Z build-std=core --target bpfel-unknown-none`) and rustfmt.
    Nightly,
    /// The toolchain cargo picks in the repository (stable): host builds and clippy.
    Default,
}

impl Toolchain {
    fn name(self) -> &'static str {
        match self {
            Self::Nightly => "nightly",
            Self::Default => "default",
        }
    }
}

/// A rustup component a workflow needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Component {
    pub toolchain: Toolchain,
    pub name: &'static str,
    pub used_by: &'static str,
}

pub const COMPONENTS: &[Component] = &[
    Component {
        toolchain: Toolchain::Nightly,
        name: "rust-src",
        used_by: "-Z build-std=core for bpfel-unknown-none",
    },
    Component {
        toolchain: Toolchain::Nightly,
        name: "rustfmt",
        used_by: "cargo +nightly fmt (rustfmt.toml uses unstable import options)",
    },
    Component {
        toolchain: Toolchain::Nightly,
        name: "clippy",
        used_by: "clippy for bpfel-unknown-none",
    },
    Component {
        toolchain: Toolchain::Default,
        name: "clippy",
        used_by: "clippy for the host",
    },
];

/// The bpf-linker release verified with LLVM 22 and our toolchains (pinned so a fresh machine
/// gets what was verified, not whatever was published since).
pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// Where Debian's llvm-22-dev lives; bpf-linker's build finds LLVM through it.
pub const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// What the probes found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// dpkg-query answered (a Debian-like system).
    pub dpkg: bool,
    /// Debian packages in state "installed" among those we asked about.
    pub installed_debs: BTreeSet<String>,
    /// The nightly toolchain is installed (rustup cannot fetch toolchains here, only components).
    pub nightly: bool,
    /// Components from [`COMPONENTS`] that are missing.
    pub missing_components: Vec<Component>,
    /// What `bpf-linker --version` printed, if it ran successfully.
    pub bpf_linker: Option<String>,
    /// Effective uid 0 (apt-get needs it).
    pub root: bool,
}

/// One command that fixes (part of) a missing item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    AptUpdate,
    AptInstall(Vec<&'static str>),
    AddComponent(Component),
    InstallBpfLinker,
}

/// One line of the summary: what it is and the actions needed (none: already present).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub label: String,
    pub actions: Vec<Action>,
    /// What was found, when there is more to say than "present".
    pub found: Option<String>,
}

/// Why setup cannot proceed on this machine; each is a one-line message with what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blocker {
    NoDpkg(Vec<&'static str>),
    NotRoot(Vec<&'static str>),
    NoNightly,
}

impl std::fmt::Display for Blocker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoDpkg(packages) => write!(
                f,
                "setup installs Debian packages with apt-get, and this system has no dpkg-query: \
                 install the equivalents of {} yourself",
                packages.join(" ")
            ),
            Self::NotRoot(packages) => write!(
                f,
                "installing Debian packages needs root: run `sudo apt-get update && sudo apt-get \
                 install -y {}` or run `cargo xtask setup` as root",
                packages.join(" ")
            ),
            Self::NoNightly => write!(
                f,
                "the nightly toolchain is not installed (or rustup is not on PATH): the eBPF build \
                 needs it, and setup does not download toolchains"
            ),
        }
    }
}

/// Decides, from the facts alone, what is present and which commands install the rest, in an
/// order that works: LLVM before bpf-linker (it links against libLLVM), one `apt-get update`
/// before the first install.
pub fn plan(facts: &Facts) -> Result<Vec<Item>, Blocker> {
    let missing_build: Vec<&'static str> = BUILD_PACKAGES
        .iter()
        .copied()
        .filter(|package| !facts.installed_debs.contains(*package))
        .collect();
    let mut missing_runtime: Vec<&'static str> = Vec::new();
    for tool in RUNTIME_TOOLS {
        if !facts.installed_debs.contains(tool.package) && !missing_runtime.contains(&tool.package)
        {
            missing_runtime.push(tool.package);
        }
    }
    let all_missing: Vec<&'static str> = missing_build
        .iter()
        .chain(&missing_runtime)
        .copied()
        .collect();
    if !all_missing.is_empty() {
        if !facts.dpkg {
            return Err(Blocker::NoDpkg(all_missing));
        }
        if !facts.root {
            return Err(Blocker::NotRoot(all_missing));
        }
    }
    if !facts.nightly {
        return Err(Blocker::NoNightly);
    }

    let mut updated = false;
    let mut apt = |packages: Vec<&'static str>| {
        let mut actions = Vec::new();
        if !packages.is_empty() {
            if !updated {
                actions.push(Action::AptUpdate);
                updated = true;
            }
            actions.push(Action::AptInstall(packages));
        }
        actions
    };

    let mut items = vec![Item {
        label: format!(
            "Debian packages for bpf-linker ({})",
            BUILD_PACKAGES.join(" ")
        ),
        actions: apt(missing_build),
        found: None,
    }];
    for component in COMPONENTS {
        let missing = facts.missing_components.contains(component);
        items.push(Item {
            label: format!(
                "{} ({} toolchain)",
                component.name,
                component.toolchain.name()
            ),
            actions: if missing {
                vec![Action::AddComponent(*component)]
            } else {
                Vec::new()
            },
            found: None,
        });
    }
    items.push(Item {
        label: "bpf-linker (built against LLVM 22)".to_owned(),
        actions: if facts.bpf_linker.is_some() {
            Vec::new()
        } else {
            vec![Action::InstallBpfLinker]
        },
        found: facts.bpf_linker.clone(),
    });
    let tools: Vec<String> = RUNTIME_TOOLS
        .iter()
        .map(|tool| format!("{} ({})", tool.command, tool.package))
        .collect();
    items.push(Item {
        label: format!("test tools: {}", tools.join(", ")),
        actions: apt(missing_runtime),
        found: None,
    });
    Ok(items)
}

/// True when nothing needs installing (the fast path of `build`, `test`, `demo`, `bench`).
pub fn complete(items: &[Item]) -> bool {
    items.iter().all(|item| item.actions.is_empty())
}

impl Facts {
    pub fn gather() -> Self {
        let mut packages: Vec<&str> = BUILD_PACKAGES.to_vec();
        packages.extend(RUNTIME_TOOLS.iter().map(|tool| tool.package));
        let (dpkg, installed_debs) = installed_debs(&packages);

        let nightly_components = installed_components(Some("nightly"));
        let default_components = installed_components(None);
        let nightly = nightly_components.is_some();
        let missing_components = COMPONENTS
            .iter()
            .filter(|component| {
                let installed = match component.toolchain {
                    Toolchain::Nightly => &nightly_components,
                    Toolchain::Default => &default_components,
                };
                // A toolchain we cannot list counts as missing everything.
                !installed
                    .as_ref()
                    .is_some_and(|lines| component_installed(lines, component.name, HOST_TRIPLE))
            })
            .copied()
            .collect();

        let bpf_linker = run::probe(Command::new("bpf-linker").arg("--version"))
            .ok()
            .filter(|output| output.status.success())
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned());
        Self {
            dpkg,
            installed_debs,
            nightly,
            missing_components,
            bpf_linker,
            root: nix::unistd::geteuid().is_root(),
        }
    }
}

const HOST_TRIPLE: &str = env!("XTASK_HOST_TRIPLE");

/// Asks dpkg which of `packages` are installed. `(false, _)` when there is no dpkg-query.
fn installed_debs(packages: &[&str]) -> (bool, BTreeSet<String>) {
    let output = run::probe(
        Command::new("dpkg-query")
            .arg("-W")
            .arg("-f=${Package}\t${db:Status-Abbrev}\n")
            .args(packages),
    );
    match output {
        // dpkg-query exits 1 when some package is unknown, and still lists the others.
        Ok(output) => (
            true,
            parse_dpkg_query(&String::from_utf8_lossy(&output.stdout)),
        ),
        Err(_) => (false, BTreeSet::new()),
    }
}

/// Packages in state `ii` (installed, no error) from `dpkg-query -W -f='${Package}\t${db:Status-Abbrev}\n'`.
pub fn parse_dpkg_query(output: &str) -> BTreeSet<String> {
    output
        .lines()
        .filter_map(|line| {
            let (package, status) = line.split_once('\t')?;
            (status.trim_end() == "ii").then(|| package.to_owned())
        })
        .collect()
}

/// `rustup component list --installed` for a toolchain (`None`: the one cargo picks here).
/// `None` when rustup cannot list it (toolchain not installed).
fn installed_components(toolchain: Option<&str>) -> Option<Vec<String>> {
    let mut cmd = Command::new("rustup");
    cmd.args(["component", "list", "--installed"])
        // Never let a probe download a toolchain.
        .env("RUSTUP_AUTO_INSTALL", "0");
    if let Some(toolchain) = toolchain {
        cmd.args(["--toolchain", toolchain]);
    }
    let output = run::probe(&mut cmd).ok()?;
    output.status.success().then(|| {
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    })
}

/// rustup lists host-specific components with the host triple appended
/// (`clippy-x86_64-unknown-linux-gnu`) and the others bare (`rust-src`).
pub fn component_installed(lines: &[String], name: &str, host: &str) -> bool {
    lines
        .iter()
        .map(|line| line.trim())
        .any(|line| line == name || line == format!("{name}-{host}"))
}

/// Shows what will be checked and runs every action of every item, printing one summary line
/// per item. Stops at the first failure.
pub fn execute(items: &[Item], width: usize) -> anyhow::Result<()> {
    for item in items {
        if item.actions.is_empty() {
            let found = item
                .found
                .as_ref()
                .map(|found| format!(": {found}"))
                .unwrap_or_default();
            println!("  {:<width$}  ok (already present{found})", item.label);
            continue;
        }
        let start = Instant::now();
        for action in &item.actions {
            perform(action, &item.label)?;
        }
        println!(
            "  {:<width$}  installed in {}",
            item.label,
            seconds(start.elapsed())
        );
    }
    Ok(())
}

fn seconds(elapsed: Duration) -> String {
    format!("{:.1} s", elapsed.as_secs_f64())
}

/// The command for an action. Kept separate from running it so tests can read it.
pub fn command(action: &Action) -> Command {
    match action {
        Action::AptUpdate => {
            let mut cmd = Command::new("apt-get");
            cmd.arg("update").env("DEBIAN_FRONTEND", "noninteractive");
            cmd
        }
        Action::AptInstall(packages) => {
            let mut cmd = Command::new("apt-get");
            cmd.args(["install", "-y"])
                .args(packages)
                .env("DEBIAN_FRONTEND", "noninteractive");
            cmd
        }
        Action::AddComponent(component) => {
            let mut cmd = Command::new("rustup");
            cmd.args(["component", "add", component.name]);
            if component.toolchain == Toolchain::Nightly {
                cmd.args(["--toolchain", "nightly"]);
            }
            cmd
        }
        Action::InstallBpfLinker => {
            let mut cmd = Command::new("cargo");
            run::strip_cargo_run_vars(&mut cmd);
            cmd.env("LLVM_PREFIX", LLVM_PREFIX).args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ]);
            cmd
        }
    }
}

fn perform(action: &Action, label: &str) -> anyhow::Result<()> {
    let mut cmd = command(action);
    let title = match action {
        Action::AptUpdate => "apt-get update".to_owned(),
        Action::AptInstall(packages) => format!("installing {}", packages.join(" ")),
        Action::AddComponent(_) => format!("adding {label}"),
        Action::InstallBpfLinker => {
            format!("building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)")
        }
    };
    let outcome = run::tailed(&title, &mut cmd)?;
    if outcome.status.success() {
        return Ok(());
    }
    if let Action::AddComponent(component) = action {
        // One clear line, no fallback: the eBPF build cannot work without the component.
        let reason = outcome
            .tail
            .iter()
            .rev()
            .find(|line| line.contains("error"))
            .map(|line| line.trim().trim_start_matches("error:").trim().to_owned())
            .unwrap_or_else(|| run::describe_status(outcome.status));
        bail!(
            "cannot install {} for the {} toolchain ({reason}); it is needed for {}",
            component.name,
            component.toolchain.name(),
            component.used_by
        );
    }
    run::print_tail(&outcome.tail);
    bail!(
        "`{}` failed ({})",
        run::display(&cmd),
        run::describe_status(outcome.status)
    )
}

/// After installing, every runtime tool must be on PATH; a package that does not provide the
/// command means the list in [`RUNTIME_TOOLS`] is wrong.
fn verify_runtime_tools() -> anyhow::Result<()> {
    for tool in RUNTIME_TOOLS {
        which::which(tool.command).with_context(|| {
            format!(
                "`{}` is not on PATH although {} is installed (needed for {})",
                tool.command, tool.package, tool.used_by
            )
        })?;
    }
    Ok(())
}

/// Reports kernel version, BTF and privileges: warnings, since none of them stop a build.
fn report_host(checks: &[host::HostCheck], width: usize) {
    for check in checks {
        let mark = if check.ok { "" } else { "WARNING: " };
        println!("  {:<width$}  {mark}{}", check.label, check.detail);
    }
}

/// `cargo xtask setup`.
pub fn setup() -> anyhow::Result<()> {
    let start = Instant::now();
    println!("setup: checking what this machine has");
    let items = plan(&Facts::gather()).map_err(anyhow::Error::msg)?;
    let checks = [
        host::kernel_check(),
        host::btf_check(),
        host::privilege_check(),
    ];
    let width = items
        .iter()
        .map(|item| item.label.len())
        .chain(checks.iter().map(|check| check.label.len()))
        .max()
        .unwrap_or(0);
    execute(&items, width)?;
    verify_runtime_tools()?;
    report_host(&checks, width);
    println!("setup: done in {}", seconds(start.elapsed()));
    Ok(())
}

/// Runs setup only when something is missing: a fast check that never calls apt otherwise.
pub fn ensure() -> anyhow::Result<()> {
    let items = plan(&Facts::gather()).map_err(anyhow::Error::msg)?;
    if complete(&items) {
        return Ok(());
    }
    let missing: Vec<&str> = items
        .iter()
        .filter(|item| !item.actions.is_empty())
        .map(|item| item.label.as_str())
        .collect();
    println!(
        "setup: missing {}; running `cargo xtask setup` first",
        missing.join(", ")
    );
    setup()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn everything() -> Facts {
        let mut installed_debs: BTreeSet<String> =
            BUILD_PACKAGES.iter().map(|p| (*p).to_owned()).collect();
        installed_debs.extend(RUNTIME_TOOLS.iter().map(|t| t.package.to_owned()));
        Facts {
            dpkg: true,
            installed_debs,
            nightly: true,
            missing_components: Vec::new(),
            bpf_linker: Some("bpf-linker 0.13.0".to_owned()),
            root: true,
        }
    }

    fn fresh() -> Facts {
        Facts {
            dpkg: true,
            installed_debs: BTreeSet::new(),
            nightly: true,
            missing_components: COMPONENTS
                .iter()
                .filter(|c| c.name == "rust-src")
                .copied()
                .collect(),
            bpf_linker: None,
            root: true,
        }
    }

    fn actions(items: &[Item]) -> Vec<Action> {
        items.iter().flat_map(|item| item.actions.clone()).collect()
    }

    fn plan_ok(facts: &Facts) -> Vec<Item> {
        match plan(facts) {
            Ok(items) => items,
            Err(blocker) => panic!("unexpected blocker: {blocker}"),
        }
    }

    #[test]
    fn complete_machine_needs_nothing() {
        let items = plan_ok(&everything());
        assert!(complete(&items));
        assert!(actions(&items).is_empty());
        // Still one summary line per item.
        assert_eq!(items.len(), 1 + COMPONENTS.len() + 1 + 1);
    }

    #[test]
    fn fresh_machine_installs_in_a_working_order() {
        let items = plan_ok(&fresh());
        let rust_src = COMPONENTS[0];
        assert_eq!(rust_src.name, "rust-src");
        let runtime: Vec<&str> = RUNTIME_TOOLS.iter().map(|t| t.package).collect();
        assert_eq!(
            actions(&items),
            vec![
                Action::AptUpdate,
                Action::AptInstall(BUILD_PACKAGES.to_vec()),
                Action::AddComponent(rust_src),
                Action::InstallBpfLinker,
                Action::AptInstall(runtime),
            ]
        );
    }

    #[test]
    fn only_bpf_linker_missing_skips_apt() {
        let facts = Facts {
            bpf_linker: None,
            ..everything()
        };
        assert_eq!(actions(&plan_ok(&facts)), vec![Action::InstallBpfLinker]);
    }

    #[test]
    fn one_runtime_tool_missing_updates_then_installs_only_it() {
        let mut facts = everything();
        facts.installed_debs.remove("util-linux");
        assert_eq!(
            actions(&plan_ok(&facts)),
            vec![Action::AptUpdate, Action::AptInstall(vec!["util-linux"])]
        );
    }

    #[test]
    fn partly_installed_llvm_installs_the_rest() {
        let mut facts = everything();
        facts.installed_debs.remove("libpolly-22-dev");
        assert_eq!(
            actions(&plan_ok(&facts)),
            vec![
                Action::AptUpdate,
                Action::AptInstall(vec!["libpolly-22-dev"])
            ]
        );
    }

    #[test]
    fn missing_nightly_is_a_blocker_not_a_download() {
        let facts = Facts {
            nightly: false,
            ..everything()
        };
        assert_eq!(plan(&facts), Err(Blocker::NoNightly));
    }

    #[test]
    fn apt_as_non_root_is_refused_with_the_command_to_run() {
        let facts = Facts {
            root: false,
            ..fresh()
        };
        let Err(blocker) = plan(&facts) else {
            panic!("non-root cannot apt-get install");
        };
        let message = blocker.to_string();
        assert!(message.contains("needs root"), "{message}");
        assert!(message.contains("llvm-22-dev"), "{message}");
        assert!(message.contains("iproute2"), "{message}");
        // Non-root is fine when nothing needs apt.
        let facts = Facts {
            root: false,
            bpf_linker: None,
            ..everything()
        };
        assert_eq!(actions(&plan_ok(&facts)), vec![Action::InstallBpfLinker]);
    }

    #[test]
    fn no_dpkg_is_a_blocker_only_when_packages_are_missing() {
        let facts = Facts {
            dpkg: false,
            ..fresh()
        };
        assert!(matches!(plan(&facts), Err(Blocker::NoDpkg(_))));
    }

    #[test]
    fn commands_follow_the_verified_recipe() {
        let shown = |action: &Action| run::display(&command(action));
        assert_eq!(
            shown(&Action::AptInstall(BUILD_PACKAGES.to_vec())),
            "DEBIAN_FRONTEND=noninteractive apt-get install -y llvm-22-dev libpolly-22-dev libzstd-dev"
        );
        assert_eq!(
            shown(&Action::AddComponent(COMPONENTS[0])),
            "rustup component add rust-src --toolchain nightly"
        );
        assert_eq!(
            shown(&Action::InstallBpfLinker),
            "LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version 0.13.0 \
             --no-default-features --features llvm-22"
        );
    }

    #[test]
    fn dpkg_query_output_parses_installed_only() {
        let output = "iproute2\tii \nllvm-22-dev\trc \nlibzstd-dev\tii \nutil-linux\tiU \n";
        let installed = parse_dpkg_query(output);
        assert_eq!(
            installed.into_iter().collect::<Vec<_>>(),
            vec!["iproute2".to_owned(), "libzstd-dev".to_owned()]
        );
    }

    #[test]
    fn components_match_bare_or_with_the_host_triple() {
        let lines: Vec<String> = [
            "cargo-x86_64-unknown-linux-gnu",
            "clippy-x86_64-unknown-linux-gnu",
            "rust-src",
            "rust-std-x86_64-unknown-linux-gnu",
        ]
        .map(str::to_owned)
        .to_vec();
        let host = "x86_64-unknown-linux-gnu";
        assert!(component_installed(&lines, "rust-src", host));
        assert!(component_installed(&lines, "clippy", host));
        assert!(!component_installed(&lines, "rustfmt", host));
        assert!(!component_installed(&lines, "rust", host));
    }

    #[test]
    fn runtime_tools_are_listed_once_per_command() {
        let mut commands: Vec<&str> = RUNTIME_TOOLS.iter().map(|t| t.command).collect();
        commands.sort_unstable();
        commands.dedup();
        assert_eq!(commands.len(), RUNTIME_TOOLS.len());
        assert!(commands.contains(&"ip") && commands.contains(&"nsenter"));
    }
}
