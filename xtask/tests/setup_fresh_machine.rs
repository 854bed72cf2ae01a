//! Runs `xtask setup` on a simulated fresh machine: PATH holds only fake `dpkg-query`,
//! `apt-get`, `rustup` and `cargo` scripts (plus the system's /usr/bin and /bin for the shell)
//! that record every call and change a state directory the way the real tools would. This
//! checks the commands setup runs, their order and its idempotence without touching the real
//! machine. The real tools are not reachable: ~/.cargo/bin is not on the fake PATH.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::PathBuf,
    process::{Command, Output},
};

const XTASK: &str = env!("CARGO_BIN_EXE_xtask");

/// The fake tools. `$STATE` holds installed packages (`debs/NAME`) and components
/// (`components-nightly`, `components-default`); `$LOG` gets one line per call.
const DPKG_QUERY: &str = r#"#!/bin/sh
echo "dpkg-query $*" >> "$LOG"
shift 2
rc=0
for p in "$@"; do
  if [ -e "$STATE/debs/$p" ]; then printf '%s\tii \n' "$p"; else echo "dpkg-query: no packages found matching $p" >&2; rc=1; fi
done
exit $rc
"#;

const APT_GET: &str = r#"#!/bin/sh
echo "DEBIAN_FRONTEND=$DEBIAN_FRONTEND apt-get $*" >> "$LOG"
case "$1" in
  update) echo "Reading package lists... Done"; exit 0 ;;
  install)
    shift
    [ "$1" = "-y" ] || { echo "E: expected -y" >&2; exit 100; }
    shift
    for p in "$@"; do
      touch "$STATE/debs/$p"
      case "$p" in
        iproute2) printf '#!/bin/sh\nexit 0\n' > "$BIN/ip"; chmod +x "$BIN/ip" ;;
        util-linux) printf '#!/bin/sh\nexit 0\n' > "$BIN/nsenter"; chmod +x "$BIN/nsenter" ;;
        nginx) printf '#!/bin/sh\nexit 0\n' > "$BIN/nginx"; chmod +x "$BIN/nginx" ;;
        wrk) printf '#!/bin/sh\nexit 0\n' > "$BIN/wrk"; chmod +x "$BIN/wrk" ;;
      esac
      echo "Setting up $p ..."
    done
    exit 0 ;;
esac
exit 100
"#;

const RUSTUP: &str = r#"#!/bin/sh
echo "rustup $*" >> "$LOG"
tc=default
[ "$4" = "--toolchain" ] && tc="$5"
case "$2" in
  list)
    [ -e "$STATE/components-$tc" ] || { echo "error: toolchain '$tc' is not installed" >&2; exit 1; }
    cat "$STATE/components-$tc"; exit 0 ;;
  add)
    if [ -e "$STATE/offline" ]; then
      echo "info: downloading component '$3'" >&2
      echo "error: could not download file from 'https://static.rust-lang.org/dist/rust-src.tar.xz': connection refused" >&2
      exit 1
    fi
    echo "$3" >> "$STATE/components-$tc"; exit 0 ;;
esac
exit 1
"#;

const CARGO: &str = r#"#!/bin/sh
echo "LLVM_PREFIX=$LLVM_PREFIX cargo $*" >> "$LOG"
[ "$1" = "build" ] && exit 0
[ "$1" = "install" ] || exit 101
echo "  Compiling bpf-linker v0.13.0" >&2
printf '#!/bin/sh\necho "bpf-linker 0.13.0"\n' > "$BIN/bpf-linker"
chmod +x "$BIN/bpf-linker"
"#;

struct FakeMachine {
    dir: PathBuf,
}

impl FakeMachine {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("xtask-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for sub in ["bin", "state/debs"] {
            fs::create_dir_all(dir.join(sub))
                .unwrap_or_else(|err| panic!("cannot create {}: {err}", dir.display()));
        }
        let machine = Self { dir };
        for (name, script) in [
            ("dpkg-query", DPKG_QUERY),
            ("apt-get", APT_GET),
            ("rustup", RUSTUP),
            ("cargo", CARGO),
        ] {
            machine.write_script(name, script);
        }
        machine.write("state/components-nightly", "rustfmt\nclippy-HOST\n");
        machine.write("state/components-default", "clippy-HOST\nrustfmt-HOST\n");
        machine
    }

    fn write(&self, path: &str, text: &str) {
        let text = text.replace("HOST", host_triple());
        fs::write(self.dir.join(path), text).unwrap_or_else(|err| panic!("write {path}: {err}"));
    }

    fn write_script(&self, name: &str, text: &str) {
        let path = self.dir.join("bin").join(name);
        fs::write(&path, text).unwrap_or_else(|err| panic!("write {name}: {err}"));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|err| panic!("chmod {name}: {err}"));
    }

    fn install_debs(&self, packages: &[&str]) {
        for package in packages {
            self.write(&format!("state/debs/{package}"), "");
        }
    }

    fn setup(&self) -> Output {
        self.xtask("setup")
    }

    fn xtask(&self, command: &str) -> Output {
        Command::new(XTASK)
            .arg(command)
            .env_clear()
            .env(
                "PATH",
                format!("{}:/usr/bin:/bin", self.dir.join("bin").display()),
            )
            .env("LOG", self.dir.join("log"))
            .env("STATE", self.dir.join("state"))
            .env("BIN", self.dir.join("bin"))
            .output()
            .unwrap_or_else(|err| panic!("cannot run xtask: {err}"))
    }

    /// The calls that change the machine (probes left out).
    fn installs(&self) -> Vec<String> {
        fs::read_to_string(self.dir.join("log"))
            .unwrap_or_default()
            .lines()
            .filter(|line| {
                line.contains("apt-get") || line.contains("component add") || line.contains("cargo")
            })
            .map(str::to_owned)
            .collect()
    }

    fn clear_log(&self) {
        let _ = fs::remove_file(self.dir.join("log"));
    }
}

