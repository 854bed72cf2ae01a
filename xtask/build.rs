//! Records the host target triple, which `rustup component list` appends to the names of
//! host-specific components (`clippy-x86_64-unknown-linux-gnu`).
fn main() {
    let target = std::env::var("TARGET").unwrap_or_default();
    println!("cargo:rustc-env=XTASK_HOST_TRIPLE={target}");
}
