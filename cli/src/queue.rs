//! `hopper queue ...`: declare, delete, purge, list and inspect queues.

use std::time::Duration;

use clap::{Args, Subcommand};
use hopper_client::{Connection, DeleteOptions, ErrorCode, QueueOptions};

use crate::output;
use crate::time::parse_duration;

/// The `queue` subcommands.
#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Create a queue unless it exists.
    ///
    /// Prints `declared queue 'NAME'`, or `queue 'NAME' already exists` when it did (its
    /// settings must match: declaring it with other settings fails).
    Declare(DeclareArgs),
    /// Delete a queue and the messages in it.
    ///
    /// Prints `deleted queue 'NAME' (N messages dropped)`.
    Delete(DeleteArgs),
    /// Drop the ready messages of a queue; unacknowledged ones stay.
    ///
    /// Prints `purged N messages from 'NAME'`.
    Purge(NameArg),
    /// List every queue with its counters.
    List(JsonArg),
    /// Show the counters of one queue.
    Stats(StatsArgs),
}

/// Flags of `queue declare`.
#[derive(Debug, Args)]
pub struct DeclareArgs {
    /// Name of the queue.
    pub name: String,
    /// Keep the queue and its messages across broker restarts.
    #[arg(long)]
    pub durable: bool,
    /// Queue that receives this queue's dead messages (rejected, past --max-deliveries,
    /// expired); declare it first. Without one (or while it does not exist), dead messages
    /// are dropped.
    #[arg(long, value_name = "QUEUE")]
    pub dead_letter: Option<String>,
    /// Deliveries after which a message that keeps failing dies (reason delivery_limit).
    #[arg(long, value_name = "N", value_parser = crate::at_least(1u32))]
    pub max_deliveries: Option<u32>,
    /// Delays before the 1st, 2nd, ... redelivery of a failed message, comma-separated
    /// (e.g. 1s,10s,60s); the last one repeats.
    #[arg(long, value_name = "DURS", value_delimiter = ',', value_parser = parse_duration)]
    pub retry_backoff: Vec<Duration>,
    /// How long a message may wait in the queue before it dies (reason expired).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub message_ttl: Option<Duration>,
    /// How long a consumer has to settle a delivery before the broker takes it back.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub ack_timeout: Option<Duration>,
}

impl DeclareArgs {
    /// The queue settings the flags ask for.
    pub fn options(&self) -> QueueOptions {
        QueueOptions {
            durable: self.durable,
            dead_letter: self.dead_letter.clone(),
            max_deliveries: self.max_deliveries,
            retry_backoff: self.retry_backoff.clone(),
            message_ttl: self.message_ttl,
            ack_timeout: self.ack_timeout,
        }
    }
}

/// Flags of `queue delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Name of the queue.
    pub name: String,
    /// Refuse to delete the queue while it has consumers.
    #[arg(long)]
    pub if_unused: bool,
    /// Refuse to delete the queue while it holds messages.
    #[arg(long)]
    pub if_empty: bool,
}

/// A lone queue name.
#[derive(Debug, Args)]
pub struct NameArg {
    /// Name of the queue.
    pub name: String,
}

/// A lone `--json` switch.
#[derive(Debug, Args)]
pub struct JsonArg {
    /// Print a JSON array of objects with keys name, durable, ready, unacked, consumers,
    /// published, delivered, acked, redelivered, delayed, dead_lettered (reason -> count),
    /// dead_letter, max_deliveries, retry_backoff_ms, message_ttl_ms, ack_timeout_ms (null
    /// when unset).
    #[arg(long)]
    pub json: bool,
}

/// Flags of `queue stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Name of the queue.
    pub name: String,
    /// Print one JSON object with keys name, durable, ready, unacked, consumers, published,
    /// delivered, acked, redelivered, delayed, dead_lettered (reason -> count), dead_letter,
    /// max_deliveries, retry_backoff_ms, message_ttl_ms, ack_timeout_ms (null when unset).
    #[arg(long)]
    pub json: bool,
}

