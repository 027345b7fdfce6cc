//! Helpers for the failure-handling tests: queues with a dead-letter queue, reading what ended
//! up in one, queue settings as declared, and the wall clock the broker stamps times with.

use std::time::{SystemTime, UNIX_EPOCH};

use hopper_client::{Connection, Delivery, QueueInfo, QueueOptions};

use crate::client::{receive_backlog, stats_eventually};

/// Declares `<name>.dead` (durable when `options` is), then `name` with `options` and
/// `<name>.dead` as its dead-letter queue. Returns the dead-letter queue's name.
pub async fn declare_with_dead_letter(conn: &Connection, name: &str, options: QueueOptions) -> String {
    let dead_letter = format!("{name}.dead");
    let dead_options = QueueOptions { durable: options.durable, ..Default::default() };
    conn.declare_queue(&dead_letter, dead_options).await.expect("declare the dead-letter queue");
    let options = QueueOptions { dead_letter: Some(dead_letter.clone()), ..options };
    conn.declare_queue(name, options).await.expect("declare the queue");
    dead_letter
}

/// Waits until `queue` holds `n` ready messages, then receives and acks all of them; returns
/// them in the order they arrived. Leaves `queue` empty.
pub async fn take_ready(conn: &Connection, queue: &str, n: u64) -> Vec<Delivery> {
    stats_eventually(conn, queue, |info| info.ready == n).await;
    let (consumer, deliveries) = receive_backlog(conn, queue).await;
    for delivery in &deliveries {
        delivery.ack().await.expect("ack");
    }
    // The acks went first on this connection, so nothing is left to requeue.
    assert_eq!(consumer.cancel().await.expect("cancel"), 0);
    deliveries
}

/// The settings a queue was declared with, as its description reports them.
pub fn declared_options(info: &QueueInfo) -> QueueOptions {
    QueueOptions {
        durable: info.durable,
        replicated: info.replicated,
        replicas: None,
        dead_letter: info.dead_letter.clone(),
        dead_letter_exchange: info.dead_letter_exchange.clone(),
        dead_letter_routing_key: info.dead_letter_routing_key.clone(),
        max_deliveries: info.max_deliveries,
        retry_backoff: info.retry_backoff.clone(),
        message_ttl: info.message_ttl,
        ack_timeout: info.ack_timeout,
        max_length: info.max_length,
        max_bytes: info.max_bytes,
        overflow: info.overflow,
    }
}

/// Unix time in milliseconds, as the broker stamps publishes, failures and deaths.
pub fn unix_ms() -> u64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).expect("the clock is after 1970");
    u64::try_from(since_epoch.as_millis()).expect("milliseconds fit in u64")
}
