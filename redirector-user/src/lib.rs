//! Loader and typed map API for the p2pcdn XDP program.

/// The XDP object built by `build.rs`.
pub static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirector"));
