//! `hopper bench`: producers and consumers on their own connections, measuring publish and
//! consume throughput and end-to-end latency (in the manner of rabbitmq-perf-test).
//!
//! Every body starts with the time it was built, as nanoseconds since the Unix epoch in
//! little-endian order; consumers subtract it from their clock on arrival.
//!
//! With `--producers 0` the bench only drains: its consumers take `--count` messages that are
//! already in `--queue` (left there by an earlier `--consumers 0` run, say), so it measures
//! the consume rate of a backlog. With `--rss-pid` it also samples the resident memory of the
//! broker process while it runs.
//!
//! With `--queues N` and no exchange the run spreads over N queues, each with its share of the
//! messages, dealt out over the producer and the consumer connections ([`spread`]).
//! `--declare N` measures declaring queues instead of messages ([`declare`]).

// The bench's parts live in cli/src/bench_*.rs beside this file.
mod amqp;
mod consume;
mod declare;
mod produce;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use bytes::{Bytes, BytesMut};
use clap::Args;
use hdrhistogram::Histogram;
use hopper_client::{Connection, ConsumeOptions, Consumer, ExchangeOptions, QueueOptions};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::bench_watch::{read_cpu_time, DepthSampler, RssSampler};
use crate::output::{self, BenchReport};
use consume::{consume, Pacing};
use produce::{produce, Plan};

/// Bytes at the front of every body that hold the send time.
const TIMESTAMP_LEN: usize = 8;
/// Bodies are cut from zeroed chunks of about this size, so building one costs no allocation.
const BODY_CHUNK_BYTES: usize = 256 * 1024;
/// Largest latency the histogram resolves, in microseconds (one hour); larger ones saturate.
const MAX_LATENCY_US: u64 = 3_600_000_000;
/// How long consumers may go without a delivery after the producers finished before the run
/// is declared stuck.
const STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Flags of `bench`.
#[derive(Debug, Args)]
#[command(after_help = "\
Prints sent and received counts, publish and consume rates (msg/s), end-to-end latency \
percentiles (µs), the longest wait of any producer for its next confirm and the elapsed time; \
with --json, one object with keys publish_rate, consume_rate, p50_us, p99_us, p999_us, max_us, \
sent, received, elapsed_s, size, prefetch, producers, consumers, queues, max_confirm_gap_ms \
(unless --producers 0), and broker_rss_mb and broker_cpu_s with --rss-pid. Without --queue, a \
queue named bench-<pid> is declared and deleted at the end. With --producers 0, --queue must \
name an existing queue holding at least --count messages; they are consumed and acknowledged, \
and latency is measured from the time each was published.

With --queues N and no --exchange, queues QUEUE-0 .. QUEUE-<N-1> (QUEUE is --queue, or \
bench-<pid>, and then they are deleted at the end) each take count/N messages: producer \
connection p publishes round-robin to the queues i with i % --producers == p, and consumer \
connection c consumes (one consumer per queue) from those with i % --consumers == c. Rates are \
totals over all queues.

