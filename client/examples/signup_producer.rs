//! A web app's signup handler, reduced to its queueing part: every new account enqueues a
//! "send the welcome email" job on the `emails` queue and waits for the broker's confirm
//! before answering the user.
//!
//! ```text
//! cargo run -p hopper-client --example signup_producer -- 25
//! ```
//!
//! The argument is the number of signups to simulate (default 10). The broker address comes
//! from `HOPPER_SERVER` (default `127.0.0.1:5680`). Run `email_worker` to process the jobs.

use std::collections::HashMap;

use anyhow::Context as _;
use hopper_client::{Connection, PublishOptions, QueueOptions};
use serde::Serialize;

/// The job a worker needs to send one welcome email.
#[derive(Serialize)]
struct WelcomeEmail {
    user_id: u64,
    to: String,
    name: String,
    template: &'static str,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let signups: u64 = match std::env::args().nth(1) {
        Some(arg) => arg.parse().with_context(|| format!("'{arg}' is not a number of signups"))?,
        None => 10,
    };
    let server = std::env::var("HOPPER_SERVER").unwrap_or_else(|_| "127.0.0.1:5680".to_string());

    let conn = Connection::connect(&server).await.with_context(|| format!("connecting to {server}"))?;
    conn.declare_queue("emails", QueueOptions::default()).await?;

    // Publish every job first and collect the confirms afterwards: the publishes travel
    // together instead of one round trip each.
    let mut confirms = Vec::new();
    for user_id in 1..=signups {
        let job = WelcomeEmail {
            user_id,
            to: format!("user{user_id}@example.com"),
            name: format!("User {user_id}"),
            template: "welcome",
        };
        let options = PublishOptions {
            content_type: "application/json".to_string(),
            headers: HashMap::from([("job".to_string(), "welcome-email".to_string())]),
        };
        confirms.push((user_id, conn.publish("emails", serde_json::to_vec(&job)?, options)));
    }
    for (user_id, confirm) in confirms {
        let message_id = confirm.await.with_context(|| format!("queueing the email of user {user_id}"))?;
        println!("user {user_id}: welcome email queued as message {message_id}");
    }

    conn.close().await?;
    Ok(())
}
