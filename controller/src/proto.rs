//! The generated `peering.v1` types and service, plus the limits every message obeys.
//!
//! Every message crossing the wire is bounded: the whole encoded message by
//! [`MAX_MESSAGE_BYTES`], and every field by what the `.proto` comments promise (checked by
//! [`Validate`]). The gRPC codec ([`LimitedCodec`], wired in by `build.rs`) decodes with those
//! limits and validates every decoded message, so undecodable, oversized or invalid input is
//! `Code::InvalidArgument` before any handler runs (tonic's own codec would say `Internal`).
//!
//! Advertisements and reputation reports are signed by their node's Ed25519 key with a domain
//! separator; [`open_advertisement`] and [`open_reputation`] are the only ways to read one that
//! came from elsewhere.

use std::{
    marker::PhantomData,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use prost::Message;
use tonic::{
    Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
};
use tonic_prost::{ProstCodec, ProstEncoder};

use crate::{
    identity::{self, NodeIdentity, fingerprint_of_spki},
    model::{Fingerprint, UnixMs},
};

/// Generated from `proto/p2pcdn/peering/v1/peering.proto`.
#[expect(clippy::all, reason = "generated code")]
pub mod pb {
    tonic::include_proto!("p2pcdn.peering.v1");
}

/// Largest encoded message accepted or sent, on both sides.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Signature domain of advertisements (see the `.proto`).
pub const ADVERTISEMENT_DOMAIN: &str = "p2pcdn.peering.v1.Advertisement";
/// Signature domain of reputation reports (see the `.proto`).
pub const REPUTATION_DOMAIN: &str = "p2pcdn.peering.v1.ReputationReport";
/// Identifiers (request, offer, arrangement, agreement ids), characters.
pub const MAX_ID_CHARS: usize = 64;
/// Node names, characters.
pub const MAX_NAME_CHARS: usize = 64;
/// Organisations, characters.
pub const MAX_ORGANISATION_CHARS: usize = 128;
/// Service names, characters.
pub const MAX_SERVICE_NAME_CHARS: usize = 32;
/// Human-readable details and reasons, characters.
pub const MAX_DETAIL_CHARS: usize = 256;
/// URLs and endpoints, characters.
pub const MAX_URL_CHARS: usize = 2048;
/// Entries of any repeated field.
pub const MAX_LIST_ENTRIES: usize = 256;
/// Longest arrangement, seconds (7 days).
pub const MAX_DURATION_S: u64 = 7 * 24 * 3600;
/// Longest an advertisement may claim to stay valid, milliseconds (1 day).
pub const MAX_ADVERT_TTL_MS: i64 = 24 * 3600 * 1000;
/// How far in the future a signed timestamp may be (clock skew), milliseconds.
pub const MAX_CLOCK_SKEW_MS: i64 = 5 * 60 * 1000;
/// Parts per million.
const PPM: u32 = 1_000_000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("{what}: {size} bytes exceed the limit of {limit} bytes")]
    TooLarge {
        what: &'static str,
        size: usize,
        limit: usize,
    },
    #[error("malformed {what}: {reason}")]
    Decode { what: &'static str, reason: String },
    #[error("{field}: {reason}")]
    Field { field: String, reason: String },
    #[error("public key is not an ed25519 subjectpublickeyinfo")]
    NotEd25519,
    #[error("node id {node_id} is not the sha-256 of the public key ({actual})")]
    NodeIdMismatch {
        node_id: String,
        actual: Fingerprint,
    },
    #[error("bad signature of {what}")]
    BadSignature { what: &'static str },
    #[error("{what} expired at {expires_at_ms} (now {now_ms})")]
    Expired {
        what: &'static str,
        expires_at_ms: UnixMs,
        now_ms: UnixMs,
    },
}

impl From<ProtoError> for Status {
    fn from(error: ProtoError) -> Self {
        Status::invalid_argument(error.to_string())
    }
}

fn field(name: impl Into<String>, reason: impl Into<String>) -> ProtoError {
    ProtoError::Field {
        field: name.into(),
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------------------
// Signed messages
// ---------------------------------------------------------------------------------------

/// Serialises and signs `ad` with this node's key. The caller fills `node_id` and
/// `public_key` from `id` (they are overwritten here so they always match the signer).
pub fn sign_advertisement(id: &NodeIdentity, ad: &pb::Advertisement) -> pb::SignedAdvertisement {
    let mut ad = ad.clone();
    ad.node_id = id.fingerprint.0.to_vec();
    ad.public_key = id.spki_der.clone();
    let bytes = ad.encode_to_vec();
    pb::SignedAdvertisement {
        signature: id.sign(ADVERTISEMENT_DOMAIN, &bytes),
        advertisement: bytes,
    }
}

/// Decodes and verifies a signed advertisement: size, node_id = SHA-256(public_key), the
/// signature, expiry (and not absurdly far in the future), then every field.
pub fn open_advertisement(
    s: &pb::SignedAdvertisement,
    now: UnixMs,
) -> Result<pb::Advertisement, ProtoError> {
    if s.advertisement.len() > MAX_MESSAGE_BYTES {
        return Err(ProtoError::TooLarge {
            what: "advertisement",
            size: s.advertisement.len(),
            limit: MAX_MESSAGE_BYTES,
        });
    }
    let ad =
        pb::Advertisement::decode(s.advertisement.as_slice()).map_err(|e| ProtoError::Decode {
            what: "advertisement",
            reason: e.to_string(),
        })?;
    check_node_key(&ad.node_id, &ad.public_key)?;
    identity::verify(
        &ad.public_key,
        ADVERTISEMENT_DOMAIN,
        &s.advertisement,
        &s.signature,
    )
    .map_err(|_| ProtoError::BadSignature {
        what: "advertisement",
    })?;
    if ad.expires_at_ms <= now {
        return Err(ProtoError::Expired {
            what: "advertisement",
            expires_at_ms: ad.expires_at_ms,
            now_ms: now,
        });
    }
    if ad.expires_at_ms > now.saturating_add(MAX_ADVERT_TTL_MS + MAX_CLOCK_SKEW_MS) {
        return Err(field(
            "expires_at_ms",
            format!("more than {MAX_ADVERT_TTL_MS} ms in the future"),
        ));
    }
    ad.validate()?;
    Ok(ad)
}

/// `node_id` must be 32 bytes and the SHA-256 of `public_key`, an Ed25519 SPKI.
fn check_node_key(node_id: &[u8], public_key: &[u8]) -> Result<Fingerprint, ProtoError> {
    let claimed = Fingerprint::from_slice(node_id).map_err(|e| field("node_id", e.to_string()))?;
    if public_key.len() > 128 {
        return Err(ProtoError::NotEd25519);
    }
    let actual = fingerprint_of_spki(public_key);
    if actual != claimed {
        return Err(ProtoError::NodeIdMismatch {
            node_id: claimed.to_string(),
            actual,
        });
    }
    // A zero-length signature check proves nothing, but it does parse the key.
    match identity::verify(public_key, "", &[], &[]) {
        Err(identity::IdentityError::NotEd25519) => Err(ProtoError::NotEd25519),
        _ => Ok(actual),
    }
}

/// Serialises and signs a reputation report; `reporter` is set to this node.
pub fn sign_reputation(
    id: &NodeIdentity,
    report: &pb::ReputationReport,
) -> pb::SignedReputationReport {
    let mut report = report.clone();
    report.reporter = id.fingerprint.0.to_vec();
    let bytes = report.encode_to_vec();
    pb::SignedReputationReport {
        signature: id.sign(REPUTATION_DOMAIN, &bytes),
        report: bytes,
    }
}

/// Decodes and verifies a reputation report. A report carries no key, so the caller passes
/// the reporter's SubjectPublicKeyInfo (from its advertisement or TLS certificate); its
/// SHA-256 must be the report's `reporter`.
pub fn open_reputation(
    s: &pb::SignedReputationReport,
    reporter_spki: &[u8],
    now: UnixMs,
) -> Result<pb::ReputationReport, ProtoError> {
    if s.report.len() > MAX_MESSAGE_BYTES {
        return Err(ProtoError::TooLarge {
            what: "reputation report",
            size: s.report.len(),
            limit: MAX_MESSAGE_BYTES,
        });
    }
    let report =
        pb::ReputationReport::decode(s.report.as_slice()).map_err(|e| ProtoError::Decode {
            what: "reputation report",
            reason: e.to_string(),
        })?;
    check_node_key(&report.reporter, reporter_spki)?;
    identity::verify(reporter_spki, REPUTATION_DOMAIN, &s.report, &s.signature).map_err(|_| {
        ProtoError::BadSignature {
            what: "reputation report",
        }
    })?;
    if report.window_end_ms > now.saturating_add(MAX_CLOCK_SKEW_MS) {
        return Err(field("window_end_ms", "in the future"));
    }
    report.validate()?;
    Ok(report)
}

// ---------------------------------------------------------------------------------------
// Validation: what the .proto comments promise
// ---------------------------------------------------------------------------------------

/// Field checks of one message (what its `.proto` comments promise). Context-free: signatures
/// and expiry against the clock are checked by the `open_*` functions and the handlers.
pub trait Validate {
    fn validate(&self) -> Result<(), ProtoError>;
}

pub fn validate_requirements(m: &pb::ServiceRequirements) -> Result<(), ProtoError> {
    m.validate()
}
pub fn validate_offer(m: &pb::Offer) -> Result<(), ProtoError> {
    m.validate()
}
pub fn validate_offer_reply(m: &pb::OfferReply) -> Result<(), ProtoError> {
    m.validate()
}
pub fn validate_offer_response(m: &pb::OfferResponse) -> Result<(), ProtoError> {
    m.validate()
}
pub fn validate_offer_response_reply(m: &pb::OfferResponseReply) -> Result<(), ProtoError> {
    m.validate()
}
pub fn validate_activate(m: &pb::ActivateRequest) -> Result<(), ProtoError> {
    m.validate()
}
pub fn validate_arrangement(m: &pb::Arrangement) -> Result<(), ProtoError> {
    m.validate()
}
pub fn validate_heartbeat(m: &pb::HeartbeatRequest) -> Result<(), ProtoError> {
    m.validate()
}
pub fn validate_disband(m: &pb::DisbandRequest) -> Result<(), ProtoError> {
    m.validate()
}
pub fn validate_advertisement(m: &pb::Advertisement) -> Result<(), ProtoError> {
    m.validate()
}

fn text(name: &str, value: &str, max: usize, required: bool) -> Result<(), ProtoError> {
    if required && value.is_empty() {
        return Err(field(name, "required"));
    }
    let chars = value.chars().count();
    if chars > max {
        return Err(field(name, format!("{chars} characters, at most {max}")));
    }
    if value.chars().any(char::is_control) {
        return Err(field(name, "contains control characters"));
    }
    Ok(())
}

fn id(name: &str, value: &str) -> Result<(), ProtoError> {
    text(name, value, MAX_ID_CHARS, true)
}

fn node_id(name: &str, value: &[u8]) -> Result<(), ProtoError> {
    Fingerprint::from_slice(value)
        .map(|_| ())
        .map_err(|e| field(name, e.to_string()))
}

fn list<T>(name: &str, items: &[T]) -> Result<(), ProtoError> {
    if items.len() > MAX_LIST_ENTRIES {
        return Err(field(
            name,
            format!("{} entries, at most {MAX_LIST_ENTRIES}", items.len()),
        ));
    }
    Ok(())
}

fn required<'a, T>(name: &str, value: &'a Option<T>) -> Result<&'a T, ProtoError> {
    value.as_ref().ok_or_else(|| field(name, "required"))
}

/// "host:port", IPv6 as "[addr]:port".
fn host_port(name: &str, value: &str, required: bool) -> Result<(), ProtoError> {
    text(name, value, 255 + 8, required)?;
    if value.is_empty() {
        return Ok(());
    }
    if value.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let bad = || field(name, format!("{value:?} is not host:port"));
    let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
    port.parse::<u16>().map_err(|_| bad())?;
    if host.contains(':') || !is_dns_name(host) {
        return Err(bad());
    }
    Ok(())
}

fn is_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn url(name: &str, value: &str, required: bool) -> Result<(), ProtoError> {
    text(name, value, MAX_URL_CHARS, required)?;
    if value.is_empty() {
        return Ok(());
    }
    let rest = value
        .strip_prefix("https://")
        .or_else(|| value.strip_prefix("http://"))
        .ok_or_else(|| field(name, format!("{value:?} is not an http(s) url")))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.is_empty() || authority.contains(char::is_whitespace) {
        return Err(field(name, format!("{value:?} has no host")));
    }
    Ok(())
}

fn mode(name: &str, value: i32) -> Result<(), ProtoError> {
    match pb::RedirectionMode::try_from(value) {
        Ok(pb::RedirectionMode::Unspecified) | Err(_) => {
            Err(field(name, format!("invalid redirection mode {value}")))
        }
        Ok(_) => Ok(()),
    }
}

fn modes(name: &str, values: &[i32]) -> Result<(), ProtoError> {
    list(name, values)?;
    if values.is_empty() {
        return Err(field(name, "at least one redirection mode"));
    }
    values.iter().try_for_each(|&m| mode(name, m))
}

fn currency(name: &str, value: &str) -> Result<(), ProtoError> {
    if value.len() == 3 && value.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(())
    } else {
        Err(field(
            name,
            format!("{value:?} is not an iso 4217 code (three upper-case letters)"),
        ))
    }
}