With --declare N, queues bench-decl-0 .. bench-decl-<N-1> are declared, --in-flight at a time \
over up to 8 connections, and left in place; the report has declared, durable, in_flight, \
connections, elapsed_s and declares_per_s, and with --rss-pid broker_rss_mb, broker_threads \
and broker_open_files read once the declares are done. With --declare N --check nothing is \
declared: the bench waits (up to 60 s) for the broker to accept a connection, asks every \
bench-decl-<i> for its stats, and reports \
queues, answered, in_flight, connections, connect_s and elapsed_s (both from the bench's start), \
and first_error and exit status 1 if a queue did not answer.")]
pub struct BenchArgs {
    /// Publishing connections; 0 only drains --count messages already in --queue.
    #[arg(long, default_value_t = 1)]
    pub producers: u32,
    /// Consuming connections; 0 only publishes.
    #[arg(long, default_value_t = 1)]
    pub consumers: u32,
    /// Body size in bytes (at least 16).
    #[arg(long, default_value_t = 256, value_parser = crate::at_least(16u64))]
    pub size: u64,
    /// Messages to publish in total (with --producers 0: to consume).
    #[arg(long, default_value_t = 200_000, conflicts_with = "duration")]
    pub count: u64,
    /// Publish for this many seconds instead of a fixed count.
    #[arg(long, value_name = "SECS", value_parser = parse_seconds)]
    pub duration: Option<Duration>,
    /// Unacknowledged deliveries per consumer (0 = no limit).
    #[arg(long, default_value_t = 100)]
    pub prefetch: u32,
    /// Fixed total publish rate in messages per second (0 = as fast as possible).
    #[arg(long, value_name = "MSG_PER_SEC", default_value_t = 0)]
    pub rate: u64,
    /// Publishes awaiting their confirm, per producer.
    #[arg(long, default_value_t = 1000, value_parser = crate::at_least(1u64))]
    pub confirm_window: u64,
    /// Queue to use [default: bench-<pid>, deleted afterwards].
    #[arg(long)]
    pub queue: Option<String>,
    /// Declare the queue durable.
    #[arg(long)]
    pub durable: bool,
    /// Declare the queue replicated over the cluster's nodes (point --server at the node
    /// serving replicated queues: `hopper cluster status`).
    #[arg(long)]
    pub replicated: bool,
    /// Acknowledge every N deliveries at once (ack with multiple).
    #[arg(long, default_value_t = 1, value_parser = crate::at_least(1u64))]
    pub ack_every: u64,
    /// Sample the resident memory (VmRSS) of this process, e.g. the broker's, during the run
    /// and report its peak, and the CPU time it used.
    #[arg(long, value_name = "PID")]
    pub rss_pid: Option<u32>,
    /// Publish every message with this delay (e.g. 30s); latency is then measured from when
    /// each message was due, i.e. how late the broker's timers fired.
    #[arg(long, value_name = "DURATION", value_parser = crate::time::parse_duration)]
    pub delay: Option<Duration>,
    /// Consumers together settle at most this many messages per second (a steady worker
    /// pool), 0 = as fast as possible.
    #[arg(long, value_name = "MSG_PER_SEC", default_value_t = 0)]
    pub consume_rate: u64,
    /// Read the queue's depth (ready, unacked, delayed) at this interval and report it.
    #[arg(long, value_name = "DURATION", value_parser = crate::time::parse_duration)]
    pub sample_every: Option<Duration>,
    /// Drive the broker at this AMQP 0-9-1 URL (amqp://USER:PASSWORD@HOST:PORT/%2f: Hopper's
    /// --amqp-listen, or RabbitMQ) instead of over Hopper's protocol, with a lean client that
    /// batches its writes: one producer and --consumers connections (a channel per queue; 0
    /// only publishes), for --count, --size, --prefetch, --durable, --confirm-window,
    /// --ack-every, --exchange, --queues and --bindings.
    #[arg(long, value_name = "URL")]
    pub amqp: Option<String>,
    /// Publish through an exchange of this type (bench-x-<pid>) instead of to the queue; see
    /// --queues and --bindings.
    #[arg(long = "exchange", value_name = "TYPE", value_enum)]
    pub exchange: Option<crate::exchange::KindArg>,
    /// This many queues (QUEUE-0, QUEUE-1, ...): with --exchange each takes every message,
    /// with a consumer each at least; without, each takes its share, spread over the
    /// connections.
    #[arg(long, default_value_t = 1, value_parser = crate::at_least(1u32))]
    pub queues: u32,
    /// With --exchange topic: bind this many patterns in all; those beyond one per queue are
    /// random 3 to 5 word patterns (a quarter with * or #) that match nothing published.
    #[arg(long, default_value_t = 0, requires = "exchange")]
    pub bindings: u32,
    /// Print one JSON summary object.
    #[arg(long)]
    pub json: bool,
    /// Instead of messages, measure connection set-up: open (log in) and close this many
    /// connections, --producers at a time, and report logins per second.
    #[arg(long, value_name = "N", conflicts_with_all = ["exchange", "duration"])]
    pub logins: Option<u64>,
    /// Instead of messages, declare this many queues bench-decl-<i> (left in place, e.g. for a
    /// restart test) and report declares per second.
    #[arg(
        long,
        value_name = "N",
        value_parser = crate::at_least(1u64),
        conflicts_with_all = DECLARE_CONFLICTS,
    )]
    pub declare: Option<u64>,
    /// With --declare: requests awaiting their answer at once.
    #[arg(
        long,
        value_name = "K",
        default_value_t = 64,
        value_parser = crate::at_least(1u32),
        requires = "declare"
    )]
    pub in_flight: u32,
    /// With --declare N: declare nothing; wait for the broker to accept a connection, then time
    /// until every bench-decl-<i> answers its stats (after a restart, say).
    #[arg(long, requires = "declare")]
    pub check: bool,
}

/// The message flags, which say nothing to `--declare`. Only flags given count: defaults do
/// not conflict.
const DECLARE_CONFLICTS: [&str; 17] = [
    "producers",
    "consumers",
    "size",
    "count",
    "duration",
    "prefetch",
    "rate",
    "confirm_window",
    "queue",
    "ack_every",
    "delay",
    "consume_rate",
    "sample_every",
    "exchange",
    "queues",
    "bindings",
    "logins",
];