impl Drop for FakeMachine {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn host_triple() -> &'static str {
    // The fake rustup must print the host triple the way the real one does.
    if cfg!(all(
        target_arch = "x86_64",
        target_os = "linux",
        target_env = "gnu"
    )) {
        "x86_64-unknown-linux-gnu"
    } else if cfg!(all(
        target_arch = "aarch64",
        target_os = "linux",
        target_env = "gnu"
    )) {
        "aarch64-unknown-linux-gnu"
    } else {
        panic!("add this host's triple to the test")
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn fresh_machine_gets_everything_in_order_and_a_second_run_installs_nothing() {
    let machine = FakeMachine::new("fresh");
    let output = machine.setup();
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    if !is_root() {
        // apt-get needs root: setup must say so with the command to run, and install nothing.
        assert!(!output.status.success(), "{stdout}{stderr}");
        assert!(stderr.contains("needs root"), "{stderr}");
        assert!(machine.installs().is_empty(), "{:?}", machine.installs());
        return;
    }
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert_eq!(
        machine.installs(),
        [
            "DEBIAN_FRONTEND=noninteractive apt-get update",
            "DEBIAN_FRONTEND=noninteractive apt-get install -y llvm-22-dev libpolly-22-dev libzstd-dev",
            "rustup component add rust-src --toolchain nightly",
            "LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version 0.13.0 --no-default-features --features llvm-22",
            "DEBIAN_FRONTEND=noninteractive apt-get install -y iproute2 util-linux nginx wrk",
        ]
    );
    let installed = stdout
        .lines()
        .filter(|l| l.contains("installed in"))
        .count();
    assert_eq!(
        installed, 4,
        "one summary line per installed item:\n{stdout}"
    );
    assert!(stdout.contains("rust-src (nightly toolchain)"), "{stdout}");

    // Idempotent: everything is present now, nothing runs but the probes.
    machine.clear_log();
    let again = machine.setup();
    let stdout = text(&again.stdout);
    assert!(again.status.success(), "{stdout}{}", text(&again.stderr));
    assert!(machine.installs().is_empty(), "{:?}", machine.installs());
    let present = stdout
        .lines()
        .filter(|l| l.contains("ok (already present"))
        .count();
    assert_eq!(present, 7, "{stdout}");
    assert!(
        stdout.contains("already present: bpf-linker 0.13.0"),
        "{stdout}"
    );
}

#[test]
fn rust_src_that_cannot_be_fetched_stops_setup_with_one_line() {
    let machine = FakeMachine::new("offline");
    machine.install_debs(&[
        "llvm-22-dev",
        "libpolly-22-dev",
        "libzstd-dev",
        "iproute2",
        "util-linux",
    ]);
    machine.write("state/offline", "");
    let output = machine.setup();
    let stderr = text(&output.stderr);
    assert!(!output.status.success(), "setup must fail without rust-src");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "exactly one line on stderr: {stderr}");
    assert!(
        lines[0].contains("cannot install rust-src for the nightly toolchain"),
        "{stderr}"
    );
    assert!(lines[0].contains("could not download"), "{stderr}");
    // No fallback and nothing after the failure: bpf-linker was not attempted.
    assert_eq!(
        machine.installs(),
        ["rustup component add rust-src --toolchain nightly"]
    );
}

#[test]
fn machine_without_nightly_is_told_so() {
    let machine = FakeMachine::new("nonightly");
    let _ = fs::remove_file(machine.dir.join("state/components-nightly"));
    let output = machine.setup();
    let stderr = text(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("nightly toolchain is not installed"),
        "{stderr}"
    );
    assert!(machine.installs().is_empty(), "{:?}", machine.installs());
}

#[test]
fn build_runs_setup_only_when_something_is_missing() {
    if !is_root() {
        return; // the fresh path needs apt-get, covered by the non-root branch above
    }
    let machine = FakeMachine::new("build");
    let output = machine.xtask("build");
    assert!(output.status.success(), "{}", text(&output.stderr));
    let installs = machine.installs();
    assert_eq!(
        installs.first().map(String::as_str),
        Some("DEBIAN_FRONTEND=noninteractive apt-get update")
    );
    assert_eq!(
        installs.last().map(String::as_str),
        Some("LLVM_PREFIX= cargo build")
    );
    assert!(text(&output.stdout).contains("running `cargo xtask setup` first"));

    // Now complete: the fast check runs no installer, only the build.
    machine.clear_log();
    let again = machine.xtask("build");
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_eq!(machine.installs(), ["LLVM_PREFIX= cargo build"]);
    assert!(
        !text(&again.stdout).contains("setup"),
        "{}",
        text(&again.stdout)
    );
}
