//! The node's configuration file (TOML) and `p2pcdn init`.
//!
//! Every key has a documented default except `node.name`; unknown keys are refused; every value
//! is checked when the file is loaded, before anything binds a socket, and a bad one gives one
//! line naming the file and the key: `config /etc/p2pcdn/p2pcdn.toml: admin.listen: invalid
//! socket address "x"`. Relative paths resolve against the directory of the config file.
//! docs/operations.md is the reference of every key.

mod dataplane;
mod template;

use std::{
    collections::HashSet,
    fs,
    io::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

pub use dataplane::{DataplaneConfig, SurrogateSection};
use serde::{Deserialize, Deserializer, de::Error as _};

use crate::{
    admin::AdminRole,
    identity::{IdentityError, NodeIdentity},
    model::{Fingerprint, Role},
    proto::pb,
};

/// Where `p2pcdn run` and the operator commands look without `--config`.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/p2pcdn/p2pcdn.toml";
/// The file name `init` writes and the store's file name in `node.data_dir`.
pub const CONFIG_FILE: &str = "p2pcdn.toml";
pub const STORE_FILE: &str = "p2pcdn.db";
pub const KEY_FILE: &str = "node.key";
pub const CERT_FILE: &str = "node.crt";
/// A config file larger than this is refused (it is a few kilobytes).
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;
/// Longest arrangement the protocol allows (7 days).
pub const MAX_DURATION_S: u64 = 7 * 24 * 3600;
/// Shortest admin token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

/// Errors loading the config or running `init`. Messages are one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {}: cannot read: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {}: larger than {MAX_CONFIG_BYTES} bytes", .path.display())]
    TooLarge { path: PathBuf },
    #[error("config {}: line {line}: {message}", .path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("config {}: {key}: {reason}", .path.display())]
    Invalid {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("init: {} already exists (use --force to replace it and the node key)", .0.display())]
    Exists(PathBuf),
    #[error("init: {}: {source}", .path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("init: {0}")]
    Identity(#[from] IdentityError),
    #[error("init: no random numbers from the system")]
    Random,
}

/// The whole configuration, validated. Paths are resolved (absolute when the file's path was).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The file it was loaded from.
    #[serde(skip)]
    pub path: PathBuf,
    pub node: NodeConfig,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub discovery: DiscoveryConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub resources: ResourcesConfig,
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
    /// The XDP redirector this node programs; `None`: control plane only.
    #[serde(default)]
    pub dataplane: Option<DataplaneConfig>,
    /// The surrogate serving primaries' content here; `None`: no content is served.
    #[serde(default)]
    pub surrogate: Option<SurrogateSection>,
    /// The overload detector (with a `[dataplane]`).
    #[serde(default)]
    pub monitor: crate::monitor::MonitorConfig,
    /// Tuning of the local admission rates to the origin's signals (with a `[dataplane]`);
    /// `None`: the rates stay as configured.
    #[serde(default)]
    pub admission: Option<crate::signals::AdmissionConfig>,
}

/// `[node]`: who this node is and where it listens for peers.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Human name, 1 to 64 characters of `[A-Za-z0-9._-]`.
    #[serde(deserialize_with = "de_node_name")]
    pub name: String,
    /// Operating organisation, at most 128 characters (default empty).
    #[serde(default, deserialize_with = "de_organisation")]
    pub organisation: String,
    /// Directory of the store (`p2pcdn.db`); default: the config file's directory.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// gRPC (mutual TLS) listen address; default `0.0.0.0:7443`.
    #[serde(default = "default_listen", deserialize_with = "de_socket_addr")]
    pub listen: SocketAddr,
    /// `host:port` peers use to reach `listen`; default: `listen` (required when `listen` is an
    /// unspecified address). Use [`NodeConfig::control_endpoint`].
    #[serde(default, deserialize_with = "de_opt_host_port")]
    pub advertise_control: Option<String>,
    /// Footprint regions: ISO 3166-1 alpha-2 codes, optionally with a subdivision (`US-CA`).
    #[serde(default, deserialize_with = "de_regions")]
    pub regions: Vec<String>,
    /// Footprint client prefixes (CIDR).
    #[serde(default, deserialize_with = "de_prefixes")]
    pub client_prefixes: Vec<String>,
}

impl NodeConfig {
    /// The control endpoint peers dial: `advertise_control`, else `listen`.
    pub fn control_endpoint(&self) -> String {
        self.advertise_control
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }
}

/// `[tls]`: the node's key and certificate, and an optional CA bundle.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PKCS#8 PEM private key (mode 0600); default `node.key`.
    #[serde(default = "default_key")]
    pub key: PathBuf,
    /// PEM certificate; default `node.crt`.
    #[serde(default = "default_cert")]
    pub cert: PathBuf,
    /// PEM CA certificates: peers whose certificate chains to one of them are allowed.
    #[serde(default)]
    pub ca_bundle: Option<PathBuf>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            key: default_key(),
            cert: default_cert(),
            ca_bundle: None,
        }
    }
}

/// `[discovery]`: membership gossip and advertisement timing.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// UDP gossip listen address; default `0.0.0.0:7946`.
    #[serde(default = "default_gossip_listen", deserialize_with = "de_socket_addr")]
    pub gossip_listen: SocketAddr,
    /// `ip:port` other nodes gossip to; default `gossip_listen` (required when it is
    /// unspecified). Use [`DiscoveryConfig::gossip_endpoint`].
    #[serde(default, deserialize_with = "de_opt_socket_addr")]
    pub advertise_gossip: Option<SocketAddr>,
    /// Gossip endpoints (`host:port`) to join through; default none (a first node).
    #[serde(default, deserialize_with = "de_host_ports")]
    pub seeds: Vec<String>,
    /// Gossip round interval, 10 to 60000 ms; default 500.
    #[serde(default = "default_gossip_interval_ms")]
    pub gossip_interval_ms: u64,
    /// Lifetime of our advertisement, 2 to 86400 s; default 60.
    #[serde(default = "default_advert_ttl_s")]
    pub advert_ttl_s: u64,
    /// Interval between fresh advertisements, at least 1 s and less than `advert_ttl_s`;
    /// default 10.
    #[serde(default = "default_advert_refresh_s")]
    pub advert_refresh_s: u64,
    /// A silent node is suspect after this many ms; default 3000.
    #[serde(default = "default_suspect_after_ms")]
    pub suspect_after_ms: u64,
    /// … and dead (its adverts removed) after this many, more than `suspect_after_ms`;
    /// default 15000.
    #[serde(default = "default_dead_after_ms")]
    pub dead_after_ms: u64,
}

