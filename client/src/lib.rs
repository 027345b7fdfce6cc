//! Async client for the Hopper message broker.
//!
//! A [`Connection`] speaks Hopper's binary protocol over one TCP socket: requests are
//! pipelined (many can be in flight from many tasks), publishes are confirmed by the broker,
//! and consumers receive deliveries as a [`futures::Stream`]. Each connection runs one reader
//! and one writer task; outgoing frames are batched into single writes.
//!
//! ```no_run
//! use futures::StreamExt;
//! use hopper_client::{ConsumeOptions, Connection, PublishOptions, QueueOptions};
//!
//! # async fn demo() -> hopper_client::Result<()> {
//! let conn = Connection::connect("127.0.0.1:5680").await?;
//! conn.declare_queue("jobs", QueueOptions { durable: true, ..Default::default() }).await?;
//!
//! // Publish without waiting for each confirm, then collect the confirms.
//! let confirms: Vec<_> =
//!     (0..100).map(|i| conn.publish("jobs", format!("job {i}"), PublishOptions::default())).collect();
//! for confirm in confirms {
//!     let message_id = confirm.await?;
//!     println!("stored as message {message_id}");
//! }
//!
//! let mut consumer = conn.consume("jobs", ConsumeOptions { prefetch: 10, ..Default::default() }).await?;
//! while let Some(delivery) = consumer.next().await {
//!     let delivery = delivery?;
//!     println!("got {:?}", delivery.body);
//!     delivery.ack().await?;
//! }
//! conn.close().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # When processing fails
//!
//! A queue can retry failed messages with a backoff, give up after a number of deliveries, and
//! move the messages it gives up on — with the reason and the consumer's error text — to a
//! dead-letter queue, where [`Delivery::deaths`] tells their story. The broker also keeps an
//! audit trail of every dead message ([`Connection::audit`]).
//!
//! ```no_run
//! use std::time::Duration;
//! use futures::StreamExt;
//! use hopper_client::{ConsumeOptions, Connection, NackOptions, QueueOptions};
//!
//! # async fn demo() -> hopper_client::Result<()> {
//! let conn = Connection::connect("127.0.0.1:5680").await?;
//! conn.declare_queue("jobs.dead", QueueOptions { durable: true, ..Default::default() }).await?;
//! let jobs = QueueOptions {
//!     durable: true,
//!     dead_letter: Some("jobs.dead".into()),
//!     max_deliveries: Some(5),
//!     retry_backoff: vec![Duration::from_secs(1), Duration::from_secs(10)],
//!     ..Default::default()
//! };
//! conn.declare_queue("jobs", jobs).await?;
//!
//! let mut consumer = conn.consume("jobs", ConsumeOptions { prefetch: 10, ..Default::default() }).await?;
//! while let Some(delivery) = consumer.next().await {
//!     let delivery = delivery?;
//!     match std::str::from_utf8(&delivery.body) {
//!         // A message no retry can fix goes straight to jobs.dead.
//!         Err(err) => delivery.reject_with(err.to_string()).await?,
//!         // A transient failure is retried after the backoff; the 5th failure dead-letters it.
//!         Ok(_) if delivery.delivery_count < 3 => {
//!             let error = "upstream unavailable".to_string();
//!             delivery.nack_with(true, NackOptions { error, ..Default::default() }).await?
//!         }
//!         Ok(_) => delivery.ack().await?,
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Besides consuming, messages can be pulled on demand with [`Connection::get`]. A delivery
//! not settled within the queue's (or consumer's) ack timeout, or a pulled one within its
//! visibility timeout, is taken back by the broker; [`Delivery::extend`] buys more time.
//!
//! Errors the broker sends back are [`Error::Broker`] with a stable [`ErrorCode`]; a lost
//! connection fails every request in flight with [`Error::Closed`].

mod connection;
mod consumer;
mod delivery;
mod error;
mod info;
mod io;
mod options;
mod pull;
mod shared;
mod tracker;

pub use connection::{Connection, PublishConfirm};
pub use consumer::Consumer;
pub use delivery::Delivery;
pub use error::{Error, Result};
pub use hopper_proto::ErrorCode;
pub use info::{AuditEvent, Death, QueueInfo};
pub use options::{
    ConnectOptions, ConsumeOptions, DeleteOptions, GetOptions, NackOptions, PublishOptions, QueueOptions,
};
