//! A TCP proxy a test can cut, to partition a cluster without privileges: it forwards every
//! connection to one address until it is cut, then drops the connections it carries and
//! closes new ones at once, until it is healed.

use std::net::SocketAddr;

use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A proxy to one address, listening on a loopback port of its own.
pub struct Proxy {
    addr: SocketAddr,
    cut: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts forwarding connections made to [`Proxy::addr`] to `target`.
    pub async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let (cut, cut_rx) = watch::channel(false);
        let task = tokio::spawn(accept(listener, target, cut_rx));
        Proxy { addr, cut, task }
    }

    /// Where to connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every connection through the proxy, and every new one, until [`Proxy::heal`].
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Forwards connections again.
    pub fn heal(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept(listener: TcpListener, target: String, cut: watch::Receiver<bool>) {
    loop {
        let Ok((inbound, _)) = listener.accept().await else { continue };
        if *cut.borrow() {
            continue;
        }
        tokio::spawn(carry(inbound, target.clone(), cut.clone()));
    }
}

/// Carries one connection until either side closes it or the proxy is cut.
async fn carry(mut inbound: TcpStream, target: String, mut cut: watch::Receiver<bool>) {
    let Ok(mut outbound) = TcpStream::connect(&target).await else { return };
    tokio::select! {
        _ = copy_bidirectional(&mut inbound, &mut outbound) => {}
        _ = cut.wait_for(|cut| *cut) => {}
    }
}