impl BenchArgs {
    /// How the run's queues are declared.
    fn queue_options(&self) -> QueueOptions {
        QueueOptions { durable: self.durable, replicated: self.replicated, ..Default::default() }
    }

    /// Whether this run only consumes messages already in the queue.
    fn drain(&self) -> bool {
        self.producers == 0
    }

    /// Whether the run spreads its messages over many queues of its own (`--queues` without
    /// `--exchange`).
    fn spread(&self) -> bool {
        self.exchange.is_none() && self.queues > 1
    }

    /// Rejects flag combinations that cannot make a run.
    fn validate(&self) -> anyhow::Result<()> {
        if self.drain() && self.exchange.is_some() {
            bail!("--producers 0 drains a queue; --exchange does not apply");
        }
        if self.drain() && self.queues > 1 {
            bail!("--producers 0 drains the one queue named by --queue; --queues does not apply");
        }
        if self.spread() {
            let queues = self.queues;
            if self.producers > queues {
                bail!(
                    "--producers {} is more than --queues {queues}: each producer connection \
                     publishes to queues of its own, so some would have none",
                    self.producers
                );
            }
            if self.consumers > queues {
                bail!(
                    "--consumers {} is more than --queues {queues}: each consumer connection \
                     consumes from queues of its own, so some would have none",
                    self.consumers
                );
            }
        }
        if self.drain() {
            if self.queue.is_none() {
                bail!("--producers 0 drains an existing queue: name it with --queue");
            }
            if self.consumers == 0 {
                bail!("--producers 0 needs at least one consumer");
            }
            if self.duration.is_some() {
                bail!("--producers 0 consumes --count messages; --duration does not apply");
            }
        }
        Ok(())
    }
}

/// Runs `bench` against the broker at `server`.
pub async fn run(server: &str, args: BenchArgs) -> anyhow::Result<()> {
    args.validate()?;
    if let Some(logins) = args.logins {
        return bench_logins(server, logins, args.producers.max(1), args.json).await;
    }
    if let Some(url) = &args.amqp {
        return print_report(&amqp::run(url, &args).await?, args.json);
    }
    if let Some(count) = args.declare {
        let run = declare::DeclareRun {
            count,
            in_flight: args.in_flight,
            durable: args.durable,
            check: args.check,
            rss_pid: args.rss_pid,
            json: args.json,
        };
        return declare::run(server, run).await;
    }
    let (queue, temporary) = match &args.queue {
        Some(name) => (name.clone(), false),
        None => (format!("bench-{}", std::process::id()), true),
    };
    let admin = crate::connect(server, "bench").await?;
    let route = match args.exchange {
        Some(kind) => Some(Route::declare(&admin, kind, &queue, &args).await?),
        None => None,
    };
    let queues = match &route {
        Some(route) => route.queues.clone(),
        None if args.spread() => (0..args.queues).map(|i| format!("{queue}-{i}")).collect(),
        None => vec![queue.clone()],
    };
    let setup = declare::setup_connections(server, &admin, queues.len()).await?;
    if args.drain() {
        // The backlog must already be there; declaring would create an empty queue instead.
        admin.queue_exists(&queue).await.with_context(|| format!("queue '{queue}'"))?;
    } else if route.is_none() {
        let names = queues.iter().cloned();
        declare::declare_queues(&setup, names, declare::SETUP_IN_FLIGHT, args.queue_options()).await?;
    }
    let sampler = args.rss_pid.map(RssSampler::start).transpose()?;
    let cpu_before = args.rss_pid.map(read_cpu_time).transpose()?;
    let depth = match args.sample_every {
        Some(every) => {
            // Of many queues, the first stands for them all.
            let conn = crate::connect(server, "bench depth").await?;
            Some(DepthSampler::start(conn, queues[0].clone(), every, Instant::now()))
        }
        None => None,
    };
    let mut result = bench(server, &args, &queues, route.as_ref()).await;
    if let Some(sampler) = sampler {
        let peak = sampler.finish().await;
        if let Ok(report) = &mut result {
            report.broker_rss_mb = Some(peak);
        }
    }
    if let (Some(pid), Some(before), Ok(report)) = (args.rss_pid, cpu_before, &mut result) {
        if let Ok(after) = read_cpu_time(pid) {
            report.broker_cpu_s = Some(after.saturating_sub(before).as_secs_f64());
        }
    }
    if let Some(depth) = depth {
        let samples = depth.finish().await;
        if let Ok(report) = &mut result {
            report.max_unacked = samples.iter().map(|s| s.unacked).max();
            report.depth = samples;
        }
    }
    if temporary {
        declare::delete_queues(&setup, &queues).await;
    }
    if let Some(route) = &route {
        if let Err(err) = admin.delete_exchange(&route.exchange, false).await {
            eprintln!("hopper: warning: could not delete exchange '{}': {err}", route.exchange);
        }
    }
    declare::close_all(&setup).await;
    print_report(&result?, args.json)
}

