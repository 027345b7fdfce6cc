//! Async client for the Hopper message broker.
//!
//! A [`Connection`] speaks Hopper's binary protocol over one TCP socket, or inside TLS with
//! [`ConnectOptions::tls`]: requests are pipelined (many can be in flight from many tasks),
//! publishes are confirmed by the broker, and consumers receive deliveries as a
//! [`futures::Stream`]. Each connection runs one reader and one writer task; outgoing frames
//! are batched into single writes.
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
//! # Backpressure and operations
//!
//! A queue can be bounded ([`QueueOptions::max_length`], [`QueueOptions::max_bytes`]): when
//! full it either refuses publishes (their confirms fail with `RESOURCE_LIMIT`) or drops its
//! oldest messages ([`Overflow::DropHead`]). When the broker runs short of memory or disk it
//! blocks publishing connections until it recovers; [`Connection::is_blocked`] and
//! [`Connection::flow_changes`] tell, and confirms just take longer meanwhile.
//!
//! For operators: [`Connection::status`] reports the broker's health, [`Connection::peek`]
//! looks at waiting messages without taking them, [`Connection::start_move`] moves messages
//! (e.g. out of a dead-letter queue back to where they failed) at a chosen rate,
//! [`Connection::set_alarm`] sets a queue's depth alarm, and [`Connection::subscribe_events`]
//! streams alarms, blocks and moves as they happen.
//!
//! ```no_run
//! use futures::StreamExt;
//! use hopper_client::{Connection, MoveOptions};
//!
//! # async fn demo() -> hopper_client::Result<()> {
//! let conn = Connection::connect("127.0.0.1:5680").await?;
//! for message in conn.peek("jobs.dead", 10).await? {
//!     println!("{} died: {:?}", message.message_id, message.last_death().map(|d| &d.reason));
//! }
//! let mut events = conn.subscribe_events().await?;
//! let expired = Some(("reason".to_string(), "expired".to_string()));
//! let started = conn
//!     .start_move(MoveOptions { source: "jobs.dead".into(), rate: Some(50), filter: expired, ..Default::default() })
//!     .await?;
//! while let Some(event) = events.next().await {
//!     let event = event?;
//!     println!("{} {:?} {}", event.kind, event.queue, event.detail);
//!     if event.kind == hopper_client::EventKind::MoveEnded && event.value == started.id {
//!         break;
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # TLS
//!
//! Against a broker started with `--tls-listen`, set [`ConnectOptions::tls`]: the broker's
//! certificate is checked against [`TlsOptions::server_name`] and the built-in roots, or the
//! CA certificates given instead. With a [`ClientCertificate`] and no credentials the client
//! logs in as the certificate's user (mechanism EXTERNAL, mutual TLS).
//!
//! ```no_run
//! use hopper_client::{ConnectOptions, Connection, Credentials, TlsOptions};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let tls = TlsOptions {
//!     ca_certificates: Some(std::fs::read("ca.pem")?),
//!     ..TlsOptions::new("hopper.internal")
//! };
//! let options = ConnectOptions {
//!     credentials: Some(Credentials::new("app", "app-password")),
//!     tls: Some(tls),
//!     ..ConnectOptions::default()
//! };
//! let conn = Connection::connect_with("hopper.internal:5681", options).await?;
//! # drop(conn);
//! # Ok(())
//! # }
//! ```
//!
//! Errors the broker sends back are [`Error::Broker`] with a stable [`ErrorCode`]; a lost
//! connection fails every request in flight with [`Error::Closed`].

mod access;
mod connection;
mod consumer;
mod delivery;
mod error;
mod events;
mod exchanges;
mod info;
mod io;
pub mod json;
mod message;
mod moves;
mod options;
mod pull;
mod recovery;
mod shared;
mod tls;
mod tracker;

pub use access::{Permissions, TokenInfo, UserInfo, UserList};
pub use connection::{Connection, PublishConfirm};
pub use consumer::Consumer;
pub use delivery::Delivery;
pub use error::{Error, Result};
pub use events::{Event, EventKind, Events, EVENT_BUFFER};
pub use exchanges::{BindingInfo, ExchangeInfo, ExchangeKind, ExchangeOptions};
pub use hopper_proto::ErrorCode;
pub use info::{AuditEvent, BrokerStatus, ClusterMember, ClusterStatus, Death, QueueInfo};
pub use message::Message;
pub use moves::{MoveInfo, MoveState};
pub use options::{
    ClientCertificate, ConnectOptions, ConsumeOptions, Credentials, DeleteOptions, GetOptions, Mechanism,
    MoveOptions, NackOptions, Overflow, PublishOptions, QueueOptions, TlsOptions,
};
pub use recovery::{Recovering, RecoveringConsumer, RecoveryEvent, RecoveryOptions};
