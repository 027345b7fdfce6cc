//! Operations output: `hopper status`, `hopper queue moves` and `queue move`'s summary, and
//! `hopper events` lines.

use std::time::Duration;

use hopper_client::{BrokerStatus, Event, MoveInfo};
use serde::Serialize;

use super::{listing, table, Align};
use crate::time::format_unix_ms;

/// The broker status as `hopper status --json` prints it: the keys of the broker's
/// `GET /api/status`.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct StatusJson<'a> {
    /// The broker's version.
    pub version: &'a str,
    /// Whole seconds since the broker started.
    pub uptime_s: u64,
    /// Client connections open now.
    pub connections: u32,
    /// Whether publishers are blocked.
    pub blocked: bool,
    /// Why; empty when they are not.
    pub blocked_reason: &'a str,
    /// Connections held back by the block.
    pub blocked_publishers: u32,
    /// Message bytes held in memory.
    pub memory_used: u64,
    /// Memory high watermark in bytes.
    pub memory_high_watermark: u64,
    /// Free bytes on the data directory's disk.
    pub disk_free: u64,
    /// Disk free low watermark in bytes.
    pub disk_free_low_watermark: u64,
    /// Storage threads serving durable queues.
    pub storage_threads: u32,
    /// fsyncs of the durable logs since the broker started.
    pub fsyncs: u64,
    /// Segment files open for reading stored bodies.
    pub open_segment_files: u32,
    /// Why a durable log cannot sync; empty when all can.
    pub storage_error: &'a str,
}

impl<'a> From<&'a BrokerStatus> for StatusJson<'a> {
    fn from(status: &'a BrokerStatus) -> Self {
        StatusJson {
            version: &status.version,
            uptime_s: status.uptime.as_secs(),
            connections: status.connections,
            blocked: status.blocked.is_some(),
            blocked_reason: status.blocked.as_deref().unwrap_or_default(),
            blocked_publishers: status.blocked_publishers,
            memory_used: status.memory_used,
            memory_high_watermark: status.memory_high_watermark,
            disk_free: status.disk_free,
            disk_free_low_watermark: status.disk_free_low_watermark,
            storage_threads: status.storage_threads,
            fsyncs: status.fsyncs,
            open_segment_files: status.open_segment_files,
            storage_error: status.storage_error.as_deref().unwrap_or_default(),
        }
    }
}

/// Renders the broker status as `key: value` lines.
pub fn status_listing(status: &BrokerStatus) -> String {
    let publishers = match &status.blocked {
        Some(reason) => format!(
            "BLOCKED ({reason}); {} {} held back",
            status.blocked_publishers,
            if status.blocked_publishers == 1 { "connection" } else { "connections" }
        ),
        None => "flowing".to_string(),
    };
    let memory = format!(
        "{} used, high watermark {}{}",
        format_bytes(status.memory_used),
        format_bytes(status.memory_high_watermark),
        percent(status.memory_used, status.memory_high_watermark)
    );
    let disk = if status.disk_free == u64::MAX {
        format!("unknown, low watermark {}", format_bytes(status.disk_free_low_watermark))
    } else {
        format!(
            "{} free, low watermark {}",
            format_bytes(status.disk_free),
            format_bytes(status.disk_free_low_watermark)
        )
    };
    let storage = match &status.storage_error {
        Some(error) => format!("FAILING ({error}); its queues refuse publishes"),
        None => format!(
            "{} {}, {} fsyncs, {} segment {} open",
            status.storage_threads,
            if status.storage_threads == 1 { "thread" } else { "threads" },
            status.fsyncs,
            status.open_segment_files,
            if status.open_segment_files == 1 { "file" } else { "files" }
        ),
    };
    listing(&[
        ("version", status.version.clone()),
        ("uptime", format_uptime(status.uptime)),
        ("connections", status.connections.to_string()),
        ("publishers", publishers),
        ("memory", memory),
        ("disk", disk),
        ("storage", storage),
    ])
}

/// ` (12%)` of `limit`, or nothing without a limit.
fn percent(used: u64, limit: u64) -> String {
    if limit == 0 {
        return String::new();
    }
    format!(" ({:.0}%)", used as f64 * 100.0 / limit as f64)
}

