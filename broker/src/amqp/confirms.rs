//! Publisher confirms (`confirm.select`): a channel's publishes are numbered from 1, and each is
//! answered with `basic.ack` once its queues hold it, or `basic.nack` when it was refused.
//!
//! Answers are sent as RabbitMQ sends them: the acks of a run of publishes answered in order go
//! out as one `basic.ack` with `multiple`, covering every publish up to the last of them, when
//! the connection next gets to it; a nack, and an answer that comes before those of earlier
//! publishes, go out on their own at once. A burst of publishes is then confirmed in a frame
//! or two instead of one frame each.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{basic, AMQPClass};
use parking_lot::Mutex;
use tokio::sync::Notify;

use super::codec::push_frame;
use crate::error::BrokerError;
use crate::outbox::Outbox;
use crate::queue::{Outcome, Replies};

/// A channel in confirm mode.
pub struct Confirms {
    outbox: Arc<Outbox>,
    channel: u16,
    /// Wakes the connection to send the acks waiting ([`Confirms::flush`]).
    due: Arc<Notify>,
    /// The number of the last publish.
    published: AtomicU64,
    answers: Mutex<Answers>,
}

impl Confirms {
    pub fn new(outbox: Arc<Outbox>, channel: u16, due: Arc<Notify>) -> Self {
        Confirms { outbox, channel, due, published: AtomicU64::new(0), answers: Mutex::default() }
    }

    /// The number of a new publish.
    pub fn next_number(&self) -> u64 {
        self.published.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Answers publish `number`: taken (`ack`) or refused (`nack`).
    pub fn answer(&self, number: u64, taken: bool) {
        // Sent under the lock, which orders them against the channel's close.
        let mut answers = self.answers.lock();
        if answers.closed {
            return;
        }
        let mut now = Vec::new();
        let waiting = answers.answer(number, taken, &mut now);
        for answer in now {
            self.send(answer);
        }
        drop(answers);
        if waiting {
            self.due.notify_one();
        }
    }

    /// Sends the acks waiting, as one.
    pub fn flush(&self) {
        let mut answers = self.answers.lock();
        if let Some(answer) = answers.flush().filter(|_| !answers.closed) {
            self.send(answer);
        }
    }

    /// The channel is closing: the acks waiting go out, and nothing after them.
    pub fn close(&self) {
        let mut answers = self.answers.lock();
        if let Some(answer) = answers.flush().filter(|_| !answers.closed) {
            self.send(answer);
        }
        answers.closed = true;
    }

    fn send(&self, answer: Answer) {
        let method = match answer {
            Answer::Ack { tag, multiple } => {
                basic::AMQPMethod::Ack(basic::Ack { delivery_tag: tag, multiple })
            }
            Answer::Nack { tag } => {
                basic::AMQPMethod::Nack(basic::Nack { delivery_tag: tag, multiple: false, requeue: false })
            }
        };
        push_frame(&self.outbox, &AMQPFrame::Method(self.channel, AMQPClass::Basic(method)));
    }
}

impl Replies for Confirms {
    fn reply(&self, number: u64, result: Result<Outcome, BrokerError>) {
        // Unroutable and not mandatory is still taken, as RabbitMQ confirms it.
        self.answer(number, matches!(result, Ok(_) | Err(BrokerError::NoRoute(_))));
    }
}

/// A frame answering publishes.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Ack { tag: u64, multiple: bool },
    Nack { tag: u64 },
}

/// Which publishes are answered, and which acks wait to be sent.
#[derive(Debug, Default)]
struct Answers {
    /// Every publish up to this one is answered, on the wire or in the ack waiting.
    answered: u64,
    /// Every publish up to this one is answered on the wire; acks of those after it, up to
    /// `answered`, wait.
    sent: u64,
    /// Publishes past `answered + 1` answered already (each on its own), as runs: first →
    /// last. Publishes answered in order behind one that is slow (its queue's disk, say) are
    /// one run, however many they are.
    early: BTreeMap<u64, u64>,
    /// The channel is closed: nothing more is sent.
    closed: bool,
}

impl Answers {
    /// Publish `number` is answered: what goes out now into `now`; true if an ack waits.
    fn answer(&mut self, number: u64, taken: bool, now: &mut Vec<Answer>) -> bool {
        if number != self.answered + 1 {
            now.push(if taken {
                Answer::Ack { tag: number, multiple: false }
            } else {
                Answer::Nack { tag: number }
            });
            if number > self.answered {
                self.answered_early(number);
            }
            return self.answered > self.sent;
        }
        if !taken {
            now.extend(self.flush());
            now.push(Answer::Nack { tag: number });
            self.sent = number;
        }
        self.answered = number;
        if let Some(last) = self.early.remove(&(self.answered + 1)) {
            // They went out on their own: the acks waiting go before the run passes them, so
            // that no ack covers them again.
            now.extend(self.flush());
            self.answered = last;
            self.sent = last;
        }
        self.answered > self.sent
    }

