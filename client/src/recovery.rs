//! A connection that comes back by itself, for long-running workers: given several brokers, it
//! reconnects with backoff when its broker goes away, subscribes its consumers again, retries
//! publishes the lost connection did not confirm, and says what happened through an event
//! stream.
//!
//! A consumer of a replicated queue that the connected node does not serve follows the
//! broker's redirect ([`Error::ServedElsewhere`]) to the serving node, on a connection of its
//! own; when that node goes away it asks again, and while the cluster elects a new serving
//! node it waits.
//!
//! Delivery stays at least once. A delivery received before the loss can no longer be settled
//! (its ack fails with [`Error::Closed`]); the broker that held it delivers it again, flagged
//! redelivered. A publish whose connection was lost before its confirm is sent again on the next
//! connection with the same publish id, so a replicated queue holds it once; another queue may
//! hold it twice.

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
    /// For the connections consumers open to the node serving their queue.
    options: ConnectOptions,
    recovery: RecoveryOptions,
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
            options: options.clone(),
            recovery: recovery.clone(),
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
    /// confirm, the message is sent again on the next one, with the same publish id (one is
    /// drawn at random if `options` has none): a replicated queue that already took it does not
    /// take a second copy; another queue may hold it twice (at least once). A refusal by the
    /// broker is returned as it is.
    pub async fn publish(&self, queue: &str, body: impl Into<Bytes>, options: PublishOptions) -> Result<u64> {
        let body = body.into();
        let mut options = options;
        if options.publish_id == 0 {
            options.publish_id = rand::random::<u64>().max(1);
        }
        loop {
            let (_, connection) = self.connection().await?;
            match connection.publish(queue, body.clone(), options.clone()).await {
                Err(err) if is_lost(&err) && !self.inner.closed.is_cancelled() => connection.closed().await,
                other => return other,
            }
        }
    }

    /// Consumes from `queue`, subscribing again on every new connection, on the node that
    /// serves it. The stream ends with an error the broker gave (the queue was deleted, say),
    /// or when the client is closed.
    pub async fn consume(&self, queue: &str, options: ConsumeOptions) -> Result<RecoveringConsumer> {
        let first = self.subscribe(queue, &options).await?;
        // Bounded by the prefetch window: the broker sends no more than that unacked.
        let (tx, rx) = mpsc::channel(options.prefetch.max(1) as usize);
        let stop = CancellationToken::new();
        let task = tokio::spawn(forward(self.clone(), queue.to_owned(), options, first, tx, stop.clone()));
        Ok(RecoveringConsumer { rx, task: Some(task), stop })
    }

    /// Subscribes to `queue` on the live connection or, when another node of the cluster
    /// serves it, on a connection of the subscription's own to that node. Waits out lost
    /// connections and elections; returns the broker's other refusals.
    async fn subscribe(&self, queue: &str, options: &ConsumeOptions) -> Result<Subscription> {
        let mut delay = self.inner.recovery.first_delay;
        loop {
            let (_, connection) = self.connection().await?;
            let refused = match connection.consume(queue, options.clone()).await {
                Ok(consumer) => return Ok(Subscription { consumer, direct: None }),
                Err(Error::ServedElsewhere { addr, .. }) => {
                    match Connection::connect_with(&addr, self.inner.options.clone()).await {
                        Ok(direct) => match direct.consume(queue, options.clone()).await {
                            Ok(consumer) => return Ok(Subscription { consumer, direct: Some(direct) }),
                            Err(err) if is_transient(&err) => err,
                            Err(err) => return Err(err),
                        },
                        Err(err) => err,
                    }
                }
                Err(err) if is_transient(&err) => err,
                Err(err) => return Err(err),
            };
            tracing::debug!(queue, error = %refused, retry_in = ?delay, "subscribing again");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.inner.closed.cancelled() => {
                    return Err(Error::Closed("the client closed the connection".into()));
                }
            }
            delay = (delay * 2).min(self.inner.recovery.max_delay);
        }
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

/// True when a subscription refused with `err` is worth asking for again: the connection went
/// away, the queue is served elsewhere, or its cluster is electing the node to serve it (the
/// only NOT_ALLOWED a consume gets).
fn is_transient(err: &Error) -> bool {
    is_lost(err)
        || matches!(err, Error::ServedElsewhere { .. } | Error::Unreachable(_))
        || err.code() == Some(hopper_proto::ErrorCode::NotAllowed)
}

/// A consumer, with the connection opened for it alone when its queue is served by a node
/// other than the one the client is connected to.
struct Subscription {
    consumer: crate::Consumer,
    /// Kept open for as long as the consumer runs.
    direct: Option<Connection>,
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
    mut subscription: Subscription,
    tx: mpsc::Sender<Result<Delivery>>,
    stop: CancellationToken,
) {
    loop {
        loop {
            let item = tokio::select! {
                item = subscription.consumer.next() => item,
                () = stop.cancelled() => {
                    let _ = subscription.consumer.cancel().await;
                    if let Some(direct) = subscription.direct {
                        let _ = direct.close().await;
                    }
                    return;
                }
            };
            let Some(item) = item else { break };
            match item {
                Ok(delivery) => {
                    if tx.send(Ok(delivery)).await.is_err() {
                        return;
                    }
                }
                // Lost, or cancelled by the broker (its node stopped serving the queue, or the
                // queue was deleted): subscribing again finds out which.
                Err(err) if is_lost(&err) || matches!(err, Error::ConsumerCancelled(_)) => break,
                Err(err) => {
                    let _ = tx.send(Err(err)).await;
                    return;
                }
            }
        }
        subscription = match client.subscribe(&queue, &options).await {
            Ok(subscription) => subscription,
            Err(err) => {
                if !client.inner.closed.is_cancelled() {
                    let _ = tx.send(Err(err)).await;
                }
                return;
            }
        };
    }
}

/// The deliveries of a consumer of a [`Recovering`] connection, across connections.
pub struct RecoveringConsumer {
    rx: mpsc::Receiver<Result<Delivery>>,
    task: Option<tokio::task::JoinHandle<()>>,
    stop: CancellationToken,
}

impl RecoveringConsumer {
    /// Unsubscribes: what the broker sent ahead and this consumer did not hand out goes back
    /// to the queue, and the connection opened for it alone (when another node serves the
    /// queue) closes after sending the settlements made so far.
    pub async fn cancel(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Stream for RecoveringConsumer {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for RecoveringConsumer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}
