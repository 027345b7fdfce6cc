//! Broker events: [`Connection::subscribe_events`] and the [`Events`] stream of [`Event`]s —
//! depth alarms raised and cleared, publishers blocked and unblocked, moves started and ended.

use std::fmt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures::stream::{FusedStream, Stream};
use hopper_proto::{pb, Body};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::oneshot;

use crate::connection::Connection;
use crate::error::{Error, Result};
use crate::shared::{unexpected, PendingRequest};

/// Events buffered per [`Events`] stream. The broker sends events as they happen, whether or not
/// the stream is read; past this many unread ones, newer events are dropped (and counted) until
/// the stream is read again, so a forgotten stream cannot grow without bound.
pub const EVENT_BUFFER: usize = 1024;

/// What kind of thing happened.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A queue's ready depth went above its alarm depth ([`Connection::set_alarm`]).
    AlarmRaised,
    /// A queue's ready depth is back at or below its alarm depth.
    AlarmCleared,
    /// The broker blocked publishers (a memory or disk watermark was crossed).
    PublishersBlocked,
    /// The broker unblocked publishers.
    PublishersUnblocked,
    /// A move started ([`Connection::start_move`]).
    MoveStarted,
    /// A move ended (finished, cancelled or failed).
    MoveEnded,
    /// A kind this client does not know, by its wire name.
    Other(String),
}

impl EventKind {
    /// The kind's name on the wire, e.g. `alarm_raised`.
    pub fn as_str(&self) -> &str {
        match self {
            EventKind::AlarmRaised => "alarm_raised",
            EventKind::AlarmCleared => "alarm_cleared",
            EventKind::PublishersBlocked => "publishers_blocked",
            EventKind::PublishersUnblocked => "publishers_unblocked",
            EventKind::MoveStarted => "move_started",
            EventKind::MoveEnded => "move_ended",
            EventKind::Other(name) => name,
        }
    }

    fn from_wire(name: String) -> EventKind {
        match name.as_str() {
            "alarm_raised" => EventKind::AlarmRaised,
            "alarm_cleared" => EventKind::AlarmCleared,
            "publishers_blocked" => EventKind::PublishersBlocked,
            "publishers_unblocked" => EventKind::PublishersUnblocked,
            "move_started" => EventKind::MoveStarted,
            "move_ended" => EventKind::MoveEnded,
            _ => EventKind::Other(name),
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something that happened in the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Unix time in milliseconds at which it happened.
    pub time_ms: u64,
    /// What happened.
    pub kind: EventKind,
    /// The queue concerned (a move's source); `None` for broker-wide events.
    pub queue: Option<String>,
    /// The ready depth for alarms, the move id for moves; 0 otherwise.
    pub value: u64,
    /// Human-readable detail, e.g. why publishers are blocked; may be empty.
    pub detail: String,
}

impl From<pb::Event> for Event {
    fn from(event: pb::Event) -> Self {
        Event {
            time_ms: event.time_ms,
            kind: EventKind::from_wire(event.kind),
            queue: (!event.queue.is_empty()).then_some(event.queue),
            value: event.value,
            detail: event.detail,
        }
    }
}

/// What the reader passes to an [`Events`] stream.
#[derive(Debug)]
pub(crate) enum EventItem {
    Event(pb::Event),
    /// This many events were dropped because the stream's buffer was full.
    Missed(u64),
}

/// The reader's end of one [`Events`] stream.
#[derive(Debug)]
pub(crate) struct EventRoute {
    sender: mpsc::Sender<EventItem>,
    /// Events dropped since the stream last had room, reported before the next one that fits.
    missed: u64,
}

impl EventRoute {
    /// A route and the receiving end for its stream.
    pub(crate) fn new() -> (EventRoute, mpsc::Receiver<EventItem>) {
        let (sender, receiver) = mpsc::channel(EVENT_BUFFER);
        (EventRoute { sender, missed: 0 }, receiver)
    }

    /// Passes `event` on without waiting: when the stream's buffer is full the event is
    /// dropped and counted, and the count goes ahead of the next event that fits, so the
    /// stream reports the gap where it happened. Returns false once the stream is gone.
    pub(crate) fn deliver(&mut self, event: &pb::Event) -> bool {
        if self.missed > 0 {
            match self.sender.try_send(EventItem::Missed(self.missed)) {
                Ok(()) => self.missed = 0,
                Err(TrySendError::Full(_)) => {
                    self.missed += 1;
                    return true;
                }
                Err(TrySendError::Closed(_)) => return false,
            }
        }
        match self.sender.try_send(EventItem::Event(event.clone())) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.missed += 1;
                true
            }
            Err(TrySendError::Closed(_)) => false,
        }
    }
}

