//! The listener: optional TLS, HTTP/1.1 and HTTP/2 (by ALPN, or prior knowledge on
//! cleartext), bounded connections and timeouts, graceful shutdown.

use std::{convert::Infallible, future::Future, sync::Arc, time::Duration};

use axum::extract::Request;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::{Semaphore, watch},
    task::JoinSet,
};
use tokio_rustls::TlsAcceptor;

use super::{Inner, SurrogateError, http};

/// Time a client has to finish the TLS handshake, and to send a request's headers.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for responses in flight.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// HTTP/2 streams per connection.
const MAX_STREAMS: u32 = 256;

pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    app: Arc<Inner>,
    max_connections: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), SurrogateError> {
    let acceptor = tls.map(TlsAcceptor::from);
    let slots = Arc::new(Semaphore::new(max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
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
                        tracing::debug!(error = %e, "surrogate: accept");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    Err(e) => return Err(SurrogateError::Accept(e)),
                };
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    metrics::counter!("p2pcdn_surrogate_connections_refused_total").increment(1);
                    tracing::debug!(%remote, "surrogate: too many connections, closing");
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let acceptor = acceptor.clone();
                let app = Arc::clone(&app);
                let stop = stop_rx.clone();
                connections.spawn(async move {
                    let _slot = slot;
                    match acceptor {
                        None => connection(stream, app, stop).await,
                        Some(acceptor) => {
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                                Ok(Ok(tls)) => connection(tls, app, stop).await,
                                Ok(Err(e)) => {
                                    tracing::debug!(%remote, error = %e, "surrogate: tls handshake failed");
                                }
                                Err(_) => {
                                    tracing::debug!(%remote, "surrogate: tls handshake timed out");
                                }
                            }
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
            "surrogate: connections still open after the grace period, closing them"
        );
        connections.abort_all();
    }
    Ok(())
}

async fn connection<I>(io: I, app: Arc<Inner>, mut stop: watch::Receiver<bool>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The handler is called directly (no router: every path goes to it), and answers with
    // its own body type.
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let app = Arc::clone(&app);
        async move {
            let (parts, _) = req.into_parts();
            Ok::<_, Infallible>(http::handle(&app, &parts).await)
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS);
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "surrogate: connection");
            }
        }
        () = async { drop(stop.wait_for(|stopped| *stopped).await) } => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
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
