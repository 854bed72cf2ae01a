//! The generated `peering.v1` types and service, plus the limits every message obeys.

/// Generated from `proto/p2pcdn/peering/v1/peering.proto`.
#[expect(clippy::all, reason = "generated code")]
pub mod pb {
    tonic::include_proto!("p2pcdn.peering.v1");
}
