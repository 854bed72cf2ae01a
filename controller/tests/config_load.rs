//! Config loading: defaults of every section, and a one-line error naming the key for each
//! kind of bad value.
#![expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
};

use p2pcdn_controller::{
    admin::AdminRole,
    config::{AdmitUnknown, Config, ConfigError, Mode, PeerMatch},
    model::{Fingerprint, Role},
};

const FP: &str = "0101010101010101010101010101010101010101010101010101010101010101";

/// A directory with the key and certificate files the config refers to (their contents are
/// the identity module's business; the config only checks that they exist).
fn dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("node.key"), "key").unwrap();
    fs::write(dir.path().join("node.crt"), "cert").unwrap();
    dir
}

fn write(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("p2pcdn.toml");
    fs::write(&path, text).unwrap();
    path
}

/// The smallest valid file: a name, and where peers reach the unspecified default listeners.
const MINIMAL: &str = r#"
[node]
name = "edge-a"
advertise_control = "edge-a.example.net:7443"
[discovery]
advertise_gossip = "192.0.2.1:7946"
"#;

#[test]
fn every_section_has_its_documented_defaults() {
    let dir = dir();
    let path = write(dir.path(), MINIMAL);
    let c = Config::load(&path).unwrap();
    assert_eq!(c.path, path);

    assert_eq!(c.node.name, "edge-a");
    assert_eq!(c.node.organisation, "");
    assert_eq!(c.node.data_dir, dir.path().join("."));
    assert_eq!(c.store_path(), dir.path().join(".").join("p2pcdn.db"));
    assert_eq!(c.node.listen, "0.0.0.0:7443".parse::<SocketAddr>().unwrap());
    assert_eq!(c.node.control_endpoint(), "edge-a.example.net:7443");
    assert!(c.node.regions.is_empty() && c.node.client_prefixes.is_empty());

    assert_eq!(c.tls.key, dir.path().join("node.key"));
    assert_eq!(c.tls.cert, dir.path().join("node.crt"));
    assert_eq!(c.tls.ca_bundle, None);

    let d = &c.discovery;
    assert_eq!(
        d.gossip_listen,
        "0.0.0.0:7946".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(
        d.gossip_endpoint(),
        "192.0.2.1:7946".parse::<SocketAddr>().unwrap()
    );
    assert!(d.seeds.is_empty());
    assert_eq!(
        (
            d.gossip_interval_ms,
            d.advert_ttl_s,
            d.advert_refresh_s,
            d.suspect_after_ms,
            d.dead_after_ms
        ),
        (500, 60, 10, 3_000, 15_000)
    );

    assert_eq!(
        c.admin.listen,
        "127.0.0.1:7444".parse::<SocketAddr>().unwrap()
    );
    assert!(c.admin.tokens.is_empty() && c.admin.clients.is_empty());
    assert_eq!(c.admin.operator_token(), None);

    let r = &c.resources;
    assert_eq!(
        (r.new_connections_per_s, r.egress_mbps, r.storage_bytes),
        (1_000, 1_000, 0)
    );
    assert_eq!(
        (r.decap_v4, r.decap_v6, r.surrogate_url.as_deref()),
        (None, None, None)
    );
    // No decap address, no surrogate: no mode to take peers' traffic through.
    assert!(r.effective_modes().is_empty());

    let p = &c.policy;
    assert_eq!(p.admit_unknown, AdmitUnknown::AllowList);
    assert!(p.allow.is_empty() && p.deny.is_empty() && p.long_term.is_empty());
    assert_eq!((p.min_reputation_ppm, p.offer_share_percent), (0, 50));
    assert_eq!(
        (p.price_per_gb_micros, p.price_per_1000_connections_micros),
        (20_000, 1_000)
    );
    assert_eq!((p.currency.as_str(), p.min_price_percent), ("EUR", 80));
    assert_eq!(
        (p.sla_availability_ppm, p.sla_p99_latency_ms),
        (999_000, 200)
    );
    assert_eq!(
        (
            p.penalty_credit_percent,
            p.penalty_max_percent,
            p.offer_ttl_ms
        ),
        (10, 30, 10_000)
    );
    assert_eq!(
        (
            p.max_price_per_gb_micros,
            p.max_price_per_1000_connections_micros
        ),
        (50_000, 5_000)
    );
    assert_eq!(
        (p.min_sla_availability_ppm, p.max_sla_p99_latency_ms),
        (990_000, 500)
    );
    assert_eq!((p.candidates, p.negotiation_timeout_ms), (3, 3_000));

    assert!(c.services.is_empty());
}

#[test]
fn a_full_file_loads_with_every_value() {
    let dir = dir();
    fs::write(dir.path().join("ca.pem"), "ca").unwrap();
    fs::create_dir(dir.path().join("state")).unwrap();
    let path = write(
        dir.path(),
        &format!(
            r#"
[node]
name = "edge-b"
organisation = "Example CDN \"B\""
data_dir = "state"
listen = "127.0.0.1:17443"
regions = ["DE", "US-CA"]
client_prefixes = ["198.51.100.0/24", "2001:db8::/32"]
[tls]
key = "node.key"
cert = "{cert}"
ca_bundle = "ca.pem"
[discovery]
gossip_listen = "127.0.0.1:17946"
seeds = ["127.0.0.1:27946", "edge-c.example.net:7946", "[::1]:7946"]
gossip_interval_ms = 50
advert_ttl_s = 5
advert_refresh_s = 1
suspect_after_ms = 300
dead_after_ms = 1500
[admin]
listen = "[::1]:7444"
[[admin.tokens]]
token = "operator-token-0123456789"
role = "operator"
[[admin.clients]]
fingerprint = "{FP}"
role = "viewer"
[resources]
new_connections_per_s = 20000
egress_mbps = 40000
storage_bytes = 1000000000
decap_v4 = "203.0.113.10"
decap_v6 = "2001:db8::10"
surrogate_url = "https://edge-b.example.net:8443"
modes = ["dsr-ipip", "http-redirect"]
[policy]
admit_unknown = "first-contact"
allow = [{{ organisation = "Friends" }}, {{ fingerprint = "{FP}" }}]
deny = [{{ fingerprint = "sha256:{FP}" }}]
candidates = 5
[[policy.long_term]]
agreement_id = "acme-2025"
peer = "{FP}"
role = "provider"
new_connections_per_s = 500
[[services]]
name = "video"
addresses = ["192.0.2.10:443", "[2001:db8::10]:443"]
host_names = ["video.example.net", "*.cdn.example.net"]
manifest_url = "https://origin.example.net/video/manifest"
duration_s = 600
"#,
            cert = dir.path().join("node.crt").display()
        ),
    );
    let c = Config::load(&path).unwrap();
    assert_eq!(c.node.organisation, "Example CDN \"B\"");
    assert_eq!(c.store_path(), dir.path().join("state/p2pcdn.db"));
    assert_eq!(c.node.control_endpoint(), "127.0.0.1:17443");
    assert_eq!(c.tls.ca_bundle, Some(dir.path().join("ca.pem")));
    assert_eq!(
        c.discovery.gossip_endpoint(),
        "127.0.0.1:17946".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(c.discovery.seeds.len(), 3);
    assert_eq!(c.admin.operator_token(), Some("operator-token-0123456789"));
    assert_eq!(c.admin.clients[0].role, AdminRole::Viewer);
    assert_eq!(c.resources.decap_v4, Some(Ipv4Addr::new(203, 0, 113, 10)));
    assert_eq!(
        c.resources.effective_modes(),
        vec![Mode::DsrIpip, Mode::HttpRedirect]
    );
    let fp: Fingerprint = FP.parse().unwrap();
    assert_eq!(
        c.policy.allow,
        vec![
            PeerMatch::Organisation("Friends".to_owned()),
            PeerMatch::Fingerprint(fp)
        ]
    );
    assert_eq!(c.policy.deny, vec![PeerMatch::Fingerprint(fp)]);
    let lt = &c.policy.long_term[0];
    assert_eq!(
        (
            lt.role,
            lt.new_connections_per_s,
            lt.duration_s,
            lt.currency.as_deref()
        ),
        (Role::Provider, 500, 3_600, None)
    );
    let spec = c.services[0].to_pb();
    assert_eq!(spec.addresses, vec!["192.0.2.10:443", "[2001:db8::10]:443"]);
}

#[test]
fn default_modes_follow_the_addresses() {
    let dir = dir();
    let path = write(
        dir.path(),
        &format!("{MINIMAL}[resources]\ndecap_v6 = \"2001:db8::1\"\n"),
    );
    let c = Config::load(&path).unwrap();
    assert_eq!(
        c.resources.effective_modes(),
        vec![Mode::DsrGue, Mode::DsrIpip]
    );
}

/// Builds a file from the minimal one plus `extra` lines in the named section.
fn with(section: &str, extra: &str) -> String {
    let mut sections = vec![
        (
            "node",
            "name = \"edge-a\"\nadvertise_control = \"edge-a.example.net:7443\"\n".to_owned(),
        ),
        ("tls", String::new()),
        (
            "discovery",
            "advertise_gossip = \"192.0.2.1:7946\"\n".to_owned(),
        ),
        ("admin", String::new()),
        ("resources", String::new()),
        ("policy", String::new()),
    ];
    let mut tail = String::new();
    match sections.iter_mut().find(|(name, _)| *name == section) {
        Some((_, body)) => body.push_str(extra),
        None => tail.push_str(extra),
    }
    let mut text = String::new();
    for (name, body) in sections {
        text.push_str(&format!("[{name}]\n{body}"));
    }
    text + &tail
}

fn error_of(text: &str) -> (PathBuf, String) {
    let dir = dir();
    fs::write(dir.path().join("not-a-dir"), "").unwrap();
    let path = write(
        dir.path(),
        &text.replace("@DIR@", &dir.path().display().to_string()),
    );
    let err = Config::load(&path).map(|_| ()).unwrap_err();
    let message = err.to_string();
    assert!(!message.contains('\n'), "not one line: {message}");
    assert!(
        message.starts_with(&format!("config {}: ", path.display())),
        "does not name the file: {message}"
    );
    (path, message)
}

#[test]
fn each_kind_of_bad_value_names_its_key() {
    // (section, lines, the key the error must name, a piece of the reason)
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "node",
            "listen = \"x\"",
            "node.listen",
            "invalid socket address \"x\"",
        ),
        ("node", "listen = 7443", "node.listen", "invalid type"),
        (
            "node",
            "organisation = \"a\\u0007b\"",
            "node.organisation",
            "invalid organisation",
        ),
        (
            "node",
            "data_dir = \"not-a-dir\"",
            "node.data_dir",
            "is not a directory",
        ),
        (
            "node",
            "regions = [\"germany\"]",
            "node.regions",
            "invalid region \"germany\"",
        ),
        (
            "node",
            "client_prefixes = [\"10.0.0.0/33\"]",
            "node.client_prefixes",
            "invalid prefix",
        ),
        ("tls", "key = \"missing.key\"", "tls.key", "no such file"),
        (
            "tls",
            "ca_bundle = \"@DIR@/nope.pem\"",
            "tls.ca_bundle",
            "no such file",
        ),
        (
            "discovery",
            "gossip_interval_ms = 0",
            "discovery.gossip_interval_ms",
            "out of range 10..=60000",
        ),
        (
            "discovery",
            "gossip_interval_ms = \"fast\"",
            "discovery.gossip_interval_ms",
            "invalid type",
        ),
        (
            "discovery",
            "advert_refresh_s = 60",
            "discovery.advert_refresh_s",
            "less than discovery.advert_ttl_s",
        ),
        (
            "discovery",
            "dead_after_ms = 1000",
            "discovery.dead_after_ms",
            "more than discovery.suspect_after_ms",
        ),
        (
            "discovery",
            "seeds = [\"no-port\"]",
            "discovery.seeds",
            "invalid host:port \"no-port\"",
        ),
        (
            "discovery",
            "gossip_listen = \"0.0.0.0:99999\"",
            "discovery.gossip_listen",
            "invalid socket address",
        ),
        (
            "admin",
            "listen = \"localhost\"",
            "admin.listen",
            "invalid socket address \"localhost\"",
        ),
        (
            "admin",
            "[[admin.tokens]]\ntoken = \"short\"\nrole = \"operator\"",
            "admin.tokens[0].token",
            "16 to 512",
        ),
        (
            "admin",
            "[[admin.tokens]]\ntoken = \"0123456789abcdef\"\nrole = \"root\"",
            "admin.tokens[0].role",
            "root",
        ),
        (
            "admin",
            "[[admin.tokens]]\ntoken = \"0123456789abcdef\"\nrole = \"viewer\"\n[[admin.tokens]]\ntoken = \"0123456789abcdef\"\nrole = \"operator\"",
            "admin.tokens[1].token",
            "duplicate token",
        ),
        (
            "admin",
            "[[admin.clients]]\nfingerprint = \"abc\"\nrole = \"viewer\"",
            "admin.clients[0].fingerprint",
            "64 hex digits",
        ),
        (
            "resources",
            "decap_v4 = \"::1\"",
            "resources.decap_v4",
            "invalid IPv4 address \"::1\"",
        ),
        (
            "resources",
            "decap_v4 = \"0.0.0.0\"",
            "resources.decap_v4",
            "not a unicast address",
        ),
        (
            "resources",
            "new_connections_per_s = -1",
            "resources.new_connections_per_s",
            "invalid value",
        ),
        (
            "resources",
            "modes = [\"dsr-gue\"]",
            "resources.modes[0]",
            "dsr-gue needs resources.decap_v4",
        ),
        (
            "resources",
            "modes = [\"carrier-pigeon\"]",
            "resources.modes[0]",
            "carrier-pigeon",
        ),
        (
            "resources",
            "surrogate_url = \"ftp://x\"",
            "resources.surrogate_url",
            "invalid URL",
        ),
        (
            "policy",
            "admit_unknown = \"everyone\"",
            "policy.admit_unknown",
            "everyone",
        ),
        (
            "policy",
            "offer_share_percent = 150",
            "policy.offer_share_percent",
            "out of range 0..=100",
        ),
        (
            "policy",
            "currency = \"euro\"",
            "policy.currency",
            "invalid currency \"euro\"",
        ),
        (
            "policy",
            "penalty_credit_percent = 40",
            "policy.penalty_max_percent",
            "at least policy.penalty_credit_percent",
        ),
        (
            "policy",
            "candidates = 0",
            "policy.candidates",
            "out of range 1..=32",
        ),
        (
            "policy",
            "negotiation_timeout_ms = 10",
            "policy.negotiation_timeout_ms",
            "out of range",
        ),
        (
            "policy",
            &format!("allow = [{{ fingerprint = \"{FP}\", organisation = \"X\" }}]"),
            "policy.allow[0]",
            "exactly one of",
        ),
        (
            "policy",
            "deny = [{ fingerprint = \"xyz\" }]",
            "policy.deny[0].fingerprint",
            "invalid fingerprint",
        ),
        (
            "policy",
            "[[policy.long_term]]\nagreement_id = \"a\"\npeer = \"nope\"\nrole = \"primary\"\nnew_connections_per_s = 1",
            "policy.long_term[0].peer",
            "invalid fingerprint",
        ),
        (
            "policy",
            &format!(
                "[[policy.long_term]]\nagreement_id = \"a\"\npeer = \"{FP}\"\nrole = \"primary\"\nnew_connections_per_s = 1\nduration_s = 9999999"
            ),
            "policy.long_term[0].duration_s",
            "out of range 1..=604800",
        ),
        (
            "policy",
            &format!(
                "[[policy.long_term]]\nagreement_id = \"a\"\npeer = \"{FP}\"\nrole = \"middle\"\nnew_connections_per_s = 1"
            ),
            "policy.long_term[0].role",
            "middle",
        ),
        (
            "services",
            "[[services]]\nname = \"Video\"\naddresses = [\"192.0.2.1:80\"]",
            "services[0].name",
            "invalid service name \"Video\"",
        ),
        (
            "services",
            "[[services]]\nname = \"video\"\naddresses = []",
            "services[0].addresses",
            "at least one",
        ),
        (
            "services",
            "[[services]]\nname = \"video\"\naddresses = [\"192.0.2.1\"]",
            "services[0].addresses",
            "invalid socket address \"192.0.2.1\"",
        ),
        (
            "services",
            "[[services]]\nname = \"video\"\naddresses = [\"192.0.2.1:80\"]\nhost_names = [\"bad host\"]",
            "services[0].host_names",
            "invalid host name",
        ),
        (
            "services",
            "[[services]]\nname = \"video\"\naddresses = [\"192.0.2.1:80\"]\n[[services]]\nname = \"video\"\naddresses = [\"192.0.2.2:80\"]",
            "services[1].name",
            "duplicate service",
        ),
        (
            "services",
            "[[services]]\nname = \"video\"",
            "services[0]",
            "missing field `addresses`",
        ),
    ];
    for (section, lines, key, reason) in cases {
        let (path, message) = error_of(&with(section, &format!("{lines}\n")));
        let expected = format!("config {}: {key}: ", path.display());
        assert!(
            message.starts_with(&expected),
            "{section}/{lines}: expected key {key}, got: {message}"
        );
        assert!(
            message.contains(reason),
            "{section}/{lines}: expected {reason:?} in: {message}"
        );
    }
}

