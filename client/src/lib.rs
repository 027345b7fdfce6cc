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
//! conn.declare_queue("jobs", QueueOptions { durable: true }).await?;
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
//! Errors the broker sends back are [`Error::Broker`] with a stable [`ErrorCode`]; a lost
//! connection fails every request in flight with [`Error::Closed`].

mod connection;
mod consumer;
mod error;
mod io;
mod options;
mod shared;

pub use connection::{Connection, PublishConfirm};
pub use consumer::{Consumer, Delivery};
pub use error::{Error, Result};
pub use hopper_proto::ErrorCode;
pub use options::{ConnectOptions, ConsumeOptions, DeleteOptions, PublishOptions, QueueInfo, QueueOptions};
