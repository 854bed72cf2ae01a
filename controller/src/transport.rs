//! gRPC (tonic) over mutual TLS (tokio-rustls) for `peering.v1`.
//!
//! The server accepts TCP connections itself, runs the TLS handshake (bounded in time and in
//! number), and hands tonic only authenticated connections whose connect info carries the
//! peer's identity; [`peer_of`] reads it in every handler. Every request's body is checked
//! frame by frame: a gRPC message over [`MAX_MESSAGE_BYTES`] or a compressed one is refused
//! with `InvalidArgument` before it is buffered, and every error answer is logged with the
//! peer's fingerprint.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code, Status,
    body::Body,
    codegen::{
        Bytes,
        http::{self, Request, Response, Uri},
    },
    transport::{Channel, Endpoint, Server, server::Connected},
};
use tower::{Layer, Service};

use crate::{
    model::{Fingerprint, TrustLevel},
    proto::{
        MAX_MESSAGE_BYTES,
        pb::{self, peering_client::PeeringClient, peering_server::PeeringServer},
    },
    tls,
};

/// A TLS handshake must finish within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A request must be answered within this time (server side), or the client gives up.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections (including those still in their handshake) a server holds at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Concurrent requests per connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 64;
/// Largest HTTP/2 header list accepted (metadata is tiny in `peering.v1`).
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("control endpoint: {0}")]
    Listener(#[source] io::Error),
    #[error("grpc server: {0}")]
    Serve(#[source] tonic::transport::Error),
    #[error("{addr:?} is not host:port")]
    BadAddress { addr: String },
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("connect to {addr}: no connection within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
}

/// Who called: inserted in every request's extensions by `serve`.
#[derive(Clone, Debug)]
pub struct PeerIdentity {
    pub fingerprint: Fingerprint,
    pub organisation: Option<String>,
    pub trust: TrustLevel,
    /// The SubjectPublicKeyInfo (DER) the fingerprint is the hash of; empty if unknown.
    pub spki_der: Vec<u8>,
}

/// The caller of a request served by [`serve`]; `Unauthenticated` if there is none (which
/// means the request did not come through `serve`).
pub fn peer_of<T>(request: &tonic::Request<T>) -> Result<PeerIdentity, tonic::Status> {
    request
        .extensions()
        .get::<PeerIdentity>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no authenticated peer on this connection"))
}

/// Connect info of an authenticated connection (tonic inserts it in every request).
#[derive(Clone, Debug)]
struct PeerConnection {
    peer: PeerIdentity,
    remote: SocketAddr,
}

/// A server-side TLS connection whose peer passed the handshake and the admission policy.
struct PeerStream {
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerConnection,
    /// Held for the life of the connection: bounds the connections a server holds.
    _permit: OwnedSemaphorePermit,
}

impl Connected for PeerStream {
    type ConnectInfo = PeerConnection;

    fn connect_info(&self) -> PeerConnection {
        self.info.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
}

/// Aborts the accept loop when `serve` returns, whatever the reason.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves `service` on `listener` with mutual TLS until `shutdown` completes.
/// Applies [`MAX_MESSAGE_BYTES`], the connection, stream and header limits and the timeouts
/// above; failed handshakes are logged with the peer's address, refused requests with its
/// fingerprint.
pub async fn serve<S: pb::peering_server::Peering>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    service: S,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), TransportError> {
    let (tx, rx) = mpsc::channel::<Result<PeerStream, io::Error>>(64);
    let _accept = AbortOnDrop(tokio::spawn(accept_loop(listener, tls, tx)));
    Server::builder()
        .timeout(REQUEST_TIMEOUT)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .concurrency_limit_per_connection(MAX_CONCURRENT_STREAMS as usize)
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .layer(PeerLayer)
        .add_service(
            PeeringServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(ReceiverStream::new(rx), shutdown)
        .await
        .map_err(TransportError::Serve)
}

async fn accept_loop(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    tx: mpsc::Sender<Result<PeerStream, io::Error>>,
) {
    let acceptor = TlsAcceptor::from(tls.clone());
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Usually EMFILE or a connection reset before accept: back off briefly.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = tx.closed() => return,
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, tls, tx) = (acceptor.clone(), tls.clone(), tx.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Err(_) => tracing::warn!(peer.addr = %remote, "tls handshake timed out"),
                Ok(Err(error)) => {
                    tracing::warn!(peer.addr = %remote, %error, "tls handshake failed");
                }
                Ok(Ok(stream)) => {
                    let admitted = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|certs| certs.first())
                        .and_then(|cert| tls::admitted(&tls, cert));
                    let Some((info, trust)) = admitted else {
                        // Only possible with a ServerConfig not made by tls::server_config.
                        tracing::error!(peer.addr = %remote, "no admission decision for the peer");
                        return;
                    };
                    tracing::debug!(
                        peer.addr = %remote,
                        peer.fingerprint = %info.fingerprint,
                        peer.trust = trust.as_str(),
                        "peer connected"
                    );
                    let conn = PeerStream {
                        tls: stream,
                        info: PeerConnection {
                            peer: PeerIdentity {
                                fingerprint: info.fingerprint,
                                organisation: info.organisation,
                                trust,
                                spki_der: info.spki_der,
                            },
                            remote,
                        },
                        _permit: permit,
                    };
                    let _ = tx.send(Ok(conn)).await;
                }
            }
        });
    }
}

