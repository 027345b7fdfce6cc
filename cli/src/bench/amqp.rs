//! `hopper bench --amqp URL`: the same workload driven over AMQP 0-9-1, against Hopper's AMQP
//! listener or any AMQP broker (RabbitMQ), with a client that costs little: frames are built
//! and parsed with `amq-protocol` (the codec lapin uses) and written in batches, publishes as
//! fast as the confirm window allows and each read's acks in one write. Deliveries are read
//! with the crate's parsers of `basic.deliver` and of the content header, past its general
//! frame parser, and bodies are written from where they are. It measures what the broker can
//! take when the client is not the limit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amq_protocol::frame::parsing::parse_content_header;
use amq_protocol::frame::{gen_frame, parse_frame, AMQPContentHeader, AMQPFrame, WriteContext};
use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::protocol::constants::{FRAME_BODY, FRAME_END, FRAME_HEADER, FRAME_METHOD};
use amq_protocol::protocol::{basic, channel, confirm, connection, exchange, queue, AMQPClass};
use amq_protocol::types::FieldTable;
use anyhow::{bail, Context};
use bytes::BytesMut;
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::{decode_timestamp, encode_body, new_histogram, rate, unix_nanos, BenchArgs};
use crate::exchange::KindArg;
use crate::output::BenchReport;

/// Bytes written at once by a publisher.
const WRITE_BATCH: usize = 64 * 1024;
/// Time a run may go without progress before it fails.
const STALL: Duration = Duration::from_secs(10);

/// Where to connect and as whom: `amqp://user:password@host:port/vhost`.
struct Target {
    addr: String,
    user: String,
    password: String,
    vhost: String,
}

impl Target {
    fn parse(url: &str) -> anyhow::Result<Target> {
        let rest = url.strip_prefix("amqp://").context("an AMQP URL starts with amqp://")?;
        let (credentials, rest) = rest.rsplit_once('@').unwrap_or(("guest:guest", rest));
        let (user, password) = credentials.split_once(':').unwrap_or((credentials, ""));
        let (addr, vhost) = rest.split_once('/').unwrap_or((rest, ""));
        let vhost = match percent_encoding::percent_decode_str(vhost).decode_utf8()?.as_ref() {
            "" => "/".to_owned(),
            vhost => vhost.to_owned(),
        };
        let addr = if addr.contains(':') { addr.to_owned() } else { format!("{addr}:5672") };
        let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8().map(|s| s.into_owned());
        Ok(Target { addr, user: decode(user)?, password: decode(password)?, vhost })
    }
}

/// One AMQP connection with channel 1 open.
struct Conn {
    read: OwnedReadHalf,
    write: OwnedWriteHalf,
    buf: BytesMut,
    frame_max: usize,
}

