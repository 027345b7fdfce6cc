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

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use bytes::{Bytes, BytesMut};
use clap::Args;
use futures::StreamExt;
use hdrhistogram::Histogram;
use hopper_client::{
    Connection, ConsumeOptions, DeleteOptions, Delivery, ExchangeOptions, PublishConfirm, PublishOptions,
    QueueOptions,
};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::bench_watch::{read_cpu_time, DepthSampler, RssSampler};
use crate::output::{self, BenchReport};

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
percentiles (µs) and the elapsed time; with --json, one object with keys publish_rate, \
consume_rate, p50_us, p99_us, p999_us, max_us, sent, received, elapsed_s, size, prefetch, \
producers, consumers, and broker_rss_mb with --rss-pid. Without --queue, a queue named bench-<pid> \
is declared and deleted at the end. With --producers 0, --queue must name an existing queue \
holding at least --count messages; they are consumed and acknowledged, and latency is measured \
from the time each was published.")]
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
    /// Publish through an exchange of this type (bench-x-<pid>) instead of to the queue; see
    /// --queues and --bindings.
    #[arg(long = "exchange", value_name = "TYPE", value_enum)]
    pub exchange: Option<crate::exchange::KindArg>,
    /// With --exchange: this many queues (QUEUE-0, QUEUE-1, ...) take every message, one
    /// consumer each at least.
    #[arg(long, default_value_t = 1, value_parser = crate::at_least(1u32), requires = "exchange")]
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
}

impl BenchArgs {
    /// Whether this run only consumes messages already in the queue.
    fn drain(&self) -> bool {
        self.producers == 0
    }

