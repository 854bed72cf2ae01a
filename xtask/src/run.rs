//! Running subprocesses: quiet probes, visible steps, long steps under a spinner with their
//! output tailed, and long-lived children that get Ctrl-C forwarded.

use std::{
    collections::VecDeque,
    ffi::OsStr,
    io::{BufRead, BufReader, IsTerminal as _, Read},
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Command, ExitStatus, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use indicatif::{ProgressBar, ProgressStyle};
use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};

/// Variables `cargo run` sets for xtask itself that must not leak into the cargo processes
/// xtask starts (they describe the xtask package, not the one being built).
const CARGO_RUN_VARS: &[&str] = &[
    "CARGO",
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_BIN_NAME",
    "CARGO_CRATE_NAME",
    "CARGO_PRIMARY_PACKAGE",
];

/// A `cargo` command run from the workspace root through the rustup proxy on PATH (so
/// `+nightly` works), without the variables that describe xtask's own build.
pub fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root);
    strip_cargo_run_vars(&mut cmd);
    cmd
}

/// Removes the variables `cargo run` set for xtask from a child's environment.
pub fn strip_cargo_run_vars(cmd: &mut Command) {
    for var in CARGO_RUN_VARS {
        cmd.env_remove(var);
    }
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("CARGO_PKG_") {
            cmd.env_remove(key);
        }
    }
}

/// The command as a user would type it, with the variables xtask set explicitly.
pub fn display(cmd: &Command) -> String {
    let mut words: Vec<String> = cmd
        .get_envs()
        .filter_map(|(key, value)| {
            value.map(|value| format!("{}={}", key.to_string_lossy(), value.to_string_lossy()))
        })
        .collect();
    words.push(cmd.get_program().to_string_lossy().into_owned());
    words.extend(cmd.get_args().map(quote));
    words.join(" ")
}

