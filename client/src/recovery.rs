//! A connection that comes back by itself, for long-running workers: given several brokers, it
//! reconnects with backoff when its broker goes away, subscribes its consumers again, retries
//! publishes the lost connection did not confirm, and says what happened through an event
//! stream.
//!
//! Delivery stays at least once. A delivery received before the loss can no longer be settled
//! (its ack fails with [`Error::Closed`]); the broker that held it delivers it again, flagged
//! redelivered. A publish whose connection was lost before its confirm is sent again on the next
//! connection, so a broker may hold it twice.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::{ConnectOptions, Connection, ConsumeOptions, Delivery, Error, PublishOptions, Result};

/// How a [`Recovering`] connection retries.
#[derive(Debug, Clone)]
pub struct RecoveryOptions {
    /// Wait before the first reconnection attempt; it doubles with each failed attempt.
    pub first_delay: Duration,
    /// Longest wait between attempts.
    pub max_delay: Duration,
}

impl Default for RecoveryOptions {
    fn default() -> Self {
        RecoveryOptions { first_delay: Duration::from_millis(100), max_delay: Duration::from_secs(5) }
    }
}

/// What happened to a [`Recovering`] connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryEvent {
    /// The connection was lost; operations wait for the next one.
    Lost {
        /// Why.
        reason: String,
    },
    /// An attempt to connect failed; the next one follows after `retry_in`.
    AttemptFailed {
        /// Attempts since the loss.
        attempt: u32,
        /// Why it failed.
        error: String,
        /// Wait before the next attempt.
        retry_in: Duration,
    },
    /// Connected again; consumers are being subscribed again.
    Recovered {
        /// Connections made so far, this one included (the first is 1).
        generation: u64,
    },
}

/// Events kept for a receiver that falls behind.
const EVENT_BUFFER: usize = 64;

/// A connection to one of several brokers that replaces itself when it is lost. Clones share
/// it; once the last clone (and the last consumer) is dropped, it closes and stops reconnecting.
#[derive(Clone)]
pub struct Recovering {
    inner: Arc<Inner>,
    /// Held by the handles only, not by the task that reconnects, so that dropping them ends it.
    _handles: Arc<tokio_util::sync::DropGuard>,
}

struct Inner {
    /// The live connection and its generation; `None` while reconnecting.
    current: watch::Sender<Option<(u64, Connection)>>,
    events: broadcast::Sender<RecoveryEvent>,
    closed: CancellationToken,
}

impl Recovering {
    /// Connects to the first of `addrs` that answers (see [`Connection::connect_any`]); the
    /// first connection must succeed. From then on a lost connection is replaced in the
    /// background, trying `addrs` in order again.
    pub async fn connect(
        addrs: Vec<String>,
        options: ConnectOptions,
        recovery: RecoveryOptions,
    ) -> Result<Recovering> {
        let connection = Connection::connect_any(&addrs, options.clone()).await?;
        let inner = Arc::new(Inner {
            current: watch::channel(Some((1, connection))).0,
            events: broadcast::channel(EVENT_BUFFER).0,
            closed: CancellationToken::new(),
        });
        tokio::spawn(keep_connected(inner.clone(), addrs, options, recovery));
        let handles = Arc::new(inner.closed.clone().drop_guard());
        Ok(Recovering { inner, _handles: handles })
    }

    /// What happens to the connection from now on.
    pub fn events(&self) -> broadcast::Receiver<RecoveryEvent> {
        self.inner.events.subscribe()
    }

    /// The live connection, waiting for one while reconnecting, with its generation.
    pub async fn connection(&self) -> Result<(u64, Connection)> {
        let mut current = self.inner.current.subscribe();
        loop {
            if self.inner.closed.is_cancelled() {
                return Err(Error::Closed("the client closed the connection".into()));
            }
            if let Some((generation, connection)) = current.borrow_and_update().clone() {
                if !connection.is_closed() {
                    return Ok((generation, connection));
                }
            }
            tokio::select! {
                changed = current.changed() => {
                    if changed.is_err() {
                        return Err(Error::Closed("the client closed the connection".into()));
                    }
                }
                () = self.inner.closed.cancelled() => {}
            }
        }
    }