impl Conn {
    async fn open(target: &Target) -> anyhow::Result<Conn> {
        let stream =
            TcpStream::connect(&target.addr).await.with_context(|| format!("connect to {}", target.addr))?;
        stream.set_nodelay(true)?;
        let (read, write) = stream.into_split();
        let mut conn = Conn { read, write, buf: BytesMut::with_capacity(256 * 1024), frame_max: 4096 };
        conn.write.write_all(b"AMQP\x00\x00\x09\x01").await?;
        let AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Start(_))) =
            conn.next().await?
        else {
            bail!("the broker did not start the AMQP handshake");
        };
        let response = format!("\0{}\0{}", target.user, target.password);
        let start_ok = connection::StartOk {
            client_properties: FieldTable::default(),
            mechanism: "PLAIN".into(),
            response: response.into(),
            locale: "en_US".into(),
        };
        conn.send(0, AMQPClass::Connection(connection::AMQPMethod::StartOk(start_ok))).await?;
        let tune = match conn.next().await? {
            AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Tune(tune))) => tune,
            other => bail!("login refused: {other:?}"),
        };
        conn.frame_max = if tune.frame_max == 0 { 128 * 1024 } else { tune.frame_max as usize };
        let tune_ok = connection::TuneOk { channel_max: 1, frame_max: conn.frame_max as u32, heartbeat: 0 };
        conn.send(0, AMQPClass::Connection(connection::AMQPMethod::TuneOk(tune_ok))).await?;
        let open = connection::Open { virtual_host: target.vhost.as_str().into() };
        conn.call(0, AMQPClass::Connection(connection::AMQPMethod::Open(open))).await?;
        conn.call(1, AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {}))).await?;
        Ok(conn)
    }

    /// The next frame.
    async fn next(&mut self) -> anyhow::Result<AMQPFrame> {
        loop {
            if let Some(frame) = self.parsed() {
                return Ok(frame);
            }
            let read = tokio::time::timeout(STALL, self.read.read_buf(&mut self.buf)).await;
            match read.context("no frame from the broker in time")?? {
                0 => bail!("the broker closed the connection"),
                _ => continue,
            }
        }
    }

    /// A whole frame already read, if there is one.
    fn parsed(&mut self) -> Option<AMQPFrame> {
        let (rest, frame) = parse_frame(&self.buf[..]).ok()?;
        let used = self.buf.len() - rest.len();
        let _ = self.buf.split_to(used);
        Some(frame)
    }

    async fn send(&mut self, channel: u16, method: AMQPClass) -> anyhow::Result<()> {
        let mut out = Vec::new();
        push(&mut out, &AMQPFrame::Method(channel, method));
        self.write.write_all(&out).await?;
        Ok(())
    }

    /// Sends a method and waits for its answer; a close is an error.
    async fn call(&mut self, channel: u16, method: AMQPClass) -> anyhow::Result<AMQPFrame> {
        self.send(channel, method).await?;
        match self.next().await? {
            AMQPFrame::Method(_, AMQPClass::Channel(channel::AMQPMethod::Close(close))) => {
                bail!("channel closed: {} {}", close.reply_code, close.reply_text)
            }
            AMQPFrame::Method(_, AMQPClass::Connection(connection::AMQPMethod::Close(close))) => {
                bail!("connection closed: {} {}", close.reply_code, close.reply_text)
            }
            answer => Ok(answer),
        }
    }
}

/// What a consumer reads from a frame.
enum Read {
    /// A `basic.deliver` on a channel, with its delivery tag.
    Deliver(u16, u64),
    /// A content header.
    Header,
    /// A body frame on a channel, with the send time it carries.
    Body(u16, Option<u64>),
    /// Any other frame (boxed: a frame is some 300 bytes).
    Other(Box<AMQPFrame>),
}

impl Conn {
    /// The next frame, as a consumer reads it.
    async fn read(&mut self) -> anyhow::Result<Read> {
        loop {
            if let Some(read) = self.read_fast()? {
                return Ok(read);
            }
            if let Some(frame) = self.parsed() {
                return Ok(Read::Other(Box::new(frame)));
            }
            let read = tokio::time::timeout(STALL, self.read.read_buf(&mut self.buf)).await;
            if read.context("no frame from the broker in time")?? == 0 {
                bail!("the broker closed the connection");
            }
        }
    }

    /// A delivery's frame already read, if the next frame is one.
    fn read_fast(&mut self) -> anyhow::Result<Option<Read>> {
        let buf = &self.buf[..];
        if buf.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let channel = u16::from_be_bytes([buf[1], buf[2]]);
        let len = FRAME_HEADER_LEN + u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize + 1;
        if buf.len() < len || buf[len - 1] != FRAME_END {
            return Ok(None);
        }
        let payload = &buf[FRAME_HEADER_LEN..len - 1];
        let read = match buf[0] {
            FRAME_BODY => Read::Body(channel, decode_timestamp(payload)),
            FRAME_HEADER => {
                parse_content_header(payload)
                    .map_err(|err| anyhow::anyhow!("malformed content header: {err:?}"))?;
                Read::Header
            }
            FRAME_METHOD if payload.starts_with(&DELIVER) => {
                let (_, deliver) = basic::parse_deliver(&payload[DELIVER.len()..])
                    .map_err(|err| anyhow::anyhow!("malformed basic.deliver: {err:?}"))?;
                Read::Deliver(channel, deliver.delivery_tag)
            }
            _ => return Ok(None),
        };
        let _ = self.buf.split_to(len);
        Ok(Some(read))
    }
}

