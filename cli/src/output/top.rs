//! `hopper top`'s frame: queues with their depths and the per-second rates computed from two
//! samples of their counters. Pure, so it is tested without a broker or a terminal.

use std::collections::HashMap;
use std::time::Duration;

use hopper_client::QueueInfo;

use super::queues::alarm_cell;
use super::{table, Align};

/// What one refresh of `hopper top` shows.
#[derive(Debug, Clone, Copy)]
pub struct TopFrame<'a> {
    /// The queues at the earlier sample.
    pub previous: &'a [QueueInfo],
    /// The queues now.
    pub current: &'a [QueueInfo],
    /// Time between the two samples.
    pub elapsed: Duration,
    /// The first line, e.g. the broker address and the time.
    pub title: &'a str,
    /// Why publishers are blocked, while they are.
    pub blocked: Option<&'a str>,
}

/// Column headers of `hopper top`, in order.
const TOP_COLUMNS: [&str; 9] =
    ["QUEUE", "READY", "UNACKED", "DELAYED", "CONSUMERS", "PUBLISH/S", "DELIVER/S", "ACK/S", "ALARM"];

/// Renders a frame: the title, the publishers' state, a blank line and the queue table (sorted
/// by name). A queue missing from the earlier sample has no rates yet (`-`).
pub fn top_frame(frame: &TopFrame<'_>) -> String {
    let before: HashMap<&str, &QueueInfo> = frame.previous.iter().map(|q| (q.name.as_str(), q)).collect();
    let mut queues: Vec<&QueueInfo> = frame.current.iter().collect();
    queues.sort_by(|a, b| a.name.cmp(&b.name));
    let rows: Vec<Vec<String>> = queues
        .iter()
        .map(|q| {
            let earlier = before.get(q.name.as_str());
            let rate = |counter: fn(&QueueInfo) -> u64| {
                earlier.map_or_else(
                    || "-".to_string(),
                    |e| format_rate(per_second(counter(q), counter(e), frame.elapsed)),
                )
            };
            vec![
                q.name.clone(),
                q.ready.to_string(),
                q.unacked.to_string(),
                q.delayed.to_string(),
                q.consumers.to_string(),
                rate(|q| q.published_total),
                rate(|q| q.delivered_total),
                rate(|q| q.acked_total),
                alarm_cell(q),
            ]
        })
        .collect();
    let mut align = [Align::Right; TOP_COLUMNS.len()];
    align[0] = Align::Left;
    align[8] = Align::Left;
    let publishers = match frame.blocked {
        Some(reason) => format!("publishers are blocked: {reason}"),
        None => "publishers: flowing".to_string(),
    };
    format!("{}\n{publishers}\n\n{}", frame.title, table(&TOP_COLUMNS, &align, &rows))
}

/// The rate of a counter that went from `before` to `now` in `elapsed`. A counter that went
/// down (the queue was deleted and declared again) counts as no change.
pub fn per_second(now: u64, before: u64, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds <= 0.0 {
        return 0.0;
    }
    now.saturating_sub(before) as f64 / seconds
}

/// A rate for a narrow column: one decimal below 100, whole numbers above.
pub fn format_rate(rate: f64) -> String {
    if rate >= 100.0 {
        format!("{rate:.0}")
    } else {
        format!("{rate:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(name: &str, published: u64, delivered: u64, acked: u64) -> QueueInfo {
        QueueInfo {
            name: name.into(),
            durable: false,
            ready: 5,
            unacked: 1,
            consumers: 2,
            published_total: published,
            delivered_total: delivered,
            acked_total: acked,
            ..QueueInfo::default()
        }
    }

    #[test]
    fn rates_come_from_counter_deltas() {
        assert_eq!(per_second(150, 100, Duration::from_secs(2)), 25.0);
        assert_eq!(per_second(100, 150, Duration::from_secs(1)), 0.0, "a reset counter is no change");
        assert_eq!(per_second(10, 0, Duration::ZERO), 0.0);
        assert_eq!(format_rate(25.0), "25.0");
        assert_eq!(format_rate(0.25), "0.2");
        assert_eq!(format_rate(1234.4), "1234");
    }

    #[test]
    fn frame_shows_title_state_and_one_row_per_queue() {
        let previous = [queue("jobs", 100, 90, 80)];
        let hot = QueueInfo { alarm_depth: Some(4), alarm: true, ..queue("hot", 0, 0, 0) };
        let current = [queue("jobs", 350, 290, 280), hot];
        let text = top_frame(&TopFrame {
            previous: &previous,
            current: &current,
            elapsed: Duration::from_secs(2),
            title: "hopper top: 127.0.0.1:5680",
            blocked: None,
        });
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "hopper top: 127.0.0.1:5680");
        assert_eq!(lines[1], "publishers: flowing");
        assert_eq!(lines[2], "");
        assert_eq!(lines[3], "QUEUE  READY  UNACKED  DELAYED  CONSUMERS  PUBLISH/S  DELIVER/S  ACK/S  ALARM");
        assert_eq!(
            lines[4],
            "hot        5        1        0          2          -          -      -  ALARM >4"
        );
        assert_eq!(lines[5], "jobs       5        1        0          2        125        100    100  -");
        assert_eq!(lines.len(), 6);
    }

    #[test]
    fn frame_leads_with_a_block() {
        let text = top_frame(&TopFrame {
            previous: &[],
            current: &[],
            elapsed: Duration::from_secs(1),
            title: "t",
            blocked: Some("memory high watermark"),
        });
        assert_eq!(text.lines().nth(1), Some("publishers are blocked: memory high watermark"));
        assert_eq!(text.lines().count(), 4, "{text}");
    }
}
