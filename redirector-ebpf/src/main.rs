//! The p2pcdn XDP program. Built for `bpfel-unknown-none` by `redirector-user/build.rs`.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// BPF_CMPXCHG through the atomic intrinsic (see `xdp::gcra`); the eBPF build is nightly only.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(
    target_arch = "bpf",
    expect(internal_features, reason = "atomic_cxchg intrinsic")
)]

#[cfg(target_arch = "bpf")]
mod xdp;

/// On the host this binary only says what it is: the real one is the BPF object.
#[cfg(not(target_arch = "bpf"))]
fn main() {
    println!("redirector-ebpf is an XDP program: build it with `cargo xtask build`");
}