impl DiscoveryConfig {
    /// The gossip address announced to others: `advertise_gossip`, else `gossip_listen`.
    pub fn gossip_endpoint(&self) -> SocketAddr {
        self.advertise_gossip.unwrap_or(self.gossip_listen)
    }
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            gossip_listen: default_gossip_listen(),
            advertise_gossip: None,
            seeds: Vec::new(),
            gossip_interval_ms: default_gossip_interval_ms(),
            advert_ttl_s: default_advert_ttl_s(),
            advert_refresh_s: default_advert_refresh_s(),
            suspect_after_ms: default_suspect_after_ms(),
            dead_after_ms: default_dead_after_ms(),
        }
    }
}

/// `[admin]`: the operator API.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// HTTPS listen address; default `127.0.0.1:7444`.
    #[serde(default = "default_admin_listen", deserialize_with = "de_socket_addr")]
    pub listen: SocketAddr,
    /// Bearer tokens (`[[admin.tokens]]`).
    #[serde(default)]
    pub tokens: Vec<AdminToken>,
    /// Client certificates by fingerprint (`[[admin.clients]]`).
    #[serde(default)]
    pub clients: Vec<AdminClientCert>,
}

impl AdminConfig {
    /// The first token with the operator role (what the operator CLI uses by default).
    pub fn operator_token(&self) -> Option<&str> {
        self.tokens
            .iter()
            .find(|t| t.role == AdminRole::Operator)
            .map(|t| t.token.as_str())
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            tokens: Vec::new(),
            clients: Vec::new(),
        }
    }
}

/// A bearer token and its role.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminToken {
    /// 16 to 512 printable ASCII characters, no spaces.
    #[serde(deserialize_with = "de_token")]
    pub token: String,
    pub role: AdminRole,
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminToken")
            .field("token", &"<redacted>")
            .field("role", &self.role)
            .finish()
    }
}

/// A client certificate (by fingerprint) and its role.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminClientCert {
    #[serde(deserialize_with = "de_fingerprint")]
    pub fingerprint: Fingerprint,
    pub role: AdminRole,
}

/// A redirection mode as the config spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    DsrGue,
    DsrIpip,
    HttpRedirect,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DsrGue => "dsr-gue",
            Self::DsrIpip => "dsr-ipip",
            Self::HttpRedirect => "http-redirect",
        }
    }

    pub fn to_pb(self) -> pb::RedirectionMode {
        match self {
            Self::DsrGue => pb::RedirectionMode::DsrGue,
            Self::DsrIpip => pb::RedirectionMode::DsrIpip,
            Self::HttpRedirect => pb::RedirectionMode::HttpRedirect,
        }
    }
}

/// `[resources]`: this node's own capacity and how peers' traffic reaches it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourcesConfig {
    /// New TCP connections per second this node can take; default 1000.
    #[serde(default = "default_conn_per_s")]
    pub new_connections_per_s: u32,
    /// Egress bandwidth, Mbit/s; default 1000.
    #[serde(default = "default_egress_mbps")]
    pub egress_mbps: u32,
    /// Storage for replicated content, bytes; default 0.
    #[serde(default)]
    pub storage_bytes: u64,
    /// IPv4 address that accepts tunnelled (DSR) traffic; default none.
    #[serde(default, deserialize_with = "de_opt_ipv4")]
    pub decap_v4: Option<Ipv4Addr>,
    /// IPv6 address that accepts tunnelled (DSR) traffic; default none.
    #[serde(default, deserialize_with = "de_opt_ipv6")]
    pub decap_v6: Option<Ipv6Addr>,
    /// Base URL of the surrogate HTTP server (`http(s)://host[:port]`); default none.
    #[serde(default, deserialize_with = "de_opt_url")]
    pub surrogate_url: Option<String>,
    /// Modes this node takes peers' traffic through. Default: every mode its addresses allow
    /// (dsr-gue and dsr-ipip with a decap address, http-redirect with a surrogate URL).
    #[serde(default)]
    pub modes: Option<Vec<Mode>>,
}

impl ResourcesConfig {
    /// The modes in effect (the configured ones, or the default described on `modes`).
    pub fn effective_modes(&self) -> Vec<Mode> {
        match &self.modes {
            Some(modes) => modes.clone(),
            None => [Mode::DsrGue, Mode::DsrIpip, Mode::HttpRedirect]
                .into_iter()
                .filter(|m| self.supports(*m))
                .collect(),
        }
    }

    fn supports(&self, mode: Mode) -> bool {
        match mode {
            Mode::DsrGue | Mode::DsrIpip => self.decap_v4.is_some() || self.decap_v6.is_some(),
            Mode::HttpRedirect => self.surrogate_url.is_some(),
        }
    }

    /// Own capacity as the protocol carries it.
    pub fn capacity(&self) -> pb::Capacity {
        pb::Capacity {
            new_connections_per_s: self.new_connections_per_s,
            egress_mbps: self.egress_mbps,
            storage_bytes: self.storage_bytes,
        }
    }
}

