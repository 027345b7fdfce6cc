//! `kill -9` under load: one client publishes with confirms (pipelined), another consumes and
//! acks, and the broker is killed at a different moment in each cycle. All cycles share one data
//! directory, so later cycles also recover what earlier ones left behind.
//!
//! After each crash the recovered queue must hold every message that was confirmed and not
//! acked with a confirmed ack, nothing that was certainly acked or never published, each
//! message once, in publish order, and every recovered message flagged as possibly delivered.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use hopper_client::{Connection, ConsumeOptions, Delivery, Error, PublishOptions, QueueOptions};
use hopper_tests::{connect, receive_backlog, Broker};
use tokio::sync::watch;

const QUEUE: &str = "crash";
/// Publishes in flight at once.
const PUBLISH_WINDOW: usize = 64;
/// The consumer's prefetch window, and so the most acks it has in flight.
const CONSUMER_PREFETCH: u32 = 64;
/// Small segments, so the cycles also cross segment rolls, deletions and compactions, and a
/// small memory budget, so most deliveries read their message back from the log.
const STORAGE_FLAGS: [&str; 4] = ["--segment-bytes", "65536", "--queue-memory-bytes", "32768"];
/// How long a cycle may take to reach its kill point and see the crash.
const CYCLE_DEADLINE: Duration = Duration::from_secs(30);

/// When a cycle kills the broker: events, never time.
#[derive(Debug, Clone, Copy)]
enum KillPoint {
    /// Once this many publishes of the cycle were confirmed.
    AfterConfirms(u64),
    /// Once this many acks of the cycle were confirmed.
    AfterAcks(u64),
}

/// One run of the broker, from its start to its crash.
#[derive(Debug, Clone, Copy)]
struct Cycle {
    kill: KillPoint,
    /// How many deliveries the consumer acks before it only holds them (`None`: it acks them
    /// all). Holding lets a backlog build up, and leaves deliveries unacked at the crash.
    ack_budget: Option<u64>,
}

const CYCLES: [Cycle; 6] = [
    Cycle { kill: KillPoint::AfterConfirms(50), ack_budget: Some(20) },
    Cycle { kill: KillPoint::AfterConfirms(300), ack_budget: None },
    Cycle { kill: KillPoint::AfterAcks(200), ack_budget: None },
    Cycle { kill: KillPoint::AfterConfirms(1000), ack_budget: Some(300) },
    Cycle { kill: KillPoint::AfterAcks(1), ack_budget: None },
    Cycle { kill: KillPoint::AfterConfirms(2000), ack_budget: Some(1500) },
];

/// A message as the test names it: the cycle that published it and its number in that cycle.
/// The body carries it, so a message can be recognised whatever the broker says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Key {
    cycle: u32,
    index: u32,
}

impl Key {
    /// A body of varying length that starts with the key.
    fn body(self) -> String {
        let padding = (self.index as usize * 37) % 400;
        format!("{}:{}|{}", self.cycle, self.index, "p".repeat(padding))
    }

    fn of(delivery: &Delivery) -> Key {
        let text = std::str::from_utf8(&delivery.body).expect("a UTF-8 body");
        let parsed = text.split_once('|').and_then(|(key, _)| {
            let (cycle, index) = key.split_once(':')?;
            Some(Key { cycle: cycle.parse().ok()?, index: index.parse().ok()? })
        });
        let key = parsed.unwrap_or_else(|| panic!("a body no publisher wrote: {delivery:?}"));
        assert_eq!(&delivery.body[..], key.body().as_bytes(), "the body of {key:?} is intact");
        key
    }
}

/// What the test knows about the queue's contents at the next crash.
#[derive(Default)]
struct Model {
    /// Every message ever published (confirmed or not).
    published: HashSet<Key>,
    /// Message ids, from confirms and deliveries: a message keeps its id.
    ids: HashMap<Key, u64>,
    /// Must be recovered: confirmed (or recovered before) and not acked for certain.
    required: BTreeSet<Key>,
    /// May be recovered: published without a confirm, or acked without a confirmed ack.
    maybe: BTreeSet<Key>,
    /// Must never come back: acked for certain, or missing from an earlier recovery.
    gone: HashSet<Key>,
    /// Delivered at least once: any further delivery must be flagged redelivered.
    delivered: HashSet<Key>,
}