/// Inserts [`PeerIdentity`] into every request, limits request message sizes on the wire, and
/// logs error answers with the peer's fingerprint.
#[derive(Clone, Copy, Debug)]
struct PeerLayer;

impl<S> Layer<S> for PeerLayer {
    type Service = PeerService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PeerService { inner }
    }
}

#[derive(Clone, Debug)]
struct PeerService<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ResBody> Service<Request<Body>> for PeerService<S>
where
    S: Service<Request<Body>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    ResBody: Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<ResBody>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let connection = request.extensions().get::<PeerConnection>().cloned();
        let path = request.uri().path().to_owned();
        let mut request = request.map(|body| Body::new(FrameLimit::new(body)));
        if let Some(connection) = &connection {
            request.extensions_mut().insert(connection.peer.clone());
        }
        // The clone is ready only if polled: swap so the polled one serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let response = inner.call(request).await?;
            log_refusal(connection.as_ref(), &path, response.headers());
            Ok(response)
        })
    }
}

/// Error answers of unary calls are trailers-only: the status is in the headers.
fn log_refusal(connection: Option<&PeerConnection>, path: &str, headers: &http::HeaderMap) {
    let Some(status) = Status::from_header_map(headers) else {
        return;
    };
    let code = status.code();
    if code == Code::Ok {
        return;
    }
    let message = status.message();
    let (fingerprint, remote) = connection.map_or((String::new(), String::new()), |c| {
        (c.peer.fingerprint.to_string(), c.remote.to_string())
    });
    match code {
        Code::InvalidArgument
        | Code::Unauthenticated
        | Code::PermissionDenied
        | Code::ResourceExhausted
        | Code::OutOfRange => tracing::warn!(
            peer.fingerprint = %fingerprint,
            peer.addr = %remote,
            rpc = path,
            code = ?code,
            message,
            "request refused"
        ),
        _ => tracing::debug!(
            peer.fingerprint = %fingerprint,
            rpc = path,
            code = ?code,
            message,
            "request failed"
        ),
    }
}

/// Watches the gRPC length-prefixed messages of a request body as they stream in, and fails
/// the body with `InvalidArgument` at the first message that is compressed or larger than
/// [`MAX_MESSAGE_BYTES`], before tonic buffers it.
struct FrameLimit {
    inner: Body,
    header: [u8; 5],
    header_len: usize,
    body_left: u64,
    failed: bool,
}

impl FrameLimit {
    fn new(inner: Body) -> Self {
        Self {
            inner,
            header: [0; 5],
            header_len: 0,
            body_left: 0,
            failed: false,
        }
    }

