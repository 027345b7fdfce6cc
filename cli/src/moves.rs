//! `hopper queue move` and `hopper queue moves`: start a move (redrive) and follow it with a
//! progress bar, cancel one, list them.

use std::time::Duration;

use anyhow::{anyhow, bail};
use clap::Args;
use hopper_client::{Connection, MoveInfo, MoveOptions};
use indicatif::{ProgressBar, ProgressState, ProgressStyle};

use crate::output;
use crate::shutdown::Shutdown;
use crate::time::now_ms;

/// How often a followed move's progress is asked for.
const POLL_EVERY: Duration = Duration::from_millis(200);
/// How long `--cancel` waits for the move to wind down before it reports.
const CANCEL_PATIENCE: Duration = Duration::from_secs(10);

/// Flags of `queue move`.
#[derive(Debug, Args)]
#[command(after_help = "\
The move runs inside the broker: from the head of SOURCE, every waiting message that matches \
--filter goes to --to, or without --to back to the queue it last died in (messages without one \
are skipped and stay). A moved message keeps its id, body, headers and deaths; its replay_count \
goes up by one.

While the move runs, a progress bar on stderr shows moved/total, the rate and the time left \
(no bar when stderr is not a terminal). At the end stdout gets one line: `moved N messages from \
SOURCE to DEST (skipped K) in X.Ys: STATE`, and the exit status is non-zero if the move failed. \
Ctrl-C stops following, not the move: it keeps running in the broker (`--cancel ID` stops it).")]
pub struct MoveArgs {
    /// Queue to take messages from (typically a dead-letter queue).
    #[arg(required_unless_present = "cancel")]
    pub source: Option<String>,
    /// Queue to put them in; without it, each goes back to the queue it last died in.
    #[arg(long, value_name = "QUEUE")]
    pub to: Option<String>,
    /// Most messages per second.
    #[arg(long, value_name = "N", value_parser = crate::at_least(1u32))]
    pub rate: Option<u32>,
    /// Stop after this many messages (e.g. 10 to try a few before moving all).
    #[arg(long, value_name = "N", value_parser = crate::at_least(1u64))]
    pub limit: Option<u64>,
    /// Only messages with this header value, or, for the keys reason, queue, error and count,
    /// this value in their latest death (e.g. reason=expired).
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_filter)]
    pub filter: Option<(String, String)>,
    /// Without --to: send each message back through the exchange and routing key it had when
    /// it died, instead of to the queue it died in.
    #[arg(long, conflicts_with = "to")]
    pub through_exchange: bool,
    /// Print the move's id and return at once instead of following it.
    #[arg(long)]
    pub detach: bool,
    /// Stop the running move with this id (see `hopper queue moves`) and print where it got.
    #[arg(long, value_name = "ID", conflicts_with_all = ["source", "to", "rate", "limit", "filter", "detach"])]
    pub cancel: Option<u64>,
}

impl MoveArgs {
    /// The move the flags ask for; `None` with `--cancel`.
    pub fn options(&self) -> Option<MoveOptions> {
        Some(MoveOptions {
            source: self.source.clone()?,
            destination: self.to.clone(),
            rate: self.rate,
            limit: self.limit,
            filter: self.filter.clone(),
            through_exchange: self.through_exchange,
        })
    }
}

/// Flags of `queue moves`.
#[derive(Debug, Args)]
pub struct MovesArgs {
    /// Print a JSON array of objects with keys id, source, destination, rate, limit,
    /// filter_key, filter_value (null when unset), state, moved, skipped, remaining, error,
    /// started_ms and finished_ms (null while running).
    #[arg(long)]
    pub json: bool,
}

/// Parses a `KEY=VALUE` filter; the value may contain `=`, the key may not be empty.
pub fn parse_filter(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        Some(_) => Err(format!("the key is empty in '{text}'")),
        None => Err(format!("expected KEY=VALUE, got '{text}'")),
    }
}

/// Runs `queue move` against the broker at `server`.
pub async fn run(server: &str, args: MoveArgs) -> anyhow::Result<()> {
    // Installed first, so that Ctrl-C while following never kills the process mid-line.
    let mut shutdown = Shutdown::install()?;
    let conn = crate::connect(server, "move").await?;
    let result = match (args.cancel, args.options()) {
        (Some(id), _) => cancel(&conn, id).await,
        (None, Some(options)) if args.detach => {
            let started = conn.start_move(options).await;
            started.map(|m| println!("started move {}", m.id)).map_err(anyhow::Error::from)
        }
        (None, Some(options)) => follow(&conn, options, &mut shutdown).await,
        (None, None) => Err(anyhow!("a SOURCE queue is needed")),
    };
    // Closing is a courtesy; its failure must not hide the command's own result.
    let _ = conn.close().await;
    result
}

