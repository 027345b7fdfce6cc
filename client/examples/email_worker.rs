//! A long-running worker that sends the welcome emails queued by `signup_producer`.
//!
//! ```text
//! cargo run -p hopper-client --example email_worker
//! ```
//!
//! It takes up to 10 jobs at a time from the `emails` queue, "sends" each (prints it) and acks
//! it; a job that is not valid JSON is rejected so it does not come back. Ctrl-C stops it
//! cleanly: the consumer is cancelled (the broker requeues anything unacknowledged) and the
//! connection closed. The broker address comes from `HOPPER_SERVER` (default
//! `127.0.0.1:5680`).

use anyhow::Context as _;
use futures::StreamExt;
use hopper_client::{Connection, ConsumeOptions, Delivery, QueueOptions};
use serde::Deserialize;

/// The job published by `signup_producer`.
#[derive(Deserialize)]
struct WelcomeEmail {
    user_id: u64,
    to: String,
    name: String,
    template: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let server = std::env::var("HOPPER_SERVER").unwrap_or_else(|_| "127.0.0.1:5680".to_string());
    let conn = Connection::connect(&server).await.with_context(|| format!("connecting to {server}"))?;
    conn.declare_queue("emails", QueueOptions::default()).await?;
    let options = ConsumeOptions { prefetch: 10, tag: "email-worker".to_string(), ..Default::default() };
    let mut consumer = conn.consume("emails", options).await?;
    println!("waiting for emails to send (Ctrl-C to stop)");

    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                println!("shutting down");
                break;
            }
            delivery = consumer.next() => match delivery {
                Some(Ok(delivery)) => handle(&delivery).await?,
                Some(Err(err)) => return Err(err).context("consuming from 'emails'"),
                None => return Ok(()),
            },
        }
    }

    let requeued = consumer.cancel().await?;
    if requeued > 0 {
        println!("{requeued} unfinished job(s) went back to the queue");
    }
    conn.close().await?;
    Ok(())
}

/// Sends one email and settles its delivery.
async fn handle(delivery: &Delivery) -> anyhow::Result<()> {
    match serde_json::from_slice::<WelcomeEmail>(&delivery.body) {
        Ok(email) => {
            println!(
                "sending '{}' email to {} <{}> (user {}, message {})",
                email.template, email.name, email.to, email.user_id, delivery.message_id
            );
            delivery.ack().await?;
        }
        Err(err) => {
            eprintln!("message {} is not a welcome-email job ({err}); rejecting it", delivery.message_id);
            delivery.reject().await?;
        }
    }
    Ok(())
}
