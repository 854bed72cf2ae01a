//! Small domain types shared by every module. Wire messages are the generated
//! [`crate::proto::pb`] types; these are the few things the wire has no type for.

use std::{
    fmt,
    str::FromStr,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

/// A node's identity: SHA-256 of its certificate's SubjectPublicKeyInfo (DER).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// From the 32 bytes a protobuf `bytes node_id` field carries.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, FingerprintError> {
        let array: [u8; 32] = bytes
            .try_into()
            .map_err(|_| FingerprintError::Length(bytes.len()))?;
        Ok(Self(array))
    }

    /// The first 8 bytes in hex: what tables show.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..8])
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", self.short())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FingerprintError {
    #[error("a node id is 32 bytes, got {0}")]
    Length(usize),
    #[error("a fingerprint is 64 hex digits (SHA-256), got {0:?}")]
    Text(String),
}

impl FromStr for Fingerprint {
    type Err = FingerprintError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim().strip_prefix("sha256:").unwrap_or(s.trim());
        let bytes = hex::decode(text).map_err(|_| FingerprintError::Text(s.to_owned()))?;
        Self::from_slice(&bytes).map_err(|_| FingerprintError::Text(s.to_owned()))
    }
}

impl Serialize for Fingerprint {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Fingerprint {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Milliseconds since the Unix epoch, the unit of every timestamp in the protocol and store.
pub type UnixMs = i64;

/// The current time in [`UnixMs`].
pub fn now_ms() -> UnixMs {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Which side of an arrangement this node is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The overloaded edge that steers overflow away.
    Primary,
    /// The peer that takes the overflow.
    Provider,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Provider => "provider",
        }
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "primary" => Ok(Self::Primary),
            "provider" => Ok(Self::Provider),
            other => Err(format!("unknown role {other:?}")),
        }
    }
}

/// Trust of a peer as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrustLevel {
    /// Admitted on first contact under a `first-contact` policy: lowest trust.
    FirstContact,
    /// Listed in the policy (by fingerprint or organisation) or chained to the CA bundle.
    Allowed,
    /// A long-term peer with a pre-agreed agreement.
    LongTerm,
}

impl TrustLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FirstContact => "first-contact",
            Self::Allowed => "allowed",
            Self::LongTerm => "long-term",
        }
    }
}
