//! A local HTTP server standing in for an alarm webhook: it records every request and answers
//! with the status the test chose for it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::Value;
use tokio::io::BufReader;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::http::{read_request, write_response, HttpRequest};
use crate::wait::within;

/// Requests kept for the test to look at; the receiver waits when the test falls this far behind.
const KEPT: usize = 64;

/// A webhook receiver on `127.0.0.1` and a free port. Dropping it stops the server.
pub struct WebhookReceiver {
    addr: SocketAddr,
    received: mpsc::Receiver<Received>,
    server: JoinHandle<()>,
}

/// One request the receiver got, and the status it answered.
#[derive(Debug, Clone)]
pub struct Received {
    /// The request.
    pub request: HttpRequest,
    /// The status it was answered with.
    pub status: u16,
}

impl Received {
    /// The request body as JSON (an event: `time_ms`, `kind`, `queue`, `value`, `detail`).
    pub fn event(&self) -> Value {
        self.request.json()
    }
}

impl WebhookReceiver {
    /// A receiver that answers every request with 200.
    pub async fn start() -> WebhookReceiver {
        WebhookReceiver::answering(|_| 200).await
    }

    /// A receiver that answers its `n`-th request (counting from 0, across connections) with
    /// `status(n)`.
    pub async fn answering(status: impl Fn(usize) -> u16 + Send + Sync + 'static) -> WebhookReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the webhook receiver");
        let addr = listener.local_addr().expect("the receiver's address");
        let (sender, received) = mpsc::channel(KEPT);
        let status = Arc::new(status);
        let count = Arc::new(AtomicUsize::new(0));
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let (sender, status, count) = (sender.clone(), status.clone(), count.clone());
                tokio::spawn(async move {
                    let mut stream = BufReader::new(stream);
                    while let Ok(Some(request)) = read_request(&mut stream).await {
                        let answer = status(count.fetch_add(1, Ordering::SeqCst));
                        let close =
                            request.header("connection").is_some_and(|c| c.eq_ignore_ascii_case("close"));
                        let written = write_response(&mut stream, answer, "text/plain", b"", close).await;
                        let _ = sender.send(Received { request, status: answer }).await;
                        if close || written.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        WebhookReceiver { addr, received, server }
    }

    /// The URL of `path` on this receiver, e.g. `http://127.0.0.1:39211/hook`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The next request; fails the test if none arrives within the deadline.
    pub async fn next(&mut self) -> Received {
        within("a webhook request", self.received.recv()).await.expect("the receiver runs")
    }

    /// A request already received and not yet taken, if any.
    pub fn try_next(&mut self) -> Option<Received> {
        self.received.try_recv().ok()
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}
