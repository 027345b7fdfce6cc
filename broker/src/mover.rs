//! Redrive: tasks inside the broker that move messages from one queue to another (typically out
//! of a dead-letter queue back to where they died), rate-limited, filtered, cancellable, and
//! crash-safe: a message leaves its source only once its destination holds it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{Notify, Semaphore};

use crate::error::BrokerError;
use crate::events::{BrokerEvent, Events};
use crate::message::{Payload, QueuedMessage};
use crate::queue::{now_ms, Confirm, Queue, Registry, Scan};

/// Messages of one move in flight at once (published to the destination, not yet confirmed).
const IN_FLIGHT: u32 = 256;
/// Finished moves remembered for `hopper queue moves`.
const KEEP_FINISHED: usize = 100;
/// How long a move waits before trying again to read a body that could not be read.
const UNREADABLE_RETRY: Duration = Duration::from_millis(500);

/// What to move.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MoveSpec {
    /// Queue to take messages from.
    pub source: String,
    /// Queue to put them in; empty = the queue each message last died in.
    pub destination: String,
    /// Most messages per second; 0 = unlimited.
    pub rate: u32,
    /// Stop after this many; 0 = all.
    pub limit: u64,
    /// Only messages whose header (or latest death field) `filter.0` equals `filter.1`.
    pub filter: Option<(String, String)>,
    /// With no destination: back through the exchange and routing key each message had when it
    /// died, instead of to the queue it died in.
    pub through_exchange: bool,
}

/// Where a move stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveState {
    /// Still moving.
    Running,
    /// Done: the limit was reached or no matching message is left.
    Finished,
    /// Stopped by a cancel.
    Cancelled,
    /// Stopped by an error (source deleted, destination full).
    Failed,
}

impl MoveState {
    /// The state's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            MoveState::Running => "running",
            MoveState::Finished => "finished",
            MoveState::Cancelled => "cancelled",
            MoveState::Failed => "failed",
        }
    }
}

/// A move's progress, as reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoveStatus {
    /// Broker-assigned id.
    pub id: u64,
    /// What was asked.
    pub spec: MoveSpec,
    /// Where it stands.
    pub state: MoveState,
    /// Messages now held by their destination.
    pub moved: u64,
    /// Messages left in the source because their destination is unknown.
    pub skipped: u64,
    /// Ready messages left in the source (matching or not) at the last look.
    pub remaining: u64,
    /// Why it failed.
    pub error: String,
    /// Unix ms of the start.
    pub started_ms: u64,
    /// Unix ms of the end, 0 while running.
    pub finished_ms: u64,
}

struct Move {
    status: Mutex<MoveStatus>,
    moved: AtomicU64,
    cancelled: AtomicBool,
    wake: Notify,
}

/// Every move of a broker.
#[derive(Default)]
pub struct Moves {
    next_id: AtomicU64,
    moves: Mutex<Vec<Arc<Move>>>,
}

impl Moves {
    /// Starts a move in the background and returns its first status.
    pub fn start(
        &self,
        registry: &Arc<Registry>,
        events: &Arc<Events>,
        spec: MoveSpec,
    ) -> Result<MoveStatus, BrokerError> {
        let source = registry.get(&spec.source)?;
        if !spec.destination.is_empty() {
            let destination = registry.get(&spec.destination)?;
            if destination.name() == source.name() {
                return Err(BrokerError::InvalidArgument("a move needs two different queues".into()));
            }
        }
        let status = MoveStatus {
            id: self.next_id.fetch_add(1, Ordering::Relaxed) + 1,
            spec,
            state: MoveState::Running,
            moved: 0,
            skipped: 0,
            remaining: source.snapshot().ready,
            error: String::new(),
            started_ms: now_ms(),
            finished_ms: 0,
        };
        let task = Arc::new(Move {
            status: Mutex::new(status.clone()),
            moved: AtomicU64::new(0),
            cancelled: AtomicBool::new(false),
            wake: Notify::new(),
        });
        {
            let mut moves = self.moves.lock();
            moves.push(task.clone());
            let finished = moves.iter().filter(|m| m.status.lock().state != MoveState::Running).count();
            if finished > KEEP_FINISHED {
                if let Some(oldest) = moves.iter().position(|m| m.status.lock().state != MoveState::Running) {
                    moves.remove(oldest);
                }
            }
        }
        tracing::info!(id = status.id, source = %status.spec.source, destination = %status.spec.destination, rate = status.spec.rate, limit = status.spec.limit, "move started");
        events.emit(BrokerEvent {
            time_ms: status.started_ms,
            kind: "move_started".into(),
            queue: status.spec.source.clone(),
            value: status.id,
            detail: if status.spec.destination.is_empty() {
                "to each message's original queue".to_owned()
            } else {
                format!("to '{}'", status.spec.destination)
            },
        });
        // Only what the source holds now is moved: messages that come in later (some may be
        // pushed in by this very move) are left alone, so a move always ends.
        let bound = source.with_state(|s, _, _| s.next_seq())?;
        tokio::spawn(run(task, Arc::downgrade(registry), source, bound, events.clone()));
        Ok(status)
    }