impl Model {
    fn check_id(&mut self, key: Key, id: u64) {
        let known = *self.ids.entry(key).or_insert(id);
        assert_eq!(known, id, "{key:?} changed its message id");
    }

    /// A delivery seen by a consumer: a known message, with its id, flagged if seen before.
    fn check_delivery(&mut self, delivery: &Delivery) -> Key {
        let key = Key::of(delivery);
        assert!(self.published.contains(&key), "{key:?} was never published");
        self.check_id(key, delivery.message_id);
        if !self.delivered.insert(key) {
            assert!(delivery.redelivered, "a second delivery of {key:?} is not flagged: {delivery:?}");
        }
        key
    }

    /// Takes in what a cycle's clients saw before the crash.
    fn record_cycle(&mut self, publisher: PublisherLog, consumer: ConsumerLog) {
        for key in publisher.unconfirmed {
            self.maybe.insert(key);
        }
        for (key, id) in publisher.confirmed {
            self.check_id(key, id);
            self.required.insert(key);
        }
        // Acks after confirms: a message can be delivered, and acked, before its confirm.
        for key in consumer.acked {
            self.required.remove(&key);
            self.maybe.remove(&key);
            self.gone.insert(key);
        }
        for key in consumer.maybe_acked {
            if self.required.remove(&key) {
                self.maybe.insert(key);
            }
        }
    }

    /// Checks the queue the broker recovered (`keys`, in delivery order) and makes it the new
    /// truth: what was recovered must survive the next crash, what was not never comes back.
    fn check_recovery(&mut self, keys: &[Key]) {
        let mut sorted = keys.to_vec();
        sorted.sort_unstable();
        assert_eq!(keys, sorted, "recovered messages come back in publish order");
        let recovered: BTreeSet<Key> = keys.iter().copied().collect();
        assert_eq!(recovered.len(), keys.len(), "a message was recovered twice");
        let lost: Vec<&Key> = self.required.difference(&recovered).collect();
        assert!(lost.is_empty(), "{} confirmed, unacked message(s) lost: {lost:?}", lost.len());
        let returned: Vec<&Key> = recovered.iter().filter(|k| self.gone.contains(k)).collect();
        assert!(returned.is_empty(), "acked (or earlier lost) message(s) came back: {returned:?}");
        let unknown: Vec<&Key> =
            recovered.iter().filter(|k| !self.required.contains(k) && !self.maybe.contains(k)).collect();
        assert!(unknown.is_empty(), "message(s) recovered from nowhere: {unknown:?}");
        self.gone.extend(self.maybe.difference(&recovered).copied());
        self.maybe.clear();
        self.required = recovered;
    }
}

/// What the publisher saw until the connection died.
#[derive(Default)]
struct PublisherLog {
    confirmed: Vec<(Key, u64)>,
    unconfirmed: Vec<Key>,
}

/// What the consumer saw until the connection died.
#[derive(Default)]
struct ConsumerLog {
    /// Acks the broker confirmed as durable.
    acked: Vec<Key>,
    /// Acks sent whose fate is unknown.
    maybe_acked: Vec<Key>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    confirmed: u64,
    acked: u64,
}

/// Publishes numbered messages, `PUBLISH_WINDOW` in flight, until the connection dies. Each
/// is entered in `model` before it is sent.
async fn publish_until_closed(
    conn: Connection,
    cycle: u32,
    model: &Mutex<Model>,
    progress: watch::Sender<Progress>,
) -> PublisherLog {
    let mut log = PublisherLog::default();
    let mut in_flight = FuturesUnordered::new();
    let mut next = 0;
    let mut open = true;
    loop {
        while open && in_flight.len() < PUBLISH_WINDOW {
            let key = Key { cycle, index: next };
            next += 1;
            model.lock().expect("model lock").published.insert(key);
            let confirm = conn.publish(QUEUE, key.body(), PublishOptions::default());
            in_flight.push(confirm.map(move |result| (key, result)));
        }
        let Some((key, result)) = in_flight.next().await else { return log };
        match result {
            Ok(id) => {
                log.confirmed.push((key, id));
                progress.send_modify(|p| p.confirmed += 1);
            }
            Err(Error::Closed(_)) => {
                open = false;
                log.unconfirmed.push(key);
            }
            Err(err) => panic!("publish of {key:?} failed: {err}"),
        }
    }
}

