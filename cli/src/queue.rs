//! `hopper queue ...`: declare, delete, purge, list, inspect and peek into queues, set their
//! depth alarms; moving messages between queues lives in [`crate::moves`].

use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use hopper_client::{Connection, DeleteOptions, ErrorCode, Overflow, QueueOptions};

use crate::moves::{MoveArgs, MovesArgs};
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
    ///
    /// While the broker blocks publishers (memory or disk), a line `publishers are blocked:
    /// REASON` comes first (with --json it goes to stderr instead).
    List(JsonArg),
    /// Show the counters of one queue.
    Stats(StatsArgs),
    /// Set or clear the depth alarm of a queue.
    ///
    /// The alarm is raised while more than DEPTH messages are ready (`hopper events` shows it
    /// happen, `queue list` shows it in the ALARM column). Prints `alarm of 'NAME' set to ready >
    /// DEPTH` or `alarm of 'NAME' cleared`.
    Alarm(AlarmArgs),
    /// Print the first waiting messages of a queue without taking them.
    ///
    /// Nothing is delivered, settled or counted. Prints each body on its own line, or with
    /// --json one object per line with the keys of `hopper consume --json` (without
    /// delivery_tag), replay_count included.
    Peek(PeekArgs),
    /// Move waiting messages between queues (e.g. out of a dead-letter queue) and follow it.
    Move(MoveArgs),
    /// List the broker's moves, running and recently ended.
    Moves(MovesArgs),
}

/// Flags of `queue declare`.
#[derive(Debug, Args)]
pub struct DeclareArgs {
    /// Name of the queue.
    pub name: String,
    /// Keep the queue and its messages across broker restarts.
    #[arg(long)]
    pub durable: bool,
    /// Replicate the queue over the cluster's nodes (the broker must be in a cluster): publishes
    /// are confirmed once a majority holds them; consumers attach at the node serving it
    /// (`hopper cluster status`: queues served by).
    #[arg(long)]
    pub replicated: bool,
    /// Copies of the replicated queue (implies --replicated). A cluster keeps one on each of
    /// its nodes: give its size, or leave this out.
    #[arg(long, value_name = "N", value_parser = crate::at_least(1u32))]
    pub replicas: Option<u32>,
    /// Queue that receives this queue's dead messages (rejected, past --max-deliveries,
    /// expired); declare it first. Without one (or while it does not exist), dead messages
    /// are dropped.
    #[arg(long, value_name = "QUEUE")]
    pub dead_letter: Option<String>,
    /// Exchange that dead messages are published to (besides --dead-letter, if both are set).
    #[arg(long, value_name = "EXCHANGE")]
    pub dead_letter_exchange: Option<String>,
    /// Routing key of dead messages published to --dead-letter-exchange (default: their own).
    #[arg(long, value_name = "KEY", requires = "dead_letter_exchange")]
    pub dead_letter_routing_key: Option<String>,
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
    /// Most messages waiting in the queue (ready and delayed); see --overflow.
    #[arg(long, value_name = "N", value_parser = crate::at_least(1u64))]
    pub max_length: Option<u64>,
    /// Most body bytes waiting in the queue; see --overflow.
    #[arg(long, value_name = "N", value_parser = crate::at_least(1u64))]
    pub max_bytes: Option<u64>,
    /// What a full queue does with a new message: refuse the publish, or let the oldest
    /// waiting message die (reason maxlen, dead-lettered if the queue has a dead-letter queue).
    #[arg(long, value_enum, default_value_t = OverflowArg::RejectPublish)]
    pub overflow: OverflowArg,
    /// Raise the queue's alarm while more than N messages are ready (set after declaring;
    /// like `queue alarm`).
    #[arg(long, value_name = "N", value_parser = crate::at_least(1u64))]
    pub alarm_depth: Option<u64>,
}

/// `--overflow` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OverflowArg {
    /// Refuse publishes to a full queue (RESOURCE_LIMIT).
    RejectPublish,
    /// Accept them; the oldest waiting messages die with reason maxlen.
    DropHead,
}

impl From<OverflowArg> for Overflow {
    fn from(arg: OverflowArg) -> Self {
        match arg {
            OverflowArg::RejectPublish => Overflow::RejectPublish,
            OverflowArg::DropHead => Overflow::DropHead,
        }
    }
}

impl DeclareArgs {
    /// The queue settings the flags ask for.
    pub fn options(&self) -> QueueOptions {
        QueueOptions {
            durable: self.durable,
            replicated: self.replicated || self.replicas.is_some(),
            replicas: self.replicas,
            dead_letter: self.dead_letter.clone(),
            dead_letter_exchange: self.dead_letter_exchange.clone(),
            dead_letter_routing_key: self.dead_letter_routing_key.clone(),
            max_deliveries: self.max_deliveries,
            retry_backoff: self.retry_backoff.clone(),
            message_ttl: self.message_ttl,
            ack_timeout: self.ack_timeout,
            max_length: self.max_length,
            max_bytes: self.max_bytes,
            overflow: self.overflow.into(),
        }
    }
}

