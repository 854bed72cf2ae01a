//! `p2pcdn init`: writes a key, a certificate and a commented config file that loads.
#![expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]

use std::{fs, os::unix::fs::PermissionsExt, path::Path};

use p2pcdn_controller::{
    admin::AdminRole,
    config::{Config, ConfigError, init},
    identity::NodeIdentity,
};

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_writes_an_identity_and_a_config_that_loads() {
    let dir = tempfile::tempdir().unwrap();
    let node_dir = dir.path().join("etc/p2pcdn");
    let report = init(&node_dir, "edge-a", "Example \"CDN\" GmbH", false).unwrap();
    assert_eq!(report.config_path, node_dir.join("p2pcdn.toml"));
    assert_eq!(mode(&report.key_path), 0o600);
    assert_eq!(
        mode(&report.config_path),
        0o600,
        "the config holds the admin tokens"
    );

    let identity = NodeIdentity::load(&report.key_path, &report.cert_path).unwrap();
    assert_eq!(identity.fingerprint, report.fingerprint);
    assert_eq!(
        identity.organisation().as_deref(),
        Some("Example \"CDN\" GmbH")
    );

    let config = Config::load(&report.config_path).unwrap();
    assert_eq!(config.node.name, "edge-a");
    assert_eq!(config.node.organisation, "Example \"CDN\" GmbH");
    assert_eq!(config.tls.key, report.key_path);
    assert_eq!(config.tls.cert, report.cert_path);
    assert_eq!(config.store_path().parent().unwrap(), node_dir.join("."));
    // Safe until the operator opens it up: loopback listeners only.
    assert!(config.node.listen.ip().is_loopback());
    assert!(config.discovery.gossip_listen.ip().is_loopback());
    assert_eq!(config.node.control_endpoint(), "127.0.0.1:7443");

    let tokens: Vec<(&str, AdminRole)> = config
        .admin
        .tokens
        .iter()
        .map(|t| (t.token.as_str(), t.role))
        .collect();
    assert_eq!(
        tokens,
        vec![
            (report.operator_token.as_str(), AdminRole::Operator),
            (report.viewer_token.as_str(), AdminRole::Viewer)
        ]
    );
    assert_ne!(report.operator_token, report.viewer_token);
    assert_eq!(report.operator_token.len(), 64);
    assert_eq!(
        config.admin.operator_token(),
        Some(report.operator_token.as_str())
    );

    let text = fs::read_to_string(&report.config_path).unwrap();
    assert!(
        text.contains(&report.fingerprint.to_string()),
        "the file names the node's identity"
    );
    // Tokens are random: another node gets others.
    let other = init(&dir.path().join("other"), "edge-b", "", false).unwrap();
    assert_ne!(other.operator_token, report.operator_token);
    assert_ne!(other.fingerprint, report.fingerprint);
}

#[test]
fn init_twice_refuses_without_force_and_replaces_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let first = init(dir.path(), "edge-a", "Org", false).unwrap();
    let before = fs::read(&first.key_path).unwrap();
    let err = init(dir.path(), "edge-a", "Org", false).unwrap_err();
    assert!(matches!(err, ConfigError::Exists(_)), "{err}");
    assert!(
        err.to_string().contains("already exists") && err.to_string().contains("--force"),
        "{err}"
    );
    assert_eq!(
        fs::read(&first.key_path).unwrap(),
        before,
        "the key is untouched"
    );

    // Only the key left over (a half-finished earlier init) still counts.
    fs::remove_file(&first.config_path).unwrap();
    assert!(
        matches!(init(dir.path(), "edge-a", "Org", false), Err(ConfigError::Exists(p)) if p == first.key_path)
    );

    let second = init(dir.path(), "edge-a2", "Org", true).unwrap();
    assert_ne!(second.fingerprint, first.fingerprint);
    let config = Config::load(&second.config_path).unwrap();
    assert_eq!(config.node.name, "edge-a2");
    assert_eq!(
        NodeIdentity::load(&second.key_path, &second.cert_path)
            .unwrap()
            .fingerprint,
        second.fingerprint
    );
}

#[test]
fn init_refuses_a_bad_name_before_writing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let node_dir = dir.path().join("n");
    let err = init(&node_dir, "edge a", "", false).unwrap_err();
    assert!(
        err.to_string()
            .contains("node.name: invalid node name \"edge a\""),
        "{err}"
    );
    let err = init(&node_dir, "", "", false).unwrap_err();
    assert!(err.to_string().contains("node.name"), "{err}");
    let err = init(&node_dir, "ok", &"o".repeat(200), false).unwrap_err();
    assert!(err.to_string().contains("node.organisation"), "{err}");
    assert!(!node_dir.exists());
}

