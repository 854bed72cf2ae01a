//! `p2pcdn`: the peering control plane daemon and its operator CLI.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    p2pcdn_controller::cli::main()
}
