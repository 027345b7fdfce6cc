//! `hopper top`: a live view of the queues — depths, consumers, publish/deliver/ack rates per
//! second and alarms — refreshed every interval, with the broker's flow-control state on top.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use hopper_client::{Connection, QueueInfo};
use tokio::time::Instant;

use crate::output::{self, TopFrame};
use crate::shutdown::Shutdown;
use crate::time::{format_duration, format_unix_ms, now_ms, parse_duration};

/// Moves the cursor home and clears the screen.
const CLEAR_SCREEN: &str = "\x1b[H\x1b[2J";

/// Flags of `top`.
#[derive(Debug, Args)]
#[command(after_help = "\
Rates are per second, from the change of each queue's counters over the last interval (- for a \
queue that just appeared). On a terminal the screen is redrawn in place; otherwise frames follow \
one another, separated by a blank line. Runs until Ctrl-C or SIGTERM.")]
pub struct TopArgs {
    /// Time between refreshes (e.g. 500ms, 2s).
    #[arg(long, value_name = "DUR", default_value = "1s", value_parser = parse_interval)]
    pub interval: Duration,
    /// Print a single frame (sampling twice, one interval apart, for the rates) and exit;
    /// the screen is not cleared.
    #[arg(long)]
    pub once: bool,
}

/// An interval of at least 100 ms: below that the view only loads the broker.
fn parse_interval(text: &str) -> Result<Duration, String> {
    let interval = parse_duration(text)?;
    if interval < Duration::from_millis(100) {
        return Err("must be at least 100ms".to_string());
    }
    Ok(interval)
}

/// Runs `top` against the broker at `server`.
pub async fn run(server: &str, args: TopArgs) -> anyhow::Result<()> {
    let mut shutdown = Shutdown::install()?;
    let conn = crate::connect(server, "top").await?;
    let result = watch(&conn, server, &args, &mut shutdown).await;
    // Closing is a courtesy; its failure must not hide the command's own result.
    let _ = conn.close().await;
    result
}

async fn watch(
    conn: &Connection,
    server: &str,
    args: &TopArgs,
    shutdown: &mut Shutdown,
) -> anyhow::Result<()> {
    let redraw = !args.once && std::io::stdout().is_terminal();
    let mut previous = conn.list_queues().await?;
    let mut sampled_at = Instant::now();
    let mut frames = 0u64;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(sampled_at + args.interval) => {}
            signal = shutdown.recv() => return signal,
        }
        let (queues, status) = tokio::join!(conn.list_queues(), conn.status());
        let current: Vec<QueueInfo> = queues?;
        let blocked = status?.blocked;
        let now = Instant::now();
        let title = format!(
            "hopper top: {server} at {}, every {}",
            format_unix_ms(now_ms()),
            format_duration(args.interval)
        );
        let frame = output::top_frame(&TopFrame {
            previous: &previous,
            current: &current,
            elapsed: now - sampled_at,
            title: &title,
            blocked: blocked.as_deref(),
        });
        let mut out = std::io::stdout().lock();
        let separator = match (redraw, frames) {
            (true, _) => CLEAR_SCREEN,
            (false, 0) => "",
            (false, _) => "\n",
        };
        write!(out, "{separator}{frame}").context("writing to stdout")?;
        out.flush().context("writing to stdout")?;
        drop(out);
        frames += 1;
        if args.once {
            return Ok(());
        }
        previous = current;
        sampled_at = now;
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: TopArgs,
    }

    #[test]
    fn interval_defaults_to_a_second_and_has_a_floor() {
        let plain = Wrapper::try_parse_from(["x"]).unwrap();
        assert_eq!((plain.args.interval, plain.args.once), (Duration::from_secs(1), false));
        let fast = Wrapper::try_parse_from(["x", "--interval", "250ms", "--once"]).unwrap();
        assert_eq!((fast.args.interval, fast.args.once), (Duration::from_millis(250), true));
        assert!(Wrapper::try_parse_from(["x", "--interval", "10ms"]).is_err());
        assert!(Wrapper::try_parse_from(["x", "--interval", "soon"]).is_err());
    }
}