fn duration(name: &str, value: u64) -> Result<(), ProtoError> {
    if value == 0 || value > MAX_DURATION_S {
        return Err(field(
            name,
            format!("{value} s, must be 1..={MAX_DURATION_S}"),
        ));
    }
    Ok(())
}

fn percent(name: &str, value: u32) -> Result<(), ProtoError> {
    if value > 100 {
        return Err(field(name, format!("{value} %, at most 100")));
    }
    Ok(())
}

impl Validate for pb::Endpoints {
    fn validate(&self) -> Result<(), ProtoError> {
        host_port("endpoints.control", &self.control, false)?;
        if !self.decap_v4.is_empty() && self.decap_v4.parse::<Ipv4Addr>().is_err() {
            return Err(field("endpoints.decap_v4", "not an ipv4 address"));
        }
        if !self.decap_v6.is_empty() && self.decap_v6.parse::<Ipv6Addr>().is_err() {
            return Err(field("endpoints.decap_v6", "not an ipv6 address"));
        }
        url("endpoints.surrogate_url", &self.surrogate_url, false)?;
        host_port("endpoints.gossip", &self.gossip, false)
    }
}

impl Validate for pb::Footprint {
    fn validate(&self) -> Result<(), ProtoError> {
        list("footprint.regions", &self.regions)?;
        list("footprint.client_prefixes", &self.client_prefixes)?;
        list("footprint.asns", &self.asns)?;
        for region in &self.regions {
            let (country, sub) = match region.split_once('-') {
                Some((c, s)) => (c, Some(s)),
                None => (region.as_str(), None),
            };
            let country_ok = country.len() == 2 && country.bytes().all(|b| b.is_ascii_uppercase());
            let sub_ok = sub.is_none_or(|s| {
                (1..=3).contains(&s.len())
                    && s.bytes()
                        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
            });
            if !country_ok || !sub_ok {
                return Err(field(
                    "footprint.regions",
                    format!("{region:?} is not an iso 3166 code"),
                ));
            }
        }
        for prefix in &self.client_prefixes {
            if !is_cidr(prefix) {
                return Err(field(
                    "footprint.client_prefixes",
                    format!("{prefix:?} is not a cidr prefix"),
                ));
            }
        }
        Ok(())
    }
}

