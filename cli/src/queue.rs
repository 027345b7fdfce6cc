//! `hopper queue ...`: declare, delete, purge, list and inspect queues.

use clap::{Args, Subcommand};
use hopper_client::{Connection, DeleteOptions, ErrorCode, QueueOptions};

use crate::output;

/// The `queue` subcommands.
#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Create a queue unless it exists.
    ///
    /// Prints `declared queue 'NAME'`, or `queue 'NAME' already exists` when it did (its
    /// settings must match).
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
    /// published, delivered, acked, redelivered.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `queue stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Name of the queue.
    pub name: String,
    /// Print one JSON object with keys name, durable, ready, unacked, consumers, published,
    /// delivered, acked, redelivered.
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
            conn.declare_queue(&args.name, QueueOptions { durable: args.durable }).await?;
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
}