    /// Publishes to `queue` and waits for the confirm. If the connection is lost before the
    /// confirm, the message is sent again on the next one (at least once); a refusal by the
    /// broker is returned as it is.
    pub async fn publish(&self, queue: &str, body: impl Into<Bytes>, options: PublishOptions) -> Result<u64> {
        let body = body.into();
        loop {
            let (_, connection) = self.connection().await?;
            match connection.publish(queue, body.clone(), options.clone()).await {
                Err(err) if is_lost(&err) && !self.inner.closed.is_cancelled() => connection.closed().await,
                other => return other,
            }
        }
    }

    /// Consumes from `queue`, subscribing again on every new connection. The stream ends with
    /// an error the broker gave (the queue was deleted, say), or when the client is closed.
    pub async fn consume(&self, queue: &str, options: ConsumeOptions) -> Result<RecoveringConsumer> {
        let (_, connection) = self.connection().await?;
        let first = connection.consume(queue, options.clone()).await?;
        // Bounded by the prefetch window: the broker sends no more than that unacked.
        let (tx, rx) = mpsc::channel(options.prefetch.max(1) as usize);
        let task = tokio::spawn(forward(self.clone(), queue.to_owned(), options, first, tx));
        Ok(RecoveringConsumer { rx, task })
    }

    /// Closes the live connection and stops reconnecting.
    pub async fn close(&self) -> Result<()> {
        self.inner.closed.cancel();
        let current = self.inner.current.borrow().clone();
        match current {
            Some((_, connection)) => connection.close().await,
            None => Ok(()),
        }
    }
}

/// True when `err` means the connection went away, not that the broker refused.
fn is_lost(err: &Error) -> bool {
    matches!(err, Error::Closed(_) | Error::Io(_) | Error::Timeout(_))
}

/// Replaces the connection each time it is lost, until the client closes.
async fn keep_connected(
    inner: Arc<Inner>,
    addrs: Vec<String>,
    options: ConnectOptions,
    recovery: RecoveryOptions,
) {
    let mut generation = 1;
    loop {
        let Some((_, connection)) = inner.current.borrow().clone() else { return };
        tokio::select! {
            () = connection.closed() => {}
            () = inner.closed.cancelled() => return,
        }
        drop(connection);
        if inner.closed.is_cancelled() {
            return;
        }
        let reason = inner.current.borrow().as_ref().and_then(|(_, c)| c.close_reason());
        let reason = reason.unwrap_or_else(|| "connection closed".into());
        inner.current.send_replace(None);
        let _ = inner.events.send(RecoveryEvent::Lost { reason });
        let mut delay = recovery.first_delay;
        let mut attempt = 0;
        let connection = loop {
            attempt += 1;
            match Connection::connect_any(&addrs, options.clone()).await {
                Ok(connection) => break connection,
                Err(err) => {
                    let event =
                        RecoveryEvent::AttemptFailed { attempt, error: err.to_string(), retry_in: delay };
                    let _ = inner.events.send(event);
                }
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = inner.closed.cancelled() => return,
            }
            delay = (delay * 2).min(recovery.max_delay);
        };
        generation += 1;
        if inner.closed.is_cancelled() {
            return;
        }
        inner.current.send_replace(Some((generation, connection)));
        let _ = inner.events.send(RecoveryEvent::Recovered { generation });
    }
}

/// Passes one consumer's deliveries on, subscribing again after each lost connection.
async fn forward(
    client: Recovering,
    queue: String,
    options: ConsumeOptions,
    mut consumer: crate::Consumer,
    tx: mpsc::Sender<Result<Delivery>>,
) {
    loop {
        while let Some(item) = consumer.next().await {
            match item {
                Ok(delivery) => {
                    if tx.send(Ok(delivery)).await.is_err() {
                        return;
                    }
                }
                Err(err) if is_lost(&err) => break,
                Err(err) => {
                    let _ = tx.send(Err(err)).await;
                    return;
                }
            }
        }
        consumer = loop {
            let Ok((_, connection)) = client.connection().await else { return };
            match connection.consume(&queue, options.clone()).await {
                Ok(consumer) => break consumer,
                Err(err) if is_lost(&err) => connection.closed().await,
                Err(err) => {
                    let _ = tx.send(Err(err)).await;
                    return;
                }
            }
        };
    }
}

/// The deliveries of a consumer of a [`Recovering`] connection, across connections.
pub struct RecoveringConsumer {
    rx: mpsc::Receiver<Result<Delivery>>,
    task: tokio::task::JoinHandle<()>,
}

impl Stream for RecoveringConsumer {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for RecoveringConsumer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