fn is_cidr(value: &str) -> bool {
    let Some((addr, len)) = value.split_once('/') else {
        return false;
    };
    let Ok(len) = len.parse::<u8>() else {
        return false;
    };
    match addr.parse::<IpAddr>() {
        Ok(IpAddr::V4(_)) => len <= 32,
        Ok(IpAddr::V6(_)) => len <= 128,
        Err(_) => false,
    }
}

impl Validate for pb::Advertisement {
    fn validate(&self) -> Result<(), ProtoError> {
        node_id("node_id", &self.node_id)?;
        if self.public_key.is_empty() || self.public_key.len() > 128 {
            return Err(ProtoError::NotEd25519);
        }
        text("name", &self.name, MAX_NAME_CHARS, true)?;
        text(
            "organisation",
            &self.organisation,
            MAX_ORGANISATION_CHARS,
            false,
        )?;
        let endpoints = required("endpoints", &self.endpoints)?;
        endpoints.validate()?;
        if endpoints.control.is_empty() {
            return Err(field("endpoints.control", "required"));
        }
        if let Some(footprint) = &self.footprint {
            footprint.validate()?;
        }
        modes("modes", &self.modes)?;
        required("spare", &self.spare)?;
        if self.expires_at_ms <= 0 {
            return Err(field("expires_at_ms", "required"));
        }
        Ok(())
    }
}

