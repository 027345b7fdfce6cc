//! Failure handling against a scripted broker: error texts and delays on nacks, ack deadlines
//! (extend, expiry), pulling with `get`, and the audit trail.

mod support;

use std::time::Duration;

use futures::StreamExt;
use hopper_client::{
    ConsumeOptions, Error, ErrorCode, GetOptions, NackOptions, PublishOptions, QueueOptions,
};
use hopper_proto::{pb, Body};
use support::{connect, consume, deliver, Peer};

/// Makes sure the client's reader has handled everything the broker sent before: answers one
/// round trip.
async fn sync(conn: &hopper_client::Connection, peer: &mut Peer) {
    let (list, ()) = tokio::join!(conn.list_queues(), async {
        let (id, body) = peer.recv_request().await;
        assert!(matches!(body, Body::QueueList(_)), "{body:?}");
        peer.send(id, Body::QueueListOk(pb::QueueListOk { queues: vec![] })).await;
    });
    list.unwrap();
}

fn expired(consumer_id: u64, delivery_tag: u64) -> Body {
    Body::DeliveryExpired(pb::DeliveryExpired { consumer_id, delivery_tag })
}

#[tokio::test]
async fn settings_and_per_message_options_reach_the_wire() {
    let (conn, mut peer) = connect().await;
    let options = QueueOptions {
        durable: true,
        dead_letter: Some("jobs.dead".into()),
        max_deliveries: Some(3),
        retry_backoff: vec![Duration::from_secs(1), Duration::from_secs(30)],
        message_ttl: Some(Duration::from_secs(3600)),
        ack_timeout: Some(Duration::from_millis(1500)),
        ..Default::default()
    };
    let (info, ()) = tokio::join!(conn.declare_queue("jobs", options.clone()), async {
        let (id, body) = peer.recv_request().await;
        let Body::QueueDeclare(declare) = body else { panic!("{body:?}") };
        let settings = declare.settings.clone().unwrap();
        assert_eq!(settings.dead_letter, "jobs.dead");
        assert_eq!(
            (settings.max_deliveries, settings.message_ttl_ms, settings.ack_timeout_ms),
            (3, 3_600_000, 1500)
        );
        assert_eq!(settings.retry_backoff_ms, [1000, 30_000]);
        let queue = pb::QueueInfo {
            name: declare.name,
            settings: declare.settings,
            delayed: 2,
            ..Default::default()
        };
        peer.send(id, Body::QueueDeclareOk(pb::QueueDeclareOk { queue: Some(queue), created: true })).await;
    });
    let info = info.unwrap();
    assert_eq!(info.delayed, 2);
    assert_eq!(
        (info.dead_letter, info.max_deliveries, info.retry_backoff, info.message_ttl, info.ack_timeout),
        (
            options.dead_letter,
            options.max_deliveries,
            options.retry_backoff,
            options.message_ttl,
            options.ack_timeout
        )
    );

    let publish = PublishOptions {
        delay: Some(Duration::from_secs(2)),
        ttl: Some(Duration::from_millis(250)),
        ..Default::default()
    };
    let confirm = conn.publish("jobs", "later", publish);
    let (id, body) = peer.recv_request().await;
    let Body::Publish(publish) = body else { panic!("{body:?}") };
    assert_eq!((publish.delay_ms, publish.ttl_ms), (2000, 250));
    peer.send(id, Body::PublishOk(pb::PublishOk { message_id: 5, routed: 1 })).await;
    assert_eq!(confirm.await.unwrap(), 5);

    let consume_options = ConsumeOptions { ack_timeout: Some(Duration::from_secs(10)), ..Default::default() };
    let (consumer, ()) = tokio::join!(conn.consume("jobs", consume_options), async {
        let (id, body) = peer.recv_request().await;
        assert!(matches!(body, Body::Consume(ref c) if c.ack_timeout_ms == 10_000), "{body:?}");
        peer.send(id, Body::ConsumeOk(pb::ConsumeOk { consumer_id: 1 })).await;
    });
    assert_eq!(consumer.unwrap().id(), 1);
}

