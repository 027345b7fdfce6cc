//! `hopper status`: the broker's health — version, uptime, connections, flow control, memory
//! and disk against their watermarks.

use clap::Args;

use crate::output::{self, StatusJson};

/// Flags of `status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print one JSON object with keys version, uptime_s, connections, blocked,
    /// blocked_reason (empty when not blocked), blocked_publishers, memory_used,
    /// memory_high_watermark, disk_free and disk_free_low_watermark (bytes), as the broker's
    /// `GET /api/status` does.
    #[arg(long)]
    pub json: bool,
}

/// Runs `status` against the broker at `server`.
pub async fn run(server: &str, args: StatusArgs) -> anyhow::Result<()> {
    let conn = crate::connect(server, "status").await?;
    let result = conn.status().await;
    // Closing is a courtesy; its failure must not hide the command's own result.
    let _ = conn.close().await;
    let status = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&StatusJson::from(&status))?);
    } else {
        print!("{}", output::status_listing(&status));
    }
    Ok(())
}
