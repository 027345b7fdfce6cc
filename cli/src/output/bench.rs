//! `hopper bench`'s reports: the message run's [`BenchReport`], and the [`DeclareReport`] and
//! [`CheckReport`] of `--declare` and `--declare --check`, each as a listing or one JSON
//! object.

use serde::Serialize;

use super::listing;

/// The result of `hopper bench`; `--json` prints it as one object with exactly these keys.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BenchReport {
    /// Confirmed publishes per second, over the time until the last confirm.
    pub publish_rate: f64,
    /// Deliveries per second, over the time until the last delivery; 0 without consumers.
    pub consume_rate: f64,
    /// Median end-to-end latency in microseconds.
    pub p50_us: u64,
    /// 99th percentile end-to-end latency in microseconds.
    pub p99_us: u64,
    /// 99.9th percentile end-to-end latency in microseconds.
    pub p999_us: u64,
    /// Largest end-to-end latency in microseconds.
    pub max_us: u64,
    /// Messages published and confirmed.
    pub sent: u64,
    /// Messages delivered to the consumers.
    pub received: u64,
    /// Seconds from the first publish until the last delivery (or the last confirm, if later).
    pub elapsed_s: f64,
    /// Body size in bytes.
    pub size: u64,
    /// Prefetch of each consumer.
    pub prefetch: u32,
    /// Producer connections.
    pub producers: u32,
    /// Consumer connections.
    pub consumers: u32,
    /// Queues the run used.
    pub queues: u32,
    /// Longest wait of any producer for its next confirm (from its start to the first, then
    /// between consecutive ones), in ms; absent when nothing was published.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_confirm_gap_ms: Option<f64>,
    /// Peak resident memory of the `--rss-pid` process during the run, in MiB; only with
    /// `--rss-pid`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_rss_mb: Option<f64>,
    /// CPU seconds the `--rss-pid` process used during the run; only with `--rss-pid`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_cpu_s: Option<f64>,
    /// Publish delay of every message (`--delay`), in ms; latencies are then lateness.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// Most unacked deliveries seen by the depth samples; only with `--sample-every`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_unacked: Option<u64>,
    /// The queue's depth over time; only with `--sample-every`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub depth: Vec<crate::bench_watch::DepthSample>,
}

/// Renders a bench report as `key: value` lines.
pub fn bench_listing(r: &BenchReport) -> String {
    let latency = if r.received == 0 {
        "-".to_string()
    } else {
        format!("p50 {}  p99 {}  p99.9 {}  max {} (µs)", r.p50_us, r.p99_us, r.p999_us, r.max_us)
    };
    let mut fields = vec![
        (
            "sent",
            format!(
                "{} messages of {} bytes ({} {})",
                r.sent,
                r.size,
                r.producers,
                plural(r.producers, "producer")
            ),
        ),
        (
            "received",
            format!(
                "{} messages ({} {}, prefetch {})",
                r.received,
                r.consumers,
                plural(r.consumers, "consumer"),
                r.prefetch
            ),
        ),
    ];
    if r.queues > 1 {
        fields.push(("queues", r.queues.to_string()));
    }
    fields.extend([
        ("publish rate", format!("{:.0} msg/s", r.publish_rate)),
        ("consume rate", format!("{:.0} msg/s", r.consume_rate)),
        ("latency", latency),
        ("elapsed", format!("{:.2} s", r.elapsed_s)),
    ]);
    if let Some(gap) = r.max_confirm_gap_ms {
        fields.push(("confirm gap", format!("max {gap:.1} ms")));
    }
    if let Some(rss) = r.broker_rss_mb {
        fields.push(("broker rss", format!("peak {rss:.1} MB")));
    }
    if let Some(cpu) = r.broker_cpu_s {
        fields.push(("broker cpu", format!("{cpu:.2} s")));
    }
    if let Some(delay) = r.delay_ms {
        fields.push(("delay", format!("{delay} ms (latency is lateness past the due time)")));
    }
    if let Some(max) = r.max_unacked {
        fields.push(("max unacked", max.to_string()));
    }
    let mut text = listing(&fields);
    if !r.depth.is_empty() {
        text.push_str("depth:\n       t     ready   unacked   delayed\n");
        for s in &r.depth {
            text.push_str(&format!(
                "{:>7.1}s {:>9} {:>9} {:>9}\n",
                s.t_ms as f64 / 1000.0,
                s.ready,
                s.unacked,
                s.delayed
            ));
        }
    }
    text
}

