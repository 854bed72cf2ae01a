//! `[dataplane]`, `[surrogate]` and a service's capacity: defaults, one-line errors naming
//! the key, and `p2pcdn run` refusing to start on a data plane it cannot open.
#![expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use p2pcdn_controller::config::Config;

const MINIMAL: &str = r#"
[node]
name = "edge-a"
listen = "127.0.0.1:0"
[discovery]
gossip_listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
"#;

fn dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("node.key"), "key").unwrap();
    fs::write(dir.path().join("node.crt"), "cert").unwrap();
    dir
}

fn write(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("p2pcdn.toml");
    fs::write(&path, format!("{MINIMAL}{extra}")).unwrap();
    path
}

#[test]
fn without_the_sections_the_node_is_a_control_plane_only() {
    let dir = dir();
    let c = Config::load(&write(dir.path(), "")).unwrap();
    assert_eq!(c.dataplane, None);
    assert_eq!(c.surrogate, None);
}

#[test]
fn the_sections_have_their_documented_defaults() {
    let dir = dir();
    let c = Config::load(&write(
        dir.path(),
        "[dataplane]\niface = \"eth0\"\n[surrogate]\n\
         [[services]]\nname = \"web\"\naddresses = [\"192.0.2.80:80\"]\n",
    ))
    .unwrap();
    let d = c.dataplane.unwrap();
    assert_eq!(d.iface, "eth0");
    assert_eq!(d.pin_root, Path::new("/sys/fs/bpf/p2pcdn"));
    assert!(d.install_services && d.manage_loopback);
    assert_eq!(d.mtu, 1500);
    let s = c.surrogate.unwrap();
    assert_eq!(s.dir, Some(dir.path().join(".").join("surrogate")));
    assert_eq!(s.memory_bytes, 256 << 20);
    assert_eq!(s.disk_bytes, 10 << 30);
    assert_eq!(s.listen, None);
    assert_eq!(c.services[0].capacity_conn_per_s, None);
}

#[test]
fn bad_values_name_their_key() {
    let dir = dir();
    for (extra, key) in [
        ("[dataplane]\niface = \"no/slash\"\n", "dataplane.iface"),
        (
            "[dataplane]\niface = \"eth0\"\nmtu = 100\n",
            "dataplane.mtu",
        ),
        ("[dataplane]\niface = \"eth0\"\nspeed = 1\n", "speed"),
        ("[surrogate]\nmemory_bytes = 10\n", "surrogate.memory_bytes"),
        (
            "[surrogate]\nlisten = \"127.0.0.1:0\"\n",
            "surrogate.listen",
        ),
        (
            "[monitor]\nhigh_water_percent = 50\nlow_water_percent = 60\n",
            "monitor.low_water_percent",
        ),
        ("[monitor]\nsurge = 1\n", "surge"),
        (
            "[[services]]\nname = \"web\"\naddresses = [\"192.0.2.80:80\"]\ncapacity_conn_per_s = 0\n",
            "capacity_conn_per_s",
        ),
    ] {
        let e = Config::load(&write(dir.path(), extra))
            .unwrap_err()
            .to_string();
        assert!(e.contains(key), "{extra:?}: {e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }
}

#[test]
fn run_refuses_a_data_plane_that_is_not_there() {
    let dir = dir();
    let out = Command::new(env!("CARGO_BIN_EXE_p2pcdn"))
        .args(["init", "--dir"])
        .arg(dir.path().join("node"))
        .args(["--name", "edge-a", "--force"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = dir.path().join("node").join("p2pcdn.toml");
    let mut text = fs::read_to_string(&config).unwrap();
    text.push_str(
        "\n[dataplane]\niface = \"p2pcdnnone0\"\npin_root = \"/nonexistent/p2pcdn-pins\"\n",
    );
    fs::write(&config, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_p2pcdn"))
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("data plane") && stderr.contains("p2pcdnnone0"),
        "{stderr}"
    );
}
