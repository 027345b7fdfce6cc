//! The `emails` queue as both examples declare it. Declaring a queue that exists with other
//! settings fails with `PRECONDITION_FAILED`, so producer and worker share one definition.

use std::time::Duration;

use hopper_client::{Connection, QueueOptions};

/// The queue of welcome-email jobs.
pub const QUEUE: &str = "emails";
/// Where jobs go that failed for good: poison payloads and jobs out of retries.
pub const DEAD_LETTER: &str = "emails.dead";

/// Declares the dead-letter queue, then `emails`: a failed send is retried after 1 s, 5 s,
/// then every 30 s, and the 5th failed delivery moves the job to `emails.dead`.
pub async fn declare(conn: &Connection) -> hopper_client::Result<()> {
    conn.declare_queue(DEAD_LETTER, QueueOptions::default()).await?;
    let emails = QueueOptions {
        dead_letter: Some(DEAD_LETTER.to_string()),
        max_deliveries: Some(5),
        retry_backoff: vec![Duration::from_secs(1), Duration::from_secs(5), Duration::from_secs(30)],
        ..Default::default()
    };
    conn.declare_queue(QUEUE, emails).await?;
    Ok(())
}