/// Bytes of a frame's type, channel and size.
const FRAME_HEADER_LEN: usize = 7;
/// The class and method ids that open a `basic.deliver`'s arguments.
const DELIVER: [u8; 4] = [0, 60, 0, 60];

/// Appends a content body frame of `part` on `channel` to `out`, written with the crate's
/// writers of each field from the body where it is (the crate's frame type owns a copy).
fn push_body(out: &mut Vec<u8>, channel: u16, part: &[u8]) {
    use amq_protocol::types::generation::{gen_id, gen_long_uint, gen_short_short_uint, GenResult};
    use std::io::Write;
    fn body(context: WriteContext<Vec<u8>>, channel: u16, part: &[u8]) -> GenResult<Vec<u8>> {
        let size = u32::try_from(part.len()).expect("a body frame is cut to the frame size");
        let mut context = gen_long_uint(size)(gen_id(channel)(gen_short_short_uint(FRAME_BODY)(context)?)?)?;
        context.write_all(part)?;
        gen_short_short_uint(FRAME_END)(context)
    }
    *out = body(WriteContext::from(std::mem::take(out)), channel, part).expect("writing to memory").write;
}

/// Appends the bytes of `frame` to `out`.
fn push(out: &mut Vec<u8>, frame: &AMQPFrame) {
    let written =
        gen_frame(frame)(WriteContext::from(std::mem::take(out))).expect("the bench builds valid frames");
    *out = written.write;
}

/// The queues and exchange of a run, declared over AMQP.
struct Layout {
    exchange: String,
    routing_key: String,
    queues: Vec<String>,
}

async fn declare(conn: &mut Conn, args: &BenchArgs, base: &str) -> anyhow::Result<Layout> {
    let durable = args.durable;
    let declare_queue = |name: &str| queue::Declare { queue: name.into(), durable, ..Default::default() };
    let Some(kind) = args.exchange else {
        conn.call(1, AMQPClass::Queue(queue::AMQPMethod::Declare(declare_queue(base)))).await?;
        return Ok(Layout {
            exchange: String::new(),
            routing_key: base.to_owned(),
            queues: vec![base.to_owned()],
        });
    };
    let exchange = format!("bench-x-{}", std::process::id());
    let kind_name = match kind {
        KindArg::Direct => "direct",
        KindArg::Fanout => "fanout",
        KindArg::Topic => "topic",
        KindArg::Headers => bail!("--amqp runs direct, fanout and topic exchanges"),
    };
    let declared = exchange::Declare {
        exchange: exchange.as_str().into(),
        kind: kind_name.into(),
        durable,
        ..Default::default()
    };
    conn.call(1, AMQPClass::Exchange(exchange::AMQPMethod::Declare(declared))).await?;
    let width = if matches!(kind, KindArg::Fanout) { args.queues.max(1) } else { 1 };
    let queues: Vec<String> = (0..width).map(|i| format!("{base}-{i}")).collect();
    let routing_key = "orders.eu.paid".to_owned();
    for name in &queues {
        conn.call(1, AMQPClass::Queue(queue::AMQPMethod::Declare(declare_queue(name)))).await?;
        let bind = queue::Bind {
            queue: name.as_str().into(),
            exchange: exchange.as_str().into(),
            routing_key: routing_key.as_str().into(),
            ..Default::default()
        };
        conn.call(1, AMQPClass::Queue(queue::AMQPMethod::Bind(bind))).await?;
    }
    // Bindings that match nothing, on a queue of their own (as peerbench makes them).
    if args.bindings > 1 {
        let sink = format!("{base}-sink");
        conn.call(1, AMQPClass::Queue(queue::AMQPMethod::Declare(declare_queue(&sink)))).await?;
        for i in 1..args.bindings {
            let pattern = format!("w{}.w{}.w{}", i % 1000, (i / 1000) % 1000, i % 7);
            let bind = queue::Bind {
                queue: sink.as_str().into(),
                exchange: exchange.as_str().into(),
                routing_key: pattern.into(),
                ..Default::default()
            };
            conn.call(1, AMQPClass::Queue(queue::AMQPMethod::Bind(bind))).await?;
        }
    }
    Ok(Layout { exchange, routing_key, queues })
}

