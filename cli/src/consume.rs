//! `hopper consume`: print the messages of a queue, one per line, and settle each as asked.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use futures::{Stream, StreamExt};
use hopper_client::{ConsumeOptions, Delivery, NackOptions};

use crate::output;
use crate::shutdown::Shutdown;
use crate::time::parse_duration;

/// Flags of `consume`.
#[derive(Debug, Args)]
#[command(after_help = "\
Each message is printed on its own line as soon as it arrives (stdout is flushed per line): the \
body as text (invalid UTF-8 becomes U+FFFD), or with --json an object with keys body, headers, \
redelivered, delivery_count, queue, message_id, content_type, published_at_ms, delivery_tag, \
death, deaths and replay_count. `deaths` lists every time the message died (it came through a \
dead-letter queue), oldest first, each an object with keys reason, queue, count, error, \
first_time, last_time and died_at (times in Unix milliseconds); `death` is the latest of them, \
or null. `replay_count` counts the times the message was moved out of a queue \
(`hopper queue move`).

Without --count, runs until Ctrl-C or SIGTERM, then cancels the consumer (the broker requeues \
whatever was not acknowledged) and exits 0.

With several brokers of a cluster in --server (a,b,c), consume rides out the loss of its broker: \
it reconnects to the next one that answers, with backoff, and subscribes again; a replicated \
queue is consumed on the node that serves it, wherever consume connected. A message printed but \
not yet acked when a broker goes away is delivered again, flagged redelivered.")]
pub struct ConsumeArgs {
    /// Queue to consume from.
    pub queue: String,
    /// Most unacknowledged messages the broker sends ahead (0 = no limit).
    #[arg(long, default_value_t = 10)]
    pub prefetch: u32,
    /// Exit after this many messages.
    #[arg(long, value_parser = crate::at_least(1u64))]
    pub count: Option<u64>,
    /// What to do with each message once it is printed.
    #[arg(long, value_enum, default_value_t = Action::Ack)]
    pub action: Action,
    /// Why processing failed, sent with --action requeue or reject; it stays with the message
    /// (its death record, should it die, and the audit trail).
    #[arg(long, value_name = "TEXT")]
    pub error: Option<String>,
    /// Ack timeout of this consumer (e.g. 30s), instead of the queue's: a message not settled
    /// in time goes back to the queue as a failed delivery.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub ack_timeout: Option<Duration>,
    /// Print one JSON object per message instead of the body.
    #[arg(long)]
    pub json: bool,
}

/// How `consume` settles a delivery after printing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Action {
    /// Acknowledge: the message is done.
    Ack,
    /// Negative-acknowledge with requeue: the message goes back to the queue (after the
    /// queue's retry backoff), or dies once past its delivery limit.
    Requeue,
    /// Reject without requeue: the message dies (moved to the dead-letter queue, or dropped).
    Reject,
    /// Never settle while running; the broker requeues the messages when the consumer ends.
    Hold,
}

impl Action {
    /// Checks that an `--error` text goes with an action that sends it.
    pub fn check_error(self, error: Option<&str>) -> anyhow::Result<()> {
        if error.is_some() && !matches!(self, Action::Requeue | Action::Reject) {
            let name = self.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default();
            bail!("--error is sent with --action requeue or reject, not with --action {name}");
        }
        Ok(())
    }

    /// Settles a printed delivery this way, with `error` as the reason for a requeue or reject.
    pub async fn settle(self, delivery: &Delivery, error: Option<&str>) -> hopper_client::Result<()> {
        match self {
            Action::Ack => delivery.ack().await,
            Action::Requeue => {
                let error = error.unwrap_or_default().to_string();
                delivery.nack_with(true, NackOptions { error, ..Default::default() }).await
            }
            Action::Reject => delivery.reject_with(error.unwrap_or_default()).await,
            Action::Hold => Ok(()),
        }
    }
}