/// Prints a bench's report, as JSON or as a listing.
fn print_report(report: &BenchReport, json: bool) -> anyhow::Result<()> {
    match json {
        true => println!("{}", serde_json::to_string(report)?),
        false => print!("{}", output::bench_listing(report)),
    }
    Ok(())
}

/// Received-message bookkeeping shared by the consumers and the coordinator.
struct Progress {
    received: AtomicU64,
    /// Messages to wait for: `u64::MAX` until the producers have finished.
    target: AtomicU64,
    done: watch::Sender<bool>,
}

impl Progress {
    /// Counts `n` deliveries and signals the end when they were the last ones expected.
    fn record(&self, n: u64) {
        let received = self.received.fetch_add(n, Ordering::SeqCst) + n;
        if received >= self.target.load(Ordering::SeqCst) {
            self.done.send_replace(true);
        }
    }

    /// Sets how many messages the consumers must receive. Together with the opposite order in
    /// [`Progress::record`], SeqCst guarantees that one side sees the other's write.
    fn expect(&self, total: u64) {
        self.target.store(total, Ordering::SeqCst);
        if self.received.load(Ordering::SeqCst) >= total {
            self.done.send_replace(true);
        }
    }
}

/// Connects everyone, runs the producers to completion and waits for the consumers.
async fn bench(
    server: &str,
    args: &BenchArgs,
    queues: &[String],
    route: Option<&Route>,
) -> anyhow::Result<BenchReport> {
    // Through an exchange every queue takes every message, and each has a consumer (unless
    // the run only publishes, to measure a backlog).
    let consumers_wanted = match route {
        Some(_) if args.consumers > 0 => args.consumers.max(queues.len() as u32),
        _ => args.consumers,
    };
    let copies = if route.is_some() { queues.len() as u64 } else { 1 };
    let size = usize::try_from(args.size).context("--size is too large")?;
    let window = usize::try_from(args.confirm_window).unwrap_or(usize::MAX);
    let (done, _) = watch::channel(false);
    let progress = Arc::new(Progress { received: AtomicU64::new(0), target: AtomicU64::new(u64::MAX), done });

    // Connect and subscribe before the clock starts, so that setup is not measured. A drain
    // starts the clock before subscribing instead: deliveries begin as soon as it subscribes.
    let mut consumer_conns = Vec::new();
    for i in 0..consumers_wanted {
        consumer_conns.push(crate::connect(server, &format!("bench consumer {i}")).await?);
    }
    let drain_start = args.drain().then(Instant::now);
    if args.drain() {
        progress.expect(args.count);
    }
    // Many queues' subscriptions go out on all the connections at once.
    let subscribing = (0u32..).zip(&consumer_conns).map(|(i, conn)| {
        let mine: Vec<&String> = if args.spread() {
            spread(queues.len(), consumers_wanted, i).map(|q| &queues[q]).collect()
        } else {
            vec![&queues[i as usize % queues.len()]]
        };
        subscribe(conn, mine, args.prefetch, i)
    });
    let subscribed = futures::future::try_join_all(subscribing).await?;
    let mut consumers = JoinSet::new();
    for (conn, subscribed) in consumer_conns.into_iter().zip(subscribed) {
        let progress = Arc::clone(&progress);
        let pacing = Pacing {
            ack_every: args.ack_every,
            delay_ns: args.delay.map_or(0, |d| d.as_nanos() as u64),
            interval: (args.consume_rate > 0).then(|| f64::from(consumers_wanted) / args.consume_rate as f64),
        };
        consumers.spawn(async move {
            let result = consume(subscribed, pacing, &progress).await;
            let _ = conn.close().await;
            result
        });
    }
    let mut producer_conns = Vec::new();
    for i in 0..args.producers {
        producer_conns.push(crate::connect(server, &format!("bench producer {i}")).await?);
    }

    let start = drain_start.unwrap_or_else(Instant::now);
    let mut producers = JoinSet::new();
    for (i, conn) in (0u32..).zip(producer_conns) {
        let (targets, count) = if args.spread() {
            let mine: Vec<usize> = spread(queues.len(), args.producers, i).collect();
            let count = mine.iter().map(|&q| share(args.count, queues.len() as u64, q as u64)).sum();
            (mine.into_iter().map(|q| queues[q].clone()).collect(), count)
        } else {
            (vec![queues[0].clone()], share(args.count, args.producers.into(), i.into()))
        };
        let plan = Plan {
            targets,
            route: route.map(|r| (r.exchange.clone(), r.routing_key.clone(), r.headers.clone())),
            size,
            window,
            count: args.duration.is_none().then_some(count),
            deadline: args.duration.map(|d| start + d),
            interval: (args.rate > 0).then(|| f64::from(args.producers) / args.rate as f64),
            start,
            delay: args.delay,
        };
        producers.spawn(async move {
            let result = produce(&conn, &plan).await;
            let _ = conn.close().await;
            result
        });
    }
    let mut sent = 0;
    let mut publish_end = start;
    let mut longest_gap = None;
    while let Some(joined) = producers.join_next().await {
        let produced = joined.context("a producer panicked")?.context("producer failed")?;
        sent += produced.sent;
        publish_end = publish_end.max(produced.finished);
        longest_gap = longest_gap.max(Some(produced.longest_gap));
    }
    if !args.drain() {
        progress.expect(sent * copies);
    }

    let mut latencies = new_histogram();
    let mut consume_end = None;
    let mut last_seen = (progress.received.load(Ordering::SeqCst), Instant::now());
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            joined = consumers.join_next() => {
                let Some(joined) = joined else { break };
                let consumed = joined.context("a consumer panicked")?.context("consumer failed")?;
                latencies.add(&consumed.latencies).context("merging latency histograms")?;
                consume_end = consume_end.max(consumed.last_delivery);
            }
            _ = tick.tick() => {
                let received = progress.received.load(Ordering::SeqCst);
                if received != last_seen.0 {
                    last_seen = (received, Instant::now());
                } else if last_seen.1.elapsed() > STALL_TIMEOUT + args.delay.unwrap_or_default() {
                    bail!(
                        "consumers received only {received} of {sent} messages \
                         (nothing arrived for {} s)",
                        STALL_TIMEOUT.as_secs()
                    );
                }
            }
        }
    }
    // Teardown (cancels, closes) is not part of the measurement.
    let elapsed = consume_end.map_or(publish_end, |end| end.max(publish_end)).duration_since(start);
    let received = progress.received.load(Ordering::SeqCst);
    let consume_secs = consume_end.map_or(0.0, |end| end.duration_since(start).as_secs_f64());
    let percentile = |q: f64| if latencies.is_empty() { 0 } else { latencies.value_at_quantile(q) };
    Ok(BenchReport {
        publish_rate: rate(sent, publish_end.duration_since(start).as_secs_f64()),
        consume_rate: rate(received, consume_secs),
        p50_us: percentile(0.5),
        p99_us: percentile(0.99),
        p999_us: percentile(0.999),
        max_us: if latencies.is_empty() { 0 } else { latencies.max() },
        sent,
        received,
        elapsed_s: elapsed.as_secs_f64(),
        size: args.size,
        prefetch: args.prefetch,
        producers: args.producers,
        consumers: args.consumers,
        queues: queues.len() as u32,
        max_confirm_gap_ms: longest_gap.map(|gap| gap.as_secs_f64() * 1000.0),
        broker_rss_mb: None,
        broker_cpu_s: None,
        delay_ms: args.delay.map(|d| d.as_millis() as u64),
        max_unacked: None,
        depth: Vec::new(),
    })
}