/// A byte count in binary units with one decimal: `512 B`, `1.5 KiB`, `12.0 MiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// An uptime in its two largest units: `42s`, `5m 3s`, `2h 10m`, `3d 4h`.
pub fn format_uptime(uptime: Duration) -> String {
    let secs = uptime.as_secs();
    let (days, hours, minutes, seconds) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (days, hours, minutes) {
        (0, 0, 0) => format!("{seconds}s"),
        (0, 0, _) => format!("{minutes}m {seconds}s"),
        (0, _, _) => format!("{hours}h {minutes}m"),
        _ => format!("{days}d {hours}h"),
    }
}

/// A move as `hopper queue moves --json` prints it: the wire's field names, null for unset.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct MoveJson<'a> {
    /// The move's id.
    pub id: u64,
    /// Where messages are taken from.
    pub source: &'a str,
    /// Where they go; null: back to the queue each last died in.
    pub destination: Option<&'a str>,
    /// Most messages per second; null for unlimited.
    pub rate: Option<u32>,
    /// Most messages moved; null for all.
    pub limit: Option<u64>,
    /// Filter key; null for no filter.
    pub filter_key: Option<&'a str>,
    /// Filter value; null for no filter.
    pub filter_value: Option<&'a str>,
    /// running, finished, cancelled or failed.
    pub state: &'a str,
    /// Messages moved.
    pub moved: u64,
    /// Messages skipped (no known destination).
    pub skipped: u64,
    /// Messages waiting in the source at the last look.
    pub remaining: u64,
    /// Why it failed; empty otherwise.
    pub error: &'a str,
    /// Unix ms of the start.
    pub started_ms: u64,
    /// Unix ms of the end; null while running.
    pub finished_ms: Option<u64>,
}

impl<'a> From<&'a MoveInfo> for MoveJson<'a> {
    fn from(m: &'a MoveInfo) -> Self {
        MoveJson {
            id: m.id,
            source: &m.source,
            destination: m.destination.as_deref(),
            rate: m.rate,
            limit: m.limit,
            filter_key: m.filter.as_ref().map(|(key, _)| key.as_str()),
            filter_value: m.filter.as_ref().map(|(_, value)| value.as_str()),
            state: m.state.as_str(),
            moved: m.moved,
            skipped: m.skipped,
            remaining: m.remaining,
            error: &m.error,
            started_ms: m.started_ms,
            finished_ms: m.finished_ms,
        }
    }
}

/// Renders moves as `--json` prints them: one array, pretty-printed.
pub fn moves_json(moves: &[MoveInfo]) -> anyhow::Result<String> {
    let rows: Vec<MoveJson<'_>> = moves.iter().map(MoveJson::from).collect();
    Ok(serde_json::to_string_pretty(&rows)?)
}

/// Where a move sends messages, in words.
pub fn move_destination(m: &MoveInfo) -> String {
    m.destination.clone().unwrap_or_else(|| "their original queues".to_string())
}

/// Renders moves as a table, in the order given.
pub fn moves_table(moves: &[MoveInfo], now_ms: u64) -> String {
    const COLUMNS: [&str; 12] = [
        "ID",
        "SOURCE",
        "DESTINATION",
        "STATE",
        "MOVED",
        "SKIPPED",
        "REMAINING",
        "RATE",
        "LIMIT",
        "FILTER",
        "ELAPSED",
        "ERROR",
    ];
    let dash = || "-".to_string();
    let rows: Vec<Vec<String>> = moves
        .iter()
        .map(|m| {
            vec![
                m.id.to_string(),
                m.source.clone(),
                m.destination.clone().unwrap_or_else(|| "(origin)".to_string()),
                m.state.to_string(),
                m.moved.to_string(),
                m.skipped.to_string(),
                m.remaining.to_string(),
                m.rate.map_or_else(dash, |r| format!("{r}/s")),
                m.limit.map_or_else(dash, |l| l.to_string()),
                m.filter.as_ref().map_or_else(dash, |(k, v)| format!("{k}={v}")),
                format_seconds(m.elapsed(now_ms)),
                if m.error.is_empty() { dash() } else { m.error.clone() },
            ]
        })
        .collect();
    let mut align = [Align::Left; COLUMNS.len()];
    for column in [0, 4, 5, 6, 8, 10] {
        align[column] = Align::Right;
    }
    table(&COLUMNS, &align, &rows)
}

