//! (being written)

/// Entry point of the `p2pcdn` binary.
pub fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(69)
}
