//! `hopper cluster status`: the cluster as the connected node sees it.

use clap::{Args, Subcommand};
use hopper_client::ClusterStatus;
use serde_json::json;

/// `hopper cluster ...`.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Show the members, their roles, the leader, the term and how far each member is behind
    /// the leader (known only when the node asked leads).
    Status(StatusArgs),
    /// Add a node to the cluster: start it first with --node-id and --cluster-listen (no
    /// --peers); it catches up, then votes.
    AddNode {
        /// The new node's id.
        id: u64,
        /// Its cluster address (its --cluster-listen).
        addr: String,
        #[command(flatten)]
        output: StatusArgs,
    },
    /// Remove a node from the cluster.
    RemoveNode {
        /// The node's id.
        id: u64,
        #[command(flatten)]
        output: StatusArgs,
    },
}

/// Flags of `cluster status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print one JSON object with keys node_id, state, term, leader (null without one),
    /// last_log_index, last_applied, queue_leaders (each queue group's leader, null when
    /// unknown) and members (each with id, addr, client_addr, voter, leader and lag;
    /// client_addr and lag are null when unknown).
    #[arg(long)]
    pub json: bool,
}

/// Runs a `cluster` subcommand against the broker at `server`.
pub async fn run(server: &str, command: ClusterCommand) -> anyhow::Result<()> {
    let conn = crate::connect(server, "cluster").await?;
    let (result, args) = match command {
        ClusterCommand::Status(args) => (conn.cluster_status().await, args),
        ClusterCommand::AddNode { id, addr, output } => (conn.cluster_add_node(id, &addr).await, output),
        ClusterCommand::RemoveNode { id, output } => (conn.cluster_remove_node(id).await, output),
    };
    // Closing is a courtesy; its failure must not hide the command's own result.
    let _ = conn.close().await;
    let status = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status_json(&status))?);
    } else {
        print!("{}", listing(&status));
    }
    Ok(())
}

fn status_json(status: &ClusterStatus) -> serde_json::Value {
    let members: Vec<_> = status
        .members
        .iter()
        .map(|m| {
            json!({
                "id": m.id,
                "addr": m.addr,
                "client_addr": m.client_addr,
                "voter": m.voter,
                "leader": m.leader,
                "lag": m.lag,
            })
        })
        .collect();
    json!({
        "node_id": status.node_id,
        "state": status.state,
        "term": status.term,
        "leader": status.leader,
        "last_log_index": status.last_log_index,
        "last_applied": status.last_applied,
        "queue_leaders": status.queue_leaders,
        "members": members,
    })
}

fn listing(status: &ClusterStatus) -> String {
    let leader = status.leader.map_or("none".to_string(), |id| id.to_string());
    let queues: Vec<String> =
        status.queue_leaders.iter().map(|l| l.map_or("none".to_string(), |id| id.to_string())).collect();
    let mut out = format!(
        "node {} ({}), term {}, leader {leader}, log {} (applied {}), queue groups led by {}\n",
        status.node_id,
        status.state,
        status.term,
        status.last_log_index,
        status.last_applied,
        queues.join(",")
    );
    out.push_str(&format!(
        "{:>4}  {:<24} {:<24} {:<8} {:<7} {:>5}\n",
        "ID", "ADDRESS", "CLIENTS AT", "ROLE", "VOTER", "LAG"
    ));
    for m in &status.members {
        let role = if m.leader { "leader" } else { "-" };
        let lag = m.lag.map_or("-".to_string(), |lag| lag.to_string());
        let voter = if m.voter { "yes" } else { "learner" };
        let clients = m.client_addr.as_deref().unwrap_or("-");
        out.push_str(&format!(
            "{:>4}  {:<24} {:<24} {:<8} {:<7} {:>5}\n",
            m.id, m.addr, clients, role, voter, lag
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use hopper_client::ClusterMember;

    use super::*;

    #[test]
    fn the_listing_marks_the_leader_and_unknown_lag() {
        let status = ClusterStatus {
            node_id: 2,
            state: "follower".into(),
            term: 3,
            leader: Some(1),
            last_log_index: 7,
            last_applied: 7,
            members: vec![
                ClusterMember {
                    id: 1,
                    addr: "a:1".into(),
                    client_addr: Some("a:5680".into()),
                    voter: true,
                    leader: true,
                    lag: None,
                },
                ClusterMember {
                    id: 2,
                    addr: "b:2".into(),
                    client_addr: None,
                    voter: true,
                    leader: false,
                    lag: Some(4),
                },
            ],
            queue_leaders: vec![Some(3), None],
        };
        let text = listing(&status);
        assert!(
            text.starts_with(
                "node 2 (follower), term 3, leader 1, log 7 (applied 7), queue groups led by 3,none\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("   1  a:1                      a:5680                   leader   yes         -\n"),
            "{text}"
        );
        assert!(
            text.contains("   2  b:2                      -                        -        yes         4\n"),
            "{text}"
        );
        let json = status_json(&status);
        assert_eq!(json["leader"], 1);
        assert_eq!(json["members"][0]["lag"], serde_json::Value::Null);
        assert_eq!(json["members"][1]["lag"], 4);
        assert_eq!(json["members"][0]["client_addr"], "a:5680");
        assert_eq!(json["members"][1]["client_addr"], serde_json::Value::Null);
        assert_eq!(json["queue_leaders"], serde_json::json!([3, null]));
    }
}