/// Consumes until the connection dies, acking the first `ack_budget` deliveries (every ack
/// confirmed by the broker, up to a prefetch window of them in flight) and holding the rest.
/// Every delivery is checked against `model` on arrival.
async fn consume_until_closed(
    conn: Connection,
    ack_budget: Option<u64>,
    model: &Mutex<Model>,
    progress: watch::Sender<Progress>,
) -> ConsumerLog {
    let mut log = ConsumerLog::default();
    let options =
        ConsumeOptions { prefetch: CONSUMER_PREFETCH, confirm_settlements: true, ..Default::default() };
    let mut consumer = match conn.consume(QUEUE, options).await {
        Ok(consumer) => consumer,
        Err(Error::Closed(_)) => return log,
        Err(err) => panic!("consume: {err}"),
    };
    let mut acks = FuturesUnordered::new();
    let mut acks_sent = 0;
    // Past the budget deliveries are kept, unsettled, until the crash.
    let mut held = Vec::new();
    let mut receiving = true;
    while receiving || !acks.is_empty() {
        tokio::select! {
            next = consumer.next(), if receiving => match next {
                // Deliveries still buffered when the connection died cannot be acked any more:
                // an ack would not be sent. They simply stay unacked.
                Some(Ok(delivery)) if !conn.is_closed() => {
                    let key = model.lock().expect("model lock").check_delivery(&delivery);
                    if ack_budget.is_some_and(|budget| acks_sent >= budget) {
                        held.push(delivery);
                    } else {
                        acks_sent += 1;
                        acks.push(async move { (key, delivery.ack().await) });
                    }
                }
                Some(Ok(_)) | Some(Err(Error::Closed(_))) | None => receiving = false,
                Some(Err(err)) => panic!("the consumer failed: {err}"),
            },
            Some((key, result)) = acks.next() => match result {
                Ok(()) => {
                    log.acked.push(key);
                    progress.send_modify(|p| p.acked += 1);
                }
                // Sent, or not: the broker may have recorded it before it died.
                Err(Error::Closed(_)) => log.maybe_acked.push(key),
                Err(err) => panic!("ack of {key:?} failed: {err}"),
            },
        }
    }
    log
}

/// Receives the whole recovered queue, checks it against `model`, and puts it back.
async fn check_recovered_queue(conn: &Connection, model: &mut Model) {
    let (consumer, deliveries) = receive_backlog(conn, QUEUE).await;
    let mut keys = Vec::with_capacity(deliveries.len());
    for delivery in &deliveries {
        assert!(delivery.redelivered, "after a crash every recovered message is flagged: {delivery:?}");
        keys.push(model.check_delivery(delivery));
    }
    model.check_recovery(&keys);
    assert_eq!(consumer.cancel().await.unwrap(), keys.len() as u64, "cancel requeues the backlog");
}

/// Messages confirmed and sent to each neighbour queue, which nobody consumes.
#[derive(Debug, Default)]
struct Neighbours {
    confirmed: HashMap<String, u64>,
    sent: HashMap<String, u64>,
}

/// Publishes to `queues` in turn, `PUBLISH_WINDOW` in flight, until the connection dies.
async fn publish_to_neighbours(conn: Connection, queues: &[String], counts: &Mutex<Neighbours>) {
    let mut in_flight = FuturesUnordered::new();
    let mut next = 0;
    let mut open = true;
    loop {
        while open && in_flight.len() < PUBLISH_WINDOW {
            let queue = queues[next % queues.len()].clone();
            next += 1;
            *counts.lock().unwrap().sent.entry(queue.clone()).or_default() += 1;
            let confirm = conn.publish(&queue, "neighbour", PublishOptions::default());
            in_flight.push(confirm.map(move |result| (queue, result)));
        }
        let Some((queue, result)) = in_flight.next().await else { return };
        match result {
            Ok(_) => *counts.lock().unwrap().confirmed.entry(queue).or_default() += 1,
            Err(Error::Closed(_)) => open = false,
            Err(err) => panic!("publish to {queue} failed: {err}"),
        }
    }
}