impl Validate for pb::SignedAdvertisement {
    fn validate(&self) -> Result<(), ProtoError> {
        if self.advertisement.is_empty() {
            return Err(field("advertisement", "required"));
        }
        if self.signature.len() != 64 {
            return Err(field(
                "signature",
                format!("{} bytes, an ed25519 signature is 64", self.signature.len()),
            ));
        }
        Ok(())
    }
}

impl Validate for pb::AdvertiseAck {
    fn validate(&self) -> Result<(), ProtoError> {
        Ok(())
    }
}

impl Validate for pb::ServiceSpec {
    fn validate(&self) -> Result<(), ProtoError> {
        text("service.name", &self.name, MAX_SERVICE_NAME_CHARS, true)?;
        if !self
            .name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(field("service.name", "only [a-z0-9-]"));
        }
        list("service.addresses", &self.addresses)?;
        if self.addresses.is_empty() {
            return Err(field("service.addresses", "at least one"));
        }
        for address in &self.addresses {
            if address.parse::<SocketAddr>().is_err() {
                return Err(field(
                    "service.addresses",
                    format!("{address:?} is not ip:port"),
                ));
            }
        }
        list("service.host_names", &self.host_names)?;
        for host in &self.host_names {
            if !is_dns_name(host) {
                return Err(field(
                    "service.host_names",
                    format!("{host:?} is not a host name"),
                ));
            }
        }
        Ok(())
    }
}

impl Validate for pb::ManifestRef {
    fn validate(&self) -> Result<(), ProtoError> {
        url("manifest.url", &self.url, true)?;
        if !self.sha256.is_empty() && self.sha256.len() != 32 {
            return Err(field("manifest.sha256", "32 bytes or empty"));
        }
        Ok(())
    }
}

impl Validate for pb::Price {
    fn validate(&self) -> Result<(), ProtoError> {
        currency("price.currency", &self.currency)
    }
}

impl Validate for pb::SlaTerms {
    fn validate(&self) -> Result<(), ProtoError> {
        if self.availability_ppm > PPM {
            return Err(field("sla.availability_ppm", "at most 1000000"));
        }
        Ok(())
    }
}

impl Validate for pb::ServiceRequirements {
    fn validate(&self) -> Result<(), ProtoError> {
        id("request_id", &self.request_id)?;
        required("service", &self.service)?.validate()?;
        if let Some(manifest) = &self.manifest {
            manifest.validate()?;
        }
        let capacity = required("capacity", &self.capacity)?;
        if capacity.new_connections_per_s == 0 && capacity.egress_mbps == 0 {
            return Err(field("capacity", "asks for nothing"));
        }
        duration("duration_s", self.duration_s)?;
        required("max_price", &self.max_price)?.validate()?;
        if let Some(sla) = &self.min_sla {
            sla.validate()?;
        }
        modes("modes", &self.modes)
    }
}

impl Validate for pb::Offer {
    fn validate(&self) -> Result<(), ProtoError> {
        id("offer.offer_id", &self.offer_id)?;
        id("offer.request_id", &self.request_id)?;
        node_id("offer.provider", &self.provider)?;
        required("offer.granted", &self.granted)?;
        required("offer.price", &self.price)?.validate()?;
        if let Some(sla) = &self.sla {
            sla.validate()?;
        }
        if let Some(p) = &self.penalties {
            percent(
                "offer.penalties.credit_percent_per_breach",
                p.credit_percent_per_breach,
            )?;
            percent("offer.penalties.max_credit_percent", p.max_credit_percent)?;
        }
        if self.expires_at_ms <= 0 {
            return Err(field("offer.expires_at_ms", "required"));
        }
        mode("offer.mode", self.mode)?;
        duration("offer.duration_s", self.duration_s)
    }
}

impl Validate for pb::Reject {
    fn validate(&self) -> Result<(), ProtoError> {
        if pb::RejectReason::try_from(self.reason).is_err() {
            return Err(field(
                "reject.reason",
                format!("unknown reason {}", self.reason),
            ));
        }
        text("reject.detail", &self.detail, MAX_DETAIL_CHARS, false)
    }
}