impl Default for ResourcesConfig {
    fn default() -> Self {
        Self {
            new_connections_per_s: default_conn_per_s(),
            egress_mbps: default_egress_mbps(),
            storage_bytes: 0,
            decap_v4: None,
            decap_v6: None,
            surrogate_url: None,
            modes: None,
        }
    }
}

/// How peers not listed anywhere are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdmitUnknown {
    /// Refused: only `allow`, the CA bundle and long-term peers get in.
    AllowList,
    /// Admitted at the lowest trust and pinned from then on.
    FirstContact,
}

/// One entry of `policy.allow` / `policy.deny`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerMatch {
    Fingerprint(Fingerprint),
    Organisation(String),
}

impl<'de> Deserialize<'de> for PeerMatch {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            #[serde(default, deserialize_with = "de_opt_fingerprint")]
            fingerprint: Option<Fingerprint>,
            #[serde(default)]
            organisation: Option<String>,
        }
        let raw = Raw::deserialize(deserializer)?;
        match (raw.fingerprint, raw.organisation) {
            (Some(fp), None) => Ok(Self::Fingerprint(fp)),
            (None, Some(org)) if !org.trim().is_empty() && org.chars().count() <= 128 => {
                Ok(Self::Organisation(org))
            }
            (None, Some(_)) => Err(D::Error::custom("organisation must be 1 to 128 characters")),
            _ => Err(D::Error::custom(
                "give exactly one of fingerprint or organisation",
            )),
        }
    }
}

/// `[policy]`: who may peer, on which terms (provider side) and within which limits (primary
/// side).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Default `allow-list`.
    #[serde(default = "default_admit_unknown")]
    pub admit_unknown: AdmitUnknown,
    #[serde(default)]
    pub allow: Vec<PeerMatch>,
    /// Deny beats every allow.
    #[serde(default)]
    pub deny: Vec<PeerMatch>,
    /// Peers with a lower reputation score get no offer, 0 to 1000000; default 0.
    #[serde(default)]
    pub min_reputation_ppm: u32,
    /// Share of own capacity that may be offered to peers, 0 to 100 %; default 50.
    #[serde(default = "default_offer_share_percent")]
    pub offer_share_percent: u32,
    /// List price per GB, micro-units of `currency`; default 20000 (0.02).
    #[serde(default = "default_price_per_gb")]
    pub price_per_gb_micros: u64,
    /// List price per 1000 new connections, micro-units; default 1000 (0.001).
    #[serde(default = "default_price_per_1000")]
    pub price_per_1000_connections_micros: u64,
    /// ISO 4217 code, three upper-case letters; default `EUR`.
    #[serde(default = "default_currency", deserialize_with = "de_currency")]
    pub currency: String,
    /// A counter-offer is accepted down to this share of the list price, 1 to 100 %;
    /// default 80.
    #[serde(default = "default_min_price_percent")]
    pub min_price_percent: u32,
    /// Availability promised, parts per million (up to 1000000); default 999000.
    #[serde(default = "default_sla_availability")]
    pub sla_availability_ppm: u32,
    /// p99 time to first byte promised, ms (at least 1); default 200.
    #[serde(default = "default_sla_p99")]
    pub sla_p99_latency_ms: u32,
    /// Credit per SLA breach, % of charges; default 10.
    #[serde(default = "default_penalty_credit")]
    pub penalty_credit_percent: u32,
    /// Upper bound of the total credit, % of charges (at least `penalty_credit_percent`, at
    /// most 100); default 30.
    #[serde(default = "default_penalty_max")]
    pub penalty_max_percent: u32,
    /// How long an offer stays valid, 100 to 600000 ms; default 10000.
    #[serde(default = "default_offer_ttl_ms")]
    pub offer_ttl_ms: u64,
    /// Primary side: the most it pays per GB, micro-units; default 50000.
    #[serde(default = "default_max_price_per_gb")]
    pub max_price_per_gb_micros: u64,
    /// Primary side: the most it pays per 1000 connections, micro-units; default 5000.
    #[serde(default = "default_max_price_per_1000")]
    pub max_price_per_1000_connections_micros: u64,
    /// Primary side: least availability accepted, ppm; default 990000.
    #[serde(default = "default_min_sla_availability")]
    pub min_sla_availability_ppm: u32,
    /// Primary side: largest p99 latency accepted, ms; default 500.
    #[serde(default = "default_max_sla_p99")]
    pub max_sla_p99_latency_ms: u32,
    /// Primary side: how many candidates are asked at once, 1 to 32; default 3.
    #[serde(default = "default_candidates")]
    pub candidates: u32,
    /// Primary side: how long to wait for each candidate, 50 to 60000 ms; default 3000.
    #[serde(default = "default_negotiation_timeout_ms")]
    pub negotiation_timeout_ms: u64,
    /// Pre-agreed arrangements with long-term peers (`[[policy.long_term]]`).
    #[serde(default)]
    pub long_term: Vec<LongTermConfig>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            admit_unknown: default_admit_unknown(),
            allow: Vec::new(),
            deny: Vec::new(),
            min_reputation_ppm: 0,
            offer_share_percent: default_offer_share_percent(),
            price_per_gb_micros: default_price_per_gb(),
            price_per_1000_connections_micros: default_price_per_1000(),
            currency: default_currency(),
            min_price_percent: default_min_price_percent(),
            sla_availability_ppm: default_sla_availability(),
            sla_p99_latency_ms: default_sla_p99(),
            penalty_credit_percent: default_penalty_credit(),
            penalty_max_percent: default_penalty_max(),
            offer_ttl_ms: default_offer_ttl_ms(),
            max_price_per_gb_micros: default_max_price_per_gb(),
            max_price_per_1000_connections_micros: default_max_price_per_1000(),
            min_sla_availability_ppm: default_min_sla_availability(),
            max_sla_p99_latency_ms: default_max_sla_p99(),
            candidates: default_candidates(),
            negotiation_timeout_ms: default_negotiation_timeout_ms(),
            long_term: Vec::new(),
        }
    }
}

