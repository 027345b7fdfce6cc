//! The listeners: accept connections (plain TCP, TLS, or both), cap their number, and shut
//! down gracefully.

mod tls;

pub(crate) use tls::handshake as tls_handshake;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::audit::Audit;
use crate::config::Config;
use crate::engine::Engine;
use crate::error::StartError;
use crate::queue::Registry;
use crate::session::{self, Accepted, Transport};
use crate::storage::Store;

/// Size at which the audit log is rotated.
const AUDIT_FILE_BYTES: u64 = 16 * 1024 * 1024;
/// Wait after a failed accept (out of file descriptors, say); it doubles while accepts fail.
const ACCEPT_RETRY_FIRST: Duration = Duration::from_millis(50);
/// Longest wait between accepts while they fail.
const ACCEPT_RETRY_MAX: Duration = Duration::from_secs(1);
/// Longest wait at shutdown for the sessions to finish.
const SESSIONS_DRAIN: Duration = Duration::from_secs(4);

/// Entry point for running a broker inside another program (tests, embedding).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use hopper_broker::{Broker, Config};
///
/// let dir = tempfile::tempdir()?;
/// let config = Config {
///     listen: "127.0.0.1:0".into(),
///     http: "off".into(),
///     data_dir: dir.path().to_path_buf(),
///     ..Config::default()
/// };
/// let broker = Broker::start(config).await?;
/// println!("broker on {}", broker.local_addr());
/// // ... connect with hopper-client to broker.local_addr() ...
/// broker.shutdown().await;
/// # Ok(()) }
/// ```
pub struct Broker;

