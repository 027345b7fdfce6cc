//! Moves (redrive): [`MoveInfo`] and [`MoveState`], and the [`Connection`] methods that start,
//! list and cancel moves. A move runs inside the broker; the client only asks and looks.

use std::fmt;
use std::time::Duration;

use hopper_proto::{pb, Body};

use crate::connection::Connection;
use crate::error::Result;
use crate::options::MoveOptions;
use crate::shared::unexpected;

/// Where a move stands.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MoveState {
    /// Still moving messages.
    Running,
    /// Done: the limit was reached or no matching message is left.
    Finished,
    /// Stopped by [`Connection::cancel_move`].
    Cancelled,
    /// Stopped by an error (the source was deleted, the destination refused a message);
    /// [`MoveInfo::error`] says which.
    Failed,
    /// A state this client does not know, by its wire name.
    Other(String),
}

impl MoveState {
    /// The state's name on the wire: `running`, `finished`, `cancelled` or `failed`.
    pub fn as_str(&self) -> &str {
        match self {
            MoveState::Running => "running",
            MoveState::Finished => "finished",
            MoveState::Cancelled => "cancelled",
            MoveState::Failed => "failed",
            MoveState::Other(name) => name,
        }
    }

    /// True while the move goes on.
    pub fn is_running(&self) -> bool {
        *self == MoveState::Running
    }

    fn from_wire(name: String) -> MoveState {
        match name.as_str() {
            "running" => MoveState::Running,
            "finished" => MoveState::Finished,
            "cancelled" => MoveState::Cancelled,
            "failed" => MoveState::Failed,
            _ => MoveState::Other(name),
        }
    }
}

impl fmt::Display for MoveState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A move as the broker reports it: what was asked and how far it got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoveInfo {
    /// Broker-assigned id, for [`Connection::cancel_move`].
    pub id: u64,
    /// The queue messages are taken from.
    pub source: String,
    /// The queue they go to; `None`: each goes back to the queue it last died in.
    pub destination: Option<String>,
    /// Most messages per second; `None` for unlimited.
    pub rate: Option<u32>,
    /// Most messages moved; `None` for all.
    pub limit: Option<u64>,
    /// Only messages with this header (or latest death field) value.
    pub filter: Option<(String, String)>,
    /// Where the move stands.
    pub state: MoveState,
    /// Messages now held by their destination.
    pub moved: u64,
    /// Messages left in the source because their destination is unknown.
    pub skipped: u64,
    /// Messages waiting in the source when the broker last looked.
    pub remaining: u64,
    /// Why the move failed; empty otherwise.
    pub error: String,
    /// Unix time in milliseconds at which the move started.
    pub started_ms: u64,
    /// Unix time in milliseconds at which it ended; `None` while it runs.
    pub finished_ms: Option<u64>,
}

impl MoveInfo {
    /// How long the move ran (until `now_ms` while it still runs).
    pub fn elapsed(&self, now_ms: u64) -> Duration {
        let end = self.finished_ms.unwrap_or(now_ms);
        Duration::from_millis(end.saturating_sub(self.started_ms))
    }

    /// The messages this move is expected to move in all: those moved so far plus those still
    /// waiting in the source (skipped ones excluded), capped by the limit. An estimate while
    /// the move runs: the broker counts every waiting message of the source, filtered or not.
    pub fn expected_total(&self) -> u64 {
        let total = self.moved + self.remaining.saturating_sub(self.skipped);
        match self.limit {
            Some(limit) => total.min(limit),
            None => total,
        }
    }
}

impl From<pb::MoveInfo> for MoveInfo {
    fn from(info: pb::MoveInfo) -> Self {
        MoveInfo {
            id: info.id,
            source: info.source,
            destination: (!info.destination.is_empty()).then_some(info.destination),
            rate: (info.rate > 0).then_some(info.rate),
            limit: (info.limit > 0).then_some(info.limit),
            filter: (!info.filter_key.is_empty()).then_some((info.filter_key, info.filter_value)),
            state: MoveState::from_wire(info.state),
            moved: info.moved,
            skipped: info.skipped,
            remaining: info.remaining,
            error: info.error,
            started_ms: info.started_ms,
            finished_ms: (info.finished_ms > 0).then_some(info.finished_ms),
        }
    }
}