/// What a consumer saw.
struct Consumed {
    received: u64,
    last: Option<Instant>,
    latencies: Histogram<u64>,
}

/// Consumes `expected` messages of each of `queues` on one connection, a channel each,
/// acking each (or every `ack_every`), the acks of one read in one write.
async fn consume(
    target: Arc<Target>,
    queues: Vec<String>,
    expected: u64,
    prefetch: u16,
    ack_every: u64,
    ready: Arc<Notify>,
) -> anyhow::Result<Consumed> {
    let mut conn = Conn::open(&target).await?;
    for (index, queue) in queues.iter().enumerate() {
        let channel = index as u16 + 1;
        if channel > 1 {
            conn.call(channel, AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {}))).await?;
        }
        let qos = basic::Qos { prefetch_count: prefetch, global: false };
        conn.call(channel, AMQPClass::Basic(basic::AMQPMethod::Qos(qos))).await?;
        let consume = basic::Consume {
            queue: queue.as_str().into(),
            consumer_tag: "bench".into(),
            ..Default::default()
        };
        conn.call(channel, AMQPClass::Basic(basic::AMQPMethod::Consume(consume))).await?;
    }
    ready.notify_one();
    let mut latencies = new_histogram();
    let (mut received, mut last, mut acks) = (0u64, None, Vec::new());
    // Per channel: deliveries so far, and the tag of the latest.
    let mut channels = vec![(0u64, 0u64); queues.len() + 1];
    let total = expected * queues.len() as u64;
    while received < total {
        match conn.read().await? {
            Read::Deliver(channel, tag) => channels[usize::from(channel)].1 = tag,
            Read::Header => {}
            Read::Body(channel, sent) => {
                received += 1;
                last = Some(Instant::now());
                if let Some(sent) = sent {
                    let _ = latencies.record(unix_nanos().saturating_sub(sent) / 1000);
                }
                let (count, tag) = &mut channels[usize::from(channel)];
                *count += 1;
                if *count % ack_every == 0 || *count == expected {
                    let ack = basic::Ack { delivery_tag: *tag, multiple: ack_every > 1 };
                    push(
                        &mut acks,
                        &AMQPFrame::Method(channel, AMQPClass::Basic(basic::AMQPMethod::Ack(ack))),
                    );
                }
            }
            Read::Other(frame) => {
                if let AMQPFrame::Method(_, AMQPClass::Channel(channel::AMQPMethod::Close(close))) = *frame {
                    bail!("a consumer's channel was closed: {} {}", close.reply_code, close.reply_text)
                }
            }
        }
        // Everything read so far is handled: its acks go out together.
        if !acks.is_empty() && conn.buf.is_empty() {
            conn.write.write_all(&acks).await?;
            acks.clear();
        }
    }
    if !acks.is_empty() {
        conn.write.write_all(&acks).await?;
    }
    Ok(Consumed { received, last, latencies })
}