impl Validate for pb::OfferReply {
    fn validate(&self) -> Result<(), ProtoError> {
        use pb::offer_reply::Result as R;
        match required("result", &self.result)? {
            R::Offer(offer) => offer.validate(),
            R::Reject(reject) => reject.validate(),
        }
    }
}

impl Validate for pb::OfferResponse {
    fn validate(&self) -> Result<(), ProtoError> {
        use pb::offer_response::Decision as D;
        id("offer_id", &self.offer_id)?;
        match required("decision", &self.decision)? {
            D::Accept(_) => Ok(()),
            D::Counter(counter) => required("counter.price", &counter.price)?.validate(),
            D::Decline(decline) => text("decline.reason", &decline.reason, MAX_DETAIL_CHARS, false),
        }
    }
}

impl Validate for pb::OfferResponseReply {
    fn validate(&self) -> Result<(), ProtoError> {
        use pb::offer_response_reply::Result as R;
        match required("result", &self.result)? {
            R::Accepted(accepted) => id("accepted.arrangement_id", &accepted.arrangement_id),
            R::CounterOffer(offer) => offer.validate(),
            R::Reject(reject) => reject.validate(),
            R::Declined(_) => Ok(()),
        }
    }
}

impl Validate for pb::ActivateRequest {
    fn validate(&self) -> Result<(), ProtoError> {
        text("arrangement_id", &self.arrangement_id, MAX_ID_CHARS, false)?;
        text("agreement_id", &self.agreement_id, MAX_ID_CHARS, false)?;
        match (self.arrangement_id.is_empty(), self.agreement_id.is_empty()) {
            (false, true) => {}
            (true, false) => {
                required("requirements", &self.requirements)?.validate()?;
            }
            (true, true) => {
                return Err(field(
                    "arrangement_id",
                    "either arrangement_id or agreement_id is required",
                ));
            }
            (false, false) => {
                return Err(field(
                    "agreement_id",
                    "arrangement_id and agreement_id are exclusive",
                ));
            }
        }
        list("tunnel_sources", &self.tunnel_sources)?;
        for source in &self.tunnel_sources {
            if source.parse::<IpAddr>().is_err() {
                return Err(field(
                    "tunnel_sources",
                    format!("{source:?} is not an ip address"),
                ));
            }
        }
        if let Some(endpoints) = &self.primary_endpoints {
            endpoints.validate()?;
        }
        Ok(())
    }
}

fn state(name: &str, value: i32) -> Result<(), ProtoError> {
    match pb::ArrangementState::try_from(value) {
        Ok(pb::ArrangementState::Unspecified) | Err(_) => {
            Err(field(name, format!("invalid arrangement state {value}")))
        }
        Ok(_) => Ok(()),
    }
}

impl Validate for pb::Arrangement {
    fn validate(&self) -> Result<(), ProtoError> {
        id("arrangement_id", &self.arrangement_id)?;
        node_id("primary", &self.primary)?;
        node_id("provider", &self.provider)?;
        if let Some(terms) = &self.terms {
            terms.validate()?;
        }
        state("state", self.state)?;
        if let Some(endpoints) = &self.provider_endpoints {
            endpoints.validate()?;
        }
        text("agreement_id", &self.agreement_id, MAX_ID_CHARS, false)?;
        if let Some(service) = &self.service {
            service.validate()?;
        }
        Ok(())
    }
}

impl Validate for pb::HeartbeatRequest {
    fn validate(&self) -> Result<(), ProtoError> {
        id("arrangement_id", &self.arrangement_id)
    }
}

impl Validate for pb::HeartbeatReply {
    fn validate(&self) -> Result<(), ProtoError> {
        state("state", self.state)
    }
}

impl Validate for pb::Settlement {
    fn validate(&self) -> Result<(), ProtoError> {
        currency("settlement.currency", &self.currency)?;
        if self.total_micros != self.charges_micros.saturating_sub(self.credit_micros) {
            return Err(field(
                "settlement.total_micros",
                "is not charges_micros - credit_micros",
            ));
        }
        Ok(())
    }
}

impl Validate for pb::DisbandRequest {
    fn validate(&self) -> Result<(), ProtoError> {
        id("arrangement_id", &self.arrangement_id)?;
        match pb::DisbandReason::try_from(self.reason) {
            Ok(pb::DisbandReason::Unspecified) | Err(_) => {
                return Err(field(
                    "reason",
                    format!("invalid disband reason {}", self.reason),
                ));
            }
            Ok(_) => {}
        }
        if let Some(settlement) = &self.settlement {
            settlement.validate()?;
        }
        Ok(())
    }
}

impl Validate for pb::DisbandReply {
    fn validate(&self) -> Result<(), ProtoError> {
        if let Some(settlement) = &self.settlement {
            settlement.validate()?;
        }
        Ok(())
    }
}

impl Validate for pb::ReputationReport {
    fn validate(&self) -> Result<(), ProtoError> {
        node_id("reporter", &self.reporter)?;
        node_id("subject", &self.subject)?;
        if self.reporter == self.subject {
            return Err(field("subject", "a node cannot report on itself"));
        }
        if self.score_ppm > PPM {
            return Err(field("score_ppm", "at most 1000000"));
        }
        if self.mismatches > self.samples {
            return Err(field("mismatches", "more than samples"));
        }
        if self.window_start_ms > self.window_end_ms {
            return Err(field("window_start_ms", "after window_end_ms"));
        }
        Ok(())
    }
}