    fn scan(&mut self, mut data: &[u8]) -> Result<(), Status> {
        while !data.is_empty() {
            if self.body_left > 0 {
                let n = usize::try_from(self.body_left)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                self.body_left -= n as u64;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
            self.header_len += n;
            data = &data[n..];
            if self.header_len == 5 {
                self.header_len = 0;
                let [flag, a, b, c, d] = self.header;
                let len = u32::from_be_bytes([a, b, c, d]);
                if flag != 0 {
                    return Err(Status::invalid_argument(
                        "compressed messages are not accepted",
                    ));
                }
                if len as usize > MAX_MESSAGE_BYTES {
                    return Err(Status::invalid_argument(format!(
                        "message of {len} bytes exceeds the limit of {MAX_MESSAGE_BYTES} bytes"
                    )));
                }
                self.body_left = u64::from(len);
            }
        }
        Ok(())
    }
}

impl HttpBody for FrameLimit {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.failed {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
            && let Err(status) = self.scan(data)
        {
            self.failed = true;
            return Poll::Ready(Some(Err(status)));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Opens a channel to `addr` ("host:port") with mutual TLS, within `timeout` (TCP connect
/// and TLS handshake). Requests time out after [`REQUEST_TIMEOUT`]; messages are limited to
/// [`MAX_MESSAGE_BYTES`] both ways.
pub async fn connect(
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<PeeringClient<Channel>, TransportError> {
    let bad = || TransportError::BadAddress {
        addr: addr.to_owned(),
    };
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    port.parse::<u16>().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let server_name = ServerName::try_from(host.to_owned()).map_err(|_| bad())?;
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|_| bad())?
        .connect_timeout(timeout)
        .timeout(REQUEST_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    let connector = TlsDialer {
        connector: TlsConnector::from(tls),
        addr: addr.to_owned(),
        server_name,
        timeout,
    };
    let channel = tokio::time::timeout(timeout, endpoint.connect_with_connector(connector))
        .await
        .map_err(|_| TransportError::Timeout {
            addr: addr.to_owned(),
            timeout,
        })?
        .map_err(|source| TransportError::Connect {
            addr: addr.to_owned(),
            source,
        })?;
    Ok(PeeringClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// Dials the peer and runs the TLS handshake (the channel calls it again to reconnect).
#[derive(Clone)]
struct TlsDialer {
    connector: TlsConnector,
    addr: String,
    server_name: ServerName<'static>,
    timeout: Duration,
}

impl Service<Uri> for TlsDialer {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = BoxFuture<io::Result<Self::Response>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let dial = async {
                let tcp = TcpStream::connect(&this.addr).await?;
                let _ = tcp.set_nodelay(true);
                this.connector.connect(this.server_name.clone(), tcp).await
            };
            let stream = tokio::time::timeout(this.timeout, dial)
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "tls handshake timed out")
                })??;
            Ok(TokioIo::new(stream))
        })
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests panic with a message on failure")]
mod tests {
    use http_body_util::{BodyExt as _, Full};

    use super::*;

    fn framed(parts: &[(u8, u32, usize)]) -> Vec<u8> {
        let mut out = Vec::new();
        for &(flag, len, actual) in parts {
            out.push(flag);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend(std::iter::repeat_n(0u8, actual));
        }
        out
    }

    #[test]
    fn frame_limit_accepts_messages_split_anywhere() {
        let bytes = framed(&[(0, 10, 10), (0, 65536, 65536), (0, 0, 0)]);
        for split in [1, 3, 5, 7, 4096] {
            let mut limit = FrameLimit::new(Body::empty());
            for chunk in bytes.chunks(split) {
                limit.scan(chunk).unwrap();
            }
            assert_eq!((limit.header_len, limit.body_left), (0, 0));
        }
    }

    #[test]
    fn frame_limit_refuses_oversized_and_compressed_messages() {
        for (bytes, needle) in [
            (framed(&[(0, 65537, 0)]), "exceeds the limit"),
            (framed(&[(0, 4, 4), (0, u32::MAX, 0)]), "exceeds the limit"),
            (framed(&[(1, 4, 4)]), "compressed"),
        ] {
            let mut limit = FrameLimit::new(Body::empty());
            let status = bytes.chunks(3).try_for_each(|c| limit.scan(c)).unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument);
            assert!(status.message().contains(needle), "{status:?}");
        }
    }

    #[tokio::test]
    async fn frame_limit_fails_the_body_once_then_ends() {
        let body = Body::new(Full::new(Bytes::from(framed(&[(0, 1 << 20, 8)]))));
        let mut limited = FrameLimit::new(body);
        let first = limited.frame().await.unwrap();
        assert_eq!(first.unwrap_err().code(), Code::InvalidArgument);
        assert!(limited.frame().await.is_none());
    }

    #[test]
    fn peer_of_without_a_connection_is_unauthenticated() {
        let status = peer_of(&tonic::Request::new(())).unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
}
