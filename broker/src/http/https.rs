//! HTTPS: a listener for `axum::serve` that hands over connections whose TLS handshake is done,
//! so HTTP over TLS is served, shut down and given `ConnectInfo` exactly as plain HTTP is.
//!
//! Handshakes run in a task per connection, off the accept loop: a client that connects and
//! sends nothing holds up only itself, and only for `handshake_timeout_ms`.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Wait after a failed accept (out of file descriptors, say), as `axum::serve` waits on plain
/// HTTP.
const ACCEPT_RETRY: Duration = Duration::from_secs(1);
/// Connections past their handshake that axum has not taken yet. axum takes each at once (it
/// only spawns its task), so this rarely fills; when it does, handshake tasks wait, each
/// holding one connection and rustls' buffers for it.
const READY_BACKLOG: usize = 64;

/// A connection whose TLS handshake is done, and its peer.
type Ready = (TlsStream<TcpStream>, SocketAddr);

/// The HTTPS listener as `axum::serve` sees it: it yields connections after their handshake.
pub(super) struct TlsListener {
    ready: mpsc::Receiver<Ready>,
    tcp: Arc<TcpListener>,
}

impl TlsListener {
    /// Starts accepting on `tcp`, with handshakes that must finish within `timeout`. Accepting
    /// stops when the returned listener is dropped, as `axum::serve` does at shutdown.
    pub(super) fn spawn(tcp: TcpListener, acceptor: TlsAcceptor, timeout: Duration) -> TlsListener {
        let tcp = Arc::new(tcp);
        let (ready_tx, ready) = mpsc::channel(READY_BACKLOG);
        tokio::spawn(accept_loop(tcp.clone(), acceptor, timeout, ready_tx));
        TlsListener { ready, tcp }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> Ready {
        match self.ready.recv().await {
            Some(ready) => ready,
            // The accept loop ends only once this listener is dropped, so this is not reached;
            // were it, waiting for a shutdown that will come is the safe answer.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

/// Accepts TCP connections and starts a handshake task for each, until `ready` is closed.
async fn accept_loop(
    tcp: Arc<TcpListener>,
    acceptor: TlsAcceptor,
    timeout: Duration,
    ready: mpsc::Sender<Ready>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = tcp.accept() => accepted,
            _ = ready.closed() => return,
        };
        match accepted {
            Ok((socket, peer)) => {
                tokio::spawn(handshake(acceptor.clone(), socket, peer, timeout, ready.clone()));
            }
            Err(err) => {
                tracing::warn!(error = %err, "https accept failed; retrying in a second");
                tokio::select! {
                    _ = tokio::time::sleep(ACCEPT_RETRY) => {}
                    _ = ready.closed() => return,
                }
            }
        }
    }
}

/// Runs the server side of one connection's handshake and passes the connection on; a failed
/// or late handshake (a client that does not trust the certificate, plain HTTP, a port
/// scanner) is logged and the connection closed.
async fn handshake(
    acceptor: TlsAcceptor,
    socket: TcpStream,
    peer: SocketAddr,
    timeout: Duration,
    ready: mpsc::Sender<Ready>,
) {
    let accepted = tokio::select! {
        accepted = tokio::time::timeout(timeout, acceptor.accept(socket)) => accepted,
        _ = ready.closed() => return,
    };
    match accepted {
        Ok(Ok(stream)) => {
            // An error here means the listener is gone (shutdown): the connection just closes.
            let _ = ready.send((stream, peer)).await;
        }
        Ok(Err(err)) => tracing::info!(%peer, error = %err, "https: TLS handshake failed"),
        Err(_) => tracing::info!(%peer, "https: no TLS handshake in time; closing"),
    }
}
