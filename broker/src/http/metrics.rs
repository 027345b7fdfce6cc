//! `GET /metrics` in the Prometheus text format (version 0.0.4).

use std::fmt::Write;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::engine::{Caller, Engine, QueueInfo};
use crate::message::DeathReason;
use crate::queue::now_ms;

const REASONS: [DeathReason; 6] = DeathReason::ALL;

/// Renders every metric.
pub(super) async fn render(State(engine): State<Arc<Engine>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text(&engine))
}

fn text(engine: &Engine) -> String {
    let snapshots = engine.list_queues(&Caller::broker());
    let mut out = String::with_capacity(4096 + snapshots.len() * 2048);
    let now = now_ms();
    let mut family = |name: &str, kind: &str, help: &str, values: &mut dyn Iterator<Item = (String, u64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in values {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let label = |queue: &str| format!("{{queue=\"{}\"}}", escape(queue));
    let per_queue = |f: &dyn Fn(&crate::queue::Snapshot, &QueueInfo) -> u64| {
        snapshots.iter().map(|q| (label(&q.name), f(&q.snapshot, q))).collect::<Vec<_>>()
    };
    family(
        "hopper_queue_messages_ready",
        "gauge",
        "Messages waiting for a consumer.",
        &mut per_queue(&|s, _| s.ready).into_iter(),
    );
    family(
        "hopper_queue_messages_unacked",
        "gauge",
        "Deliveries not yet settled.",
        &mut per_queue(&|s, _| s.unacked).into_iter(),
    );
    family(
        "hopper_queue_messages_delayed",
        "gauge",
        "Messages waiting for a delay or retry backoff.",
        &mut per_queue(&|s, _| s.delayed).into_iter(),
    );
    family(
        "hopper_queue_consumers",
        "gauge",
        "Subscribed consumers (push and pull).",
        &mut per_queue(&|s, _| s.consumers.into()).into_iter(),
    );
    family(
        "hopper_queue_oldest_message_age_seconds",
        "gauge",
        "Age of the message at the head of the queue (0 when empty or unknown).",
        &mut per_queue(&|s, _| {
            if s.oldest_ready_ms == 0 {
                0
            } else {
                now.saturating_sub(s.oldest_ready_ms) / 1000
            }
        })
        .into_iter(),
    );
    family(
        "hopper_queue_published_total",
        "counter",
        "Messages accepted since the broker started.",
        &mut per_queue(&|s, _| s.counters.published).into_iter(),
    );
    family(
        "hopper_queue_delivered_total",
        "counter",
        "Deliveries, redeliveries included.",
        &mut per_queue(&|s, _| s.counters.delivered).into_iter(),
    );
    family(
        "hopper_queue_acked_total",
        "counter",
        "Deliveries acknowledged.",
        &mut per_queue(&|s, _| s.counters.acked).into_iter(),
    );
    family(
        "hopper_queue_redelivered_total",
        "counter",
        "Deliveries of messages delivered before.",
        &mut per_queue(&|s, _| s.counters.redelivered).into_iter(),
    );
    family(
        "hopper_queue_dead_lettered_total",
        "counter",
        "Messages that died in the queue, by reason (dead-lettered or dropped).",
        &mut snapshots.iter().flat_map(|q| {
            REASONS.iter().map(move |r| {
                let labels = format!("{{queue=\"{}\",reason=\"{}\"}}", escape(&q.name), r.as_str());
                (labels, q.snapshot.counters.dead.get(r).copied().unwrap_or(0))
            })
        }),
    );
    family(
        "hopper_queue_alarm",
        "gauge",
        "1 while the queue's depth alarm is raised.",
        &mut per_queue(&|_, q| q.alarm.into()).into_iter(),
    );
    family(
        "hopper_queue_alarm_depth",
        "gauge",
        "Ready depth above which the alarm is raised (0 = none).",
        &mut per_queue(&|_, q| q.alarm_depth).into_iter(),
    );
    family(
        "hopper_queue_read_failing",
        "gauge",
        "1 while stored message bodies of the queue cannot be read (delivery paused and retried).",
        &mut per_queue(&|s, _| (!s.read_error.is_empty()).into()).into_iter(),
    );
    let exchanges = engine.list_exchanges(&Caller::broker());
    let per_exchange = |f: &dyn Fn(&crate::queue::ExchangeView) -> u64| {
        exchanges
            .iter()
            .map(|x| (format!("{{exchange=\"{}\"}}", escape(&x.spec.name)), f(x)))
            .collect::<Vec<_>>()
    };
    // Exchange families only once there are exchanges: every family listed has samples.
    if !exchanges.is_empty() {
        family(
            "hopper_exchange_published_total",
            "counter",
            "Messages published to the exchange.",
            &mut per_exchange(&|x| x.published).into_iter(),
        );
        family(
            "hopper_exchange_unroutable_total",
            "counter",
            "Messages the exchange routed to no queue (dropped, or returned when mandatory).",
            &mut per_exchange(&|x| x.unroutable).into_iter(),
        );
        family(
            "hopper_exchange_returned_total",
            "counter",
            "Mandatory messages the exchange returned to their publisher.",
            &mut per_exchange(&|x| x.returned).into_iter(),
        );
        family(
            "hopper_exchange_bindings",
            "gauge",
            "Bindings of the exchange.",
            &mut per_exchange(&|x| x.bindings as u64).into_iter(),
        );
    }
    let status = engine.status();
    let broker = |value: u64| std::iter::once((String::new(), value));
    family("hopper_connections", "gauge", "Open client connections.", &mut broker(status.connections.into()));
    family("hopper_memory_bytes", "gauge", "Message bytes held in memory.", &mut broker(status.memory_used));
    family(
        "hopper_memory_high_watermark_bytes",
        "gauge",
        "Memory above which publishers are blocked.",
        &mut broker(status.memory_high_watermark),
    );
    family(
        "hopper_disk_free_bytes",
        "gauge",
        "Free bytes on the data directory's disk.",
        &mut broker(status.disk_free),
    );
    family(
        "hopper_disk_free_low_watermark_bytes",
        "gauge",
        "Free disk below which publishers are blocked.",
        &mut broker(status.disk_free_low_watermark),
    );
    family(
        "hopper_publishers_blocked",
        "gauge",
        "1 while publishers are blocked.",
        &mut broker(status.blocked.is_some().into()),
    );
    family(
        "hopper_blocked_publishers",
        "gauge",
        "Connections held back by flow control.",
        &mut broker(status.blocked_publishers.into()),
    );
    family(
        "hopper_uptime_seconds",
        "gauge",
        "Seconds since the broker started.",
        &mut broker(status.uptime_ms / 1000),
    );
    family(
        "hopper_fsyncs_total",
        "counter",
        "fsyncs of the durable logs since the broker started.",
        &mut broker(status.fsyncs),
    );
    family(
        "hopper_open_segment_files",
        "gauge",
        "Segment files open for reading stored bodies.",
        &mut broker(status.open_segment_files.into()),
    );
    family(
        "hopper_storage_failing",
        "gauge",
        "1 while a durable log cannot sync (its queues refuse publishes).",
        &mut broker(status.storage_error.is_some().into()),
    );
    family("hopper_queues", "gauge", "Queues.", &mut broker(snapshots.len() as u64));
    out
}

/// Escapes a label value: backslash, double quote and newline.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
    }
}