/// Seconds with one decimal, e.g. `2.0s`.
pub fn format_seconds(duration: Duration) -> String {
    format!("{:.1}s", duration.as_secs_f64())
}

/// The line `hopper queue move` ends with, e.g. `moved 100 messages from q.dead to q (skipped 0)
/// in 2.0s: finished`; a failure's error follows its state.
pub fn move_summary(m: &MoveInfo, now_ms: u64) -> String {
    let mut line = format!(
        "moved {} {} from {} to {} (skipped {}) in {}: {}",
        m.moved,
        if m.moved == 1 { "message" } else { "messages" },
        m.source,
        move_destination(m),
        m.skipped,
        format_seconds(m.elapsed(now_ms)),
        m.state
    );
    if !m.error.is_empty() {
        line.push_str(": ");
        line.push_str(&m.error);
    }
    line
}

/// An event as `hopper events --json` prints it: the wire's field names.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct EventJson<'a> {
    /// Unix ms at which it happened.
    pub time_ms: u64,
    /// What happened, e.g. alarm_raised.
    pub kind: &'a str,
    /// The queue concerned; null for broker-wide events.
    pub queue: Option<&'a str>,
    /// The depth for alarms, the move id for moves.
    pub value: u64,
    /// Human-readable detail; may be empty.
    pub detail: &'a str,
}

impl<'a> From<&'a Event> for EventJson<'a> {
    fn from(event: &'a Event) -> Self {
        EventJson {
            time_ms: event.time_ms,
            kind: event.kind.as_str(),
            queue: event.queue.as_deref(),
            value: event.value,
            detail: &event.detail,
        }
    }
}