#[tokio::test]
async fn nack_and_reject_carry_the_error_and_settle_once() {
    let (conn, mut peer) = connect().await;
    let mut consumer = consume(&conn, &mut peer, 7).await;
    for tag in 1..=3 {
        peer.send(0, deliver(7, tag, "job")).await;
    }
    let first = consumer.next().await.unwrap().unwrap();
    let second = consumer.next().await.unwrap().unwrap();
    let third = consumer.next().await.unwrap().unwrap();

    let options = NackOptions { error: "smtp timeout".into(), delay: Some(Duration::from_secs(5)) };
    first.nack_with(true, options.clone()).await.unwrap();
    let (_, body) = peer.recv_request().await;
    let Body::Nack(nack) = body else { panic!("{body:?}") };
    assert_eq!((nack.delivery_tag, nack.requeue, nack.multiple), (1, true, false));
    assert_eq!((nack.error.as_str(), nack.delay_ms), ("smtp timeout", Some(5000)));
    assert!(matches!(first.nack_with(true, options).await, Err(Error::AlreadySettled { delivery_tag: 1 })));
    assert!(matches!(first.reject_with("again").await, Err(Error::AlreadySettled { delivery_tag: 1 })));

    // Without a delay the queue's backoff applies: no delay goes on the wire.
    second.nack_with(false, NackOptions { error: "no".into(), ..Default::default() }).await.unwrap();
    let (_, body) = peer.recv_request().await;
    assert!(
        matches!(body, Body::Nack(ref n) if n.delay_ms.is_none() && !n.requeue && n.error == "no"),
        "{body:?}"
    );

    third.reject_with("invalid JSON at line 1").await.unwrap();
    assert!(matches!(third.ack().await, Err(Error::AlreadySettled { delivery_tag: 3 })));
    let (_, body) = peer.recv_request().await;
    assert_eq!(
        body,
        Body::Reject(pb::Reject {
            consumer_id: 7,
            delivery_tag: 3,
            requeue: false,
            confirm: false,
            error: "invalid JSON at line 1".into()
        })
    );
}

#[tokio::test]
async fn an_expired_delivery_is_refused_locally() {
    let (conn, mut peer) = connect().await;
    let mut consumer = consume(&conn, &mut peer, 4).await;
    peer.send(0, deliver(4, 1, "slow")).await;
    peer.send(0, deliver(4, 2, "fast")).await;
    let slow = consumer.next().await.unwrap().unwrap();
    let fast = consumer.next().await.unwrap().unwrap();
    peer.send(0, expired(4, 1)).await;
    sync(&conn, &mut peer).await;

    assert!(matches!(slow.ack().await, Err(Error::DeliveryExpired { delivery_tag: 1 })));
    assert!(matches!(slow.nack(true).await, Err(Error::DeliveryExpired { delivery_tag: 1 })));
    assert!(matches!(slow.reject_with("late").await, Err(Error::DeliveryExpired { delivery_tag: 1 })));
    assert!(matches!(
        slow.extend(Duration::from_secs(1)).await,
        Err(Error::DeliveryExpired { delivery_tag: 1 })
    ));
    // Nothing was sent for the expired delivery: the next frame is the other one's ack.
    fast.ack().await.unwrap();
    let (_, body) = peer.recv_request().await;
    assert_eq!(body, Body::Ack(pb::Ack { consumer_id: 4, delivery_tag: 2, multiple: false, confirm: false }));
}

#[tokio::test]
async fn a_confirmed_settle_refused_for_expiry_reports_the_expiry() {
    let (conn, mut peer) = connect().await;
    let options = ConsumeOptions { confirm_settlements: true, ..Default::default() };
    let (consumer, ()) = tokio::join!(conn.consume("q", options), async {
        let (id, _) = peer.recv_request().await;
        peer.send(id, Body::ConsumeOk(pb::ConsumeOk { consumer_id: 2 })).await;
    });
    let mut consumer = consumer.unwrap();
    peer.send(0, deliver(2, 1, "x")).await;
    let delivery = consumer.next().await.unwrap().unwrap();
    // The deadline passes while the ack is on its way.
    let (result, ()) = tokio::join!(delivery.ack(), async {
        let (id, body) = peer.recv_request().await;
        assert!(matches!(body, Body::Ack(ref a) if a.confirm), "{body:?}");
        peer.send(0, expired(2, 1)).await;
        let message = "delivery expired: tag 1 of consumer 2 passed its ack deadline".to_string();
        peer.send(
            id,
            Body::Error(pb::Error {
                code: ErrorCode::PreconditionFailed as i32,
                message,
                ..Default::default()
            }),
        )
        .await;
    });
    assert!(matches!(result, Err(Error::DeliveryExpired { delivery_tag: 1 })), "{result:?}");
}

#[tokio::test]
async fn extend_waits_for_the_broker_and_stops_after_a_settle() {
    let (conn, mut peer) = connect().await;
    let mut consumer = consume(&conn, &mut peer, 6).await;
    peer.send(0, deliver(6, 1, "long job")).await;
    let delivery = consumer.next().await.unwrap().unwrap();
    for _ in 0..2 {
        let (result, ()) = tokio::join!(delivery.extend(Duration::from_secs(30)), async {
            let (id, body) = peer.recv_request().await;
            assert_eq!(body, Body::Extend(pb::Extend { consumer_id: 6, delivery_tag: 1, extend_ms: 30_000 }));
            peer.send(id, Body::SettleOk(pb::SettleOk { settled: 1 })).await;
        });
        result.unwrap();
    }
    let (result, ()) = tokio::join!(delivery.extend(Duration::from_secs(1)), async {
        let (id, _) = peer.recv_request().await;
        let message = "unknown delivery tag 1 for consumer 6".to_string();
        peer.send(
            id,
            Body::Error(pb::Error { code: ErrorCode::NotFound as i32, message, ..Default::default() }),
        )
        .await;
    });
    assert_eq!(result.unwrap_err().code(), Some(ErrorCode::NotFound), "a refusal that is not an expiry");
    delivery.ack().await.unwrap();
    let _ = peer.recv_request().await;
    assert!(matches!(
        delivery.extend(Duration::from_secs(1)).await,
        Err(Error::AlreadySettled { delivery_tag: 1 })
    ));
}

