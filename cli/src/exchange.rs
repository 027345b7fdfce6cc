//! `hopper exchange ...`, `hopper bind`, `hopper unbind` and `hopper bindings`: exchanges and
//! their bindings.

use std::collections::HashMap;
use std::io::Write;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use hopper_client::{BindingInfo, ExchangeInfo, ExchangeKind, ExchangeOptions};
use serde::Serialize;

use crate::output::{table, write_json_line, yes_no, Align};
use crate::publish::parse_header;

/// `hopper exchange` subcommands.
#[derive(Debug, Subcommand)]
pub enum ExchangeCommand {
    /// Declare an exchange (an identical one may exist already).
    Declare(DeclareArgs),
    /// List exchanges with their bindings and counters.
    List(ListArgs),
    /// Delete an exchange, its bindings and the bindings to it.
    Delete(DeleteArgs),
}

/// Flags of `exchange declare`.
#[derive(Debug, Args)]
pub struct DeclareArgs {
    /// The exchange's name.
    pub name: String,
    /// How it routes.
    #[arg(long = "type", value_enum)]
    pub kind: KindArg,
    /// Keep it, and its bindings to durable queues and exchanges, across restarts.
    #[arg(long)]
    pub durable: bool,
    /// Exchange that receives what this one cannot route.
    #[arg(long, value_name = "EXCHANGE")]
    pub alternate: Option<String>,
}

/// `--type` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KindArg {
    /// Routing key equals the binding key.
    Direct,
    /// Every bound queue.
    Fanout,
    /// Routing key matches the binding pattern (* one word, # any number).
    Topic,
    /// Headers match the binding's headers (--match all or any).
    Headers,
}

impl From<KindArg> for ExchangeKind {
    fn from(kind: KindArg) -> Self {
        match kind {
            KindArg::Direct => ExchangeKind::Direct,
            KindArg::Fanout => ExchangeKind::Fanout,
            KindArg::Topic => ExchangeKind::Topic,
            KindArg::Headers => ExchangeKind::Headers,
        }
    }
}

/// Flags of `exchange list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// One JSON object per exchange, one per line.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `exchange delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The exchange's name.
    pub name: String,
    /// Refuse to delete it while it has bindings.
    #[arg(long)]
    pub if_unused: bool,
}

/// Flags of `bind` and `unbind`.
#[derive(Debug, Args)]
#[command(after_help = "\
`hopper bind QUEUE EXCHANGE` binds a queue; `hopper bind --exchange DEST SOURCE` binds exchange \
DEST to exchange SOURCE, so what SOURCE routes by the binding goes on through DEST.")]
pub struct BindArgs {
    /// QUEUE EXCHANGE, or with --exchange only the SOURCE exchange.
    #[arg(value_name = "NAME", num_args = 1..=2, required = true)]
    pub names: Vec<String>,
    /// Bind this exchange (the destination) instead of a queue.
    #[arg(long = "exchange", value_name = "DEST")]
    pub destination_exchange: Option<String>,
    /// The binding key (direct) or pattern (topic, e.g. `order.*.paid`, `audit.#`).
    #[arg(long, default_value = "", hide_default_value = true)]
    pub key: String,
    /// Headers exchanges: a header to match, as KEY=VALUE; repeat for more.
    #[arg(long = "header", value_name = "KEY=VALUE", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// Headers exchanges: match all the headers (default) or any of them.
    #[arg(long = "match", value_enum)]
    pub matching: Option<MatchArg>,
}

/// `--match` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MatchArg {
    /// Every header given must match.
    All,
    /// One of them is enough.
    Any,
}

impl BindArgs {
    fn binding(self) -> anyhow::Result<BindingInfo> {
        let (source, destination, to_exchange) = match (self.destination_exchange, self.names.as_slice()) {
            (Some(dest), [source]) => (source.clone(), dest, true),
            (None, [queue, exchange]) => (exchange.clone(), queue.clone(), false),
            (Some(_), _) => bail!("with --exchange DEST, name only the SOURCE exchange"),
            (None, _) => bail!("name the QUEUE and the EXCHANGE"),
        };
        let mut arguments: HashMap<String, String> = self.headers.into_iter().collect();
        if let Some(matching) = self.matching {
            let value = if matching == MatchArg::Any { "any" } else { "all" };
            arguments.insert("x-match".into(), value.into());
        }
        Ok(BindingInfo { source, destination, to_exchange, routing_key: self.key, arguments })
    }
}

/// Flags of `bindings`.
#[derive(Debug, Args)]
pub struct BindingsArgs {
    /// Only the bindings of this exchange.
    #[arg(long)]
    pub exchange: Option<String>,
    /// Only the bindings that lead to this queue.
    #[arg(long)]
    pub queue: Option<String>,
    /// One JSON object per binding, one per line.
    #[arg(long)]
    pub json: bool,
}

/// An exchange as `exchange list --json` prints it.
#[derive(Debug, Serialize)]
struct ExchangeJson<'a> {
    name: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    durable: bool,
    alternate: Option<&'a str>,
    bindings: u32,
    published: u64,
    unroutable: u64,
    returned: u64,
}