/// What the `--rss-pid` process held once the work was done; the same keys in both the
/// declare and the check report.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct BrokerFootprint {
    /// Resident memory in MiB.
    pub broker_rss_mb: f64,
    /// Threads of the process.
    pub broker_threads: u64,
    /// Open file descriptors of the process.
    pub broker_open_files: u64,
}

/// The result of `hopper bench --declare`; `--json` prints it as one object with exactly these
/// keys.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeclareReport {
    /// Queues declared.
    pub declared: u64,
    /// Whether they are durable.
    pub durable: bool,
    /// Declares awaiting their answer at once.
    pub in_flight: u32,
    /// Connections the declares were spread over.
    pub connections: u32,
    /// Seconds from the first declare until the last answer.
    pub elapsed_s: f64,
    /// Declares per second.
    pub declares_per_s: f64,
    /// The broker afterwards; only with `--rss-pid`.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub broker: Option<BrokerFootprint>,
}

/// Renders a declare report as `key: value` lines.
pub fn declare_listing(r: &DeclareReport) -> String {
    let kind = if r.durable { "durable" } else { "transient" };
    let mut fields = vec![
        ("declared", format!("{} {kind} queues", r.declared)),
        (
            "in flight",
            format!("{} over {} {}", r.in_flight, r.connections, plural(r.connections, "connection")),
        ),
        ("declare rate", format!("{:.0} queues/s", r.declares_per_s)),
        ("elapsed", format!("{:.2} s", r.elapsed_s)),
    ];
    push_footprint(&mut fields, r.broker);
    listing(&fields)
}

/// The result of `hopper bench --declare N --check`; `--json` prints it as one object with
/// exactly these keys.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CheckReport {
    /// Queues asked for (`--declare N`).
    pub queues: u64,
    /// Queues that answered with their stats.
    pub answered: u64,
    /// Stats requests awaiting their answer at once.
    pub in_flight: u32,
    /// Connections the requests were spread over.
    pub connections: u32,
    /// Seconds from the bench's start until the broker accepted a connection.
    pub connect_s: f64,
    /// Seconds from the bench's start until every queue had answered (or the check gave up).
    pub elapsed_s: f64,
    /// Why the first queue that did not answer did not; absent when all did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// The broker afterwards; only with `--rss-pid`.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub broker: Option<BrokerFootprint>,
}

/// Renders a check report as `key: value` lines.
pub fn check_listing(r: &CheckReport) -> String {
    let mut fields = vec![
        ("answered", format!("{} of {} queues", r.answered, r.queues)),
        (
            "in flight",
            format!("{} over {} {}", r.in_flight, r.connections, plural(r.connections, "connection")),
        ),
        ("connected", format!("after {:.2} s", r.connect_s)),
        ("elapsed", format!("{:.2} s", r.elapsed_s)),
    ];
    if let Some(error) = &r.first_error {
        fields.push(("first error", error.clone()));
    }
    push_footprint(&mut fields, r.broker);
    listing(&fields)
}

/// Adds the `--rss-pid` process's footprint to a listing.
fn push_footprint(fields: &mut Vec<(&str, String)>, broker: Option<BrokerFootprint>) {
    if let Some(b) = broker {
        fields.push(("broker rss", format!("{:.1} MB", b.broker_rss_mb)));
        fields.push(("broker threads", b.broker_threads.to_string()));
        fields.push(("broker files", format!("{} open", b.broker_open_files)));
    }
}