/// Runs `consume` against the broker at `server`.
pub async fn run(server: &str, args: ConsumeArgs) -> anyhow::Result<()> {
    args.action.check_error(args.error.as_deref())?;
    // Installed before anything else so that a signal at any point ends the run cleanly.
    let mut shutdown = Shutdown::install()?;
    let options = ConsumeOptions {
        prefetch: prefetch_for(args.prefetch, args.count),
        tag: "hopper consume".into(),
        ack_timeout: args.ack_timeout,
        // Exactly --count deliveries: settling one must not pull in a message this run will
        // not print (its cancel would count that as a failed delivery).
        limit: args.count,
        ..Default::default()
    };
    if server.contains(',') {
        let client = crate::connect_recovering(server, "consume").await?;
        let result = match client.consume(&args.queue, options).await {
            Ok(mut consumer) => {
                let received = receive(&mut consumer, &args, &mut shutdown).await;
                consumer.cancel().await;
                received
            }
            Err(err) => Err(err.into()),
        };
        let closed = client.close().await;
        result?;
        closed?;
        return Ok(());
    }
    let conn = crate::connect(server, "consume").await?;
    let result = match conn.consume(&args.queue, options).await {
        Ok(mut consumer) => match receive(&mut consumer, &args, &mut shutdown).await {
            // Cancelling returns anything held or prefetched but not yet printed to the queue.
            Ok(()) => consumer.cancel().await.map_err(Into::into),
            Err(err) => Err(err),
        },
        Err(err) => Err(err.into()),
    };
    // Closing sends whatever is still queued, such as the ack of the last message printed,
    // even when printing failed.
    let closed = conn.close().await;
    result?;
    closed?;
    Ok(())
}

/// Prints and settles deliveries until `--count` is reached or a signal arrives.
async fn receive<S>(consumer: &mut S, args: &ConsumeArgs, shutdown: &mut Shutdown) -> anyhow::Result<()>
where
    S: Stream<Item = hopper_client::Result<Delivery>> + Unpin,
{
    let mut out = std::io::stdout();
    let mut received = 0u64;
    while args.count != Some(received) {
        let delivery = tokio::select! {
            next = consumer.next() => match next {
                Some(delivery) => delivery?,
                None => bail!("the consumer of '{}' ended", args.queue),
            },
            signal = shutdown.recv() => {
                signal?;
                break;
            }
        };
        output::write_delivery(&mut out, &delivery, args.json).context("writing to stdout")?;
        args.action.settle(&delivery, args.error.as_deref()).await?;
        received += 1;
    }
    Ok(())
}

/// The prefetch to ask for: with `--count`, never more than the messages wanted, so that
/// fewer surplus deliveries have to be returned to the queue at exit.
fn prefetch_for(prefetch: u32, count: Option<u64>) -> u32 {
    let Some(count) = count else { return prefetch };
    let count = u32::try_from(count).unwrap_or(u32::MAX);
    if prefetch == 0 {
        count
    } else {
        prefetch.min(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_never_exceeds_the_count() {
        assert_eq!(prefetch_for(10, None), 10);
        assert_eq!(prefetch_for(0, None), 0);
        assert_eq!(prefetch_for(10, Some(3)), 3);
        assert_eq!(prefetch_for(10, Some(50)), 10);
        assert_eq!(prefetch_for(0, Some(5)), 5);
        assert_eq!(prefetch_for(0, Some(u64::MAX)), u32::MAX);
    }

    #[test]
    fn actions_parse_from_their_names() {
        for (name, action) in [
            ("ack", Action::Ack),
            ("requeue", Action::Requeue),
            ("reject", Action::Reject),
            ("hold", Action::Hold),
        ] {
            assert_eq!(Action::from_str(name, false).unwrap(), action);
        }
        assert!(Action::from_str("drop", false).is_err());
    }

    #[test]
    fn an_error_text_needs_an_action_that_sends_it() {
        assert!(Action::Requeue.check_error(Some("boom")).is_ok());
        assert!(Action::Reject.check_error(Some("boom")).is_ok());
        assert!(Action::Ack.check_error(None).is_ok());
        let err = Action::Ack.check_error(Some("boom")).unwrap_err().to_string();
        assert!(err.ends_with("not with --action ack"), "{err}");
        assert!(Action::Hold.check_error(Some("boom")).is_err());
    }

    #[test]
    fn failure_flags_parse() {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: ConsumeArgs,
        }
        let parsed = Wrapper::try_parse_from([
            "x",
            "q",
            "--action",
            "requeue",
            "--error",
            "smtp timeout",
            "--ack-timeout",
            "1.5s",
        ])
        .unwrap();
        assert_eq!(parsed.args.error.as_deref(), Some("smtp timeout"));
        assert_eq!(parsed.args.ack_timeout, Some(Duration::from_millis(1500)));
        assert!(Wrapper::try_parse_from(["x", "q", "--ack-timeout", "soon"]).is_err());
    }
}
