//! `hopper publish`: send messages from arguments or stdin, pipelined, and wait for every
//! publish confirm.

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use clap::Args;
use hopper_client::{Connection, PublishConfirm, PublishOptions};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::queue::messages;
use crate::time::parse_duration;

/// Most publishes awaiting their confirm at once.
const MAX_IN_FLIGHT: usize = 1000;

/// Flags of `publish`.
#[derive(Debug, Args)]
#[command(after_help = "\
Every body given is one message. Without bodies, each line of stdin is one message (the \
trailing \\n or \\r\\n is removed; empty lines are published as empty messages).

On success `published N messages to 'QUEUE'` goes to stderr, so stdout stays empty. \
The exit status is 0 only when the broker confirmed every message; otherwise stderr says how \
many were not confirmed and why (e.g. RESOURCE_LIMIT when a bounded queue is full).

While the broker blocks publishers (its memory or disk is short), stderr says so once and \
publishing waits until the block ends.")]
pub struct PublishArgs {
    /// Queue to publish to (it must exist); with --exchange, the first body.
    #[arg(value_name = "QUEUE")]
    pub queue: String,
    /// Message bodies, one message each; without any, stdin is read line by line.
    #[arg(value_name = "BODY")]
    pub bodies: Vec<String>,
    /// Publish through this exchange instead of to a queue; then every argument is a body.
    #[arg(long, value_name = "EXCHANGE")]
    pub exchange: Option<String>,
    /// The routing key the exchange routes by.
    #[arg(long, value_name = "KEY", default_value = "", hide_default_value = true, requires = "exchange")]
    pub routing_key: String,
    /// Through an exchange: fail (NO_ROUTE) instead of dropping a message no queue takes.
    #[arg(long, requires = "exchange")]
    pub mandatory: bool,
    /// Header to attach to every message, as KEY=VALUE; repeat for more.
    #[arg(long = "header", value_name = "KEY=VALUE", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// MIME type of the bodies, e.g. application/json.
    #[arg(long, value_name = "TYPE", default_value = "", hide_default_value = true)]
    pub content_type: String,
    /// Time to live of every message (e.g. 30s, 5m); the sooner of this and the queue's
    /// message TTL applies. An expired message dies with reason `expired`.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub ttl: Option<Duration>,
    /// Keep every message invisible to consumers for this long (e.g. 2s); it counts as
    /// `delayed` in the queue's stats meanwhile.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub delay: Option<Duration>,
}

/// Runs `publish` against the broker at `server`.
pub async fn run(server: &str, args: PublishArgs) -> anyhow::Result<()> {
    let conn = crate::connect(server, "publish").await?;
    let options = PublishOptions {
        headers: args.headers.into_iter().collect(),
        content_type: args.content_type,
        delay: args.delay,
        ttl: args.ttl,
        mandatory: args.mandatory,
        ..PublishOptions::default()
    };
    let (target, bodies) = match &args.exchange {
        Some(exchange) => {
            let mut bodies = vec![args.queue.clone()];
            bodies.extend(args.bodies);
            (Target::Exchange { exchange: exchange.as_str(), routing_key: args.routing_key.as_str() }, bodies)
        }
        None => (Target::Queue(args.queue.as_str()), args.bodies),
    };
    let watcher = tokio::spawn(report_block(conn.flow_changes()));
    let mut pipeline = Pipeline::new(&conn, target, options);
    if bodies.is_empty() {
        let mut stdin = BufReader::with_capacity(64 * 1024, tokio::io::stdin());
        let mut line = Vec::new();
        loop {
            line.clear();
            if stdin.read_until(b'\n', &mut line).await.context("reading stdin")? == 0 {
                break;
            }
            pipeline.publish(Bytes::copy_from_slice(strip_newline(&line))).await;
        }
    } else {
        for body in bodies {
            pipeline.publish(Bytes::from(body)).await;
        }
    }
    let outcome = pipeline.finish().await;
    watcher.abort();
    let _ = conn.close().await;
    outcome?;
    Ok(())
}

/// Says on stderr, the first time it happens, that the broker blocks publishing; publishes
/// then simply wait.
async fn report_block(mut changes: tokio::sync::watch::Receiver<Option<String>>) {
    loop {
        if let Some(reason) = changes.borrow_and_update().clone() {
            eprintln!("hopper: publishers are blocked by the broker: {reason}; waiting…");
            return;
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// Where `publish` sends its messages.
#[derive(Debug, Clone, Copy)]
enum Target<'a> {
    /// A queue, by name.
    Queue(&'a str),
    /// Through an exchange, with a routing key.
    Exchange { exchange: &'a str, routing_key: &'a str },
}

impl std::fmt::Display for Target<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Queue(queue) => write!(f, "'{queue}'"),
            Target::Exchange { exchange, routing_key } => {
                write!(f, "exchange '{exchange}' with routing key '{routing_key}'")
            }
        }
    }
}