/// Runs every cycle of [`CYCLES`] against a broker started with `fsync_flags`, then checks the
/// final recovery. With `neighbours`, that many other durable queues take publishes meanwhile
/// and are never consumed: their records share the crash queue's log, and their messages pin
/// its old segments, so the cycles also cross compactions that move them.
async fn crash_cycles(fsync_flags: &[&str], neighbours: usize) {
    let data_dir = tempfile::tempdir().unwrap();
    let flags = [&STORAGE_FLAGS[..], fsync_flags].concat();
    let mut broker = Broker::start_in(data_dir.path(), &flags);
    let mut model = Mutex::new(Model::default());
    let neighbour_queues: Vec<String> = (0..neighbours).map(|i| format!("neighbour-{i}")).collect();
    let counts = Mutex::new(Neighbours::default());
    for (cycle, &Cycle { kill, ack_budget }) in CYCLES.iter().enumerate() {
        let cycle = cycle as u32;
        if cycle > 0 {
            broker.restart();
        }
        let setup = connect(&broker).await;
        setup.declare_queue(QUEUE, QueueOptions { durable: true, ..Default::default() }).await.unwrap();
        for queue in &neighbour_queues {
            setup.declare_queue(queue, QueueOptions { durable: true, ..Default::default() }).await.unwrap();
        }
        if cycle > 0 {
            check_recovered_queue(&setup, model.get_mut().unwrap()).await;
        }
        drop(setup);

        let publisher = connect(&broker).await;
        let consumer = connect(&broker).await;
        let (progress, mut watched) = watch::channel(Progress::default());
        let publishing = publish_until_closed(publisher, cycle, &model, progress.clone());
        let consuming = consume_until_closed(consumer, ack_budget, &model, progress);
        let neighbour = match neighbour_queues.is_empty() {
            true => None,
            false => Some(connect(&broker).await),
        };
        let neighbouring = async {
            if let Some(conn) = neighbour {
                publish_to_neighbours(conn, &neighbour_queues, &counts).await;
            }
        };
        let crash = async {
            watched
                .wait_for(|p| match kill {
                    KillPoint::AfterConfirms(n) => p.confirmed >= n,
                    KillPoint::AfterAcks(n) => p.acked >= n,
                })
                .await
                .expect("the clients report progress");
            broker.kill();
        };
        let cycle_run = async { tokio::join!(publishing, consuming, crash, neighbouring) };
        let Ok((published, consumed, (), ())) = tokio::time::timeout(CYCLE_DEADLINE, cycle_run).await else {
            panic!("cycle {cycle} did not reach {kill:?} and its crash in time; {:?}", *watched.borrow());
        };
        model.lock().unwrap().record_cycle(published, consumed);
    }
    broker.restart();
    let conn = connect(&broker).await;
    let mut model = model.into_inner().unwrap();
    check_recovered_queue(&conn, &mut model).await;
    assert!(model.delivered.len() > 1000, "the cycles did some work: {} delivered", model.delivered.len());
    let counts = counts.into_inner().unwrap();
    for queue in &neighbour_queues {
        let held = conn.queue_stats(queue).await.unwrap().ready;
        let (confirmed, sent) = (counts.confirmed.get(queue).copied(), counts.sent.get(queue).copied());
        let (confirmed, sent) = (confirmed.unwrap_or(0), sent.unwrap_or(0));
        assert!(
            (confirmed..=sent).contains(&held),
            "{queue} holds {held}: at least the {confirmed} confirmed, at most the {sent} sent"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_no_confirmed_message_and_revives_no_acked_one() {
    crash_cycles(&[], 0).await;
}

/// The same with twenty more durable queues in the crash queue's log (one storage thread for
/// all), taking publishes and never consumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_with_many_queues_sharing_one_log() {
    crash_cycles(&["--storage-threads", "1"], 20).await;
}

/// Under `batch` and `never` a confirm (of a publish or an ack) means the OS has the record,
/// which a killed process cannot take back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_with_fsync_batch() {
    crash_cycles(&["--fsync", "batch", "--fsync-interval-ms", "3600000"], 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_with_fsync_never() {
    crash_cycles(&["--fsync", "never"], 0).await;
}