/// An event as one line: time, kind, queue (`-` for none), value and detail.
pub fn event_line(event: &Event) -> String {
    let line = format!(
        "{} {} {} {} {}",
        format_unix_ms(event.time_ms),
        event.kind,
        event.queue.as_deref().unwrap_or("-"),
        event.value,
        event.detail.trim()
    );
    line.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use hopper_client::{EventKind, MoveState};

    use super::*;

    fn status(blocked: Option<&str>) -> BrokerStatus {
        BrokerStatus {
            version: "0.1.0".into(),
            uptime: Duration::from_secs(3725),
            connections: 3,
            blocked: blocked.map(str::to_string),
            blocked_publishers: u32::from(blocked.is_some()),
            memory_used: 3 << 20,
            memory_high_watermark: 12 << 20,
            disk_free: 5 << 30,
            disk_free_low_watermark: 50 << 20,
            storage_threads: 2,
            fsyncs: 1234,
            open_segment_files: 1,
            storage_error: None,
        }
    }

    #[test]
    fn status_listing_reads_well() {
        let text = status_listing(&status(None));
        for line in [
            "version:     0.1.0",
            "uptime:      1h 2m",
            "connections: 3",
            "publishers:  flowing",
            "memory:      3.0 MiB used, high watermark 12.0 MiB (25%)",
            "disk:        5.0 GiB free, low watermark 50.0 MiB",
            "storage:     2 threads, 1234 fsyncs, 1 segment file open",
        ] {
            assert!(text.lines().any(|l| l == line), "missing '{line}' in\n{text}");
        }
        let blocked = status_listing(&status(Some("memory high watermark")));
        assert!(
            blocked
                .lines()
                .any(|l| l == "publishers:  BLOCKED (memory high watermark); 1 connection held back"),
            "{blocked}"
        );
        let unknown = status_listing(&BrokerStatus { disk_free: u64::MAX, ..status(None) });
        assert!(unknown.contains("disk:        unknown, low watermark"), "{unknown}");
    }

    #[test]
    fn status_json_has_the_keys_of_the_http_api() {
        let value = serde_json::to_value(StatusJson::from(&status(Some("disk")))).unwrap();
        let mut keys: Vec<&str> = value.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "blocked",
                "blocked_publishers",
                "blocked_reason",
                "connections",
                "disk_free",
                "disk_free_low_watermark",
                "fsyncs",
                "memory_high_watermark",
                "memory_used",
                "open_segment_files",
                "storage_error",
                "storage_threads",
                "uptime_s",
                "version"
            ]
        );
        assert_eq!(
            (value["blocked"].as_bool(), value["blocked_reason"].as_str()),
            (Some(true), Some("disk"))
        );
        let free = serde_json::to_value(StatusJson::from(&status(None))).unwrap();
        assert_eq!(free["blocked_reason"], "");
    }

    #[test]
    fn bytes_and_uptimes_format_compactly() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(1 << 30), "1.0 GiB");
        assert_eq!(format_bytes(u64::MAX), "16.0 EiB");
        assert_eq!(format_uptime(Duration::from_secs(42)), "42s");
        assert_eq!(format_uptime(Duration::from_secs(303)), "5m 3s");
        assert_eq!(format_uptime(Duration::from_secs(7800)), "2h 10m");
        assert_eq!(format_uptime(Duration::from_secs(3 * 86_400 + 4 * 3600 + 59)), "3d 4h");
    }

    fn a_move(state: MoveState) -> MoveInfo {
        MoveInfo {
            id: 2,
            source: "q.dead".into(),
            destination: None,
            rate: Some(50),
            limit: None,
            filter: Some(("reason".into(), "expired".into())),
            state,
            moved: 100,
            skipped: 0,
            remaining: 0,
            error: String::new(),
            started_ms: 1_000,
            finished_ms: Some(3_050),
        }
    }

    #[test]
    fn move_summary_says_what_moved_where() {
        assert_eq!(
            move_summary(&a_move(MoveState::Finished), 0),
            "moved 100 messages from q.dead to their original queues (skipped 0) in 2.0s: finished"
        );
        let one = MoveInfo { moved: 1, destination: Some("q".into()), ..a_move(MoveState::Finished) };
        assert!(move_summary(&one, 0).starts_with("moved 1 message from q.dead to q "));
        let failed = MoveInfo { error: "queue 'q' is full".into(), ..a_move(MoveState::Failed) };
        assert!(move_summary(&failed, 0).ends_with(": failed: queue 'q' is full"));
        let running = MoveInfo { finished_ms: None, ..a_move(MoveState::Running) };
        assert!(move_summary(&running, 1_500).contains(" in 0.5s: running"));
    }

    #[test]
    fn moves_table_and_json() {
        let text = moves_table(&[a_move(MoveState::Finished)], 0);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("ID  SOURCE  DESTINATION  STATE"), "{}", lines[0]);
        assert!(lines[1].starts_with(" 2  q.dead  (origin)     finished"), "{}", lines[1]);
        assert!(lines[1].contains("50/s") && lines[1].contains("reason=expired"), "{}", lines[1]);
        assert!(lines[1].ends_with("2.0s  -"), "{}", lines[1]);
        let value: serde_json::Value =
            serde_json::from_str(&moves_json(&[a_move(MoveState::Running)]).unwrap()).unwrap();
        let first = &value[0];
        assert_eq!((first["state"].as_str(), first["destination"].is_null()), (Some("running"), true));
        assert_eq!(
            (first["filter_key"].as_str(), first["filter_value"].as_str()),
            (Some("reason"), Some("expired"))
        );
        assert_eq!(first["limit"], serde_json::Value::Null);
    }

    #[test]
    fn events_print_one_line_each() {
        let alarm = Event {
            time_ms: 1_700_000_000_123,
            kind: EventKind::AlarmRaised,
            queue: Some("q".into()),
            value: 6,
            detail: "ready 6 > 5".into(),
        };
        assert_eq!(event_line(&alarm), "2023-11-14T22:13:20.123Z alarm_raised q 6 ready 6 > 5");
        let unblocked = Event {
            kind: EventKind::PublishersUnblocked,
            queue: None,
            value: 0,
            detail: String::new(),
            ..alarm.clone()
        };
        assert_eq!(event_line(&unblocked), "2023-11-14T22:13:20.123Z publishers_unblocked - 0");
        let value = serde_json::to_value(EventJson::from(&unblocked)).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"time_ms": 1_700_000_000_123u64, "kind": "publishers_unblocked", "queue": null, "value": 0, "detail": ""})
        );
    }
}
