//! Generates the `peering.v1` messages and the tonic service from `proto/` with protox (a
//! protobuf compiler in Rust), so a build needs no `protoc` on the machine.

use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = Path::new("proto/p2pcdn/peering/v1/peering.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Size limit, InvalidArgument for undecodable input, field validation: see proto.rs.
        .codec_path("crate::proto::LimitedCodec")
        .compile_fds(descriptors)?;

    // The content manifest (see manifest.rs): messages only, no service.
    let manifest = Path::new("proto/p2pcdn/content/v1/manifest.proto");
    println!("cargo:rerun-if-changed={}", manifest.display());
    let descriptors = protox::compile([manifest], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_fds(descriptors)?;
    Ok(())
}