impl Validate for pb::SignedReputationReport {
    fn validate(&self) -> Result<(), ProtoError> {
        if self.report.is_empty() {
            return Err(field("report", "required"));
        }
        if self.signature.len() != 64 {
            return Err(field(
                "signature",
                format!("{} bytes, an ed25519 signature is 64", self.signature.len()),
            ));
        }
        Ok(())
    }
}

impl Validate for pb::ReputationAck {
    fn validate(&self) -> Result<(), ProtoError> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Codec
// ---------------------------------------------------------------------------------------

/// The gRPC codec of `peering.v1` (set in `build.rs` through `codec_path`): prost encoding,
/// and a decoder that refuses messages over [`MAX_MESSAGE_BYTES`], undecodable bytes and
/// messages that fail [`Validate`], all with `Code::InvalidArgument`.
#[derive(Debug)]
pub struct LimitedCodec<T, U> {
    inner: ProstCodec<T, U>,
}

impl<T, U> Default for LimitedCodec<T, U> {
    fn default() -> Self {
        Self {
            inner: ProstCodec::default(),
        }
    }
}

impl<T, U> Codec for LimitedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Validate + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = LimitedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.inner.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        LimitedDecoder {
            _pd: PhantomData,
            buffer_settings: BufferSettings::default(),
        }
    }
}

/// See [`LimitedCodec`].
#[derive(Debug)]
pub struct LimitedDecoder<U> {
    _pd: PhantomData<U>,
    buffer_settings: BufferSettings,
}

impl<U: Message + Default + Validate> Decoder for LimitedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        decode_limited(buf)
            .map(Some)
            .map_err(|e| Status::invalid_argument(e.to_string()))
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.buffer_settings
    }
}

fn message_name<U>() -> &'static str {
    let full = std::any::type_name::<U>();
    full.rsplit("::").next().unwrap_or(full)
}

/// Size limit, prost decoding and [`Validate`] for one message.
pub fn decode_limited<U: Message + Default + Validate>(
    mut buf: impl prost::bytes::Buf,
) -> Result<U, ProtoError> {
    let what = message_name::<U>();
    let size = buf.remaining();
    if size > MAX_MESSAGE_BYTES {
        return Err(ProtoError::TooLarge {
            what,
            size,
            limit: MAX_MESSAGE_BYTES,
        });
    }
    let message = U::decode(&mut buf).map_err(|e| ProtoError::Decode {
        what,
        reason: e.to_string(),
    })?;
    message.validate().map_err(|e| match e {
        ProtoError::Field { field, reason } => ProtoError::Field {
            field: format!("{what}.{field}"),
            reason,
        },
        other => other,
    })?;
    Ok(message)
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]
mod tests {
    use super::*;
    use crate::model::now_ms;

    /// One change that must make a message invalid.
    type Mutation<T> = Box<dyn Fn(&mut T)>;

    fn node() -> NodeIdentity {
        NodeIdentity::generate("edge-1", "Example CDN", &[]).unwrap()
    }

    fn advert(now: UnixMs) -> pb::Advertisement {
        pb::Advertisement {
            name: "edge-1".into(),
            organisation: "Example CDN".into(),
            endpoints: Some(pb::Endpoints {
                control: "127.0.0.1:7443".into(),
                decap_v4: "192.0.2.1".into(),
                gossip: "edge-1.example:7946".into(),
                ..Default::default()
            }),
            footprint: Some(pb::Footprint {
                regions: vec!["DE".into(), "US-CA".into()],
                client_prefixes: vec!["198.51.100.0/24".into(), "2001:db8::/32".into()],
                asns: vec![64500],
            }),
            modes: vec![pb::RedirectionMode::DsrGue as i32],
            spare: Some(pb::Capacity {
                new_connections_per_s: 1000,
                egress_mbps: 500,
                storage_bytes: 1 << 30,
            }),
            measured_at_ms: now,
            sequence: 1,
            expires_at_ms: now + 60_000,
            ..Default::default()
        }
    }

    pub(crate) fn requirements() -> pb::ServiceRequirements {
        pb::ServiceRequirements {
            request_id: "req-1".into(),
            service: Some(pb::ServiceSpec {
                name: "video".into(),
                addresses: vec!["203.0.113.10:443".into(), "[2001:db8::10]:443".into()],
                host_names: vec!["video.example".into()],
            }),
            manifest: Some(pb::ManifestRef {
                url: "https://video.example/manifest".into(),
                version: 1,
                sha256: vec![0; 32],
            }),
            capacity: Some(pb::Capacity {
                new_connections_per_s: 500,
                egress_mbps: 100,
                storage_bytes: 0,
            }),
            duration_s: 3600,
            max_price: Some(pb::Price {
                per_gb_micros: 10_000,
                per_1000_connections_micros: 500,
                currency: "EUR".into(),
            }),
            min_sla: Some(pb::SlaTerms {
                availability_ppm: 999_000,
                p99_latency_ms: 200,
            }),
            modes: vec![pb::RedirectionMode::DsrGue as i32],
        }
    }

    #[test]
    fn signed_advertisement_round_trips() {
        let id = node();
        let now = now_ms();
        let signed = sign_advertisement(&id, &advert(now));
        let opened = open_advertisement(&signed, now).unwrap();
        assert_eq!(opened.node_id, id.fingerprint.0.to_vec());
        assert_eq!(opened.name, "edge-1");
        assert_eq!(opened.sequence, 1);
    }

