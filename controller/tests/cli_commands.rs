//! The `p2pcdn` binary: init, exit codes (64 bad config, 69 unreachable, 77 unauthorised,
//! 2 usage), and the operator commands against an admin API with a fake backend.
#![expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]

mod admin_fake;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use p2pcdn_controller::{
    admin::{self, AdminAuth, PeerView},
    config::Config,
    identity::NodeIdentity,
};
use tokio::{net::TcpListener, sync::oneshot};

fn p2pcdn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_p2pcdn"))
        .args(args)
        .env_remove("P2PCDN_CONFIG")
        .env_remove("P2PCDN_TOKEN")
        .output()
        .unwrap()
}

fn code(output: &Output) -> i32 {
    output.status.code().unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `p2pcdn init` into a fresh directory; returns the config path.
fn init(dir: &Path) -> PathBuf {
    let out = p2pcdn(&[
        "init",
        "--dir",
        dir.to_str().unwrap(),
        "--name",
        "edge-a",
        "--organisation",
        "Example",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    dir.join("p2pcdn.toml")
}

#[test]
fn init_writes_a_loadable_config_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let config = init(dir.path());
    let loaded = Config::load(&config).unwrap();
    assert_eq!(loaded.node.name, "edge-a");
    let first = NodeIdentity::load(&loaded.tls.key, &loaded.tls.cert).unwrap();

    let again = p2pcdn(&[
        "init",
        "--dir",
        dir.path().to_str().unwrap(),
        "--name",
        "edge-a",
    ]);
    assert_eq!(code(&again), 64);
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );

    let forced = p2pcdn(&[
        "init",
        "--dir",
        dir.path().to_str().unwrap(),
        "--name",
        "edge-a",
        "--force",
        "--json",
    ]);
    assert_eq!(code(&forced), 0, "{}", stderr(&forced));
    let report: serde_json::Value = serde_json::from_str(&stdout(&forced)).unwrap();
    let second = NodeIdentity::load(&loaded.tls.key, &loaded.tls.cert).unwrap();
    assert_eq!(report["fingerprint"], second.fingerprint.to_string());
    assert_ne!(first.fingerprint, second.fingerprint);
}

#[test]
fn bad_config_exits_64_with_one_line_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = init(dir.path());
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(
        text.contains("listen = \"127.0.0.1:7444\""),
        "init's admin listen changed"
    );
    let cases = [
        ("unknown.toml", format!("{text}\n[bogus]\nx = 1\n"), "bogus"),
        (
            "listen.toml",
            text.replacen(
                "listen = \"127.0.0.1:7444\"",
                "listen = \"not-an-address\"",
                1,
            ),
            "admin.listen",
        ),
    ];
    for (name, body, key) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, body).unwrap();
        for command in [&["run"][..], &["peers"], &["status", "--json"]] {
            let mut args = vec!["--config", path.to_str().unwrap()];
            args.extend_from_slice(command);
            let out = p2pcdn(&args);
            assert_eq!(code(&out), 64, "{command:?} {name}: {}", stderr(&out));
            let err = stderr(&out);
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(err.contains(key), "{command:?}: {err}");
        }
    }
    let missing = p2pcdn(&["--config", "/nonexistent/p2pcdn.toml", "run"]);
    assert_eq!(code(&missing), 64);
    assert!(stderr(&missing).contains("/nonexistent/p2pcdn.toml"));
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(code(&p2pcdn(&["frobnicate"])), 2);
    assert_eq!(code(&p2pcdn(&["arrangements", "--state", "dancing"])), 2);
    assert_eq!(code(&p2pcdn(&["policy", "allow"])), 2);
    assert_eq!(
        code(&p2pcdn(&["negotiate", "--service", "v", "--rate", "0"])),
        2
    );
}

#[test]
fn an_unreachable_daemon_exits_69_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = init(dir.path());
    let closed = {
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap()
    };
    let out = p2pcdn(&[
        "--config",
        config.to_str().unwrap(),
        "--admin",
        &closed.to_string(),
        "status",
    ]);
    assert_eq!(code(&out), 69, "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&closed.to_string()), "{err}");
}

/// An admin API with the fake backend, the init'd node's certificate and the config's tokens.
async fn serve(config: &Config) -> (SocketAddr, oneshot::Sender<()>) {
    let node = NodeIdentity::load(&config.tls.key, &config.tls.cert).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = admin::tls_config(node.cert_der.clone(), node.private_key_der()).unwrap();
    let app = admin::router(
        admin_fake::backend(),
        AdminAuth::from_config(&config.admin).unwrap(),
        admin::install_metrics(),
    );
    let (stop, stopped) = oneshot::channel();
    tokio::spawn(admin::serve(listener, tls, app, async {
        let _ = stopped.await;
    }));
    (addr, stop)
}

async fn run_cli(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        p2pcdn(&args)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_talk_to_the_admin_api() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = init(dir.path());
    let config = Config::load(&config_path).unwrap();
    let viewer_token = config
        .admin
        .tokens
        .iter()
        .find(|t| t.role == admin::AdminRole::Viewer)
        .unwrap()
        .token
        .clone();
    let (addr, stop) = serve(&config).await;
    let base = vec![
        "--config".to_owned(),
        config_path.to_str().unwrap().to_owned(),
        "--admin".to_owned(),
        addr.to_string(),
    ];
    let with = |extra: &[&str]| {
        let mut args = base.clone();
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    };

    // Human output by default, with the operator token from the config.
    let out = run_cli(with(&["status"])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains("edge-a"), "{}", stdout(&out));
    assert!(stdout(&out).contains("alive 3"), "{}", stdout(&out));

    let out = run_cli(with(&["peers"])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let table = stdout(&out);
    assert!(table.starts_with("PEER"), "{table}");
    assert!(
        table.contains("edge-b") && table.contains("alive"),
        "{table}"
    );

    // --json is the API's JSON.
    let out = run_cli(with(&["--json", "peers"])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let peers: Vec<PeerView> = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(peers[0].name.as_deref(), Some("edge-b"));

    let out = run_cli(with(&["arrangements", "--state", "active"])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains("a1") && !stdout(&out).contains("a2"));

    let out = run_cli(with(&["negotiate", "--service", "video", "--rate", "120"])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains("succeeded"), "{}", stdout(&out));

    let out = run_cli(with(&["policy", "deny", "--organisation", "Evil Corp"])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains("rule 7: deny organisation \"Evil Corp\""));

    let out = run_cli(with(&["disband", "a1", "--reason", "crowd over"])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains("a1: disbanded (crowd over)"));

    // 404 → 64, 409 → 1, each with the API's reason.
    let out = run_cli(with(&["arrangement", "zz"])).await;
    assert_eq!(code(&out), 64);
    assert!(stderr(&out).contains("no arrangement zz"));
    let out = run_cli(with(&["disband", "a2"])).await;
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("cancelled"));

    // Unauthorised → 77: an unknown token, and a viewer on an operator command.
    let out = run_cli(with(&["--token", "not-a-real-token-xxxx", "status"])).await;
    assert_eq!(code(&out), 77, "{}", stderr(&out));
    assert!(stderr(&out).contains("unknown token"));
    let out = run_cli(with(&[
        "--token",
        &viewer_token,
        "negotiate",
        "--service",
        "video",
    ]))
    .await;
    assert_eq!(code(&out), 77, "{}", stderr(&out));
    assert!(stderr(&out).contains("operator"));

    stop.send(()).unwrap();
}
