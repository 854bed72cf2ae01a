//! The admin API over real HTTPS on 127.0.0.1: the node certificate, the CLI's pinned client,
//! bearer tokens and client certificates, and a clean shutdown.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests panic with a message on failure"
)]

mod admin_fake;

use std::{net::SocketAddr, time::Duration};

use admin_fake::{OPERATOR, VIEWER};
use axum::http::{Method, StatusCode};
use p2pcdn_controller::{
    admin::{self, AdminClient, AdminRole, ClientError, ErrorBody, StatusView},
    identity::NodeIdentity,
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

struct Server {
    addr: SocketAddr,
    node: NodeIdentity,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), admin::AdminError>>,
}

impl Server {
    async fn shutdown(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("admin server did not stop within 10 s")
            .unwrap()
            .unwrap();
    }
}

/// A node and an admin server on an ephemeral port; `operator_client` is given the operator
/// role by fingerprint.
async fn start(operator_client: &NodeIdentity) -> Server {
    let node = NodeIdentity::generate("edge-a", "Example", &["localhost".to_owned()]).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = admin::tls_config(node.cert_der.clone(), node.private_key_der()).unwrap();
    let app = admin::router(
        admin_fake::backend(),
        admin_fake::auth_with_clients([(operator_client.fingerprint, AdminRole::Operator)]),
        admin::install_metrics(),
    );
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(admin::serve(listener, tls, app, async {
        let _ = stopped.await;
    }));
    Server {
        addr,
        node,
        stop: Some(stop),
        task,
    }
}

fn client(server: &Server, token: Option<&str>, cert: Option<&NodeIdentity>) -> AdminClient {
    AdminClient::new(
        server.addr,
        server.node.cert_der.clone(),
        token.map(str::to_owned),
        cert.map(|id| (vec![id.cert_der.clone()], id.private_key_der())),
        Duration::from_secs(5),
    )
    .unwrap()
}

fn error_of(body: &[u8]) -> String {
    serde_json::from_slice::<ErrorBody>(body).unwrap().error
}

#[tokio::test]
async fn tokens_and_client_certificates_over_https() {
    let operator = NodeIdentity::generate("ops", "Example", &[]).unwrap();
    let stranger = NodeIdentity::generate("stranger", "Elsewhere", &[]).unwrap();
    let server = start(&operator).await;

    let (status, body) = client(&server, Some(VIEWER), None)
        .request(Method::GET, "/v1/status", None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let view: StatusView = serde_json::from_slice(&body).unwrap();
    assert_eq!(view.name, "edge-a");

    let negotiate = serde_json::json!({"service": "video"});
    let (status, _) = client(&server, Some(VIEWER), None)
        .request(Method::POST, "/v1/negotiate", Some(&negotiate))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = client(&server, Some(OPERATOR), None)
        .request(Method::POST, "/v1/negotiate", Some(&negotiate))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);

    // A listed client certificate is an operator without any token.
    let (status, _) = client(&server, None, Some(&operator))
        .request(Method::POST, "/v1/negotiate", Some(&negotiate))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);

    // An unlisted certificate completes TLS but gets no role.
    let (status, body) = client(&server, None, Some(&stranger))
        .request(Method::GET, "/v1/status", None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(error_of(&body).contains("admin.clients"));

    let (status, _) = client(&server, None, None)
        .request(Method::GET, "/metrics", None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    server.shutdown().await;
}

#[tokio::test]
async fn the_client_refuses_a_server_that_is_not_the_pinned_node() {
    let someone = NodeIdentity::generate("ops", "Example", &[]).unwrap();
    let server = start(&someone).await;
    let impostor_pin = NodeIdentity::generate("edge-a", "Example", &[]).unwrap();
    let client = AdminClient::new(
        server.addr,
        impostor_pin.cert_der.clone(),
        Some(OPERATOR.to_owned()),
        None,
        Duration::from_secs(5),
    )
    .unwrap();
    let error = client
        .request(Method::GET, "/v1/status", None)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ClientError::Tls { reason, .. } if reason.contains("not this node's certificate")),
        "{error}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_closed_port_is_unreachable_and_after_shutdown_nothing_listens() {
    let someone = NodeIdentity::generate("ops", "Example", &[]).unwrap();
    let server = start(&someone).await;
    let viewer = client(&server, Some(VIEWER), None);
    assert_eq!(
        viewer
            .request(Method::GET, "/v1/peers", None)
            .await
            .unwrap()
            .0,
        StatusCode::OK
    );
    server.shutdown().await;
    let error = viewer
        .request(Method::GET, "/v1/peers", None)
        .await
        .unwrap_err();
    assert!(matches!(error, ClientError::Unreachable { .. }), "{error}");
}