    #[test]
    fn tampered_forged_and_expired_advertisements_are_refused() {
        let (id, other) = (node(), node());
        let now = now_ms();
        let signed = sign_advertisement(&id, &advert(now));

        // One flipped bit in the signed bytes.
        let mut tampered = signed.clone();
        let last = tampered.advertisement.len() - 1;
        tampered.advertisement[last] ^= 1;
        assert!(open_advertisement(&tampered, now).is_err());

        // Signed by another key than the node id's.
        let mut forged = pb::Advertisement::decode(signed.advertisement.as_slice()).unwrap();
        forged.name = "evil".into();
        let bytes = forged.encode_to_vec();
        let forged = pb::SignedAdvertisement {
            signature: other.sign(ADVERTISEMENT_DOMAIN, &bytes),
            advertisement: bytes,
        };
        assert_eq!(
            open_advertisement(&forged, now),
            Err(ProtoError::BadSignature {
                what: "advertisement"
            })
        );

        // node_id that is not the hash of the public key, even if correctly signed.
        let mut wrong = advert(now);
        wrong.node_id = other.fingerprint.0.to_vec();
        wrong.public_key = id.spki_der.clone();
        let bytes = wrong.encode_to_vec();
        let wrong = pb::SignedAdvertisement {
            signature: id.sign(ADVERTISEMENT_DOMAIN, &bytes),
            advertisement: bytes,
        };
        assert!(matches!(
            open_advertisement(&wrong, now),
            Err(ProtoError::NodeIdMismatch { .. })
        ));

        // Expired, and a signature for another domain.
        assert!(matches!(
            open_advertisement(&signed, now + 61_000),
            Err(ProtoError::Expired { .. })
        ));
        let mut reused = signed.clone();
        reused.signature = id.sign(REPUTATION_DOMAIN, &signed.advertisement);
        assert!(open_advertisement(&reused, now).is_err());

        // Garbage and oversized bytes.
        let garbage = pb::SignedAdvertisement {
            advertisement: vec![0xff; 16],
            signature: vec![0; 64],
        };
        assert!(matches!(
            open_advertisement(&garbage, now),
            Err(ProtoError::Decode { .. })
        ));
        let huge = pb::SignedAdvertisement {
            advertisement: vec![0; MAX_MESSAGE_BYTES + 1],
            signature: vec![0; 64],
        };
        assert!(matches!(
            open_advertisement(&huge, now),
            Err(ProtoError::TooLarge { .. })
        ));
    }

    #[test]
    fn advertisement_fields_are_validated_after_the_signature() {
        let id = node();
        let now = now_ms();
        let cases: Vec<(&str, Mutation<pb::Advertisement>)> = vec![
            ("name", Box::new(|a| a.name = "x".repeat(65))),
            ("modes", Box::new(|a| a.modes = vec![])),
            ("modes", Box::new(|a| a.modes = vec![0])),
            ("modes", Box::new(|a| a.modes = vec![42])),
            (
                "footprint.regions",
                Box::new(|a| a.footprint.as_mut().unwrap().regions = vec!["germany".into()]),
            ),
            (
                "footprint.client_prefixes",
                Box::new(|a| {
                    a.footprint.as_mut().unwrap().client_prefixes = vec!["10.0.0.0/33".into()]
                }),
            ),
            (
                "endpoints.control",
                Box::new(|a| a.endpoints.as_mut().unwrap().control = "no-port".into()),
            ),
            (
                "endpoints.decap_v4",
                Box::new(|a| a.endpoints.as_mut().unwrap().decap_v4 = "::1".into()),
            ),
            (
                "expires_at_ms",
                Box::new(move |a| a.expires_at_ms = now + 10 * MAX_ADVERT_TTL_MS),
            ),
        ];
        for (name, mutate) in cases {
            let mut ad = advert(now);
            mutate(&mut ad);
            let err = open_advertisement(&sign_advertisement(&id, &ad), now).unwrap_err();
            assert!(err.to_string().starts_with(name), "{name}: {err}");
        }
    }

    #[test]
    fn reputation_reports_round_trip_and_bind_the_reporter() {
        let (id, subject, other) = (node(), node(), node());
        let now = now_ms();
        let report = pb::ReputationReport {
            subject: subject.fingerprint.0.to_vec(),
            samples: 10,
            mismatches: 1,
            score_ppm: 900_000,
            window_start_ms: now - 1000,
            window_end_ms: now,
            sequence: 3,
            ..Default::default()
        };
        let signed = sign_reputation(&id, &report);
        let opened = open_reputation(&signed, &id.spki_der, now).unwrap();
        assert_eq!(opened.reporter, id.fingerprint.0.to_vec());
        assert!(matches!(
            open_reputation(&signed, &other.spki_der, now),
            Err(ProtoError::NodeIdMismatch { .. })
        ));
        let mut bad = signed.clone();
        bad.signature[0] ^= 1;
        assert!(matches!(
            open_reputation(&bad, &id.spki_der, now),
            Err(ProtoError::BadSignature { .. })
        ));
        let mut lying = report.clone();
        lying.mismatches = 11;
        let err = open_reputation(&sign_reputation(&id, &lying), &id.spki_der, now).unwrap_err();
        assert!(err.to_string().contains("mismatches"), "{err}");
    }