/// Publishes `count` messages, in batches of writes; with confirms, at most `window` await
/// theirs. Returns when the last is confirmed (or written, without confirms), with the
/// connection's write half: closing it before the consumers are done could lose what the
/// broker has not read yet (RabbitMQ drops it).
async fn publish(
    conn: Conn,
    layout: &Layout,
    args: &BenchArgs,
    count: u64,
) -> anyhow::Result<(Instant, OwnedWriteHalf)> {
    let Conn { read, mut write, buf, frame_max } = conn;
    let confirmed = Arc::new(AtomicU64::new(0));
    let progress = Arc::new(Notify::new());
    let reader =
        args.durable.then(|| tokio::spawn(read_confirms(read, buf, confirmed.clone(), progress.clone())));
    let properties = if args.durable {
        AMQPProperties::default().with_delivery_mode(2)
    } else {
        AMQPProperties::default()
    };
    let mut chunk = BytesMut::new();
    let mut out = Vec::with_capacity(WRITE_BATCH * 2);
    // Every publish has the same method and content header: built once.
    let publish = AMQPFrame::Method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: layout.exchange.as_str().into(),
            routing_key: layout.routing_key.as_str().into(),
            ..Default::default()
        })),
    );
    let header = AMQPFrame::Header(1, AMQPContentHeader { class_id: 60, body_size: args.size, properties });
    let window = args.confirm_window;
    for n in 1..=count {
        if args.durable {
            while n.saturating_sub(confirmed.load(Ordering::Acquire)) > window {
                if !out.is_empty() {
                    write.write_all(&out).await?;
                    out.clear();
                }
                tokio::time::timeout(STALL, progress.notified()).await.context("no confirm in time")?;
            }
        }
        let body = encode_body(&mut chunk, args.size as usize, unix_nanos());
        push(&mut out, &publish);
        push(&mut out, &header);
        for part in body.chunks(frame_max - 8) {
            push_body(&mut out, 1, part);
        }
        if out.len() >= WRITE_BATCH {
            write.write_all(&out).await?;
            out.clear();
        }
    }
    write.write_all(&out).await?;
    if args.durable {
        while confirmed.load(Ordering::Acquire) < count {
            tokio::time::timeout(STALL, progress.notified()).await.context("no confirm in time")?;
        }
    }
    let done = Instant::now();
    if let Some(reader) = reader {
        reader.abort();
    }
    Ok((done, write))
}

/// Reads a publisher's confirms, keeping the highest tag acked in `confirmed`.
async fn read_confirms(
    mut read: OwnedReadHalf,
    mut buf: BytesMut,
    confirmed: Arc<AtomicU64>,
    progress: Arc<Notify>,
) -> anyhow::Result<()> {
    loop {
        while let Ok((rest, frame)) = parse_frame(&buf[..]) {
            let used = buf.len() - rest.len();
            let _ = buf.split_to(used);
            match frame {
                AMQPFrame::Method(_, AMQPClass::Basic(basic::AMQPMethod::Ack(ack))) => {
                    confirmed.fetch_max(ack.delivery_tag, Ordering::Release);
                    progress.notify_one();
                }
                AMQPFrame::Method(_, AMQPClass::Basic(basic::AMQPMethod::Nack(_))) => {
                    bail!("a publish was nacked")
                }
                AMQPFrame::Method(_, AMQPClass::Channel(channel::AMQPMethod::Close(close))) => {
                    bail!("the publisher's channel was closed: {} {}", close.reply_code, close.reply_text)
                }
                _ => {}
            }
        }
        if read.read_buf(&mut buf).await? == 0 {
            bail!("the broker closed the publisher's connection");
        }
    }
}

