//! `p2pcdn`: the peering control plane (issue 3 builds it; this is its entry point).
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    eprintln!(
        "p2pcdn: the peering control plane is not built yet; see `p2pcdn-redirector` for the data plane"
    );
    std::process::ExitCode::from(69)
}
