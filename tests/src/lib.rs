//! Test support for p2pcdn: packet fixtures and an independent parser ([`packet`]), the
//! privilege check every privileged test starts with ([`privilege`]), network-namespace
//! testbeds ([`netns`]), a test HTTP server and open-loop client ([`http`]) and a wrapper
//! around the `p2pcdn-redirector` CLI ([`redirector`]).

pub mod harness;
pub mod http;
pub mod netns;
pub mod packet;
pub mod privilege;
pub mod redirector;
pub mod scenario;