/// Every key the config knows, by section: the file init writes documents each of them.
const KEYS: &[&str] = &[
    "node.name",
    "node.organisation",
    "node.data_dir",
    "node.listen",
    "node.advertise_control",
    "node.regions",
    "node.client_prefixes",
    "tls.key",
    "tls.cert",
    "tls.ca_bundle",
    "discovery.gossip_listen",
    "discovery.advertise_gossip",
    "discovery.seeds",
    "discovery.gossip_interval_ms",
    "discovery.advert_ttl_s",
    "discovery.advert_refresh_s",
    "discovery.suspect_after_ms",
    "discovery.dead_after_ms",
    "admin.listen",
    "admin.tokens.token",
    "admin.tokens.role",
    "admin.clients.fingerprint",
    "admin.clients.role",
    "resources.new_connections_per_s",
    "resources.egress_mbps",
    "resources.storage_bytes",
    "resources.decap_v4",
    "resources.decap_v6",
    "resources.surrogate_url",
    "resources.modes",
    "policy.admit_unknown",
    "policy.allow",
    "policy.deny",
    "policy.min_reputation_ppm",
    "policy.offer_share_percent",
    "policy.price_per_gb_micros",
    "policy.price_per_1000_connections_micros",
    "policy.currency",
    "policy.min_price_percent",
    "policy.sla_availability_ppm",
    "policy.sla_p99_latency_ms",
    "policy.penalty_credit_percent",
    "policy.penalty_max_percent",
    "policy.offer_ttl_ms",
    "policy.max_price_per_gb_micros",
    "policy.max_price_per_1000_connections_micros",
    "policy.min_sla_availability_ppm",
    "policy.max_sla_p99_latency_ms",
    "policy.candidates",
    "policy.negotiation_timeout_ms",
    "policy.long_term.agreement_id",
    "policy.long_term.peer",
    "policy.long_term.role",
    "policy.long_term.new_connections_per_s",
    "policy.long_term.egress_mbps",
    "policy.long_term.price_per_gb_micros",
    "policy.long_term.price_per_1000_connections_micros",
    "policy.long_term.currency",
    "policy.long_term.sla_availability_ppm",
    "policy.long_term.sla_p99_latency_ms",
    "policy.long_term.duration_s",
    "policy.long_term.standby",
    "services.name",
    "services.addresses",
    "services.host_names",
    "services.manifest_url",
    "services.duration_s",
    "services.capacity_conn_per_s",
    "services.origin_status_url",
    "dataplane.iface",
    "dataplane.pin_root",
    "dataplane.install_services",
    "dataplane.mtu",
    "dataplane.manage_loopback",
    "surrogate.listen",
    "surrogate.dir",
    "surrogate.memory_bytes",
    "surrogate.disk_bytes",
    "surrogate.max_object_bytes",
    "surrogate.arrangement_bytes",
    "surrogate.allow_origin",
    "monitor.interval_ms",
    "monitor.window_ms",
    "monitor.high_water_percent",
    "monitor.low_water_percent",
    "monitor.enter_ms",
    "monitor.exit_ms",
    "monitor.headroom_percent",
    "admission.interval_ms",
    "admission.latency_target_ms",
    "admission.psi_high_percent",
    "admission.min_percent",
    "admission.increase_percent",
    "admission.decrease_percent",
];

/// `key = value` lines of the file, commented out or not, with the table they are in and
/// whether they are documented (a comment line right above, or a trailing comment).
fn key_lines(text: &str) -> Vec<(String, bool)> {
    let mut table = String::new();
    // The line above is prose: a comment that is not itself a commented-out key or header.
    let mut previous_is_prose = false;
    let mut out = Vec::new();
    for line in text.lines() {
        let (commented, body) = match line.strip_prefix("# ") {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        let mut is_setting = false;
        if body.starts_with("[") && !body.contains('=') {
            table = body
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            is_setting = true;
        } else if let Some((key, value)) = body.split_once(" = ")
            && !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            let documented = previous_is_prose || value.contains("  # ");
            out.push((format!("{table}.{key}"), documented));
            is_setting = true;
        }
        previous_is_prose = line.starts_with('#') && !(commented && is_setting);
    }
    out
}

#[test]
fn the_written_file_documents_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let report = init(dir.path(), "edge-a", "", false).unwrap();
    let text = fs::read_to_string(&report.config_path).unwrap();
    let lines = key_lines(&text);
    for (key, documented) in &lines {
        assert!(documented, "{key} has no comment");
        assert!(KEYS.contains(&key.as_str()), "{key} is not a config key");
    }
    for key in KEYS {
        assert!(
            lines.iter().any(|(k, _)| k == key),
            "{key} is missing from the file"
        );
    }
}

#[test]
fn the_commented_examples_are_valid_values() {
    let dir = tempfile::tempdir().unwrap();
    let report = init(dir.path(), "edge-a", "", false).unwrap();
    let fp = report.fingerprint.to_string();
    fs::write(dir.path().join("ca.pem"), "ca").unwrap();
    let text = fs::read_to_string(&report.config_path).unwrap();
    let mut uncommented = String::new();
    for line in text.lines() {
        let example = line.strip_prefix("# ").filter(|rest| {
            rest.starts_with('[')
                || rest.split_once(" = ").is_some_and(|(k, _)| {
                    k.chars()
                        .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit())
                })
        });
        uncommented.push_str(example.unwrap_or(line));
        uncommented.push('\n');
    }
    let uncommented = uncommented.replace("<64 hex digits>", &fp);
    let path = dir.path().join("examples.toml");
    fs::write(&path, &uncommented).unwrap();
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
    assert_eq!(config.node.control_endpoint(), "edge-a.example.net:7443");
    assert_eq!(config.services[0].name, "video");
    assert_eq!(config.policy.long_term[0].agreement_id, "acme-2025");
    assert_eq!(config.admin.clients[0].fingerprint, report.fingerprint);
    assert_eq!(config.resources.effective_modes().len(), 3);
    assert_eq!(config.dataplane.unwrap().iface, "eth0");
    assert_eq!(config.surrogate.unwrap().memory_bytes, 256 << 20);
}
