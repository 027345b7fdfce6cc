//! The AMQP 0-9-1 front end: a second listener (`--amqp-listen`) for the clients RabbitMQ users
//! already run (pika, amqplib, the Java client, lapin, ...). Its connections speak AMQP and are
//! served by the same engine calls as the binary protocol, so the queues, exchanges, limits and
//! permissions are the same whichever protocol a client speaks.
//!
//! `codec.rs` finds frames (the `amq-protocol` crate parses and writes them), `connection.rs`
//! runs the handshake and the channels, `sink.rs` turns deliveries into `basic.deliver`
//! frames, `properties.rs` keeps AMQP message properties on Hopper messages, `arguments.rs`
//! maps declare arguments onto Hopper settings, and `shared.rs` holds what spans connections
//! (exclusive owners, direct reply-to consumers, `x-expires` timers, exchange flags). The
//! listener runs plain (`--amqp-listen`) and inside TLS (`--amqps-listen`).

mod arguments;
mod codec;
mod confirms;
mod connection;
mod properties;
mod shared;
mod sink;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::FramedRead;
use tracing::Instrument;

use crate::engine::Engine;
use crate::outbox::Outbox;
use crate::server::tls_handshake;
use codec::FrameCodec;
use connection::{Connection, FRAME_MAX, NEXT_ID};
use shared::Shared;

/// Time a closing connection's peer gets to take the last frames.
const CLOSE_FLUSH: Duration = Duration::from_secs(5);
/// Read buffer size, as for Hopper's own protocol: a burst of publishes (three frames each) is
/// one read.
const READ_BUFFER: usize = 64 * 1024;

/// Accepts AMQP connections on `plain` and, with its acceptor, AMQP over TLS on `tls`
/// (`--amqps-listen`), until `shutdown`.
pub async fn serve(
    plain: Option<TcpListener>,
    tls: Option<(TcpListener, TlsAcceptor)>,
    engine: Arc<Engine>,
    shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(engine.config().max_connections));
    let shared = Arc::new(Shared::default());
    let plain = plain.map(|listener| {
        tokio::spawn(accept(listener, None, engine.clone(), shared.clone(), limit.clone(), shutdown.clone()))
    });
    let tls = tls.map(|(listener, acceptor)| {
        tokio::spawn(accept(
            listener,
            Some(acceptor),
            engine.clone(),
            shared.clone(),
            limit.clone(),
            shutdown,
        ))
    });
    for task in [plain, tls].into_iter().flatten() {
        let _ = task.await;
    }
}

/// Accepts connections on one listener.
async fn accept(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    engine: Arc<Engine>,
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (socket, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::warn!(%error, "AMQP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "AMQP connection refused: too many connections");
            continue;
        };
        let _ = socket.set_nodelay(true);
        let conn_id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let (engine, shared, shutdown, acceptor) =
            (engine.clone(), shared.clone(), shutdown.clone(), acceptor.clone());
        let span = tracing::info_span!("amqp", conn_id, %peer, tls = acceptor.is_some());
        tokio::spawn(
            async move {
                let peer_at = Peer { addr: peer, conn_id };
                match acceptor {
                    None => {
                        let (read, write) = socket.into_split();
                        run(read, write, peer_at, None, engine, shared, shutdown).await;
                    }
                    // The TLS handshake runs here, not in the accept loop: a slow client holds
                    // up nobody else.
                    Some(acceptor) => {
                        let timeout = engine.config().handshake_timeout();
                        let handshake =
                            tls_handshake(acceptor, socket, peer, conn_id, timeout, shutdown.clone());
                        if let Some((stream, transport)) = handshake.await {
                            let (read, write) = tokio::io::split(stream);
                            let user = transport.certificate_user;
                            run(read, write, peer_at, user, engine, shared, shutdown).await;
                        }
                    }
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
}

/// Who is at the other end of a connection.
struct Peer {
    addr: SocketAddr,
    conn_id: u64,
}

/// Serves one connection from its handshake to its close. `certificate_user` is the user its
/// verified TLS client certificate names, if any.
async fn run<R, W>(
    read: R,
    write: W,
    peer: Peer,
    certificate_user: Option<String>,
    engine: Arc<Engine>,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let _counted = engine.connection_opened();
    let outbox = Arc::new(Outbox::new(FRAME_MAX, peer.conn_id));
    let resume = Arc::new(Notify::new());
    let mut writer = {
        let (outbox, resume) = (outbox.clone(), resume.clone());
        let write_timeout = engine.config().write_timeout();
        tokio::spawn(async move { outbox.run_writer(write, write_timeout, || resume.notify_one()).await })
    };
    let mut frames = FramedRead::with_capacity(read, FrameCodec::new(FRAME_MAX as usize), READ_BUFFER);
    let opened =
        connection::handshake(&engine, &mut frames, &outbox, peer.addr, certificate_user.as_deref()).await;
    if let Some(opened) = opened {
        match engine.user_connected(&opened.user) {
            Ok(_guard) => {
                tracing::info!(user = opened.user, "AMQP connection open");
                let mut connection =
                    Connection::new(engine.clone(), shared, peer.conn_id, &opened, outbox.clone());
                connection.serve(&mut frames, shutdown, &resume).await;
                connection.release().await;
            }
            Err(err) => tracing::warn!(error = %err, "AMQP connection refused"),
        }
    }
    outbox.close();
    if tokio::time::timeout(CLOSE_FLUSH, &mut writer).await.is_err() {
        writer.abort();
    }
    tracing::debug!("AMQP connection closed");
}
