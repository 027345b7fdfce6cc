//! `hopper events`: print the broker's events — depth alarms, publisher blocks, moves — as they
//! happen, until Ctrl-C.

use std::io::Write;

use anyhow::{bail, Context};
use clap::Args;
use futures::StreamExt;
use hopper_client::Error;

use crate::output::{self, EventJson};
use crate::shutdown::Shutdown;

/// Flags of `events`.
#[derive(Debug, Args)]
#[command(after_help = "\
Each event is one line as it happens: the time (RFC 3339, UTC), the kind (alarm_raised, \
alarm_cleared, publishers_blocked, publishers_unblocked, move_started, move_ended), the queue \
(- for broker-wide events), a value (the ready depth for alarms, the move id for moves) and a \
detail. With --json, one object per line with keys time_ms, kind, queue (null for none), value \
and detail. Past events are not shown. Runs until Ctrl-C or SIGTERM, then exits 0.")]
pub struct EventsArgs {
    /// Print one JSON object per event instead of a line of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `events` against the broker at `server`.
pub async fn run(server: &str, args: EventsArgs) -> anyhow::Result<()> {
    let mut shutdown = Shutdown::install()?;
    let conn = crate::connect(server, "events").await?;
    let result = print_events(&conn, &args, &mut shutdown).await;
    // Closing is a courtesy; its failure must not hide the command's own result.
    let _ = conn.close().await;
    result
}

async fn print_events(
    conn: &hopper_client::Connection,
    args: &EventsArgs,
    shutdown: &mut Shutdown,
) -> anyhow::Result<()> {
    let mut events = conn.subscribe_events().await?;
    let mut out = std::io::stdout();
    loop {
        let event = tokio::select! {
            next = events.next() => match next {
                Some(Ok(event)) => event,
                Some(Err(Error::EventsMissed(missed))) => {
                    eprintln!("hopper: {missed} events were missed (printing fell behind)");
                    continue;
                }
                Some(Err(err)) => return Err(err.into()),
                None => bail!("the broker ended the event stream"),
            },
            signal = shutdown.recv() => return signal,
        };
        if args.json {
            output::write_json_line(&mut out, &EventJson::from(&event)).context("writing to stdout")?;
        } else {
            writeln!(out, "{}", output::event_line(&event)).context("writing to stdout")?;
        }
        // One line per event, seen at once even through a pipe.
        out.flush().context("writing to stdout")?;
    }
}