/// `[[policy.long_term]]`: terms agreed in advance with one peer (2-step activation).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LongTermConfig {
    /// The same on both sides, 1 to 64 characters of `[A-Za-z0-9._-]`.
    #[serde(deserialize_with = "de_agreement_id")]
    pub agreement_id: String,
    /// The other side's fingerprint.
    #[serde(deserialize_with = "de_fingerprint")]
    pub peer: Fingerprint,
    /// Our side: `primary` (we steer to the peer) or `provider` (we take its traffic).
    pub role: Role,
    /// Capacity agreed.
    pub new_connections_per_s: u32,
    /// Bandwidth agreed, Mbit/s; 0 (the default): the agreement limits connections only.
    #[serde(default)]
    pub egress_mbps: u32,
    /// Agreed prices, micro-units of `currency` (default: the policy's currency).
    #[serde(default)]
    pub price_per_gb_micros: u64,
    #[serde(default)]
    pub price_per_1000_connections_micros: u64,
    #[serde(default, deserialize_with = "de_opt_currency")]
    pub currency: Option<String>,
    /// Agreed service level; default: the policy's `sla_*` values.
    #[serde(default)]
    pub sla_availability_ppm: Option<u32>,
    #[serde(default)]
    pub sla_p99_latency_ms: Option<u32>,
    /// Length of each activation, seconds (1 to 604800); default 3600.
    #[serde(default = "default_duration_s")]
    pub duration_s: u64,
    /// Primary only: keep the agreement active for every service at all times (renewed before
    /// it expires, re-armed after each crowd), so the peer is in the data plane before a crowd
    /// begins and the XDP program steers overflow to it the moment the local admission bucket
    /// runs dry, with no control-plane round trip. Usage is charged as agreed; an idle standby
    /// costs nothing unless the agreement says so. Default false: activated on overload.
    #[serde(default)]
    pub standby: bool,
}

/// `[[services]]`: a service whose overflow this node may steer to peers.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Unique, 1 to 32 characters of `[a-z0-9-]` (the data plane's service name).
    #[serde(deserialize_with = "de_service_name")]
    pub name: String,
    /// Service addresses `ip:port` (`[v6]:port`), at least one.
    #[serde(deserialize_with = "de_socket_addrs")]
    pub addresses: Vec<SocketAddr>,
    /// HTTP host names the service answers to.
    #[serde(default, deserialize_with = "de_host_names")]
    pub host_names: Vec<String>,
    /// URL of the signed content manifest (`http(s)://…`); default none.
    #[serde(default, deserialize_with = "de_opt_url")]
    pub manifest_url: Option<String>,
    /// How long arrangements for it are requested, seconds (1 to 604800); default 3600.
    #[serde(default = "default_duration_s")]
    pub duration_s: u64,
    /// New connections/s the origin behind it takes (the data plane's local admission rate);
    /// default `resources.new_connections_per_s`.
    #[serde(default)]
    pub capacity_conn_per_s: Option<u32>,
    /// `http://` URL whose answer time tells how the origin copes (for example nginx's
    /// `stub_status`), read by `[admission]`; default none.
    #[serde(default, deserialize_with = "de_opt_url")]
    pub origin_status_url: Option<String>,
}

impl ServiceConfig {
    pub fn to_pb(&self) -> pb::ServiceSpec {
        pb::ServiceSpec {
            name: self.name.clone(),
            addresses: self.addresses.iter().map(ToString::to_string).collect(),
            host_names: self.host_names.clone(),
        }
    }
}