/// `noun` or `nouns`, to agree with a count.
fn plural(count: u32, noun: &str) -> String {
    if count == 1 {
        noun.to_string()
    } else {
        format!("{noun}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sorted keys of a value's JSON object.
    fn keys(value: &impl Serialize) -> Vec<String> {
        let value = serde_json::to_value(value).unwrap();
        let mut keys: Vec<String> = value.as_object().unwrap().keys().cloned().collect();
        keys.sort_unstable();
        keys
    }

    /// `expected`, sorted, as owned strings.
    fn sorted(expected: &[&str]) -> Vec<String> {
        let mut expected: Vec<String> = expected.iter().map(|k| k.to_string()).collect();
        expected.sort_unstable();
        expected
    }

    fn report() -> BenchReport {
        BenchReport {
            publish_rate: 1000.5,
            consume_rate: 999.0,
            p50_us: 1,
            p99_us: 2,
            p999_us: 3,
            max_us: 4,
            sent: 10,
            received: 10,
            elapsed_s: 0.01,
            size: 256,
            prefetch: 100,
            producers: 1,
            consumers: 2,
            queues: 1,
            max_confirm_gap_ms: None,
            broker_rss_mb: None,
            broker_cpu_s: None,
            delay_ms: None,
            max_unacked: None,
            depth: Vec::new(),
        }
    }

    #[test]
    fn bench_report_json_has_exactly_the_documented_keys() {
        let report = report();
        let expected = [
            "publish_rate",
            "consume_rate",
            "p50_us",
            "p99_us",
            "p999_us",
            "max_us",
            "sent",
            "received",
            "elapsed_s",
            "size",
            "prefetch",
            "producers",
            "consumers",
            "queues",
        ];
        assert_eq!(keys(&report), sorted(&expected));
        let text = bench_listing(&report);
        assert!(
            text.contains("publish rate: 1000 msg/s") || text.contains("publish rate: 1001 msg/s"),
            "{text}"
        );
        assert!(text.contains("p99 2"), "{text}");
        assert!(text.contains("(2 consumers, prefetch 100)"), "{text}");
        assert!(!text.contains("queues:") && !text.contains("confirm gap"), "{text}");
    }

    #[test]
    fn bench_report_shows_the_longest_confirm_gap_and_many_queues() {
        let report = BenchReport { queues: 1000, max_confirm_gap_ms: Some(12.345), ..report() };
        assert_eq!(serde_json::to_value(&report).unwrap()["max_confirm_gap_ms"], 12.345);
        let text = bench_listing(&report);
        assert!(text.contains("confirm gap:  max 12.3 ms"), "{text}");
        assert!(text.contains("queues:       1000"), "{text}");
    }

    #[test]
    fn declare_report_lists_the_broker_footprint_only_when_sampled() {
        let report = DeclareReport {
            declared: 2000,
            durable: true,
            in_flight: 64,
            connections: 8,
            elapsed_s: 0.5,
            declares_per_s: 4000.0,
            broker: None,
        };
        let expected = ["declared", "durable", "in_flight", "connections", "elapsed_s", "declares_per_s"];
        assert_eq!(keys(&report), sorted(&expected));
        let text = declare_listing(&report);
        assert!(text.contains("2000 durable queues") && text.contains("4000 queues/s"), "{text}");
        assert!(!text.contains("broker"), "{text}");

        let footprint = BrokerFootprint { broker_rss_mb: 51.25, broker_threads: 12, broker_open_files: 40 };
        let report = DeclareReport { broker: Some(footprint), ..report };
        let mut with_broker = expected.to_vec();
        with_broker.extend(["broker_rss_mb", "broker_threads", "broker_open_files"]);
        assert_eq!(keys(&report), sorted(&with_broker));
        let text = declare_listing(&report);
        assert!(text.contains("broker threads: 12") && text.contains("40 open"), "{text}");
    }

    #[test]
    fn check_report_names_the_first_error_only_when_a_queue_did_not_answer() {
        let report = CheckReport {
            queues: 3,
            answered: 3,
            in_flight: 64,
            connections: 8,
            connect_s: 0.25,
            elapsed_s: 1.5,
            first_error: None,
            broker: None,
        };
        let expected = ["queues", "answered", "in_flight", "connections", "connect_s", "elapsed_s"];
        assert_eq!(keys(&report), sorted(&expected));
        assert!(check_listing(&report).contains("3 of 3 queues"));
        let report =
            CheckReport { answered: 2, first_error: Some("bench-decl-1: NOT_FOUND".into()), ..report };
        let text = check_listing(&report);
        assert!(text.contains("2 of 3 queues") && text.contains("first error: bench-decl-1"), "{text}");
    }
}