/// Flags of `queue alarm`.
#[derive(Debug, Args)]
pub struct AlarmArgs {
    /// Name of the queue.
    pub name: String,
    /// Raise the alarm while more than this many messages are ready; 0 clears the alarm.
    #[arg(long, value_name = "N")]
    pub depth: u64,
}

/// Flags of `queue peek`.
#[derive(Debug, Args)]
pub struct PeekArgs {
    /// Name of the queue.
    pub queue: String,
    /// Most messages to print, from the head of the queue (the broker returns at most 10000).
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = crate::at_least(1u32))]
    pub count: u32,
    /// Print one JSON object per message instead of the body.
    #[arg(long)]
    pub json: bool,
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
    /// dead_letter, max_deliveries, retry_backoff_ms, message_ttl_ms, ack_timeout_ms,
    /// max_length, max_bytes, overflow, waiting_bytes, alarm_depth (null when unset), alarm,
    /// replicated and served_by (the node serving a replicated queue; null otherwise).
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
    /// max_deliveries, retry_backoff_ms, message_ttl_ms, ack_timeout_ms, max_length,
    /// max_bytes, overflow, waiting_bytes, alarm_depth (null when unset), alarm, replicated
    /// and served_by (the node serving a replicated queue; null otherwise).
    #[arg(long)]
    pub json: bool,
}

/// Runs a `queue` subcommand against the broker at `server`.
pub async fn run(server: &str, command: QueueCommand) -> anyhow::Result<()> {
    // A move is followed as it runs rather than answered in one go.
    if let QueueCommand::Move(args) = command {
        return crate::moves::run(server, args).await;
    }
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
            if let Some(depth) = args.alarm_depth {
                conn.set_alarm(&args.name, Some(depth)).await?;
            }
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
            let (queues, status) = tokio::join!(conn.list_queues(), conn.status());
            let mut queues = queues?;
            queues.sort_by(|a, b| a.name.cmp(&b.name));
            // The block is a hint next to the list; a broker that cannot tell does not fail it.
            let blocked = status.ok().and_then(|status| status.blocked);
            if args.json {
                if let Some(reason) = blocked {
                    eprint!("hopper: {}", output::blocked_line(&reason));
                }
                output::queues_json(&queues)? + "\n"
            } else {
                blocked.as_deref().map(output::blocked_line).unwrap_or_default()
                    + &output::queue_table(&queues)
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
        QueueCommand::Alarm(args) => {
            conn.set_alarm(&args.name, Some(args.depth)).await?;
            if args.depth == 0 {
                format!("alarm of '{}' cleared\n", args.name)
            } else {
                format!("alarm of '{}' set to ready > {}\n", args.name, args.depth)
            }
        }
        QueueCommand::Peek(args) => {
            let messages = conn.peek(&args.queue, args.count).await?;
            output::peeked(&messages, &args.queue, args.json)?
        }
        QueueCommand::Moves(args) => crate::moves::list(conn, &args).await?,
        QueueCommand::Move(_) => unreachable!("moves are followed by crate::moves::run"),
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
                ..Default::default()
            }
        );
        let plain = Wrapper::try_parse_from(["x", "q"]).unwrap();
        assert_eq!(plain.args.options(), QueueOptions::default());
        assert_eq!(plain.args.alarm_depth, None);
    }

    #[test]
    fn bounded_queue_flags_become_queue_settings() {
        use clap::Parser;
        let parsed = Wrapper::try_parse_from([
            "x",
            "q",
            "--max-length",
            "7",
            "--max-bytes",
            "4096",
            "--overflow",
            "drop-head",
            "--alarm-depth",
            "100",
        ])
        .unwrap();
        let options = parsed.args.options();
        assert_eq!((options.max_length, options.max_bytes), (Some(7), Some(4096)));
        assert_eq!(options.overflow, Overflow::DropHead);
        assert_eq!(parsed.args.alarm_depth, Some(100));
        let rejecting = Wrapper::try_parse_from(["x", "q", "--overflow", "reject-publish"]).unwrap();
        assert_eq!(rejecting.args.options().overflow, Overflow::RejectPublish);
        assert!(Wrapper::try_parse_from(["x", "q", "--overflow", "drop-tail"]).is_err());
        assert!(Wrapper::try_parse_from(["x", "q", "--max-length", "0"]).is_err());
    }

    #[test]
    fn bad_declare_flags_are_refused() {
        use clap::Parser;
        assert!(Wrapper::try_parse_from(["x", "q", "--max-deliveries", "0"]).is_err());
        assert!(Wrapper::try_parse_from(["x", "q", "--retry-backoff", "1s,,2s"]).is_err());
        assert!(Wrapper::try_parse_from(["x", "q", "--ack-timeout", "1x"]).is_err());
    }
}
