//! The error type of the loader and the typed map API.

use std::{io, net::IpAddr, path::PathBuf};

/// Result of every fallible operation of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The capabilities every operation on the XDP program and its maps needs.
pub const NEEDED_CAPABILITIES: &str = "CAP_BPF and CAP_NET_ADMIN";

/// Everything that can go wrong in `redirector-user`.
///
/// Variants carry typed fields so callers (the CLI, the controller) can react to a case
/// without parsing messages; `Display` is one line fit for a terminal.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The pinned maps were created by another layout version of the XDP program.
    #[error(
        "pinned maps in {dir} have schema version {pinned}, this build uses {built}: run \
         `p2pcdn-redirector -i IFACE detach` then `attach` (this drops the pinned state)"
    )]
    SchemaMismatch {
        dir: PathBuf,
        pinned: u32,
        built: u32,
    },
    /// A pinned map has the right schema version but a layout this build does not expect
    /// (e.g. the `META` limits differ, or a map's key/value size or length).
    #[error(
        "pinned map {map} in {dir} does not match this build ({detail}): run \
         `p2pcdn-redirector -i IFACE detach` then `attach`"
    )]
    MapLayout {
        dir: PathBuf,
        map: String,
        detail: String,
    },
    /// Pins exist without a `META` map, so their layout cannot be checked.
    #[error(
        "{dir} holds pinned maps without a schema version: run `p2pcdn-redirector -i IFACE \
         detach` then `attach`"
    )]
    UnversionedPins { dir: PathBuf },
    /// Nothing is pinned for this interface.
    #[error("p2pcdn is not attached to {iface} (no pinned state in {dir})")]
    NotAttached { iface: String, dir: PathBuf },
    /// The interface does not exist in the caller's network namespace.
    #[error("unknown network interface {iface:?}")]
    UnknownInterface { iface: String },
    /// The caller lacks a capability (or the kernel answered EPERM).
    #[error("needs {capability} (run as root)")]
    MissingPrivilege { capability: &'static str },
    /// A name is empty, too long or has characters other than `[A-Za-z0-9._-]`.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    /// A value given by the user is not acceptable (address, port, rate, ring size, ...).
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidValue {
        what: &'static str,
        value: String,
        reason: String,
    },
    /// No service of that name.
    #[error("no service named {name:?}")]
    UnknownService { name: String },
    /// No peer of that name.
    #[error("no peer named {name:?}")]
    UnknownPeer { name: String },
    /// A service address is already used by another service.
    #[error("address {addr} already belongs to service {service:?}")]
    AddressInUse { addr: String, service: String },
    /// Every service id (or peer slot, or map entry) is taken.
    #[error("no free {what}: at most {max}")]
    Full { what: &'static str, max: u32 },
    /// No source address for tunnels to a peer was given and the interface has none.
    #[error("no IPv{family} address on {iface} to use as tunnel source: pass --src")]
    NoSourceAddress { iface: String, family: u8 },
    /// The object file lacks a map or program this build needs.
    #[error(
        "the XDP object has no {kind} named {name} (the kernel program and this loader \
         disagree; rebuild both)"
    )]
    MissingObject { kind: &'static str, name: String },
    /// An XDP program that is not ours is attached to the interface.
    #[error("{iface} already has an XDP program that p2pcdn did not attach ({detail})")]
    ForeignProgram { iface: String, detail: String },
    /// The operation needs the program object kept in memory (`load_unattached`).
    #[error("{op} needs a program loaded by this process (use load_unattached)")]
    NoProgram { op: &'static str },
    /// The verifier rejected the program.
    #[error("the kernel rejected the XDP program ({io_error}); verifier log follows")]
    Verifier {
        #[source]
        io_error: io::Error,
        verifier_log: String,
    },
    /// An aya operation failed.
    #[error("{op}: {source}")]
    Bpf {
        op: String,
        #[source]
        source: Box<BpfError>,
    },
    /// A netlink request failed.
    #[error("netlink {op}: {source}")]
    Netlink {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// A file or mount operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The neighbour entry for a peer's next hop could not be installed.
    #[error("cannot install a neighbour entry towards {peer}: {reason}")]
    Neighbour { peer: IpAddr, reason: String },
}

/// The aya error behind [`Error::Bpf`].
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error(transparent)]
    Ebpf(#[from] aya::EbpfError),
    #[error(transparent)]
    Program(#[from] aya::programs::ProgramError),
    #[error(transparent)]
    Map(#[from] aya::maps::MapError),
    #[error(transparent)]
    Pin(#[from] aya::pin::PinError),
    #[error(transparent)]
    Link(#[from] aya::programs::links::LinkError),
}

impl Error {
    /// Wraps an aya error, turning EPERM anywhere in its chain into
    /// [`Error::MissingPrivilege`] and a verifier rejection into [`Error::Verifier`].
    pub(crate) fn bpf(op: impl Into<String>, source: impl Into<BpfError>) -> Self {
        let source = source.into();
        if let BpfError::Program(aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        }) = source
        {
            if is_eperm(&io_error) {
                return Self::MissingPrivilege {
                    capability: NEEDED_CAPABILITIES,
                };
            }
            return Self::Verifier {
                io_error,
                verifier_log: verifier_log.to_string(),
            };
        }
        let as_dyn: &(dyn std::error::Error + 'static) = match &source {
            BpfError::Ebpf(e) => e,
            BpfError::Program(e) => e,
            BpfError::Map(e) => e,
            BpfError::Pin(e) => e,
            BpfError::Link(e) => e,
        };
        if chain_has_eperm(as_dyn) {
            return Self::MissingPrivilege {
                capability: NEEDED_CAPABILITIES,
            };
        }
        Self::Bpf {
            op: op.into(),
            source: Box::new(source),
        }
    }

    /// Wraps a map operation error on map `map`.
    pub(crate) fn map(map: &str, op: &str, source: aya::maps::MapError) -> Self {
        Self::bpf(format!("{op} {map}"), source)
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        if is_eperm(&source) {
            return Self::MissingPrivilege {
                capability: NEEDED_CAPABILITIES,
            };
        }
        Self::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// An [`Error::InvalidValue`].
    pub fn invalid(what: &'static str, value: impl ToString, reason: impl ToString) -> Self {
        Self::InvalidValue {
            what,
            value: value.to_string(),
            reason: reason.to_string(),
        }
    }

    /// The verifier log, when the kernel rejected the program.
    pub fn verifier_log(&self) -> Option<&str> {
        match self {
            Self::Verifier { verifier_log, .. } => Some(verifier_log),
            _ => None,
        }
    }

    /// True for errors caused by a value the user gave (bad name, address, schema of the
    /// pinned state, unknown interface...): the CLI exits with status 64 for these.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Self::SchemaMismatch { .. }
                | Self::MapLayout { .. }
                | Self::UnversionedPins { .. }
                | Self::UnknownInterface { .. }
                | Self::InvalidName { .. }
                | Self::InvalidValue { .. }
                | Self::UnknownService { .. }
                | Self::UnknownPeer { .. }
                | Self::AddressInUse { .. }
                | Self::NoSourceAddress { .. }
        )
    }
}

fn is_eperm(error: &io::Error) -> bool {
    error.raw_os_error() == Some(libc::EPERM)
}

/// The errno somewhere in an error chain. `#[error(transparent)]` wrappers of an
/// `io::Error` (aya's `MapError::IoError`, `ProgramError::IOError`) hide it from
/// `source()`, so those are unwrapped by hand.
pub(crate) fn errno_in(error: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut next = Some(error);
    while let Some(e) = next {
        let io = e.downcast_ref::<io::Error>().or_else(|| {
            match (
                e.downcast_ref::<aya::maps::MapError>(),
                e.downcast_ref::<aya::programs::ProgramError>(),
            ) {
                (Some(aya::maps::MapError::IoError(io)), _) => Some(io),
                (_, Some(aya::programs::ProgramError::IOError(io))) => Some(io),
                _ => None,
            }
        });
        if let Some(errno) = io.and_then(io::Error::raw_os_error) {
            return Some(errno);
        }
        next = e.source();
    }
    None
}

fn chain_has_eperm(error: &(dyn std::error::Error + 'static)) -> bool {
    errno_in(error) == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eperm_from_a_map_syscall_names_the_capabilities() {
        let source = aya::maps::MapError::IoError(io::Error::from_raw_os_error(libc::EPERM));
        let error = Error::map("PEERS", "update", source);
        assert!(matches!(error, Error::MissingPrivilege { .. }), "{error:?}");
        assert_eq!(
            error.to_string(),
            "needs CAP_BPF and CAP_NET_ADMIN (run as root)"
        );
    }

    #[test]
    fn other_map_errors_keep_their_context() {
        let source = aya::maps::MapError::KeyNotFound;
        let error = Error::map("PEERS", "lookup", source);
        assert_eq!(error.to_string(), "lookup PEERS: key not found");
        assert!(!error.is_bad_input());
    }

    #[test]
    fn schema_mismatch_names_both_versions_and_the_fix() {
        let error = Error::SchemaMismatch {
            dir: "/sys/fs/bpf/p2pcdn/eth0".into(),
            pinned: 3,
            built: 1,
        };
        let text = error.to_string();
        assert!(text.contains("schema version 3"), "{text}");
        assert!(text.contains("this build uses 1"), "{text}");
        assert!(text.contains("detach") && text.contains("attach"), "{text}");
        assert!(!text.contains('\n'));
        assert!(error.is_bad_input());
    }
}
