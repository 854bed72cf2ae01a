//! Loopback testbeds: a node's key, certificate and config file in a directory, with every
//! listener on 127.0.0.1 port 0 and gossip timings fit for tests. The integration tests and
//! `cargo xtask bench control` build their clusters with it; the nodes are real daemons
//! ([`super::start`]) speaking mutual TLS over loopback TCP and gossip over loopback UDP.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use rustls::pki_types::CertificateDer;

use crate::{
    config::{Config, ConfigError},
    identity::{IdentityError, NodeIdentity},
    model::Fingerprint,
};

#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    #[error("identity: {0}")]
    Identity(#[from] IdentityError),
    #[error("config: {0}")]
    Config(#[from] ConfigError),
    #[error("overlay: {0}")]
    Overlay(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A node's files, ready for [`super::start`] (in process) or `p2pcdn run --config` (as a
/// process).
#[derive(Debug, Clone)]
pub struct Prepared {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    /// The loaded config (as `p2pcdn run` would load it).
    pub config: Config,
    pub fingerprint: Fingerprint,
    /// The node certificate (clients of the admin API pin it).
    pub cert_der: CertificateDer<'static>,
    pub operator_token: String,
    pub viewer_token: String,
}

/// The organisation every testbed node gets unless the overlay sets another.
pub const ORGANISATION: &str = "Testbed";

/// Writes `dir/node.key`, `dir/node.crt` and `dir/p2pcdn.toml` for node `name` joining through
/// `seeds`, and loads the config. `overlay` is TOML merged over the defaults below (tables
/// merge key by key, other values replace), e.g. `"[policy]\nprice_per_gb_micros = 5000"`.
///
/// Defaults: every listener on 127.0.0.1 port 0; gossip every 50 ms, suspect after 500 ms,
/// dead after 1500 ms; 1000 new connections/s of capacity; decap address 192.0.2.1 (a
/// documentation address: it is only advertised, never sent to); `admit_unknown =
/// "first-contact"`; negotiation timeout 1000 ms.
pub fn prepare(
    dir: &Path,
    name: &str,
    seeds: &[SocketAddr],
    overlay: &str,
) -> Result<Prepared, TestbedError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| TestbedError::Io { path, source }
    };
    fs::create_dir_all(dir).map_err(io(dir))?;
    let overlay: toml::Table = overlay
        .parse()
        .map_err(|e: toml::de::Error| TestbedError::Overlay(e.message().to_owned()))?;
    let organisation = overlay
        .get("node")
        .and_then(|n| n.get("organisation"))
        .and_then(toml::Value::as_str)
        .unwrap_or(ORGANISATION)
        .to_owned();
    let identity = NodeIdentity::generate(name, &organisation, &["localhost".to_owned()])?;
    let (key, cert) = (dir.join("node.key"), dir.join("node.crt"));
    // A testbed directory is prepared again from scratch.
    for file in [&key, &cert] {
        if file.exists() {
            fs::remove_file(file).map_err(io(file))?;
        }
    }
    identity.write(&key, &cert)?;

    let operator_token = format!(
        "operator-token-{name}-{}",
        &identity.fingerprint.to_string()[..16]
    );
    let viewer_token = format!(
        "viewer-token-{name}-{}",
        &identity.fingerprint.to_string()[..16]
    );
    let mut table: toml::Table = base(name, seeds, &operator_token, &viewer_token)
        .parse()
        .map_err(|e: toml::de::Error| TestbedError::Overlay(e.message().to_owned()))?;
    merge(&mut table, overlay);
    let text = toml::to_string(&table).map_err(|e| TestbedError::Overlay(e.to_string()))?;
    let config_path = dir.join("p2pcdn.toml");
    fs::write(&config_path, text).map_err(io(&config_path))?;
    let config = Config::load(&config_path)?;
    Ok(Prepared {
        dir: dir.to_owned(),
        config_path,
        config,
        fingerprint: identity.fingerprint,
        cert_der: identity.cert_der.clone(),
        operator_token,
        viewer_token,
    })
}

fn base(name: &str, seeds: &[SocketAddr], operator: &str, viewer: &str) -> String {
    let seeds: Vec<String> = seeds
        .iter()
        .map(|s| format!("{:?}", s.to_string()))
        .collect();
    format!(
        r#"
[node]
name = "{name}"
organisation = "{ORGANISATION}"
data_dir = "."
listen = "127.0.0.1:0"
regions = ["DE"]

[tls]
key = "node.key"
cert = "node.crt"

[discovery]
gossip_listen = "127.0.0.1:0"
seeds = [{seeds}]
gossip_interval_ms = 50
advert_ttl_s = 30
advert_refresh_s = 5
suspect_after_ms = 500
dead_after_ms = 1500

[admin]
listen = "127.0.0.1:0"

[[admin.tokens]]
token = "{operator}"
role = "operator"

[[admin.tokens]]
token = "{viewer}"
role = "viewer"

[resources]
new_connections_per_s = 1000
egress_mbps = 1000
decap_v4 = "192.0.2.1"

[policy]
admit_unknown = "first-contact"
negotiation_timeout_ms = 1000
"#,
        seeds = seeds.join(", ")
    )
}

/// Merges `overlay` into `base`: tables key by key, everything else replaced.
fn merge(base: &mut toml::Table, overlay: toml::Table) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]
mod tests {
    use super::*;

    #[test]
    fn overlay_merges_tables_and_the_config_loads() {
        let dir = tempfile::tempdir().unwrap();
        let seed: SocketAddr = "127.0.0.1:7946".parse().unwrap();
        let p = prepare(
            dir.path(),
            "edge-a",
            &[seed],
            "[policy]\nprice_per_gb_micros = 5000\n[resources]\nnew_connections_per_s = 77",
        )
        .unwrap();
        assert_eq!(p.config.policy.price_per_gb_micros, 5000);
        // Untouched keys of a merged table keep the testbed's value.
        assert_eq!(p.config.policy.negotiation_timeout_ms, 1000);
        assert_eq!(p.config.resources.new_connections_per_s, 77);
        assert_eq!(p.config.discovery.seeds, vec!["127.0.0.1:7946".to_owned()]);
        assert_eq!(
            p.config.admin.operator_token(),
            Some(p.operator_token.as_str())
        );
    }

    #[test]
    fn a_bad_overlay_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = prepare(dir.path(), "edge-a", &[], "[policy\n").unwrap_err();
        assert!(matches!(e, TestbedError::Overlay(_)), "{e}");
        let e = prepare(dir.path(), "edge-a", &[], "[policy]\nno_such_key = 1").unwrap_err();
        assert!(e.to_string().contains("no_such_key"), "{e}");
    }
}