    /// Adds `number` to the runs answered early, joining the runs it touches.
    fn answered_early(&mut self, number: u64) {
        let before = self.early.range(..=number).next_back().map(|(&first, &last)| (first, last));
        let first = match before {
            Some((_, last)) if last >= number => return,
            Some((first, last)) if last + 1 == number => first,
            _ => number,
        };
        let last = self.early.remove(&(number + 1)).unwrap_or(number);
        self.early.insert(first, last);
    }

    /// The ack of every publish answered and not yet sent, if there is one.
    fn flush(&mut self) -> Option<Answer> {
        if self.answered == self.sent {
            return None;
        }
        let multiple = self.answered - self.sent > 1;
        self.sent = self.answered;
        Some(Answer::Ack { tag: self.answered, multiple })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(answers: &mut Answers, number: u64, taken: bool) -> (Vec<Answer>, bool) {
        let mut now = Vec::new();
        let waiting = answers.answer(number, taken, &mut now);
        (now, waiting)
    }

    #[test]
    fn acks_in_order_go_out_as_one() {
        let mut answers = Answers::default();
        assert_eq!(answers.flush(), None);
        for number in 1..=3 {
            assert_eq!(answer(&mut answers, number, true), (vec![], true));
        }
        assert_eq!(answers.flush(), Some(Answer::Ack { tag: 3, multiple: true }));
        assert_eq!(answers.flush(), None);
        assert_eq!(answer(&mut answers, 4, true), (vec![], true));
        assert_eq!(answers.flush(), Some(Answer::Ack { tag: 4, multiple: false }), "one alone");
    }

    #[test]
    fn a_nack_goes_out_at_once_after_the_acks_before_it() {
        let mut answers = Answers::default();
        answer(&mut answers, 1, true);
        answer(&mut answers, 2, true);
        let (now, waiting) = answer(&mut answers, 3, false);
        assert_eq!(now, [Answer::Ack { tag: 2, multiple: true }, Answer::Nack { tag: 3 }]);
        assert!(!waiting);
        assert_eq!(answers.flush(), None);
        assert_eq!(answer(&mut answers, 4, true), (vec![], true));
        assert_eq!(answers.flush(), Some(Answer::Ack { tag: 4, multiple: false }), "not over the nack");
    }

    #[test]
    fn an_answer_out_of_order_goes_alone_and_is_not_covered_again() {
        let mut answers = Answers::default();
        answer(&mut answers, 1, true);
        assert_eq!(answer(&mut answers, 3, true), (vec![Answer::Ack { tag: 3, multiple: false }], true));
        assert_eq!(answer(&mut answers, 4, false), (vec![Answer::Nack { tag: 4 }], true));
        assert_eq!(answers.flush(), Some(Answer::Ack { tag: 1, multiple: false }));
        // 2 fills the gap: 3 and 4 were answered already, so 2's ack goes at once, alone.
        assert_eq!(answer(&mut answers, 2, true), (vec![Answer::Ack { tag: 2, multiple: false }], false));
        assert_eq!((answers.answered, answers.sent), (4, 4));
        assert_eq!(answers.flush(), None);
        assert!(answers.early.is_empty());
        assert_eq!(answer(&mut answers, 5, true), (vec![], true));
        assert_eq!(answers.flush(), Some(Answer::Ack { tag: 5, multiple: false }));
    }

    #[test]
    fn answers_behind_a_slow_one_are_kept_as_one_run() {
        let mut answers = Answers::default();
        for number in (2..=10_000).rev().step_by(2).chain((3..=9_999).step_by(2)) {
            answer(&mut answers, number, true);
        }
        assert_eq!(answers.early.len(), 1, "{:?}", answers.early.iter().take(3).collect::<Vec<_>>());
        assert_eq!(answers.early.get(&2), Some(&10_000));
        assert_eq!(answer(&mut answers, 1, true), (vec![Answer::Ack { tag: 1, multiple: false }], false));
        assert_eq!((answers.answered, answers.sent), (10_000, 10_000));
        assert!(answers.early.is_empty());
    }

    #[test]
    fn early_answers_right_after_those_sent_need_nothing_more() {
        let mut answers = Answers::default();
        assert_eq!(answer(&mut answers, 2, true), (vec![Answer::Ack { tag: 2, multiple: false }], false));
        assert_eq!(answer(&mut answers, 1, false), (vec![Answer::Nack { tag: 1 }], false));
        assert_eq!((answers.answered, answers.sent), (2, 2));
        assert_eq!(answers.flush(), None);
    }
}
