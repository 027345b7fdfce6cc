//! A bench consumer connection: takes the deliveries of its consumers (one per queue it was
//! given) as one stream, records their latencies and acknowledges them, singly or in batches.

use std::collections::HashMap;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::bail;
use futures::{FutureExt as _, Stream, StreamExt};
use hdrhistogram::Histogram;
use hopper_client::Consumer;

use super::{decode_timestamp, new_histogram, Progress, UnixClock};

/// Most deliveries a consumer handles before it adds them to the shared count.
const RECORD_EVERY: u64 = 256;

/// What one consumer connection saw.
pub(super) struct Consumed {
    /// End-to-end latencies in microseconds.
    pub latencies: Histogram<u64>,
    /// When the last delivery arrived, if any did.
    pub last_delivery: Option<Instant>,
}

/// How a consumer settles: in batches, at a steady rate, and what delay to discount from
/// latencies.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pacing {
    /// Deliveries of one consumer acknowledged at once.
    pub ack_every: u64,
    /// Publish delay of the messages, subtracted so latency is lateness past the due time.
    pub delay_ns: u64,
    /// Seconds between this connection's settles at a fixed consume rate.
    pub interval: Option<f64>,
}

/// Receives from `consumers` (all on one connection) until `progress` says every message has
/// arrived, recording latencies in one histogram for them all.
pub(super) async fn consume(
    consumers: Vec<Consumer>,
    pacing: Pacing,
    progress: &Progress,
) -> anyhow::Result<Consumed> {
    let started = Instant::now();
    let clock = UnixClock::new();
    let mut handled = 0u64;
    let mut done = progress.done.subscribe();
    let mut latencies = new_histogram();
    let mut last_delivery = None;
    let mut batches = AckBatches::new(pacing.ack_every);
    let mut deliveries = Merged::new(consumers);
    // Deliveries that are ready together (the client hands them over a socket read at a
    // time) share one clock reading and one update of the count shared by all consumers:
    // both are made per wake-up rather than per delivery.
    let mut arrived = None;
    let mut unrecorded = 0u64;
    loop {
        let next = match deliveries.next().now_or_never() {
            Some(next) => next,
            None => {
                // Counted before waiting, so the run cannot wait for deliveries already taken.
                progress.record(std::mem::take(&mut unrecorded));
                arrived = None;
                tokio::select! {
                    biased;
                    next = deliveries.next() => next,
                    _ = done.wait_for(|done| *done) => break,
                }
            }
        };
        let Some(delivery) = next else { bail!("the broker ended a consumer") };
        let delivery = delivery?;
        let received = *arrived.get_or_insert_with(Instant::now);
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
                arrived = None;
            }
        }
        handled += 1;
        if pacing.ack_every == 1 {
            delivery.ack().await?;
        } else if let Some(last) = batches.add(delivery.consumer_id, delivery) {
            last.ack_multiple().await?;
        }
        unrecorded += 1;
        if unrecorded == RECORD_EVERY {
            // A consumer that never runs dry still shows progress to the stall check.
            progress.record(std::mem::take(&mut unrecorded));
        }
    }
    for delivery in batches.into_open() {
        delivery.ack_multiple().await?;
    }
    futures::future::try_join_all(deliveries.streams.into_iter().map(Consumer::cancel)).await?;
    Ok(Consumed { latencies, last_delivery })
}

/// Deliveries held back for a batched acknowledgement (`--ack-every`): per consumer, the
/// newest one and how many it stands for, since an ack with `multiple` reaches only the
/// earlier deliveries of its own consumer.
struct AckBatches<D> {
    every: u64,
    /// Per consumer: its newest unacknowledged delivery and how many it stands for.
    open: HashMap<u64, (Option<D>, u64)>,
}

impl<D> AckBatches<D> {
    fn new(every: u64) -> Self {
        AckBatches { every: every.max(1), open: HashMap::new() }
    }

    /// Adds a delivery of `consumer`; returns it when it completes a batch, to be
    /// acknowledged with `multiple`.
    fn add(&mut self, consumer: u64, delivery: D) -> Option<D> {
        let (newest, held) = self.open.entry(consumer).or_insert((None, 0));
        *held += 1;
        if *held >= self.every {
            *newest = None;
            *held = 0;
            return Some(delivery);
        }
        *newest = Some(delivery);
        None
    }

    /// The newest delivery of every unfinished batch, to be acknowledged with `multiple`.
    fn into_open(self) -> impl Iterator<Item = D> {
        self.open.into_values().filter_map(|(newest, _)| newest)
    }
}

/// Several streams read as one, starting each poll at the stream after the one that yielded
/// last, so a busy queue cannot starve the others. Unlike `select_all` it allocates nothing
/// per item. It ends as soon as any stream ends: for the bench, a consumer the broker ended
/// is a failed run.
struct Merged<S> {
    streams: Vec<S>,
    next: usize,
}

impl<S> Merged<S> {
    fn new(streams: Vec<S>) -> Self {
        Merged { streams, next: 0 }
    }
}

impl<S: Stream + Unpin> Stream for Merged<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let count = self.streams.len();
        for offset in 0..count {
            let index = (self.next + offset) % count;
            if let Poll::Ready(item) = self.streams[index].poll_next_unpin(cx) {
                self.next = index + 1;
                return Poll::Ready(item);
            }
        }
        if count == 0 {
            return Poll::Ready(None);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use futures::{stream, FutureExt};

    use super::*;

    #[test]
    fn merged_streams_take_turns_and_end_with_the_first_to_end() {
        let merged = Merged::new(vec![stream::iter(vec![1, 2, 3]), stream::iter(vec![10, 20])]);
        let items: Vec<i32> = futures::executor::block_on(merged.collect());
        assert_eq!(items, [1, 10, 2, 20, 3]);
        let empty: Merged<stream::Iter<std::vec::IntoIter<i32>>> = Merged::new(Vec::new());
        assert_eq!(futures::executor::block_on(empty.collect::<Vec<_>>()), Vec::<i32>::new());
    }

    #[test]
    fn merged_streams_skip_the_ones_with_nothing_ready() {
        let quiet = stream::pending::<i32>().boxed();
        let busy = stream::iter(vec![1, 2]).chain(stream::pending()).boxed();
        let mut merged = Merged::new(vec![quiet, busy]);
        assert_eq!(merged.next().now_or_never(), Some(Some(1)));
        assert_eq!(merged.next().now_or_never(), Some(Some(2)));
        assert_eq!(merged.next().now_or_never(), None, "both wait");
    }

    #[test]
    fn ack_batches_are_counted_per_consumer() {
        let mut batches = AckBatches::new(3);
        assert_eq!(batches.add(1, "a1"), None);
        assert_eq!(batches.add(2, "b1"), None);
        assert_eq!(batches.add(1, "a2"), None);
        assert_eq!(batches.add(1, "a3"), Some("a3"), "consumer 1's third delivery");
        assert_eq!(batches.add(2, "b2"), None);
        assert_eq!(batches.add(1, "a4"), None, "a new batch");
        let mut open: Vec<&str> = batches.into_open().collect();
        open.sort_unstable();
        assert_eq!(open, ["a4", "b2"]);
    }

    #[test]
    fn ack_batches_of_one_settle_every_delivery() {
        let mut batches = AckBatches::new(1);
        assert_eq!(batches.add(7, 1), Some(1));
        assert_eq!(batches.add(7, 2), Some(2));
        assert_eq!(batches.into_open().count(), 0);
    }
}
