//! The p2pcdn XDP program. Built for `bpfel-unknown-none` by `redirector-user/build.rs`.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod xdp;

/// On the host this binary only says what it is: the real one is the BPF object.
#[cfg(not(target_arch = "bpf"))]
fn main() {
    println!("redirector-ebpf is an XDP program: build it with `cargo xtask build`");
}
