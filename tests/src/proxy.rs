//! A TCP proxy a test can cut or slow down, to partition a cluster without privileges: it
//! forwards every connection to one address; cut, it drops the connections it carries and
//! closes new ones at once, until it is healed; slowed, it holds every chunk of data for a
//! while before passing it on.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// A proxy to one address, listening on a loopback port of its own.
pub struct Proxy {
    addr: SocketAddr,
    cut: watch::Sender<bool>,
    delay: watch::Sender<Duration>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts forwarding connections made to [`Proxy::addr`] to `target`.
    pub async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let (cut, cut_rx) = watch::channel(false);
        let (delay, delay_rx) = watch::channel(Duration::ZERO);
        let task = tokio::spawn(accept(listener, target, cut_rx, delay_rx));
        Proxy { addr, cut, delay, task }
    }

    /// Where to connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every connection through the proxy, and every new one, until [`Proxy::heal`].
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Forwards connections again, without delay.
    pub fn heal(&self) {
        self.delay.send_replace(Duration::ZERO);
        self.cut.send_replace(false);
    }

    /// Holds every chunk of data, both ways, for `delay` before passing it on (the order is
    /// kept).
    pub fn slow_down(&self, delay: Duration) {
        self.delay.send_replace(delay);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept(
    listener: TcpListener,
    target: String,
    cut: watch::Receiver<bool>,
    delay: watch::Receiver<Duration>,
) {
    loop {
        let Ok((inbound, _)) = listener.accept().await else { continue };
        if *cut.borrow() {
            continue;
        }
        tokio::spawn(carry(inbound, target.clone(), cut.clone(), delay.clone()));
    }
}

/// Carries one connection until either side closes it or the proxy is cut.
async fn carry(
    inbound: TcpStream,
    target: String,
    mut cut: watch::Receiver<bool>,
    delay: watch::Receiver<Duration>,
) {
    let Ok(outbound) = TcpStream::connect(&target).await else { return };
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    tokio::select! {
        _ = pump(in_read, out_write, delay.clone()) => {}
        _ = pump(out_read, in_write, delay) => {}
        _ = cut.wait_for(|cut| *cut) => {}
    }
}

/// Copies `from` to `to`, each chunk held for the delay at the time it was read.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: watch::Receiver<Duration>,
) {
    // Bounded by the reader: it stops reading once 64 chunks wait.
    let (chunks, mut waiting) = mpsc::channel::<(Instant, Vec<u8>)>(64);
    let writer = async move {
        while let Some((due, chunk)) = waiting.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    let reader = async move {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let due = Instant::now() + *delay.borrow();
            if chunks.send((due, buffer[..n].to_vec())).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(reader, writer);
}