// -------------------------------------------------------------------------- loading

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let read_err = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let meta = fs::metadata(path).map_err(read_err)?;
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge {
                path: path.to_owned(),
            });
        }
        let text = fs::read_to_string(path).map_err(read_err)?;
        let config = Self::from_toml_str(&text, path)?;
        config.check_files()?;
        Ok(config)
    }

    /// Parses and validates `text` as if it were the file at `path` (relative paths resolve
    /// against `path`'s directory). Unlike [`Config::load`] it does not look at the file
    /// system: the key, certificate and CA bundle need not exist (tests, tools).
    pub fn from_toml_str(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let de = toml::de::Deserializer::parse(text).map_err(|e| syntax(path, text, &e))?;
        let mut config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            if key == "." || key.is_empty() {
                // Errors without a position in the data (missing top-level table, …).
                if let Some(span) = inner.span() {
                    return syntax(path, text, &inner).with_line(line_of(text, span.start));
                }
                return ConfigError::Invalid {
                    path: path.to_owned(),
                    key: "(top level)".to_owned(),
                    reason: one_line(inner.message()),
                };
            }
            ConfigError::Invalid {
                path: path.to_owned(),
                key,
                reason: one_line(inner.message()),
            }
        })?;
        config.path = path.to_owned();
        config.resolve_paths();
        config.validate()?;
        Ok(config)
    }

    /// The store's database file.
    pub fn store_path(&self) -> PathBuf {
        self.node.data_dir.join(STORE_FILE)
    }

    fn base_dir(&self) -> PathBuf {
        match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
            _ => PathBuf::from("."),
        }
    }

    fn resolve_paths(&mut self) {
        let base = self.base_dir();
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.node.data_dir);
        resolve(&mut self.tls.key);
        resolve(&mut self.tls.cert);
        if let Some(ca) = self.tls.ca_bundle.as_mut() {
            resolve(ca);
        }
        let data_dir = self.node.data_dir.clone();
        if let Some(s) = self.surrogate.as_mut() {
            match s.dir.as_mut() {
                Some(dir) => resolve(dir),
                None => s.dir = Some(data_dir.join("surrogate")),
            }
        }
    }

    /// `[dataplane]`, `[surrogate]` and the services' capacities.
    fn validate_dataplane(&self) -> Result<(), ConfigError> {
        if let Some(d) = &self.dataplane {
            redirector_user::validate_iface(&d.iface)
                .map_err(|e| self.invalid("dataplane.iface", e.to_string()))?;
            range(self, "dataplane.mtu", u64::from(d.mtu), 576, 65_535)?;
        }
        if let Some(s) = &self.surrogate {
            range(
                self,
                "surrogate.memory_bytes",
                s.memory_bytes,
                1 << 20,
                u64::MAX,
            )?;
            range(
                self,
                "surrogate.disk_bytes",
                s.disk_bytes,
                1 << 20,
                u64::MAX,
            )?;
            range(
                self,
                "surrogate.max_object_bytes",
                s.max_object_bytes,
                1,
                u64::MAX,
            )?;
            range(
                self,
                "surrogate.arrangement_bytes",
                s.arrangement_bytes,
                1,
                u64::MAX,
            )?;
            if s.listen.is_some_and(|a| a.port() == 0) {
                return Err(self.invalid("surrogate.listen", "needs a port"));
            }
        }
        if let Some((key, reason)) = self.monitor.problem() {
            return Err(self.invalid(format!("monitor.{key}"), reason));
        }
        if let Some((key, reason)) = self.admission.as_ref().and_then(|a| a.problem()) {
            return Err(self.invalid(format!("admission.{key}"), reason));
        }
        for (i, svc) in self.services.iter().enumerate() {
            if svc.capacity_conn_per_s == Some(0) {
                return Err(self.invalid(
                    format!("services[{i}].capacity_conn_per_s"),
                    "must be at least 1 (leave it out for resources.new_connections_per_s)",
                ));
            }
            if svc
                .origin_status_url
                .as_deref()
                .is_some_and(|u| !u.starts_with("http://"))
            {
                return Err(self.invalid(
                    format!("services[{i}].origin_status_url"),
                    "must be an http:// URL (a status page on the origin's own network)",
                ));
            }
        }
        Ok(())
    }

    fn invalid(&self, key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.clone(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// The files the config names: the key, certificate and CA bundle exist, the data
    /// directory is a directory if it exists (the store creates it otherwise).
    pub fn check_files(&self) -> Result<(), ConfigError> {
        let n = &self.node;
        if n.data_dir.exists() && !n.data_dir.is_dir() {
            return Err(self.invalid(
                "node.data_dir",
                format!("{} is not a directory", n.data_dir.display()),
            ));
        }
        for (key, file) in [("tls.key", &self.tls.key), ("tls.cert", &self.tls.cert)]
            .into_iter()
            .chain(self.tls.ca_bundle.iter().map(|ca| ("tls.ca_bundle", ca)))
        {
            if !file.is_file() {
                return Err(self.invalid(
                    key,
                    format!("no such file {:?}", file.display().to_string()),
                ));
            }
        }
        Ok(())
    }

    /// Checks that need more than one value.
    fn validate(&self) -> Result<(), ConfigError> {
        self.validate_dataplane()?;
        let n = &self.node;
        if n.listen.ip().is_unspecified() && n.advertise_control.is_none() {
            return Err(self.invalid(
                "node.advertise_control",
                format!(
                    "required when node.listen is {} (peers cannot dial an unspecified address)",
                    n.listen
                ),
            ));
        }

        let d = &self.discovery;
        if d.gossip_listen.ip().is_unspecified() && d.advertise_gossip.is_none() {
            return Err(self.invalid(
                "discovery.advertise_gossip",
                format!(
                    "required when discovery.gossip_listen is {}",
                    d.gossip_listen
                ),
            ));
        }
        if d.advertise_gossip
            .is_some_and(|a| a.ip().is_unspecified() || a.port() == 0)
        {
            return Err(self.invalid(
                "discovery.advertise_gossip",
                "must be an address and port others can reach",
            ));
        }
        range(
            self,
            "discovery.gossip_interval_ms",
            d.gossip_interval_ms,
            10,
            60_000,
        )?;
        range(self, "discovery.advert_ttl_s", d.advert_ttl_s, 2, 86_400)?;
        range(
            self,
            "discovery.advert_refresh_s",
            d.advert_refresh_s,
            1,
            86_400,
        )?;
        if d.advert_refresh_s >= d.advert_ttl_s {
            return Err(self.invalid(
                "discovery.advert_refresh_s",
                format!(
                    "must be less than discovery.advert_ttl_s ({}), or adverts expire between refreshes",
                    d.advert_ttl_s
                ),
            ));
        }
        range(
            self,
            "discovery.suspect_after_ms",
            d.suspect_after_ms,
            10,
            3_600_000,
        )?;
        range(
            self,
            "discovery.dead_after_ms",
            d.dead_after_ms,
            10,
            86_400_000,
        )?;
        if d.dead_after_ms <= d.suspect_after_ms {
            return Err(self.invalid(
                "discovery.dead_after_ms",
                format!(
                    "must be more than discovery.suspect_after_ms ({})",
                    d.suspect_after_ms
                ),
            ));
        }

        let mut tokens = HashSet::new();
        for (i, t) in self.admin.tokens.iter().enumerate() {
            if !tokens.insert(t.token.as_str()) {
                return Err(self.invalid(format!("admin.tokens[{i}].token"), "duplicate token"));
            }
        }
        let mut clients = HashSet::new();
        for (i, c) in self.admin.clients.iter().enumerate() {
            if !clients.insert(c.fingerprint) {
                return Err(self.invalid(format!("admin.clients[{i}].fingerprint"), "listed twice"));
            }
        }

        let r = &self.resources;
        if let Some(modes) = &r.modes {
            let mut seen = HashSet::new();
            for (i, mode) in modes.iter().enumerate() {
                if !seen.insert(*mode) {
                    return Err(self.invalid(
                        format!("resources.modes[{i}]"),
                        format!("{} listed twice", mode.as_str()),
                    ));
                }
                if !r.supports(*mode) {
                    let needs = match mode {
                        Mode::DsrGue | Mode::DsrIpip => "resources.decap_v4 or resources.decap_v6",
                        Mode::HttpRedirect => "resources.surrogate_url",
                    };
                    return Err(self.invalid(
                        format!("resources.modes[{i}]"),
                        format!("{} needs {needs}", mode.as_str()),
                    ));
                }
            }
        }
        if let Some(v4) = r.decap_v4
            && (v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast())
        {
            return Err(self.invalid(
                "resources.decap_v4",
                format!("{v4} is not a unicast address"),
            ));
        }
        if let Some(v6) = r.decap_v6
            && (v6.is_unspecified() || v6.is_multicast())
        {
            return Err(self.invalid(
                "resources.decap_v6",
                format!("{v6} is not a unicast address"),
            ));
        }

        let p = &self.policy;
        range(
            self,
            "policy.min_reputation_ppm",
            p.min_reputation_ppm.into(),
            0,
            1_000_000,
        )?;
        range(
            self,
            "policy.offer_share_percent",
            p.offer_share_percent.into(),
            0,
            100,
        )?;
        range(
            self,
            "policy.min_price_percent",
            p.min_price_percent.into(),
            1,
            100,
        )?;
        range(
            self,
            "policy.sla_availability_ppm",
            p.sla_availability_ppm.into(),
            0,
            1_000_000,
        )?;
        range(
            self,
            "policy.sla_p99_latency_ms",
            p.sla_p99_latency_ms.into(),
            1,
            600_000,
        )?;
        range(
            self,
            "policy.penalty_credit_percent",
            p.penalty_credit_percent.into(),
            0,
            100,
        )?;
        range(
            self,
            "policy.penalty_max_percent",
            p.penalty_max_percent.into(),
            0,
            100,
        )?;
        if p.penalty_max_percent < p.penalty_credit_percent {
            return Err(self.invalid(
                "policy.penalty_max_percent",
                format!(
                    "must be at least policy.penalty_credit_percent ({})",
                    p.penalty_credit_percent
                ),
            ));
        }
        range(self, "policy.offer_ttl_ms", p.offer_ttl_ms, 100, 600_000)?;
        range(
            self,
            "policy.min_sla_availability_ppm",
            p.min_sla_availability_ppm.into(),
            0,
            1_000_000,
        )?;
        range(
            self,
            "policy.max_sla_p99_latency_ms",
            p.max_sla_p99_latency_ms.into(),
            1,
            600_000,
        )?;
        range(self, "policy.candidates", p.candidates.into(), 1, 32)?;
        range(
            self,
            "policy.negotiation_timeout_ms",
            p.negotiation_timeout_ms,
            50,
            60_000,
        )?;
        let mut agreements = HashSet::new();
        for (i, lt) in p.long_term.iter().enumerate() {
            let key = |field: &str| format!("policy.long_term[{i}].{field}");
            if !agreements.insert(lt.agreement_id.as_str()) {
                return Err(self.invalid(key("agreement_id"), "duplicate agreement id"));
            }
            range(
                self,
                &key("new_connections_per_s"),
                lt.new_connections_per_s.into(),
                1,
                u64::from(u32::MAX),
            )?;
            range(self, &key("duration_s"), lt.duration_s, 1, MAX_DURATION_S)?;
            if let Some(a) = lt.sla_availability_ppm {
                range(self, &key("sla_availability_ppm"), a.into(), 0, 1_000_000)?;
            }
            if let Some(l) = lt.sla_p99_latency_ms {
                range(self, &key("sla_p99_latency_ms"), l.into(), 1, 600_000)?;
            }
            if lt.standby && lt.role != Role::Primary {
                return Err(self.invalid(
                    key("standby"),
                    "only the primary keeps an agreement on standby (role = \"primary\")",
                ));
            }
        }

        let mut names = HashSet::new();
        for (i, s) in self.services.iter().enumerate() {
            if !names.insert(s.name.as_str()) {
                return Err(self.invalid(
                    format!("services[{i}].name"),
                    format!("duplicate service {:?}", s.name),
                ));
            }
            range(
                self,
                &format!("services[{i}].duration_s"),
                s.duration_s,
                1,
                MAX_DURATION_S,
            )?;
        }
        Ok(())
    }
}

fn range(config: &Config, key: &str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(config.invalid(key, format!("{value} is out of range {min}..={max}")));
    }
    Ok(())
}

