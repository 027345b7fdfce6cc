//! `hopper get`: pull messages from a queue once, print them like `consume` does, and settle
//! each as asked.

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use hopper_client::{Connection, GetOptions};

use crate::consume::Action;
use crate::output;
use crate::queue::messages;
use crate::time::parse_duration;

/// Flags of `get`.
#[derive(Debug, Args)]
#[command(after_help = "\
Messages are printed exactly as `hopper consume` prints them (see its --help for the --json \
keys). When none came, stderr says so and the exit status is still 0.

Pulled messages stay invisible to other consumers for the visibility timeout. With --action \
hold they are not settled: they return to the queue as failed deliveries when the visibility \
timeout passes or, at the latest, when this command disconnects.")]
pub struct GetArgs {
    /// Queue to pull from.
    pub queue: String,
    /// Most messages to pull.
    #[arg(long, default_value_t = 1, value_parser = crate::at_least(1u32))]
    pub count: u32,
    /// How long the pulled messages stay invisible to others (default: the broker's, 30s).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub visibility: Option<Duration>,
    /// When the queue is empty, wait this long (at most 20s) for a message.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub wait: Option<Duration>,
    /// What to do with each message once it is printed.
    #[arg(long, value_enum, default_value_t = Action::Ack)]
    pub action: Action,
    /// Why processing failed, sent with --action requeue or reject.
    #[arg(long, value_name = "TEXT")]
    pub error: Option<String>,
    /// Print one JSON object per message instead of the body.
    #[arg(long)]
    pub json: bool,
}

/// Runs `get` against the broker at `server`.
pub async fn run(server: &str, args: GetArgs) -> anyhow::Result<()> {
    args.action.check_error(args.error.as_deref())?;
    let conn = crate::connect(server, "get").await?;
    let result = pull(&conn, &args).await;
    // Closing sends the settles still queued, even when printing failed.
    let closed = conn.close().await;
    result?;
    closed?;
    Ok(())
}

/// Pulls once, then prints and settles what came.
async fn pull(conn: &Connection, args: &GetArgs) -> anyhow::Result<()> {
    let options = GetOptions { count: args.count, visibility: args.visibility, wait: args.wait };
    let deliveries = conn.get(&args.queue, options).await?;
    if deliveries.is_empty() {
        eprintln!("no messages in '{}'", args.queue);
        return Ok(());
    }
    let mut out = std::io::stdout();
    for delivery in &deliveries {
        output::write_delivery(&mut out, delivery, args.json).context("writing to stdout")?;
        args.action.settle(delivery, args.error.as_deref()).await?;
    }
    if args.action == Action::Hold {
        let n = deliveries.len() as u64;
        eprintln!("held {n} {} from '{}' without settling", messages(n), args.queue);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: GetArgs,
    }

    #[test]
    fn defaults_pull_one_message_and_ack_it() {
        let parsed = Wrapper::try_parse_from(["x", "q"]).unwrap();
        assert_eq!((parsed.args.count, parsed.args.action), (1, Action::Ack));
        assert_eq!((parsed.args.visibility, parsed.args.wait), (None, None));
        assert!(!parsed.args.json && parsed.args.error.is_none());
    }

    #[test]
    fn flags_parse() {
        let parsed = Wrapper::try_parse_from([
            "x",
            "q",
            "--count",
            "5",
            "--visibility",
            "2m",
            "--wait",
            "5s",
            "--action",
            "reject",
            "--error",
            "bad",
            "--json",
        ])
        .unwrap();
        assert_eq!(parsed.args.count, 5);
        assert_eq!(parsed.args.visibility, Some(Duration::from_secs(120)));
        assert_eq!(parsed.args.wait, Some(Duration::from_secs(5)));
        assert_eq!((parsed.args.action, parsed.args.error.as_deref()), (Action::Reject, Some("bad")));
        assert!(Wrapper::try_parse_from(["x", "q", "--count", "0"]).is_err());
        assert!(Wrapper::try_parse_from(["x", "q", "--action", "hold"]).is_ok());
    }
}