#[test]
fn unspecified_listeners_need_an_advertised_address() {
    let (_, message) = error_of("[node]\nname = \"edge-a\"\n");
    assert!(
        message.contains("node.advertise_control: required when node.listen is 0.0.0.0:7443"),
        "{message}"
    );
    let (_, message) = error_of("[node]\nname = \"edge-a\"\nlisten = \"127.0.0.1:7443\"\n");
    assert!(
        message.contains("discovery.advertise_gossip: required"),
        "{message}"
    );
    let (_, message) = error_of(&with(
        "discovery",
        "advertise_gossip = \"host.example:7946\"\n",
    ));
    // The minimal file already sets it: a key given twice is a TOML error with its line.
    assert!(message.contains("line"), "{message}");
    let (_, message) = error_of(
        "[node]\nname = \"a\"\nlisten = \"127.0.0.1:7443\"\n[discovery]\nadvertise_gossip = \"edge.example:7946\"\n",
    );
    assert!(
        message.contains("discovery.advertise_gossip: invalid socket address"),
        "{message}"
    );
}

#[test]
fn unknown_keys_and_sections_are_refused() {
    let (_, message) = error_of(&with("node", "colour = \"blue\"\n"));
    assert!(message.contains("unknown field `colour`"), "{message}");
    assert!(
        message.contains(": node.colour: "),
        "names the key: {message}"
    );
    let (_, message) = error_of(&with("extras", "[extras]\nx = 1\n"));
    assert!(
        message.contains(": extras: unknown field `extras`"),
        "{message}"
    );
    let (_, message) = error_of(&with(
        "policy",
        &format!(
            "[[policy.long_term]]\nagreement_id = \"a\"\npeer = \"{FP}\"\nrole = \"primary\"\nnew_connections_per_s = 1\nprice = 3\n"
        ),
    ));
    assert!(
        message.contains(": policy.long_term[0].price: "),
        "{message}"
    );
    assert!(message.contains("unknown field `price`"), "{message}");
}