#[tokio::test]
async fn pulled_deliveries_settle_under_the_pull_consumer() {
    let (conn, mut peer) = connect().await;
    let options = GetOptions {
        count: 2,
        visibility: Some(Duration::from_secs(60)),
        wait: Some(Duration::from_secs(5)),
    };
    let death = pb::Death {
        queue: "orders".into(),
        reason: "delivery_limit".into(),
        count: 5,
        error: "boom".into(),
        first_failure_ms: 10,
        last_failure_ms: 20,
        died_at_ms: 30,
        ..Default::default()
    };
    let (pulled, ()) = tokio::join!(conn.get("orders.dead", options), async {
        let (id, body) = peer.recv_request().await;
        assert_eq!(
            body,
            Body::Get(pb::Get {
                queue: "orders.dead".into(),
                count: 2,
                visibility_ms: 60_000,
                wait_ms: 5000
            })
        );
        let mut first = match deliver(40, 1, "a") {
            Body::Deliver(d) => d,
            _ => unreachable!(),
        };
        first.message.as_mut().unwrap().deaths = vec![death.clone()];
        let Body::Deliver(second) = deliver(40, 2, "b") else { unreachable!() };
        peer.send(id, Body::GetOk(pb::GetOk { deliveries: vec![first, second] })).await;
    });
    let pulled = pulled.unwrap();
    assert_eq!(pulled.len(), 2);
    assert_eq!(pulled[0].queue(), "orders.dead");
    let last = pulled[0].last_death().unwrap();
    assert_eq!(
        (last.reason.as_str(), last.count, last.error.as_str(), last.died_at_ms),
        ("delivery_limit", 5, "boom", 30)
    );
    assert!(pulled[1].deaths.is_empty());

    // A later get of the same pull consumer shares the settle state: ack_multiple covers all.
    let (more, ()) = tokio::join!(conn.get("orders.dead", GetOptions::default()), async {
        let (id, body) = peer.recv_request().await;
        assert!(matches!(body, Body::Get(ref g) if g.count == 1 && g.wait_ms == 0 && g.visibility_ms == 0));
        let Body::Deliver(third) = deliver(40, 3, "c") else { unreachable!() };
        peer.send(id, Body::GetOk(pb::GetOk { deliveries: vec![third] })).await;
    });
    let more = more.unwrap();
    more[0].ack_multiple().await.unwrap();
    let (_, body) = peer.recv_request().await;
    assert_eq!(body, Body::Ack(pb::Ack { consumer_id: 40, delivery_tag: 3, multiple: true, confirm: false }));
    assert!(matches!(pulled[1].ack().await, Err(Error::AlreadySettled { delivery_tag: 2 })));

    // An empty answer is not an error.
    let (none, ()) = tokio::join!(conn.get("orders.dead", GetOptions::default()), async {
        let (id, _) = peer.recv_request().await;
        peer.send(id, Body::GetOk(pb::GetOk { deliveries: vec![] })).await;
    });
    assert!(none.unwrap().is_empty());
}

#[tokio::test]
async fn audit_asks_for_the_window_and_reads_the_events() {
    let (conn, mut peer) = connect().await;
    let (events, ()) = tokio::join!(conn.audit(Some("orders"), 1234, 10), async {
        let (id, body) = peer.recv_request().await;
        assert_eq!(
            body,
            Body::AuditQuery(pb::AuditQuery { queue: "orders".into(), since_ms: 1234, limit: 10 })
        );
        let event = pb::AuditEvent {
            time_ms: 2000,
            queue: "orders".into(),
            message_id: 77,
            reason: "rejected".into(),
            count: 1,
            consumer_id: 3,
            connection_id: 9,
            error: "bad payload".into(),
            dead_letter: "orders.dead".into(),
            ..Default::default()
        };
        peer.send(id, Body::AuditEvents(pb::AuditEvents { events: vec![event] })).await;
    });
    let events = events.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].message_id, events[0].dead_letter.as_deref()), (77, Some("orders.dead")));

    let (all, ()) = tokio::join!(conn.audit(None, 0, 0), async {
        let (id, body) = peer.recv_request().await;
        assert_eq!(body, Body::AuditQuery(pb::AuditQuery { queue: String::new(), since_ms: 0, limit: 0 }));
        peer.send(id, Body::AuditEvents(pb::AuditEvents { events: vec![] })).await;
    });
    assert!(all.unwrap().is_empty());
}