/// Runs the workload of `args` over AMQP at `url`.
pub async fn run(url: &str, args: &BenchArgs) -> anyhow::Result<BenchReport> {
    if args.producers != 1
        || args.rate != 0
        || args.duration.is_some()
        || args.delay.is_some()
        || args.replicated
        || args.queue.is_some()
        || args.consume_rate != 0
        || args.sample_every.is_some()
    {
        bail!(
            "--amqp runs one producer and --consumers connections (0: it only publishes), as fast as they go: it takes --count, \
             --size, --prefetch, --consumers, --durable, --confirm-window, --ack-every, --exchange, --queues \
             and --bindings"
        );
    }
    let queues = match args.exchange {
        Some(KindArg::Fanout) => args.queues.max(1),
        _ => 1,
    };
    if args.consumers > queues {
        bail!("--consumers {} is more than the run's {queues} queue(s)", args.consumers);
    }
    let target = Arc::new(Target::parse(url)?);
    let base = format!("bench-{}", std::process::id());
    let mut admin = Conn::open(&target).await?;
    let layout = declare(&mut admin, args, &base).await?;
    let prefetch = u16::try_from(args.prefetch).context("--prefetch is at most 65535 over AMQP")?;
    let count = args.count;
    // As over Hopper's protocol: the queues spread over the consuming connections.
    let connections = args.consumers as usize;
    let mut consumers = tokio::task::JoinSet::new();
    let ready = Arc::new(Notify::new());
    for first in 0..connections {
        let mine: Vec<String> = layout.queues.iter().skip(first).step_by(connections).cloned().collect();
        consumers.spawn(consume(target.clone(), mine, count, prefetch, args.ack_every, ready.clone()));
        ready.notified().await;
    }
    let mut publisher = Conn::open(&target).await?;
    if args.durable {
        publisher
            .call(1, AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select { nowait: false })))
            .await?;
    }
    let start = Instant::now();
    let (publish_end, _open) = publish(publisher, &layout, args, count).await.context("the producer")?;
    let (mut received, mut last, mut latencies) = (0, None, new_histogram());
    while let Some(joined) = consumers.join_next().await {
        let consumed = joined.context("a consumer panicked")?.context("a consumer")?;
        received += consumed.received;
        last = last.max(consumed.last);
        latencies.add(&consumed.latencies)?;
    }
    for name in layout.queues.iter().cloned().chain((args.bindings > 1).then(|| format!("{base}-sink"))) {
        let delete = queue::Delete { queue: name.into(), ..Default::default() };
        admin
            .call(1, AMQPClass::Queue(queue::AMQPMethod::Delete(delete)))
            .await
            .context("deleting the queues")?;
    }
    if !layout.exchange.is_empty() {
        let delete = exchange::Delete { exchange: layout.exchange.as_str().into(), ..Default::default() };
        admin.call(1, AMQPClass::Exchange(exchange::AMQPMethod::Delete(delete))).await?;
    }
    let consume_end = last.unwrap_or(publish_end);
    let percentile = |q: f64| if latencies.is_empty() { 0 } else { latencies.value_at_quantile(q) };
    Ok(BenchReport {
        publish_rate: rate(count, publish_end.duration_since(start).as_secs_f64()),
        consume_rate: rate(received, consume_end.duration_since(start).as_secs_f64()),
        p50_us: percentile(0.5),
        p99_us: percentile(0.99),
        p999_us: percentile(0.999),
        max_us: if latencies.is_empty() { 0 } else { latencies.max() },
        sent: count,
        received,
        elapsed_s: consume_end.max(publish_end).duration_since(start).as_secs_f64(),
        size: args.size,
        prefetch: args.prefetch,
        producers: 1,
        consumers: args.consumers,
        queues: layout.queues.len() as u32,
        max_confirm_gap_ms: None,
        broker_rss_mb: None,
        broker_cpu_s: None,
        delay_ms: None,
        max_unacked: None,
        depth: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_the_broker_the_user_and_the_vhost() {
        let target = Target::parse("amqp://guest:gu%40st@127.0.0.1:5673/%2f").unwrap();
        assert_eq!(
            (target.addr.as_str(), target.user.as_str(), target.password.as_str()),
            ("127.0.0.1:5673", "guest", "gu@st")
        );
        assert_eq!(target.vhost, "/");
        let bare = Target::parse("amqp://mq.example.com").unwrap();
        assert_eq!((bare.addr.as_str(), bare.vhost.as_str()), ("mq.example.com:5672", "/"));
        assert!(Target::parse("http://x").is_err());
    }
}
