//! A stand-in for `crate::manifest` (being written by another engineer) with the same public
//! shape as its contract, so the surrogate builds and is tested before it lands. Its wire
//! format (JSON) is private to the stand-in; the real module's protobuf replaces it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    identity::{self, NodeIdentity},
    model::{Fingerprint, UnixMs},
};

const DOMAIN: &str = "p2pcdn manifest v1";
const MAX_ENCODED: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: String,
    pub size: u64,
    pub sha256: [u8; 32],
    pub content_type: String,
    pub etag: String,
    pub cache_control: String,
    pub last_modified_ms: Option<UnixMs>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub primary: Fingerprint,
    pub service: String,
    pub version: u64,
    pub created_ms: UnixMs,
    pub expires_ms: UnixMs,
    pub origin: String,
    pub entries: BTreeMap<String, Entry>,
    pub hot: Vec<String>,
}

impl Manifest {
    pub fn entry(&self, path: &str) -> Option<&Entry> {
        self.entries.get(path)
    }

    pub fn total_bytes(&self) -> u64 {
        self.entries.values().map(|e| e.size).sum()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedManifest {
    pub bytes: Vec<u8>,
    pub signature: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest signature does not verify with the primary's key")]
    Signature,
    #[error("manifest expired at {expires_ms} ms (now {now} ms)")]
    Expired { expires_ms: UnixMs, now: UnixMs },
    #[error("manifest invalid: {reason}")]
    Invalid { reason: &'static str },
    #[error("manifest larger than {MAX_ENCODED} bytes")]
    TooLarge,
    #[error("manifest undecodable: {0}")]
    Decode(#[from] serde_json::Error),
}

pub fn sign(identity: &NodeIdentity, m: &Manifest) -> SignedManifest {
    let bytes = serde_json::to_vec(m).unwrap_or_default();
    let signature = identity.sign(DOMAIN, &bytes);
    SignedManifest { bytes, signature }
}

pub fn open(
    s: &SignedManifest,
    primary_spki: &[u8],
    now: UnixMs,
) -> Result<Manifest, ManifestError> {
    if s.bytes.len() > MAX_ENCODED {
        return Err(ManifestError::TooLarge);
    }
    identity::verify(primary_spki, DOMAIN, &s.bytes, &s.signature)
        .map_err(|_| ManifestError::Signature)?;
    let m: Manifest = serde_json::from_slice(&s.bytes)?;
    if m.primary != identity::fingerprint_of_spki(primary_spki) {
        return Err(ManifestError::Invalid {
            reason: "primary is not the signing key's fingerprint",
        });
    }
    if m.expires_ms <= now {
        return Err(ManifestError::Expired {
            expires_ms: m.expires_ms,
            now,
        });
    }
    Ok(m)
}

pub fn encode_signed(s: &SignedManifest) -> Vec<u8> {
    serde_json::to_vec(s).unwrap_or_default()
}

pub fn decode_signed(bytes: &[u8]) -> Result<SignedManifest, ManifestError> {
    if bytes.len() > MAX_ENCODED + 4096 {
        return Err(ManifestError::TooLarge);
    }
    Ok(serde_json::from_slice(bytes)?)
}
