//! A long-running worker that sends the welcome emails queued by `signup_producer`, and shows
//! what to do when that fails.
//!
//! ```text
//! cargo run -p hopper-client --example email_worker
//! ```
//!
//! It takes up to 10 jobs at a time from the `emails` queue and "sends" each (prints it). Two
//! kinds of failure are handled differently:
//!
//! - The (simulated) mail server times out on every 3rd send. That is transient, so the job is
//!   nacked with requeue and the error text: the queue retries it after its backoff (1 s, 5 s,
//!   then 30 s), and after the 5th failed delivery moves it to `emails.dead`.
//! - A job that is not a valid welcome-email job (`signup_producer --poison`) will never work,
//!   so it is rejected at once with the parse error, and lands in `emails.dead` with that error
//!   in its death record (`hopper consume emails.dead --json` shows it; `hopper audit` too).
//!
//! Ctrl-C stops it cleanly: the consumer is cancelled (the broker requeues anything
//! unacknowledged) and the connection closed. The broker address comes from `HOPPER_SERVER`
//! (default `127.0.0.1:5680`).

#[path = "shared/emails.rs"]
mod emails;

use anyhow::Context as _;
use futures::StreamExt;
use hopper_client::{Connection, ConsumeOptions, Delivery, NackOptions};
use serde::Deserialize;

/// The job published by `signup_producer`.
#[derive(Deserialize)]
struct WelcomeEmail {
    user_id: u64,
    to: String,
    name: String,
    template: String,
}

/// A stand-in for an email API that times out on every 3rd request.
#[derive(Default)]
struct Mailer {
    requests: u64,
}

impl Mailer {
    fn send(&mut self, email: &WelcomeEmail) -> Result<(), String> {
        self.requests += 1;
        if self.requests.is_multiple_of(3) {
            return Err(format!(
                "smtp timeout: no answer from smtp.example.com within 10 s (to {})",
                email.to
            ));
        }
        println!("sent '{}' email to {} <{}> (user {})", email.template, email.name, email.to, email.user_id);
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let server = std::env::var("HOPPER_SERVER").unwrap_or_else(|_| "127.0.0.1:5680".to_string());
    let conn = Connection::connect(&server).await.with_context(|| format!("connecting to {server}"))?;
    emails::declare(&conn).await.context("declaring the queues")?;
    let options = ConsumeOptions { prefetch: 10, tag: "email-worker".to_string(), ..Default::default() };
    let mut consumer = conn.consume(emails::QUEUE, options).await?;
    println!("waiting for emails to send (Ctrl-C to stop)");

    let mut mailer = Mailer::default();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                println!("shutting down");
                break;
            }
            delivery = consumer.next() => match delivery {
                Some(Ok(delivery)) => handle(&mut mailer, &delivery).await?,
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

/// Sends one email and settles its delivery according to how that went.
async fn handle(mailer: &mut Mailer, delivery: &Delivery) -> anyhow::Result<()> {
    let id = delivery.message_id;
    if delivery.redelivered {
        println!("message {id}: delivery {} (a retry)", delivery.delivery_count);
    }
    let email = match serde_json::from_slice::<WelcomeEmail>(&delivery.body) {
        Ok(email) => email,
        Err(parse_error) => {
            // Poison: retrying cannot fix the payload. Dead-letter it with the reason.
            eprintln!("message {id} is not a welcome-email job ({parse_error}); dead-lettering it");
            delivery.reject_with(parse_error.to_string()).await?;
            return Ok(());
        }
    };
    match mailer.send(&email) {
        Ok(()) => delivery.ack().await?,
        Err(error) => {
            // Transient: let the queue's retry backoff decide when to try again.
            eprintln!("message {id}: {error}; will retry");
            delivery.nack_with(true, NackOptions { error, ..Default::default() }).await?;
        }
    }
    Ok(())
}