impl<'a> From<&'a ExchangeInfo> for ExchangeJson<'a> {
    fn from(x: &'a ExchangeInfo) -> Self {
        ExchangeJson {
            name: &x.name,
            kind: &x.kind,
            durable: x.durable,
            alternate: x.alternate.as_deref(),
            bindings: x.bindings,
            published: x.published_total,
            unroutable: x.unroutable_total,
            returned: x.returned_total,
        }
    }
}

/// A binding as `bindings --json` prints it.
#[derive(Debug, Serialize)]
struct BindingJson<'a> {
    source: &'a str,
    destination: &'a str,
    destination_type: &'a str,
    key: &'a str,
    arguments: std::collections::BTreeMap<&'a str, &'a str>,
}

/// Runs an `exchange` subcommand against the broker at `server`.
pub async fn run(server: &str, command: ExchangeCommand) -> anyhow::Result<()> {
    let conn = crate::connect(server, "exchange").await?;
    let mut out = std::io::stdout().lock();
    match command {
        ExchangeCommand::Declare(args) => {
            let options = ExchangeOptions { durable: args.durable, alternate: args.alternate };
            let info = conn.declare_exchange(&args.name, args.kind.into(), options).await?;
            eprintln!("declared exchange '{}' ({})", info.name, info.kind);
        }
        ExchangeCommand::List(args) => {
            let exchanges = conn.list_exchanges().await?;
            if args.json {
                for exchange in &exchanges {
                    write_json_line(&mut out, &ExchangeJson::from(exchange))?;
                }
            } else {
                out.write_all(exchange_table(&exchanges).as_bytes())?;
            }
        }
        ExchangeCommand::Delete(args) => {
            conn.delete_exchange(&args.name, args.if_unused).await?;
            eprintln!("deleted exchange '{}'", args.name);
        }
    }
    out.flush().context("writing to stdout")?;
    Ok(())
}

/// Runs `bind` (or, with `unbind`, `unbind`) against the broker at `server`.
pub async fn run_bind(server: &str, args: BindArgs, unbind: bool) -> anyhow::Result<()> {
    let conn = crate::connect(server, "bind").await?;
    let binding = args.binding()?;
    let what = format!("'{}' to '{}'", binding.destination, binding.source);
    if unbind {
        let removed = conn.unbind(binding).await?;
        eprintln!("{} {what}", if removed { "unbound" } else { "no such binding of" });
    } else {
        let created = conn.bind(binding).await?;
        eprintln!("{} {what}", if created { "bound" } else { "already bound" });
    }
    Ok(())
}

/// Runs `bindings` against the broker at `server`.
pub async fn run_bindings(server: &str, args: BindingsArgs) -> anyhow::Result<()> {
    let conn = crate::connect(server, "bindings").await?;
    let bindings = conn.list_bindings(args.exchange.as_deref(), args.queue.as_deref()).await?;
    let mut out = std::io::stdout().lock();
    if args.json {
        for b in &bindings {
            let json = BindingJson {
                source: &b.source,
                destination: &b.destination,
                destination_type: if b.to_exchange { "exchange" } else { "queue" },
                key: &b.routing_key,
                arguments: b.arguments.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
            };
            write_json_line(&mut out, &json)?;
        }
    } else {
        out.write_all(binding_table(&bindings).as_bytes())?;
    }
    out.flush().context("writing to stdout")?;
    Ok(())
}

fn exchange_table(exchanges: &[ExchangeInfo]) -> String {
    const COLUMNS: [&str; 8] =
        ["NAME", "TYPE", "DURABLE", "ALTERNATE", "BINDINGS", "PUBLISHED", "UNROUTABLE", "RETURNED"];
    let rows: Vec<Vec<String>> = exchanges
        .iter()
        .map(|x| {
            vec![
                x.name.clone(),
                x.kind.clone(),
                yes_no(x.durable).to_string(),
                x.alternate.clone().unwrap_or_else(|| "-".into()),
                x.bindings.to_string(),
                x.published_total.to_string(),
                x.unroutable_total.to_string(),
                x.returned_total.to_string(),
            ]
        })
        .collect();
    let mut align = [Align::Right; COLUMNS.len()];
    align[..4].fill(Align::Left);
    table(&COLUMNS, &align, &rows)
}

fn binding_table(bindings: &[BindingInfo]) -> String {
    const COLUMNS: [&str; 5] = ["SOURCE", "DESTINATION", "TYPE", "KEY", "ARGUMENTS"];
    let rows: Vec<Vec<String>> = bindings
        .iter()
        .map(|b| {
            let mut arguments: Vec<String> = b.arguments.iter().map(|(k, v)| format!("{k}={v}")).collect();
            arguments.sort();
            vec![
                b.source.clone(),
                b.destination.clone(),
                if b.to_exchange { "exchange" } else { "queue" }.to_string(),
                if b.routing_key.is_empty() { "-".to_string() } else { b.routing_key.clone() },
                if arguments.is_empty() { "-".to_string() } else { arguments.join(",") },
            ]
        })
        .collect();
    table(&COLUMNS, &[Align::Left; 5], &rows)
}
