//! Everything the CLI prints: aligned tables, `key: value` listings, and the JSON objects
//! behind `--json`. Queues are in [`queues`], messages and audit events in [`messages`], broker
//! status, moves and events in [`ops`], `hopper top`'s frame in [`top`], and `hopper bench`'s
//! reports in [`bench`].

mod bench;
mod messages;
mod ops;
mod queues;
mod top;

use std::io::Write;

use serde::Serialize;

pub use bench::{
    bench_listing, check_listing, declare_listing, BenchReport, BrokerFootprint, CheckReport, DeclareReport,
};
pub use messages::{audit_table, peeked, write_delivery};
pub use ops::{
    event_line, move_destination, move_summary, moves_json, moves_table, status_listing, EventJson,
    StatusJson,
};
pub use queues::{blocked_line, queue_json, queue_listing, queue_table, queues_json};
pub use top::{top_frame, TopFrame};

/// Writes one value as a single line of JSON.
pub fn write_json_line(out: &mut impl Write, value: &impl Serialize) -> anyhow::Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    out.write_all(b"\n")?;
    Ok(())
}

/// Renders `key: value` lines, padding keys so the values line up.
pub fn listing(fields: &[(&str, String)]) -> String {
    let width = fields.iter().map(|(key, _)| key.chars().count()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (key, value) in fields {
        let label = format!("{key}:");
        out.push_str(&format!("{label:<width$} {value}\n", width = width));
    }
    out
}

/// How a table column is aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    /// Pad on the right.
    Left,
    /// Pad on the left; for numbers.
    Right,
}

/// Renders a table: columns separated by two spaces, each as wide as its widest cell, no
/// trailing spaces.
pub fn table(headers: &[&str], align: &[Align], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header_cells: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header_cells).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let pad = widths[i].saturating_sub(cell.chars().count());
            match align.get(i).copied().unwrap_or(Align::Left) {
                Align::Left => {
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', pad));
                }
                Align::Right => {
                    line.extend(std::iter::repeat_n(' ', pad));
                    line.push_str(cell);
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `yes` or `no`, for boolean columns.
pub fn yes_no(value: bool) -> &'static str {
    if value {
        "yes"
    } else {
        "no"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns_under_their_headers() {
        let text = table(
            &["NAME", "N"],
            &[Align::Left, Align::Right],
            &[vec!["a".into(), "1000".into()], vec!["longer".into(), "7".into()]],
        );
        assert_eq!(text, "NAME       N\na       1000\nlonger     7\n");
    }

    #[test]
    fn listing_aligns_values() {
        let text = listing(&[("a", "1".into()), ("long", "2".into())]);
        assert_eq!(text, "a:    1\nlong: 2\n");
    }

    #[test]
    fn json_line_ends_with_a_newline() {
        let mut out = Vec::new();
        write_json_line(&mut out, &serde_json::json!({"k": 1})).unwrap();
        assert_eq!(out, b"{\"k\":1}\n");
    }
}