impl Connection {
    /// Starts moving waiting messages out of `options.source` (see [`MoveOptions`]) and returns
    /// the move as it starts. The move runs inside the broker: it goes on when this connection
    /// closes. Follow it with [`list_moves`](Self::list_moves), stop it with
    /// [`cancel_move`](Self::cancel_move). Fails with `NOT_FOUND` when a queue does not exist.
    pub async fn start_move(&self, options: MoveOptions) -> Result<MoveInfo> {
        match self.call(Body::MoveStart(options.to_wire())).await? {
            Body::MoveInfo(info) => Ok(info.into()),
            other => Err(unexpected("MoveInfo", &other)),
        }
    }

    /// Every move the broker remembers (running ones and the most recent ended ones), oldest
    /// first, with fresh progress.
    pub async fn list_moves(&self) -> Result<Vec<MoveInfo>> {
        match self.call(Body::MoveList(pb::MoveList {})).await? {
            Body::MoveListOk(ok) => Ok(ok.moves.into_iter().map(MoveInfo::from).collect()),
            other => Err(unexpected("MoveListOk", &other)),
        }
    }

    /// Asks the move `id` to stop and returns its state at that moment (it may still report
    /// `running` for the messages in flight). Fails with `NOT_FOUND` for an unknown id.
    pub async fn cancel_move(&self, id: u64) -> Result<MoveInfo> {
        match self.call(Body::MoveCancel(pb::MoveCancel { id })).await? {
            Body::MoveInfo(info) => Ok(info.into()),
            other => Err(unexpected("MoveInfo", &other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(state: &str) -> pb::MoveInfo {
        pb::MoveInfo {
            id: 3,
            source: "jobs.dead".into(),
            state: state.into(),
            moved: 40,
            skipped: 5,
            remaining: 65,
            started_ms: 1000,
            ..Default::default()
        }
    }

    #[test]
    fn unset_wire_fields_read_as_none() {
        let info = MoveInfo::from(wire("running"));
        assert_eq!((&info.destination, info.rate, info.limit, &info.filter), (&None, None, None, &None));
        assert_eq!(info.finished_ms, None);
        assert!(info.state.is_running());
        assert_eq!(info.elapsed(3500), Duration::from_millis(2500));
    }

    #[test]
    fn set_wire_fields_are_kept() {
        let info = MoveInfo::from(pb::MoveInfo {
            destination: "jobs".into(),
            rate: 50,
            limit: 10,
            filter_key: "reason".into(),
            filter_value: "expired".into(),
            finished_ms: 2000,
            ..wire("finished")
        });
        assert_eq!(info.destination.as_deref(), Some("jobs"));
        assert_eq!((info.rate, info.limit), (Some(50), Some(10)));
        assert_eq!(info.filter, Some(("reason".into(), "expired".into())));
        assert_eq!(info.state, MoveState::Finished);
        assert_eq!(info.elapsed(99_999), Duration::from_secs(1));
    }

    #[test]
    fn states_parse_and_unknown_ones_are_kept() {
        for name in ["running", "finished", "cancelled", "failed", "paused"] {
            let state = MoveState::from_wire(name.into());
            assert_eq!(state.as_str(), name);
        }
        assert_eq!(MoveState::from_wire("paused".into()), MoveState::Other("paused".into()));
    }

    #[test]
    fn expected_total_leaves_out_skipped_and_respects_the_limit() {
        let info = MoveInfo::from(wire("running"));
        assert_eq!(info.expected_total(), 100);
        let limited = MoveInfo { limit: Some(50), ..info.clone() };
        assert_eq!(limited.expected_total(), 50);
        let done = MoveInfo { remaining: 5, moved: 100, ..info };
        assert_eq!(done.expected_total(), 100);
    }
}