    /// Rejects flag combinations that cannot make a run.
    fn validate(&self) -> anyhow::Result<()> {
        if self.drain() && self.exchange.is_some() {
            bail!("--producers 0 drains a queue; --exchange does not apply");
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
    let (queue, temporary) = match &args.queue {
        Some(name) => (name.clone(), false),
        None => (format!("bench-{}", std::process::id()), true),
    };
    let admin = crate::connect(server, "bench").await?;
    let route = match args.exchange {
        Some(kind) => Some(Route::declare(&admin, kind, &queue, &args).await?),
        None => None,
    };
    let queues = route.as_ref().map_or_else(|| vec![queue.clone()], |r| r.queues.clone());
    if args.drain() {
        // The backlog must already be there; declaring would create an empty queue instead.
        admin.queue_exists(&queue).await.with_context(|| format!("queue '{queue}'"))?;
    } else if route.is_none() {
        admin.declare_queue(&queue, QueueOptions { durable: args.durable, ..Default::default() }).await?;
    }
    let sampler = args.rss_pid.map(RssSampler::start).transpose()?;
    let cpu_before = args.rss_pid.map(read_cpu_time).transpose()?;
    let depth = match args.sample_every {
        Some(every) => {
            let conn = crate::connect(server, "bench depth").await?;
            Some(DepthSampler::start(conn, queue.clone(), every, Instant::now()))
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
        for queue in &queues {
            if let Err(err) = admin.delete_queue(queue, DeleteOptions::default()).await {
                eprintln!("hopper: warning: could not delete queue '{queue}': {err}");
            }
        }
    }
    if let Some(route) = &route {
        if let Err(err) = admin.delete_exchange(&route.exchange, false).await {
            eprintln!("hopper: warning: could not delete exchange '{}': {err}", route.exchange);
        }
    }
    let _ = admin.close().await;
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", output::bench_listing(&report));
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
    /// Counts one delivery and signals the end when it was the last one expected.
    fn record(&self) {
        let received = self.received.fetch_add(1, Ordering::SeqCst) + 1;
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

/// What one producer did.
struct Produced {
    sent: u64,
    finished: Instant,
}

/// What one consumer saw.
struct Consumed {
    latencies: Histogram<u64>,
    last_delivery: Option<Instant>,
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
    let mut consumers = JoinSet::new();
    for (i, conn) in consumer_conns.into_iter().enumerate() {
        let options = ConsumeOptions {
            prefetch: args.prefetch,
            tag: format!("bench-consumer-{i}"),
            ..Default::default()
        };
        let consumer = conn.consume(&queues[i % queues.len()], options).await?;
        let progress = Arc::clone(&progress);
        let pacing = Pacing {
            ack_every: args.ack_every,
            delay_ns: args.delay.map_or(0, |d| d.as_nanos() as u64),
            interval: (args.consume_rate > 0).then(|| f64::from(consumers_wanted) / args.consume_rate as f64),
        };
        consumers.spawn(async move {
            let result = consume(consumer, pacing, &progress).await;
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
    for (i, conn) in (0u64..).zip(producer_conns) {
        let plan = Plan {
            queue: queues[0].clone(),
            route: route.map(|r| (r.exchange.clone(), r.routing_key.clone(), r.headers.clone())),
            size,
            window,
            count: args.duration.is_none().then(|| share(args.count, args.producers.into(), i)),
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
    while let Some(joined) = producers.join_next().await {
        let produced = joined.context("a producer panicked")?.context("producer failed")?;
        sent += produced.sent;
        publish_end = publish_end.max(produced.finished);
    }
    if !args.drain() {
        progress.expect(sent * queues.len() as u64);
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
        broker_rss_mb: None,
        broker_cpu_s: None,
        delay_ms: args.delay.map(|d| d.as_millis() as u64),
        max_unacked: None,
        depth: Vec::new(),
    })
}

/// One producer's assignment.
struct Plan {
    queue: String,
    /// Through an exchange: its name, the routing key and the headers to publish with.
    route: Option<(String, String, HashMap<String, String>)>,
    size: usize,
    window: usize,
    /// Messages to send, or `None` to send until `deadline`.
    count: Option<u64>,
    deadline: Option<Instant>,
    /// Seconds between this producer's messages at a fixed rate.
    interval: Option<f64>,
    start: Instant,
    /// Publish delay of every message.
    delay: Option<Duration>,
}

/// How a consumer settles: in batches, at a steady rate, and what delay to discount from
/// latencies.
#[derive(Debug, Clone, Copy)]
struct Pacing {
    ack_every: u64,
    /// Publish delay of the messages, subtracted so latency is lateness past the due time.
    delay_ns: u64,
    /// Seconds between this consumer's settles at a fixed consume rate.
    interval: Option<f64>,
}

/// Publishes per `plan` with up to `plan.window` confirms outstanding; returns how many were
/// confirmed.
async fn produce(conn: &Connection, plan: &Plan) -> anyhow::Result<Produced> {
    let mut in_flight: VecDeque<PublishConfirm> = VecDeque::with_capacity(plan.window.min(1 << 16));
    let mut chunk = BytesMut::new();
    let mut sent = 0u64;
    loop {
        if plan.count.is_some_and(|count| sent >= count) {
            break;
        }
        match plan.interval {
            Some(interval) => {
                // Due times are absolute, so time lost to a slow confirm or a late timer is
                // made up by not waiting until the schedule is caught up, rather than shifting
                // every later send. A timed run sends exactly the messages due before the end.
                let due = plan.start + Duration::from_secs_f64(sent as f64 * interval);
                if plan.deadline.is_some_and(|deadline| due >= deadline) {
                    break;
                }
                if due > Instant::now() {
                    tokio::time::sleep_until(due.into()).await;
                }
            }
            None if plan.deadline.is_some_and(|deadline| Instant::now() >= deadline) => break,
            None => {}
        }
        if in_flight.len() >= plan.window {
            if let Some(confirm) = in_flight.pop_front() {
                confirm.await?;
            }
        }
        let body = encode_body(&mut chunk, plan.size, unix_nanos());
        let confirm = match &plan.route {
            Some((exchange, key, headers)) => {
                let options =
                    PublishOptions { delay: plan.delay, headers: headers.clone(), ..Default::default() };
                conn.publish_to(exchange, key, body, options)
            }
            None => {
                conn.publish(&plan.queue, body, PublishOptions { delay: plan.delay, ..Default::default() })
            }
        };
        in_flight.push_back(confirm);
        sent += 1;
    }
    while let Some(confirm) = in_flight.pop_front() {
        confirm.await?;
    }
    Ok(Produced { sent, finished: Instant::now() })
}

/// Receives until `progress` says every message has arrived, recording latencies.
async fn consume(
    mut consumer: hopper_client::Consumer,
    pacing: Pacing,
    progress: &Progress,
) -> anyhow::Result<Consumed> {
    let ack_every = pacing.ack_every;
    let started = Instant::now();
    let clock = UnixClock::new();
    let mut handled = 0u64;
    let mut done = progress.done.subscribe();
    let mut latencies = new_histogram();
    let mut last_delivery = None;
    let mut unacked = 0u64;
    let mut pending: Option<Delivery> = None;
    loop {
        let delivery = tokio::select! {
            biased;
            next = consumer.next() => match next {
                Some(delivery) => delivery?,
                None => bail!("the broker ended the consumer"),
            },
            _ = done.wait_for(|done| *done) => break,
        };
        // One clock read per delivery: Unix time is derived from the monotonic one.
        let received = Instant::now();
        let now = clock.unix_nanos(received);
        last_delivery = Some(received);
        if let Some(sent_at) = decode_timestamp(&delivery.body) {
            latencies.saturating_record(now.saturating_sub(sent_at + pacing.delay_ns) / 1000);
        }
        if let Some(interval) = pacing.interval {
            // A worker that handles a steady number per second: settle on schedule.
            let due = started + Duration::from_secs_f64(handled as f64 * interval);
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
            }
        }
        handled += 1;
        unacked += 1;
        if unacked >= ack_every {
            if ack_every == 1 {
                delivery.ack().await?;
            } else {
                delivery.ack_multiple().await?;
            }
            unacked = 0;
            pending = None;
        } else {
            pending = Some(delivery);
        }
        progress.record();
    }
    if let Some(delivery) = pending {
        delivery.ack_multiple().await?;
    }
    consumer.cancel().await?;
    Ok(Consumed { latencies, last_delivery })
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

/// Nanoseconds since the Unix epoch, by the wall clock (producers and consumers may be in
/// different processes, so a monotonic clock would not compare).
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
            admin.declare_queue(queue, QueueOptions { durable: args.durable, ..Default::default() }).await?;
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
        progress.record();
        progress.record();
        assert!(!*rx.borrow());
        progress.expect(2);
        assert!(*rx.borrow(), "all messages arrived before the total was known");

        let (done, rx) = watch::channel(false);
        let progress = Progress { received: AtomicU64::new(0), target: AtomicU64::new(u64::MAX), done };
        progress.expect(1);
        assert!(!*rx.borrow());
        progress.record();
        assert!(*rx.borrow());
    }

    #[test]
    fn drain_needs_a_queue_and_a_consumer_and_takes_no_duration() {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: BenchArgs,
        }
        let parse = |argv: &[&str]| Wrapper::try_parse_from(argv).unwrap().args;
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
        use clap::Parser;
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: BenchArgs,
        }
        assert!(Wrapper::try_parse_from(["x", "--count", "5", "--duration", "2"]).is_err());
        let parsed = Wrapper::try_parse_from(["x", "--duration", "2"]).unwrap();
        assert_eq!(parsed.args.duration, Some(Duration::from_secs(2)));
        assert!(Wrapper::try_parse_from(["x", "--size", "8"]).is_err());
    }
}