/// Publishes with at most [`MAX_IN_FLIGHT`] confirms outstanding and tallies the outcome.
struct Pipeline<'a> {
    conn: &'a Connection,
    target: Target<'a>,
    options: PublishOptions,
    in_flight: VecDeque<PublishConfirm>,
    sent: u64,
    failed: u64,
    first_error: Option<hopper_client::Error>,
}

impl<'a> Pipeline<'a> {
    fn new(conn: &'a Connection, target: Target<'a>, options: PublishOptions) -> Self {
        Pipeline {
            conn,
            target,
            options,
            in_flight: VecDeque::with_capacity(MAX_IN_FLIGHT),
            sent: 0,
            failed: 0,
            first_error: None,
        }
    }

    /// Sends one message, first waiting for the oldest confirm if the window is full.
    async fn publish(&mut self, body: Bytes) {
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            self.settle_oldest().await;
        }
        let options = self.options.clone();
        let confirm = match self.target {
            Target::Queue(queue) => self.conn.publish(queue, body, options),
            Target::Exchange { exchange, routing_key } => {
                self.conn.publish_to(exchange, routing_key, body, options)
            }
        };
        self.in_flight.push_back(confirm);
        self.sent += 1;
    }

    async fn settle_oldest(&mut self) {
        if let Some(confirm) = self.in_flight.pop_front() {
            if let Err(err) = confirm.await {
                self.failed += 1;
                self.first_error.get_or_insert(err);
            }
        }
    }

    /// Waits for every outstanding confirm; fails unless all messages were confirmed.
    async fn finish(mut self) -> anyhow::Result<()> {
        while !self.in_flight.is_empty() {
            self.settle_oldest().await;
        }
        if let Some(err) = self.first_error {
            bail!("{} of {} {} not confirmed: {err}", self.failed, self.sent, were(self.sent));
        }
        eprintln!("published {} {} to {}", self.sent, messages(self.sent), self.target);
        Ok(())
    }
}

/// `message was` / `messages were`, to agree with a count.
fn were(count: u64) -> &'static str {
    if count == 1 {
        "message was"
    } else {
        "messages were"
    }
}

/// Parses a `KEY=VALUE` header; the value may contain `=`, the key may not be empty.
pub fn parse_header(text: &str) -> anyhow::Result<(String, String)> {
    let (key, value) = text.split_once('=').ok_or_else(|| anyhow!("expected KEY=VALUE, got '{text}'"))?;
    if key.is_empty() {
        bail!("header name is empty in '{text}'");
    }
    Ok((key.to_string(), value.to_string()))
}

/// A stdin line without its line terminator (`\n` or `\r\n`).
fn strip_newline(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_splits_at_the_first_equals_sign() {
        assert_eq!(parse_header("k=v").unwrap(), ("k".into(), "v".into()));
        assert_eq!(parse_header("k=a=b").unwrap(), ("k".into(), "a=b".into()));
        assert_eq!(parse_header("k=").unwrap(), ("k".into(), String::new()));
    }

    #[test]
    fn malformed_headers_are_errors() {
        assert!(parse_header("novalue").unwrap_err().to_string().contains("KEY=VALUE"));
        assert!(parse_header("=v").unwrap_err().to_string().contains("empty"));
    }

    #[test]
    fn only_the_line_terminator_is_stripped() {
        assert_eq!(strip_newline(b"abc\n"), b"abc");
        assert_eq!(strip_newline(b"abc\r\n"), b"abc");
        assert_eq!(strip_newline(b"abc"), b"abc");
        assert_eq!(strip_newline(b"\n"), b"");
        assert_eq!(strip_newline(b"  a b  \n"), b"  a b  ");
    }

    #[test]
    fn headers_are_repeatable_flags() {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: PublishArgs,
        }
        let parsed =
            Wrapper::try_parse_from(["x", "q", "a", "b", "--header", "k=v", "--header", "x=y=z"]).unwrap();
        assert_eq!(parsed.args.bodies, ["a", "b"]);
        assert_eq!(parsed.args.headers, [("k".into(), "v".into()), ("x".into(), "y=z".into())]);
        assert!(Wrapper::try_parse_from(["x", "q", "--header", "bad"]).is_err());
    }

    #[test]
    fn ttl_and_delay_take_durations() {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: PublishArgs,
        }
        let parsed = Wrapper::try_parse_from(["x", "q", "a", "--ttl", "5m", "--delay", "250ms"]).unwrap();
        assert_eq!(parsed.args.ttl, Some(Duration::from_secs(300)));
        assert_eq!(parsed.args.delay, Some(Duration::from_millis(250)));
        let plain = Wrapper::try_parse_from(["x", "q", "a"]).unwrap();
        assert_eq!((plain.args.ttl, plain.args.delay), (None, None));
        assert!(Wrapper::try_parse_from(["x", "q", "--delay", "later"]).is_err());
    }
}