/// A subscription to the broker's events: a [`Stream`] of [`Event`]s, in the order they
/// happened.
///
/// At most [`EVENT_BUFFER`] unread events are kept; when more arrive, the newest are dropped
/// and the stream yields `Err(Error::EventsMissed(n))` in their place, then goes on. The stream
/// yields `Err(Error::Closed(..))` once and ends if the connection is lost, and just ends after
/// [`Connection::close`]. It holds a clone of its connection.
pub struct Events {
    conn: Connection,
    items: mpsc::Receiver<EventItem>,
    done: bool,
}

impl Stream for Events {
    type Item = Result<Event>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match ready!(self.items.poll_recv(cx)) {
            Some(EventItem::Event(event)) => Poll::Ready(Some(Ok(event.into()))),
            Some(EventItem::Missed(missed)) => Poll::Ready(Some(Err(Error::EventsMissed(missed)))),
            None => {
                self.done = true;
                match self.conn.shared().close_reason() {
                    Some(reason) if !reason.by_client => {
                        Poll::Ready(Some(Err(Error::Closed(reason.message))))
                    }
                    _ => Poll::Ready(None),
                }
            }
        }
    }
}

impl FusedStream for Events {
    fn is_terminated(&self) -> bool {
        self.done
    }
}

impl fmt::Debug for Events {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Events").field("done", &self.done).finish()
    }
}

impl Connection {
    /// Subscribes to the broker's events. Events that happen from the broker's answer on come
    /// through the returned stream; the broker keeps no history. Every call returns a stream
    /// of its own and each sees every event.
    pub async fn subscribe_events(&self) -> Result<Events> {
        let (route, items) = EventRoute::new();
        let (reply, response) = oneshot::channel();
        self.shared()
            .send_request(Body::Subscribe(pb::Subscribe {}), PendingRequest::Subscribe { reply, route })?;
        match self.shared().response(response).await? {
            Body::SubscribeOk(_) => Ok(Events { conn: self.clone(), items, done: false }),
            other => Err(unexpected("SubscribeOk", &other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(value: u64) -> pb::Event {
        pb::Event { time_ms: 1, kind: "alarm_raised".into(), queue: "q".into(), value, detail: String::new() }
    }

    fn values(items: &mut mpsc::Receiver<EventItem>) -> Vec<String> {
        let mut seen = Vec::new();
        while let Ok(item) = items.try_recv() {
            seen.push(match item {
                EventItem::Event(event) => event.value.to_string(),
                EventItem::Missed(missed) => format!("missed {missed}"),
            });
        }
        seen
    }

    #[test]
    fn a_full_buffer_drops_events_and_reports_the_gap_in_place() {
        let (mut route, mut items) = EventRoute::new();
        for value in 0..EVENT_BUFFER as u64 + 3 {
            assert!(route.deliver(&event(value)));
        }
        let seen = values(&mut items);
        assert_eq!(seen.len(), EVENT_BUFFER);
        assert_eq!(seen.last().map(String::as_str), Some("1023"));
        // Room again: the gap comes first, then the new event.
        assert!(route.deliver(&event(2000)));
        assert_eq!(values(&mut items), ["missed 3", "2000"]);
        assert!(route.deliver(&event(2001)));
        assert_eq!(values(&mut items), ["2001"]);
    }

    #[test]
    fn a_dropped_stream_closes_the_route() {
        let (mut route, items) = EventRoute::new();
        drop(items);
        assert!(!route.deliver(&event(1)));
    }

    #[test]
    fn events_read_their_kind_and_queue() {
        let alarm = Event::from(event(6));
        assert_eq!((alarm.kind, alarm.queue.as_deref(), alarm.value), (EventKind::AlarmRaised, Some("q"), 6));
        let blocked = Event::from(pb::Event { kind: "publishers_blocked".into(), ..Default::default() });
        assert_eq!((blocked.kind, blocked.queue), (EventKind::PublishersBlocked, None));
        for name in [
            "alarm_raised",
            "alarm_cleared",
            "publishers_blocked",
            "publishers_unblocked",
            "move_started",
            "move_ended",
            "x",
        ] {
            assert_eq!(EventKind::from_wire(name.into()).as_str(), name);
        }
    }
}
