//! The AMQP 0-9-1 front end: a second listener (`--amqp-listen`) for the clients RabbitMQ users
//! already run (pika, amqplib, the Java client, lapin, ...). Its connections speak AMQP and are
//! served by the same engine calls as the binary protocol, so the queues, exchanges, limits and
//! permissions are the same whichever protocol a client speaks.
//!
//! `codec.rs` finds frames (the `amq-protocol` crate parses and writes them), `connection.rs`
//! runs the handshake and the channels, `sink.rs` turns deliveries into `basic.deliver`
//! frames, `properties.rs` keeps AMQP message properties on Hopper messages, and
//! `arguments.rs` maps declare arguments onto Hopper settings.

mod arguments;
mod codec;
mod connection;
mod properties;
mod sink;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_util::codec::FramedRead;
use tracing::Instrument;

use crate::engine::Engine;
use crate::outbox::Outbox;
use codec::FrameCodec;
use connection::{Connection, FRAME_MAX, NEXT_ID};

/// Time a closing connection's peer gets to take the last frames.
const CLOSE_FLUSH: Duration = Duration::from_secs(5);

/// Accepts AMQP connections on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, engine: Arc<Engine>, mut shutdown: watch::Receiver<bool>) {
    let limit = Arc::new(Semaphore::new(engine.config().max_connections));
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
        let (engine, shutdown) = (engine.clone(), shutdown.clone());
        let span = tracing::info_span!("amqp", conn_id, %peer);
        tokio::spawn(
            async move {
                run(socket, peer, conn_id, engine, shutdown).await;
                drop(permit);
            }
            .instrument(span),
        );
    }
}

/// Serves one connection from its handshake to its close.
async fn run(
    socket: TcpStream,
    peer: SocketAddr,
    conn_id: u64,
    engine: Arc<Engine>,
    shutdown: watch::Receiver<bool>,
) {
    let _counted = engine.connection_opened();
    let (read, write) = socket.into_split();
    let outbox = Arc::new(Outbox::new(FRAME_MAX, conn_id));
    let mut writer = {
        let outbox = outbox.clone();
        let write_timeout = engine.config().write_timeout();
        tokio::spawn(async move { outbox.run_writer(write, write_timeout, || {}).await })
    };
    let mut frames = FramedRead::new(read, FrameCodec::new(FRAME_MAX as usize));
    if let Some((user, frame_max)) = connection::handshake(&engine, &mut frames, &outbox, peer).await {
        match engine.user_connected(&user) {
            Ok(_guard) => {
                tracing::info!(user, "AMQP connection open");
                let mut connection = Connection::new(
                    engine.clone(),
                    conn_id,
                    &user,
                    outbox.clone(),
                    usize::from(frame_max).max(4096),
                );
                connection.serve(&mut frames, shutdown).await;
                connection.release();
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