fn quote(arg: &OsStr) -> String {
    let arg = arg.to_string_lossy();
    if !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=+./,:@%".contains(c))
    {
        arg.into_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// Runs a probe to completion, capturing its output. `Err` only if it could not be started.
pub fn probe(cmd: &mut Command) -> std::io::Result<Output> {
    cmd.stdin(Stdio::null()).output()
}

/// Runs a step with the terminal attached (cargo draws its own progress), after a header.
pub fn visible(cmd: &mut Command) -> anyhow::Result<ExitStatus> {
    println!("$ {}", display(cmd));
    cmd.stdin(Stdio::null())
        .status()
        .with_context(|| format!("cannot start `{}`", cmd.get_program().to_string_lossy()))
}

/// How many output lines a failed long step shows.
const FAILURE_TAIL: usize = 40;

/// The outcome of a step run under a spinner: exit status and the last lines it printed.
pub struct Tailed {
    pub status: ExitStatus,
    pub tail: Vec<String>,
}

/// Runs a long step under a spinner whose message tails the step's output (on a terminal), or
/// streams its output indented (in logs). Returns the status and the last lines printed.
pub fn tailed(label: &str, cmd: &mut Command) -> anyhow::Result<Tailed> {
    let shown = display(cmd);
    let interactive = std::io::stderr().is_terminal();
    let bar = if interactive {
        let bar = ProgressBar::new_spinner();
        let style = ProgressStyle::with_template("{spinner} {prefix} [{elapsed}]\n{msg:.dim}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        bar.set_style(style);
        bar.set_prefix(label.to_owned());
        bar.enable_steady_tick(Duration::from_millis(120));
        bar.println(format!("  $ {shown}"));
        Some(bar)
    } else {
        println!("  {label}\n  $ {shown}");
        None
    };

    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{shown}`"))?;
    let (tx, rx) = mpsc::channel::<String>();
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|out| Box::new(out) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|err| Box::new(err) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|stream| {
        let tx = tx.clone();
        thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                // cargo and apt redraw progress with '\r': keep the last state of the line.
                let line = line.rsplit('\r').next().unwrap_or_default().to_owned();
                if tx.send(line).is_err() {
                    break;
                }
            }
        })
    })
    .collect();
    drop(tx);

    let mut tail: VecDeque<String> = VecDeque::with_capacity(FAILURE_TAIL);
    let width = usize::from(console::Term::stderr().size().1).saturating_sub(6);
    for line in rx {
        if line.trim().is_empty() {
            continue;
        }
        if tail.len() == FAILURE_TAIL {
            tail.pop_front();
        }
        tail.push_back(line);
        match &bar {
            Some(bar) => bar.set_message(spinner_tail(&tail, width)),
            None => println!("    | {}", tail.back().map_or("", String::as_str)),
        }
    }
    for reader in readers {
        let _ = reader.join();
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{shown}`"))?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(Tailed {
        status,
        tail: tail.into(),
    })
}

/// How many output lines the spinner of a long step shows under it.
const SPINNER_TAIL: usize = 4;

/// The last lines of output, each cut to the terminal width so the spinner redraws cleanly.
fn spinner_tail(tail: &VecDeque<String>, width: usize) -> String {
    let skip = tail.len().saturating_sub(SPINNER_TAIL);
    tail.iter()
        .skip(skip)
        .map(|line| {
            let line = line.replace('\t', "    ");
            format!("    {}", console::truncate_str(&line, width, "…"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Prints the last lines of a failed long step (on a terminal they were only in the spinner).
pub fn print_tail(tail: &[String]) {
    if std::io::stderr().is_terminal() {
        eprintln!("  last {} lines of output:", tail.len());
        for line in tail {
            eprintln!("    | {line}");
        }
    }
}

/// Runs a long-lived child (demo, bench) in its own process group and forwards SIGINT/SIGTERM
/// to that group, so the child gets exactly one Ctrl-C, tears down what it set up, and xtask
/// waits for it instead of dying first and leaving it orphaned.
/// Returns `Err(Interrupted)` when the child ended after a forwarded Ctrl-C.
pub fn forwarding_signals(cmd: &mut Command, what: &str) -> anyhow::Result<ExitStatus> {
    println!("$ {}", display(cmd));
    let mut child = cmd
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start `{}`", cmd.get_program().to_string_lossy()))?;
    let group = Pid::from_raw(
        i32::try_from(child.id()).map_err(|_| anyhow!("child pid {} out of range", child.id()))?,
    );
    let interrupted = Arc::new(AtomicBool::new(false));
    let handler_what = what.to_owned();
    let handler_flag = Arc::clone(&interrupted);
    ctrlc::set_handler(move || {
        handler_flag.store(true, Ordering::SeqCst);
        eprintln!("\nxtask: forwarding Ctrl-C to the {handler_what}; waiting for its teardown");
        // The group may already be gone if the child just exited: nothing to forward then.
        let _ = killpg(group, Signal::SIGINT);
    })
    .context("cannot install the Ctrl-C handler")?;
    let status = child.wait().context("waiting for the child")?;
    if interrupted.load(Ordering::SeqCst) && !status.success() {
        return Err(Interrupted {
            what: what.to_owned(),
        }
        .into());
    }
    Ok(status)
}

/// A long-running child stopped by a forwarded Ctrl-C (xtask exits with 130, as a shell does).
#[derive(Debug)]
pub struct Interrupted {
    pub what: String,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the {} was interrupted (it finished its teardown)",
            self.what
        )
    }
}

impl std::error::Error for Interrupted {}

/// Turns a failed exit status into an error naming the step.
pub fn check(status: ExitStatus, step: &str) -> anyhow::Result<()> {
    if status.success() {
        Ok(())
    } else {
        bail!("{step} failed ({})", describe_status(status))
    }
}

pub fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => "unknown status".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_shows_env_and_quotes_arguments() {
        let mut cmd = Command::new("cargo");
        cmd.env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .args(["install", "bpf-linker", "--features", "llvm-22"])
            .arg("a b");
        assert_eq!(
            display(&cmd),
            "LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --features llvm-22 'a b'"
        );
    }

    #[test]
    fn cargo_commands_drop_xtask_package_variables() {
        let cmd = cargo(Path::new("/"));
        let removed: Vec<String> = cmd
            .get_envs()
            .filter(|(_, value)| value.is_none())
            .map(|(key, _)| key.to_string_lossy().into_owned())
            .collect();
        assert!(
            removed.iter().any(|key| key == "CARGO_MANIFEST_DIR"),
            "{removed:?}"
        );
        // Test binaries run under cargo, which sets CARGO_PKG_NAME for them too.
        if std::env::var_os("CARGO_PKG_NAME").is_some() {
            assert!(
                removed.iter().any(|key| key == "CARGO_PKG_NAME"),
                "{removed:?}"
            );
        }
    }

    #[test]
    fn failed_status_names_the_step() {
        let status = Command::new("sh").args(["-c", "exit 3"]).status();
        let Ok(status) = status else {
            panic!("sh is needed for this test");
        };
        let Err(err) = check(status, "clippy (host)") else {
            panic!("exit 3 must be an error");
        };
        assert_eq!(err.to_string(), "clippy (host) failed (exit status 3)");
    }
}