fn syntax(path: &Path, text: &str, error: &toml::de::Error) -> ConfigError {
    ConfigError::Syntax {
        path: path.to_owned(),
        line: error.span().map_or(0, |s| line_of(text, s.start)),
        message: one_line(error.message()),
    }
}

impl ConfigError {
    fn with_line(self, line: usize) -> Self {
        match self {
            Self::Syntax { path, message, .. } => Self::Syntax {
                path,
                line,
                message,
            },
            other => other,
        }
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(0, |t| t.matches('\n').count()) + 1
}

fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

// -------------------------------------------------------------------------- defaults

fn default_data_dir() -> PathBuf {
    PathBuf::from(".")
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 7443))
}
fn default_key() -> PathBuf {
    PathBuf::from(KEY_FILE)
}
fn default_cert() -> PathBuf {
    PathBuf::from(CERT_FILE)
}
fn default_gossip_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 7946))
}
fn default_gossip_interval_ms() -> u64 {
    500
}
fn default_advert_ttl_s() -> u64 {
    60
}
fn default_advert_refresh_s() -> u64 {
    10
}
fn default_suspect_after_ms() -> u64 {
    3_000
}
fn default_dead_after_ms() -> u64 {
    15_000
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7444))
}
fn default_conn_per_s() -> u32 {
    1_000
}
fn default_egress_mbps() -> u32 {
    1_000
}
fn default_admit_unknown() -> AdmitUnknown {
    AdmitUnknown::AllowList
}
fn default_offer_share_percent() -> u32 {
    50
}
fn default_price_per_gb() -> u64 {
    20_000
}
fn default_price_per_1000() -> u64 {
    1_000
}
fn default_currency() -> String {
    "EUR".to_owned()
}
fn default_min_price_percent() -> u32 {
    80
}
fn default_sla_availability() -> u32 {
    999_000
}
fn default_sla_p99() -> u32 {
    200
}
fn default_penalty_credit() -> u32 {
    10
}
fn default_penalty_max() -> u32 {
    30
}
fn default_offer_ttl_ms() -> u64 {
    10_000
}
fn default_max_price_per_gb() -> u64 {
    50_000
}
fn default_max_price_per_1000() -> u64 {
    5_000
}
fn default_min_sla_availability() -> u32 {
    990_000
}
fn default_max_sla_p99() -> u32 {
    500
}
fn default_candidates() -> u32 {
    3
}
fn default_negotiation_timeout_ms() -> u64 {
    3_000
}
fn default_duration_s() -> u64 {
    3_600
}