/// Starts the move and shows its progress until it ends or Ctrl-C.
async fn follow(conn: &Connection, options: MoveOptions, shutdown: &mut Shutdown) -> anyhow::Result<()> {
    let started = conn.start_move(options).await?;
    let id = started.id;
    // Draws on stderr, and nothing at all when stderr is not a terminal.
    let bar = ProgressBar::new(started.expected_total());
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} move {prefix} [{bar:30}] {pos}/{len} {rate} ETA {eta} {wide_msg}",
        )
        .expect("the template is valid")
        .with_key("rate", |state: &ProgressState, out: &mut dyn std::fmt::Write| {
            let _ = write!(out, "{:.0}/s", state.per_sec());
        })
        .progress_chars("=> "),
    );
    bar.set_prefix(id.to_string());
    bar.set_message(format!("{} -> {}", started.source, output::move_destination(&started)));
    bar.enable_steady_tick(Duration::from_millis(100));
    let mut latest = started;
    let mut ticker = tokio::time::interval(POLL_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while latest.state.is_running() {
        tokio::select! {
            _ = ticker.tick() => {}
            signal = shutdown.recv() => {
                signal?;
                bar.abandon();
                eprintln!(
                    "hopper: stopped following move {id}; it keeps running in the broker \
                     (`hopper queue move --cancel {id}` stops it)"
                );
                return Ok(());
            }
        }
        latest = find(conn, id).await?;
        bar.set_length(latest.expected_total().max(latest.moved));
        bar.set_position(latest.moved);
    }
    bar.finish_and_clear();
    report(&latest)
}

/// Cancels move `id`, waits (a little) for it to wind down, and reports where it got.
async fn cancel(conn: &Connection, id: u64) -> anyhow::Result<()> {
    let mut latest = conn.cancel_move(id).await?;
    let deadline = tokio::time::Instant::now() + CANCEL_PATIENCE;
    while latest.state.is_running() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(POLL_EVERY).await;
        latest = find(conn, id).await?;
    }
    report(&latest)
}

/// The current state of move `id`.
async fn find(conn: &Connection, id: u64) -> anyhow::Result<MoveInfo> {
    let moves = conn.list_moves().await?;
    moves.into_iter().find(|m| m.id == id).ok_or_else(|| anyhow!("the broker no longer knows move {id}"))
}

/// Prints the summary line; a failed move is an error.
fn report(info: &MoveInfo) -> anyhow::Result<()> {
    println!("{}", output::move_summary(info, now_ms()));
    if info.state == hopper_client::MoveState::Failed {
        bail!("move {} failed: {}", info.id, info.error);
    }
    Ok(())
}

/// Renders `queue moves`: a table, or with `--json` an array.
pub async fn list(conn: &Connection, args: &MovesArgs) -> anyhow::Result<String> {
    let moves = conn.list_moves().await?;
    Ok(if args.json { output::moves_json(&moves)? + "\n" } else { output::moves_table(&moves, now_ms()) })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: MoveArgs,
    }

    #[test]
    fn filters_split_at_the_first_equals_sign() {
        assert_eq!(parse_filter("reason=expired"), Ok(("reason".into(), "expired".into())));
        assert_eq!(parse_filter("k=a=b"), Ok(("k".into(), "a=b".into())));
        assert!(parse_filter("=x").unwrap_err().contains("empty"));
        assert!(parse_filter("reason").unwrap_err().contains("KEY=VALUE"));
    }

    #[test]
    fn move_flags_become_move_options() {
        let parsed = Wrapper::try_parse_from([
            "x",
            "q.dead",
            "--to",
            "q",
            "--rate",
            "50",
            "--limit",
            "10",
            "--filter",
            "reason=expired",
        ])
        .unwrap();
        assert_eq!(
            parsed.args.options(),
            Some(MoveOptions {
                source: "q.dead".into(),
                destination: Some("q".into()),
                rate: Some(50),
                limit: Some(10),
                filter: Some(("reason".into(), "expired".into())),
                through_exchange: false,
            })
        );
        let plain = Wrapper::try_parse_from(["x", "q.dead"]).unwrap();
        assert_eq!(plain.args.options(), Some(MoveOptions { source: "q.dead".into(), ..Default::default() }));
    }

    #[test]
    fn cancel_stands_alone() {
        let parsed = Wrapper::try_parse_from(["x", "--cancel", "3"]).unwrap();
        assert_eq!((parsed.args.cancel, parsed.args.options()), (Some(3), None));
        assert!(Wrapper::try_parse_from(["x", "q.dead", "--cancel", "3"]).is_err());
        assert!(Wrapper::try_parse_from(["x"]).is_err(), "a source or --cancel is needed");
        assert!(Wrapper::try_parse_from(["x", "q.dead", "--rate", "0"]).is_err());
        assert!(Wrapper::try_parse_from(["x", "q.dead", "--filter", "nokey"]).is_err());
    }
}
