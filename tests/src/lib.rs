//! Test support for p2pcdn: packet fixtures and an independent parser ([`packet`]), the
//! privilege check every privileged test starts with ([`privilege`]), network-namespace
//! testbeds ([`netns`]), a test HTTP server and open-loop client ([`http`]) and a wrapper
//! around the `p2pcdn-redirector` CLI ([`redirector`]).
//! For the flash-crowd demo and load test: an open-loop load generator ([`loadgen`]), a
//! capacity-limited origin web server ([`origin`]) and run reports ([`report`]).

pub mod flashcrowd;
pub mod harness;
pub mod http;
pub mod loadgen;
pub mod netns;
pub mod origin;
pub mod packet;
pub mod privilege;
pub mod redirector;
pub mod report;
pub mod scenario;
pub mod wrk;