impl Broker {
    /// Validates `config`, prepares the data directory, binds the listener and starts serving
    /// in the background.
    pub async fn start(config: Config) -> Result<BrokerHandle, StartError> {
        config.validate()?;
        let data_lock = lock_data_dir(&config.data_dir)?;
        let data_dir_error = |e: std::io::Error| StartError::DataDir {
            path: config.data_dir.display().to_string(),
            reason: e.to_string(),
        };
        let store = Store::open(&config.data_dir).map_err(data_dir_error)?;
        let audit = Audit::open(&config.data_dir.join("audit"), AUDIT_FILE_BYTES).map_err(data_dir_error)?;
        let runtime = tokio::runtime::Handle::current();
        // Recovery reads every durable queue's files: a blocking thread's work.
        let storage = config.storage();
        let queues = tokio::task::spawn_blocking(move || Registry::recover(store, storage, audit, runtime))
            .await
            .map_err(|e| data_dir_error(std::io::Error::other(e)))?
            .map_err(data_dir_error)?;
        // Read before binding: a bad certificate file leaves no port taken.
        let acceptor = match config.tls_listen() {
            Some(_) => Some(tls::acceptor(&config)?),
            None => None,
        };
        let https = match config.http_listen() {
            Some(_) if config.http_tls => Some(tls::https_acceptor(&config)?),
            _ => None,
        };
        let plain = match config.plain_listen() {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let tls = match (config.tls_listen(), acceptor) {
            (Some(addr), Some(acceptor)) => Some((bind(addr).await?, acceptor)),
            _ => None,
        };
        let plain_addr = plain.as_ref().map(|(_, addr)| *addr);
        let tls_addr = tls.as_ref().map(|((_, addr), _)| *addr);
        let listeners = Listeners {
            plain: plain.map(|(listener, _)| listener),
            tls: tls.map(|((listener, _), acceptor)| (listener, acceptor)),
        };
        let http = match config.http_listen() {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let http_addr = http.as_ref().map(|(_, addr)| *addr);
        let amqp = match config.amqp_listen() {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let amqp_addr = amqp.as_ref().map(|(_, addr)| *addr);
        let amqps = match config.amqps_listen() {
            Some(addr) => {
                let acceptor = tls::acceptor(&config)?;
                Some((bind(addr).await?, acceptor))
            }
            None => None,
        };
        let amqps_addr = amqps.as_ref().map(|((_, addr), _)| *addr);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let users = crate::auth::Users::open(&config.data_dir).map_err(data_dir_error)?;
        let cluster = config.cluster()?;
        let engine = Engine::new(config, queues, Arc::new(users));
        let cluster_addr = match cluster {
            Some(cluster) => {
                let dir = engine.config().data_dir.join("cluster");
                let hosts = crate::cluster::hosts(Arc::downgrade(&engine), cluster.queue_groups);
                let started = crate::cluster::Cluster::start(&cluster, &dir, hosts, shutdown_rx.clone())
                    .await
                    .map_err(|source| StartError::Bind { addr: cluster.listen.clone(), source })?;
                let addr = started.local_addr();
                tracing::info!(node = cluster.node_id, %addr, peers = cluster.peers.len(), "cluster listener ready");
                engine.set_cluster(started);
                let advertised = match engine.config().advertise_addr.as_str() {
                    "" => plain_addr.or(tls_addr).map(|addr| addr.to_string()),
                    addr => Some(addr.to_owned()),
                };
                if let Some(advertised) = advertised {
                    tokio::spawn(Engine::advertise(Arc::downgrade(&engine), advertised));
                }
                Some(addr)
            }
            None => None,
        };
        if amqp.is_some() || amqps.is_some() {
            let plain = amqp.map(|(listener, _)| listener);
            let tls = amqps.map(|((listener, _), acceptor)| (listener, acceptor));
            tokio::spawn(crate::amqp::serve(plain, tls, engine.clone(), shutdown_rx.clone()));
        }
        if let Some((listener, _)) = http {
            tokio::spawn(crate::http::serve(listener, https, engine.clone(), shutdown_rx.clone()));
        }
        let task = tokio::spawn(async move {
            serve(listeners, engine, shutdown_rx).await;
            drop(data_lock);
        });
        Ok(BrokerHandle {
            plain_addr,
            tls_addr,
            http_addr,
            amqp_addr,
            amqps_addr,
            cluster_addr,
            shutdown_tx,
            task,
        })
    }
}

/// A running broker.
pub struct BrokerHandle {
    plain_addr: Option<SocketAddr>,
    tls_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
    amqp_addr: Option<SocketAddr>,
    amqps_addr: Option<SocketAddr>,
    cluster_addr: Option<SocketAddr>,
    shutdown_tx: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl BrokerHandle {
    /// The address the binary protocol's plain listener is bound to (with the real port when
    /// 0 was asked for); the TLS listener's when the plain one is off.
    pub fn local_addr(&self) -> SocketAddr {
        match (self.plain_addr, self.tls_addr) {
            (Some(addr), _) | (None, Some(addr)) => addr,
            // Config::validate refuses a broker with neither listener.
            (None, None) => unreachable!("a broker always has a listener"),
        }
    }

    /// The plain listener's address, unless it is off (`listen = "off"`).
    pub fn plain_addr(&self) -> Option<SocketAddr> {
        self.plain_addr
    }

    /// The TLS listener's address, if there is one (`tls_listen`).
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// The HTTP listener's address, unless HTTP is off; it speaks HTTPS with `http_tls`.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The AMQP listener's address, if it is on (`amqp_listen`).
    pub fn amqp_addr(&self) -> Option<SocketAddr> {
        self.amqp_addr
    }

    /// The AMQPS listener's address, if it is on (`amqps_listen`).
    pub fn amqps_addr(&self) -> Option<SocketAddr> {
        self.amqps_addr
    }

    /// The cluster listener's address, if the broker is in a cluster.
    pub fn cluster_addr(&self) -> Option<SocketAddr> {
        self.cluster_addr
    }

    /// Stops accepting, tells every client the broker is closing, flushes what is queued for
    /// them, and returns once every connection has finished.
    pub async fn shutdown(self) {
        let _ = self.shutdown_tx.send(true);
        let _ = self.task.await;
    }

    /// Waits until the broker stops (it only stops through [`BrokerHandle::shutdown`]).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Binds `addr` and reads back the address it got.
async fn bind(addr: &str) -> Result<(TcpListener, SocketAddr), StartError> {
    let bind_error = |source| StartError::Bind { addr: addr.to_owned(), source };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let local_addr = listener.local_addr().map_err(bind_error)?;
    Ok((listener, local_addr))
}

/// The binary protocol's listeners: at least one of the two.
struct Listeners {
    plain: Option<TcpListener>,
    tls: Option<(TcpListener, TlsAcceptor)>,
}

/// The next connection of `listener`; never resolves when there is no listener.
async fn accept(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

async fn serve(listeners: Listeners, engine: Arc<Engine>, mut shutdown: watch::Receiver<bool>) {
    let limit = Arc::new(Semaphore::new(engine.config().max_connections));
    // Every session holds a clone; when all are dropped, every session has finished.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let mut next_conn_id: u64 = 1;
    let mut accept_backoff = Duration::ZERO;
    let Listeners { plain, tls } = listeners;
    let (tls, acceptor) = match tls {
        Some((listener, acceptor)) => (Some(listener), Some(acceptor)),
        None => (None, None),
    };
    loop {
        let (accepted, over_tls) = tokio::select! {
            accepted = accept(plain.as_ref()) => (accepted, false),
            accepted = accept(tls.as_ref()) => (accepted, true),
            _ = shutdown.changed() => break,
        };
        let (socket, peer) = match accepted {
            Ok(pair) => pair,
            Err(err) => {
                // Out of file descriptors and the like: keep serving the connections we have,
                // and wait longer after each failure in a row (one log line per run of them).
                if accept_backoff.is_zero() {
                    tracing::warn!(error = %err, "accept failed; retrying with backoff");
                }
                accept_backoff = (accept_backoff * 2).clamp(ACCEPT_RETRY_FIRST, ACCEPT_RETRY_MAX);
                tokio::select! {
                    _ = tokio::time::sleep(accept_backoff) => {}
                    _ = shutdown.changed() => break,
                }
                continue;
            }
        };
        if !accept_backoff.is_zero() {
            tracing::info!("accepting connections again");
            accept_backoff = Duration::ZERO;
        }
        let _ = socket.set_nodelay(true);
        let conn_id = next_conn_id;
        next_conn_id += 1;
        let permit = limit.clone().try_acquire_owned().ok();
        let engine = engine.clone();
        let shutdown = shutdown.clone();
        let done = done_tx.clone();
        let acceptor = if over_tls { acceptor.clone() } else { None };
        tokio::spawn(async move {
            let admitted = permit.is_some();
            match acceptor {
                // Plain TCP keeps tokio's owned halves: no lock between reader and writer.
                None => {
                    let (read, write) = socket.into_split();
                    let accepted = Accepted { conn_id, peer, transport: Transport::default(), admitted };
                    session::run(read, write, accepted, engine, shutdown).await;
                }
                // The handshake runs here, not in the accept loop, so a slow client holds up
                // nobody else. A refused connection is still answered over TLS.
                Some(acceptor) => {
                    let timeout = engine.config().handshake_timeout();
                    let handshake =
                        tls::handshake(acceptor, socket, peer, conn_id, timeout, shutdown.clone());
                    if let Some((stream, transport)) = handshake.await {
                        let (read, write) = tokio::io::split(stream);
                        let accepted = Accepted { conn_id, peer, transport, admitted };
                        session::run(read, write, accepted, engine, shutdown).await;
                    }
                }
            }
            drop(permit);
            drop(done);
        });
    }
    drop(plain);
    drop(tls);
    drop(done_tx);
    // Sessions end at once on shutdown and give their peers a bounded time to take the last
    // frames; this bound is a backstop, so no client can hold the shutdown up.
    if tokio::time::timeout(SESSIONS_DRAIN, done_rx.recv()).await.is_err() {
        tracing::warn!("some connections did not finish in time; closing the queues anyway");
    }
    engine.close().await;
    tracing::info!("broker stopped");
}

/// Creates the data directory if needed and takes an exclusive lock on it, so two brokers
/// never share one directory.
fn lock_data_dir(dir: &Path) -> Result<std::fs::File, StartError> {
    let fail = |reason: String| StartError::DataDir { path: dir.display().to_string(), reason };
    std::fs::create_dir_all(dir).map_err(|e| fail(format!("cannot create it: {e}")))?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("LOCK"))
        .map_err(|e| fail(format!("not writable: {e}")))?;
    lock.try_lock().map_err(|_| fail("in use by another hopperd".into()))?;
    Ok(lock)
}