// -------------------------------------------------------------------------- value parsers

fn de_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    String::deserialize(d)
}

fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|_| format!("invalid socket address {text:?} (expected ip:port, [v6]:port)"))
}

fn de_socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    parse_socket_addr(&de_string(d)?).map_err(D::Error::custom)
}

fn de_opt_socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    de_socket_addr(d).map(Some)
}

fn de_socket_addrs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    let list = Vec::<String>::deserialize(d)?;
    if list.is_empty() {
        return Err(D::Error::custom("at least one address is needed"));
    }
    if list.len() > 64 {
        return Err(D::Error::custom("at most 64 addresses"));
    }
    list.iter()
        .map(|s| parse_socket_addr(s).map_err(D::Error::custom))
        .collect()
}

/// `host:port` where host is an IP address ([v6] in brackets) or a DNS name.
fn parse_host_port(text: &str) -> Result<String, String> {
    let bad = || format!("invalid host:port {text:?}");
    if text.parse::<SocketAddr>().is_ok() {
        return Ok(text.to_owned());
    }
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 || !is_dns_name(host) {
        return Err(bad());
    }
    Ok(text.to_owned())
}

fn de_opt_host_port<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    parse_host_port(&de_string(d)?)
        .map(Some)
        .map_err(D::Error::custom)
}

fn de_host_ports<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let list = Vec::<String>::deserialize(d)?;
    if list.len() > 256 {
        return Err(D::Error::custom("at most 256 entries"));
    }
    list.iter()
        .map(|s| parse_host_port(s).map_err(D::Error::custom))
        .collect()
}

fn is_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

fn de_host_names<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let list = Vec::<String>::deserialize(d)?;
    if list.len() > 64 {
        return Err(D::Error::custom("at most 64 host names"));
    }
    for name in &list {
        let bare = name.strip_prefix("*.").unwrap_or(name);
        if !is_dns_name(bare) {
            return Err(D::Error::custom(format!("invalid host name {name:?}")));
        }
    }
    Ok(list)
}

fn de_opt_ipv4<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Ipv4Addr>, D::Error> {
    let text = de_string(d)?;
    text.parse()
        .map(Some)
        .map_err(|_| D::Error::custom(format!("invalid IPv4 address {text:?}")))
}

fn de_opt_ipv6<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Ipv6Addr>, D::Error> {
    let text = de_string(d)?;
    text.parse()
        .map(Some)
        .map_err(|_| D::Error::custom(format!("invalid IPv6 address {text:?}")))
}

fn de_opt_url<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let text = de_string(d)?;
    let rest = text
        .strip_prefix("https://")
        .or_else(|| text.strip_prefix("http://"));
    let host_port = rest.map(|r| r.split(['/', '?', '#']).next().unwrap_or(""));
    let ok = host_port.is_some_and(|hp| {
        !hp.is_empty()
            && (parse_host_port(hp).is_ok()
                || is_dns_name(hp)
                || hp.parse::<IpAddr>().is_ok()
                || (hp.starts_with('[') && hp.ends_with(']')))
    }) && text.len() <= 2048
        && !text.chars().any(char::is_whitespace);
    if ok {
        Ok(Some(text))
    } else {
        Err(D::Error::custom(format!(
            "invalid URL {text:?} (expected http(s)://host[:port][/path])"
        )))
    }
}

fn de_node_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = de_string(d)?;
    check_node_name(&name).map_err(D::Error::custom)?;
    Ok(name)
}

fn check_node_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid node name {name:?} (1 to 64 characters of A-Z a-z 0-9 . _ -)"
        ))
    }
}

fn check_organisation(org: &str) -> Result<(), String> {
    if org.chars().count() > 128 || org.chars().any(char::is_control) {
        return Err(format!(
            "invalid organisation {org:?} (at most 128 characters, no control characters)"
        ));
    }
    Ok(())
}

fn de_organisation<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let org = de_string(d)?;
    check_organisation(&org).map_err(D::Error::custom)?;
    Ok(org)
}

fn de_agreement_id<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let id = de_string(d)?;
    check_node_name(&id).map_err(|_| {
        D::Error::custom(format!(
            "invalid agreement id {id:?} (1 to 64 characters of A-Z a-z 0-9 . _ -)"
        ))
    })?;
    Ok(id)
}

fn de_service_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = de_string(d)?;
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !ok {
        return Err(D::Error::custom(format!(
            "invalid service name {name:?} (1 to 32 characters of a-z 0-9 -)"
        )));
    }
    Ok(name)
}

