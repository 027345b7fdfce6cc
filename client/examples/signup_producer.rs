//! A web app's signup handler, reduced to its queueing part: every new account enqueues a
//! "send the welcome email" job on the `emails` queue and waits for the broker's confirm
//! before answering the user.
//!
//! ```text
//! cargo run -p hopper-client --example signup_producer -- 25
//! cargo run -p hopper-client --example signup_producer -- 3 --poison
//! ```
//!
//! The number is how many signups to simulate (default 10). With `--poison`, one more job is
//! published that is missing a field, which `email_worker` rejects into `emails.dead`. The
//! broker address comes from `HOPPER_SERVER` (default `127.0.0.1:5680`). Run `email_worker` to
//! process the jobs.

#[path = "shared/emails.rs"]
mod emails;

use std::collections::HashMap;

use anyhow::{bail, Context as _};
use hopper_client::{Connection, PublishOptions};
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
    let mut signups: u64 = 10;
    let mut poison = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--poison" => poison = true,
            _ if arg.starts_with('-') => {
                bail!("unknown flag '{arg}' (usage: signup_producer [N] [--poison])")
            }
            _ => signups = arg.parse().with_context(|| format!("'{arg}' is not a number of signups"))?,
        }
    }
    let server = std::env::var("HOPPER_SERVER").unwrap_or_else(|_| "127.0.0.1:5680".to_string());

    let conn = Connection::connect(&server).await.with_context(|| format!("connecting to {server}"))?;
    emails::declare(&conn).await.context("declaring the queues")?;

    let options = PublishOptions {
        content_type: "application/json".to_string(),
        headers: HashMap::from([("job".to_string(), "welcome-email".to_string())]),
        ..Default::default()
    };
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
        confirms.push((user_id, conn.publish(emails::QUEUE, serde_json::to_vec(&job)?, options.clone())));
    }
    if poison {
        // A buggy client release that forgot the name: no retry will make this sendable.
        let user_id = signups + 1;
        let job = serde_json::json!({ "user_id": user_id, "to": format!("user{user_id}@example.com") });
        confirms.push((user_id, conn.publish(emails::QUEUE, job.to_string(), options.clone())));
    }
    for (user_id, confirm) in confirms {
        let message_id = confirm.await.with_context(|| format!("queueing the email of user {user_id}"))?;
        println!("user {user_id}: welcome email queued as message {message_id}");
    }

    conn.close().await?;
    Ok(())
}
