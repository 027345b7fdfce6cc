//! The Hopper broker as a library: start one in-process with [`Broker::start`], for example in
//! another project's test suite, or run the `hopperd` binary.
//!
//! Layout: [`server`] accepts connections; `session` serves one connection; [`queue`] holds
//! each queue's state machine behind its own lock; `outbox` batches a connection's writes.

pub mod amqp;
pub mod audit;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod engine;
pub mod error;
pub mod events;
pub mod flow;
pub mod message;
pub mod mover;
pub mod queue;
pub mod routing;
pub mod server;
pub mod settings;
pub mod storage;

mod http;
mod outbox;
mod rotating;
mod session;
mod wire;

pub use config::Config;
pub use error::{BrokerError, StartError};
pub use server::{Broker, BrokerHandle};
