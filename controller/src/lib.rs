//! p2pcdn peering control plane.
//!
//! The seed's roles, one module each: [`mediator`] (service requirements from local resources
//! and policies), [`registry`] (own resources and learned advertisements), [`policy`],
//! [`peering_agent`] (the gRPC client and server of `peering.v1`) and [`negotiation`] (the state
//! machine that turns requirements into arrangements). [`discovery`] spreads signed
//! advertisements by membership gossip, [`store`] keeps everything durable in SQLite,
//! [`admin`] is the operator API, and [`daemon`] wires them together for `p2pcdn run`.
#![forbid(unsafe_code)]

pub mod accounting;
pub mod admin;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod discovery;
pub mod health;
pub mod identity;
pub mod manifest;
pub mod mediator;
pub mod model;
pub mod monitor;
pub mod negotiation;
pub mod peering_agent;
pub mod policy;
pub mod proto;
pub mod registry;
pub mod sampler;
pub mod signals;
pub mod steering;
pub mod store;
pub mod surrogate;
pub mod tls;
pub mod transport;
pub mod trust;
