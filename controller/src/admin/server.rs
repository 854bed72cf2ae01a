//! The HTTPS listener: TLS with the node certificate (client certificates optional), HTTP/1.1
//! and HTTP/2, bounded connections and timeouts, graceful shutdown.

use std::{future::Future, sync::Arc, time::Duration};

use axum::{Router, extract::Request};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer},
};
use tokio::{net::TcpListener, sync::Semaphore, task::JoinSet};
use tokio_rustls::TlsAcceptor;
use tower::Service;

use super::{
    AdminError,
    auth::{OptionalClientCert, inspect_cert},
};
use crate::{admin::ClientCert, model::now_ms};

/// Connections served at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 128;
/// Time a client has to finish the TLS handshake, and to send a request's headers.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for requests in flight.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// TLS for the admin listener: the node's certificate and key, TLS 1.3 and 1.2 (ring), ALPN
/// h2 and http/1.1, client certificates requested but optional (checked for validity and
/// handshake signature; their fingerprint decides the role per request).
pub fn tls_config(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, AdminError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(OptionalClientCert::new(&provider));
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert], key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves `app` over TLS on `listener` until `shutdown` completes, then lets requests in
/// flight finish for up to [`SHUTDOWN_GRACE`].
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AdminError> {
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, remote) = match accepted {
                    Ok(pair) => pair,
                    Err(e) if is_transient(&e) => {
                        tracing::debug!(error = %e, "admin api: accept");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    Err(e) => return Err(AdminError::Accept(e)),
                };
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    tracing::warn!(%remote, "admin api: too many connections, closing");
                    continue;
                };
                let acceptor = acceptor.clone();
                let app = app.clone();
                let mut stop = stop_rx.clone();
                connections.spawn(async move {
                    let _slot = slot;
                    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::info!(%remote, error = %e, "admin api: tls handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::info!(%remote, "admin api: tls handshake timed out");
                            return;
                        }
                    };
                    let client = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|certs| certs.first())
                        .and_then(|cert| inspect_cert(cert, now_ms() / 1000).ok())
                        .map(|(fingerprint, _)| fingerprint);
                    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                        req.extensions_mut().insert(ClientCert(client));
                        let mut app = app.clone();
                        app.call(req.map(axum::body::Body::new))
                    });
                    let mut builder = auto::Builder::new(TokioExecutor::new());
                    builder
                        .http1()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HANDSHAKE_TIMEOUT);
                    builder.http2().max_concurrent_streams(32);
                    let connection = builder.serve_connection(TokioIo::new(tls), service);
                    tokio::pin!(connection);
                    tokio::select! {
                        result = connection.as_mut() => {
                            if let Err(e) = result {
                                tracing::debug!(%remote, error = %e, "admin api: connection");
                            }
                        }
                        () = async { drop(stop.wait_for(|stopped| *stopped).await) } => {
                            connection.as_mut().graceful_shutdown();
                            let _ = connection.await;
                        }
                    }
                });
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = connections.len(),
            "admin api: connections still open after the grace period, closing them"
        );
        connections.abort_all();
    }
    Ok(())
}

/// Accept errors that concern one connection (or a momentary shortage) rather than the
/// listener.
fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{
        ConnectionAborted, ConnectionRefused, ConnectionReset, Interrupted, WouldBlock,
    };
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset | Interrupted | WouldBlock
    ) || e
        .raw_os_error()
        .is_some_and(|code| code == 23 || code == 24) // ENFILE, EMFILE
}
