//! A bench producer: publishes its plan on one connection with a window of confirms
//! outstanding, round-robin over its queues, and notes the longest wait for a confirm.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use anyhow::bail;
use bytes::BytesMut;
use futures::FutureExt;
use hopper_client::{Connection, PublishConfirm, PublishOptions};

use super::{encode_body, unix_nanos};

/// One producer's assignment.
pub(super) struct Plan {
    /// Queues to publish to in turn; each gets its fair share of `count`, because the first
    /// `count % targets.len()` of them are the ones a whole-run split gives one more message.
    pub targets: Vec<String>,
    /// Through an exchange: its name, the routing key and the headers to publish with.
    pub route: Option<(String, String, HashMap<String, String>)>,
    /// Body size in bytes.
    pub size: usize,
    /// Publishes awaiting their confirm at most.
    pub window: usize,
    /// Messages to send, or `None` to send until `deadline`.
    pub count: Option<u64>,
    /// When a timed run stops publishing.
    pub deadline: Option<Instant>,
    /// Seconds between this producer's messages at a fixed rate.
    pub interval: Option<f64>,
    /// When the run's clock started: the rate schedule and the first confirm gap count from it.
    pub start: Instant,
    /// Publish delay of every message.
    pub delay: Option<Duration>,
}

/// What one producer did.
pub(super) struct Produced {
    /// Messages published and confirmed.
    pub sent: u64,
    /// When the last confirm arrived.
    pub finished: Instant,
    /// Longest wait for a confirm: from the start to the first, then between consecutive ones.
    pub longest_gap: Duration,
}

/// Publishes per `plan` with up to `plan.window` confirms outstanding; returns how many were
/// confirmed.
pub(super) async fn produce(conn: &Connection, plan: &Plan) -> anyhow::Result<Produced> {
    let mut confirms = Confirms::new(plan.window, plan.start);
    let mut targets = plan.targets.iter().cycle();
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
                    confirms.sleep_until(due).await?;
                }
            }
            None if plan.deadline.is_some_and(|deadline| Instant::now() >= deadline) => break,
            None => {}
        }
        confirms.take_arrived()?;
        if confirms.is_full() {
            confirms.wait_oldest().await?;
        }
        let body = encode_body(&mut chunk, plan.size, unix_nanos());
        let confirm = match &plan.route {
            Some((exchange, key, headers)) => {
                let options =
                    PublishOptions { delay: plan.delay, headers: headers.clone(), ..Default::default() };
                conn.publish_to(exchange, key, body, options)
            }
            None => {
                let Some(queue) = targets.next() else { bail!("the producer was given no queue") };
                conn.publish(queue, body, PublishOptions { delay: plan.delay, ..Default::default() })
            }
        };
        confirms.push(confirm);
        sent += 1;
    }
    let longest_gap = confirms.finish().await?;
    Ok(Produced { sent, finished: Instant::now(), longest_gap })
}

/// A producer's publishes awaiting their confirm, oldest first, and the gaps between the
/// confirms as they arrive.
///
/// Confirms are taken in publish order: one that arrives before an older one is noticed when
/// the older one is, so a queue whose confirms stall shows as a gap even while the producer's
/// other queues still confirm.
struct Confirms {
    pending: VecDeque<PublishConfirm>,
    window: usize,
    gaps: ConfirmGaps,
}

impl Confirms {
    /// An empty window of `window` publishes, for a producer that started at `start`.
    fn new(window: usize, start: Instant) -> Self {
        Confirms {
            pending: VecDeque::with_capacity(window.min(1 << 16)),
            window,
            gaps: ConfirmGaps::new(start),
        }
    }

    /// Whether the next publish must wait for a confirm first.
    fn is_full(&self) -> bool {
        self.pending.len() >= self.window
    }

    /// Adds the confirm of the newest publish.
    fn push(&mut self, confirm: PublishConfirm) {
        self.pending.push_back(confirm);
    }

    /// Takes the confirms that have already arrived, without waiting, so that their arrival
    /// is timed when it happens rather than when the window next fills up.
    fn take_arrived(&mut self) -> anyhow::Result<()> {
        while let Some(oldest) = self.pending.front_mut() {
            let Some(result) = oldest.now_or_never() else { break };
            self.pending.pop_front();
            result?;
            self.gaps.confirmed(Instant::now());
        }
        Ok(())
    }

    /// Waits for the oldest outstanding confirm, if there is one. Cancel-safe: a confirm
    /// stays in the window until it has arrived.
    async fn wait_oldest(&mut self) -> anyhow::Result<()> {
        let Some(oldest) = self.pending.front_mut() else { return Ok(()) };
        let result = oldest.await;
        self.pending.pop_front();
        result?;
        self.gaps.confirmed(Instant::now());
        Ok(())
    }

    /// Sleeps until `due`, taking confirms as they arrive meanwhile.
    async fn sleep_until(&mut self, due: Instant) -> anyhow::Result<()> {
        let sleep = tokio::time::sleep_until(due.into());
        tokio::pin!(sleep);
        while !self.pending.is_empty() {
            tokio::select! {
                biased;
                () = &mut sleep => return Ok(()),
                result = self.wait_oldest() => result?,
            }
        }
        sleep.await;
        Ok(())
    }

    /// Waits for every outstanding confirm; returns the longest gap.
    async fn finish(mut self) -> anyhow::Result<Duration> {
        while !self.pending.is_empty() {
            self.wait_oldest().await?;
        }
        Ok(self.gaps.longest())
    }
}

/// The longest a producer waited for a confirm: from its start to the first, then between
/// consecutive ones. Time is an argument, so it is tested without a clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ConfirmGaps {
    last: Instant,
    longest: Duration,
}

impl ConfirmGaps {
    /// No confirm yet; the first gap is measured from `start`.
    fn new(start: Instant) -> Self {
        ConfirmGaps { last: start, longest: Duration::ZERO }
    }

    /// Notes a confirm that arrived at `at`; a time before the previous one counts as no gap.
    fn confirmed(&mut self, at: Instant) {
        self.longest = self.longest.max(at.saturating_duration_since(self.last));
        self.last = self.last.max(at);
    }

    /// The longest gap so far.
    fn longest(&self) -> Duration {
        self.longest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_gap_counts_from_the_start_and_between_confirms() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let mut gaps = ConfirmGaps::new(start);
        assert_eq!(gaps.longest(), Duration::ZERO);
        gaps.confirmed(at(30));
        assert_eq!(gaps.longest(), Duration::from_millis(30), "start to the first confirm");
        for ms in [31, 32, 40, 41] {
            gaps.confirmed(at(ms));
        }
        assert_eq!(gaps.longest(), Duration::from_millis(30));
        gaps.confirmed(at(291));
        assert_eq!(gaps.longest(), Duration::from_millis(250), "a stall between two confirms");
        gaps.confirmed(at(292));
        assert_eq!(gaps.longest(), Duration::from_millis(250));
    }

    #[test]
    fn a_confirm_timed_out_of_order_is_no_gap() {
        let start = Instant::now();
        let mut gaps = ConfirmGaps::new(start);
        gaps.confirmed(start + Duration::from_millis(10));
        gaps.confirmed(start + Duration::from_millis(5));
        gaps.confirmed(start + Duration::from_millis(12));
        assert_eq!(gaps.longest(), Duration::from_millis(10));
    }
}