fn de_regions<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let list = Vec::<String>::deserialize(d)?;
    if list.len() > 256 {
        return Err(D::Error::custom("at most 256 regions"));
    }
    for region in &list {
        let (country, sub) = match region.split_once('-') {
            Some((c, s)) => (c, Some(s)),
            None => (region.as_str(), None),
        };
        let ok = country.len() == 2
            && country.chars().all(|c| c.is_ascii_uppercase())
            && sub.is_none_or(|s| {
                (1..=3).contains(&s.len())
                    && s.chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
            });
        if !ok {
            return Err(D::Error::custom(format!(
                "invalid region {region:?} (ISO 3166 code such as \"DE\" or \"US-CA\")"
            )));
        }
    }
    Ok(list)
}

fn de_prefixes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let list = Vec::<String>::deserialize(d)?;
    if list.len() > 1024 {
        return Err(D::Error::custom("at most 1024 prefixes"));
    }
    for prefix in &list {
        let bad = || {
            D::Error::custom(format!(
                "invalid prefix {prefix:?} (expected CIDR such as 198.51.100.0/24)"
            ))
        };
        let (addr, len) = prefix.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let len: u8 = len.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(bad());
        }
    }
    Ok(list)
}

fn de_fingerprint<'de, D: Deserializer<'de>>(d: D) -> Result<Fingerprint, D::Error> {
    let text = de_string(d)?;
    text.parse().map_err(|_| {
        D::Error::custom(format!(
            "invalid fingerprint {text:?} (64 hex digits, SHA-256 of the public key)"
        ))
    })
}

fn de_opt_fingerprint<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Fingerprint>, D::Error> {
    de_fingerprint(d).map(Some)
}

fn check_currency(text: &str) -> Result<(), String> {
    if text.len() == 3 && text.chars().all(|c| c.is_ascii_uppercase()) {
        Ok(())
    } else {
        Err(format!(
            "invalid currency {text:?} (ISO 4217 code such as \"EUR\")"
        ))
    }
}

fn de_currency<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let text = de_string(d)?;
    check_currency(&text).map_err(D::Error::custom)?;
    Ok(text)
}

fn de_opt_currency<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    de_currency(d).map(Some)
}

fn de_token<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let token = de_string(d)?;
    let ok = (MIN_TOKEN_LEN..=crate::admin::MAX_TOKEN_LEN).contains(&token.len())
        && token.chars().all(|c| c.is_ascii_graphic());
    if !ok {
        return Err(D::Error::custom(format!(
            "a token is {MIN_TOKEN_LEN} to {} printable ASCII characters without spaces",
            crate::admin::MAX_TOKEN_LEN
        )));
    }
    Ok(token)
}

// -------------------------------------------------------------------------- init

/// What `init` wrote.
#[derive(Clone, PartialEq, Eq)]
pub struct InitReport {
    pub config_path: PathBuf,
    pub key_path: PathBuf,
    pub cert_path: PathBuf,
    /// The new node's identity.
    pub fingerprint: Fingerprint,
    /// The generated admin tokens (also in the config file).
    pub operator_token: String,
    pub viewer_token: String,
}

impl std::fmt::Debug for InitReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitReport")
            .field("config_path", &self.config_path)
            .field("key_path", &self.key_path)
            .field("cert_path", &self.cert_path)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// Creates `dir` if needed and writes a new node key (`node.key`, mode 0600), its self-signed
/// certificate (`node.crt`) and a commented `p2pcdn.toml` (mode 0600: it holds the admin
/// tokens) with one random operator and one viewer token. Refuses to replace any of them
/// unless `force`. The written config is loaded back before returning.
pub fn init(
    dir: &Path,
    name: &str,
    organisation: &str,
    force: bool,
) -> Result<InitReport, ConfigError> {
    let config_path = dir.join(CONFIG_FILE);
    let key_path = dir.join(KEY_FILE);
    let cert_path = dir.join(CERT_FILE);
    let invalid = |key: &str, reason: String| ConfigError::Invalid {
        path: config_path.clone(),
        key: key.to_owned(),
        reason,
    };
    check_node_name(name).map_err(|r| invalid("node.name", r))?;
    check_organisation(organisation).map_err(|r| invalid("node.organisation", r))?;
    for path in [&config_path, &key_path, &cert_path] {
        if path.exists() && !force {
            return Err(ConfigError::Exists(path.clone()));
        }
    }
    fs::create_dir_all(dir).map_err(|source| ConfigError::Write {
        path: dir.to_owned(),
        source,
    })?;
    if force {
        for path in [&config_path, &key_path, &cert_path] {
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(ConfigError::Write {
                        path: path.clone(),
                        source,
                    });
                }
            }
        }
    }
    let mut sans = vec!["localhost".to_owned()];
    if is_dns_name(name) && name != "localhost" {
        sans.push(name.to_owned());
    }
    let identity = NodeIdentity::generate(name, organisation, &sans)?;
    identity.write(&key_path, &cert_path)?;
    let operator_token = random_token()?;
    let viewer_token = random_token()?;
    let text = template::render(&template::Values {
        name,
        organisation,
        fingerprint: &identity.fingerprint.to_string(),
        operator_token: &operator_token,
        viewer_token: &viewer_token,
    });
    write_new_file(&config_path, text.as_bytes(), 0o600)?;
    Config::load(&config_path)?;
    Ok(InitReport {
        config_path,
        key_path,
        cert_path,
        fingerprint: identity.fingerprint,
        operator_token,
        viewer_token,
    })
}

fn random_token() -> Result<String, ConfigError> {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| ConfigError::Random)?;
    Ok(hex::encode(bytes))
}

fn write_new_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ConfigError> {
    let write_err = |source| ConfigError::Write {
        path: path.to_owned(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(write_err)?;
    file.write_all(bytes).map_err(write_err)?;
    file.sync_all().map_err(write_err)
}