    /// Every remembered move, oldest first, with fresh progress.
    pub fn list(&self, registry: &Registry) -> Vec<MoveStatus> {
        self.moves.lock().iter().map(|m| m.snapshot(registry)).collect()
    }

    /// Asks a running move to stop; returns its status.
    pub fn cancel(&self, id: u64, registry: &Registry) -> Result<MoveStatus, BrokerError> {
        let task = self
            .moves
            .lock()
            .iter()
            .find(|m| m.status.lock().id == id)
            .cloned()
            .ok_or_else(|| BrokerError::NotFound(format!("no move with id {id}")))?;
        task.cancelled.store(true, Ordering::Release);
        task.wake.notify_one();
        Ok(task.snapshot(registry))
    }
}

impl Move {
    fn snapshot(&self, registry: &Registry) -> MoveStatus {
        let mut status = self.status.lock().clone();
        status.moved = self.moved.load(Ordering::Acquire);
        if let Ok(source) = registry.get(&status.spec.source) {
            status.remaining = source.snapshot().ready;
        }
        status
    }

    fn end(&self, state: MoveState, error: String) {
        let mut status = self.status.lock();
        status.state = state;
        status.error = error;
        status.finished_ms = now_ms();
        status.moved = self.moved.load(Ordering::Acquire);
        tracing::info!(id = status.id, state = state.as_str(), moved = status.moved, skipped = status.skipped, error = %status.error, "move ended");
    }
}

/// Where a moved message goes: the move's destination, or back where it died — its queue, or
/// with `through_exchange` every queue its exchange and routing key route to then.
fn destinations(registry: &Weak<Registry>, spec: &MoveSpec, payload: &Payload) -> Vec<Arc<Queue>> {
    let Some(registry) = registry.upgrade() else { return Vec::new() };
    if !spec.destination.is_empty() {
        return registry.get(&spec.destination).ok().into_iter().collect();
    }
    let Some(death) = payload.deaths().last() else { return Vec::new() };
    if spec.through_exchange && !death.exchange.is_empty() {
        return registry
            .route(&death.exchange, &death.routing_key, payload.headers())
            .map(|r| r.queues)
            .unwrap_or_default();
    }
    registry.get(&death.queue).ok().into_iter().collect()
}

/// True if the message matches the move's filter: a header, or a field of its latest death.
fn matches(payload: &Payload, filter: &Option<(String, String)>) -> bool {
    let Some((key, value)) = filter else { return true };
    if let Some(header) = payload.headers().get(key) {
        return header == value;
    }
    let Some(death) = payload.deaths().last() else { return false };
    match key.as_str() {
        "reason" => death.reason.as_str() == value,
        "queue" => &death.queue == value,
        "error" => &death.error == value,
        "count" => death.count.to_string() == *value,
        _ => false,
    }
}

/// What the next look into the source found.
enum Next {
    Message(QueuedMessage),
    Done,
    Unreadable(crate::storage::ReadError),
    Gone(BrokerError),
}

/// The next message to move at or after `from_seq` and before `bound`; `from_seq` moves past
/// everything looked at, so the source is scanned once however little the filter matches.
async fn next_message(
    source: &Queue,
    from_seq: &mut u64,
    bound: u64,
    filter: &Option<(String, String)>,
) -> Next {
    loop {
        let scan = source.with_state(|s, j, _| s.take_first(*from_seq, bound, |_, p| matches(p, filter), j));
        match scan {
            Ok(Ok(Scan::Taken(message))) => {
                *from_seq = message.seq + 1;
                return Next::Message(message);
            }
            Ok(Ok(Scan::Passed { next_seq })) => {
                *from_seq = next_seq;
                // Let other work in between batches of a long scan.
                tokio::task::yield_now().await;
            }
            Ok(Ok(Scan::Done)) => return Next::Done,
            Ok(Err(unreadable)) => return Next::Unreadable(unreadable),
            Err(err) => return Next::Gone(err),
        }
    }
}