/// Runs a `queue` subcommand against the broker at `server`.
pub async fn run(server: &str, command: QueueCommand) -> anyhow::Result<()> {
    let conn = crate::connect(server, "queue").await?;
    let result = execute(&conn, command).await;
    // Closing is a courtesy; its failure must not hide the command's own result.
    let _ = conn.close().await;
    let text = result?;
    print!("{text}");
    Ok(())
}

/// Performs the command and returns what to print on stdout.
async fn execute(conn: &Connection, command: QueueCommand) -> anyhow::Result<String> {
    Ok(match command {
        QueueCommand::Declare(args) => {
            let existed = match conn.queue_exists(&args.name).await {
                Ok(_) => true,
                Err(err) if err.code() == Some(ErrorCode::NotFound) => false,
                Err(err) => return Err(err.into()),
            };
            // Declare even when it exists, so that conflicting settings are reported.
            conn.declare_queue(&args.name, args.options()).await?;
            if existed {
                format!("queue '{}' already exists\n", args.name)
            } else {
                format!("declared queue '{}'\n", args.name)
            }
        }
        QueueCommand::Delete(args) => {
            let options = DeleteOptions { if_unused: args.if_unused, if_empty: args.if_empty };
            let dropped = conn.delete_queue(&args.name, options).await?;
            format!("deleted queue '{}' ({dropped} {} dropped)\n", args.name, messages(dropped))
        }
        QueueCommand::Purge(args) => {
            let purged = conn.purge_queue(&args.name).await?;
            format!("purged {purged} {} from '{}'\n", messages(purged), args.name)
        }
        QueueCommand::List(args) => {
            let mut queues = conn.list_queues().await?;
            queues.sort_by(|a, b| a.name.cmp(&b.name));
            if args.json {
                output::queues_json(&queues)? + "\n"
            } else {
                output::queue_table(&queues)
            }
        }
        QueueCommand::Stats(args) => {
            let info = conn.queue_stats(&args.name).await?;
            if args.json {
                output::queue_json(&info)? + "\n"
            } else {
                output::queue_listing(&info)
            }
        }
    })
}

/// `message` or `messages`, to agree with a count.
pub fn messages(count: u64) -> &'static str {
    if count == 1 {
        "message"
    } else {
        "messages"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_count_agrees_in_number() {
        assert_eq!(messages(0), "messages");
        assert_eq!(messages(1), "message");
        assert_eq!(messages(2), "messages");
    }

    #[derive(clap::Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: DeclareArgs,
    }

    #[test]
    fn declare_flags_become_queue_settings() {
        use clap::Parser;
        let parsed = Wrapper::try_parse_from([
            "x",
            "jobs",
            "--durable",
            "--dead-letter",
            "jobs.dead",
            "--max-deliveries",
            "5",
            "--retry-backoff",
            "1s,10s,1m",
            "--message-ttl",
            "1h",
            "--ack-timeout",
            "30s",
        ])
        .unwrap();
        let options = parsed.args.options();
        assert_eq!(
            options,
            QueueOptions {
                durable: true,
                dead_letter: Some("jobs.dead".into()),
                max_deliveries: Some(5),
                retry_backoff: vec![Duration::from_secs(1), Duration::from_secs(10), Duration::from_secs(60)],
                message_ttl: Some(Duration::from_secs(3600)),
                ack_timeout: Some(Duration::from_secs(30)),
            }
        );
        let plain = Wrapper::try_parse_from(["x", "q"]).unwrap();
        assert_eq!(plain.args.options(), QueueOptions::default());
    }

    #[test]
    fn bad_declare_flags_are_refused() {
        use clap::Parser;
        assert!(Wrapper::try_parse_from(["x", "q", "--max-deliveries", "0"]).is_err());
        assert!(Wrapper::try_parse_from(["x", "q", "--retry-backoff", "1s,,2s"]).is_err());
        assert!(Wrapper::try_parse_from(["x", "q", "--ack-timeout", "1x"]).is_err());
    }
}
