//! `hopper audit`: print the broker's audit trail of dead messages.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::output;
use crate::time::{now_ms, parse_duration};

/// Flags of `audit`.
#[derive(Debug, Args)]
#[command(after_help = "\
Every message that died — rejected, past its delivery limit, expired, or pushed out by a \
length limit — is one event, oldest first: a table with columns TIME (RFC 3339, UTC), QUEUE \
(where it died), MESSAGE_ID, REASON, COUNT (its deliveries there), ERROR (its consumer's last \
error text, first line) and DLQ (where it went; - when it was dropped). With --json, one object \
per line with keys time_ms, queue, message_id, reason, count, consumer_id, connection_id, error \
and dead_letter (null when dropped).")]
pub struct AuditArgs {
    /// Only messages that died in this queue.
    #[arg(long, value_name = "QUEUE")]
    pub queue: Option<String>,
    /// Only events from this long ago until now (e.g. 1h, 30m).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub since: Option<Duration>,
    /// Most events to print: the latest ones.
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = crate::at_least(1u32))]
    pub limit: u32,
    /// Print one JSON object per event instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `audit` against the broker at `server`.
pub async fn run(server: &str, args: AuditArgs) -> anyhow::Result<()> {
    let conn = crate::connect(server, "audit").await?;
    let since_ms = since_ms(args.since, now_ms());
    let result = conn.audit(args.queue.as_deref(), since_ms, args.limit).await;
    // Closing is a courtesy; its failure must not hide the command's own result.
    let _ = conn.close().await;
    let events = result?;
    let mut out = std::io::stdout().lock();
    if args.json {
        for event in &events {
            output::write_json_line(&mut out, &event.to_json()).context("writing to stdout")?;
        }
    } else {
        out.write_all(output::audit_table(&events).as_bytes()).context("writing to stdout")?;
    }
    out.flush().context("writing to stdout")?;
    Ok(())
}

/// The earliest event time to ask for: `since` before `now_ms`, or everything.
fn since_ms(since: Option<Duration>, now_ms: u64) -> u64 {
    let ago = since.map_or(u64::MAX, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    now_ms.saturating_sub(ago)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn since_counts_back_from_now() {
        assert_eq!(since_ms(Some(Duration::from_secs(3600)), 10_000_000), 6_400_000);
        assert_eq!(since_ms(None, 10_000_000), 0, "no --since means everything");
        assert_eq!(since_ms(Some(Duration::from_secs(u64::MAX)), 5), 0);
    }

    #[test]
    fn flags_parse() {
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: AuditArgs,
        }
        let parsed =
            Wrapper::try_parse_from(["x", "--queue", "jobs", "--since", "1h", "--limit", "5", "--json"])
                .unwrap();
        assert_eq!(parsed.args.queue.as_deref(), Some("jobs"));
        assert_eq!(parsed.args.since, Some(Duration::from_secs(3600)));
        assert_eq!((parsed.args.limit, parsed.args.json), (5, true));
        let plain = Wrapper::try_parse_from(["x"]).unwrap();
        assert_eq!((plain.args.queue, plain.args.since, plain.args.limit), (None, None, 1000));
    }
}