/// Subscribes consumer connection `index` to `queues`, one consumer each.
async fn subscribe(
    conn: &Connection,
    queues: Vec<&String>,
    prefetch: u32,
    index: u32,
) -> anyhow::Result<Vec<Consumer>> {
    let mut consumers = Vec::with_capacity(queues.len());
    for (n, queue) in queues.into_iter().enumerate() {
        let options =
            ConsumeOptions { prefetch, tag: format!("bench-consumer-{index}-{n}"), ..Default::default() };
        consumers
            .push(conn.consume(queue, options).await.with_context(|| format!("consuming from '{queue}'"))?);
    }
    Ok(consumers)
}

/// Opens and closes `total` connections, `parallel` at a time, each with a full handshake (and
/// login), and prints how many per second.
async fn bench_logins(server: &str, total: u64, parallel: u32, json: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    let tasks: Vec<_> = (0..u64::from(parallel))
        .map(|i| {
            let server = server.to_owned();
            let share = share(total, u64::from(parallel), i);
            tokio::spawn(async move {
                for _ in 0..share {
                    let conn = crate::connect(&server, "bench login").await?;
                    conn.close().await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    let per_second = rate(total, secs);
    if json {
        println!(
            "{}",
            serde_json::json!({"logins": total, "parallel": parallel, "elapsed_s": secs, "logins_per_s": per_second})
        );
    } else {
        println!("logins:       {total} ({parallel} at a time)");
        println!("login rate:   {per_second:.0} connections/s");
        println!("elapsed:      {secs:.2} s");
    }
    Ok(())
}

/// Builds a body of `size` bytes whose first eight hold `sent_at_ns`, cutting it from `chunk`
/// (refilled with a zeroed allocation once it runs out), so most bodies cost no allocation.
pub fn encode_body(chunk: &mut BytesMut, size: usize, sent_at_ns: u64) -> Bytes {
    debug_assert!(size >= TIMESTAMP_LEN);
    if chunk.len() < size {
        *chunk = BytesMut::zeroed(size.max(BODY_CHUNK_BYTES / size * size));
    }
    let mut body = chunk.split_to(size);
    body[..TIMESTAMP_LEN].copy_from_slice(&sent_at_ns.to_le_bytes());
    body.freeze()
}

/// The send time carried by a bench body, if the body is long enough to hold one.
pub fn decode_timestamp(body: &[u8]) -> Option<u64> {
    let bytes: [u8; TIMESTAMP_LEN] = body.get(..TIMESTAMP_LEN)?.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

/// Unix time from `Instant`s: a reading of both clocks taken once.
struct UnixClock {
    base: Instant,
    base_unix_ns: u64,
}

impl UnixClock {
    fn new() -> Self {
        UnixClock { base: Instant::now(), base_unix_ns: unix_nanos() }
    }

    /// Unix nanoseconds at `at`.
    fn unix_nanos(&self, at: Instant) -> u64 {
        self.base_unix_ns.saturating_add(at.saturating_duration_since(self.base).as_nanos() as u64)
    }
}

/// Nanoseconds since the Unix epoch, by the wall clock (producers and consumers may be in
/// different processes, so a monotonic clock would not compare).
fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The exchange a routed run publishes through, and the queues it binds.
struct Route {
    exchange: String,
    routing_key: String,
    headers: HashMap<String, String>,
    queues: Vec<String>,
}

impl Route {
    /// Declares the exchange, the queues (`base-0`, `base-1`, ...) and their bindings: one per
    /// queue that matches what is published, then, for a topic exchange, non-matching random
    /// patterns up to `--bindings` in all.
    async fn declare(
        admin: &Connection,
        kind: crate::exchange::KindArg,
        base: &str,
        args: &BenchArgs,
    ) -> anyhow::Result<Route> {
        use crate::exchange::KindArg;
        let exchange = format!("bench-x-{}", std::process::id());
        let options = ExchangeOptions { durable: args.durable, alternate: None };
        admin.declare_exchange(&exchange, kind.into(), options).await?;
        let routing_key = "bench.route.key".to_string();
        let headers: HashMap<String, String> = [("bench".to_string(), "yes".to_string())].into();
        let queues: Vec<String> = (0..args.queues).map(|i| format!("{base}-{i}")).collect();
        for queue in &queues {
            admin.declare_queue(queue, args.queue_options()).await?;
            let (key, arguments) = match kind {
                KindArg::Direct => (routing_key.clone(), HashMap::new()),
                KindArg::Fanout => (String::new(), HashMap::new()),
                KindArg::Topic => ("bench.*.key".to_string(), HashMap::new()),
                KindArg::Headers => (String::new(), headers.clone()),
            };
            admin.bind_queue(queue, &exchange, &key, arguments).await?;
        }
        if kind == KindArg::Topic {
            let mut seed = 0x2545_f491_4f6c_dd1d_u64;
            let mut next = move |n: u64| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed % n
            };
            for i in queues.len() as u32..args.bindings {
                // Words from their own alphabet, so no pattern matches the published key.
                let words = 3 + next(3);
                let pattern: Vec<String> = (0..words)
                    .map(|w| match next(8) {
                        0 if w > 0 => "*".to_string(),
                        1 if w > 0 => "#".to_string(),
                        _ => format!("w{}", next(50)),
                    })
                    .collect();
                let queue = &queues[i as usize % queues.len()];
                admin.bind_queue(queue, &exchange, &pattern.join("."), HashMap::new()).await?;
            }
        }
        // Only a headers exchange routes by them; the other runs publish none, as a publish
        // straight to a queue does.
        let headers = if kind == KindArg::Headers { headers } else { HashMap::new() };
        Ok(Route { exchange, routing_key, headers, queues })
    }
}

/// Producer `index`'s part of `total` messages split over `parts` producers.
fn share(total: u64, parts: u64, index: u64) -> u64 {
    total / parts + u64::from(index < total % parts)
}

/// The queues (of `queues`) that connection `index` of `parts` takes when they are spread
/// over the connections: every `parts`-th one, starting at `index`.
fn spread(queues: usize, parts: u32, index: u32) -> impl Iterator<Item = usize> {
    let parts = usize::try_from(parts).unwrap_or(usize::MAX).max(1);
    (index as usize..queues).step_by(parts)
}

/// Messages per second, 0 when no time passed.
fn rate(messages: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        messages as f64 / secs
    } else {
        0.0
    }
}

/// An empty latency histogram in microseconds, three significant digits.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("constant histogram bounds are valid")
}

/// Parses `--duration`: a positive number of seconds, fractions allowed.
fn parse_seconds(text: &str) -> anyhow::Result<Duration> {
    let secs: f64 = text.parse().map_err(|_| anyhow!("expected a number of seconds, got '{text}'"))?;
    if !(secs > 0.0 && secs.is_finite()) {
        bail!("the duration must be a positive number of seconds");
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_round_trips_its_timestamp_and_has_the_requested_size() {
        let mut chunk = BytesMut::new();
        for (i, size) in [16usize, 256, 4096, BODY_CHUNK_BYTES + 1].into_iter().enumerate() {
            let stamp = 1_700_000_000_000_000_000 + i as u64;
            let body = encode_body(&mut chunk, size, stamp);
            assert_eq!(body.len(), size);
            assert_eq!(decode_timestamp(&body), Some(stamp));
            assert!(body[TIMESTAMP_LEN..].iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn bodies_share_one_allocation_until_the_chunk_runs_out() {
        let mut chunk = BytesMut::new();
        let a = encode_body(&mut chunk, 100, 1);
        let b = encode_body(&mut chunk, 100, 2);
        assert_eq!(a.as_ptr().wrapping_add(100), b.as_ptr());
        assert_eq!((decode_timestamp(&a), decode_timestamp(&b)), (Some(1), Some(2)));
    }

    #[test]
    fn short_bodies_carry_no_timestamp() {
        assert_eq!(decode_timestamp(b"short"), None);
        assert_eq!(decode_timestamp(&[1, 0, 0, 0, 0, 0, 0, 0]), Some(1));
    }

    #[test]
    fn shares_add_up_to_the_total() {
        for (total, parts) in [(10, 3), (200_000, 7), (2, 5), (0, 1)] {
            let sum: u64 = (0..parts).map(|i| share(total, parts, i)).sum();
            assert_eq!(sum, total);
        }
        assert_eq!((0..3).map(|i| share(10, 3, i)).collect::<Vec<_>>(), [4, 3, 3]);
    }

    #[test]
    fn spread_queues_go_to_every_connection_once() {
        assert_eq!(spread(10, 3, 0).collect::<Vec<_>>(), [0, 3, 6, 9]);
        assert_eq!(spread(10, 3, 2).collect::<Vec<_>>(), [2, 5, 8]);
        assert_eq!(spread(3, 3, 1).collect::<Vec<_>>(), [1]);
        assert_eq!(spread(2, 3, 2).count(), 0, "more connections than queues");
        for (queues, parts) in [(1000usize, 50u32), (7, 7), (100, 1), (5, 2)] {
            let mut taken: Vec<usize> = (0..parts).flat_map(|p| spread(queues, parts, p)).collect();
            taken.sort_unstable();
            assert_eq!(taken, (0..queues).collect::<Vec<_>>());
        }
    }

    #[test]
    fn every_spread_queue_gets_its_share_of_the_count_round_robin() {
        // A producer publishes message k to its (k mod m)-th queue; that must give each queue
        // exactly what the whole run's split gives it.
        for (total, queues, producers) in
            [(2_000_000u64, 1000usize, 50u32), (10, 4, 3), (7, 10, 3), (3, 3, 1)]
        {
            let mut got = vec![0u64; queues];
            for p in 0..producers {
                let mine: Vec<usize> = spread(queues, producers, p).collect();
                let count: u64 = mine.iter().map(|&q| share(total, queues as u64, q as u64)).sum();
                for k in 0..count {
                    got[mine[(k % mine.len() as u64) as usize]] += 1;
                }
            }
            let want: Vec<u64> = (0..queues as u64).map(|q| share(total, queues as u64, q)).collect();
            assert_eq!(got, want, "{total} messages over {queues} queues, {producers} producers");
        }
    }

    #[test]
    fn many_queues_need_no_exchange_but_enough_of_them_for_every_connection() {
        let spread = parse(&["x", "--queues", "1000", "--producers", "50", "--consumers", "50", "--durable"]);
        assert!(spread.spread() && spread.validate().is_ok());
        let routed = parse(&["x", "--queues", "3", "--exchange", "fanout", "--consumers", "5"]);
        assert!(!routed.spread() && routed.validate().is_ok(), "a fanout may have more consumers");
        assert!(!parse(&["x", "--queues", "1"]).spread());
        let err = parse(&["x", "--queues", "4", "--producers", "5"]).validate().unwrap_err();
        assert!(err.to_string().contains("--producers 5 is more than --queues 4"), "{err}");
        assert!(parse(&["x", "--queues", "4", "--consumers", "5"]).validate().is_err());
        assert!(parse(&["x", "--queues", "4", "--producers", "0", "--queue", "q"]).validate().is_err());
        assert!(try_parse(&["x", "--bindings", "5"]).is_err(), "--bindings still needs --exchange");
    }

    #[test]
    fn declare_takes_only_its_own_flags() {
        let declare = parse(&["x", "--declare", "2000", "--durable", "--in-flight", "16", "--rss-pid", "1"]);
        assert_eq!((declare.declare, declare.in_flight, declare.check), (Some(2000), 16, false));
        assert!(declare.validate().is_ok());
        assert_eq!(parse(&["x", "--declare", "5", "--check", "--json"]).in_flight, 64);
        for extra in [
            &["--exchange", "direct"][..],
            &["--queue", "q"],
            &["--queues", "3"],
            &["--producers", "2"],
            &["--count", "10"],
            &["--logins", "10"],
        ] {
            let argv: Vec<&str> = ["x", "--declare", "5"].iter().chain(extra).copied().collect();
            assert!(try_parse(&argv).is_err(), "--declare with {extra:?}");
        }
        assert!(try_parse(&["x", "--declare", "0"]).is_err());
        assert!(try_parse(&["x", "--check"]).is_err(), "--check needs --declare");
        assert!(try_parse(&["x", "--in-flight", "8"]).is_err(), "--in-flight needs --declare");
        assert!(try_parse(&["x", "--declare", "5", "--in-flight", "0"]).is_err());
    }

    #[test]
    fn durations_must_be_positive_numbers() {
        assert_eq!(parse_seconds("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_seconds("0").is_err());
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("soon").is_err());
        assert!(parse_seconds("inf").is_err());
    }

    #[test]
    fn progress_signals_done_whichever_side_comes_last() {
        let (done, rx) = watch::channel(false);
        let progress = Progress { received: AtomicU64::new(0), target: AtomicU64::new(u64::MAX), done };
        progress.record(1);
        progress.record(1);
        assert!(!*rx.borrow());
        progress.expect(2);
        assert!(*rx.borrow(), "all messages arrived before the total was known");

        let (done, rx) = watch::channel(false);
        let progress = Progress { received: AtomicU64::new(0), target: AtomicU64::new(u64::MAX), done };
        progress.expect(1);
        assert!(!*rx.borrow());
        progress.record(0);
        assert!(!*rx.borrow(), "nothing counted");
        progress.record(1);
        assert!(*rx.borrow());
    }

    /// `bench`'s flags from an argument list (the first item stands for the program).
    fn try_parse(argv: &[&str]) -> Result<BenchArgs, clap::Error> {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: BenchArgs,
        }
        Wrapper::try_parse_from(argv).map(|wrapper| wrapper.args)
    }

    fn parse(argv: &[&str]) -> BenchArgs {
        try_parse(argv).unwrap()
    }

    #[test]
    fn drain_needs_a_queue_and_a_consumer_and_takes_no_duration() {
        let drain = parse(&["x", "--producers", "0", "--queue", "backlog", "--count", "5"]);
        assert!(drain.drain());
        assert!(drain.validate().is_ok());
        assert!(parse(&["x", "--producers", "0"]).validate().is_err());
        assert!(parse(&["x", "--producers", "0", "--queue", "q", "--consumers", "0"]).validate().is_err());
        assert!(parse(&["x", "--producers", "0", "--queue", "q", "--duration", "2"]).validate().is_err());
        // Without a producer count the bench publishes as before, to a queue of its own.
        let default = parse(&["x", "--rss-pid", "42"]);
        assert!(!default.drain() && default.validate().is_ok());
        assert_eq!(default.rss_pid, Some(42));
    }

    #[test]
    fn count_and_duration_conflict() {
        assert!(try_parse(&["x", "--count", "5", "--duration", "2"]).is_err());
        assert_eq!(parse(&["x", "--duration", "2"]).duration, Some(Duration::from_secs(2)));
        assert!(try_parse(&["x", "--size", "8"]).is_err());
    }
}