#[test]
fn missing_name_syntax_errors_and_missing_files_are_one_line() {
    let (_, message) = error_of("[node]\nlisten = \"127.0.0.1:1\"\n");
    assert!(message.contains("missing field `name`"), "{message}");
    let (_, message) = error_of("[node]\nname = \"a\"\nlisten = \n");
    assert!(message.contains(": line 3: "), "{message}");
    let (_, message) = error_of("[node\nname = \"a\"\n");
    assert!(message.contains(": line 1: "), "{message}");
    let (_, message) = error_of("");
    assert!(message.contains("missing field `node`"), "{message}");

    let err = Config::load(Path::new("/nonexistent/p2pcdn.toml")).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }));
    assert!(
        err.to_string()
            .starts_with("config /nonexistent/p2pcdn.toml: cannot read: "),
        "{err}"
    );

    let dir = dir();
    let big = write(dir.path(), &"#".repeat(2 * 1024 * 1024));
    let err = Config::load(&big).unwrap_err();
    assert!(err.to_string().contains("larger than"), "{err}");
}

#[test]
fn parsing_a_string_checks_values_but_not_files() {
    let path = Path::new("/nonexistent/p2pcdn.toml");
    let c = Config::from_toml_str(MINIMAL, path).unwrap();
    assert_eq!(c.tls.key, Path::new("/nonexistent/node.key"));
    assert!(
        c.check_files()
            .unwrap_err()
            .to_string()
            .contains("tls.key: no such file")
    );
    let err = Config::from_toml_str(&with("admin", "listen = \"x\"\n"), path).unwrap_err();
    assert!(err.to_string().contains("admin.listen"), "{err}");
}