    #[test]
    fn requirements_validation_names_the_field() {
        validate_requirements(&requirements()).unwrap();
        let cases: Vec<(&str, Mutation<pb::ServiceRequirements>)> = vec![
            ("request_id", Box::new(|r| r.request_id.clear())),
            ("request_id", Box::new(|r| r.request_id = "x".repeat(65))),
            ("service", Box::new(|r| r.service = None)),
            (
                "service.name",
                Box::new(|r| r.service.as_mut().unwrap().name = "Video!".into()),
            ),
            (
                "service.addresses",
                Box::new(|r| r.service.as_mut().unwrap().addresses = vec!["203.0.113.10".into()]),
            ),
            (
                "duration_s",
                Box::new(|r| r.duration_s = MAX_DURATION_S + 1),
            ),
            ("duration_s", Box::new(|r| r.duration_s = 0)),
            (
                "price.currency",
                Box::new(|r| r.max_price.as_mut().unwrap().currency = "eur".into()),
            ),
            (
                "sla.availability_ppm",
                Box::new(|r| r.min_sla.as_mut().unwrap().availability_ppm = 1_000_001),
            ),
            (
                "capacity",
                Box::new(|r| r.capacity = Some(pb::Capacity::default())),
            ),
            ("modes", Box::new(|r| r.modes.clear())),
            (
                "manifest.sha256",
                Box::new(|r| r.manifest.as_mut().unwrap().sha256 = vec![1; 3]),
            ),
        ];
        for (name, mutate) in cases {
            let mut r = requirements();
            mutate(&mut r);
            let err = validate_requirements(&r).unwrap_err();
            assert!(err.to_string().starts_with(name), "{name}: {err}");
            let status = Status::from(err);
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
        }
    }

    #[test]
    fn activate_needs_exactly_one_of_arrangement_or_agreement() {
        let mut a = pb::ActivateRequest {
            arrangement_id: "arr-1".into(),
            tunnel_sources: vec!["192.0.2.7".into()],
            ..Default::default()
        };
        validate_activate(&a).unwrap();
        a.agreement_id = "lt-1".into();
        assert!(validate_activate(&a).is_err());
        a.arrangement_id.clear();
        assert!(
            validate_activate(&a).is_err(),
            "long-term needs requirements"
        );
        a.requirements = Some(requirements());
        validate_activate(&a).unwrap();
        a.tunnel_sources.push("not-an-ip".into());
        assert!(validate_activate(&a).is_err());
    }

    #[test]
    fn offers_and_responses_are_validated() {
        let offer = pb::Offer {
            offer_id: "off-1".into(),
            request_id: "req-1".into(),
            provider: vec![7; 32],
            granted: Some(pb::Capacity::default()),
            price: Some(pb::Price {
                currency: "EUR".into(),
                ..Default::default()
            }),
            penalties: Some(pb::Penalties {
                credit_percent_per_breach: 10,
                max_credit_percent: 50,
            }),
            expires_at_ms: 1,
            mode: pb::RedirectionMode::DsrIpip as i32,
            duration_s: 60,
            ..Default::default()
        };
        validate_offer(&offer).unwrap();
        let mut bad = offer.clone();
        bad.provider = vec![7; 31];
        assert!(validate_offer(&bad).is_err());
        let mut bad = offer.clone();
        bad.penalties.as_mut().unwrap().max_credit_percent = 101;
        assert!(validate_offer(&bad).is_err());
        assert!(validate_offer_reply(&pb::OfferReply { result: None }).is_err());
        validate_offer_reply(&pb::OfferReply {
            result: Some(pb::offer_reply::Result::Offer(offer)),
        })
        .unwrap();
        let response = pb::OfferResponse {
            offer_id: "off-1".into(),
            decision: Some(pb::offer_response::Decision::Counter(pb::Counter {
                price: None,
                capacity: None,
            })),
        };
        assert!(validate_offer_response(&response).is_err());
        let disband = pb::DisbandRequest {
            arrangement_id: "arr-1".into(),
            reason: pb::DisbandReason::CrowdOver as i32,
            settlement: Some(pb::Settlement {
                charges_micros: 100,
                credit_micros: 10,
                total_micros: 90,
                currency: "EUR".into(),
            }),
            ..Default::default()
        };
        validate_disband(&disband).unwrap();
        let mut wrong = disband.clone();
        wrong.settlement.as_mut().unwrap().total_micros = 100;
        assert!(validate_disband(&wrong).is_err());
    }

    #[test]
    fn codec_decoder_says_invalid_argument() {
        let err = decode_limited::<pb::HeartbeatRequest>(&[0xffu8, 0xff, 0xff][..]).unwrap_err();
        assert!(matches!(
            err,
            ProtoError::Decode {
                what: "HeartbeatRequest",
                ..
            }
        ));
        let big = vec![0u8; MAX_MESSAGE_BYTES + 1];
        assert!(matches!(
            decode_limited::<pb::HeartbeatRequest>(&big[..]),
            Err(ProtoError::TooLarge { .. })
        ));
        let empty = pb::HeartbeatRequest::default().encode_to_vec();
        let err = decode_limited::<pb::HeartbeatRequest>(&empty[..]).unwrap_err();
        assert_eq!(err.to_string(), "HeartbeatRequest.arrangement_id: required");
        let ok = pb::HeartbeatRequest {
            arrangement_id: "arr-1".into(),
            ..Default::default()
        }
        .encode_to_vec();
        decode_limited::<pb::HeartbeatRequest>(&ok[..]).unwrap();
    }
}