async fn run(task: Arc<Move>, registry: Weak<Registry>, source: Arc<Queue>, bound: u64, events: Arc<Events>) {
    let spec = task.status.lock().spec.clone();
    let window = Arc::new(Semaphore::new(IN_FLIGHT as usize));
    let interval = (spec.rate > 0).then(|| Duration::from_secs_f64(1.0 / f64::from(spec.rate)));
    let mut next_at = tokio::time::Instant::now();
    let mut from_seq = 0;
    let failure: Arc<Mutex<Option<String>>> = Arc::default();
    let mut started = 0u64;
    let outcome = loop {
        if task.cancelled.load(Ordering::Acquire) {
            break (MoveState::Cancelled, String::new());
        }
        if let Some(error) = failure.lock().take() {
            break (MoveState::Failed, error);
        }
        if spec.limit > 0 && started >= spec.limit {
            break (MoveState::Finished, String::new());
        }
        if let Some(interval) = interval {
            tokio::select! {
                _ = tokio::time::sleep_until(next_at) => {}
                _ = task.wake.notified() => continue,
            }
            next_at = next_at.max(tokio::time::Instant::now() - interval) + interval;
        }
        let Ok(permit) = window.clone().acquire_owned().await else {
            break (MoveState::Failed, "closed".into());
        };
        let message = match next_message(&source, &mut from_seq, bound, &spec.filter).await {
            Next::Message(message) => message,
            Next::Done => break (MoveState::Finished, String::new()),
            Next::Unreadable(unreadable) => {
                // A body that cannot be read now: wait and try again, never skip it.
                drop(permit);
                tracing::debug!(queue = %source.name(), error = %unreadable, "move waits: a message body cannot be read now");
                tokio::select! {
                    _ = tokio::time::sleep(UNREADABLE_RETRY) => {}
                    _ = task.wake.notified() => {}
                }
                continue;
            }
            Next::Gone(err) => break (MoveState::Failed, err.to_string()),
        };
        let payload = message.payload.clone().expect("taken messages carry their payload");
        let destinations = destinations(&registry, &spec, &payload);
        // A message whose last death was in the source itself has nowhere to go back to.
        let destinations: Vec<Arc<Queue>> =
            destinations.into_iter().filter(|d| d.name() != source.name()).collect();
        if destinations.is_empty() {
            task.status.lock().skipped += 1;
            let _ = source.with_state(|s, _, _| s.give_back(message));
            continue;
        }
        started += 1;
        let moved = Arc::new(Payload { replay_count: payload.replay_count + 1, ..(*payload).clone() });
        let confirm = settle_when_held(&task, &source, message.clone(), permit, failure.clone());
        if let [destination] = destinations.as_slice() {
            if let Err(err) = destination.publish(moved, 0, 0, confirm) {
                let _ = source.with_state(|s, _, _| s.give_back(message));
                let name = destination.name();
                break (MoveState::Failed, format!("destination '{name}' refused a message: {err}"));
            }
            continue;
        }
        let now = crate::queue::now_ms();
        for (destination, confirm) in destinations.iter().zip(confirm.split(&destinations)) {
            destination.publish_or_refuse(moved.clone(), now, 0, 0, confirm);
        }
    };
    // Wait for the messages in flight before reporting the end.
    let _ = window.acquire_many(IN_FLIGHT).await;
    let (state, error) = match failure.lock().take() {
        Some(error) if outcome.0 != MoveState::Failed => (MoveState::Failed, error),
        _ => outcome,
    };
    task.end(state, error);
    let status = task.status.lock().clone();
    events.emit(BrokerEvent {
        time_ms: status.finished_ms,
        kind: "move_ended".into(),
        queue: status.spec.source.clone(),
        value: status.id,
        detail: format!(
            "{}: {} moved {}",
            status.state.as_str(),
            task.moved.load(Ordering::Acquire),
            status.error
        ),
    });
}

/// The confirm of a moved message's publish: once the destination holds it, it leaves the
/// source (its settle record is written); if the destination refused it, it goes back.
fn settle_when_held(
    task: &Arc<Move>,
    source: &Arc<Queue>,
    message: QueuedMessage,
    permit: tokio::sync::OwnedSemaphorePermit,
    failure: Arc<Mutex<Option<String>>>,
) -> Confirm {
    let task = task.clone();
    let source = source.clone();
    Confirm::Callback(Box::new(move |result| {
        match result {
            Ok(_) => {
                let _ = source.with_state(|_, journal, _| journal.settled(&message));
                task.moved.fetch_add(1, Ordering::AcqRel);
            }
            Err(err) => {
                let _ = source.with_state(|s, _, _| s.give_back(message));
                failure.lock().get_or_insert(format!("destination refused a message: {err}"));
            }
        }
        drop(permit);
    }))
}
