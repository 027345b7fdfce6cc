//! Pulling messages with [`Connection::get`], and the settle state of the pull consumers the
//! broker settles pulled messages under.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use hopper_proto::{pb, Body};
use parking_lot::Mutex;

use crate::connection::Connection;
use crate::delivery::{ConsumerShared, Delivery};
use crate::error::Result;
use crate::options::{wire_ms, GetOptions};
use crate::shared::unexpected;
use crate::tracker::DeliveryTracker;

/// The broker gives each connection one pull consumer per queue; pulled deliveries carry its
/// id and are settled like pushed ones. Their shared settle state lives as long as some
/// delivery of that consumer does.
///
/// Held weakly: the state holds the connection, and the connection holds this map.
#[derive(Default)]
pub(crate) struct Pullers {
    by_consumer: Mutex<HashMap<u64, Weak<ConsumerShared>>>,
}

impl Pullers {
    /// The settle state of pull consumer `consumer_id` of `queue`, created on first use.
    fn get_or_create(&self, conn: &Connection, consumer_id: u64, queue: &str) -> Arc<ConsumerShared> {
        let mut by_consumer = self.by_consumer.lock();
        if let Some(shared) = by_consumer.get(&consumer_id).and_then(Weak::upgrade) {
            return shared;
        }
        // Entries whose deliveries are all gone would otherwise pile up.
        by_consumer.retain(|_, shared| shared.strong_count() > 0);
        let shared = Arc::new(ConsumerShared {
            conn: conn.clone(),
            id: consumer_id,
            queue: queue.to_string(),
            tracker: Arc::new(DeliveryTracker::default()),
            // Pulled messages are settled as cheaply as possible; their visibility timeout
            // brings back any whose settle was lost.
            confirm: false,
        });
        by_consumer.insert(consumer_id, Arc::downgrade(&shared));
        let mut trackers = conn.shared().pull_trackers.lock();
        trackers.retain(|_, tracker| tracker.strong_count() > 0);
        trackers.insert(consumer_id, Arc::downgrade(&shared.tracker));
        shared
    }
}

impl Connection {
    /// Pulls up to `options.count` messages from `queue` (SQS-style), possibly none.
    ///
    /// The messages stay invisible to other consumers for `options.visibility`; settle each
    /// with [`Delivery::ack`] (or nack / reject) before then, or push the deadline with
    /// [`Delivery::extend`]. One left unsettled returns to the queue as a failed delivery
    /// after the visibility timeout, or when this connection closes. With `options.wait`, an
    /// empty queue is watched that long (at most 20 s) for a message; the call has no
    /// client-side timeout, since the broker answers by then.
    ///
    /// The broker allows one `get` at a time per queue and connection while one long-polls: a
    /// second concurrent one on the same queue fails with `PRECONDITION_FAILED`. If the
    /// returned future is dropped before the answer arrives, the messages it fetched stay
    /// invisible until their visibility timeout passes.
    pub async fn get(&self, queue: &str, options: GetOptions) -> Result<Vec<Delivery>> {
        let get = pb::Get {
            queue: queue.to_string(),
            count: options.count,
            visibility_ms: options.visibility.map_or(0, wire_ms),
            wait_ms: options.wait.map_or(0, wire_ms),
        };
        let deliveries = match self.call(Body::Get(get)).await? {
            Body::GetOk(ok) => ok.deliveries,
            other => return Err(unexpected("GetOk", &other)),
        };
        let mut consumer: Option<Arc<ConsumerShared>> = None;
        let mut pulled = Vec::with_capacity(deliveries.len());
        for deliver in deliveries {
            let shared = match &consumer {
                Some(shared) if shared.id == deliver.consumer_id => shared.clone(),
                _ => {
                    let shared = self.pullers().get_or_create(self, deliver.consumer_id, queue);
                    consumer = Some(shared.clone());
                    shared
                }
            };
            pulled.push(Delivery::new(deliver, shared));
        }
        Ok(pulled)
    }
}
